//! Watchdogs over the observer itself.
//!
//! - [`SelfWatchdog`] (`--self-watchdog-secs`): a thread that aborts the process when the
//!   event loop's progress counter has not moved for the whole period, so that a
//!   supervisor (systemd `Restart=`, Kubernetes) starts a fresh observer.
//! - [`HwWatchdog`] (`--hw-watchdog PATH`): the Linux watchdog device protocol. The event
//!   loop writes a byte on every kick, so a wedged loop stops kicking and the machine's
//!   watchdog fires; a clean shutdown writes the magic `V` before closing, so it does not.

use crate::sys::logger::event;
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The event loop's progress, read by the watchdog thread.
#[derive(Debug, Default, Clone)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn bump(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct SelfWatchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SelfWatchdog {
    /// Watches `progress`: unchanged for `period` means the loop is stuck, and the process
    /// aborts.
    pub fn start(progress: Progress, period: Duration) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("varta-watchdog".into())
            .spawn(move || watch(&progress, period, &stopped))?;
        Ok(SelfWatchdog {
            stop,
            thread: Some(thread),
        })
    }

    /// Disarms it (at shutdown, when the loop has stopped on purpose).
    pub fn disarm(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Drop for SelfWatchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

fn watch(progress: &Progress, period: Duration, stop: &AtomicBool) {
    let mut seen = progress.get();
    let mut since = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(period / 4);
        let now = progress.get();
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() >= period && !stop.load(Ordering::Relaxed) {
            event!(
                error,
                "self_watchdog_abort",
                stuck_ms = since.elapsed().as_millis(),
                progress = now,
            );
            std::process::abort();
        }
    }
}

pub struct HwWatchdog {
    file: Option<File>,
    failures: u64,
}

impl HwWatchdog {
    /// Opens the device (or a stand-in) for writing; never through a symlink.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)?;
        // Kicks must never block the loop (a stand-in pipe may be full).
        set_nonblocking(&file)?;
        Ok(HwWatchdog {
            file: Some(file),
            failures: 0,
        })
    }

    /// One kick; a failure is logged once per thousand.
    pub fn kick(&mut self) {
        let Some(file) = &mut self.file else { return };
        if let Err(e) = file.write_all(b"k") {
            if self.failures.is_multiple_of(1000) {
                event!(
                    warn,
                    "hw_watchdog_kick_failed",
                    error:% = e,
                    failures = self.failures + 1,
                );
            }
            self.failures += 1;
        }
    }

    /// Clean shutdown: the magic close, so the device does not fire once we are gone.
    pub fn close(&mut self) {
        if let Some(mut file) = self.file.take() {
            match file.write_all(b"V") {
                Ok(()) => event!(info, "hw_watchdog_closed", magic = "V"),
                Err(e) => event!(warn, "hw_watchdog_close_failed", error:% = e),
            }
        }
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a file descriptor we own; F_GETFL/F_SETFL take and return ints.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moving_counter_is_never_stuck_and_disarm_returns() {
        let progress = Progress::default();
        let mut dog = SelfWatchdog::start(progress.clone(), Duration::from_millis(200)).unwrap();
        // Bumped far more often than the period, for several periods.
        for _ in 0..100 {
            progress.bump();
            std::thread::sleep(Duration::from_millis(5));
        }
        dog.disarm();
        assert!(progress.get() >= 100);
    }
}
