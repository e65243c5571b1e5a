//! Every agent the observer knows: bounded, O(1) by pid, with the per-agent nonce rules,
//! the stall state machine and the eviction policies.
//!
//! Nonces: a beat must carry a nonce above the agent's last one (duplicates and replays are
//! dropped). After u64::MAX - 1 the nonce may wrap to 0. A beat with nonce 1 after a higher
//! nonce is a new session: accepted and counted as a restart. The panic-terminal frame
//! (Critical, nonce u64::MAX) marks the agent dead: no stall follows until it beats again in
//! a new session.
//!
//! An agent is a process, not a pid: its start time is recorded at its first beat, and a
//! beat that restarts, resumes or ends an agent is checked against it (`sys::process`).
//! From another process holding the pid now, it is a new agent (`Accepted::Replaced`): new
//! generation, fresh stall state, new start time.
//!
//! Bounds: at most `capacity` agents; a new agent when full evicts one by policy or is
//! dropped (`capacity`). The eviction queue holds at most one entry per agent (so at most
//! `capacity`); the deadline heap holds one entry per watched agent plus stale entries of
//! evicted agents, and is rebuilt from the agents when it passes twice the capacity.

use std::collections::{HashMap, VecDeque};

use varta_common::{DropReason, Frame, Status};

use crate::{
    config::cli::EvictionPolicy,
    observer::stall::{Entry, StallQueue},
    sys::process::{Continuity, StartTime},
    vocab::beat::{Origin, SenderStart},
};

/// Below this the nonce counts as wrapped around rather than replayed, when the last one
/// was within the same distance of u64::MAX.
const WRAP_WINDOW: u64 = 1 << 32;

#[derive(Debug, Clone)]
pub struct Agent {
    pub last_nonce: u64,
    pub last_beat_ns: u64,
    pub status: Status,
    pub origin: Origin,
    /// The pid in the agent's own frames (differs from the tracked pid across namespaces).
    pub frame_pid: u32,
    pub stalled: bool,
    /// Sent the panic-terminal frame.
    pub dead: bool,
    /// When the agent's process started, read at its first beat; `None` when it was gone
    /// by then, or for a UDP agent (whose pid is only a claim).
    pub started: Option<StartTime>,
    /// When this agent's first beat arrived (0: unknown, taken over from a previous
    /// instance): how long it has beaten tells an established agent from a one-shot one.
    pub first_beat_ns: u64,
    /// The uid of its process, read at its first beat (None for UDP or when gone): the
    /// tenant whose quota it counts against.
    pub uid: Option<u32>,
    generation: u64,
    queued: bool,
    /// Has an entry in the eviction queue.
    evictable: bool,
}

impl Agent {
    /// Not yet beating: [`Agent::take`] fills it in.
    fn new(generation: u64, origin: Origin, started: Option<StartTime>) -> Self {
        Agent {
            last_nonce: 0,
            last_beat_ns: 0,
            status: Status::Ok,
            origin,
            frame_pid: 0,
            stalled: false,
            dead: false,
            started,
            first_beat_ns: 0,
            uid: None,
            generation,
            queued: false,
            evictable: false,
        }
    }

    /// What `frame` does to this known agent under the nonce rules, or why it is refused.
    fn outcome_of(&self, frame: &Frame, origin: &Origin) -> Result<Accepted, DropReason> {
        if std::mem::discriminant(&self.origin) != std::mem::discriminant(origin) {
            return Err(DropReason::OriginConflict);
        }
        let outcome = if frame.nonce > self.last_nonce {
            Accepted::Beat
        } else if frame.nonce < WRAP_WINDOW
            && self.last_nonce >= u64::MAX - WRAP_WINDOW
            && self.last_nonce != u64::MAX
        {
            Accepted::Wrapped
        } else if frame.nonce == 1 && self.last_nonce > 1 {
            Accepted::Restarted
        } else {
            return Err(DropReason::Replay);
        };
        Ok(if self.stalled && outcome == Accepted::Beat {
            Accepted::Resumed
        } else {
            outcome
        })
    }

    /// Takes in an accepted beat.
    fn take(&mut self, frame: &Frame, origin: Origin, now_ns: u64) {
        self.last_nonce = frame.nonce;
        self.last_beat_ns = now_ns;
        self.status = frame.status;
        self.origin = origin;
        self.frame_pid = frame.pid;
        self.stalled = false;
        self.dead = frame.is_panic_terminal();
    }
}

