//! The pipeline every beat takes after its datapath accepted it, whichever datapath that
//! is: namespace and pid_max gates, rate limits (unless the kernel applied them), the
//! tracker; and the stall deadlines. It produces [`Event`]s; `actions` acts on them.

pub mod gates;
pub mod stall;
pub mod tracker;
#[cfg(test)]
mod tracker_props;

use std::sync::Arc;

use varta_common::{DropReason, Status};

use crate::{
    config::{Config, Limits},
    observer::gates::Gates,
    observer::tracker::{Accepted, Stalled, Tracker},
    ratelimit::RateLimiter,
    sys::process::StartTime,
    vocab::beat::Beat,
    vocab::drops::DropCounters,
    vocab::events::Event,
};

pub struct Observer {
    tracker: Tracker,
    gates: Gates,
    /// For the beats no kernel filter rate-limited.
    limiter: RateLimiter,
    drops: Arc<DropCounters>,
    stalled: Vec<Stalled>,
}

impl Observer {
    pub fn new(config: &Config, drops: Arc<DropCounters>) -> Self {
        let mut tracker = Tracker::new(
            config.tracker_capacity,
            config.eviction,
            config.limits.threshold_ns(),
        );
        tracker.read_start_times(StartTime::of);
        tracker.read_uids(config.tracker_max_per_uid, crate::sys::process::uid_of);
        Observer {
            tracker,
            gates: Gates::new(),
            limiter: RateLimiter::new(config.limits.clone(), config.tracker_capacity),
            drops,
            stalled: Vec::new(),
        }
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub fn pid_max(&self) -> u32 {
        self.gates.pid_max()
    }

    pub fn set_limits(&mut self, limits: &Limits) {
        self.tracker.set_threshold_ns(limits.threshold_ns());
        self.limiter.set_limits(limits.clone());
    }

    /// The rate limits, for a beat no kernel filter limited: its own bucket, and the global
    /// one unless the agent is tracked already (fair admission).
    fn rate_limit(&mut self, beat: &Beat) -> Result<(), DropReason> {
        if beat.rate_limited {
            return Ok(());
        }
        let tracked = self.tracker.tracks(beat.pid, &beat.origin);
        self.limiter.check(beat.agent_key(), tracked, beat.recv_ns)
    }

    /// Runs one beat through the gates, the rate limits and the tracker; a refused beat is
    /// counted, and why returned.
    pub fn admit(&mut self, beat: &Beat, events: &mut Vec<Event>) -> Result<(), DropReason> {
        // Beats the kernel held for a live agent: admitted there, one by one, already.
        if beat.held > 0 && self.tracker.fold(beat.pid, &beat.frame, beat.recv_ns) {
            events.push(Event::Beat {
                pid: beat.pid,
                frame: beat.frame,
                recv_ns: beat.recv_ns,
                count: beat.held,
            });
            return Ok(());
        }
        let admitted = self.gates.check(beat).and_then(|()| self.rate_limit(beat));
        let accepted = admitted.and_then(|()| {
            self.tracker.record_attested(
                beat.pid,
                &beat.frame,
                beat.origin,
                beat.recv_ns,
                beat.sender,
            )
        });
        let accepted = match accepted {
            Ok(a) => a,
            Err(reason) => {
                self.drops.add(reason);
                return Err(reason);
            }
        };
        let (pid, frame) = (beat.pid, beat.frame);
        let known = !matches!(accepted, Accepted::New { .. } | Accepted::Replaced);
        let started = self.tracker.get(pid).and_then(|a| a.started);
        let new_agent = |evicted| Event::NewAgent {
            pid,
            frame_pid: frame.pid,
            origin: beat.origin,
            evicted,
            started,
        };
        match accepted {
            Accepted::New { evicted } => events.push(new_agent(evicted)),
            Accepted::Replaced => {
                events.push(Event::Replaced { pid });
                events.push(new_agent(None));
            }
            Accepted::Resumed => events.push(Event::Resumed { pid }),
            Accepted::Restarted => events.push(Event::Restarted { pid }),
            Accepted::Wrapped => events.push(Event::NonceWrapped { pid }),
            Accepted::Beat => {}
        }
        events.push(Event::Beat {
            pid,
            frame,
            recv_ns: beat.recv_ns,
            count: beat.count(),
        });
        if frame.is_panic_terminal() {
            events.push(Event::Exit {
                pid,
                frame,
                origin: beat.origin,
                known,
                started: self.tracker.get(pid).and_then(|a| a.started),
                beating_ns: self
                    .tracker
                    .get(pid)
                    .map_or(0, |a| beating_ns(a.first_beat_ns, a.last_beat_ns)),
            });
        } else if frame.status == Status::Critical {
            events.push(Event::Critical { pid, frame });
        }
        Ok(())
    }

    /// Takes back an agent of a previous instance (see [`Tracker::restore`]).
    pub fn restore(&mut self, agent: tracker::Restored) -> bool {
        self.tracker.restore(agent)
    }

    /// When the next stall may come due.
    pub fn next_deadline(&self) -> Option<u64> {
        self.tracker.next_deadline()
    }

    /// Moves deadlines of agents that beat since to their real ones: afterwards
    /// `next_deadline` is due only when a stall decision is.
    pub fn settle(&mut self, now_ns: u64) {
        self.tracker.settle(now_ns);
    }

    /// Surfaces the stalls due at `now_ns`.
    pub fn expire(&mut self, now_ns: u64, events: &mut Vec<Event>) {
        self.tracker.expire(now_ns, &mut self.stalled);
        for s in self.stalled.drain(..) {
            let silent_ms = now_ns.saturating_sub(s.agent.last_beat_ns) / 1_000_000;
            events.push(Event::Stall {
                pid: s.pid,
                last_nonce: s.agent.last_nonce,
                last_status: s.agent.status,
                origin: s.agent.origin,
                started: s.agent.started,
                silent_ms,
                beating_ns: beating_ns(s.agent.first_beat_ns, s.agent.last_beat_ns),
            });
        }
    }
}

/// How long an agent beat: u64::MAX when its first beat is unknown (taken over from a
/// previous instance, so established).
fn beating_ns(first_beat_ns: u64, last_beat_ns: u64) -> u64 {
    match first_beat_ns {
        0 => u64::MAX,
        first => last_beat_ns.saturating_sub(first),
    }
}
