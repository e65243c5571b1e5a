//! The export file: one tab-separated line per event, in the incumbent's format
//! `<observer_ns>\t<kind>\t<pid>\t<nonce>\t<status>\t<payload>`, `-` where a column does
//! not apply. Flushed after every batch of events and at shutdown; SIGHUP reopens it.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::PathBuf,
};

use crate::{actions::recovery::Finished, observer::events::Event};

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

    pub fn record(&mut self, observer_ns: u64, event: &Event) -> io::Result<()> {
        if let Some(line) = Self::line(observer_ns, event) {
            writeln!(self.out, "{line}")?;
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
