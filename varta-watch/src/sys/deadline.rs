//! The stall deadline as a timerfd on the stall clock itself. Tokio's timer rounds every
//! deadline up to its next millisecond tick and sleeps in whole milliseconds, which put one
//! to two milliseconds between a deadline and the stall it decides; a timerfd set to the
//! absolute deadline fires within the timer slack (50 us by default).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use crate::sys::clock::ClockSource;

pub struct DeadlineTimer {
    fd: AsyncFd<OwnedFd>,
    /// The deadline the timer is set to, until it has been read as fired.
    armed_ns: Option<u64>,
}

impl DeadlineTimer {
    pub fn new(clock: ClockSource) -> io::Result<Self> {
        let flags = libc::TFD_NONBLOCK | libc::TFD_CLOEXEC;
        // SAFETY: timerfd_create takes no pointers; the result is checked below.
        let fd = unsafe { libc::timerfd_create(clock.clock_id(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DeadlineTimer {
            fd: crate::sys::readiness::readable(fd)?,
            armed_ns: None,
        })
    }

    /// Returns once the clock has reached `deadline_ns` (at once when it has already).
    /// Cancel-safe: dropped before it fired, the timer stays set for the next call.
    pub async fn wait_until(&mut self, deadline_ns: u64) -> io::Result<()> {
        if self.armed_ns != Some(deadline_ns) {
            self.arm(deadline_ns)?;
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            let read = guard.try_io(|fd| {
                // SAFETY: reads at most 8 bytes into the 8-byte buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(Ok(())) => {
                    self.armed_ns = None;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                // Stale readiness (the timer was set again since): wait on.
                Err(_would_block) => continue,
            }
        }
    }

    fn arm(&mut self, deadline_ns: u64) -> io::Result<()> {
        // A zero it_value would disarm the timer: the earliest deadline is 1 ns.
        let at = deadline_ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as _,
                tv_nsec: (at % 1_000_000_000) as _,
            },
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for (null).
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_ns = Some(deadline_ns);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_at_the_deadline_not_before() {
        let clock = ClockSource::Monotonic;
        let mut timer = DeadlineTimer::new(clock).unwrap();
        let deadline = clock.now_ns() + 3_000_000;
        timer.wait_until(deadline).await.unwrap();
        assert!(clock.now_ns() >= deadline);
        // A deadline already past returns at once, and so does one set again after it.
        timer.wait_until(1).await.unwrap();
        timer.wait_until(deadline).await.unwrap();
    }
}
