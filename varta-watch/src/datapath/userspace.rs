//! The userspace datapath: `recvmmsg(2)` on the UDS (with SCM_CREDENTIALS) and the UDP
//! socket, the full VLP decode, and sender attestation. Every wake-up drains every socket
//! until it would block or its budget is spent (`DRAIN_BUDGET`; the rest on the next round,
//! without waiting), so neither a junk flood nor a busy socket starves the other or holds
//! the event loop. The UDS is drained last, right before the stall decisions that follow.
//! When it wakes is rule 5 of `varta_common::wakeup` ([`Pace`]): on each datagram while
//! beats are urgent or few, on a drain timer while they come in routine batches. Each beat
//! carries its arrival time from the kernel, never the time it was drained. Senders far
//! over their rate are kept out of the Unix socket's queue by its classic filter
//! ([`DenyList`]), so a valid flood does not fill it for the honest agents.

use crate::sys::logger::event;
use foldhash::fast::RandomState;
use std::{
    collections::HashMap,
    io,
    os::{fd::AsFd, unix::net::UnixDatagram},
    sync::Arc,
};

use varta_common::{
    DropReason, Frame, cbpf,
    frame::{SECURE_FRAME_LENS, Status, UDP_HEADER_LEN},
    wakeup,
};

use super::{
    Datapath,
    attest::{Attestation, Attested, Bound, bound_sender},
    decode_plain,
    deny::DenyList,
    udp::UdpReceiver,
};
use crate::{
    config::Limits,
    sys::clock::ClockSource,
    sys::deadline::DeadlineTimer,
    sys::pidfd::ExitWatcher,
    sys::procfs::Sender,
    sys::readiness::Switchable,
    sys::recv::RecvBatch,
    sys::sock,
    vocab::beat::{Beat, Origin, SenderStart},
    vocab::drops::DropCounters,
};

const BATCH: usize = 64;

pub struct UserspaceDatapath {
    uds: Switchable<UnixDatagram>,
    udp: Option<UdpReceiver>,
    batch: RecvBatch,
    clock: ClockSource,
    drops: Arc<DropCounters>,
    attest: Attestor,
    /// The last UDS drain stopped at its budget: more may be queued.
    uds_more: bool,
    junk: JunkCounting,
    deny: DenyList,
    pace: Pace,
    /// The senders whose beats are routine, with the status of their last beat (the
    /// userspace counterpart of the kernel's buckets in rule 1): a pid's first beat is
    /// urgent, and its first after a stall or exit (rule 4), and any changing its status.
    /// Looked up once per beat, as `Attestor::senders`: foldhash, seeded per process.
    seen: HashMap<u32, Status, RandomState>,
    timer: DeadlineTimer,
}

/// Rule 5 of `varta_common::wakeup`: whether the daemon waits on the sockets' readiness or
/// on its drain timer, decided after each wake-up's drain.
struct Pace {
    /// Datagrams the smallest of the sockets' queues holds.
    queue_limit: u64,
    /// Draining on the timer, next at this time; `None`: waiting on readiness.
    next_drain_ns: Option<u64>,
    /// When the last wake-up drained (timer), or since when `routine` counts (readiness).
    since_ns: u64,
    /// Routine datagrams received since `since_ns`, while waiting on readiness.
    routine: u64,
    /// Datagrams the last wake-up took, and the frames refused by then (but those the deny
    /// list answers): when most of what came in since was refused (the tracker full, a
    /// spoof...), the queue is full of a flood.
    taken: u64,
    refused: u64,
    /// The last decision found a flood: drained at the longest interval, a bounded part at
    /// each tick ([`Pace::flood_budget`]).
    flood: bool,
    /// The longest interval the bursts seen allow.
    burst: wakeup::BurstCap,
}

/// Frames refused so far, for any reason (over a rate, the tracker full, a spoof...).
fn refused(drops: &DropCounters) -> u64 {
    drops.snapshot().iter().sum()
}

impl Pace {
    /// What a tick takes under a flood: two `recvmmsg` batches, whatever the queue holds
    /// (the flooders refill it while it is read). Each datagram read from a full queue wakes
    /// every sender waiting on it, at the reader's cost (~10 us a datagram with 256 waiting):
    /// 12,800 datagrams a second bound that cost, and honest senders waiting among the
    /// flooders still win their share of the room each tick frees (~50 frames a second
    /// each with 256 flooders; half a queue of 10, 500 a second for all, left them behind).
    fn flood_budget(&self) -> usize {
        2 * BATCH
    }

