//! What the daemon reads from /proc: pid namespaces, `NSpid`, `pid_max`.

use std::{fs, io, os::unix::fs::MetadataExt};

/// A pid namespace, as the device and inode of its `/proc/<pid>/ns/pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PidNs {
    pub dev: u64,
    pub ino: u64,
}

/// The observer's own pid namespace (another process's needs ptrace access: senders are
/// placed by `NSpid` instead, see [`sender`]).
pub fn own_pid_ns() -> io::Result<PidNs> {
    let meta = fs::metadata("/proc/self/ns/pid")?;
    Ok(PidNs {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// The process's pids from the outermost namespace visible to us to its own (`NSpid`).
pub fn ns_pids(pid: u32) -> io::Result<Vec<u32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no NSpid line"))?;
    line.split_whitespace()
        .map(|p| {
            p.parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad NSpid"))
        })
        .collect()
}

/// What the observer knows of a sender it cannot take at its word, from the world-readable
/// `NSpid` line (`/proc/<pid>/ns/pid` needs ptrace access, which a least-privilege observer
/// lacks for other users' processes and for processes with capabilities it does not hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    /// The sender lives in a pid namespace below the one our /proc shows (a container):
    /// `NSpid` lists more than one pid.
    pub cross_namespace: bool,
    /// The sender's pid inside its own pid namespace: what an honest frame carries.
    pub own_pid: u32,
}

pub fn sender(pid: u32) -> io::Result<Sender> {
    let pids = ns_pids(pid)?;
    let own_pid = *pids
        .last()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty NSpid"))?;
    Ok(Sender {
        cross_namespace: pids.len() > 1,
        own_pid,
    })
}

pub fn pid_max() -> io::Result<u32> {
    fs::read_to_string("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unparsable pid_max"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_its_own_sender() {
        let me = std::process::id();
        let s = sender(me).unwrap();
        assert!(!s.cross_namespace);
        // In our own namespace our innermost pid is the pid we see.
        assert_eq!(s.own_pid, me);
        assert!(pid_max().unwrap() >= 2);
    }
}
