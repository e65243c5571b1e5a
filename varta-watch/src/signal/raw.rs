//! The `rt_sigaction(2)` system call with the kernel's own `struct sigaction`.

use std::{io, mem::size_of};

use super::arch;

/// The kernel's sigset is one 64-bit word on the architectures we support.
const KERNEL_SIGSET_BYTES: usize = size_of::<u64>();

/// `struct sigaction` as the kernel (not libc) lays it out.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelSigaction {
    pub handler: usize,
    pub flags: u64,
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub restorer_field: usize,
    pub mask: u64,
}

impl KernelSigaction {
    pub fn restorer(&self) -> Option<usize> {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if self.flags & arch::SA_RESTORER != 0 {
            return Some(self.restorer_field);
        }
        None
    }
}

fn rt_sigaction(
    sig: i32,
    act: Option<&KernelSigaction>,
    old: Option<&mut KernelSigaction>,
) -> io::Result<()> {
    let act = act.map_or(std::ptr::null(), |a| a as *const KernelSigaction);
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut KernelSigaction);
    // SAFETY: both pointers are null or point to live KernelSigaction values of the layout
    // the kernel expects, and the sigset size matches the kernel's.
    let rc = unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, act, old, KERNEL_SIGSET_BYTES) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Installs `handler` with the raw system call and returns what the kernel reads back.
pub fn install(sig: i32, handler: extern "C" fn(i32), mask: u64) -> io::Result<KernelSigaction> {
    let act = KernelSigaction {
        handler: handler as *const () as usize,
        flags: libc::SA_RESTART as u64 | arch::RESTORER_FLAGS,
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        restorer_field: arch::restorer(),
        mask,
    };
    rt_sigaction(sig, Some(&act), None)?;
    read_back(sig)
}

/// The escape hatch: libc's sigaction (which brings libc's own restorer).
pub fn install_libc(
    sig: i32,
    handler: extern "C" fn(i32),
    mask: u64,
) -> io::Result<KernelSigaction> {
    // SAFETY: a zeroed libc sigaction is valid; every field we rely on is set below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler as *const () as usize;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: `act.sa_mask` is a live sigset_t.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    for s in 1..=64 {
        if mask & (1 << (s - 1)) != 0 {
            // SAFETY: as above; `s` is a valid signal number.
            unsafe { libc::sigaddset(&mut act.sa_mask, s) };
        }
    }
    // SAFETY: `act` is fully initialised; no old action is requested.
    if unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    read_back(sig)
}

/// The action the kernel holds for `sig` (the old-act query).
pub fn read_back(sig: i32) -> io::Result<KernelSigaction> {
    let mut old = KernelSigaction::default();
    rt_sigaction(sig, None, Some(&mut old))?;
    Ok(old)
}

/// Checks the read-back action is what the raw installation asked for.
pub fn verify_direct(sig: i32, got: &KernelSigaction) -> io::Result<()> {
    let want = libc::SA_RESTART as u64 | arch::RESTORER_FLAGS;
    if got.flags & want != want {
        return Err(io::Error::other(format!(
            "signal {sig}: flags {:#x} lack {want:#x}",
            got.flags
        )));
    }
    if arch::RESTORER_FLAGS != 0 && got.restorer() != Some(arch::restorer()) {
        return Err(io::Error::other(format!(
            "signal {sig}: the kernel holds restorer {:?}, not ours",
            got.restorer()
        )));
    }
    Ok(())
}

pub fn ignore(sig: i32) -> io::Result<()> {
    let act = KernelSigaction {
        handler: libc::SIG_IGN,
        flags: arch::RESTORER_FLAGS,
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        restorer_field: arch::restorer(),
        mask: 0,
    };
    rt_sigaction(sig, Some(&act), None)
}

/// Sends `sig` to the calling thread; it is delivered before the system call returns.
pub fn raise_on_this_thread(sig: i32) -> io::Result<()> {
    // SAFETY: plain system calls with integer arguments.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid);
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
