//! The handlers and their installation, free of the async runtime so that the same file is
//! built and run for aarch64 and riscv64 under user-mode emulation (`tests/signal-arch`).
//! Handlers only record the signal in atomics and write to a wake-up fd.

use std::{
    io,
    os::fd::RawFd,
    sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering},
};

use super::raw;

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
/// Deliveries per signal number.
static DELIVERED: [AtomicU64; 65] = [const { AtomicU64::new(0) }; 65];
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// From now on the handlers only record signals (the eventfd is going away).
pub fn stop_waking() {
    WAKE_FD.store(-1, Ordering::Relaxed);
}

/// The handler: async-signal-safe only (atomics and write(2)), and errno is preserved for
/// the code it interrupted.
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
    /// Raw rt_sigaction (true) or libc's sigaction.
    pub direct: bool,
    /// The restorer the kernel holds for our handlers (SA_RESTORER set), if any.
    pub restorer: Option<usize>,
    pub flags: u64,
}

/// Installs the handlers (each masking the others while it runs), reads every action back
/// from the kernel, ignores SIGPIPE, and runs the live self-test. Handlers write to
/// `wake_fd` after recording a signal.
pub fn install(direct: bool, wake_fd: RawFd) -> io::Result<Installed> {
    WAKE_FD.store(wake_fd, Ordering::Relaxed);
    let handled: Vec<i32> = Signal::ALL
        .iter()
        .map(|s| s.number())
        .chain([SELF_TEST])
        .collect();
    let mask = handled.iter().fold(0u64, |m, s| m | 1 << (s - 1));
    let mut installed = None;
    for &sig in &handled {
        let readback = if direct {
            raw::install(sig, on_signal, mask)?
        } else {
            raw::install_libc(sig, on_signal, mask)?
        };
        if readback.handler != on_signal as *const () as usize {
            return Err(io::Error::other(format!(
                "signal {sig}: the kernel holds another handler after installing ours"
            )));
        }
        if direct {
            raw::verify_direct(sig, &readback)?;
        }
        installed = Some(Installed {
            direct,
            restorer: readback.restorer(),
            flags: readback.flags,
        });
    }
    raw::ignore(libc::SIGPIPE)?;
    self_test()?;
    Ok(installed.expect("at least one signal"))
}

/// Raises SELF_TEST on this thread: the handler has run (and returned through the
/// restorer) by the time tgkill returns, or the process would not be here.
fn self_test() -> io::Result<()> {
    let before = delivered(SELF_TEST);
    raw::raise_on_this_thread(SELF_TEST)?;
    if delivered(SELF_TEST) != before + 1 {
        return Err(io::Error::other(
            "signal self-test: the handler did not run",
        ));
    }
    Ok(())
}

/// How often signal `sig` was handled since start-up.
pub fn delivered(sig: i32) -> u64 {
    DELIVERED[sig as usize].load(Ordering::Relaxed)
}

/// The signals recorded since the last call.
pub fn take_pending() -> Vec<Signal> {
    let pending = PENDING.swap(0, Ordering::Relaxed);
    Signal::ALL
        .into_iter()
        .filter(|s| pending & (1 << s.number()) != 0)
        .collect()
}

/// The size of glibc's restartable-sequence registration: non-zero when glibc registered
/// rseq (its default), 0 when disabled (`GLIBC_TUNABLES=glibc.pthread.rseq=0`). The kernel
/// aborts an rseq critical section when it delivers a signal inside it; the handlers must
/// be correct either way, and the tests run both.
#[cfg(target_env = "gnu")]
pub fn rseq_size() -> u32 {
    unsafe extern "C" {
        static __rseq_size: u32;
    }
    // SAFETY: glibc (2.35+) exports this constant and sets it before main.
    unsafe { __rseq_size }
}

/// musl (the static container image) never registers rseq.
#[cfg(not(target_env = "gnu"))]
pub fn rseq_size() -> u32 {
    0
}