    fn new(queue_limit: u64) -> Self {
        Pace {
            queue_limit,
            next_drain_ns: None,
            since_ns: 0,
            routine: 0,
            taken: 0,
            refused: 0,
            flood: false,
            burst: wakeup::BurstCap::default(),
        }
    }

    /// After a wake-up took `taken` datagrams (`urgent`: among them a beat that changes an
    /// agent's state), `refused` frames refused so far: how the next one comes.
    fn after_drain(&mut self, now: u64, taken: u64, urgent: bool, refused: u64) {
        // A flood lasts while its ticks find the queue still full (they take only part of
        // it), or while most of what the last drain took was refused.
        let flood = (self.flood && taken >= self.flood_budget() as u64)
            || (self.taken >= wakeup::BATCH_MIN_BEATS && (refused - self.refused) * 2 > self.taken);
        (self.taken, self.refused) = (taken, refused);
        let elapsed = now.saturating_sub(self.since_ns);
        // A flood is meant to fill the queue (its senders wait); anything else must fit.
        if self.next_drain_ns.is_some() && !flood {
            self.burst
                .after_timer_drain(now, elapsed, taken, self.queue_limit);
        }
        let batched = match self.next_drain_ns {
            _ if urgent => None,
            // On the timer: go on while a drain still takes a batch.
            Some(_) if taken * 2 >= wakeup::BATCH_MIN_BEATS => Some(taken),
            Some(_) => None,
            None => {
                if elapsed > wakeup::USERSPACE_MAX_INTERVAL_NS {
                    (self.since_ns, self.routine) = (now, 0);
                }
                self.routine += taken;
                (self.routine >= wakeup::BATCH_MIN_BEATS).then_some(self.routine)
            }
        };
        self.flood = flood && batched.is_some();
        self.next_drain_ns = batched.and_then(|n| {
            let elapsed = now.saturating_sub(self.since_ns).max(1);
            let rate = n.saturating_mul(1_000_000_000) / elapsed;
            let interval = wakeup::userspace_interval_ns(rate, self.queue_limit, flood);
            let interval = if flood {
                interval
            } else {
                self.burst.apply(now, interval)
            };
            Some(now + interval?)
        });
        if batched.is_some() || urgent {
            (self.since_ns, self.routine) = (now, 0);
        }
    }
}

/// How junk is counted: every junk frame reaches the daemon and is counted exactly while
/// junk is rare; under a flood the classic filter lets one in `sample_one_in` through and
/// the counts are estimates (each sample counts as `sample_one_in`), so the flood costs the
/// daemon no wake-ups. Above [`JUNK_FLOOD`] frames a second the filter samples; below
/// [`JUNK_QUIET`] (estimated) for [`QUIET_WINDOWS`] seconds in a row it counts exactly again.
struct JunkCounting {
    sample_one_in: u32,
    sampling: bool,
    window_start: std::time::Instant,
    counted_at_start: u64,
    quiet_windows: u32,
}

const JUNK_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
const JUNK_FLOOD: u64 = 1000;
const JUNK_QUIET: u64 = 100;
const QUIET_WINDOWS: u32 = 10;

impl UserspaceDatapath {
    pub fn new(
        uds: UnixDatagram,
        mut udp: Option<UdpReceiver>,
        clock: ClockSource,
        allow_cross_namespace: bool,
        junk_sample_one_in: u32,
        per_agent_rate: u32,
        drops: Arc<DropCounters>,
    ) -> io::Result<Self> {
        // Exact until junk floods (an operator chasing one broken client sees each frame).
        let junk = JunkCounting::new(junk_sample_one_in);
        attach_filters(&uds, udp.as_ref(), &junk, &[]);
        drops.set_junk_scale(junk.one_in(), clock.now_ns());
        // Required, not best effort: the control buffer leaves room for a descriptor a
        // sender attaches when the time is not there (`sys::recv`).
        sock::stamp_arrivals(uds.as_fd())?;
        let mut queue_limit = sock::uds_queue_limit();
        if let Some(udp) = &mut udp {
            udp.stamp_arrivals()?;
            udp.count_overflow()?;
            queue_limit = queue_limit.min(udp.queue_limit()?.max(1));
        }
        event!(info, "receive_pace", queue_limit = queue_limit);
        Ok(UserspaceDatapath {
            uds: Switchable::new(uds)?,
            udp,
            batch: RecvBatch::without_sources(BATCH),
            clock,
            drops,
            attest: Attestor::new(Attestation::new(allow_cross_namespace), clock),
            uds_more: false,
            junk,
            deny: DenyList::new(per_agent_rate),
            pace: Pace::new(queue_limit),
            seen: HashMap::default(),
            timer: DeadlineTimer::new(clock)?,
        })
    }

