//! Sockets passed by a service manager (systemd socket activation): `LISTEN_PID`,
//! `LISTEN_FDS` and `LISTEN_FDNAMES`, descriptors from 3 on. Taken once, at start-up
//! before any thread runs; the variables are then unset so nothing this process starts
//! believes the sockets are its own.

use std::os::fd::{FromRawFd, OwnedFd};

/// `SD_LISTEN_FDS_START`.
const FIRST: i32 = 3;

/// One passed socket and its name (`FileDescriptorName=`, or `unknown`).
#[derive(Debug)]
pub struct Passed {
    pub fd: OwnedFd,
    pub name: String,
}

/// Takes the passed sockets, if they are for this process. Must run before any thread
/// starts (it changes the environment).
pub fn take() -> Vec<Passed> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    if pid.is_none() && count.is_none() {
        return Vec::new();
    }
    // SAFETY: start-up, before the runtime or any other thread exists: nothing reads the
    // environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        // Meant for another process (e.g. a wrapper that started us): not ours to take.
        return Vec::new();
    }
    let Some(count) = count.and_then(|c| c.parse::<i32>().ok()).filter(|&c| c > 0) else {
        return Vec::new();
    };
    let names = names.split(':').map(Some).chain(std::iter::repeat(None));
    (FIRST..FIRST + count.min(64))
        .zip(names)
        .filter_map(|(fd, name)| {
            // SAFETY: F_SETFD on a descriptor number; fails harmlessly if it is not open.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                return None;
            }
            let name = name.filter(|n| !n.is_empty()).unwrap_or("unknown");
            Some(Passed {
                // SAFETY: the service manager passed it open to this process (LISTEN_PID),
                // and nothing else in this process owns it.
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
                name: name.to_owned(),
            })
        })
        .collect()
}