/// `known` was only claimed over UDP and `now` is the kernel-attested local process.
fn claim_meets_attested(known: &Origin, now: &Origin) -> bool {
    matches!((known, now), (Origin::Udp { .. }, Origin::Uds { .. }))
}

/// Where an agent is in its life, for the aggregate that survives every per-agent bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Live = 0,
    Stalled = 1,
    Dead = 2,
}

impl AgentState {
    pub fn of(agent: &Agent) -> AgentState {
        if agent.dead {
            AgentState::Dead
        } else if agent.stalled {
            AgentState::Stalled
        } else {
            AgentState::Live
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AgentState::Live => "live",
            AgentState::Stalled => "stalled",
            AgentState::Dead => "dead",
        }
    }
}

/// What a beat did to the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A new agent; it may have taken the place of `evicted`.
    New {
        evicted: Option<u32>,
    },
    Beat,
    /// A beat from an agent surfaced as stalled: the stall is over.
    Resumed,
    /// Nonce 1 after a higher nonce: a new session of the same process.
    Restarted,
    /// Another process holds a tracked agent's pid and restarts, resumes or ends there: the
    /// old agent is gone, this is a new one.
    Replaced,
    /// The nonce wrapped past u64::MAX.
    Wrapped,
}

/// An agent a previous observer instance knew (from the pinned maps and the state file),
/// taken back in at start-up with its last beat and whether its stall was surfaced.
#[derive(Debug, Clone)]
pub struct Restored {
    pub pid: u32,
    pub origin: Origin,
    pub frame_pid: u32,
    pub last_beat_ns: u64,
    /// 0 when unknown: any nonce is then accepted as the next one.
    pub last_nonce: u64,
    pub status: Status,
    pub stalled: bool,
    pub dead: bool,
    pub started: Option<StartTime>,
}

/// An agent whose silence passed the threshold.
#[derive(Debug, Clone)]
pub struct Stalled {
    pub pid: u32,
    pub agent: Agent,
}

pub struct Tracker {
    /// Looked up once per beat: foldhash, seeded per process (SipHash was a tenth of the
    /// daemon's CPU at high rates), still not predictable from outside for UDP-claimed pids.
    agents: HashMap<u32, Agent, foldhash::quality::RandomState>,
    capacity: usize,
    policy: EvictionPolicy,
    threshold_ns: u64,
    deadlines: StallQueue,
    /// Stalled or dead agents, oldest first: the strict policy's eviction candidates.
    evictable: VecDeque<(u32, u64)>,
    next_generation: u64,
    /// Reads the start time of the process holding a pid (none unless set).
    start_time_of: StartTimeReader,
    /// Agents by state ([`AgentState`]), kept as they change: `varta_agents{state}`.
    counts: [usize; 3],
    /// Most agents of one uid (the quota), agents per uid, and each uid's stalled or dead
    /// agents oldest first (its own eviction candidates; entries may be stale).
    per_uid_max: usize,
    per_uid: HashMap<u32, usize>,
    evictable_by_uid: HashMap<u32, VecDeque<(u32, u64)>>,
    /// Reads the uid of the process holding a pid (none unless set).
    uid_of: Box<dyn FnMut(u32) -> Option<u32> + Send>,
}

type StartTimeReader = Box<dyn FnMut(u32) -> Option<StartTime> + Send>;

impl Tracker {
    pub fn new(capacity: usize, policy: EvictionPolicy, threshold_ns: u64) -> Self {
        Tracker {
            agents: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            capacity,
            policy,
            threshold_ns,
            deadlines: StallQueue::default(),
            evictable: VecDeque::new(),
            next_generation: 0,
            start_time_of: Box::new(|_| None),
            counts: [0; 3],
            per_uid_max: capacity,
            per_uid: HashMap::new(),
            evictable_by_uid: HashMap::new(),
            uid_of: Box::new(|_| None),
        }
    }

    /// Where agents' uids come from (`process::uid_of` in the daemon), and the most agents
    /// one uid may have tracked at once.
    pub fn read_uids(
        &mut self,
        per_uid_max: usize,
        read: impl FnMut(u32) -> Option<u32> + Send + 'static,
    ) {
        self.per_uid_max = per_uid_max.max(1);
        self.uid_of = Box::new(read);
    }

