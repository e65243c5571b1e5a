//! One program per transport, both in this order (first failure wins): length, VLP v0.2
//! decode, sender attestation (UDS only), per-agent and global token buckets, then a record in
//! the ring buffer. A routine beat of a known UDS agent takes a shorter way (`hold`): counted
//! in its `Tracked` entry in its hold slot, not the ring. `try_receive` says why a datagram is
//! refused; `finish` counts it.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RB_RING_SIZE, bpf_hdr_start_off,
    },
    helpers::{
        bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_skb_load_bytes_relative,
    },
    macros::{map, socket_filter},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::SkBuffContext,
};
use aya_log_ebpf::info;
use varta_common::{
    DropReason, FRAME_LEN, Frame, SECURE_FRAME_LEN, SECURE_MASTER_FRAME_LEN, attest,
    filter::{
        BUCKET_ENTRIES, BeatRecord, Bucket, CLOCK_BOOTTIME, FilterConfig, HOLD_SLOTS, KIND_BEAT,
        KIND_VERIFY, RING_BYTES, TRACKED_ENTRIES, TRACKED_EXIT_WATCHED, TRANSPORT_UDP4,
        TRANSPORT_UDP6, TRANSPORT_UDS, Tracked, UDP_PLAINTEXT, UDP_SECURE, VERDICT_ALLOW,
        VERDICT_DENY_NAMESPACE, VERDICT_ENTRIES, VERDICT_PENDING, VERIFY_RETRY_NS, Verdict,
        agent_key, hold_slot,
    },
    frame::UDP_HEADER_LEN,
    ratelimit::{self, Limit, TatCell},
    wakeup,
};

use crate::{
    attest::{self as senders, Attest},
    ratelimit::MapCell,
};

// The statics are named as `varta_common::filter::map` names them (the macro's `name = ..`
// takes only a literal; a varta-watch test checks the object against those names).

#[map]
static VARTA_CONFIG: Array<FilterConfig> = Array::with_max_entries(1, 0);

#[map]
static VARTA_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT as u32, 0);

#[map]
static VARTA_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
static VARTA_VERDICTS: LruHashMap<u32, Verdict> = LruHashMap::with_max_entries(VERDICT_ENTRIES, 0);

/// Per-agent token buckets, keyed by `agent_key`. An entry also marks the agent as seen:
/// the first beat of an agent wakes the daemon at once.
#[map]
static VARTA_BUCKETS: LruHashMap<u64, Bucket> = LruHashMap::with_max_entries(BUCKET_ENTRIES, 0);

#[map]
static VARTA_GLOBAL: Array<Bucket> = Array::with_max_entries(1, 0);

/// Agents the daemon tracks (entries written by the daemon; see `Tracked`), read for
/// presence. Not preallocated: it holds as many entries as the tracker, not its maximum.
#[map]
static VARTA_TRACKED: HashMap<u64, Tracked> =
    HashMap::with_max_entries(TRACKED_ENTRIES, BPF_F_NO_PREALLOC);

/// The entries of agents whose routine beats are held, by `hold_slot` of their host tgid:
/// an array lookup is a bounds check and an add, where the hash map's cost a fifth of
/// the filter's time per beat (`bpf_stats`, 160k beats/s).
#[map]
static VARTA_HOLD: Array<Tracked> = Array::with_max_entries(HOLD_SLOTS, 0);

const ETH_P_IPV6: u32 = 0x86DD;

// The record's source address is zeroed a word at a time.
const _: () = assert!(
    core::mem::offset_of!(BeatRecord, src_addr) % 8 == 0
        && core::mem::align_of::<BeatRecord>() == 8
);

#[socket_filter]
pub fn varta_uds(ctx: SkBuffContext) -> i64 {
    finish(try_receive::<senders::PidTgidHelper>(
        &ctx,
        TRANSPORT_UDS,
        0,
    ))
}

#[socket_filter]
pub fn varta_uds_task_read(ctx: SkBuffContext) -> i64 {
    finish(try_receive::<senders::TaskRead>(&ctx, TRANSPORT_UDS, 0))
}