    /// Once a window: switches between exact and sampled junk counting by the junk rate.
    /// A flood is caught as soon as its window's count passes [`JUNK_FLOOD`], not at the
    /// window's end: counted exactly, every junk frame takes a place in the queue, and a
    /// full queue refuses the honest senders' frames (lost, from nonblocking clients).
    fn adapt_junk_counting(&mut self) {
        let j = &mut self.junk;
        if j.sample_one_in <= 1 {
            return;
        }
        let counted = self.drops.junk_counted();
        let per_window = counted - j.counted_at_start;
        let flooding = !j.sampling && per_window > JUNK_FLOOD;
        let elapsed = j.window_start.elapsed();
        if elapsed < JUNK_WINDOW && !flooding {
            return;
        }
        let per_s = per_window * 1000 / (elapsed.as_millis() as u64).max(1);
        j.window_start = std::time::Instant::now();
        j.counted_at_start = counted;
        let switch = if j.sampling {
            j.quiet_windows = if per_window < JUNK_QUIET {
                j.quiet_windows + 1
            } else {
                0
            };
            j.quiet_windows >= QUIET_WINDOWS
        } else {
            per_window > JUNK_FLOOD
        };
        if switch {
            let sampling = !j.sampling;
            j.sampling = sampling;
            j.quiet_windows = 0;
            let since = self.refilter(true);
            self.drops.set_junk_scale(self.junk.one_in(), since);
            event!(
                info,
                "junk_counting",
                mode = if sampling { "sampled" } else { "exact" },
                junk_per_s = per_s,
                sample_one_in = self.drops.junk_scale(),
            );
        }
    }

    /// Receives from the Unix socket until it would block or `budget` datagrams were taken;
    /// returns how many it took.
    fn drain_uds(&mut self, out: &mut Vec<Beat>, budget: usize) -> io::Result<usize> {
        let (attest, drops, deny) = (&mut self.attest, &self.drops, &mut self.deny);
        let taken;
        (self.uds_more, taken) =
            self.batch
                .drain(self.uds.get_ref().as_fd(), self.clock, budget, |d, at| {
                    let beat = decode_plain(d.bytes, d.truncated).and_then(|frame| {
                        attest.check(d.sender_pid, at, &frame).map(
                            |(
                                Attested {
                                    pid,
                                    cross_namespace,
                                },
                                sender,
                            )| Beat {
                                pid,
                                frame,
                                origin: Origin::Uds { cross_namespace },
                                recv_ns: at,
                                rate_limited: false,
                                sender,
                                held: 0,
                            },
                        )
                    });
                    match beat {
                        Ok(beat) => {
                            deny.sample(beat.frame.pid, beat.pid, at, drops);
                            out.push(beat)
                        }
                        // What the classic filter may sample.
                        Err(reason @ (DropReason::Length | DropReason::Decode(_))) => {
                            drops.add_junk(reason, at);
                        }
                        Err(reason) => drops.add(reason),
                    }
                })?;
        Ok(taken)
    }

