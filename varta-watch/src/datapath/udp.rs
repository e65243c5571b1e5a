//! The UDP socket read by the daemon: every datagram on the userspace datapath, and on the
//! eBPF datapath the secure frames the kernel filter passes up unopened (it consumes the
//! plaintext ones itself). Each wake-up drains the socket until it would block. No kernel
//! rate limit saw these frames: the observer applies the limits (`Beat::rate_limited`).

use std::{io, net::UdpSocket, os::fd::AsFd, sync::Arc};

use tokio::io::unix::AsyncFd;
use varta_common::DropReason;

use super::secure::UdpFrames;
use crate::{
    sys::clock::ClockSource,
    sys::sock::RecvBatch,
    vocab::{
        beat::{Beat, Origin, SenderStart},
        drops::DropCounters,
    },
};

const BATCH: usize = 64;

pub struct UdpReceiver {
    socket: AsyncFd<UdpSocket>,
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
            socket: crate::sys::readiness::readable(socket)?,
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

    /// Waits until the socket is readable (and clears the readiness: a datagram arriving
    /// before the drain re-arms it); at once when the last drain left datagrams queued.
    pub async fn readable(&self) -> io::Result<()> {
        if self.more {
            tokio::task::yield_now().await;
            return Ok(());
        }
        self.socket.readable().await?.clear_ready();
        Ok(())
    }

    /// Receives until the socket would block or [`super::DRAIN_BUDGET`] datagrams were taken,
    /// appending every accepted beat.
    pub fn drain(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        let (frames, drops) = (&mut self.frames, &self.drops);
        self.more = self.batch.drain(
            self.socket.get_ref().as_fd(),
            self.clock,
            super::DRAIN_BUDGET,
            |d, now| {
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
                        recv_ns: now,
                        rate_limited: false,
                        sender: SenderStart::Unknown,
                    }),
                    // What the classic filter may sample (userspace datapath).
                    Err(reason @ DropReason::Decode(_)) => drops.add_junk(reason),
                    Err(reason) => drops.add(reason),
                }
            },
        )?;
        Ok(())
    }
}
