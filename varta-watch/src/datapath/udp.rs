//! The UDP socket read by the daemon: every datagram on the userspace datapath, and on the
//! eBPF datapath the secure frames the kernel filter passes up unopened (it consumes the
//! plaintext ones itself). Each wake-up drains the socket until it would block. No kernel
//! rate limit saw these frames: the observer applies the limits (`Beat::rate_limited`).

use std::{io, net::UdpSocket, os::fd::AsFd, sync::Arc};

use varta_common::DropReason;

use super::secure::UdpFrames;
use crate::{
    sys::clock::ClockSource,
    sys::readiness::Switchable,
    sys::recv::RecvBatch,
    vocab::{
        beat::{Beat, Origin, SenderStart},
        drops::DropCounters,
    },
};

const BATCH: usize = 64;

pub struct UdpReceiver {
    socket: Switchable<UdpSocket>,
    batch: RecvBatch,
    frames: UdpFrames,
    clock: ClockSource,
    drops: Arc<DropCounters>,
    /// The last drain stopped at its budget: more may be queued.
    more: bool,
    /// Set on the userspace datapath only: the eBPF filter consumes plaintext frames, and
    /// the kernel counts those as drops too.
    overflow: Option<Overflow>,
}

/// Turns the kernel's count of datagrams dropped at the socket (`sock::kernel_drops`, read
/// after each drain that took any: the queue overflows only while full, and the drain that
/// follows takes what filled it) into `queue_full` drops: what it dropped, less what the
/// classic filter refused meanwhile (nothing while junk is counted exactly; while it is
/// sampled, each junk sample drained stands for its scale less one refused: an estimate
/// then, as the junk counts are). SO_RXQ_OVFL would carry the count with the datagrams, but
/// Linux 6.18 sends no such message for UDP.
struct Overflow {
    /// The count when last read.
    last: u32,
    /// Junk frames the classic filter refused since, as the samples drained estimate them.
    junk_refused: u64,
}

impl UdpReceiver {
    pub fn new(
        socket: UdpSocket,
        frames: UdpFrames,
        clock: ClockSource,
        drops: Arc<DropCounters>,
    ) -> io::Result<Self> {
        Ok(UdpReceiver {
            socket: Switchable::new(socket)?,
            batch: RecvBatch::new(BATCH),
            frames,
            clock,
            drops,
            more: false,
            overflow: None,
        })
    }

    /// Counts datagrams the kernel drops at the socket from now on (`queue_full`).
    pub fn count_overflow(&mut self) -> io::Result<()> {
        let last = crate::sys::sock::kernel_drops(self.socket().as_fd())?;
        self.overflow = Some(Overflow {
            last,
            junk_refused: 0,
        });
        Ok(())
    }

    /// The secure frames' replay sessions, for the next instance.
    pub fn sessions(&self) -> Vec<super::secure::SavedSession> {
        self.frames.sessions()
    }

    pub fn socket(&self) -> &UdpSocket {
        self.socket.get_ref()
    }

    /// Asks the kernel for each datagram's arrival time: a beat's time is when it came,
    /// however late it is drained (the userspace datapath drains on a timer under load).
    pub fn stamp_arrivals(&self) -> io::Result<()> {
        crate::sys::sock::stamp_arrivals(self.socket().as_fd())
    }

    /// About how many datagrams the socket's receive buffer holds (the kernel charges each
    /// small datagram about a kilobyte of it).
    pub fn queue_limit(&self) -> io::Result<u64> {
        Ok(u64::from(crate::sys::sock::rcvbuf(self.socket().as_fd())?) / 1024)
    }

    /// The last drain stopped at its budget: more may be queued.
    pub fn has_more(&self) -> bool {
        self.more
    }

    /// Waits until the socket is readable (and clears the readiness: a datagram arriving
    /// before the drain re-arms it); at once when the last drain left datagrams queued.
    pub async fn readable(&self) -> io::Result<()> {
        if self.more {
            tokio::task::yield_now().await;
            return Ok(());
        }
        self.socket.readable().await
    }

    /// Watches the socket for readability, or stops (the userspace datapath's drain timer
    /// takes over meanwhile).
    pub fn watch(&mut self, on: bool) -> io::Result<()> {
        self.socket.watch(on)
    }

    /// Receives until the socket would block or `budget` datagrams were taken, appending
    /// every accepted beat; returns how many datagrams it took.
    pub fn drain(&mut self, out: &mut Vec<Beat>, budget: usize) -> io::Result<usize> {
        let (frames, drops, overflow) = (&mut self.frames, &self.drops, &mut self.overflow);
        let taken;
        (self.more, taken) = self.batch.drain(
            self.socket.get_ref().as_fd(),
            self.clock,
            budget,
            |d, at| {
                let Some(source) = d.source else { return };
                let decoded = if d.truncated {
                    Err(DropReason::Length)
                } else {
                    frames.decode(d.bytes)
                };
                match decoded {
                    Ok(frame) => out.push(Beat {
                        pid: frame.pid,
                        frame,
                        origin: Origin::Udp { source },
                        recv_ns: at,
                        rate_limited: false,
                        sender: SenderStart::Unknown,
                        held: 0,
                    }),
                    // What the classic filter may sample (userspace datapath).
                    Err(reason @ DropReason::Decode(_)) => {
                        let scale = drops.add_junk(reason, at);
                        if let Some(o) = overflow.as_mut() {
                            o.junk_refused += scale - 1;
                        }
                    }
                    Err(reason) => drops.add(reason),
                }
            },
        )?;
        if taken > 0
            && let Some(o) = overflow
            && let Ok(count) = crate::sys::sock::kernel_drops(self.socket.get_ref().as_fd())
        {
            let dropped = u64::from(count.wrapping_sub(o.last));
            let refused = std::mem::take(&mut o.junk_refused);
            o.last = count;
            self.drops.add_queue_full(dropped.saturating_sub(refused));
        }
        Ok(taken)
    }
}
