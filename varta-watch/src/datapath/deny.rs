//! Which senders the userspace datapath keeps out of its Unix socket's queue. A Unix
//! datagram queue has no share per sender: a few processes sending as fast as they can
//! (blocking) take every place the daemon frees, and an honest agent's nonblocking send
//! finds it full. The eBPF datapath drops such a sender's surplus before it is queued; here
//! the classic filter denies its pid (`varta_common::cbpf`, `cbpf::Layout::deny`) once its
//! beats come faster than [`DENY_OVER_RATE`] times its rate: the beats the observer refused
//! over that rate, and while the queue is mostly full every beat (the senders filling it are
//! the ones to deny, before each has spent its burst there). It lets one back when the
//! samples the filter still lets up ([`DENIED_SAMPLE_ONE_IN`]) say it has slowed below that
//! for a [`WINDOW_NS`].
//!
//! The filter sees the pid a frame claims, not its sender: only senders in the daemon's pid
//! namespace are denied (there the claimed pid is the sender's own; a container's agents
//! claim namespace pids another container's agents share), never a pid a known container
//! process claims too (the datapath asks its attestation cache), and a sample from another
//! sender claiming a denied pid lifts the denial at once.

use std::collections::HashMap;

use varta_common::{
    DropReason,
    cbpf::{DENIED_SAMPLE_ONE_IN, DENY_OVER_RATE, MAX_DENIED},
    ratelimit::{Limit, is_full},
};

use crate::vocab::drops::DropCounters;

/// Refusals at more than [`DENY_OVER_RATE`] times the rate, in a row, that deny.
const DENY_AFTER: u32 = 10;

/// How long a denied sender's samples are counted before it is judged again.
const WINDOW_NS: u64 = 1_000_000_000;

/// Most senders whose refusals are followed at once (past it, the ones whose refusals have
/// slowed are forgotten first).
const MAX_FOLLOWED: usize = 4 * MAX_DENIED;

#[derive(Debug)]
pub struct DenyList {
    /// The per-agent rate, beats a second.
    rate: u32,
    /// The refusals a sender may have: [`DENY_OVER_RATE`] times the per-agent rate, [`DENY_AFTER`]
    /// deep. `None`: no per-agent rate, nobody refused over it.
    refusals: Option<Limit>,
    /// Each followed sender's refusal bucket clock, by pid.
    followed: HashMap<u32, u64>,
    denied: HashMap<u32, Denied>,
    /// The denied pids changed since the filter was last built.
    changed: bool,
    /// Refusals and estimated drops this list accounts for: not a flood the daemon must
    /// pace itself against (`Pace`).
    handled: u64,
    /// When the denials are next judged (they are judged a window apart at most).
    next_judge_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Denied {
    /// Since when its samples are counted: from when its filter was attached, `None` until
    /// then (what it sent before was queued as any frame is, and is not a sample).
    since_ns: Option<u64>,
    samples: u64,
}

/// What a frame of a denied pid that reached the daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Not denied.
    No,
    /// A sample: it stands for [`DENIED_SAMPLE_ONE_IN`] frames, one of them this one (the
    /// others are counted dropped over the rate, estimates).
    Yes,
    /// From a sender other than the denied one (another pid namespace): the denial is lifted.
    OtherSender,
}

impl DenyList {
    pub fn new(per_agent_rate: u32) -> Self {
        DenyList {
            rate: per_agent_rate,
            refusals: Self::limit(per_agent_rate),
            followed: HashMap::new(),
            denied: HashMap::new(),
            changed: false,
            handled: 0,
            next_judge_ns: 0,
        }
    }

    fn limit(per_agent_rate: u32) -> Option<Limit> {
        match per_agent_rate {
            0 => None,
            rate => Limit::new(rate.saturating_mul(DENY_OVER_RATE), DENY_AFTER),
        }
    }

    pub fn set_rate(&mut self, per_agent_rate: u32) {
        self.rate = per_agent_rate;
        self.refusals = Self::limit(per_agent_rate);
        if self.refusals.is_none() && !self.denied.is_empty() {
            self.denied.clear();
            self.changed = true;
        }
    }

