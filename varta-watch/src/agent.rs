//! The agent side, for scripts and demos: `varta-watch beat` and `varta-watch agent`.

use std::{os::unix::net::UnixDatagram, thread, time::Duration};

use anyhow::{Context, Result};
use varta_common::{Frame, Status, frame::NONCE_TERMINAL};

use crate::config::cli::{AgentArgs, BeatArgs, WireStatus};

fn status(s: WireStatus) -> Status {
    match s {
        WireStatus::Ok => Status::Ok,
        WireStatus::Degraded => Status::Degraded,
        WireStatus::Critical => Status::Critical,
    }
}

fn timestamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn beat(args: &BeatArgs) -> Result<()> {
    let (status, nonce) = if args.panic {
        (Status::Critical, NONCE_TERMINAL)
    } else {
        (status(args.status), args.nonce)
    };
    let pid = args.pid.unwrap_or_else(std::process::id);
    let frame = Frame {
        status,
        pid,
        timestamp: timestamp(),
        nonce,
        payload: args.payload,
    };
    let sock = UnixDatagram::unbound().context("creating a socket")?;
    sock.send_to(&frame.encode(), &args.socket)
        .with_context(|| format!("sending to {}", args.socket.display()))?;
    Ok(())
}

pub fn agent(args: &AgentArgs) -> Result<()> {
    let sock = UnixDatagram::unbound().context("creating a socket")?;
    let pid = std::process::id();
    for nonce in 1u64.. {
        let dying = args.panic_after.is_some_and(|n| nonce > n);
        let frame = Frame {
            status: if dying {
                Status::Critical
            } else {
                status(args.status)
            },
            pid,
            timestamp: timestamp(),
            nonce: if dying { NONCE_TERMINAL } else { nonce },
            payload: args.payload,
        };
        if let Err(e) = sock.send_to(&frame.encode(), &args.socket) {
            // The observer may be restarting: keep beating.
            eprintln!(
                "varta-watch agent: sending to {}: {e}",
                args.socket.display()
            );
        }
        if dying {
            break;
        }
        thread::sleep(Duration::from_millis(args.interval_ms));
    }
    Ok(())
}
