//! From ring-buffer records to beats: the record's transport and attestation become the
//! beat's origin, and a cross-namespace sender the kernel asked about is verified here once
//! (its verdict goes back to the kernel for its next frames).

use crate::sys::logger::event;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use varta_common::{
    DropReason, Frame,
    filter::{
        BeatRecord, KIND_VERIFY, TRANSPORT_UDP4, TRANSPORT_UDP6, TRANSPORT_UDS, UDP_PLAINTEXT,
        VERDICT_ALLOW, VERDICT_DENY_NAMESPACE, Verdict, agent_key,
    },
};

use super::EbpfDatapath;
use crate::{
    sys::{pidfd::ExitWatcher, procfs},
    vocab::beat::{Beat, Origin, SenderStart},
};

impl EbpfDatapath {
    /// Everything in the ring buffer now, as beats.
    pub(super) fn drain_ring(&mut self, out: &mut Vec<Beat>) {
        // Reused between drains: a drain at a high rate holds thousands of records.
        let mut records = std::mem::take(&mut self.records);
        {
            let ring = self.ring.get_mut();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<BeatRecord>() {
                    event!(error, "ebpf_record_short", len = item.len());
                } else {
                    // SAFETY: the item holds at least one BeatRecord, written by the
                    // program as a whole; the read copes with any alignment.
                    records.push(unsafe {
                        std::ptr::read_unaligned(item.as_ptr() as *const BeatRecord)
                    });
                }
            }
        }
        for rec in records.drain(..) {
            self.handle(&rec, out);
        }
        self.records = records;
    }

    fn handle(&mut self, rec: &BeatRecord, out: &mut Vec<Beat>) {
        // The filter decoded these bytes, CRC included: not computed again.
        let Ok(frame) = Frame::decode_accepted(&rec.frame) else {
            // The kernel validated it with the same decoder: this cannot happen.
            event!(error, "ebpf_record_invalid", transport = rec.transport);
            return;
        };
        let origin = match rec.transport {
            TRANSPORT_UDS if rec.kind == KIND_VERIFY => match self.verify(rec.host_tgid, &frame) {
                Ok(()) => Origin::Uds {
                    cross_namespace: true,
                },
                Err(reason) => {
                    self.drops.add(reason);
                    return;
                }
            },
            // The kernel found a verdict for it: a verified sender from another namespace.
            TRANSPORT_UDS => Origin::Uds {
                cross_namespace: rec.observer_tgid == 0,
            },
            TRANSPORT_UDP4 | TRANSPORT_UDP6
                if self.filter_config.udp_accept & UDP_PLAINTEXT == 0 =>
            {
                // The kernel drops these already; a record means its config was not ours.
                self.drops.add(DropReason::Plaintext);
                return;
            }
            TRANSPORT_UDP4 | TRANSPORT_UDP6 => {
                let ip = if rec.transport == TRANSPORT_UDP4 {
                    IpAddr::V4(Ipv4Addr::new(
                        rec.src_addr[0],
                        rec.src_addr[1],
                        rec.src_addr[2],
                        rec.src_addr[3],
                    ))
                } else {
                    IpAddr::V6(Ipv6Addr::from(rec.src_addr))
                };
                Origin::Udp {
                    source: SocketAddr::new(ip, rec.src_port),
                }
            }
            other => {
                event!(error, "ebpf_record_invalid", transport = other);
                return;
            }
        };
        let pid = match origin {
            Origin::Uds {
                cross_namespace: false,
            } => rec.observer_tgid,
            Origin::Uds {
                cross_namespace: true,
            } => rec.host_tgid,
            Origin::Udp { .. } => frame.pid,
        };
        if rec.transport == TRANSPORT_UDS {
            let key = agent_key(rec.transport, rec.host_tgid, frame.pid);
            self.confirm(pid, key, &frame, &origin);
        }
        out.push(Beat {
            pid,
            frame,
            origin,
            recv_ns: rec.recv_ns,
            rate_limited: true,
            sender: SenderStart::from_record(rec.start_ticks),
            held: 0,
        });
    }

    /// A sender in another pid namespace the kernel has no verdict for: check its frame pid
    /// against its own `NSpid`, and leave the verdict in the kernel for its next frames.
    fn verify(&mut self, tgid: u32, frame: &Frame) -> Result<(), DropReason> {
        let known =
            ExitWatcher::open(tgid).and_then(|pidfd| procfs::sender(tgid).map(|s| (pidfd, s)));
        let Ok((pidfd, sender)) = known else {
            // Gone already: nothing to attest; its next frame (if any) asks again.
            let _ = self.verdicts.remove(&tgid);
            return Err(DropReason::Spoof);
        };
        if !sender.cross_namespace {
            let _ = self.verdicts.remove(&tgid);
            return Err(DropReason::Spoof);
        }
        // The verdict is about the sender, for all its frames: the namespace policy, and the
        // one pid it may frame. This frame is then checked like any other.
        let state = match self.attestation.admits(true) {
            Ok(()) => VERDICT_ALLOW,
            Err(_) => VERDICT_DENY_NAMESPACE,
        };
        let verdict = Verdict {
            state,
            ns_pid: sender.own_pid,
            asked_ns: 0,
        };
        // A verdict must die with its process (a reused pid must not inherit it): without a
        // watcher (the descriptor budget is spent) none is stored, and the sender's next
        // frame is attested here again. A sender verified before (its verdict fell out of
        // the kernel's LRU) is watched already: one watch per process.
        if !self.keep_watch(tgid, pidfd) {
            return self
                .attestation
                .check(tgid, Some(&sender), frame.pid)
                .map(drop);
        }
        if let Err(e) = self.verdicts.insert(tgid, verdict, 0) {
            event!(warn, "ebpf_verdict_failed", tgid = tgid, error:% = e);
        }
        event!(
            info,
            "cross_namespace_sender",
            tgid = tgid,
            own_pid = sender.own_pid,
            frame_pid = frame.pid,
            verdict = if state == VERDICT_ALLOW {
                "allow"
            } else {
                "deny_namespace"
            },
        );
        self.attestation
            .check(tgid, Some(&sender), frame.pid)
            .map(drop)
    }

    /// A watched process exited: its pid may be reused by anyone, so its verdict goes, and
    /// the kernel holds no more beats under it (those held are folded in first).
    pub(super) fn forget(&mut self, tgid: u32, out: &mut Vec<Beat>) {
        self.watched.remove(&tgid);
        let _ = self.verdicts.remove(&tgid);
        let key = agent_key(TRANSPORT_UDS, tgid, tgid);
        if self.tracked_keys.get(&tgid) == Some(&key) {
            // The write folds in what the entry held; those beats follow the queued ones.
            let _ = self.write_tracked(tgid, key, None);
            self.drain_queued(out);
        }
        self.unconfirmed.remove(&key);
    }
}
