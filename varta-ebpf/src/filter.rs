//! One program per transport, both in this order (first failure wins, every failure counted):
//! length, VLP v0.2 decode, sender attestation (UDS only), per-agent and global token
//! buckets, then a record in the ring buffer. Nothing is ever queued on the socket itself:
//! the programs return 0, so junk and over-rate frames never wake the daemon.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_hdr_start_off, bpf_pidns_info,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid, bpf_ktime_get_boot_ns,
        bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_skb_load_bytes_relative,
    },
    macros::{map, socket_filter},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::SkBuffContext,
};
use aya_log_ebpf::info;
use varta_common::{
    DropReason, FRAME_LEN, Frame, SECURE_FRAME_LEN, SECURE_MASTER_FRAME_LEN, Status,
    kernel::{
        BUCKET_ENTRIES, BeatRecord, Bucket, CLOCK_BOOTTIME, FilterConfig, KIND_BEAT, KIND_VERIFY,
        RING_BYTES, TRANSPORT_UDP4, TRANSPORT_UDP6, TRANSPORT_UDS, VERDICT_ALLOW,
        VERDICT_DENY_NAMESPACE, VERDICT_ENTRIES, VERDICT_PENDING, VERIFY_RETRY_NS, Verdict,
    },
};

use crate::ratelimit;

#[map(name = "VARTA_CONFIG")]
static VARTA_CONFIG: Array<FilterConfig> = Array::with_max_entries(1, 0);

#[map(name = "VARTA_DROPS")]
static VARTA_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT as u32, 0);

#[map(name = "VARTA_EVENTS")]
static VARTA_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "VARTA_VERDICTS")]
static VARTA_VERDICTS: LruHashMap<u32, Verdict> = LruHashMap::with_max_entries(VERDICT_ENTRIES, 0);

/// Per-agent token buckets, keyed by `agent_key`. An entry also marks the agent as seen:
/// the first beat of an agent wakes the daemon at once.
#[map(name = "VARTA_BUCKETS")]
static VARTA_BUCKETS: LruHashMap<u64, Bucket> = LruHashMap::with_max_entries(BUCKET_ENTRIES, 0);

#[map(name = "VARTA_GLOBAL")]
static VARTA_GLOBAL: Array<Bucket> = Array::with_max_entries(1, 0);

const UDP_HEADER_LEN: u32 = 8;
const ETH_P_IPV6: u32 = 0x86DD;

#[socket_filter]
pub fn varta_uds(ctx: SkBuffContext) -> i64 {
    receive(&ctx, TRANSPORT_UDS, 0);
    0
}

#[socket_filter]
pub fn varta_udp(ctx: SkBuffContext) -> i64 {
    // On a UDP socket the filter sees the datagram from its UDP header on.
    let transport = if u16::from_be(ctx.skb.protocol() as u16) as u32 == ETH_P_IPV6 {
        TRANSPORT_UDP6
    } else {
        TRANSPORT_UDP4
    };
    // Secure frames go up whole, unopened: the daemon holds the keys.
    let len = ctx.len();
    if len == UDP_HEADER_LEN + SECURE_FRAME_LEN as u32
        || len == UDP_HEADER_LEN + SECURE_MASTER_FRAME_LEN as u32
    {
        return len as i64;
    }
    receive(&ctx, transport, UDP_HEADER_LEN);
    0
}

