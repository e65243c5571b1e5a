//! When the eBPF datapath wakes the daemon: the whole policy, in one place.
//!
//! The daemon should sleep while agents beat normally, yet never decide a stall while a beat
//! waits in the ring buffer, and see at once what needs it at once.
//!
//! 1. **Kernel, per accepted record** ([`wake_now`]): the filter submits a record with a
//!    forced wake-up when it is urgent, else with none. Urgent: a sender to verify
//!    (`KIND_VERIFY`), a Critical frame, the first beat of an agent the kernel has no bucket
//!    for, or a ring buffer holding more than [`WATERMARK_BYTES`] unread (so it never
//!    overflows between drains).
//! 2. **Daemon, drain timer** ([`DRAIN_INTERVAL_MS`]): ordinary beats wait in the ring at most
//!    this long, and only while some agent is watched for a stall; with none watched the
//!    timer is off and an idle daemon sleeps until an urgent record.
//! 3. **Daemon, before every stall decision**: the ring is drained first, so a beat waiting in
//!    it never causes a false stall.
//! 4. **Feedback**: when an agent stalls or exits, the daemon removes its bucket from the
//!    kernel, so that agent's next beat is a first beat again (rule 1) and ends the stall
//!    without waiting for the timer.
//!
//! The filter applies rule 1 through [`wake_now`]; `varta-watch`'s eBPF datapath applies rules
//! 2 to 4, driven by the main loop's `set_watching`, `drain` and `agent_silent` calls.

use crate::frame::Status;

/// Ordinary beats wait at most this long in the ring buffer while any agent is watched.
pub const DRAIN_INTERVAL_MS: u64 = 50;

/// Above this many unread bytes in the ring buffer every record wakes the daemon: a quarter
/// of the ring, leaving room for the burst that arrives while the daemon wakes.
pub const WATERMARK_BYTES: u32 = crate::filter::RING_BYTES / 4;

/// Rule 1: whether the kernel wakes the daemon for this record. `ring_unread` is only asked
/// when nothing else already makes the record urgent (it costs a helper call).
#[inline(always)]
pub fn wake_now(
    verify: bool,
    status: Status,
    new_agent: bool,
    ring_unread: impl FnOnce() -> u64,
) -> bool {
    verify
        || matches!(status, Status::Critical)
        || new_agent
        || ring_unread() > WATERMARK_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urgent_records_skip_the_ring_query() {
        let never = || -> u64 { panic!("queried") };
        assert!(wake_now(true, Status::Ok, false, never));
        assert!(wake_now(false, Status::Critical, false, never));
        assert!(wake_now(false, Status::Ok, true, never));
    }

    #[test]
    fn ordinary_beats_wake_only_above_the_watermark() {
        let unread = WATERMARK_BYTES as u64;
        assert!(!wake_now(false, Status::Degraded, false, || unread));
        assert!(wake_now(false, Status::Ok, false, || unread + 1));
    }
}
