//! The service manager's notification protocol (`sd_notify(3)`), sent whenever
//! `$NOTIFY_SOCKET` is set, with no flag: `READY=1` once the socket is bound and the
//! datapath attached, `WATCHDOG=1` from the event loop at half of `$WATCHDOG_USEC`, and
//! `STOPPING=1` when a shutdown begins. Without `$NOTIFY_SOCKET` every call does nothing.

use crate::sys::logger::event;
use std::{io, os::unix::net::UnixDatagram, time::Duration};

pub use sd_notify::NotifyState;

/// One notification. A failure is logged (rate-limited by the callers' cadence) and never
/// stops the daemon: systemd acts on a missing READY or WATCHDOG itself.
pub fn send(state: NotifyState<'_>) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = match target.as_encoded_bytes().strip_prefix(b"@") {
        // sd-notify 0.5 connects every name as a path; an abstract name (the form systemd
        // uses in containers and user managers) is connected here.
        Some(name) => send_abstract(name, &format!("{state}\n")),
        None => sd_notify::notify(std::slice::from_ref(&state)),
    };
    if let Err(e) = result {
        event!(
            warn,
            "notify_failed",
            state = state.to_string().trim_end(),
            socket = target.to_string_lossy(),
            error:% = e,
        );
    }
}

fn send_abstract(name: &[u8], message: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let sock = UnixDatagram::unbound()?;
    sock.connect_addr(&addr)?;
    sock.send(message.as_bytes()).map(drop)
}

/// How often the event loop sends `WATCHDOG=1`: half of `$WATCHDOG_USEC` (when it names this
/// process through `$WATCHDOG_PID`, or names none), as `sd_watchdog_enabled(3)` advises.
pub fn watchdog_period() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}
