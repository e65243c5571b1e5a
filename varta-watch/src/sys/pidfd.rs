//! Tells when a process exits, through a pidfd per watched process: caches and kernel
//! verdicts keyed by pid die with the process, so a reused pid never inherits them.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::sync::mpsc;

use crate::sys::fdlimit::WatchSlot;

/// Watches processes; `exited()` yields each watched pid once its process is gone.
pub struct ExitWatcher {
    tx: mpsc::UnboundedSender<u32>,
    rx: mpsc::UnboundedReceiver<u32>,
}

impl Default for ExitWatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitWatcher {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        ExitWatcher { tx, rx }
    }

    /// Whether the process behind `pidfd` still holds its pid (running, or exited and not
    /// yet reaped): then /proc/<pid> shows that process, nobody else. Signal 0 only checks;
    /// EPERM (another user's process) says it exists too.
    pub fn holds_pid(pidfd: &OwnedFd) -> bool {
        // SAFETY: pidfd_send_signal with signal 0, no siginfo and no flags sends nothing.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// Opens a pidfd for `pid` now. Call it before reading anything about the process from
    /// /proc: if the pid is reused before this call, both refer to the new process, so
    /// compare its start time with what it is read for (`datapath::userspace`).
    pub fn open(pid: u32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Reports `pid` through `exited()` when the process behind `pidfd` exits. Each
    /// watch holds a descriptor until then, drawn from the watcher budget (`fdlimit`): an
    /// error when it is spent, and the caller goes without the watch.
    pub fn watch(&self, pid: u32, pidfd: OwnedFd) -> io::Result<()> {
        let slot = WatchSlot::take()
            .ok_or_else(|| io::Error::other("the descriptor budget for watchers is spent"))?;
        let fd = crate::sys::readiness::readable(pidfd)?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            // A pidfd becomes readable when its process exits.
            let _ = fd.readable().await;
            let _ = tx.send(pid);
            drop(slot);
        });
        Ok(())
    }

    pub async fn exited(&mut self) -> u32 {
        self.rx.recv().await.expect("the watcher holds a sender")
    }
}
