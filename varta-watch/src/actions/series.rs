//! Per-agent series (`pid` label), bounded by design under process churn.
//!
//! - At most `max` agents have per-agent series (`varta_beats_total`, `varta_stalls_total`,
//!   `varta_status`, `varta_exits_total`, `varta_criticals_total`, `varta_agent_info`); a
//!   new agent beyond that gets none and is counted (`varta_agent_series_overflow_total`).
//!   The aggregates (`varta_agents{state}`, `varta_agent_stalls_total`,
//!   `varta_agent_exits_total`) count every agent.
//! - An agent that is gone keeps its series for `retention`, then they are dropped: gone is
//!   sent the panic-terminal frame, evicted from the tracker, or stalled with its process no
//!   longer there (its start time no longer the one read at the stall; a UDP agent's pid is
//!   only a claim, so a stalled UDP agent counts as gone). A stalled agent whose process
//!   still runs keeps its series: it is the incident.
//! - A gone agent that beats again (resumes, restarts, or its pid is taken by a new agent)
//!   keeps its series and is no longer gone.

use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;

pub use crate::config::SeriesLimits;
use crate::{
    actions::metrics::{AgentInfoLabel, Metrics, PidLabel},
    sys::process::{Continuity, StartTime},
};

/// How often stalled agents' processes are looked at again.
const CHECK_NS: u64 = 1_000_000_000;

struct Entry {
    info: Option<AgentInfoLabel>,
    /// Stalled with a process that may still run: looked at every [`CHECK_NS`].
    stalled: Option<Option<StartTime>>,
    /// Gone: the ticket of its place in the retention queue.
    gone: Option<u64>,
}

pub struct AgentSeries {
    limits: SeriesLimits,
    entries: HashMap<u32, Entry, RandomState>,
    /// (gone at, pid, ticket), oldest first: one retention for all, so also drop order.
    gone: VecDeque<(u64, u32, u64)>,
    /// Stalled agents whose process may still run (entries may be stale).
    stalled: Vec<u32>,
    next_ticket: u64,
    checked_ns: u64,
}

impl AgentSeries {
    pub fn new(limits: SeriesLimits) -> Self {
        AgentSeries {
            limits,
            entries: HashMap::default(),
            gone: VecDeque::new(),
            stalled: Vec::new(),
            next_ticket: 0,
            checked_ns: 0,
        }
    }

    /// Whether `pid` has per-agent series (written only then).
    pub fn has(&self, pid: u32) -> bool {
        self.entries.contains_key(&pid)
    }

    /// A new agent under `pid` (`info`: its `varta_agent_info` series, if it has a name):
    /// `false` when the cap leaves it without per-agent series.
    pub fn admit(&mut self, pid: u32, info: Option<AgentInfoLabel>, m: &Metrics) -> bool {
        if let Some(entry) = self.entries.get_mut(&pid) {
            if let Some(old) = entry.info.take() {
                m.agent_info.remove(&old);
            }
            if let Some(info) = &info {
                m.agent_info.get_or_create(info).set(1);
            }
            *entry = Entry {
                info,
                stalled: None,
                gone: None,
            };
            return true;
        }
        if self.entries.len() >= self.limits.max {
            m.agent_series_overflow.inc();
            return false;
        }
        if let Some(info) = &info {
            m.agent_info.get_or_create(info).set(1);
        }
        self.entries.insert(
            pid,
            Entry {
                info,
                stalled: None,
                gone: None,
            },
        );
        m.agent_series.set(self.entries.len() as i64);
        true
    }

    /// The agent beats again (resumed, restarted): not stalled, not gone.
    pub fn live(&mut self, pid: u32) {
        if let Some(entry) = self.entries.get_mut(&pid) {
            entry.stalled = None;
            entry.gone = None;
        }
    }

    /// Surfaced as stalled: gone at once when its process cannot be looked at (UDP, or
    /// gone before its start time was read), else looked at until it is gone or beats.
    pub fn stalled(&mut self, pid: u32, started: Option<StartTime>, local: bool, now_ns: u64) {
        let Some(entry) = self.entries.get_mut(&pid) else {
            return;
        };
        match (local, started) {
            (true, Some(_)) => {
                entry.stalled = Some(started);
                self.stalled.push(pid);
            }
            _ => self.went(pid, now_ns),
        }
    }

    /// The agent is gone (exited, evicted, its process gone): its series are dropped after
    /// the retention unless it comes back first.
    pub fn went(&mut self, pid: u32, now_ns: u64) {
        let Some(entry) = self.entries.get_mut(&pid) else {
            return;
        };
        entry.stalled = None;
        if entry.gone.is_none() {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            entry.gone = Some(ticket);
            self.gone.push_back((now_ns, pid, ticket));
        }
    }

