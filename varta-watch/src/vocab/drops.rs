//! Drop counters kept in the daemon, by [`DropReason`]. The exporter adds the eBPF
//! program's per-CPU counters to these, so a dashboard sees one set of numbers whichever
//! datapath runs.

use std::sync::atomic::{AtomicU64, Ordering};

use varta_common::DropReason;

/// Reads the eBPF program's drop counters, summed over CPUs.
pub type KernelDrops = Box<dyn Fn() -> Option<[u64; DropReason::COUNT]> + Send + Sync>;

#[derive(Debug, Default)]
pub struct DropCounters {
    counts: [AtomicU64; DropReason::COUNT],
}

impl DropCounters {
    pub fn add(&self, reason: DropReason) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> [u64; DropReason::COUNT] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}
