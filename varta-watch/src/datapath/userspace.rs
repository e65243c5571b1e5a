//! The userspace datapath: `recvmmsg(2)` on the UDS (with SCM_CREDENTIALS) and the UDP
//! socket, the full VLP decode, and sender attestation. Every wake-up drains every socket
//! until it would block or its budget is spent (`DRAIN_BUDGET`; the rest on the next round,
//! without waiting), so neither a junk flood nor a busy socket starves the other or holds
//! the event loop. The UDS is drained last, right before the stall decisions that follow.

use crate::sys::logger::event;
use std::{
    collections::HashMap,
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixDatagram,
    },
    sync::Arc,
};

use tokio::io::unix::AsyncFd;
use varta_common::{
    DropReason, FRAME_LEN, Frame, cbpf,
    frame::{SECURE_FRAME_LENS, UDP_HEADER_LEN},
};

use super::{
    Datapath,
    attest::{Attestation, Attested},
    udp::UdpReceiver,
};
use crate::{
    config::Limits,
    sys::clock::ClockSource,
    sys::pidfd::ExitWatcher,
    sys::process::StartTime,
    sys::procfs::{self, Sender},
    sys::sock::{self, RecvBatch},
    vocab::beat::{Beat, Origin, SenderStart},
    vocab::drops::DropCounters,
};

const BATCH: usize = 64;

pub struct UserspaceDatapath {
    uds: AsyncFd<UnixDatagram>,
    udp: Option<UdpReceiver>,
    batch: RecvBatch,
    clock: ClockSource,
    drops: Arc<DropCounters>,
    attest: Attestor,
    /// The last UDS drain stopped at its budget: more may be queued.
    uds_more: bool,
    junk: JunkCounting,
}

/// How junk is counted: every junk frame reaches the daemon and is counted exactly while
/// junk is rare; under a flood the classic filter lets one in `sample_one_in` through and
/// the counts are estimates (each sample counts as `sample_one_in`), so the flood costs the
/// daemon no wake-ups. Above [`JUNK_FLOOD`] frames a second the filter samples; below
/// [`JUNK_QUIET`] (estimated) for [`QUIET_WINDOWS`] seconds in a row it counts exactly again.
struct JunkCounting {
    exact: Filters,
    sampled: Filters,
    sample_one_in: u32,
    sampling: bool,
    window_start: std::time::Instant,
    seen_at_start: u64,
    quiet_windows: u32,
}

/// The classic programs for the two sockets in one mode.
struct Filters {
    uds: cbpf::Program,
    udp: cbpf::Program,
}

const JUNK_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
const JUNK_FLOOD: u64 = 1000;
const JUNK_QUIET: u64 = 100;
const QUIET_WINDOWS: u32 = 10;

impl UserspaceDatapath {
    pub fn new(
        uds: UnixDatagram,
        udp: Option<UdpReceiver>,
        clock: ClockSource,
        allow_cross_namespace: bool,
        junk_sample_one_in: u32,
        drops: Arc<DropCounters>,
    ) -> io::Result<Self> {
        let mut junk = JunkCounting::new(junk_sample_one_in);
        // Exact until junk floods (an operator chasing one broken client sees each frame).
        junk.attach(&uds, udp.as_ref(), false);
        drops.set_junk_scale(1);
        let pidfds = sock::passes_pidfds(&uds);
        Ok(UserspaceDatapath {
            uds: crate::sys::readiness::readable(uds)?,
            udp,
            batch: RecvBatch::new(BATCH),
            clock,
            drops,
            attest: Attestor::new(Attestation::new(allow_cross_namespace), pidfds),
            uds_more: false,
            junk,
        })
    }

