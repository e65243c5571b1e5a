//! The daemon's own signal handling: handlers installed with the raw `rt_sigaction(2)`
//! system call and, on x86_64, a restorer trampoline of our own (`arch`). The handlers
//! (`handlers`) only record the signal and write to an eventfd; `Signals::recv` turns the
//! wake-ups into actions in the tokio loop. `--signal-handler-mode libc` installs the same
//! handlers through libc. All of the daemon's signal-related unsafe code is here.

mod arch;
pub mod handlers;
mod raw;

use std::{
    io,
    mem::ManuallyDrop,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

pub use handlers::{Installed, Signal, rseq_size};
use tokio::io::unix::AsyncFd;

/// `--signal-handler-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SignalHandlerMode {
    /// Raw rt_sigaction(2) with the daemon's own restorer.
    Direct,
    /// libc's sigaction (escape hatch).
    Libc,
}

/// Receives the signals the handlers recorded.
pub struct Signals {
    /// Never closed (see `Drop`).
    wake: ManuallyDrop<AsyncFd<OwnedFd>>,
}

/// A handler may run on any thread at any time, even during shutdown, and writes to the
/// descriptor number it loaded: closing the eventfd could let it write into whatever file
/// reuses that number next. So the handlers are told to stop writing, and the eventfd is
/// left open (one descriptor, until the process exits).
impl Drop for Signals {
    fn drop(&mut self) {
        handlers::stop_waking();
        // SAFETY: `wake` is taken once, here, and never used again.
        let wake = unsafe { ManuallyDrop::take(&mut self.wake) };
        std::mem::forget(wake.into_inner());
    }
}

/// Installs the handlers, reads them back from the kernel, and runs the live self-test.
pub fn install(mode: SignalHandlerMode) -> io::Result<(Signals, Installed)> {
    // SAFETY: eventfd creates a new fd or returns -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let wake = unsafe { OwnedFd::from_raw_fd(fd) };
    let installed = handlers::install(mode == SignalHandlerMode::Direct, wake.as_raw_fd())?;
    Ok((
        Signals {
            wake: ManuallyDrop::new(crate::sys::readiness::readable(wake)?),
        },
        installed,
    ))
}

impl Signals {
    /// Waits for at least one signal; returns every pending one.
    pub async fn recv(&mut self) -> io::Result<Vec<Signal>> {
        loop {
            let mut guard = self.wake.readable().await?;
            let mut count = [0u8; 8];
            // SAFETY: reading 8 bytes into a live 8-byte buffer from our eventfd.
            let n = unsafe {
                libc::read(
                    self.wake.get_ref().as_raw_fd(),
                    count.as_mut_ptr().cast(),
                    8,
                )
            };
            if n < 0 {
                guard.clear_ready();
            }
            let signals = handlers::take_pending();
            if !signals.is_empty() {
                return Ok(signals);
            }
        }
    }
}
