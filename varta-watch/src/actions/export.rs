//! The export file: one tab-separated line per event, in the incumbent's format
//! `<observer_ns>\t<kind>\t<pid>\t<nonce>\t<status>\t<payload>`, `-` where a column does
//! not apply; stall and exit lines add four columns after those six: the agent's comm,
//! systemd unit, container id and pod UID. Flushed after every batch of events and at
//! shutdown; SIGHUP reopens it.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::PathBuf,
};

use crate::{
    actions::recovery::Finished,
    observer::{events::Event, identity::Identity},
};

pub struct Exporter {
    path: PathBuf,
    out: BufWriter<File>,
    dirty: bool,
}

fn open(path: &PathBuf) -> io::Result<BufWriter<File>> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    Ok(BufWriter::with_capacity(64 * 1024, file))
}

impl Exporter {
    pub fn open(path: PathBuf) -> io::Result<Self> {
        Ok(Exporter {
            out: open(&path)?,
            path,
            dirty: false,
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
            Event::Stall { pid, agent, .. } => format!(
                "{observer_ns}\tstall\t{pid}\t{}\tstall\t-",
                agent.last_nonce
            ),
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
    pub fn record(
        &mut self,
        observer_ns: u64,
        event: &Event,
        identity: Option<&Identity>,
    ) -> io::Result<()> {
        if let Some(line) = Self::line(observer_ns, event) {
            write!(self.out, "{line}")?;
            if let (Event::Stall { .. } | Event::Exit { .. }, Some(id)) = (event, identity) {
                for field in [&id.comm, &id.unit, &id.container_id, &id.pod_uid] {
                    let field = field.replace(char::is_whitespace, "_");
                    write!(
                        self.out,
                        "\t{}",
                        if field.is_empty() { "-" } else { &field }
                    )?;
                }
            }
            writeln!(self.out)?;
            self.dirty = true;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if self.dirty {
            self.out.flush()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Log rotation: flush, then continue in a fresh file at the same path.
    pub fn reopen(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out = open(&self.path)?;
        Ok(())
    }
}