    /// Once a window: switches between exact and sampled junk counting by the junk rate.
    fn adapt_junk_counting(&mut self) {
        let j = &mut self.junk;
        if j.window_start.elapsed() < JUNK_WINDOW || j.sample_one_in <= 1 {
            return;
        }
        let seen = self.drops.junk_seen();
        let per_window = (seen - j.seen_at_start) * self.drops.junk_scale();
        j.window_start = std::time::Instant::now();
        j.seen_at_start = seen;
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
            j.attach(self.uds.get_ref(), self.udp.as_ref(), sampling);
            self.drops
                .set_junk_scale(if sampling { j.sample_one_in } else { 1 });
            event!(
                info,
                "junk_counting",
                mode = if sampling { "sampled" } else { "exact" },
                junk_per_s = per_window,
                sample_one_in = self.drops.junk_scale(),
            );
        }
    }

    /// Receives from the Unix socket until it would block or the budget is spent.
    fn drain_uds(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        let (attest, drops) = (&mut self.attest, &self.drops);
        self.uds_more = self.batch.drain(
            self.uds.get_ref().as_fd(),
            self.clock,
            super::DRAIN_BUDGET,
            |d, now| {
                let beat = decode_plain(d.bytes, d.truncated).and_then(|frame| {
                    attest.check(d.sender_pid, d.sender_pidfd, &frame).map(
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
                            recv_ns: now,
                            rate_limited: false,
                            sender,
                        },
                    )
                });
                match beat {
                    Ok(beat) => out.push(beat),
                    // What the classic filter may sample.
                    Err(reason @ (DropReason::Length | DropReason::Decode(_))) => {
                        drops.add_junk(reason)
                    }
                    Err(reason) => drops.add(reason),
                }
            },
        )?;
        Ok(())
    }

    /// UDP first, the UDS last: the stall decisions after this round see every local beat
    /// queued until just before them, however long the UDP drain took.
    fn drain_both(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        if let Some(udp) = &mut self.udp {
            udp.drain(out)?;
        }
        self.drain_uds(out)
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
        tokio::select! {
            exited = self.attest.exits.exited() => {
                self.attest.forget(exited);
                return Ok(());
            }
            guard = self.uds.readable(), if !self.uds_more => guard?.clear_ready(),
            () = tokio::task::yield_now(), if self.uds_more => {}
            ready = async { self.udp.as_ref().expect("guarded").readable().await }, if self.udp.is_some() => ready?,
        }
        // Readiness was cleared before receiving: a datagram arriving meanwhile re-arms it.
        self.drain_both(out)?;
        self.adapt_junk_counting();
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<Beat>) {
        if let Err(e) = self.drain_both(out) {
            event!(warn, "receive_error", error:% = e);
        }
    }

    fn secure_sessions(&self) -> Vec<super::secure::SavedSession> {
        self.udp.as_ref().map_or(Vec::new(), UdpReceiver::sessions)
    }

    fn set_limits(&mut self, _limits: &Limits) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A plaintext frame, or why it is refused.
fn decode_plain(bytes: &[u8], truncated: bool) -> Result<Frame, DropReason> {
    let raw: Option<&[u8; FRAME_LEN]> = if truncated {
        None
    } else {
        bytes.try_into().ok()
    };
    let raw = raw.ok_or(DropReason::Length)?;
    Frame::decode(raw).map_err(|e| {
        event!(debug, "decode_error", transport = "uds", kind = e.name());
        DropReason::from_decode(e)
    })
}

/// Most senders whose namespace is cached at once (each holds a pidfd until it exits).
const SENDER_CACHE: usize = 65_536;

impl JunkCounting {
    fn new(sample_one_in: u32) -> Self {
        JunkCounting {
            exact: Filters::new(1),
            sampled: Filters::new(sample_one_in),
            sample_one_in,
            sampling: false,
            window_start: std::time::Instant::now(),
            seen_at_start: 0,
            quiet_windows: 0,
        }
    }

    /// Attaches the frame rules as classic BPF to both sockets, so junk is dropped (or
    /// sampled) before it wakes the daemon. Without it the datapath still works, at the cost
    /// of a wake-up per datagram: a failure is logged, not fatal.
    fn attach(&mut self, uds: &UnixDatagram, udp: Option<&UdpReceiver>, sampling: bool) {
        self.sampling = sampling;
        self.quiet_windows = 0;
        let (filters, one_in) = if sampling {
            (&self.sampled, self.sample_one_in)
        } else {
            (&self.exact, 1)
        };
        let sockets = [
            ("uds", Some(uds.as_fd()), &filters.uds),
            ("udp", udp.map(|s| s.socket().as_fd()), &filters.udp),
        ];
        for (name, fd, filter) in sockets {
            let Some(fd) = fd else { continue };
            match sock::attach_classic_filter(fd, filter.insns()) {
                Ok(()) => event!(
                    info,
                    "classic_filter_attached",
                    socket = name,
                    instructions = filter.insns().len(),
                    sample_one_in = one_in,
                ),
                Err(e) => event!(warn, "classic_filter_failed", socket = name, error:% = e),
            }
        }
    }
}

