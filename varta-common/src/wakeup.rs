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
//! 3. **Daemon, before every stall decision**: the ring is drained first and the beats held
//!    in the kernel (rule 6) folded in, so a beat waiting in either never causes a false
//!    stall.
//! 4. **Feedback**: when an agent stalls or exits, the daemon removes its bucket from the
//!    kernel, so that agent's next beat is a first beat again (rule 1) and ends the stall
//!    without waiting for the timer.
//! 5. **Userspace datapath** (no filter sorts the beats: the daemon applies rule 1 itself, on
//!    what it has just received): a beat is urgent ([`urgent`]) when it is its sender's
//!    first (the daemon keeps what the kernel's buckets are to rule 1: senders seen, until
//!    they stall or exit, rule 4), it is Critical, or it changes the sender's status. While urgent beats come, or fewer than [`BATCH_MIN_BEATS`] routine ones per
//!    [`USERSPACE_MAX_INTERVAL_NS`], every datagram wakes the daemon at once. Otherwise the
//!    daemon stops waiting on readiness and drains on a timer ([`userspace_interval_ns`]): at
//!    most [`USERSPACE_MAX_INTERVAL_NS`], which bounds how late an urgent beat is seen under
//!    load, and short enough that the socket's queue fills at most halfway at the measured
//!    rate (the kernel makes senders wait, or refuses their frames, when it is full), and
//!    within [`BurstCap`]: beats that come in bursts fill the queue faster than their average
//!    rate says, so a drain that finds it more than three quarters full shortens the
//!    interval (below two thirds of the shortest, every datagram wakes the daemon again).
//!    Rule 3 holds: the socket is drained before every stall decision.
//!
//! 6. **Kernel, routine beats of a watched agent** ([`hold`]): not put in the ring at all. A
//!    beat whose status is its agent's last and not Critical, with a later nonce, from the
//!    sender attested before (its host tgid and frame pid), of an agent the daemon tracks
//!    and whose exit it watches (`filter::TRACKED_EXIT_WATCHED`, set by the daemon from a
//!    beat the kernel attested after the watch began, taken back when the process exits or
//!    the agent stalls, so a reused pid never inherits it and a resume comes through the
//!    ring), is counted in the agent's `filter::Tracked` entry in its hold slot
//!    (`filter::hold_slot`; of two agents sharing a slot, only the first owner's beats are
//!    held) with its nonce and receive time. The daemon folds them in (reads the entries
//!    and takes their beats as one) every [`FOLD_INTERVAL_MS`] and before every stall
//!    decision (rule 3); anything else about a beat goes through the ring as before. Not
//!    while the export file is written (a line per beat) and not for UDP senders (nothing
//!    attested to keep).
//!
//! The filter applies rules 1 and 6 through [`wake_now`] and [`hold`]; `varta-watch`'s eBPF
//! datapath applies rules 2 to 4 and folds rule 6's beats, driven by the main loop's
//! `set_watching`, `drain` and `agent_silent` calls; its userspace datapath applies rule 5
//! (and 3).

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

/// Rule 6: whether a beat of an agent the kernel knows (its last beat's status and nonce) is
/// routine, so that it may stay in the kernel: the same status, not Critical, and a later
/// nonce (anything the tracker would take as more than a beat goes through the ring).
#[inline(always)]
pub fn hold(status: Status, nonce: u64, last_status: u8, last_nonce: u64) -> bool {
    !matches!(status, Status::Critical) && status as u8 == last_status && nonce > last_nonce
}

/// Rule 6: how often the daemon folds in the beats the kernel holds, for the metrics (stall
/// decisions fold them in first anyway).
pub const FOLD_INTERVAL_MS: u64 = 1000;

/// Rule 5: whether a beat the userspace datapath received needs the daemon at once.
/// `known` is the status of the sender's last beat when it was seen since it last went
/// silent, else `None`.
#[inline]
pub fn urgent(status: Status, known: Option<Status>) -> bool {
    matches!(status, Status::Critical) || known != Some(status)
}

/// Rule 5: routine beats per drain interval from which the userspace datapath drains on a
/// timer (below it, waking for each beat costs no more than the timer).
pub const BATCH_MIN_BEATS: u64 = 4;
/// Rule 5: the userspace datapath's drain timer, shortest interval (the timer's own cost per
/// wake-up stays below the beats it drains).
pub const USERSPACE_MIN_INTERVAL_NS: u64 = 250_000;
/// Rule 5: the userspace datapath's drain timer, longest interval: what an urgent beat (a new
/// agent, a panic frame) may wait under load before the daemon sees it.
pub const USERSPACE_MAX_INTERVAL_NS: u64 = 10_000_000;

