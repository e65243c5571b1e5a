//! The daemon's signal handlers (`varta_watch::signal::handlers`), built for this target and
//! exercised: installation and read-back, delivery and return, a storm against work in
//! progress (with glibc's rseq as the environment sets it), and the SA_RESTORER control.
//! `cargo xtask test` runs it natively and, for aarch64 and riscv64, under qemu-user.
//! Prints `N passed, M failed`; exits non-zero on any failure.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use varta_watch::signal::handlers;

type Check = fn(&OwnedFd) -> Result<(), String>;

fn main() {
    // SAFETY: eventfd creates a new fd or returns -1, checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let wake = unsafe { OwnedFd::from_raw_fd(fd) };
    let checks: [(&str, Check); 4] = [
        ("install_and_read_back", install_and_read_back),
        ("delivery_and_return", delivery_and_return),
        ("storm_against_work_in_progress", storm),
        ("restorer_control", restorer_control),
    ];
    println!(
        "arch={} rseq_size={}",
        std::env::consts::ARCH,
        handlers::rseq_size()
    );
    let (mut passed, mut failed) = (0, 0);
    for (name, check) in checks {
        match check(&wake) {
            Ok(()) => {
                passed += 1;
                println!("check {name} ... ok");
            }
            Err(e) => {
                failed += 1;
                println!("check {name} ... FAILED: {e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn install_and_read_back(wake: &OwnedFd) -> Result<(), String> {
    let installed = handlers::install(true, wake.as_raw_fd()).map_err(|e| e.to_string())?;
    if !installed.direct || installed.flags & libc::SA_RESTART as u64 == 0 {
        return Err(format!("SA_RESTART missing: {:#x}", installed.flags));
    }
    match (std::env::consts::ARCH, installed.restorer) {
        ("x86_64", Some(r)) if r != 0 => Ok(()),
        ("x86_64", other) => Err(format!("x86_64 needs our restorer, kernel holds {other:?}")),
        (_, None) => Ok(()),
        (arch, Some(r)) => Err(format!(
            "{arch} returns through the vDSO, yet a restorer {r:#x} is set"
        )),
    }
}

fn delivery_and_return(wake: &OwnedFd) -> Result<(), String> {
    let before = handlers::delivered(libc::SIGUSR1);
    // SAFETY: signalling ourselves; the handler is installed.
    unsafe { libc::raise(libc::SIGUSR1) };
    if handlers::delivered(libc::SIGUSR1) != before + 1 {
        return Err("handler did not run".into());
    }
    if !handlers::take_pending().contains(&handlers::Signal::Usr1) {
        return Err("SIGUSR1 not recorded as pending".into());
    }
    let mut count = 0u64;
    // SAFETY: an 8-byte read into a live u64 from our eventfd.
    let n = unsafe { libc::read(wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    if n != 8 || count == 0 {
        return Err("the handler did not wake the eventfd".into());
    }
    Ok(())
}

/// Thousands of signals from another thread while this one does system calls and
/// arithmetic: no system call fails with EINTR (SA_RESTART), no result is corrupted.
fn storm(_: &OwnedFd) -> Result<(), String> {
    let pid = std::process::id() as libc::pid_t;
    let before = handlers::delivered(libc::SIGHUP) + handlers::delivered(libc::SIGUSR1);
    let sender = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_millis(500);
        let mut sent = 0u64;
        while Instant::now() < end {
            for sig in [libc::SIGHUP, libc::SIGUSR1] {
                // SAFETY: signalling our own process.
                unsafe { libc::kill(pid, sig) };
                sent += 1;
            }
        }
        sent
    });
    let mut fds = [0i32; 2];
    // SAFETY: a pipe into a live 2-int array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err("pipe".into());
    }
    let (mut sum, mut rounds) = (0u64, 0u64);
    while !sender.is_finished() {
        let v = rounds.wrapping_mul(2_654_435_761);
        // SAFETY: 8-byte write and read of live u64s through our own pipe.
        let (w, r, got) = unsafe {
            let w = libc::write(fds[1], (&v as *const u64).cast(), 8);
            let mut got = 0u64;
            let r = libc::read(fds[0], (&mut got as *mut u64).cast(), 8);
            (w, r, got)
        };
        if w != 8 || r != 8 {
            return Err(format!(
                "system call interrupted: write {w} read {r} ({})",
                std::io::Error::last_os_error()
            ));
        }
        if got != v {
            return Err(format!("round {rounds}: read {got} wrote {v}"));
        }
        sum = sum.wrapping_add(got);
        rounds += 1;
    }
    let sent = sender.join().unwrap();
    let expected = (0..rounds).fold(0u64, |s, i| s.wrapping_add(i.wrapping_mul(2_654_435_761)));
    let handled = handlers::delivered(libc::SIGHUP) + handlers::delivered(libc::SIGUSR1) - before;
    handlers::take_pending();
    // SAFETY: closing the pipe we opened.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    println!("  storm: {sent} signals sent, {handled} handled, {rounds} rounds of work");
    if sum != expected {
        return Err("work corrupted".into());
    }
    if sent < 1000 || handled == 0 {
        return Err(format!("not a storm: sent {sent}, handled {handled}"));
    }
    Ok(())
}

/// A child installs a handler with the raw system call and no SA_RESTORER, then raises it.
/// x86_64: it dies by SIGSEGV (the restorer is required). aarch64 and riscv64: it returns
/// through the vDSO trampoline and exits normally (the restorer is not needed there).
fn restorer_control(_: &OwnedFd) -> Result<(), String> {
    extern "C" fn noop(_: i32) {}
    // SAFETY: fork in a process whose other threads are done; the child only makes system
    // calls and exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        #[repr(C)]
        struct Act {
            handler: usize,
            flags: u64,
            #[cfg(not(target_arch = "riscv64"))]
            restorer: usize,
            mask: u64,
        }
        let act = Act {
            handler: noop as *const () as usize,
            flags: 0,
            #[cfg(not(target_arch = "riscv64"))]
            restorer: 0,
            mask: 0,
        };
        // SAFETY: the child resets SIGSEGV (Rust's runtime would swallow a forced one),
        // installs the kernel-layout action and raises the signal, then exits.
        unsafe {
            libc::signal(libc::SIGSEGV, libc::SIG_DFL);
            libc::syscall(
                libc::SYS_rt_sigaction,
                libc::SIGUSR2,
                &act,
                std::ptr::null_mut::<u8>(),
                8usize,
            );
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::syscall(libc::SYS_gettid),
                libc::SIGUSR2,
            );
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    let died_by_segv = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV;
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    match std::env::consts::ARCH {
        "x86_64" if died_by_segv => Ok(()),
        "x86_64" => Err(format!("expected death by SIGSEGV, got status {status:#x}")),
        _ if exited_ok => Ok(()),
        arch => Err(format!(
            "{arch}: expected a normal exit, got status {status:#x}"
        )),
    }
}
