//! `--recovery-audit-file`: one tab-separated record per recovery spawn and per outcome,
//!
//! `<wall_unix_s>\t<observer_ns>\t<agent_pid>\t<child_pid>\t<outcome>\t<exit>\t<duration_ms>\t<output>`
//!
//! - `outcome`: `spawned` when the command started, then one of `success`, `failure`,
//!   `timeout`, `spawn_failed`, `debounced`, `refused`.
//! - `exit`: `exit:<code>` or `signal:<n>` once the command ended, else `-`.
//! - `output`: with `--recovery-capture-stdio`, the first `--recovery-capture-bytes` of its
//!   stdout and stderr (`...` when cut), with `\`, tab, CR, LF and other control bytes
//!   escaped (`\\`, `\t`, `\r`, `\n`, `\xNN`); else `-`.
//!
//! Records are written, rotated and fdatasync'ed off the event loop (see `sink`), one batch
//! per event-loop round. Records of recoveries that ran (`spawned`, `success`, `failure`,
//! `timeout`, `spawn_failed`) go first and may use the whole queue; those of recoveries not
//! run (`debounced`, `refused`, `suppressed`: what a flood of dying throwaway agents makes)
//! only its spare half, so that no such flood ever costs a real record its place.

use std::{
    os::unix::process::ExitStatusExt,
    process::ExitStatus,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    actions::sink::{FileMetrics, Sink, SinkOptions},
    vocab::recovery::{Finished, Outcome},
};

pub struct Audit {
    sink: Sink,
    /// This round's records of recoveries that ran, and of those not run.
    ran: String,
    not_run: String,
}

impl Audit {
    pub fn open(opts: SinkOptions, metrics: FileMetrics) -> std::io::Result<Self> {
        Ok(Audit {
            sink: Sink::open("audit", opts, metrics)?,
            ran: String::new(),
            not_run: String::new(),
        })
    }

    pub fn spawned(&mut self, observer_ns: u64, pid: u32, child: u32) {
        let line = record(observer_ns, pid, Some(child), "spawned", "-", "-", "-");
        self.ran.push_str(&line);
    }

    pub fn finished(&mut self, observer_ns: u64, f: &Finished) {
        let line = match &f.run {
            None => record(observer_ns, f.pid, None, f.outcome.name(), "-", "-", "-"),
            Some(run) => record(
                observer_ns,
                f.pid,
                Some(run.child),
                f.outcome.name(),
                &run.status.map_or("-".to_owned(), exit),
                &run.elapsed.as_millis().to_string(),
                &run.output.as_deref().map_or("-".to_owned(), escape),
            ),
        };
        match f.outcome {
            Outcome::Success | Outcome::Failure | Outcome::Timeout | Outcome::SpawnFailed => {
                self.ran.push_str(&line)
            }
            Outcome::Debounced | Outcome::Refused | Outcome::Suppressed => {
                self.not_run.push_str(&line)
            }
        }
    }

    /// Hands this round's records to the writer, those of recoveries that ran first.
    pub fn flush(&mut self) {
        self.sink.write(std::mem::take(&mut self.ran).into_bytes());
        self.sink
            .write_spare(std::mem::take(&mut self.not_run).into_bytes());
    }

    pub fn reopen(&mut self) {
        self.flush();
        self.sink.reopen();
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.flush();
    }
}

fn record(
    observer_ns: u64,
    pid: u32,
    child: Option<u32>,
    outcome: &str,
    exit: &str,
    duration_ms: &str,
    output: &str,
) -> String {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{:03}\t{observer_ns}\t{pid}\t{}\t{outcome}\t{exit}\t{duration_ms}\t{output}\n",
        wall.as_secs(),
        wall.subsec_millis(),
        child.map_or("-".to_owned(), |c| c.to_string()),
    )
}

fn exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit:{code}"),
        (None, Some(sig)) => format!("signal:{sig}"),
        (None, None) => "-".to_owned(),
    }
}

/// One field: no tab or line break of the output may split the record.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    if out.is_empty() { "-".to_owned() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_never_splits_a_record() {
        assert_eq!(escape("a\tb\nc\\d\x07"), "a\\tb\\nc\\\\d\\x07");
        assert_eq!(escape(""), "-");
    }

    #[test]
    fn exit_code_or_signal() {
        assert_eq!(exit(ExitStatus::from_raw(3 << 8)), "exit:3");
        assert_eq!(exit(ExitStatus::from_raw(9)), "signal:9");
    }

    #[test]
    fn eight_columns() {
        let r = record(5, 42, Some(43), "success", "exit:0", "12", "ok");
        assert_eq!(r.trim_end().split('\t').count(), 8);
        assert!(r.ends_with("\t5\t42\t43\tsuccess\texit:0\t12\tok\n"));
    }
}
