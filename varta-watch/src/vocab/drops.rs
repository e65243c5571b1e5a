//! Drop counters kept in the daemon, by [`DropReason`]. The exporter adds the eBPF
//! program's per-CPU counters to these, so a dashboard sees one set of numbers whichever
//! datapath runs.

use std::sync::atomic::{AtomicU64, Ordering};

use varta_common::DropReason;

/// Reads the eBPF program's drop counters, summed over CPUs.
pub type KernelDrops = Box<dyn Fn() -> Option<[u64; DropReason::COUNT]> + Send + Sync>;

/// The incumbent's (varta-watch 0.2.0) counter of some drop reasons, its help, and the
/// reasons it adds up: exported beside `varta_frames_dropped_total` (with `_total`) so
/// existing dashboards keep working, and read back by `top` from an incumbent observer (as
/// the first reason).
pub const INCUMBENT_DROPS: [(&str, &str, &[DropReason]); 6] = [
    (
        "varta_frame_auth_failures",
        "Frames whose pid is not the attested sender's, plus secure UDP frames no key authenticated (frames_dropped{reason=\"spoof\"} + {reason=\"auth\"})",
        &[DropReason::Spoof, DropReason::Auth],
    ),
    (
        "varta_frame_decrypt_failures",
        "Authenticated secure UDP frames whose plaintext is not a valid frame of their sender (= frames_dropped{reason=\"decrypt\"})",
        &[DropReason::Decrypt],
    ),
    (
        "varta_frame_namespace_mismatch",
        "Frames from another pid namespace refused (= frames_dropped{reason=\"namespace\"})",
        &[DropReason::Namespace],
    ),
    (
        "varta_frame_rejected_pid_above_max",
        "Frames with a pid above pid_max (= frames_dropped{reason=\"pid_max\"})",
        &[DropReason::PidMax],
    ),
    (
        "varta_tracker_capacity_exceeded",
        "New agents refused with the tracker full (= frames_dropped{reason=\"capacity\"})",
        &[DropReason::Capacity],
    ),
    (
        "varta_truncated_datagrams",
        "Datagrams of the wrong length (= frames_dropped{reason=\"length\"})",
        &[DropReason::Length],
    ),
];

#[derive(Debug)]
pub struct DropCounters {
    counts: [AtomicU64; DropReason::COUNT],
    /// How many junk frames one that reached the daemon stands for: 1 while the classic
    /// filter lets every junk frame up (exact counts), its sample rate while it samples
    /// (the counts are then estimates; `varta_junk_sample_one_in` says which).
    junk_scale: AtomicU64,
    /// The scale before the last switch, and when the switch took effect (the datapath's
    /// clock): the frames the previous filter let up may still be queued then, and each
    /// stands for what that filter said (one frame, exact; or a sample of `one_in`).
    junk_scale_before: AtomicU64,
    junk_scale_since_ns: AtomicU64,
    /// Junk frames counted, samples as what they stand for: the datapath measures the junk
    /// rate with it.
    junk_counted: AtomicU64,
    /// UDP datagrams the kernel dropped with the socket's receive queue full (userspace
    /// datapath): `varta_frames_dropped_total{reason="queue_full"}`.
    queue_full: AtomicU64,
    /// Senders the userspace datapath's classic filter denies (`datapath::deny`).
    denied: AtomicU64,
}

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            junk_scale: AtomicU64::new(1),
            junk_scale_before: AtomicU64::new(1),
            junk_scale_since_ns: AtomicU64::new(0),
            junk_counted: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        }
    }
}

impl DropCounters {
    pub fn add(&self, reason: DropReason) {
        self.add_n(reason, 1);
    }

    /// `n` frames dropped for `reason`: estimates of what a sample stands for.
    pub fn add_n(&self, reason: DropReason, n: u64) {
        self.counts[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_denied(&self, senders: usize) {
        self.denied.store(senders as u64, Ordering::Relaxed);
    }

    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// A frame the classic filter (userspace datapath) lets up only as a sample when it
    /// samples, queued by the kernel at `arrived_ns`: counted as the frames it stands for
    /// under the filter that let it up (the one before the last switch if it arrived
    /// before), which this returns.
    pub fn add_junk(&self, reason: DropReason, arrived_ns: u64) -> u64 {
        let scale = if arrived_ns < self.junk_scale_since_ns.load(Ordering::Relaxed) {
            self.junk_scale_before.load(Ordering::Relaxed)
        } else {
            self.junk_scale.load(Ordering::Relaxed)
        };
        self.add_n(reason, scale);
        self.junk_counted.fetch_add(scale, Ordering::Relaxed);
        scale
    }

    pub fn add_queue_full(&self, n: u64) {
        self.queue_full.fetch_add(n, Ordering::Relaxed);
    }

    pub fn queue_full(&self) -> u64 {
        self.queue_full.load(Ordering::Relaxed)
    }

    /// The classic filter lets one junk frame in `one_in` up from `since_ns` on (the
    /// datapath's clock, read once the filter is attached).
    pub fn set_junk_scale(&self, one_in: u32, since_ns: u64) {
        let before = self
            .junk_scale
            .swap(u64::from(one_in.max(1)), Ordering::Relaxed);
        self.junk_scale_before.store(before, Ordering::Relaxed);
        self.junk_scale_since_ns.store(since_ns, Ordering::Relaxed);
    }

    pub fn junk_scale(&self) -> u64 {
        self.junk_scale.load(Ordering::Relaxed)
    }

    /// Junk frames counted so far, samples as what they stand for.
    pub fn junk_counted(&self) -> u64 {
        self.junk_counted.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> [u64; DropReason::COUNT] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use varta_common::DecodeError;

    use super::*;

    const BAD_CRC: DropReason = DropReason::Decode(DecodeError::BadCrc);

    #[test]
    fn junk_is_counted_as_the_filter_that_let_it_up_said() {
        let drops = DropCounters::default();
        assert_eq!(drops.add_junk(BAD_CRC, 10), 1, "exact from the start");
        // The filter samples from 100 on; what the exact one let up is still queued.
        drops.set_junk_scale(1024, 100);
        assert_eq!(drops.junk_scale(), 1024);
        assert_eq!(drops.add_junk(BAD_CRC, 99), 1, "queued before the switch");
        assert_eq!(drops.add_junk(BAD_CRC, 100), 1024, "a sample");
        // Exact again from 200 on: a sample queued before still stands for 1,024.
        drops.set_junk_scale(1, 200);
        assert_eq!(drops.add_junk(BAD_CRC, 150), 1024);
        assert_eq!(drops.add_junk(BAD_CRC, 201), 1);
        assert_eq!(drops.snapshot()[BAD_CRC.index()], 1 + 1 + 1024 + 1024 + 1);
        assert_eq!(drops.junk_counted(), 2051);
    }
}