/// Rule 5: the userspace datapath's drain interval at `rate_per_s` datagrams a second into a
/// socket whose queue holds `queue_limit` datagrams: the queue fills at most halfway, and
/// `None` (wake on each datagram) when even the shortest interval would fill it further (a
/// small queue at a high rate: a timer would make the senders wait). A `flood` (most of the
/// last drain refused by the rate limits) is drained at the longest interval: the flooders
/// wait for room in the queue instead of the daemon spending a core on frames it refuses.
pub fn userspace_interval_ns(rate_per_s: u64, queue_limit: u64, flood: bool) -> Option<u64> {
    if flood {
        return Some(USERSPACE_MAX_INTERVAL_NS);
    }
    let half = (queue_limit / 2).max(1);
    let fills_half_in = half
        .saturating_mul(1_000_000_000)
        .checked_div(rate_per_s)
        .unwrap_or(u64::MAX);
    (fills_half_in >= USERSPACE_MIN_INTERVAL_NS)
        .then(|| fills_half_in.min(USERSPACE_MAX_INTERVAL_NS))
}

/// Rule 5 under bursts: how long a burst-shortened interval stays before it is lengthened by
/// a quarter (and again each such period while no drain finds the queue near full).
pub const BURST_RELAX_NS: u64 = 1_000_000_000;

/// Rule 5 under bursts: the longest drain interval the bursts seen allow. Senders that beat
/// together (started together, woken by one timer) fill the queue in a burst faster than
/// their average rate says, and a nonblocking client's frame is refused (lost) while it is
/// full: a drain on the timer that took more than three quarters of the queue (it may have
/// overflowed) caps the interval in proportion, so that a burst of the same size fills half
/// of it, as the average rate does. Not more than three quarters: the arrivals of a tick at
/// the rate's interval scatter around half, and each outlier would shorten the interval.
/// The cap lengthens by a quarter each [`BURST_RELAX_NS`] without such a drain, up to
/// [`USERSPACE_MAX_INTERVAL_NS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstCap {
    cap_ns: u64,
    changed_ns: u64,
}

impl Default for BurstCap {
    fn default() -> Self {
        BurstCap {
            cap_ns: USERSPACE_MAX_INTERVAL_NS,
            changed_ns: 0,
        }
    }
}

/// A drain that took this many of a queue of `queue_limit` found it mostly full (over three
/// quarters): room for a burst is running out.
pub fn mostly_full(taken: u64, queue_limit: u64) -> bool {
    taken * 4 > queue_limit * 3
}

impl BurstCap {
    /// After a drain on the timer, `waited_ns` after the one before, that took `taken`
    /// datagrams from sockets whose smallest queue holds `queue_limit`. The burst is sized
    /// over the time the drain really waited, never just the interval it asked for: a
    /// drain that ran late (the daemon waiting for a busy core) or long (datagrams keep
    /// coming while it reads) took more because it waited longer, and shortening the cap
    /// for that only ratcheted it down, to waking the daemon on every datagram.
    pub fn after_timer_drain(&mut self, now_ns: u64, waited_ns: u64, taken: u64, queue_limit: u64) {
        let half = (queue_limit / 2).max(1);
        if mostly_full(taken, queue_limit) {
            self.cap_ns = self.cap_ns.min(waited_ns.saturating_mul(half) / taken);
            self.changed_ns = now_ns;
        }
    }

