//! The per-pid beat metrics of a run of beats, written once per pid instead of once per beat:
//! a drained batch holds hundreds of beats of a few agents, and each write to a metric family
//! takes its lock and hashes its label. Flushed before any other event, so every other
//! event sees the metrics exactly as if each beat had been written on its own.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::actions::{
    metrics::{Metrics, PidLabel},
    series::AgentSeries,
};

#[derive(Default)]
pub struct BeatCounts {
    /// pid -> (beats in this run, status of its latest beat).
    pending: HashMap<u32, (u64, i64), RandomState>,
}

impl BeatCounts {
    pub fn add(&mut self, pid: u32, status: i64, count: u64) {
        let entry = self.pending.entry(pid).or_insert((0, status));
        entry.0 += count;
        entry.1 = status;
    }

    /// Writes the run into `varta_beats_total` and `varta_status`, for the agents that have
    /// per-agent series.
    pub fn flush(&mut self, metrics: &Metrics, series: &AgentSeries) {
        for (pid, (beats, status)) in self.pending.drain() {
            if !series.has(pid) {
                continue;
            }
            let label = PidLabel { pid };
            metrics.beats.get_or_create(&label).inc_by(beats);
            metrics.status.get_or_create(&label).set(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_counts_every_beat_folded_or_not_and_keeps_the_latest_status() {
        let metrics = Metrics::new(Default::default(), "ebpf", "none", 16);
        let mut counts = BeatCounts::default();
        let mut series = AgentSeries::new(Default::default());
        series.admit(7, None, &metrics);
        series.admit(8, None, &metrics);
        for (pid, status, count) in [(7, 0, 1), (8, 1, 1), (7, 2, 1), (7, 1, 3)] {
            counts.add(pid, status, count);
        }
        counts.flush(&metrics, &series);
        let get = |pid| {
            let label = PidLabel { pid };
            (
                metrics.beats.get_or_create(&label).get(),
                metrics.status.get_or_create(&label).get(),
            )
        };
        assert_eq!(
            get(7),
            (5, 1),
            "three of them held by the kernel, folded into one"
        );
        assert_eq!(get(8), (1, 1));
        counts.flush(&metrics, &series);
        assert_eq!(get(7), (5, 1), "a flushed run is not counted twice");
    }
}
