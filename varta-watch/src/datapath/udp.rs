//! The UDP socket read by the daemon: every datagram on the userspace datapath, and on the
//! eBPF datapath the secure frames the kernel filter passes up unopened (it consumes the
//! plaintext ones itself). Each wake-up drains the socket until it would block. There the
//! kernel's rate limits never saw these frames, so the receiver applies the same limits
//! itself ([`UdpReceiver::rate_limit`]); on the userspace datapath the pipeline does.

use std::{io, net::UdpSocket, os::fd::AsFd, sync::Arc};

use tokio::io::unix::AsyncFd;

use super::{Beat, Origin, secure::UdpFrames};
use crate::{
    config::Limits, observer::drops::DropCounters, ratelimit::RateLimiter, sys::clock::ClockSource,
    sys::sock::RecvBatch,
};

const BATCH: usize = 64;

pub struct UdpReceiver {
    socket: AsyncFd<UdpSocket>,
    batch: RecvBatch,
    frames: UdpFrames,
    clock: ClockSource,
    drops: Arc<DropCounters>,
    limiter: Option<RateLimiter>,
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
            limiter: None,
        })
    }

    /// Applies the per-agent and global limits here (the eBPF datapath, whose kernel
    /// limits never see the frames this socket delivers).
    pub fn rate_limit(mut self, limits: &Limits, max_agents: usize) -> Self {
        self.limiter = Some(RateLimiter::new(limits.clone(), max_agents));
        self
    }

    /// New limits (SIGHUP).
    pub fn set_limits(&mut self, limits: &Limits) {
        if let Some(limiter) = &mut self.limiter {
            limiter.set_limits(limits.clone());
        }
    }

    pub fn socket(&self) -> &UdpSocket {
        self.socket.get_ref()
    }

    /// Waits until the socket is readable (and clears the readiness: a datagram arriving
    /// before the drain re-arms it).
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await?.clear_ready();
        Ok(())
    }

    /// Receives until the socket would block, appending every accepted beat.
    pub fn drain(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        loop {
            let n = match self.batch.recv(self.socket.get_ref().as_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let now = self.clock.now_ns();
            for i in 0..n {
                let d = self.batch.get(i);
                let Some(source) = d.source else { continue };
                let decoded = if d.truncated {
                    Err(super::secure::Refused::Length)
                } else {
                    self.frames.decode(d.bytes)
                };
                let limited =
                    |frame: varta_common::Frame, limiter: &mut Option<RateLimiter>| match limiter {
                        Some(limiter) => limiter.check(frame.pid, now).map(|()| frame),
                        None => Ok(frame),
                    };
                let decoded = decoded.and_then(|frame| {
                    limited(frame, &mut self.limiter).map_err(super::secure::Refused::Dropped)
                });
                match decoded {
                    Ok(frame) => out.push(Beat {
                        pid: frame.pid,
                        frame,
                        origin: Origin::Udp { source },
                        recv_ns: now,
                    }),
                    Err(refused) => refused.count(&self.drops),
                }
            }
            if n < BATCH {
                return Ok(());
            }
        }
    }
}
