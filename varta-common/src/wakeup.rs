//! When the eBPF datapath wakes the daemon: the whole policy, in one place.
//!
//! The daemon should sleep while agents beat normally, yet never decide a stall while a beat
//! waits in the ring buffer, and see at once what needs it at once.
//!
//! 1. **Kernel, per accepted record** ([`wake_now`]): the filter submits a record with a
//!    forced wake-up when it is urgent, else with none. Urgent: a sender to verify
//!    (`KIND_VERIFY`), a Critical frame, the first beat of an agent the kernel has no bucket
//!    for, or a ring buffer more than a quarter full (so it never overflows between drains;
//!    the daemon sizes the ring at load: `filter::ring_bytes`).
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

/// Rule 1: whether the kernel wakes the daemon for this record. `ring_fill` (unread bytes,
/// ring size) is only asked when nothing else already makes the record urgent (it costs
/// helper calls). Above a quarter full every record wakes the daemon, leaving room for the
/// burst that arrives while it wakes.
#[inline(always)]
pub fn wake_now(
    verify: bool,
    status: Status,
    new_agent: bool,
    ring_fill: impl FnOnce() -> (u64, u64),
) -> bool {
    verify || matches!(status, Status::Critical) || new_agent || {
        let (unread, size) = ring_fill();
        unread > size / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urgent_records_skip_the_ring_query() {
        let never = || -> (u64, u64) { panic!("queried") };
        assert!(wake_now(true, Status::Ok, false, never));
        assert!(wake_now(false, Status::Critical, false, never));
        assert!(wake_now(false, Status::Ok, true, never));
    }

    #[test]
    fn ordinary_beats_wake_only_above_a_quarter_full() {
        assert!(!wake_now(false, Status::Degraded, false, || (1024, 4096)));
        assert!(wake_now(false, Status::Ok, false, || (1025, 4096)));
    }
}