    /// UDP first, the UDS last: the stall decisions after this round see every local beat
    /// queued until just before them, however long the UDP drain took. Returns how many
    /// datagrams it took, and whether a beat among them needs the daemon at once (rule 5).
    /// `budget` per socket: [`super::DRAIN_BUDGET`], or under a flood a bounded part
    /// ([`Pace::flood_budget`], not all the flooders refill while it is drained).
    fn drain_both(&mut self, out: &mut Vec<Beat>, budget: usize) -> io::Result<(u64, bool)> {
        let first = out.len();
        let mut taken = 0;
        if let Some(udp) = &mut self.udp {
            taken += udp.drain(out, budget)?;
        }
        taken += self.drain_uds(out, budget)?;
        if wakeup::mostly_full(taken as u64, self.pace.queue_limit) {
            for beat in &out[first..] {
                if let Some(pid) = deniable(beat, &self.attest) {
                    self.deny.crowded(pid, beat.recv_ns);
                }
            }
        }
        let mut urgent = false;
        for beat in &out[first..] {
            let status = beat.frame.status;
            match self.seen.get_mut(&beat.pid) {
                Some(known) => {
                    urgent |= wakeup::urgent(status, Some(*known));
                    *known = status;
                }
                None => {
                    urgent = true;
                    // Bounded as the kernel's bucket map is: past it, first beats stay urgent.
                    if self.seen.len() < SENDER_CACHE {
                        self.seen.insert(beat.pid, status);
                    }
                }
            }
        }
        Ok((taken as u64, urgent))
    }

    /// Judges the denied senders, and rebuilds the Unix socket's filter when who is denied
    /// changed (once for all the refusals of a round).
    fn apply_denials(&mut self) {
        self.deny.judge(self.clock.now_ns());
        if self.deny.take_change() {
            self.refilter(false);
        }
    }

    /// Attaches the Unix socket's classic filter (and with `udp` the UDP socket's) for the
    /// junk counting and the denials now in force; returns when it took effect: a frame
    /// queued before was let up by the filter before.
    fn refilter(&mut self, udp: bool) -> u64 {
        let denied = self.deny.pids();
        self.drops.set_denied(denied.len());
        let udp = if udp { self.udp.as_ref() } else { None };
        attach_filters(self.uds.get_ref(), udp, &self.junk, &denied);
        let since = self.clock.now_ns();
        self.deny.attached(since);
        since
    }

    /// Whether a socket still holds what its last drain's budget left.
    fn more_queued(&self) -> bool {
        self.uds_more || self.udp.as_ref().is_some_and(UdpReceiver::has_more)
    }
}

impl Datapath for UserspaceDatapath {
    fn mode(&self) -> &'static str {
        "userspace"
    }

    fn attest(&self) -> &'static str {
        "scm_credentials"
    }

    async fn recv(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        self.apply_denials();
        let on_timer = self.pace.next_drain_ns;
        // On the timer, what a drain left queued waits for the next tick.
        let more = self.more_queued() && on_timer.is_none();
        // On the timer, datagrams must not wake the thread: the sockets are not watched.
        self.uds.watch(on_timer.is_none())?;
        if let Some(udp) = &mut self.udp {
            udp.watch(on_timer.is_none())?;
        }
        tokio::select! {
            exited = self.attest.exits.exited() => {
                self.attest.forget(exited);
                self.seen.remove(&exited);
                self.deny.forget(exited);
                return Ok(());
            }
            () = tokio::task::yield_now(), if more => {}
            fired = self.timer.wait_until(on_timer.unwrap_or(0)), if on_timer.is_some() && !more => fired?,
            ready = self.uds.readable(), if on_timer.is_none() && !more => ready?,
            ready = async { self.udp.as_ref().expect("guarded").readable().await }, if on_timer.is_none() && !more && self.udp.is_some() => ready?,
        }
        // Readiness was cleared before receiving: a datagram arriving meanwhile re-arms it.
        let budget = if self.pace.flood {
            self.pace.flood_budget()
        } else {
            super::DRAIN_BUDGET
        };
        let (taken, urgent) = self.drain_both(out, budget)?;
        // What the deny list answers is not a flood to pace against.
        let refused = refused(&self.drops).saturating_sub(self.deny.handled());
        self.pace
            .after_drain(self.clock.now_ns(), taken, urgent, refused);
        self.adapt_junk_counting();
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<Beat>) {
        if let Err(e) = self.drain_both(out, super::DRAIN_BUDGET) {
            event!(warn, "receive_error", error:% = e);
        }
    }

    fn agent_silent(&mut self, pid: u32, _origin: &Origin) {
        self.seen.remove(&pid);
    }

    fn agent_untracked(&mut self, pid: u32) {
        self.seen.remove(&pid);
    }

    fn secure_sessions(&self) -> Vec<super::secure::SavedSession> {
        self.udp.as_ref().map_or(Vec::new(), UdpReceiver::sessions)
    }

    fn over_rate(&mut self, beat: &Beat) {
        if let Some(pid) = deniable(beat, &self.attest) {
            self.deny.refused(pid, beat.recv_ns);
        }
    }

    fn set_limits(&mut self, limits: &Limits) -> anyhow::Result<()> {
        self.deny.set_rate(limits.per_pid_rate);
        Ok(())
    }
}