impl Filters {
    fn new(sample_one_in: u32) -> Self {
        Filters {
            uds: cbpf::program(&cbpf::Layout {
                offset: 0,
                also_accept: &[],
                sample_one_in,
            }),
            // On UDP the filter sees the 8-byte UDP header first; secure frames pass
            // unchecked (they are authenticated here).
            udp: cbpf::program(&cbpf::Layout {
                offset: UDP_HEADER_LEN,
                also_accept: &SECURE_FRAME_LENS,
                sample_one_in,
            }),
        }
    }
}

/// Caches what /proc says of each sender for the shared [`Attestation`] decision.
struct Attestor {
    decision: Attestation,
    /// The socket hands over each sender's pidfd (Linux 6.5 and later).
    pidfds: bool,
    /// What /proc said of each sender (and when it started, read through its own pidfd),
    /// forgotten when its process exits.
    senders: HashMap<u32, (Sender, SenderStart)>,
    exits: ExitWatcher,
}

impl Attestor {
    fn new(decision: Attestation, pidfds: bool) -> Self {
        Attestor {
            decision,
            pidfds,
            senders: HashMap::new(),
            exits: ExitWatcher::new(),
        }
    }

    /// The attested sender and when it started, or why the frame is refused.
    fn check(
        &mut self,
        sender_pid: Option<u32>,
        sender_pidfd: Option<OwnedFd>,
        frame: &Frame,
    ) -> Result<(Attested, SenderStart), DropReason> {
        // Without credentials nothing can be attested.
        let pid = sender_pid.ok_or(DropReason::Spoof)?;
        let (sender, start) = match self.senders.get(&pid) {
            Some(&(sender, start)) => (Some(sender), start),
            None => self.learn(pid, sender_pidfd),
        };
        let attested = self.decision.check(pid, sender.as_ref(), frame.pid)?;
        Ok((attested, start))
    }

    /// Reads a sender's namespace and `NSpid` and caches them until it exits. Through the
    /// sender's own pidfd (SCM_PIDFD) the read is bound to it: what /proc shows under its
    /// pid is its until it is reaped, so a sender still holding its pid after the read gets
    /// its start time attested, and one reaped by then (or before the datagram was
    /// received: the kernel then hands over no pidfd) is known as gone. Without one, the pid is opened here, after the pid may have been
    /// reused.
    fn learn(&mut self, pid: u32, sender_pidfd: Option<OwnedFd>) -> (Option<Sender>, SenderStart) {
        let (pidfd, bound) = match sender_pidfd {
            Some(pidfd) => (pidfd, true),
            None if self.pidfds => return (None, SenderStart::Exited),
            None => match ExitWatcher::open(pid) {
                Ok(pidfd) => (pidfd, false),
                Err(_) => return (None, SenderStart::Unknown),
            },
        };
        let read = procfs::sender(pid).ok().zip(StartTime::of(pid));
        let start = match (bound, &read) {
            (true, _) if !ExitWatcher::holds_pid(&pidfd) => return (None, SenderStart::Exited),
            (true, Some((_, started))) => SenderStart::from_record(started.0 as u32),
            _ => SenderStart::Unknown,
        };
        let Some((sender, _)) = read else {
            return (None, start);
        };
        if self.senders.len() < SENDER_CACHE && self.exits.watch(pid, pidfd).is_ok() {
            self.senders.insert(pid, (sender, start));
        }
        (Some(sender), start)
    }

    fn forget(&mut self, pid: u32) {
        self.senders.remove(&pid);
    }
}
