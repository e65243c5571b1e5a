//! The daemon's own signal handling: handlers installed with the raw `rt_sigaction(2)`
//! system call and, on x86_64, a restorer trampoline of our own (see `arch`). Handlers only
//! record the signal in an atomic and write to an eventfd; a tokio task turns the wake-ups
//! into actions. `--signal-handler-mode libc` installs the same handlers through libc.
//!
//! This module holds all of the daemon's signal-related unsafe code.

mod arch;
mod raw;

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering},
};

use tokio::io::unix::AsyncFd;

use crate::cli::SignalHandlerMode;

/// Signals the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Int,
    Hup,
    Usr1,
}

impl Signal {
    pub const ALL: [Signal; 4] = [Signal::Term, Signal::Int, Signal::Hup, Signal::Usr1];

    pub fn number(self) -> i32 {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Hup => libc::SIGHUP,
            Signal::Usr1 => libc::SIGUSR1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
            Signal::Usr1 => "SIGUSR1",
        }
    }
}

/// Raised once at start-up to prove a handler runs and returns through the restorer.
const SELF_TEST: i32 = libc::SIGWINCH;

/// Pending signals as a bit set (bit = signal number).
static PENDING: AtomicU32 = AtomicU32::new(0);
/// Deliveries per signal number (for the self-test and `varta_signals_received_total`).
static DELIVERED: [AtomicU64; 65] = [const { AtomicU64::new(0) }; 65];
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// The handler: async-signal-safe only (atomics and write(2) to an eventfd), and errno is
/// preserved for the code it interrupted.
extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    let errno = unsafe { *libc::__errno_location() };
    if (1..=64).contains(&sig) {
        DELIVERED[sig as usize].fetch_add(1, Ordering::Relaxed);
        if sig < 32 {
            PENDING.fetch_or(1 << sig, Ordering::Relaxed);
        }
    }
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 && sig != SELF_TEST {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a live 8-byte value. A full
        // eventfd counter (impossible in practice) only loses a redundant wake-up.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// What start-up verified about the installed handlers.
#[derive(Debug, Clone)]
pub struct Installed {
    pub mode: SignalHandlerMode,
    /// The restorer the kernel holds for our handlers (x86_64 direct mode).
    pub restorer: Option<usize>,
    pub flags: u64,
}

/// The size of glibc's restartable-sequence registration for this thread's area: non-zero
/// when glibc registered rseq (its default), 0 when disabled
/// (`GLIBC_TUNABLES=glibc.pthread.rseq=0`). Logged at start-up: the kernel aborts an rseq
/// critical section when it delivers a signal inside it, and our handlers must cope.
pub fn rseq_size() -> u32 {
    unsafe extern "C" {
        static __rseq_size: u32;
    }
    // SAFETY: glibc (2.35+) exports this constant and sets it before main.
    unsafe { __rseq_size }
}

/// Receives the signals the handlers recorded.
pub struct Signals {
    wake: AsyncFd<OwnedFd>,
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
    WAKE_FD.store(wake.as_raw_fd(), Ordering::Relaxed);

    let handled: Vec<i32> = Signal::ALL
        .iter()
        .map(|s| s.number())
        .chain([SELF_TEST])
        .collect();
    let mask = handled.iter().fold(0u64, |m, s| m | 1 << (s - 1));
    let mut installed = None;
    for &sig in &handled {
        let readback = match mode {
            SignalHandlerMode::Direct => raw::install(sig, on_signal, mask)?,
            SignalHandlerMode::Libc => raw::install_libc(sig, on_signal, mask)?,
        };
        if readback.handler != on_signal as *const () as usize {
            return Err(io::Error::other(format!(
                "signal {sig}: the kernel holds another handler after installing ours"
            )));
        }
        if mode == SignalHandlerMode::Direct {
            raw::verify_direct(sig, &readback)?;
        }
        installed = Some(Installed {
            mode,
            restorer: readback.restorer(),
            flags: readback.flags,
        });
    }
    raw::ignore(libc::SIGPIPE)?;
    self_test()?;
    let wake = crate::readiness::readable(wake)?;
    Ok((Signals { wake }, installed.expect("at least one signal")))
}

/// Raises SELF_TEST on this thread: the handler has run (and returned through the
/// restorer) by the time tgkill returns, or the process would not be here.
fn self_test() -> io::Result<()> {
    let before = DELIVERED[SELF_TEST as usize].load(Ordering::Relaxed);
    raw::raise_on_this_thread(SELF_TEST)?;
    if DELIVERED[SELF_TEST as usize].load(Ordering::Relaxed) != before + 1 {
        return Err(io::Error::other(
            "signal self-test: the handler did not run",
        ));
    }
    Ok(())
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
            let pending = PENDING.swap(0, Ordering::Relaxed);
            let signals: Vec<Signal> = Signal::ALL
                .into_iter()
                .filter(|s| pending & (1 << s.number()) != 0)
                .collect();
            if !signals.is_empty() {
                return Ok(signals);
            }
        }
    }
}
