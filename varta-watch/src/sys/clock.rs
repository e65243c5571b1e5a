//! The clock stall accounting runs on: CLOCK_MONOTONIC (stops while the host sleeps) or
//! CLOCK_BOOTTIME (counts suspend, so a host waking up surfaces agents that went silent).
//! The eBPF program stamps records on the same clock.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClockSource {
    Monotonic,
    Boottime,
}

impl ClockSource {
    pub fn clock_id(self) -> libc::clockid_t {
        match self {
            ClockSource::Monotonic => libc::CLOCK_MONOTONIC,
            ClockSource::Boottime => libc::CLOCK_BOOTTIME,
        }
    }

    /// Nanoseconds on this clock.
    pub fn now_ns(self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; both clock ids exist on every Linux
        // this daemon supports, so the call cannot fail.
        unsafe { libc::clock_gettime(self.clock_id(), &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// `at` (nanoseconds on this clock, in the past) on CLOCK_BOOTTIME, the clock of
    /// process start times: the two clocks differ by the time the host slept.
    pub fn to_boottime_ns(self, at: u64) -> u64 {
        match self {
            ClockSource::Boottime => at,
            ClockSource::Monotonic => at.saturating_add(slept_ns()),
        }
    }
}

/// How long the host has slept since boot: CLOCK_BOOTTIME minus CLOCK_MONOTONIC, the
/// difference between the two stall clocks.
pub fn slept_ns() -> u64 {
    ClockSource::Boottime
        .now_ns()
        .saturating_sub(ClockSource::Monotonic.now_ns())
}
