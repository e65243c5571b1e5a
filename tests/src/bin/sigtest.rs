//! The negative control for the signal tests: installs a handler with the raw
//! `rt_sigaction(2)` and *no* SA_RESTORER, then raises the signal. On x86_64 the kernel has
//! nowhere to return to and the process dies with SIGSEGV; the test asserts exactly that.

use std::sync::atomic::{AtomicBool, Ordering};

static RAN: AtomicBool = AtomicBool::new(false);

extern "C" fn handler(_: i32) {
    RAN.store(true, Ordering::Relaxed);
}

#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

fn main() {
    // Rust's runtime catches SIGSEGV to report stack overflows and, for a fault it did not
    // expect, restores the default and returns; a kernel-forced SIGSEGV would then be
    // survived. Restore the default first, as any process without that handler has it.
    // SAFETY: setting a signal's disposition to its default.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
    let act = KernelSigaction {
        handler: handler as *const () as usize,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: a kernel-layout sigaction for SIGUSR1 with the kernel's 8-byte sigset.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGUSR1,
            &act,
            std::ptr::null_mut::<u8>(),
            8usize,
        )
    };
    assert_eq!(rc, 0, "rt_sigaction failed");
    // SAFETY: raising a signal on ourselves.
    unsafe { libc::raise(libc::SIGUSR1) };
    println!("survived: handler ran = {}", RAN.load(Ordering::Relaxed));
}