#[socket_filter]
pub fn varta_udp(ctx: SkBuffContext) -> i64 {
    // On a UDP socket the filter sees the datagram from its UDP header on.
    let transport = if u16::from_be(ctx.skb.protocol() as u16) as u32 == ETH_P_IPV6 {
        TRANSPORT_UDP6
    } else {
        TRANSPORT_UDP4
    };
    let accept = VARTA_CONFIG.get(0).map_or(0, |cfg| cfg.udp_accept);
    // Secure frames go up whole, unopened, on the socket itself: the daemon holds the keys.
    let len = ctx.len();
    if len == UDP_HEADER_LEN + SECURE_FRAME_LEN as u32
        || len == UDP_HEADER_LEN + SECURE_MASTER_FRAME_LEN as u32
    {
        if accept & UDP_SECURE != 0 {
            return len as i64;
        }
        return finish(Err(DropReason::Length));
    }
    // A port for secure frames only: a plaintext frame claims a pid nobody vouches for.
    if accept & UDP_PLAINTEXT == 0 && len == UDP_HEADER_LEN + FRAME_LEN as u32 {
        return finish(Err(DropReason::Plaintext));
    }
    finish(try_receive::<senders::Unattested>(
        &ctx,
        transport,
        UDP_HEADER_LEN,
    ))
}

/// Where every refused datagram is counted. The program's return value is always 0: nothing
/// is queued on the socket itself, so junk and over-rate frames never wake the daemon.
#[inline(always)]
fn finish(outcome: Result<Accepted, DropReason>) -> i64 {
    if let Err(reason) = outcome {
        if let Some(slot) = VARTA_DROPS.get_ptr_mut(reason.index() as u32) {
            // SAFETY: a per-CPU array slot: no other CPU writes it, and the program is not
            // re-entered on this CPU while it runs.
            unsafe { *slot += 1 };
        }
    }
    0
}

/// A datagram handed to the daemon through the ring buffer.
struct Accepted;

/// The frame on the stack, aligned so that the CRC's four-byte words are single loads (BPF
/// has no unaligned loads: from a byte array each word is assembled from four).
#[repr(C, align(8))]
struct WordAligned([u8; FRAME_LEN]);