    /// When [`AgentSeries::sweep`] has something to do next, if ever.
    pub fn next_sweep_ns(&self) -> Option<u64> {
        let drop = self
            .gone
            .front()
            .map(|(at, ..)| at.saturating_add(self.limits.retention_ns));
        let check = (!self.stalled.is_empty()).then(|| self.checked_ns + CHECK_NS);
        drop.into_iter().chain(check).min()
    }

    /// Looks at stalled agents' processes (each [`CHECK_NS`], with `now_start` reading the
    /// start time of whichever process holds a pid), then drops the series of agents gone
    /// for the retention.
    pub fn sweep(
        &mut self,
        now_ns: u64,
        m: &Metrics,
        mut now_start: impl FnMut(u32) -> Option<StartTime>,
    ) {
        if !self.stalled.is_empty() && now_ns >= self.checked_ns + CHECK_NS {
            self.checked_ns = now_ns;
            let mut pids = std::mem::take(&mut self.stalled);
            pids.sort_unstable();
            pids.dedup();
            for pid in pids {
                let Some(Some(started)) = self.entries.get(&pid).and_then(|e| e.stalled) else {
                    continue;
                };
                match Continuity::of(Some(started), now_start(pid)) {
                    Continuity::Same => self.stalled.push(pid),
                    _ => self.went(pid, now_ns),
                }
            }
        }
        while let Some(&(at, pid, ticket)) = self.gone.front() {
            if at.saturating_add(self.limits.retention_ns) > now_ns {
                break;
            }
            self.gone.pop_front();
            if self
                .entries
                .get(&pid)
                .is_some_and(|e| e.gone == Some(ticket))
            {
                let entry = self.entries.remove(&pid).expect("looked up above");
                let label = PidLabel { pid };
                for family in [&m.beats, &m.stalls, &m.exits, &m.criticals] {
                    family.remove(&label);
                }
                m.status.remove(&label);
                if let Some(info) = entry.info {
                    m.agent_info.remove(&info);
                }
            }
        }
        m.agent_series.set(self.entries.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn metrics() -> Metrics {
        Metrics::new(Default::default(), "ebpf", "none", 16)
    }

    fn series_of(m: &Metrics, pid: u32) -> usize {
        let needle = format!("pid=\"{pid}\"");
        m.encode().lines().filter(|l| l.contains(&needle)).count()
    }

    fn limits(max: usize) -> SeriesLimits {
        SeriesLimits {
            max,
            retention_ns: 10 * S,
        }
    }

    #[test]
    fn beyond_the_cap_agents_get_no_series_and_are_counted() {
        let m = metrics();
        let mut s = AgentSeries::new(limits(2));
        assert!(s.admit(1, None, &m));
        assert!(s.admit(2, None, &m));
        assert!(!s.admit(3, None, &m));
        assert!(s.admit(1, None, &m), "a known pid keeps its place");
        assert_eq!(m.agent_series_overflow.get(), 1);
        assert_eq!(m.agent_series.get(), 2);
    }

    #[test]
    fn a_gone_agent_keeps_its_series_for_the_retention_then_frees_its_place() {
        let m = metrics();
        let mut s = AgentSeries::new(limits(1));
        s.admit(7, None, &m);
        m.stalls.get_or_create(&PidLabel { pid: 7 }).inc();
        s.went(7, S);
        s.sweep(10 * S, &m, |_| None);
        assert_eq!(series_of(&m, 7), 1, "kept within the retention");
        assert_eq!(s.next_sweep_ns(), Some(11 * S));
        s.sweep(11 * S, &m, |_| None);
        assert_eq!(series_of(&m, 7), 0);
        assert!(s.admit(8, None, &m), "its place is free");
    }

    #[test]
    fn a_stalled_agent_is_gone_only_once_its_process_is() {
        let m = metrics();
        let mut s = AgentSeries::new(limits(4));
        s.admit(7, None, &m);
        s.stalled(7, Some(StartTime(5)), true, 0);
        s.sweep(2 * S, &m, |_| Some(StartTime(5)));
        s.sweep(100 * S, &m, |_| Some(StartTime(5)));
        assert!(s.has(7), "a hung process stays an incident");
        s.sweep(102 * S, &m, |_| None);
        assert!(s.has(7), "gone now, kept for the retention");
        s.sweep(112 * S, &m, |_| None);
        assert!(!s.has(7));
    }

    #[test]
    fn an_agent_that_comes_back_is_not_dropped() {
        let m = metrics();
        let mut s = AgentSeries::new(limits(4));
        s.admit(7, None, &m);
        s.stalled(7, None, false, 0);
        s.live(7);
        s.sweep(100 * S, &m, |_| None);
        assert!(s.has(7));
        s.went(7, 100 * S);
        s.admit(7, None, &m);
        s.sweep(200 * S, &m, |_| None);
        assert!(s.has(7), "a new agent under the pid");
    }
}
