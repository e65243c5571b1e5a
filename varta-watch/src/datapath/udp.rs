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
        })
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
        let (frames, drops) = (&mut self.frames, &self.drops);
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
                    }),
                    // What the classic filter may sample (userspace datapath).
                    Err(reason @ DropReason::Decode(_)) => drops.add_junk(reason),
                    Err(reason) => drops.add(reason),
                }
            },
        )?;
        Ok(taken)
    }
}
