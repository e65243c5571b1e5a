//! `--heartbeat-file PATH`: the observer's own beat for an outside checker, one line
//! `ts=<unix seconds.ms> progress=<loop iterations>` rewritten in place at most once per
//! [`EVERY`]. A checker compares two reads: a moving `progress` means the event loop runs.

use crate::sys::logger::event;
use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The bound on the update rate.
pub const EVERY: Duration = Duration::from_secs(1);

pub struct HeartbeatFile {
    file: File,
    last: Option<Instant>,
    failures: u64,
}

impl HeartbeatFile {
    /// Opens (creates) the file now, so that an unusable path fails start-up.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = super::owned_file::open(path, super::owned_file::Write::InPlace, 0o644)?;
        Ok(HeartbeatFile {
            file,
            last: None,
            failures: 0,
        })
    }

    /// Writes the line unless one was written less than [`EVERY`] ago.
    pub fn update(&mut self, progress: u64) {
        if self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "ts={}.{:03} progress={progress}\n",
            ts.as_secs(),
            ts.subsec_millis()
        );
        let written = self
            .file
            .write_all_at(line.as_bytes(), 0)
            .and_then(|()| self.file.set_len(line.len() as u64));
        if let Err(e) = written {
            if self.failures.is_multiple_of(1000) {
                event!(
                    warn,
                    "heartbeat_file_failed",
                    error:% = e,
                    failures = self.failures + 1,
                );
            }
            self.failures += 1;
        }
    }
}