/// The pid a Unix socket beat claims, when the classic filter may deny it: the sender's own
/// (in the daemon's pid namespace), and no container's process known to claim it too.
fn deniable(beat: &Beat, attest: &Attestor) -> Option<u32> {
    let own = beat.origin
        == Origin::Uds {
            cross_namespace: false,
        };
    let pid = beat.frame.pid;
    (own && beat.pid == pid && !attest.claimed_in_a_container(pid)).then_some(pid)
}

/// Most senders whose namespace is cached at once (each holds a pidfd until it exits).
const SENDER_CACHE: usize = 65_536;

impl JunkCounting {
    fn new(sample_one_in: u32) -> Self {
        JunkCounting {
            sample_one_in,
            sampling: false,
            window_start: std::time::Instant::now(),
            counted_at_start: 0,
            quiet_windows: 0,
        }
    }

    /// One junk datagram in this many reaches the daemon now.
    fn one_in(&self) -> u32 {
        if self.sampling { self.sample_one_in } else { 1 }
    }
}

/// Attaches the frame rules as classic BPF to both sockets, so junk is dropped (or sampled)
/// before it wakes the daemon, and the Unix socket's to deny `denied`. Without them the
/// datapath still works, at the cost of a wake-up per datagram: a failure is logged, not
/// fatal. Built on the heap: a program has room for `cbpf::MAX_INSNS` instructions.
fn attach_filters(
    uds: &UnixDatagram,
    udp: Option<&UdpReceiver>,
    junk: &JunkCounting,
    denied: &[u32],
) {
    let sample_one_in = junk.one_in();
    let mut room = vec![cbpf::SockFilter::default(); cbpf::MAX_INSNS];
    let sockets = [
        // On UDP the filter sees the 8-byte UDP header first; secure frames pass unchecked
        // (they are authenticated here).
        (
            "udp",
            udp.map(|s| s.socket().as_fd()),
            UDP_HEADER_LEN,
            &SECURE_FRAME_LENS[..],
            &[][..],
        ),
        ("uds", Some(uds.as_fd()), 0, &[][..], denied),
    ];
    for (name, fd, offset, also_accept, deny) in sockets {
        let Some(fd) = fd else { continue };
        let layout = cbpf::Layout {
            offset,
            also_accept,
            sample_one_in,
            deny,
        };
        let filter = cbpf::build(&layout, &mut room);
        match sock::attach_classic_filter(fd, filter) {
            Ok(()) => event!(
                info,
                "classic_filter_attached",
                socket = name,
                instructions = filter.len(),
                sample_one_in = sample_one_in,
                denied = deny.len(),
            ),
            Err(e) => event!(warn, "classic_filter_failed", socket = name, error:% = e),
        }
    }
}

/// Caches what /proc says of each sender for the shared [`Attestation`] decision.
struct Attestor {
    decision: Attestation,
    /// The clock of the beats' arrival times.
    clock: ClockSource,
    /// What /proc said of each sender and when it started, forgotten when its process exits.
    senders: HashMap<u32, (Sender, SenderStart), RandomState>,
    /// How many of those senders live in a container with each pid of their own there.
    container_pids: HashMap<u32, u32>,
    exits: ExitWatcher,
}

impl Attestor {
    fn new(decision: Attestation, clock: ClockSource) -> Self {
        Attestor {
            decision,
            clock,
            senders: HashMap::default(),
            container_pids: HashMap::new(),
            exits: ExitWatcher::new(),
        }
    }

    /// The attested sender of a frame that arrived at `arrived_ns` and when it started, or
    /// why the frame is refused.
    fn check(
        &mut self,
        sender_pid: Option<u32>,
        arrived_ns: u64,
        frame: &Frame,
    ) -> Result<(Attested, SenderStart), DropReason> {
        // Without credentials nothing can be attested.
        let pid = sender_pid.ok_or(DropReason::Spoof)?;
        let (sender, start) = match self.senders.get(&pid) {
            Some(&(sender, start)) => (Some(sender), start),
            None => self.learn(pid, arrived_ns),
        };
        let attested = self.decision.check(pid, sender.as_ref(), frame.pid)?;
        Ok((attested, start))
    }

