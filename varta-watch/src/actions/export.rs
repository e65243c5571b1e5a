//! The export file: one tab-separated line per event, in the incumbent's format
//! `<observer_ns>\t<kind>\t<pid>\t<nonce>\t<status>\t<payload>`, `-` where a column does
//! not apply; stall and exit lines add four columns after those six: the agent's comm,
//! systemd unit, container id and pod UID. The lines of a batch of events go to the
//! file's writer thread together (see `sink`: O_NOFOLLOW, mode 0600, rotation, fdatasync
//! cadence, SIGHUP reopens it).

use crate::{
    actions::identity::Identity,
    actions::sink::{FileMetrics, Sink, SinkOptions},
    vocab::{events::Event, recovery::Finished},
};

pub struct Exporter {
    sink: Sink,
    batch: Vec<u8>,
}

impl Exporter {
    pub fn open(opts: SinkOptions, metrics: FileMetrics) -> std::io::Result<Self> {
        Ok(Exporter {
            sink: Sink::open("export", opts, metrics)?,
            batch: Vec::new(),
        })
    }

    /// The line for `event`, if it has one.
    pub fn line(observer_ns: u64, event: &Event) -> Option<String> {
        Some(match event {
            Event::Beat { pid, frame, .. } => {
                format!(
                    "{observer_ns}\tbeat\t{pid}\t{}\t{}\t{}",
                    frame.nonce,
                    frame.status.name(),
                    frame.payload
                )
            }
            Event::Stall {
                pid, last_nonce, ..
            } => format!("{observer_ns}\tstall\t{pid}\t{last_nonce}\tstall\t-"),
            Event::Exit { pid, frame, .. } => {
                format!(
                    "{observer_ns}\texit\t{pid}\t{}\t{}\t{}",
                    frame.nonce,
                    frame.status.name(),
                    frame.payload
                )
            }
            Event::Recovery(Finished { pid, outcome, .. }) => {
                format!("{observer_ns}\trecovery\t{pid}\t-\t-\t{}", outcome.name())
            }
            _ => return None,
        })
    }

    /// Writes `event`'s line; stall and exit lines end with the agent's identity (comm,
    /// unit, container id, pod UID; `-` when unknown).
    pub fn record(&mut self, observer_ns: u64, event: &Event, identity: Option<&Identity>) {
        if let Some(line) = Self::line(observer_ns, event) {
            self.batch.extend_from_slice(line.as_bytes());
            if let (Event::Stall { .. } | Event::Exit { .. }, Some(id)) = (event, identity) {
                for field in [&id.comm, &id.unit, &id.container_id, &id.pod_uid] {
                    let field = field.replace(char::is_whitespace, "_");
                    self.batch.push(b'\t');
                    self.batch
                        .extend_from_slice(if field.is_empty() { "-" } else { &field }.as_bytes());
                }
            }
            self.batch.push(b'\n');
        }
    }

    /// Hands the batch's lines to the writer (never waits).
    pub fn flush(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.sink.write(batch);
    }

    /// Log rotation: continue in a fresh file at the same path.
    pub fn reopen(&mut self) {
        self.flush();
        self.sink.reopen();
    }
}
