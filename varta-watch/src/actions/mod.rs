//! What happens for each event: each output receives it in turn, the log (`lines`), the
//! metrics (`counting`), recovery (`recovering`) and the export file.

pub mod audit;
mod beat_counts;
mod capture;
mod counting;
pub mod export;
pub mod identity;
mod lines;
pub mod metrics;
mod recovering;
pub mod recovery;
pub mod series;
pub mod sink;
mod sink_metrics;

use std::{collections::HashMap, sync::Arc};

use crate::{
    actions::audit::Audit,
    actions::beat_counts::BeatCounts,
    actions::export::Exporter,
    actions::identity::Identity,
    actions::metrics::Metrics,
    actions::recovery::{Recovery, Who},
    actions::series::{AgentSeries, SeriesLimits},
    sys::process::{Continuity, StartTime},
    vocab::events::Event,
};

pub struct Actions {
    pub metrics: Arc<Metrics>,
    pub export: Option<Exporter>,
    pub recovery: Option<Recovery>,
    pub audit: Option<Audit>,
    /// Start of the observer on its clock: export lines carry ns since then.
    start_ns: u64,
    /// Each tracked agent's identity, read once on its first beat.
    identities: HashMap<u32, Identity>,
    /// The beat metrics of the current run of beats, not yet written.
    beat_counts: BeatCounts,
    /// Which agents have per-agent series, and for how long yet.
    series: AgentSeries,
    /// Each local agent's process uid, read with its identity.
    uids: HashMap<u32, u32>,
    /// Stalls whose recovery a budget suppressed, retried while the agent stays stalled.
    pending: Vec<Pending>,
    /// When waiting recoveries were last tried.
    last_ns: u64,
}

/// A stall's recovery waiting for a budget to free.
struct Pending {
    pid: u32,
    origin: crate::vocab::beat::Origin,
    started: Option<crate::sys::process::StartTime>,
    who: Who,
}

/// How often waiting recoveries are tried again.
const RETRY_NS: u64 = 100_000_000;

impl Actions {
    pub fn new(
        metrics: Arc<Metrics>,
        export: Option<Exporter>,
        recovery: Option<Recovery>,
        audit: Option<Audit>,
        start_ns: u64,
        series: SeriesLimits,
    ) -> Self {
        Actions {
            metrics,
            export,
            recovery,
            audit,
            start_ns,
            identities: HashMap::new(),
            beat_counts: BeatCounts::default(),
            series: AgentSeries::new(series),
            uids: HashMap::new(),
            pending: Vec::new(),
            last_ns: 0,
        }
    }

    /// Acts on every event of a batch, then flushes the export file once.
    pub fn handle_all(&mut self, events: &mut Vec<Event>, now_ns: u64) {
        let mut follow_ups = Vec::new();
        for event in events.drain(..) {
            self.handle(&event, now_ns, &mut follow_ups);
        }
        self.retry_pending(now_ns, &mut follow_ups);
        for event in follow_ups {
            self.handle(&event, now_ns, &mut Vec::new());
        }
        self.beat_counts.flush(&self.metrics, &self.series);
        self.flush();
    }

    /// When [`Actions::sweep`] has work next (observer clock), if ever.
    pub fn next_sweep_ns(&self) -> Option<u64> {
        let retry = (!self.pending.is_empty()).then(|| self.last_ns + RETRY_NS);
        self.series.next_sweep_ns().into_iter().chain(retry).min()
    }

    /// Drops the per-agent series of agents gone for the retention (and looks at whether
    /// stalled agents' processes are gone).
    pub fn sweep(&mut self, now_ns: u64) {
        self.series
            .sweep(now_ns, &self.metrics, crate::sys::process::StartTime::of);
    }

    /// Hands the batch's export lines and audit records to the files' writers.
    pub fn flush(&mut self) {
        if let Some(export) = &mut self.export {
            export.flush();
        }
        if let Some(audit) = &mut self.audit {
            audit.flush();
        }
    }

    /// SIGHUP: the export and audit files are closed and opened again at their paths.
    pub fn reopen_files(&mut self) {
        if let Some(export) = &mut self.export {
            export.reopen();
        }
        if let Some(audit) = &mut self.audit {
            audit.reopen();
        }
    }

    /// Each output in turn receives the event: who the agent is is known first (a new
    /// agent's identity is read), then the log, the metrics, recovery and the export file.
    fn handle(&mut self, event: &Event, now_ns: u64, follow_ups: &mut Vec<Event>) {
        self.learn(event);
        lines::log(event, &self.identities);
        self.count(event, now_ns);
        self.recover_on(event, now_ns, follow_ups);
        self.export(event, now_ns);
    }

    /// Who a new agent is: its identity and uid, read once on its first beat (a pid seen
    /// anew, a reused pid verified afresh, may be another program).
    fn learn(&mut self, event: &Event) {
        let Event::NewAgent {
            pid,
            origin,
            evicted,
            started,
            ..
        } = event
        else {
            return;
        };
        for gone in evicted.iter().chain([pid]) {
            self.identities.remove(gone);
            self.uids.remove(gone);
        }
        // A UDP pid is only a claim: naming it after some local process would mislead.
        if let crate::vocab::beat::Origin::Uds { .. } = origin {
            let (identity, uid) = Self::read_identity(*pid, *started);
            self.identities.insert(*pid, identity);
            if let Some(uid) = uid {
                self.uids.insert(*pid, uid);
            }
        }
    }

    /// The identity and uid of the agent's process, `started` then: read from /proc, which
    /// shows whoever holds `pid` now, so they count only if the pid held that process
    /// through the read (else nothing is known: never a later process's name).
    fn read_identity(pid: u32, started: Option<StartTime>) -> (Identity, Option<u32>) {
        let (identity, uid) = (Identity::read(pid), identity::uid_of(pid));
        match Continuity::check(pid, started) {
            Continuity::Same => (identity, uid),
            _ => (Identity::default(), None),
        }
    }

    /// The export output: a line for each beat, stall, exit and recovery.
    fn export(&mut self, event: &Event, now_ns: u64) {
        let Some(export) = &mut self.export else {
            return;
        };
        // A beat is stamped with its receive time: drained in batches, it may be processed
        // later than it arrived, and the stall deadline counts from its arrival.
        let at_ns = match event {
            Event::Beat { recv_ns, .. } => *recv_ns,
            _ => now_ns,
        };
        let identity = match event {
            Event::Stall { pid, .. } | Event::Exit { pid, .. } => self.identities.get(pid),
            _ => None,
        };
        export.record(at_ns.saturating_sub(self.start_ns), event, identity);
    }

    fn identity(&self, pid: u32) -> Identity {
        self.identities.get(&pid).cloned().unwrap_or_default()
    }

    /// A tracked agent's identity (empty when unknown), for the state file.
    pub fn identity_of(&self, pid: u32) -> Identity {
        self.identity(pid)
    }

    /// An agent a previous instance tracked: its identity, as it was read then.
    pub fn restore_identity(
        &mut self,
        pid: u32,
        origin: &crate::vocab::beat::Origin,
        identity: Identity,
    ) {
        let info = match origin {
            crate::vocab::beat::Origin::Uds { .. } => {
                let label = identity.label(pid);
                self.identities.insert(pid, identity);
                Some(label)
            }
            crate::vocab::beat::Origin::Udp { .. } => None,
        };
        self.series.admit(pid, info, &self.metrics);
    }
}
