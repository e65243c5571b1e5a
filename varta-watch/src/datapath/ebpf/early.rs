//! Datagrams that reached the Unix socket before its filter was attached. A socket bound at
//! start (or passed by a service manager) queues what senders address to its path until the
//! program is attached, and the eBPF datapath never reads the socket itself: those are taken
//! once after the attach, decoded and attested as the userspace datapath does, and handed
//! over with the first drain.

use std::os::fd::AsFd;

use crate::{
    datapath::{DRAIN_BUDGET, attest::bound_sender, decode_plain},
    sys::{logger::event, recv::RecvBatch},
    vocab::beat::{Beat, Origin},
};

use super::EbpfDatapath;
use varta_common::DropReason;

impl EbpfDatapath {
    pub(super) fn take_queued_before_attach(&mut self) {
        let mut batch = RecvBatch::without_sources(64);
        let (attestation, drops, pending, clock) = (
            &self.attestation,
            &self.drops,
            &mut self.pending,
            self.clock,
        );
        let before = pending.len();
        let mut refused = 0u64;
        let drained = batch.drain(self.uds.as_fd(), self.clock, DRAIN_BUDGET, |d, at| {
            let beat = decode_plain(d.bytes, d.truncated).and_then(|frame| {
                // SO_PASSCRED is on (`sys::sock::prepare_uds`): the kernel always says who.
                let pid = d.sender_pid.ok_or(DropReason::Spoof)?;
                // Bound to the process that sent it, as the userspace datapath binds it.
                let (sender, start) = bound_sender(pid, at, clock).parts();
                let attested = attestation.check(pid, sender.as_ref(), frame.pid)?;
                Ok(Beat {
                    pid: attested.pid,
                    frame,
                    origin: Origin::Uds {
                        cross_namespace: attested.cross_namespace,
                    },
                    recv_ns: at,
                    rate_limited: false,
                    sender: start,
                    held: 0,
                })
            });
            match beat {
                Ok(beat) => pending.push(beat),
                Err(reason) => {
                    refused += 1;
                    drops.add(reason);
                }
            }
        });
        let taken = pending.len() - before;
        match drained {
            Ok(_) if taken == 0 && refused == 0 => {}
            Ok(_) => event!(
                info,
                "queued_before_filter",
                beats = taken,
                refused = refused,
            ),
            Err(e) => event!(warn, "receive_error", transport = "uds", error:% = e),
        }
    }
}
