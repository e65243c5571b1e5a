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
    actions::recovery::Recovery,
    actions::series::{AgentSeries, SeriesLimits},
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
        }
    }

    /// Acts on every event of a batch, then flushes the export file once.
    pub fn handle_all(&mut self, events: &mut Vec<Event>, now_ns: u64) {
        let mut follow_ups = Vec::new();
        for event in events.drain(..) {
            self.handle(&event, now_ns, &mut follow_ups);
        }
        for event in follow_ups {
            self.handle(&event, now_ns, &mut Vec::new());
        }
        self.beat_counts.flush(&self.metrics, &self.series);
        self.flush();
    }

    /// When [`Actions::sweep`] has work next (observer clock), if ever.
    pub fn next_sweep_ns(&self) -> Option<u64> {
        self.series.next_sweep_ns()
    }

    /// Drops the per-agent series of agents gone for the retention (and looks at whether
    /// stalled agents' processes are gone).
    pub fn sweep(&mut self, now_ns: u64) {
        self.series
            .sweep(now_ns, &self.metrics, crate::sys::process::StartTime::of);
    }

    /// Hands the batch's export lines to the file's writer.
    pub fn flush(&mut self) {
        if let Some(export) = &mut self.export {
            export.flush();
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
            } => {
                // A pid seen anew (a reused pid verified afresh) may be another program.
                for gone in evicted.iter().chain([pid]) {
                    self.identities.remove(gone);
                }
                let m = &self.metrics;
                // A UDP pid is only a claim: naming it after some local process would mislead.
                let identity = match origin {
                    crate::vocab::beat::Origin::Uds { .. } => Identity::read(*pid),
                    crate::vocab::beat::Origin::Udp { .. } => Identity::default(),
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
            } => {
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
                    true => self.recover(*pid, *origin, *started, now_ns, follow_ups),
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
                self.recover(*pid, *origin, *started, now_ns, follow_ups);
            }
            Event::Resumed { pid } => {
                self.series.live(*pid);
                log::info!("event=agent_resumed pid={pid}")
            }
            Event::Replaced { pid } => {
                log::info!("event=agent_replaced pid={pid} reason=pid_reused")
            }
            Event::Restarted { pid } => {
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

    fn recover(
        &mut self,
        pid: u32,
        origin: crate::vocab::beat::Origin,
        started: Option<crate::sys::process::StartTime>,
        now_ns: u64,
        follow_ups: &mut Vec<Event>,
    ) {
        let Some(recovery) = &mut self.recovery else {
            return;
        };
        match recovery.start(pid, origin, started) {
            Ok(child) => {
                log::info!(
                    "event=recovery_started pid={pid} child={}",
                    child.map_or("-".to_owned(), |c| c.to_string())
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