    /// The observer refused a beat of `pid` (its own pid, in the daemon's namespace) over
    /// its rate, arrived at `now_ns`.
    pub fn refused(&mut self, pid: u32, now_ns: u64) {
        if self.refusals.is_some() {
            self.handled += 1;
            self.follow(pid, now_ns);
        }
    }

    /// A beat of `pid` arrived at `now_ns` in a queue found mostly full.
    pub fn crowded(&mut self, pid: u32, now_ns: u64) {
        self.follow(pid, now_ns);
    }

    /// Denies `pid` when its beats (those followed) come too fast.
    fn follow(&mut self, pid: u32, now_ns: u64) {
        let Some(limit) = self.refusals else { return };
        if self.denied.contains_key(&pid) {
            return;
        }
        if self.followed.len() >= MAX_FOLLOWED {
            self.followed.retain(|_, tat| !is_full(*tat, now_ns));
            if self.followed.len() >= MAX_FOLLOWED {
                return;
            }
        }
        let tat = self.followed.entry(pid).or_insert(0);
        if !limit.take(tat, now_ns) && self.denied.len() < MAX_DENIED {
            self.followed.remove(&pid);
            self.denied.insert(
                pid,
                Denied {
                    since_ns: None,
                    samples: 0,
                },
            );
            self.changed = true;
        }
    }

    /// The classic filter denying [`Self::pids`] was attached at `now_ns`: the samples of
    /// the pids it denies for the first time count from then on.
    pub fn attached(&mut self, now_ns: u64) {
        for denied in self.denied.values_mut() {
            denied.since_ns.get_or_insert(now_ns);
        }
    }

    /// A frame claiming `frame_pid`, sent by `sender`, queued by the kernel at
    /// `arrived_ns`, reached the daemon.
    pub fn sample(
        &mut self,
        frame_pid: u32,
        sender: u32,
        arrived_ns: u64,
        drops: &DropCounters,
    ) -> Sample {
        let Some(denied) = self.denied.get_mut(&frame_pid) else {
            return Sample::No;
        };
        if sender != frame_pid {
            self.denied.remove(&frame_pid);
            self.changed = true;
            return Sample::OtherSender;
        }
        // Queued before its filter was attached: any frame, not one standing for 1,024 (a
        // queue of 513 such frames counted as samples added half a million drops).
        if denied.since_ns.is_none_or(|since| arrived_ns < since) {
            return Sample::No;
        }
        denied.samples += 1;
        let dropped = u64::from(DENIED_SAMPLE_ONE_IN - 1);
        drops.add_n(DropReason::RatePerPid, dropped);
        self.handled += dropped;
        Sample::Yes
    }

    /// Lifts the denials whose samples over a window say the sender slowed below
    /// [`DENY_OVER_RATE`] times the rate.
    pub fn judge(&mut self, now_ns: u64) {
        if now_ns < self.next_judge_ns {
            return;
        }
        // Each denial a window after it began, within a tenth of one.
        self.next_judge_ns = now_ns + WINDOW_NS / 10;
        // Frames a window at that rate (WINDOW_NS is a second).
        let over = u64::from(self.rate) * u64::from(DENY_OVER_RATE);
        let before = self.denied.len();
        self.denied.retain(|_, d| {
            let Some(since_ns) = d.since_ns else {
                return true;
            };
            if now_ns.saturating_sub(since_ns) < WINDOW_NS {
                return true;
            }
            let flooding = d.samples * u64::from(DENIED_SAMPLE_ONE_IN) >= over;
            *d = Denied {
                since_ns: Some(now_ns),
                samples: 0,
            };
            flooding
        });
        self.changed |= self.denied.len() != before;
    }

    /// The process `pid` exited: its pid may be anyone's next.
    pub fn forget(&mut self, pid: u32) {
        self.followed.remove(&pid);
        self.changed |= self.denied.remove(&pid).is_some();
    }

    /// Whether the denied pids changed since the last call.
    pub fn take_change(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The denied pids, in order.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.denied.keys().copied().collect();
        pids.sort_unstable();
        pids
    }

