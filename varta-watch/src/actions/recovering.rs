//! The recovery output: which events start a recovery command, the stalls whose recovery
//! waits for a budget to free, and the audit file of what ran. What a recovery that did not
//! run becomes is a follow-up event ([`Event::Recovery`]) the other outputs receive too.

use crate::{
    actions::{Actions, Pending, recovery::Who},
    sys::process::StartTime,
    vocab::{
        beat::Origin,
        events::Event,
        recovery::{Finished, NotRun, Outcome},
    },
};

/// At most this many stalls wait for a retry (one per agent); more are only suppressed.
const MAX_PENDING: usize = 4096;

/// The suppressions that end when a budget frees.
pub(super) fn retryable(reason: &str) -> bool {
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
    /// Acts on `event`: a stall or a known agent's exit starts its recovery; an agent that
    /// is no longer the one stalled has nothing to retry.
    pub(super) fn recover_on(&mut self, event: &Event, now_ns: u64, follow_ups: &mut Vec<Event>) {
        match event {
            Event::NewAgent { pid, evicted, .. } => {
                for gone in evicted.iter().chain([pid]) {
                    self.not_stalled(*gone);
                }
            }
            Event::Resumed { pid } | Event::Restarted { pid } => self.not_stalled(*pid),
            Event::Exit {
                pid,
                origin,
                known,
                started,
                beating_ns,
                ..
            } => {
                self.not_stalled(*pid);
                // Its first frame is its death: nothing ever beat there to be recovered, and
                // anyone can send that frame; surfaced, not acted on.
                match known {
                    true => {
                        let who = self.who(*pid, *beating_ns);
                        self.recover(*pid, *origin, *started, who, false, now_ns, follow_ups)
                    }
                    false if self.recovery.is_some() => {
                        not_run(*pid, Outcome::Suppressed, "unknown_agent", follow_ups)
                    }
                    false => {}
                }
            }
            Event::Stall {
                pid,
                origin,
                started,
                beating_ns,
                ..
            } => {
                let who = self.who(*pid, *beating_ns);
                self.not_stalled(*pid);
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
            Event::Recovery(finished) => {
                if let Some(audit) = &mut self.audit {
                    audit.finished(now_ns.saturating_sub(self.start_ns), finished);
                }
            }
            Event::Beat { .. }
            | Event::Critical { .. }
            | Event::Replaced { .. }
            | Event::NonceWrapped { .. } => {}
        }
    }

    /// Tries the waiting recoveries again, established agents first.
    pub(super) fn retry_pending(&mut self, now_ns: u64, follow_ups: &mut Vec<Event>) {
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

    /// Whose recovery it is: the agent's uid and pod, and whether it has a history.
    fn who(&self, pid: u32, beating_ns: u64) -> Who {
        let pod = self
            .identities
            .get(&pid)
            .filter(|id| !id.pod_uid.is_empty())
            .map(|id| {
                let mut h = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(&id.pod_uid, &mut h);
                std::hash::Hasher::finish(&h)
            });
        Who {
            uid: self.uids.get(&pid).copied(),
            pod,
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
        origin: Origin,
        started: Option<StartTime>,
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
                crate::sys::logger::event!(
                    info,
                    "recovery_started",
                    pid = pid,
                    child = child,
                    uid = who.uid,
                    established = who.established,
                    retried = retry,
                );
                if let (Some(audit), Some(child)) = (&mut self.audit, child) {
                    audit.spawned(now_ns.saturating_sub(self.start_ns), pid, child);
                }
            }
            Err(NotRun::Debounced) => follow_ups.push(Event::Recovery(Finished {
                pid,
                outcome: Outcome::Debounced,
                detail: "within --recovery-debounce-ms".into(),
                reason: None,
                run: None,
            })),
            Err(NotRun::Suppressed(reason)) => {
                not_run(pid, Outcome::Suppressed, reason, follow_ups)
            }
            Err(NotRun::Refused(reason)) => not_run(pid, Outcome::Refused, reason, follow_ups),
        }
    }
}

/// A recovery refused or suppressed for `reason`: an event the outputs count and log.
fn not_run(pid: u32, outcome: Outcome, reason: &'static str, follow_ups: &mut Vec<Event>) {
    follow_ups.push(Event::Recovery(Finished {
        pid,
        outcome,
        detail: reason.into(),
        reason: Some(reason),
        run: None,
    }));
}