#[inline(always)]
fn count(reason: DropReason) {
    if let Some(slot) = VARTA_DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU array slot: no other CPU writes it, and the program is not
        // re-entered on this CPU while it runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn receive(ctx: &SkBuffContext, transport: u8, payload_offset: u32) {
    let Some(cfg) = VARTA_CONFIG.get(0) else {
        return;
    };
    if ctx.len() != payload_offset + FRAME_LEN as u32 {
        count(DropReason::Length);
        return;
    }
    let mut raw = [0u8; FRAME_LEN];
    // SAFETY: `raw` is a FRAME_LEN-byte stack buffer and the length is the constant
    // FRAME_LEN, which the check above proved is present in the packet.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            payload_offset,
            raw.as_mut_ptr() as *mut _,
            FRAME_LEN as u32,
        )
    };
    if loaded != 0 {
        count(DropReason::Length);
        return;
    }
    let frame = match Frame::decode(&raw) {
        Ok(frame) => frame,
        Err(e) => {
            count(DropReason::from_decode(e));
            return;
        }
    };
    let now = if cfg.clock == CLOCK_BOOTTIME {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_boot_ns() }
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    };

    let mut record_kind = KIND_BEAT;
    let (mut host_tgid, mut observer_tgid) = (0u32, 0u32);
    // UDP agents are known only by the pid they frame; UDS agents by their real tgid.
    let mut agent_key = ((transport as u64) << 32) | frame.pid as u64;
    if transport == TRANSPORT_UDS {
        // A Unix datagram send runs the receiver's filter in the sender's context: the
        // current task is the sender.
        host_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        agent_key = host_tgid as u64;
        let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
        // SAFETY: `ns` is a writable bpf_pidns_info of exactly the size passed.
        let same_ns = unsafe {
            bpf_get_ns_current_pid_tgid(
                cfg.pidns_dev,
                cfg.pidns_ino,
                &mut ns,
                size_of::<bpf_pidns_info>() as u32,
            )
        } == 0;
        if same_ns {
            if ns.tgid != frame.pid {
                count(DropReason::Spoof);
                return;
            }
            observer_tgid = ns.tgid;
        } else {
            match attest_foreign(ctx, host_tgid, frame.pid, now) {
                Attestation::Accept => {}
                Attestation::Verify => record_kind = KIND_VERIFY,
                Attestation::Drop(reason) => {
                    count(reason);
                    return;
                }
            }
        }
    }

    let mut urgent = record_kind == KIND_VERIFY || matches!(frame.status, Status::Critical);
    if record_kind == KIND_BEAT {
        match VARTA_BUCKETS.get_ptr_mut(agent_key) {
            Some(bucket) => {
                if cfg.per_pid_rate != 0 {
                    // SAFETY: a map value pointer stays valid for the whole program run
                    // and `Bucket` is one naturally aligned u64.
                    let tat = unsafe { &raw mut (*bucket).tat_ns };
                    if !ratelimit::take(tat, now, cfg.per_pid_rate, cfg.per_pid_burst) {
                        count(DropReason::RatePerPid);
                        return;
                    }
                }
            }
            None => {
                // First beat of this agent: wake the daemon for it.
                urgent = true;
                let fresh = Bucket {
                    tat_ns: ratelimit::first_beat(now, cfg.per_pid_rate, cfg.per_pid_burst),
                };
                let _ = VARTA_BUCKETS.insert(agent_key, fresh, 0);
            }
        }
        if cfg.global_rate != 0 {
            if let Some(global) = VARTA_GLOBAL.get_ptr_mut(0) {
                // SAFETY: as above, for the single global bucket.
                let tat = unsafe { &raw mut (*global).tat_ns };
                if !ratelimit::take(tat, now, cfg.global_rate, cfg.global_burst) {
                    count(DropReason::RateGlobal);
                    return;
                }
            }
        }
    }

    let Some(mut entry) = VARTA_EVENTS.reserve::<BeatRecord>(0) else {
        count(DropReason::RingbufFull);
        return;
    };
    let mut record = BeatRecord {
        frame: raw,
        recv_ns: now,
        host_tgid,
        observer_tgid,
        kind: record_kind,
        transport,
        src_port: 0,
        _pad: 0,
        src_addr: [0; 16],
    };
    if transport != TRANSPORT_UDS {
        load_udp_source(ctx, transport, &mut record);
    }
    entry.write(record);
    if !urgent && VARTA_EVENTS.query(BPF_RB_AVAIL_DATA as u64) > cfg.wakeup_watermark as u64 {
        urgent = true;
    }
    let flags = if urgent {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}

enum Attestation {
    Accept,
    /// Unknown sender: hand the frame to the daemon to verify.
    Verify,
    Drop(DropReason),
}

/// A sender in another pid namespace frames its namespace-local pid, which the kernel cannot
/// map without walking task structs. The daemon verifies it once (`NSpid` of the host tgid)
/// and leaves its verdict here; the daemon also removes it when the process exits.
#[inline(always)]
fn attest_foreign(ctx: &SkBuffContext, host_tgid: u32, frame_pid: u32, now: u64) -> Attestation {
    match VARTA_VERDICTS.get_ptr_mut(host_tgid) {
        None => {
            let pending = Verdict {
                state: VERDICT_PENDING,
                ns_pid: 0,
                asked_ns: now,
            };
            let _ = VARTA_VERDICTS.insert(host_tgid, pending, 0);
            info!(
                ctx,
                "cross-namespace sender tgid {} framing pid {}: asking the daemon",
                host_tgid,
                frame_pid
            );
            Attestation::Verify
        }
        Some(verdict) => {
            // SAFETY: a map value pointer stays valid for the whole program run.
            let verdict = unsafe { &mut *verdict };
            match verdict.state {
                VERDICT_PENDING => {
                    if now.saturating_sub(verdict.asked_ns) > VERIFY_RETRY_NS {
                        verdict.asked_ns = now;
                        Attestation::Verify
                    } else {
                        Attestation::Drop(DropReason::AttestPending)
                    }
                }
                _ if verdict.ns_pid != frame_pid => Attestation::Drop(DropReason::Spoof),
                VERDICT_ALLOW => Attestation::Accept,
                VERDICT_DENY_NAMESPACE => Attestation::Drop(DropReason::Namespace),
                _ => Attestation::Drop(DropReason::Spoof),
            }
        }
    }
}

#[inline(always)]
fn load_udp_source(ctx: &SkBuffContext, transport: u8, record: &mut BeatRecord) {
    let mut port = [0u8; 2];
    // SAFETY: 2-byte stack buffer, constant length; the UDP header precedes the payload.
    if unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, port.as_mut_ptr() as *mut _, 2) }
        == 0
    {
        record.src_port = u16::from_be_bytes(port);
    }
    let start = bpf_hdr_start_off::BPF_HDR_START_NET;
    // SAFETY: the destination is the record's 16-byte address field, the lengths are
    // constants no larger than it; offsets are the source-address fields of IPv4 and IPv6.
    unsafe {
        if transport == TRANSPORT_UDP4 {
            bpf_skb_load_bytes_relative(
                ctx.skb.skb as *const _,
                12,
                record.src_addr.as_mut_ptr() as *mut _,
                4,
                start,
            );
        } else {
            bpf_skb_load_bytes_relative(
                ctx.skb.skb as *const _,
                8,
                record.src_addr.as_mut_ptr() as *mut _,
                16,
                start,
            );
        }
    }
}