    /// Refusals and estimated drops so far that the list accounts for.
    pub fn handled(&self) -> u64 {
        self.handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// `pid` refused at 100,000 a second from `from_ns` on, past the bucket's depth.
    fn refused_past_the_limit(list: &mut DenyList, pid: u32, from_ns: u64) {
        for i in 0..=u64::from(DENY_AFTER) {
            list.refused(pid, from_ns + i * 10_000);
        }
    }

    /// The denied pids, if they changed since the last call.
    fn change(list: &mut DenyList) -> Option<Vec<u32>> {
        list.take_change().then(|| list.pids())
    }

    #[test]
    fn refusals_at_ten_times_the_rate_deny() {
        let mut list = DenyList::new(100);
        // Refused at 500 a second (5x): never denied.
        for i in 0..1000 {
            list.refused(7, i * 2 * MS);
        }
        assert_eq!(change(&mut list), None);
        // Faster: denied past the bucket's depth.
        let t = 3000 * MS;
        refused_past_the_limit(&mut list, 8, t);
        assert_eq!(change(&mut list), Some(vec![8]));
        assert_eq!(change(&mut list), None);
        assert_eq!(list.handled(), 1000 + u64::from(DENY_AFTER) + 1);
    }

    #[test]
    fn a_denied_sender_is_let_back_when_its_samples_slow() {
        let (mut list, drops) = (DenyList::new(100), DropCounters::default());
        refused_past_the_limit(&mut list, 8, 0);
        let _ = change(&mut list);
        list.attached(MS);
        // Samples standing for 1,000 frames in the window (10x) keep it denied...
        let keep = u64::from(100 * DENY_OVER_RATE).div_ceil(u64::from(DENIED_SAMPLE_ONE_IN));
        for _ in 0..keep {
            assert_eq!(list.sample(8, 8, 2 * MS, &drops), Sample::Yes);
        }
        let dropped = drops.snapshot()[DropReason::RatePerPid.index()];
        assert_eq!(dropped, keep * u64::from(DENIED_SAMPLE_ONE_IN - 1));
        list.judge(WINDOW_NS / 2);
        list.judge(WINDOW_NS + 10 * MS);
        let t = WINDOW_NS + 20 * MS;
        assert_eq!(change(&mut list), None);
        // ...one fewer in the next window does not.
        for _ in 1..keep {
            list.sample(8, 8, t, &drops);
        }
        list.judge(2 * WINDOW_NS + 10 * MS);
        assert_eq!(change(&mut list), Some(vec![]));
        assert_eq!(list.sample(8, 8, t, &drops), Sample::No);
    }

    #[test]
    fn what_a_denied_sender_queued_before_its_filter_is_no_sample() {
        let (mut list, drops) = (DenyList::new(100), DropCounters::default());
        refused_past_the_limit(&mut list, 8, 0);
        let _ = change(&mut list);
        assert_eq!(list.sample(8, 8, MS, &drops), Sample::No, "no filter yet");
        list.attached(5 * MS);
        assert_eq!(
            list.sample(8, 8, 4 * MS, &drops),
            Sample::No,
            "queued before"
        );
        assert_eq!(list.sample(8, 8, 5 * MS, &drops), Sample::Yes);
        let dropped = drops.snapshot()[DropReason::RatePerPid.index()];
        assert_eq!(dropped, u64::from(DENIED_SAMPLE_ONE_IN - 1));
        // Another denial later leaves the first one's start as it was.
        refused_past_the_limit(&mut list, 9, 6 * MS);
        list.attached(7 * MS);
        assert_eq!(list.sample(8, 8, 6 * MS, &drops), Sample::Yes);
        assert_eq!(list.sample(9, 9, 6 * MS, &drops), Sample::No);
    }

    #[test]
    fn another_sender_claiming_the_pid_or_its_exit_lifts_the_denial() {
        let (mut list, drops) = (DenyList::new(100), DropCounters::default());
        for pid in [8, 9] {
            refused_past_the_limit(&mut list, pid, 0);
        }
        assert_eq!(change(&mut list), Some(vec![8, 9]));
        assert_eq!(list.sample(8, 4321, 0, &drops), Sample::OtherSender);
        list.forget(9);
        assert_eq!(change(&mut list), Some(vec![]));
    }

    #[test]
    fn no_rate_denies_nobody() {
        let mut list = DenyList::new(0);
        for i in 0..10_000 {
            list.refused(8, i);
        }
        assert_eq!(change(&mut list), None);
        assert_eq!(list.handled(), 0);
    }
}
