//! `--after-handover hold`: an observer that handed over stays, holding nothing, until it
//! is told to stop. A DaemonSet rolled with `maxSurge` runs the new pod beside the old one
//! until the new one is available, and only then deletes the old pod; an old container
//! that exited after the handover would be restarted by its kubelet (`restartPolicy:
//! Always`) and take the node back. Held, it keeps no socket of the observer's, runs no
//! timer (it wakes only for a signal or a probe), and exits 0 at SIGTERM.
//!
//! `--hold-marker` (a file in the pod's emptyDir) carries the hold across a restart of the
//! held container: an observer started while it exists holds at once and never asks for
//! a takeover.

use std::{io::Write, net::TcpListener, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{Context, Result};

use crate::sys::logger::event;
use crate::{
    config::{Config, HoldConfig},
    signal::{Signal, Signals},
};

/// A held observer: its signals, and the listener its pod's probes reach (when no other
/// observer serves that address).
pub struct Held {
    pub signals: Signals,
    pub probes: Option<TcpListener>,
}

impl Held {
    /// Waits for SIGTERM (or SIGINT), answering the probes meanwhile; other signals are
    /// ignored (nothing to reload, nothing to snapshot).
    pub async fn run(mut self) -> Result<()> {
        if let Some(listener) = self.probes.take() {
            crate::daemon::http::serve_held(listener).context("serving the probes")?;
        }
        loop {
            for sig in self.signals.recv().await.context("waiting for signals")? {
                if matches!(sig, Signal::Term | Signal::Int) {
                    event!(info, "shutdown", signal = sig.name(), held = true);
                    return Ok(());
                }
            }
        }
    }
}

/// At start-up: the marker of a hold exists, so this observer holds at once.
pub fn marked(config: &Config) -> bool {
    config
        .hold
        .as_ref()
        .and_then(|h| h.marker.as_deref())
        .is_some_and(|m| std::fs::symlink_metadata(m).is_ok())
}

/// Holds from start-up (see [`marked`]), with the configured address bound anew for the
/// probes when it is free (a pod of its own; else the observer there answers them; port 0
/// names no address a probe could know).
pub fn from_start(config: &Config, signals: Signals) -> Held {
    let probes = config
        .prom_addr
        .filter(|a| a.port() != 0)
        .and_then(|a| TcpListener::bind(a).ok());
    event!(
        info,
        "held",
        reason = "--hold-marker exists: this pod handed over before",
        probes:% = probes_shown(probes.as_ref()),
    );
    Held { signals, probes }
}

/// After a handover: writes the marker (if any) and holds.
pub fn after_handover(
    hold: &HoldConfig,
    signals: Signals,
    peer_pid: u32,
    probes: Option<TcpListener>,
) -> Held {
    if let Some(marker) = &hold.marker
        && let Err(e) = mark(marker, peer_pid)
    {
        event!(
            warn,
            "hold_marker_failed",
            path:% = marker.display(),
            error:% = e,
            reason = "a restart of this container would take over again",
        );
    }
    event!(
        info,
        "held",
        peer_pid = peer_pid,
        probes:% = probes_shown(probes.as_ref()),
    );
    Held { signals, probes }
}

fn probes_shown(probes: Option<&TcpListener>) -> String {
    probes
        .and_then(|l| l.local_addr().ok())
        .map_or("-".to_owned(), |a| a.to_string())
}

/// `peer_pid=N`, 0600, never through a symlink.
fn mark(path: &Path, peer_pid: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    writeln!(file, "peer_pid={peer_pid}")
}
