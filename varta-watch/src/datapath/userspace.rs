//! The userspace datapath: `recvmmsg(2)` on the UDS (with SCM_CREDENTIALS) and the UDP
//! socket, the full VLP decode, and sender attestation. Every wake-up drains every socket
//! until it would block, so a junk flood cannot starve honest frames queued behind it.

use std::{
    collections::HashMap,
    io,
    os::{fd::AsFd, unix::net::UnixDatagram},
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
    sys::procfs::{self, Sender},
    sys::sock::{self, RecvBatch},
    vocab::beat::{Beat, Origin},
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
}

impl UserspaceDatapath {
    pub fn new(
        uds: UnixDatagram,
        udp: Option<UdpReceiver>,
        clock: ClockSource,
        allow_cross_namespace: bool,
        junk_sample_one_in: u32,
        drops: Arc<DropCounters>,
    ) -> io::Result<Self> {
        drop_junk_in_kernel(&uds, udp.as_ref(), junk_sample_one_in);
        Ok(UserspaceDatapath {
            uds: crate::sys::readiness::readable(uds)?,
            udp,
            batch: RecvBatch::new(BATCH),
            clock,
            drops,
            attest: Attestor::new(Attestation::new(allow_cross_namespace)),
        })
    }

    /// Receives from the Unix socket until it would block.
    fn drain_uds(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        let (attest, drops) = (&mut self.attest, &self.drops);
        self.batch
            .drain(self.uds.get_ref().as_fd(), self.clock, |d, now| {
                let beat = decode_plain(d.bytes, d.truncated).and_then(|frame| {
                    attest.check(d.sender_pid, &frame).map(
                        |Attested {
                             pid,
                             cross_namespace,
                         }| Beat {
                            pid,
                            frame,
                            origin: Origin::Uds { cross_namespace },
                            recv_ns: now,
                            rate_limited: false,
                        },
                    )
                });
                match beat {
                    Ok(beat) => out.push(beat),
                    Err(reason) => drops.add(reason),
                }
            })
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
            guard = self.uds.readable() => guard?.clear_ready(),
            ready = async { self.udp.as_ref().expect("guarded").readable().await }, if self.udp.is_some() => ready?,
        }
        // Readiness was cleared before receiving: a datagram arriving meanwhile re-arms it.
        self.drain_uds(out)?;
        match &mut self.udp {
            Some(udp) => udp.drain(out),
            None => Ok(()),
        }
    }

    fn drain(&mut self, out: &mut Vec<Beat>) {
        if let Err(e) = self.drain_uds(out) {
            log::warn!("event=receive_error transport=uds error={e}");
        }
        if let Some(Err(e)) = self.udp.as_mut().map(|udp| udp.drain(out)) {
            log::warn!("event=receive_error transport=udp error={e}");
        }
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
        log::debug!("event=decode_error transport=uds kind={}", e.name());
        DropReason::from_decode(e)
    })
}

/// Most senders whose namespace is cached at once (each holds a pidfd until it exits).
const SENDER_CACHE: usize = 65_536;

/// Attaches the frame rules as classic BPF to both sockets, so junk is dropped (and one in
/// `sample_one_in` sampled) before it wakes the daemon. Without it the datapath still
/// works, at the cost of a wake-up per datagram: a failure is logged, not fatal.
fn drop_junk_in_kernel(uds: &UnixDatagram, udp: Option<&UdpReceiver>, sample_one_in: u32) {
    let uds_filter = cbpf::program(&cbpf::Layout {
        offset: 0,
        also_accept: &[],
        sample_one_in,
    });
    // On UDP the filter sees the 8-byte UDP header first; secure frames pass unchecked
    // (they are authenticated here).
    let udp_filter = cbpf::program(&cbpf::Layout {
        offset: UDP_HEADER_LEN,
        also_accept: &SECURE_FRAME_LENS,
        sample_one_in,
    });
    let sockets = [
        ("uds", Some(uds.as_fd()), &uds_filter),
        ("udp", udp.map(|s| s.socket().as_fd()), &udp_filter),
    ];
    for (name, fd, filter) in sockets {
        let Some(fd) = fd else { continue };
        match sock::attach_classic_filter(fd, filter.insns()) {
            Ok(()) => log::info!(
                "event=classic_filter_attached socket={name} instructions={} sample_one_in={}",
                filter.insns().len(),
                sample_one_in
            ),
            Err(e) => log::warn!("event=classic_filter_failed socket={name} error=\"{e}\""),
        }
    }
}

/// Caches what /proc says of each sender for the shared [`Attestation`] decision.
struct Attestor {
    decision: Attestation,
    /// What /proc said of each sender, forgotten when its process exits.
    senders: HashMap<u32, Sender>,
    exits: ExitWatcher,
}

impl Attestor {
    fn new(decision: Attestation) -> Self {
        Attestor {
            decision,
            senders: HashMap::new(),
            exits: ExitWatcher::new(),
        }
    }

    /// The attested sender, or why the frame is refused.
    fn check(&mut self, sender_pid: Option<u32>, frame: &Frame) -> Result<Attested, DropReason> {
        // Without credentials nothing can be attested.
        let pid = sender_pid.ok_or(DropReason::Spoof)?;
        let sender = match self.senders.get(&pid) {
            Some(sender) => Some(*sender),
            None => self.learn(pid),
        };
        self.decision.check(pid, sender.as_ref(), frame.pid)
    }

    /// Reads a sender's namespace and `NSpid` and caches them until it exits.
    fn learn(&mut self, pid: u32) -> Option<Sender> {
        let pidfd = ExitWatcher::open(pid).ok()?;
        let sender = procfs::sender(pid).ok()?;
        if self.senders.len() < SENDER_CACHE && self.exits.watch(pid, pidfd).is_ok() {
            self.senders.insert(pid, sender);
        }
        Some(sender)
    }

    fn forget(&mut self, pid: u32) {
        self.senders.remove(&pid);
    }
}
