//! What happens for each event: a log line, an export line, metrics, recovery.

pub mod audit;
mod beat_counts;
mod capture;
pub mod export;
pub mod identity;
pub mod metrics;
pub mod recovery;
pub mod series;
pub mod sink;
mod sink_metrics;

use std::{collections::HashMap, sync::Arc};

use varta_common::Status;

use crate::{
    actions::audit::Audit,
    actions::beat_counts::BeatCounts,
    actions::export::Exporter,
    actions::identity::Identity,
    actions::metrics::{Metrics, OutcomeLabel, PidLabel, ReasonLabel},
    actions::recovery::{Recovery, Who},
    actions::series::{AgentSeries, SeriesLimits},
    sys::process::{Continuity, StartTime},
    vocab::{
        events::Event,
        recovery::{Finished, NotRun, Outcome},
    },
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

/// At most this many stalls wait for a retry (one per agent); more are only suppressed.
const MAX_PENDING: usize = 4096;
/// How often waiting recoveries are tried again.
const RETRY_NS: u64 = 100_000_000;

/// The suppressions that end when a budget frees.
fn retryable(reason: &str) -> bool {
    matches!(
        reason,
        "max_running"
            | "spawn_rate"
            | "uid_max_running"
            | "uid_spawn_rate"
            | "one_shot_max_running"
            | "one_shot_spawn_rate"
    )
}

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

    /// Tries the waiting recoveries again, established agents first.
    fn retry_pending(&mut self, now_ns: u64, follow_ups: &mut Vec<Event>) {
        self.last_ns = now_ns;
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|p| !p.who.established);
        for p in pending {
            self.recover(p.pid, p.origin, p.started, p.who, true, now_ns, follow_ups);
        }
    }

    /// The agent under `pid` is not (or no longer the one) stalled: nothing to retry.
    fn not_stalled(&mut self, pid: u32) {
        self.pending.retain(|p| p.pid != pid);
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

    fn handle(&mut self, event: &Event, now_ns: u64, follow_ups: &mut Vec<Event>) {
        if !matches!(event, Event::Beat { .. }) {
            self.beat_counts.flush(&self.metrics, &self.series);
        }
        let m = &self.metrics;
        match event {
            Event::Beat { pid, frame, .. } => self.beat_counts.add(*pid, frame.status as i64),
            Event::NewAgent {
                pid,
                frame_pid,
                origin,
                evicted,
                started,
            } => {
                // A pid seen anew (a reused pid verified afresh) may be another program.
                for gone in evicted.iter().chain([pid]) {
                    self.identities.remove(gone);
                    self.uids.remove(gone);
                    self.not_stalled(*gone);
                }
                let m = &self.metrics;
                // A UDP pid is only a claim: naming it after some local process would mislead.
                let (identity, uid) = match origin {
                    crate::vocab::beat::Origin::Uds { .. } => Self::read_identity(*pid, *started),
                    crate::vocab::beat::Origin::Udp { .. } => (Identity::default(), None),
                };
                log::info!(
                    "event=agent_new pid={pid} frame_pid={frame_pid} transport={} cross_namespace={} {identity}",
                    origin.transport(),
                    origin.is_cross_namespace()
                );
                // Only an attested agent has a name to export; a UDP one would be an empty
                // series (and memory) per claimed pid.
                let info = match origin {
                    crate::vocab::beat::Origin::Uds { .. } => Some(identity.label(*pid)),
                    crate::vocab::beat::Origin::Udp { .. } => None,
                };
                if info.is_some() {
                    self.identities.insert(*pid, identity);
                    if let Some(uid) = uid {
                        self.uids.insert(*pid, uid);
                    }
                }
                self.series.admit(*pid, info, m);
                // An evicted agent's series stay for the retention: a stall it surfaced
                // stays visible to the next scrapes.
                if let Some(old) = evicted {
                    m.evicted.inc();
                    self.series.went(*old, now_ns);
                    log::info!("event=agent_evicted pid={old} for={pid}");
                }
            }
            Event::Critical { pid, frame } => {
                if self.series.has(*pid) {
                    m.criticals.get_or_create(&PidLabel { pid: *pid }).inc();
                }
                log::warn!(
                    "event=critical pid={pid} nonce={} payload={}",
                    frame.nonce,
                    frame.payload
                );
            }
            Event::Exit {
                pid,
                frame,
                origin,
                known,
                started,
                beating_ns,
            } => {
                self.pending.retain(|p| p.pid != *pid);
                m.agent_exits.inc();
                if self.series.has(*pid) {
                    m.exits.get_or_create(&PidLabel { pid: *pid }).inc();
                }
                self.series.went(*pid, now_ns);
                log::warn!(
                    "event=exit pid={pid} payload={} reason=panic_terminal_frame known={known} {}",
                    frame.payload,
                    self.identity(*pid)
                );
                // Its first frame is its death: nothing ever beat there to be recovered, and
                // anyone can send that frame; surfaced, not acted on.
                match known {
                    true => {
                        let who = self.who(*pid, *beating_ns);
                        self.recover(*pid, *origin, *started, who, false, now_ns, follow_ups)
                    }
                    false if self.recovery.is_some() => {
                        self.suppressed(*pid, "unknown_agent", follow_ups)
                    }
                    false => {}
                }
            }
            Event::Stall {
                pid,
                last_nonce,
                last_status,
                origin,
                started,
                silent_ms,
                beating_ns,
            } => {
                m.agent_stalls.inc();
                if self.series.has(*pid) {
                    m.stalls.get_or_create(&PidLabel { pid: *pid }).inc();
                    m.status
                        .get_or_create(&PidLabel { pid: *pid })
                        .set(Status::Stall as i64);
                }
                let local = matches!(origin, crate::vocab::beat::Origin::Uds { .. });
                self.series.stalled(*pid, *started, local, now_ns);
                log::warn!(
                    "event=stall pid={pid} silent_ms={silent_ms} last_nonce={last_nonce} last_status={} transport={} {}",
                    last_status.name(),
                    origin.transport(),
                    self.identity(*pid)
                );
                let who = self.who(*pid, *beating_ns);
                self.pending.retain(|p| p.pid != *pid);
                self.recover(*pid, *origin, *started, who, false, now_ns, follow_ups);
                // Suppressed by a budget: tried again while it stays stalled.
                if let Some(last) = follow_ups.last_mut()
                    && let Event::Recovery(f) = last
                    && f.pid == *pid
                    && f.outcome == Outcome::Suppressed
                    && retryable(&f.detail)
                    && self.pending.len() < MAX_PENDING
                {
                    f.detail.push_str(" (retried while stalled)");
                    self.pending.push(Pending {
                        pid: *pid,
                        origin: *origin,
                        started: *started,
                        who,
                    });
                }
            }
            Event::Resumed { pid } => {
                self.pending.retain(|p| p.pid != *pid);
                self.series.live(*pid);
                log::info!("event=agent_resumed pid={pid}")
            }
            Event::Replaced { pid } => {
                log::info!("event=agent_replaced pid={pid} reason=pid_reused")
            }
            Event::Restarted { pid } => {
                self.pending.retain(|p| p.pid != *pid);
                self.series.live(*pid);
                m.restarts.inc();
                log::info!("event=agent_restarted pid={pid} reason=nonce_1");
            }
            Event::NonceWrapped { pid } => {
                m.nonce_wraps.inc();
                log::info!("event=nonce_wrapped pid={pid}");
            }
            Event::Recovery(
                finished @ Finished {
                    pid,
                    outcome,
                    detail,
                    ..
                },
            ) => {
                if let Some(audit) = &mut self.audit {
                    audit.finished(now_ns.saturating_sub(self.start_ns), finished);
                }
                m.recovery_outcomes
                    .get_or_create(&OutcomeLabel {
                        outcome: outcome.name(),
                    })
                    .inc();
                log::info!(
                    "event=recovery pid={pid} outcome={} detail=\"{detail}\"",
                    outcome.name()
                );
            }
        }
        // A beat is stamped with its receive time: drained in batches, it may be processed
        // later than it arrived, and the stall deadline counts from its arrival.
        let at_ns = match event {
            Event::Beat { recv_ns, .. } => *recv_ns,
            _ => now_ns,
        };
        let observer_ns = at_ns.saturating_sub(self.start_ns);
        if let Some(export) = &mut self.export {
            export.record(
                observer_ns,
                event,
                event_pid(event).and_then(|p| self.identities.get(&p)),
            );
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

    /// A recovery a global limit (or an unknown agent, or a reused pid) kept from running: counted in
    /// `varta_recovery_suppressed_total{reason}`.
    fn suppressed(&mut self, pid: u32, reason: &'static str, follow_ups: &mut Vec<Event>) {
        self.metrics
            .recovery_suppressed
            .get_or_create(&ReasonLabel { reason })
            .inc();
        follow_ups.push(Event::Recovery(Finished {
            pid,
            outcome: Outcome::Suppressed,
            detail: reason.into(),
            run: None,
        }));
    }

    /// Whose recovery it is: the agent's uid and whether it has a history.
    fn who(&self, pid: u32, beating_ns: u64) -> Who {
        Who {
            uid: self.uids.get(&pid).copied(),
            established: self
                .recovery
                .as_ref()
                .is_none_or(|r| r.established(beating_ns)),
        }
    }

    /// Runs recovery for `pid`; a `retry` still suppressed by a budget waits again quietly.
    #[allow(clippy::too_many_arguments)]
    fn recover(
        &mut self,
        pid: u32,
        origin: crate::vocab::beat::Origin,
        started: Option<crate::sys::process::StartTime>,
        who: Who,
        retry: bool,
        now_ns: u64,
        follow_ups: &mut Vec<Event>,
    ) {
        let Some(recovery) = &mut self.recovery else {
            return;
        };
        match recovery.start_for(pid, origin, started, who) {
            Err(NotRun::Suppressed(reason)) if retry && retryable(reason) => {
                self.pending.push(Pending {
                    pid,
                    origin,
                    started,
                    who,
                });
            }
            Ok(child) => {
                log::info!(
                    "event=recovery_started pid={pid} child={} uid={} established={} retried={retry}",
                    child.map_or("-".to_owned(), |c| c.to_string()),
                    who.uid.map_or("-".to_owned(), |u| u.to_string()),
                    who.established
                );
                if let (Some(audit), Some(child)) = (&mut self.audit, child) {
                    audit.spawned(now_ns.saturating_sub(self.start_ns), pid, child);
                }
            }
            Err(NotRun::Debounced) => {
                follow_ups.push(Event::Recovery(Finished {
                    pid,
                    outcome: Outcome::Debounced,
                    detail: "within --recovery-debounce-ms".into(),
                    run: None,
                }));
            }
            Err(NotRun::Suppressed(reason)) => self.suppressed(pid, reason, follow_ups),
            Err(NotRun::Refused(reason)) => {
                self.metrics
                    .recovery_refused
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                follow_ups.push(Event::Recovery(Finished {
                    pid,
                    outcome: Outcome::Refused,
                    detail: reason.into(),
                    run: None,
                }));
            }
        }
    }
}

/// The agent a stall or exit is about.
fn event_pid(event: &Event) -> Option<u32> {
    match event {
        Event::Stall { pid, .. } | Event::Exit { pid, .. } => Some(*pid),
        _ => None,
    }
}