    /// The interval rule 5 allows at the measured rate (`userspace_interval_ns`), within
    /// the cap, and at least the shortest interval while a burst then fills at most three
    /// quarters of the queue (the cap is at least two thirds of it: waking on each
    /// datagram at a high rate costs far more than the timer); below that, `None`: every
    /// datagram wakes the daemon.
    pub fn apply(&mut self, now_ns: u64, interval_ns: Option<u64>) -> Option<u64> {
        if now_ns.saturating_sub(self.changed_ns) >= BURST_RELAX_NS
            && self.cap_ns < USERSPACE_MAX_INTERVAL_NS
        {
            self.cap_ns = (self.cap_ns + self.cap_ns / 4 + 1).min(USERSPACE_MAX_INTERVAL_NS);
            self.changed_ns = now_ns;
        }
        if self.cap_ns * 3 < USERSPACE_MIN_INTERVAL_NS * 2 {
            return None;
        }
        interval_ns.map(|i| i.min(self.cap_ns).max(USERSPACE_MIN_INTERVAL_NS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_later_beat_of_the_same_quiet_status_is_held() {
        assert!(hold(Status::Ok, 8, Status::Ok as u8, 7));
        assert!(hold(Status::Degraded, 8, Status::Degraded as u8, 7));
        assert!(!hold(Status::Degraded, 8, Status::Ok as u8, 7), "a change");
        assert!(
            !hold(Status::Critical, 8, Status::Critical as u8, 7),
            "a panic frame"
        );
        assert!(!hold(Status::Ok, 7, Status::Ok as u8, 7), "a replay");
        assert!(!hold(Status::Ok, 1, Status::Ok as u8, 9), "a restart");
        assert!(
            !hold(Status::Ok, 2, Status::Ok as u8, u64::MAX - 1),
            "a wrap"
        );
    }

    #[test]
    fn urgent_beats_are_new_critical_or_a_status_change() {
        assert!(urgent(Status::Ok, None), "a new or resumed agent");
        assert!(
            urgent(Status::Critical, Some(Status::Critical)),
            "a panic frame"
        );
        assert!(
            urgent(Status::Degraded, Some(Status::Ok)),
            "a status change"
        );
        assert!(!urgent(Status::Ok, Some(Status::Ok)));
        assert!(!urgent(Status::Degraded, Some(Status::Degraded)));
    }

    #[test]
    fn the_interval_fills_half_the_queue_within_its_bounds() {
        let max = Some(USERSPACE_MAX_INTERVAL_NS);
        // 513 datagrams (systemd's net.unix.max_dgram_qlen 512) at 20k/s: 12.8 ms, capped.
        assert_eq!(userspace_interval_ns(20_000, 513, false), max);
        // At 160k/s: 256 datagrams take 1.6 ms.
        assert_eq!(userspace_interval_ns(160_000, 513, false), Some(1_600_000));
        // The kernel's default of 10 (11 queued) at 20k/s: 5 datagrams, 250 us.
        assert_eq!(userspace_interval_ns(20_000, 11, false), Some(250_000));
        // Faster, a timer would let the queue fill: each datagram wakes the daemon.
        assert_eq!(userspace_interval_ns(20_001, 11, false), None);
        assert_eq!(userspace_interval_ns(0, 513, false), max);
        assert_eq!(userspace_interval_ns(1_000_000, 11, true), max);
    }

    #[test]
    fn a_burst_near_a_full_queue_shortens_the_interval_until_it_fits() {
        const MS: u64 = 1_000_000;
        let mut cap = BurstCap::default();
        // Up to three quarters of the queue: the rate's interval stands.
        cap.after_timer_drain(100 * MS, 10 * MS, 384, 513);
        assert_eq!(cap.apply(100 * MS, Some(10 * MS)), Some(10 * MS));
        // 800 taken after 1.6 ms: the next burst of that size fills half in 512 us.
        cap.after_timer_drain(200 * MS, 1_600_000, 800, 513);
        assert_eq!(cap.apply(200 * MS, Some(1_600_000)), Some(512_000));
        // The rate's interval, when shorter, still applies.
        assert_eq!(cap.apply(200 * MS, Some(300_000)), Some(300_000));
        // 600 more in 512 us: half fills in 218 us, three quarters in the shortest
        // interval, which stays.
        cap.after_timer_drain(201 * MS, 512_000, 600, 513);
        assert_eq!(
            cap.apply(201 * MS, Some(1_600_000)),
            Some(USERSPACE_MIN_INTERVAL_NS)
        );
        // A queue of 11 full within the shortest interval: every datagram wakes.
        let mut small = BurstCap::default();
        small.after_timer_drain(MS, 250_000, 11, 11);
        assert_eq!(small.apply(MS, Some(250_000)), None);
    }

    #[test]
    fn a_late_drain_does_not_shorten_the_cap() {
        const MS: u64 = 1_000_000;
        let mut cap = BurstCap::default();
        cap.after_timer_drain(100 * MS, 1_600_000, 1_436, 513);
        assert_eq!(cap.apply(100 * MS, Some(1_600_000)), Some(285_236));
        // Asked for 285 us, drained 1.09 ms later: 557 taken is 130k a second, a burst
        // that fills half in 500 us. The cap stands; sized by the 285 us asked for, it
        // would have fallen to 131 us, below which every datagram wakes the daemon.
        cap.after_timer_drain(101 * MS, 1_092_540, 557, 513);
        assert_eq!(cap.apply(101 * MS, Some(1_600_000)), Some(285_236));
        // A burst that does come faster still shortens it.
        cap.after_timer_drain(102 * MS, 400_000, 557, 513);
        assert_eq!(
            cap.apply(102 * MS, Some(1_600_000)),
            Some(USERSPACE_MIN_INTERVAL_NS)
        );
    }

    #[test]
    fn the_cap_lengthens_a_quarter_a_second_without_bursts() {
        const MS: u64 = 1_000_000;
        let mut cap = BurstCap::default();
        cap.after_timer_drain(0, 4 * MS, 512, 513);
        assert_eq!(cap.apply(0, Some(10 * MS)), Some(2 * MS));
        assert_eq!(cap.apply(999 * MS, Some(10 * MS)), Some(2 * MS));
        assert_eq!(cap.apply(1000 * MS, Some(10 * MS)), Some(2_500_001));
        let mut t = 1000 * MS;
        while cap.apply(t, Some(10 * MS)) != Some(10 * MS) {
            t += 1000 * MS;
            assert!(
                t < 20_000 * MS,
                "the cap never came back to the longest interval"
            );
        }
        // A burst meanwhile shortens it again at once.
        cap.after_timer_drain(t, 10 * MS, 513, 513);
        assert_eq!(cap.apply(t, Some(10 * MS)), Some(10 * MS * 256 / 513));
    }

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
