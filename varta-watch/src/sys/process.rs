//! A process, not just a pid: a pid names whichever process holds it now, and after an exit
//! the kernel hands it to another. A pid and its process's start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot) name one process for the life of the host,
//! up to the tick (10 ms): reusing a pid that fast takes forcing it (root).
//! The rule of when a pid still is the process that beat lives here, for the tracker (is a
//! restart the same process?) and for recovery (may the command be told this pid?).

use std::fs;

/// When a process started, in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTime(pub u64);

impl StartTime {
    /// The start time of the process holding `pid` now; `None` when there is none (or it
    /// cannot be read).
    pub fn of(pid: u32) -> Option<StartTime> {
        // Bytes: the command name may be any bytes, not UTF-8.
        let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&stat)
    }
}

impl StartTime {
    /// Whether this is the start time the kernel attested for a beat's sender
    /// (`BeatRecord::start_ticks`: the low 32 bits, 0 never matching).
    pub fn is_attested(self, attested: u32) -> bool {
        attested != 0 && self.0 as u32 == attested
    }
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and
/// may hold spaces and parentheses itself, so fields are counted after the last `)`.
fn parse_stat(stat: &[u8]) -> Option<StartTime> {
    let close = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // Field 3 (state) is the first after `)`: field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok().map(StartTime)
}

/// What holds a pid now, compared with the process recorded for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The recorded process (a zombie included).
    Same,
    /// No process: the recorded one exited and nobody holds the pid.
    Gone,
    /// Another process: the pid was reused (or the recorded process had already exited
    /// when it was first looked at, `recorded` = `None`, and someone holds the pid now).
    Reused,
}

impl Continuity {
    pub fn of(recorded: Option<StartTime>, now: Option<StartTime>) -> Continuity {
        match now {
            None => Continuity::Gone,
            Some(now) if recorded == Some(now) => Continuity::Same,
            Some(_) => Continuity::Reused,
        }
    }

    /// `pid` now, against the process recorded for it.
    pub fn check(pid: u32, recorded: Option<StartTime>) -> Continuity {
        Continuity::of(recorded, StartTime::of(pid))
    }
}

/// The real uid of the process holding `pid` (`/proc/<pid>/status`, world-readable): the
/// tenant whose budgets its agent's recoveries draw on.
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_field_22_whatever_the_command_name() {
        let fields: String = (3..=21).map(|f| format!(" {f}")).collect();
        let stat = format!("42 (a) b (c){fields} 777 23 24\n");
        assert_eq!(parse_stat(stat.as_bytes()), Some(StartTime(777)));
        assert_eq!(parse_stat(b"42 (short) S 1"), None);
        let mut name = b"42 (\xff\xfe)".to_vec();
        name.extend_from_slice(fields.as_bytes());
        name.extend_from_slice(b" 778 1\n");
        assert_eq!(parse_stat(&name), Some(StartTime(778)), "a name not UTF-8");
    }

    #[test]
    fn our_own_start_time_is_stable_and_a_child_differs() {
        let me = std::process::id();
        let mine = StartTime::of(me).expect("our own /proc entry");
        assert_eq!(Continuity::check(me, Some(mine)), Continuity::Same);
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // Reaped: nobody holds the pid (a new process taking it this instant would show as
        // reused, never as the same).
        assert_ne!(Continuity::check(pid, Some(mine)), Continuity::Same);
        assert_eq!(Continuity::of(Some(mine), None), Continuity::Gone);
        assert_eq!(Continuity::of(None, Some(mine)), Continuity::Reused);
        assert_eq!(
            Continuity::of(Some(StartTime(1)), Some(mine)),
            Continuity::Reused
        );
    }
}
