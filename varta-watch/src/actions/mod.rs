//! What happens for each event: a log line, an export line, metrics, recovery.

pub mod audit;
mod capture;
pub mod export;
pub mod http;
mod http_conn;
pub mod metrics;
pub mod recovery;
pub mod sink;

use std::sync::Arc;

use varta_common::Status;

use crate::{
    actions::audit::Audit,
    actions::export::Exporter,
    actions::metrics::{Metrics, OutcomeLabel, PidLabel, ReasonLabel},
    actions::recovery::{Finished, NotRun, Outcome, Recovery},
    observer::events::Event,
};

pub struct Actions {
    pub metrics: Arc<Metrics>,
    pub export: Option<Exporter>,
    pub recovery: Option<Recovery>,
    pub audit: Option<Audit>,
    /// Start of the observer on its clock: export lines carry ns since then.
    start_ns: u64,
}

impl Actions {
    pub fn new(
        metrics: Arc<Metrics>,
        export: Option<Exporter>,
        recovery: Option<Recovery>,
        audit: Option<Audit>,
        start_ns: u64,
    ) -> Self {
        Actions {
            metrics,
            export,
            recovery,
            audit,
            start_ns,
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
        self.flush();
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
        let m = &self.metrics;
        match event {
            Event::Beat { pid, frame, .. } => {
                m.beats.get_or_create(&PidLabel { pid: *pid }).inc();
                m.status
                    .get_or_create(&PidLabel { pid: *pid })
                    .set(frame.status as i64);
            }
            Event::NewAgent {
                pid,
                frame_pid,
                origin,
                evicted,
            } => {
                log::info!(
                    "event=agent_new pid={pid} frame_pid={frame_pid} transport={} cross_namespace={}",
                    origin.transport(),
                    origin.is_cross_namespace()
                );
                if let Some(old) = evicted {
                    m.evicted.inc();
                    for family in [&m.beats, &m.stalls, &m.exits, &m.criticals] {
                        family.remove(&PidLabel { pid: *old });
                    }
                    m.status.remove(&PidLabel { pid: *old });
                    log::info!("event=agent_evicted pid={old} for={pid}");
                }
            }
            Event::Critical { pid, frame } => {
                m.criticals.get_or_create(&PidLabel { pid: *pid }).inc();
                log::warn!(
                    "event=critical pid={pid} nonce={} payload={}",
                    frame.nonce,
                    frame.payload
                );
            }
            Event::Exit { pid, frame, origin } => {
                m.exits.get_or_create(&PidLabel { pid: *pid }).inc();
                log::warn!(
                    "event=exit pid={pid} payload={} reason=panic_terminal_frame",
                    frame.payload
                );
                self.recover(*pid, *origin, now_ns, follow_ups);
            }
            Event::Stall {
                pid,
                agent,
                silent_ms,
            } => {
                m.stalls.get_or_create(&PidLabel { pid: *pid }).inc();
                m.status
                    .get_or_create(&PidLabel { pid: *pid })
                    .set(Status::Stall as i64);
                log::warn!(
                    "event=stall pid={pid} silent_ms={silent_ms} last_nonce={} last_status={} transport={}",
                    agent.last_nonce,
                    agent.status.name(),
                    agent.origin.transport()
                );
                self.recover(*pid, agent.origin, now_ns, follow_ups);
            }
            Event::Resumed { pid } => log::info!("event=agent_resumed pid={pid}"),
            Event::Restarted { pid } => {
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
            export.record(observer_ns, event);
        }
    }

    fn recover(
        &mut self,
        pid: u32,
        origin: crate::datapath::Origin,
        now_ns: u64,
        follow_ups: &mut Vec<Event>,
    ) {
        let Some(recovery) = &mut self.recovery else {
            return;
        };
        match recovery.start(pid, origin) {
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
