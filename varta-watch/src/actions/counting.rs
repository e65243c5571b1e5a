//! The metrics output: what each event counts, and which agents keep per-agent series.

use varta_common::Status;

use crate::{
    actions::{
        Actions,
        metrics::{OutcomeLabel, PidLabel, ReasonLabel},
    },
    vocab::{
        beat::Origin,
        events::Event,
        recovery::{Finished, Outcome},
    },
};

impl Actions {
    /// Counts `event` (a beat only into the batch's beat counts, written before the next
    /// other event).
    pub(super) fn count(&mut self, event: &Event, now_ns: u64) {
        let m = &self.metrics;
        let Event::Beat {
            pid, frame, count, ..
        } = event
        else {
            self.beat_counts.flush(m, &self.series);
            return self.count_other(event, now_ns);
        };
        self.beat_counts.add(*pid, frame.status as i64, *count);
    }

    fn count_other(&mut self, event: &Event, now_ns: u64) {
        let m = &self.metrics;
        let per_agent = |pid: u32| PidLabel { pid };
        match event {
            Event::Beat { .. } | Event::Replaced { .. } => {}
            Event::Resumed { pid } => self.series.live(*pid),
            Event::NewAgent {
                pid,
                origin,
                evicted,
                ..
            } => {
                // Only an attested agent has a name to export; a UDP one would be an empty
                // series (and memory) per claimed pid.
                let info = match origin {
                    Origin::Uds { .. } => self.identities.get(pid).map(|id| id.label(*pid)),
                    Origin::Udp { .. } => None,
                };
                self.series.admit(*pid, info, m);
                // An evicted agent's series stay for the retention: a stall it surfaced
                // stays visible to the next scrapes.
                if let Some(old) = evicted {
                    m.evicted.inc();
                    self.series.went(*old, now_ns);
                }
            }
            Event::Critical { pid, .. } => {
                if self.series.has(*pid) {
                    m.criticals.get_or_create(&per_agent(*pid)).inc();
                }
            }
            Event::Exit { pid, .. } => {
                m.agent_exits.inc();
                if self.series.has(*pid) {
                    m.exits.get_or_create(&per_agent(*pid)).inc();
                }
                self.series.went(*pid, now_ns);
            }
            Event::Stall {
                pid,
                origin,
                started,
                ..
            } => {
                m.agent_stalls.inc();
                if self.series.has(*pid) {
                    m.stalls.get_or_create(&per_agent(*pid)).inc();
                    m.status
                        .get_or_create(&per_agent(*pid))
                        .set(Status::Stall as i64);
                }
                let local = matches!(origin, Origin::Uds { .. });
                self.series.stalled(*pid, *started, local, now_ns);
            }
            Event::Restarted { pid } => {
                self.series.live(*pid);
                m.restarts.inc();
            }
            Event::NonceWrapped { .. } => {
                m.nonce_wraps.inc();
            }
            Event::Recovery(Finished {
                outcome, reason, ..
            }) => {
                m.recovery_outcomes
                    .get_or_create(&OutcomeLabel {
                        outcome: outcome.name(),
                    })
                    .inc();
                // A recovery a limit (or an unknown agent, or a reused pid) kept from
                // running, or one refused.
                let reasons = match outcome {
                    Outcome::Suppressed => Some(&m.recovery_suppressed),
                    Outcome::Refused => Some(&m.recovery_refused),
                    _ => None,
                };
                if let (Some(reasons), Some(reason)) = (reasons, reason) {
                    reasons.get_or_create(&ReasonLabel { reason }).inc();
                }
            }
        }
    }
}