    /// Agents tracked for `uid`.
    pub fn of_uid(&self, uid: u32) -> usize {
        self.per_uid.get(&uid).copied().unwrap_or(0)
    }

    /// An agent became an eviction candidate: in the global queue and its uid's.
    fn push_evictable(&mut self, pid: u32, generation: u64, uid: Option<u32>) {
        self.evictable.push_back((pid, generation));
        if let Some(uid) = uid {
            let queue = self.evictable_by_uid.entry(uid).or_default();
            queue.push_back((pid, generation));
            // Stale entries (agents gone through the global queue) are dropped now and then.
            if queue.len() > 2 * self.per_uid.get(&uid).copied().unwrap_or(0) + 16 {
                let agents = &self.agents;
                queue.retain(|(p, g)| agents.get(p).is_some_and(|a| a.generation == *g));
            }
        }
    }

    /// Takes an agent out, keeping the counts.
    fn remove_agent(&mut self, pid: u32) -> Option<Agent> {
        let agent = self.agents.remove(&pid)?;
        self.counts[AgentState::of(&agent) as usize] -= 1;
        self.uncount_uid(agent.uid);
        Some(agent)
    }

    fn uncount_uid(&mut self, uid: Option<u32>) {
        if let Some(uid) = uid
            && let Some(n) = self.per_uid.get_mut(&uid)
        {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&uid);
                self.evictable_by_uid.remove(&uid);
            }
        }
    }

    /// Evicts the oldest stalled or dead agent of `uid`.
    fn evict_own(&mut self, uid: u32) -> Option<u32> {
        loop {
            let (pid, generation) = self.evictable_by_uid.get_mut(&uid)?.pop_front()?;
            if self
                .agents
                .get(&pid)
                .is_some_and(|a| a.generation == generation && (a.stalled || a.dead))
            {
                self.remove_agent(pid);
                return Some(pid);
            }
        }
    }

    /// Tracked agents by state: live, stalled, dead (sent the panic-terminal frame).
    pub fn counts(&self) -> [(AgentState, usize); 3] {
        [AgentState::Live, AgentState::Stalled, AgentState::Dead]
            .map(|s| (s, self.counts[s as usize]))
    }

    /// Where agents' process start times come from (`StartTime::of` in the daemon). Without
    /// it every beat under a pid is taken to come from one process.
    pub fn read_start_times(
        &mut self,
        read: impl FnMut(u32) -> Option<StartTime> + Send + 'static,
    ) {
        self.start_time_of = Box::new(read);
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether `pid` is tracked as an agent of the same transport as `origin`.
    pub fn tracks(&self, pid: u32, origin: &Origin) -> bool {
        self.agents
            .get(&pid)
            .is_some_and(|a| std::mem::discriminant(&a.origin) == std::mem::discriminant(origin))
    }

    pub fn get(&self, pid: u32) -> Option<&Agent> {
        self.agents.get(&pid)
    }

    /// Lengths of the eviction queue and the deadline heap (for the invariants' tests).
    #[cfg(test)]
    pub fn queue_lens(&self) -> (usize, usize) {
        (self.evictable.len(), self.deadlines.len())
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn agents(&self) -> impl Iterator<Item = (&u32, &Agent)> {
        self.agents.iter()
    }

    /// A new threshold (reload): every watched agent's deadline moves with it. O(agents),
    /// once per reload.
    pub fn set_threshold_ns(&mut self, threshold_ns: u64) {
        if threshold_ns == self.threshold_ns {
            return;
        }
        self.threshold_ns = threshold_ns;
        self.rebuild_deadlines();
    }

    /// The deadline heap anew from the agents: one entry per watched agent. O(agents).
    fn rebuild_deadlines(&mut self) {
        let threshold_ns = self.threshold_ns;
        self.deadlines = StallQueue::default();
        for (&pid, agent) in &mut self.agents {
            agent.queued = !agent.stalled && !agent.dead;
            if agent.queued {
                let entry = Entry {
                    deadline_ns: agent.last_beat_ns + threshold_ns,
                    pid,
                    generation: agent.generation,
                };
                self.deadlines.push(entry);
            }
        }
    }

    #[cfg(test)]
    pub fn record(
        &mut self,
        pid: u32,
        frame: &Frame,
        origin: Origin,
        now_ns: u64,
    ) -> Result<Accepted, DropReason> {
        self.record_attested(pid, frame, origin, now_ns, SenderStart::Unknown)
    }

    /// A beat of `pid`, whose sender started at `sender` (`Beat::sender`).
    pub fn record_attested(
        &mut self,
        pid: u32,
        frame: &Frame,
        origin: Origin,
        now_ns: u64,
        sender: SenderStart,
    ) -> Result<Accepted, DropReason> {
        let before = self.agents.get(&pid).map(AgentState::of);
        let known = self.agents.get(&pid).map(|agent| {
            (
                agent.outcome_of(frame, &origin),
                agent.started,
                claim_meets_attested(&agent.origin, &origin),
            )
        });
        let outcome = match known {
            Some((outcome, started, false))
                if self.another_process(pid, started, outcome, frame) =>
            {
                self.insert_new(pid, origin, sender);
                Accepted::Replaced
            }
            // A pid only claimed over UDP gives way to the process the kernel attests under
            // it: else a UDP claim could keep a local agent from ever being tracked (M7).
            Some((_, _, true)) => {
                self.insert_new(pid, origin, sender);
                Accepted::Replaced
            }
            Some((outcome, ..)) => outcome?,
            None => {
                let uid = match origin {
                    Origin::Uds { .. } => (self.uid_of)(pid),
                    Origin::Udp { .. } => None,
                };
                let evicted = self.make_room(uid)?;
                self.insert_new(pid, origin, sender);
                Accepted::New { evicted }
            }
        };
        let agent = self.agents.get_mut(&pid).expect("recorded above");
        if matches!(outcome, Accepted::New { .. } | Accepted::Replaced) {
            agent.first_beat_ns = now_ns;
        }
        agent.take(frame, origin, now_ns);
        if let Some(before) = before {
            self.counts[before as usize] -= 1;
        }
        self.counts[AgentState::of(agent) as usize] += 1;
        if agent.dead {
            if !agent.evictable {
                agent.evictable = true;
                let (generation, uid) = (agent.generation, agent.uid);
                self.push_evictable(pid, generation, uid);
            }
        } else if !agent.queued {
            agent.queued = true;
            self.deadlines.push(Entry {
                deadline_ns: now_ns + self.threshold_ns,
                pid,
                generation: agent.generation,
            });
            if self.deadlines.len() > 2 * self.capacity {
                self.rebuild_deadlines();
            }
        }
        Ok(outcome)
    }

    /// Beats the kernel held for `pid` (`varta_common::wakeup` rule 6), `frame` the latest:
    /// taken where they are later than what the ring brought (folded in after it, they may
    /// not be). `false` when the agent is not live here (unknown, stalled, dead): they are
    /// then taken like any beat.
    pub fn fold(&mut self, pid: u32, frame: &Frame, now_ns: u64) -> bool {
        let Some(agent) = self.agents.get_mut(&pid) else {
            return false;
        };
        if agent.stalled || agent.dead {
            return false;
        }
        if frame.nonce > agent.last_nonce {
            agent.last_nonce = frame.nonce;
            agent.status = frame.status;
        }
        agent.last_beat_ns = agent.last_beat_ns.max(now_ns);
        true
    }

    /// A new agent under `pid` (in place of the one there, if any).
    fn insert_new(&mut self, pid: u32, origin: Origin, sender: SenderStart) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let (started, uid) = match origin {
            Origin::Uds { .. } => self.read_sender(pid, sender),
            Origin::Udp { .. } => (None, None),
        };
        let mut agent = Agent::new(generation, origin, started);
        agent.uid = uid;
        if let Some(uid) = uid {
            *self.per_uid.entry(uid).or_default() += 1;
        }
        if let Some(old) = self.agents.insert(pid, agent) {
            self.uncount_uid(old.uid);
        }
    }

    /// The start time and uid of the process that beat as `pid`, from /proc, which shows
    /// whoever holds the pid now: the sender may have exited and its pid been reused since
    /// the beat. With the sender's start time known (`sender`), a process that started at
    /// another time is not the sender, and with the sender known to have exited none is
    /// (start time and uid unknown: the agent is never recovered while another process
    /// holds the pid, `Continuity::Reused`); the uid counts only when the pid still holds
    /// the same process after it was read.
    fn read_sender(&mut self, pid: u32, sender: SenderStart) -> (Option<StartTime>, Option<u32>) {
        let started = (self.start_time_of)(pid);
        let theirs = match sender {
            SenderStart::Exited => false,
            SenderStart::Unknown => true,
            SenderStart::Ticks(ticks) => started.is_some_and(|now| now.is_attested(ticks)),
        };
        if !theirs {
            return (None, None);
        }
        let uid = (self.uid_of)(pid);
        if (self.start_time_of)(pid) != started {
            return (started, None);
        }
        (started, uid)
    }

    /// Takes back an agent a previous instance tracked: watched from its last beat (due at
    /// once when that is a threshold ago), or stalled or dead as it was. `false` when full
    /// or already tracked.
    pub fn restore(&mut self, r: Restored) -> bool {
        if self.agents.len() >= self.capacity || self.agents.contains_key(&r.pid) {
            return false;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut agent = Agent::new(generation, r.origin, r.started);
        agent.last_nonce = r.last_nonce;
        agent.last_beat_ns = r.last_beat_ns;
        agent.status = r.status;
        agent.frame_pid = r.frame_pid;
        agent.stalled = r.stalled;
        agent.dead = r.dead;
        agent.uid = match r.origin {
            Origin::Uds { .. } => (self.uid_of)(r.pid),
            Origin::Udp { .. } => None,
        };
        if let Some(uid) = agent.uid {
            *self.per_uid.entry(uid).or_default() += 1;
        }
        if r.stalled || r.dead {
            agent.evictable = true;
            self.push_evictable(r.pid, generation, agent.uid);
        } else {
            agent.queued = true;
            self.deadlines.push(Entry {
                deadline_ns: r.last_beat_ns + self.threshold_ns,
                pid: r.pid,
                generation,
            });
        }
        self.counts[AgentState::of(&agent) as usize] += 1;
        self.agents.insert(r.pid, agent);
        true
    }

    /// Whether a beat that starts a session (nonce 1, a replay to the old agent if it had
    /// sent only that), resumes or ends a known UDS agent comes from another process than
    /// the agent's. One /proc read, only for those beats.
    fn another_process(
        &mut self,
        pid: u32,
        started: Option<StartTime>,
        outcome: Result<Accepted, DropReason>,
        frame: &Frame,
    ) -> bool {
        let checked = match outcome {
            Ok(Accepted::Resumed) => true,
            Ok(_) | Err(DropReason::Replay) => frame.nonce == 1 || frame.is_panic_terminal(),
            Err(_) => false,
        };
        checked
            && (self.agents.get(&pid)).is_some_and(|a| matches!(a.origin, Origin::Uds { .. }))
            && Continuity::of(started, (self.start_time_of)(pid)) == Continuity::Reused
    }

    /// Room for one more agent of `uid`: `Some(evicted pid)` when one had to go. Quotas
    /// bind only when the tracker is full (one user alone may use all of it): a uid at its
    /// quota then makes room only from its own stalled or dead agents (the policy decides
    /// when every agent is its own); a uid under it takes room from the largest uid over
    /// its quota (a stalled or dead agent, else the one silent longest), else from the uid
    /// with the most agents (stalled or dead), and only then does the policy decide.
    fn make_room(&mut self, uid: Option<u32>) -> Result<Option<u32>, DropReason> {
        if self.agents.len() < self.capacity {
            return Ok(None);
        }
        let mine = uid.map_or(0, |u| self.of_uid(u));
        if let Some(uid) = uid
            && mine >= self.per_uid_max
        {
            if let Some(evicted) = self.evict_own(uid) {
                return Ok(Some(evicted));
            }
            if mine < self.agents.len() {
                return Err(DropReason::Capacity);
            }
            return self.evict().map(Some).ok_or(DropReason::Capacity);
        }
        let largest = (self.per_uid.iter())
            .filter(|(u, n)| Some(**u) != uid && **n > mine)
            .max_by_key(|(_, n)| **n)
            .map(|(u, n)| (*u, *n));
        if let Some((big, n)) = largest {
            if let Some(evicted) = self.evict_own(big) {
                return Ok(Some(evicted));
            }
            if n > self.per_uid_max
                && let Some(evicted) = self.evict_silent_longest(big)
            {
                return Ok(Some(evicted));
            }
        }
        self.evict().map(Some).ok_or(DropReason::Capacity)
    }

    /// Evicts the agent of `uid` silent longest (one pass over the agents: only for a uid
    /// over its quota when another uid's agent needs the room).
    fn evict_silent_longest(&mut self, uid: u32) -> Option<u32> {
        let pid = (self.agents.iter())
            .filter(|(_, a)| a.uid == Some(uid))
            .min_by_key(|(_, a)| a.last_beat_ns)
            .map(|(pid, _)| *pid)?;
        self.remove_agent(pid);
        Some(pid)
    }

    /// When the earliest stall may come due, if any agent is being watched.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.peek().map(|e| e.deadline_ns)
    }

    /// Moves the deadlines that came due at `now_ns` for agents that beat since to their real
    /// deadline, decides nothing: afterwards [`Self::next_deadline`] is due only when a stall
    /// decision is (the datapath is drained before one: `varta_common::wakeup` rule 3, which
    /// costs a full drain of a socket a flood keeps full).
    pub fn settle(&mut self, now_ns: u64) {
        while let Some(entry) = self.deadlines.pop_due(now_ns) {
            let threshold = self.threshold_ns;
            let Some(agent) = self.live(entry) else {
                continue;
            };
            let deadline = agent.last_beat_ns + threshold;
            if agent.stalled || agent.dead || deadline <= now_ns {
                // Due (or left for `expire` to unqueue): put back, decided by `expire`.
                self.deadlines.push(entry);
                return;
            }
            self.deadlines.push(Entry {
                deadline_ns: deadline,
                ..entry
            });
        }
    }

    /// Surfaces every agent whose silence passed the threshold at `now_ns`, once per silence.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Stalled>) {
        while let Some(entry) = self.deadlines.pop_due(now_ns) {
            let threshold = self.threshold_ns;
            let Some(agent) = self.live(entry) else {
                continue;
            };
            agent.queued = false;
            if agent.stalled || agent.dead {
                continue;
            }
            let deadline = agent.last_beat_ns + threshold;
            if deadline > now_ns {
                agent.queued = true;
                self.deadlines.push(Entry {
                    deadline_ns: deadline,
                    ..entry
                });
                continue;
            }
            agent.stalled = true;
            let stalled = Stalled {
                pid: entry.pid,
                agent: agent.clone(),
            };
            let uid = agent.uid;
            let push = !agent.evictable;
            agent.evictable = true;
            if push {
                self.push_evictable(entry.pid, entry.generation, uid);
            }
            self.counts[AgentState::Live as usize] -= 1;
            self.counts[AgentState::Stalled as usize] += 1;
            out.push(stalled);
        }
    }

    fn live(&mut self, entry: Entry) -> Option<&mut Agent> {
        self.agents
            .get_mut(&entry.pid)
            .filter(|a| a.generation == entry.generation)
    }

    /// Makes room for one agent, by policy; the evicted pid.
    fn evict(&mut self) -> Option<u32> {
        while let Some((pid, generation)) = self.evictable.pop_front() {
            let Some(agent) = self
                .agents
                .get_mut(&pid)
                .filter(|a| a.generation == generation)
            else {
                continue;
            };
            agent.evictable = false;
            if agent.stalled || agent.dead {
                self.remove_agent(pid);
                return Some(pid);
            }
        }
        if self.policy == EvictionPolicy::Strict {
            return None;
        }
        // Balanced: the agent silent longest. Entries may sit early (beats do not move
        // them): refresh the earliest until it is exact, then it is the true oldest.
        while let Some(entry) = self.deadlines.pop() {
            let threshold = self.threshold_ns;
            let Some(agent) = self.live(entry) else {
                continue;
            };
            let deadline = agent.last_beat_ns + threshold;
            if deadline != entry.deadline_ns {
                self.deadlines.push(Entry {
                    deadline_ns: deadline,
                    ..entry
                });
                continue;
            }
            self.remove_agent(entry.pid);
            return Some(entry.pid);
        }
        None
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "tracker_pid_tests.rs"]
mod pid_tests;