    /// [`bound_sender`], cached until the sender exits (its pidfd then watches the exit).
    /// One pidfd per new sender, none per datagram (`sys::recv`).
    fn learn(&mut self, pid: u32, arrived_ns: u64) -> (Option<Sender>, SenderStart) {
        let bound = bound_sender(pid, arrived_ns, self.clock);
        let (sender, start) = bound.parts();
        if let Bound::Sender { sender, pidfd, .. } = bound
            && self.senders.len() < SENDER_CACHE
            && self.exits.watch(pid, pidfd).is_ok()
        {
            self.remember(pid, sender, start);
        }
        (sender, start)
    }

    fn remember(&mut self, pid: u32, sender: Sender, start: SenderStart) {
        if sender.cross_namespace {
            *self.container_pids.entry(sender.own_pid).or_default() += 1;
        }
        if let Some((old, _)) = self.senders.insert(pid, (sender, start)) {
            self.uncount(old);
        }
    }

    fn forget(&mut self, pid: u32) {
        if let Some((sender, _)) = self.senders.remove(&pid) {
            self.uncount(sender);
        }
    }

    fn uncount(&mut self, sender: Sender) {
        if sender.cross_namespace
            && let Some(n) = self.container_pids.get_mut(&sender.own_pid)
        {
            *n -= 1;
            if *n == 0 {
                self.container_pids.remove(&sender.own_pid);
            }
        }
    }