#[inline(always)]
fn try_receive<A: Attest>(
    ctx: &SkBuffContext,
    transport: u8,
    payload_offset: u32,
) -> Result<Accepted, DropReason> {
    let Some(cfg) = VARTA_CONFIG.get(0) else {
        // Unreachable: slot 0 of a one-entry array always exists (zeroed until the daemon
        // writes it, which it does before attaching); the verifier needs the check.
        return Ok(Accepted);
    };
    if ctx.len() != payload_offset + FRAME_LEN as u32 {
        return Err(DropReason::Length);
    }
    // Not zeroed first (a zeroed byte array is zeroed by a call to a byte-at-a-time memset
    // subprogram); the helper fills it. Decoded as bytes, the CRC's four-byte words read as
    // single loads (`WordAligned`); not as u64 words: from those LLVM extracts the CRC's
    // bytes with shifts and reorders its table index so that the verifiers of Linux 5.10
    // and 6.1 lose the index's bound.
    let mut raw = MaybeUninit::<WordAligned>::uninit();
    // SAFETY: `raw` is a FRAME_LEN-byte stack buffer the helper may write uninitialised
    // (ARG_PTR_TO_UNINIT_MEM), and the length is the constant FRAME_LEN, which the check
    // above proved is present in the packet.
    if unsafe { load_frame(ctx, payload_offset, &raw mut (*raw.as_mut_ptr()).0) } != 0 {
        return Err(DropReason::Length);
    }
    // SAFETY: the helper succeeded, so it wrote all FRAME_LEN bytes.
    let raw = unsafe { raw.assume_init() };
    let frame = Frame::decode(&raw.0)?;
    let now = if cfg.clock == CLOCK_BOOTTIME {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_boot_ns() }
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    };

    let per_agent = Limit::new(cfg.per_pid_rate, cfg.per_pid_burst);
    let global = Limit::new(cfg.global_rate, cfg.global_burst);
    if transport == TRANSPORT_UDS
        && cfg.hold_routine != 0
        && let Some(host_tgid) = A::host_tgid(cfg)
        && hold(host_tgid, &frame, per_agent, global, now)?
    {
        return Ok(Accepted);
    }

    let mut record_kind = KIND_BEAT;
    let (mut host_tgid, mut observer_tgid, mut start_ticks) = (0u32, 0u32, 0u32);
    if transport == TRANSPORT_UDS {
        let sender = A::sender(cfg)?;
        host_tgid = sender.host_tgid;
        start_ticks = sender.start_ticks;
        match sender.observer_tgid {
            Some(tgid) => {
                attest::decide(frame.pid, tgid, false, true)?;
                observer_tgid = tgid;
            }
            None => {
                if attest_foreign(host_tgid, frame.pid, now)? {
                    record_kind = KIND_VERIFY;
                }
            }
        }
    }

    // A question to the daemon is admitted like a beat: it is an untracked sender's frame,
    // so the global bucket applies (fork churn in a container buys no more records, wake-ups
    // and /proc reads than any other flood), and a sender asked again pays its own bucket.
    let mut buckets = KernelBuckets::new(None);
    let new_agent = ratelimit::admit(
        &mut buckets,
        agent_key(transport, host_tgid, frame.pid),
        per_agent,
        global,
        now,
    )?;
    if record_kind == KIND_VERIFY {
        info!(
            ctx,
            "cross-namespace sender tgid {} framing pid {}: asking the daemon",
            host_tgid,
            frame.pid
        );
    }

    let Some(mut entry) = VARTA_EVENTS.reserve::<BeatRecord>(0) else {
        return Err(DropReason::RingbufFull);
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is the reserved BeatRecord: every field is written here, once, by
    // plain stores, the frame by the load helper straight from the packet again (a
    // whole-struct write, or a copy of `raw`, is a call to a byte-at-a-time memcpy).
    unsafe {
        if load_frame(ctx, payload_offset, &raw mut (*record).frame) != 0 {
            entry.discard(0);
            return Err(DropReason::Length);
        }
        (*record).recv_ns = now;
        (*record).host_tgid = host_tgid;
        (*record).observer_tgid = observer_tgid;
        (*record).kind = record_kind;
        (*record).transport = transport;
        (*record).src_port = 0;
        (*record).start_ticks = start_ticks;
        // Volatile: two plain zero stores would be merged back into a memset call.
        let addr_words = &raw mut (*record).src_addr as *mut u64;
        addr_words.write_volatile(0);
        addr_words.add(1).write_volatile(0);
        if transport != TRANSPORT_UDS {
            load_udp_source(ctx, transport, &mut *record);
        }
    }
    let wake = wakeup::wake_now(record_kind == KIND_VERIFY, frame.status, new_agent, || {
        (
            VARTA_EVENTS.query(BPF_RB_AVAIL_DATA as u64),
            VARTA_EVENTS.query(BPF_RB_RING_SIZE as u64),
        )
    });
    entry.submit(if wake {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64);
    if record_kind == KIND_BEAT {
        let pid = match (transport, observer_tgid) {
            (TRANSPORT_UDS, 0) => host_tgid,
            (TRANSPORT_UDS, tgid) => tgid,
            _ => frame.pid,
        };
        let key = agent_key(transport, host_tgid, frame.pid);
        note_last_beat(&buckets, key, now, pid, frame.pid);
        if transport == TRANSPORT_UDS {
            note_watched_beat(host_tgid, &frame);
        }
    }
    Ok(Accepted)
}

/// Rule 6 of `varta_common::wakeup`: a routine beat of an agent whose exit the daemon
/// watches, from the sender attested before, is admitted and counted in the agent's
/// `Tracked` entry in its hold slot, never put in the ring. `Ok(false)`: not such a beat
/// (or another agent owns the slot), it takes the full path.
#[inline(always)]
fn hold(
    host_tgid: u32,
    frame: &Frame,
    per_agent: Option<Limit>,
    global: Option<Limit>,
    now: u64,
) -> Result<bool, DropReason> {
    let Some(tracked) = VARTA_HOLD.get_ptr_mut(hold_slot(host_tgid)) else {
        return Ok(false);
    };
    // SAFETY: a map value pointer stays valid for the whole program run; the fields are
    // plain integers other CPUs and the daemon may write meanwhile (a torn read only sends
    // a beat the full way, or counts it in a slot the daemon is rewriting for this very
    // agent, as a beat held just before the write).
    let (owner, state, frame_pid, status, nonce) = unsafe {
        (
            (*tracked).tgid,
            (*tracked).state,
            (*tracked).frame_pid,
            (*tracked).status,
            (*tracked).nonce,
        )
    };
    if owner != host_tgid
        || state != TRACKED_EXIT_WATCHED
        || frame_pid != frame.pid
        || !wakeup::hold(frame.status, frame.nonce, status, nonce)
    {
        return Ok(false);
    }
    // Without limits there is no bucket to charge (nor to create: held beats need none).
    if per_agent.is_some() || global.is_some() {
        let mut buckets = KernelBuckets::new(Some(true));
        let key = agent_key(TRANSPORT_UDS, host_tgid, frame.pid);
        ratelimit::admit(&mut buckets, key, per_agent, global, now)?;
    }
    // SAFETY: as above; `held` is a naturally aligned u64, counted with an atomic add (one
    // agent's threads may beat on several CPUs at once).
    unsafe {
        (*tracked).last_ns = now;
        (*tracked).nonce = frame.nonce;
        MapCell::new(&raw mut (*tracked).held).fetch_add(1);
    }
    Ok(true)
}

/// A beat of a watched agent that went through the ring: its nonce and status are what
/// rule 6 (`hold`) compares the agent's next beats with.
#[inline(always)]
fn note_watched_beat(host_tgid: u32, frame: &Frame) {
    let Some(tracked) = VARTA_HOLD.get_ptr_mut(hold_slot(host_tgid)) else {
        return;
    };
    // SAFETY: a map value pointer stays valid for the whole program run.
    unsafe {
        if (*tracked).tgid == host_tgid && (*tracked).state == TRACKED_EXIT_WATCHED {
            (*tracked).nonce = frame.nonce;
            (*tracked).status = frame.status as u8;
        }
    }
}

/// The agent's last queued beat, in its bucket: a daemon starting on the pinned maps learns
/// from it every agent the kernel saw and when it last beat (`Bucket::last_ns`).
/// The bucket admission found, else (a first beat: admission created it) looked up.
#[inline(always)]
fn note_last_beat(buckets: &KernelBuckets, key: u64, now: u64, pid: u32, frame_pid: u32) {
    let bucket = if buckets.found.is_null() {
        match VARTA_BUCKETS.get_ptr_mut(key) {
            Some(bucket) => bucket,
            None => return,
        }
    } else {
        buckets.found
    };
    // SAFETY: a map value pointer stays valid for the whole program run.
    unsafe {
        (*bucket).last_ns = now;
        (*bucket).pid = pid;
        (*bucket).frame_pid = frame_pid;
    }
}

/// The buckets of `ratelimit::admit` in the kernel's maps: per agent in `VARTA_BUCKETS`
/// (created with its first beat), the global one in `VARTA_GLOBAL`, tracked agents in
/// `VARTA_TRACKED` (written by the daemon).
struct KernelBuckets {
    /// The agent's bucket as `agent` found it: its last beat is noted there without a
    /// second lookup.
    found: *mut Bucket,
    /// Whether the daemon tracks the agent, when already known.
    tracked: Option<bool>,
}

impl KernelBuckets {
    #[inline(always)]
    fn new(tracked: Option<bool>) -> Self {
        KernelBuckets {
            found: core::ptr::null_mut(),
            tracked,
        }
    }
}

impl ratelimit::Buckets for KernelBuckets {
    type Cell<'a> = MapCell;

    #[inline(always)]
    fn agent(&mut self, key: u64) -> Option<MapCell> {
        let bucket = VARTA_BUCKETS.get_ptr_mut(key)?;
        self.found = bucket;
        // SAFETY: a map value pointer stays valid for the whole program run and `Bucket`'s
        // clock is a naturally aligned u64.
        Some(unsafe { MapCell::new(&raw mut (*bucket).tat_ns) })
    }

    #[inline(always)]
    fn create(&mut self, key: u64, tat: u64) {
        let fresh = Bucket {
            tat_ns: tat,
            last_ns: 0,
            pid: 0,
            frame_pid: 0,
        };
        let _ = VARTA_BUCKETS.insert(key, fresh, 0);
    }

    #[inline(always)]
    fn tracked(&mut self, key: u64) -> bool {
        if let Some(tracked) = self.tracked {
            return tracked;
        }
        // SAFETY: a lookup whose value is only tested for presence.
        let tracked = unsafe { VARTA_TRACKED.get(&key) }.is_some();
        self.tracked = Some(tracked);
        tracked
    }

    #[inline(always)]
    fn global(&mut self) -> Option<MapCell> {
        let global = VARTA_GLOBAL.get_ptr_mut(0)?;
        // SAFETY: as above, for the single global bucket.
        Some(unsafe { MapCell::new(&raw mut (*global).tat_ns) })
    }
}

/// A sender in another pid namespace frames its namespace-local pid, which the kernel cannot
/// map without walking task structs. The daemon verifies it once (`NSpid` of the host tgid)
/// and leaves its verdict here; the daemon also removes it when the process exits.
/// `Ok(true)`: unknown sender, hand the frame to the daemon to verify (if the buckets
/// admit it; else it is asked again after `VERIFY_RETRY_NS`).
#[inline(always)]
fn attest_foreign(host_tgid: u32, frame_pid: u32, now: u64) -> Result<bool, DropReason> {
    match VARTA_VERDICTS.get_ptr_mut(host_tgid) {
        None => {
            let pending = Verdict {
                state: VERDICT_PENDING,
                ns_pid: 0,
                asked_ns: now,
            };
            let _ = VARTA_VERDICTS.insert(host_tgid, pending, 0);
            Ok(true)
        }
        Some(verdict) => {
            // SAFETY: a map value pointer stays valid for the whole program run.
            let verdict = unsafe { &mut *verdict };
            match verdict.state {
                VERDICT_PENDING => {
                    if now.saturating_sub(verdict.asked_ns) > VERIFY_RETRY_NS {
                        verdict.asked_ns = now;
                        Ok(true)
                    } else {
                        Err(DropReason::AttestPending)
                    }
                }
                // The daemon's verdict on the namespace policy, and the sender's own pid.
                VERDICT_ALLOW => {
                    attest::decide(frame_pid, verdict.ns_pid, true, true).map(|()| false)
                }
                VERDICT_DENY_NAMESPACE => {
                    attest::decide(frame_pid, verdict.ns_pid, true, false).map(|()| false)
                }
                _ => Err(DropReason::Spoof),
            }
        }
    }
}

/// Copies the frame, `FRAME_LEN` bytes from `offset` of the packet, into `to`; 0 on success.
///
/// # Safety
/// `to` is FRAME_LEN writable bytes (the verifier checks it too), and the caller checked
/// that the packet holds FRAME_LEN bytes from `offset`.
#[inline(always)]
unsafe fn load_frame(ctx: &SkBuffContext, offset: u32, to: *mut [u8; FRAME_LEN]) -> i64 {
    // SAFETY: the caller's contract.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset,
            to as *mut _,
            FRAME_LEN as u32,
        )
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