    /// Whether a container's process known here has `pid` as its own there (frames from it
    /// claim `pid`).
    fn claimed_in_a_container(&self, pid: u32) -> bool {
        self.container_pids.contains_key(&pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::process::StartTime;
    use varta_common::wakeup::USERSPACE_MAX_INTERVAL_NS;

    const MS: u64 = 1_000_000;

    /// The rule that binds a frame's sender to what /proc shows under its pid, without a
    /// pidfd per datagram: a process that started after the frame arrived is not its sender.
    #[tokio::test]
    async fn a_process_younger_than_the_frame_is_not_its_sender() {
        let clock = ClockSource::Monotonic;
        let arrived_before = clock.now_ns();
        // Past the tick of that arrival and its slack.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut attest = Attestor::new(Attestation::new(false), clock);
        let (sender, start) = attest.learn(pid, arrived_before);
        assert!(
            sender.is_none() && start == SenderStart::Exited,
            "{start:?}"
        );
        assert!(attest.senders.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(30));
        let (sender, start) = attest.learn(pid, clock.now_ns());
        let started = StartTime::of(pid).unwrap().0 as u32;
        assert!(
            sender.is_some() && start == SenderStart::Ticks(started),
            "{start:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // Reaped, nobody holds the pid: gone.
        let (sender, start) = attest.learn(pid, clock.now_ns());
        assert!(
            sender.is_none() && start == SenderStart::Exited,
            "{start:?}"
        );
    }

    /// A container's pid 7 claims frames of pid 7 as a host process 7 would: while one is
    /// known, pid 7 is never denied (its frames would be dropped too).
    #[tokio::test]
    async fn pids_claimed_in_containers_are_counted_until_their_senders_exit() {
        let mut attest = Attestor::new(Attestation::new(true), ClockSource::Monotonic);
        let in_container = |own_pid| Sender {
            cross_namespace: true,
            own_pid,
        };
        let start = SenderStart::Unknown;
        attest.remember(1001, in_container(7), start);
        attest.remember(1002, in_container(7), start);
        attest.remember(
            1003,
            Sender {
                cross_namespace: false,
                own_pid: 1003,
            },
            start,
        );
        assert!(attest.claimed_in_a_container(7));
        assert!(!attest.claimed_in_a_container(1003));
        attest.forget(1001);
        assert!(attest.claimed_in_a_container(7));
        attest.forget(1002);
        attest.forget(1002);
        assert!(!attest.claimed_in_a_container(7));
        assert!(attest.container_pids.is_empty());
    }

    #[test]
    fn few_beats_wake_the_daemon_each() {
        let mut pace = Pace::new(512);
        // One routine beat every 5 ms: never 4 within 10 ms.
        for i in 1..20 {
            pace.after_drain(i * 5 * MS, 1, false, 0);
            assert_eq!(pace.next_drain_ns, None, "beat {i}");
        }
    }

    #[test]
    fn routine_batches_go_on_the_timer_until_the_queue_fills() {
        let mut pace = Pace::new(11);
        pace.after_drain(100 * MS, 2, false, 0);
        assert_eq!(pace.next_drain_ns, None);
        // 4 routine in 1 ms (4k/s): 5 of the 11 queued take 1.25 ms.
        pace.after_drain(101 * MS, 2, false, 0);
        assert_eq!(pace.next_drain_ns, Some(101 * MS + 1_250_000));
        // The tick finds the queue full (11 in 1.25 ms): it may have overflowed (a
        // nonblocking client's frame refused). A burst of 11 in 1.25 ms fills half in 568 us.
        let at = 101 * MS + 1_250_000;
        pace.after_drain(at, 11, false, 0);
        assert_eq!(pace.next_drain_ns, Some(at + 568_181));
        // Full again within it: half in 258 us.
        let at = at + 568_181;
        pace.after_drain(at, 11, false, 0);
        assert_eq!(pace.next_drain_ns, Some(at + 258_264));
        // And again: at the shortest interval a burst would fill the queue; every datagram
        // wakes the daemon.
        let at = at + 258_264;
        pace.after_drain(at, 11, false, 0);
        assert_eq!(pace.next_drain_ns, None);
    }

    #[test]
    fn a_burst_keeps_the_timer_shorter_than_the_average_rate_would() {
        let mut pace = Pace::new(513);
        // 8 routine in 1 ms: 256 at 8k/s take 32 ms, capped at the longest interval.
        pace.after_drain(MS, 8, false, 0);
        assert_eq!(pace.next_drain_ns, Some(MS + USERSPACE_MAX_INTERVAL_NS));
        // The tick finds 400 queued, over three quarters of the queue: a burst of 400 in
        // 10 ms fills half in 6.4 ms.
        pace.after_drain(11 * MS, 400, false, 0);
        assert_eq!(pace.next_drain_ns, Some(11 * MS + 6_400_000));
        // Quieter on average (100 in 6.4 ms: the rate alone allows the longest interval),
        // the burst's interval holds.
        let at = 11 * MS + 6_400_000;
        pace.after_drain(at, 100, false, 0);
        assert_eq!(pace.next_drain_ns, Some(at + 6_400_000));
    }

    #[test]
    fn an_urgent_beat_goes_back_to_readiness() {
        let mut pace = Pace::new(512);
        pace.after_drain(MS, 8, false, 0);
        assert!(pace.next_drain_ns.is_some());
        pace.after_drain(2 * MS, 8, true, 0);
        assert_eq!(pace.next_drain_ns, None);
        // The next routine batch starts a fresh count.
        pace.after_drain(3 * MS, 3, false, 0);
        assert_eq!(pace.next_drain_ns, None);
    }

    #[test]
    fn a_flood_mostly_refused_is_drained_at_the_longest_interval() {
        let mut pace = Pace::new(11);
        pace.after_drain(MS, 11, false, 0);
        assert_eq!(pace.next_drain_ns, Some(MS + 454_545));
        // 8 of the 11 taken were refused (over a rate, the tracker full): the longest interval, though
        // the rate alone (11 in 1 ms) would have the daemon wake on each datagram.
        pace.after_drain(2 * MS, 11, false, 8);
        assert_eq!(pace.next_drain_ns, Some(2 * MS + USERSPACE_MAX_INTERVAL_NS));
        assert!(pace.flood);
        // A tick that takes its whole budget finds the flood still there.
        pace.after_drain(12 * MS, 128, false, 8);
        assert!(pace.flood);
        assert_eq!(
            pace.next_drain_ns,
            Some(12 * MS + USERSPACE_MAX_INTERVAL_NS)
        );
        // Less than that, none refused: over, back to the rate's interval (5 in 1 ms).
        pace.after_drain(13 * MS, 4, false, 8);
        assert!(!pace.flood);
        pace.after_drain(14 * MS, 5, false, 8);
        assert_eq!(pace.next_drain_ns, Some(15 * MS));
    }
}
