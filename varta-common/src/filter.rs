//! The socket filter object (`varta-ebpf`) and the daemon's side of it: the names the daemon
//! looks up in the object, the ring-buffer record, the filter's configuration and the
//! attestation verdicts for cross-namespace senders. One module for the one object, as the
//! kernel and userspace must agree on every item here.

use crate::frame::FRAME_LEN;

/// The object's programs (the `#[socket_filter]` function names).
pub mod program {
    /// Unix datagram socket, attesting with [`super::Attest::PidTgidHelper`].
    pub const UDS_PID_TGID_HELPER: &str = "varta_uds";
    /// Unix datagram socket, attesting with [`super::Attest::TaskRead`].
    pub const UDS_TASK_READ: &str = "varta_uds_task_read";
    /// The UDP sockets (no sender attestation).
    pub const UDP: &str = "varta_udp";
    pub const ALL: [&str; 3] = [UDS_PID_TGID_HELPER, UDS_TASK_READ, UDP];
}

/// How the UDS program learns who sent a datagram. Both give the sender's host tgid and
/// whether it lives in the observer's pid namespace; the kernel decides which may load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attest {
    /// `bpf_get_current_pid_tgid` and `bpf_get_ns_current_pid_tgid`: socket filters may call
    /// them from Linux 6.10 on.
    PidTgidHelper,
    /// `bpf_get_current_task` and `bpf_probe_read_kernel` of `task_struct.tgid` and the
    /// sender's pid namespace level, at offsets the daemon reads from the kernel's BTF
    /// ([`TaskOffsets`]). Needs CAP_PERFMON and an observer in the initial pid namespace.
    TaskRead,
}

impl Attest {
    /// Preferred first.
    pub const ALL: [Attest; 2] = [Attest::PidTgidHelper, Attest::TaskRead];

    /// The `attest` label of `varta_datapath_info` and the `event=ready` line.
    pub const fn name(self) -> &'static str {
        match self {
            Attest::PidTgidHelper => "pid_tgid_helper",
            Attest::TaskRead => "task_read",
        }
    }

    pub const fn uds_program(self) -> &'static str {
        match self {
            Attest::PidTgidHelper => program::UDS_PID_TGID_HELPER,
            Attest::TaskRead => program::UDS_TASK_READ,
        }
    }
}

/// The object's maps. `#[map(name = ..)]` takes only a literal, so the filter's statics carry
/// these names as their identifiers; a varta-watch test checks the built object against them.
pub mod map {
    /// `Array<FilterConfig>`, one entry.
    pub const CONFIG: &str = "VARTA_CONFIG";
    /// `PerCpuArray<u64>`, one counter per `DropReason::index`.
    pub const DROPS: &str = "VARTA_DROPS";
    /// `RingBuf` of `BeatRecord`s.
    pub const EVENTS: &str = "VARTA_EVENTS";
    /// `LruHashMap<u32 host tgid, Verdict>`.
    pub const VERDICTS: &str = "VARTA_VERDICTS";
    /// `LruHashMap<u64 agent key, Bucket>`.
    pub const BUCKETS: &str = "VARTA_BUCKETS";
    /// `Array<Bucket>`, one entry: the global bucket.
    pub const GLOBAL: &str = "VARTA_GLOBAL";
    /// `HashMap<u64 agent key, Tracked>`: agents the daemon tracks, written by the daemon;
    /// the global bucket does not apply to them (`ratelimit::global_applies`).
    pub const TRACKED: &str = "VARTA_TRACKED";
    /// `Array<Tracked>` of [`super::HOLD_SLOTS`], indexed by [`super::hold_slot`]: the
    /// entries of the UDS agents whose routine beats the kernel holds (`wakeup` rule 6),
    /// each owned by its [`Tracked::tgid`](super::Tracked::tgid).
    pub const HOLD: &str = "VARTA_HOLD";
    pub const ALL: [&str; 8] = [
        CONFIG, DROPS, EVENTS, VERDICTS, BUCKETS, GLOBAL, TRACKED, HOLD,
    ];
}

/// The layout of the maps and of [`BeatRecord`] as a version: part of the directory the maps
/// are pinned in (`<pin root>/<socket>/v<N>`), so a build with other layouts never opens pins
/// it would misread. Raise it with any change to a map's key, value, type or meaning.
/// 2: [`Bucket`] holds the agent's last accepted beat.
/// 3: `DropReason::Plaintext` (one more drop counter), [`FilterConfig::udp_accept`].
/// 4: `DropReason::Auth` and `DropReason::Decrypt` (two more drop counters).
/// 5: [`BeatRecord::start_ticks`] (the sender's start time, was padding), two more
/// [`TaskOffsets`].
/// 6: [`map::TRACKED`] holds a [`Tracked`] (routine beats kept out of the ring, `wakeup` rule
/// 6), [`FilterConfig::hold_routine`].
/// 7: held beats are counted in [`map::HOLD`], found by index (an array slot: the hash
/// lookup was a fifth of the filter's time per beat), [`Tracked::tgid`].
pub const LAYOUT_VERSION: u32 = 7;

/// Where the maps are pinned unless `--bpf-pin-dir` says otherwise (a bpffs, mounted by the
/// daemon when absent).
pub const PIN_ROOT: &str = "/sys/fs/bpf/varta";

/// The ring buffer's size in the object, and the least the daemon asks for (a power of two,
/// a multiple of the page size).
pub const RING_BYTES: u32 = 1 << 20;
/// The most the daemon asks for: the ring's pages are mapped into the daemon (its data
/// area twice), so each MiB here is two MiB of resident memory. Above this the watermark
/// wake-up (a quarter full) and the daemon's CPU share must keep up instead.
pub const RING_BYTES_MAX: u32 = 4 << 20;
/// What one record takes in the ring: the record and the ring's 8-byte header, 8-aligned.
pub const RING_RECORD_BYTES: u32 = (core::mem::size_of::<BeatRecord>() as u32 + 8 + 7) & !7;

/// The ring buffer the daemon asks for at load: room for every tracked agent's whole burst at
/// once (`capacity` x `burst` records), so agents within their rate cannot overflow it even
/// all together, as far as [`RING_BYTES_MAX`] allows; a power of two, at least
/// [`RING_BYTES`]. The default tracker (256 agents, 100 beats/s) gets 2 MiB.
pub const fn ring_bytes(capacity: u32, burst: u32) -> u32 {
    let want = capacity as u64 * burst as u64 * RING_RECORD_BYTES as u64;
    if want <= RING_BYTES as u64 {
        RING_BYTES
    } else if want >= RING_BYTES_MAX as u64 {
        RING_BYTES_MAX
    } else {
        want.next_power_of_two() as u32
    }
}
/// Most agents whose cross-namespace verdict the kernel remembers (LRU).
pub const VERDICT_ENTRIES: u32 = 8192;
/// Most agents whose per-agent token bucket the kernel keeps (LRU).
pub const BUCKET_ENTRIES: u32 = 16384;
/// Most tracked agents the kernel knows as such (the daemon's `--tracker-capacity` above
/// this: the agents beyond it are charged to the global bucket like new senders).
pub const TRACKED_ENTRIES: u32 = 65536;
/// Slots of [`map::HOLD`] (a power of two; preallocated, 48 bytes each).
pub const HOLD_SLOTS: u32 = 16384;

/// The slot of [`map::HOLD`] a UDS agent's held beats go to. Pids are handed out in
/// sequence, so the low bits spread live processes over the slots; two agents whose host
/// tgids share them share a slot, which only the first owns (the other's beats all go
/// through the ring, as before the kernel held any).
pub const fn hold_slot(host_tgid: u32) -> u32 {
    host_tgid & (HOLD_SLOTS - 1)
}

/// [`Tracked::state`]: the daemon tracks the agent.
pub const TRACKED: u8 = 1;
/// [`Tracked::state`]: the daemon tracks the agent, watches its process's exit (upon which it
/// sets [`TRACKED`] again: a pid is reused only after its process exited), and wrote the
/// entry from a beat the kernel attested after the watch began: the kernel holds the
/// agent's routine beats (`wakeup` rule 6) without attesting each again.
pub const TRACKED_EXIT_WATCHED: u8 = 2;

/// An agent the daemon tracks, in [`map::TRACKED`] and, when the kernel may hold its beats,
/// in its [`map::HOLD`] slot. The daemon writes whole entries; the kernel reads
/// [`map::TRACKED`] for presence only, and writes into a slot only in state
/// [`TRACKED_EXIT_WATCHED`] and owned by the sender: the last beat's nonce and status (any
/// beat it accepts) and the routine beats it holds (`wakeup` rule 6), which the daemon
/// folds in from there. A flood cannot push an entry out (neither map is an LRU: only the
/// daemon adds and removes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tracked {
    /// [`TRACKED`] or [`TRACKED_EXIT_WATCHED`].
    pub state: u8,
    /// The last accepted beat's status (`Status` as on the wire).
    pub status: u8,
    /// The attested sender lives in another pid namespace than the observer.
    pub cross_namespace: u8,
    pub _pad: u8,
    /// The pid the attested sender frames (for its key, its host tgid, the only one
    /// `attest::decide` lets it frame).
    pub frame_pid: u32,
    /// The host tgid of the UDS agent owning the [`map::HOLD`] slot (0: a free slot).
    pub tgid: u32,
    pub _pad2: u32,
    /// The last accepted beat's nonce.
    pub nonce: u64,
    /// Receive time (`FilterConfig::clock`) of the last held beat (0: none).
    pub last_ns: u64,
    /// Routine beats held since the daemon wrote the entry.
    pub held: u64,
    /// When the daemon wrote the entry (its clock): tells an entry written again (`held`
    /// restarted) from the one it read before.
    pub since_ns: u64,
}
/// A pending verification that got no verdict is asked again after this long.
pub const VERIFY_RETRY_NS: u64 = 1_000_000_000;

/// `BeatRecord::kind`.
pub const KIND_BEAT: u8 = 0;
/// A cross-namespace sender the kernel has no verdict for: the daemon checks the frame pid
/// against `NSpid` of `host_tgid` and answers in [`map::VERDICTS`].
pub const KIND_VERIFY: u8 = 1;

/// `BeatRecord::transport`.
pub const TRANSPORT_UDS: u8 = 0;
pub const TRANSPORT_UDP4: u8 = 1;
pub const TRANSPORT_UDP6: u8 = 2;

/// One accepted datagram, kernel to daemon.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BeatRecord {
    /// The validated 32-byte frame as it came off the wire.
    pub frame: [u8; FRAME_LEN],
    /// Kernel receive time on the configured clock (`FilterConfig::clock`).
    pub recv_ns: u64,
    /// UDS: the sender's tgid in the initial pid namespace (0 for UDP).
    pub host_tgid: u32,
    /// UDS: the sender's tgid in the observer's pid namespace; 0 when the sender lives in
    /// another pid namespace (or for UDP).
    pub observer_tgid: u32,
    pub kind: u8,
    pub transport: u8,
    /// UDP source port, host byte order.
    pub src_port: u16,
    /// UDS: when the sending process started, in clock ticks since boot, modulo 2^32
    /// ([`start_ticks`] of its thread-group leader's `start_boottime`: the low 32 bits of
    /// field 22 of `/proc/<pid>/stat`), so the daemon can tell the sender from a process
    /// that took its pid before /proc was read; 0 when unknown (no BTF offsets, or UDP).
    pub start_ticks: u32,
    /// UDP source address: IPv4 in the first 4 bytes, or IPv6.
    pub src_addr: [u8; 16],
}

/// Nanoseconds per clock tick of `/proc/<pid>/stat` (`USER_HZ`, 100 on every architecture
/// the observer runs on).
pub const NS_PER_CLOCK_TICK: u64 = 10_000_000;

/// [`BeatRecord::start_ticks`] of a process that started at `start_boottime_ns`: what the
/// kernel's `nsec_to_clock_t` makes of it for /proc, low 32 bits (0 stays unknown).
#[inline(always)]
pub const fn start_ticks(start_boottime_ns: u64) -> u32 {
    (start_boottime_ns / NS_PER_CLOCK_TICK) as u32
}

/// `FilterConfig::udp_accept`: 32-byte plaintext frames (`--i-accept-plaintext-udp`).
/// Without it a plaintext frame is dropped in the kernel as [`crate::DropReason::Plaintext`].
pub const UDP_PLAINTEXT: u32 = 1;
/// `FilterConfig::udp_accept`: secure frame lengths go up to the daemon, which holds keys.
/// Without it (no key configured) they are dropped in the kernel as a bad length.
pub const UDP_SECURE: u32 = 2;

pub const CLOCK_MONOTONIC: u32 = 0;
pub const CLOCK_BOOTTIME: u32 = 1;

/// The program's run-time configuration: one entry of the [`map::CONFIG`] array, rewritten by
/// the daemon when its settings change (no program reload).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterConfig {
    /// Beats per second per agent; 0 disables the per-agent limit.
    pub per_pid_rate: u32,
    pub per_pid_burst: u32,
    /// Beats per second from all senders; 0 disables the global limit.
    pub global_rate: u32,
    pub global_burst: u32,
    /// The observer's pid namespace (device and inode of `/proc/self/ns/pid`).
    pub pidns_dev: u64,
    pub pidns_ino: u64,
    pub clock: u32,
    /// What the UDP program accepts: [`UDP_PLAINTEXT`] and [`UDP_SECURE`] bits (0: no UDP).
    pub udp_accept: u32,
    /// Non-zero: routine beats of exit-watched agents stay in their buckets (`wakeup` rule
    /// 6); zero when every beat must reach the daemon (the export file has a line per beat).
    pub hold_routine: u32,
    pub _pad: u32,
    /// Where [`Attest::TaskRead`] finds the sender's identity (zero with the other method).
    pub task: TaskOffsets,
}

/// Byte offsets in the running kernel's structures, from `/sys/kernel/btf/vmlinux`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.tgid`: the process id in the initial pid namespace.
    pub task_tgid: u32,
    /// `task_struct.thread_pid`: the task's `struct pid`.
    pub task_thread_pid: u32,
    /// `pid.level`: 0 in the initial pid namespace, one more per nested namespace.
    pub pid_level: u32,
    /// `task_struct.group_leader`: the process's main thread (the sender may be another).
    pub task_group_leader: u32,
    /// `task_struct.start_boottime`: when the task started, on the boot clock (0: the
    /// sender's start time is not read, [`BeatRecord::start_ns`] stays 0).
    pub task_start_boottime: u32,
    pub _pad: u32,
}

/// `Verdict::state`.
pub const VERDICT_PENDING: u32 = 0;
/// Verified sender; its beats are accepted (namespace gate open).
pub const VERDICT_ALLOW: u32 = 1;
/// Verified sender in another namespace, refused by the namespace gate.
pub const VERDICT_DENY_NAMESPACE: u32 = 2;

/// What the kernel knows of a cross-namespace sender, keyed by host tgid in [`map::VERDICTS`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    pub state: u32,
    /// The sender's pid in its own namespace: the only pid its frames may carry.
    pub ns_pid: u32,
    /// When the verification was requested (pending entries are asked again after a while).
    pub asked_ns: u64,
}

/// Per-agent and global token bucket state: the virtual clock of
/// [`crate::ratelimit::Limit`] (zero is a full bucket). A per-agent bucket also holds the
/// agent's last beat the program handed to the daemon (`last_ns` zero: none yet), so that a
/// daemon starting on pinned maps knows every agent's last beat even when it never saw it
/// (a held beat's is in [`Tracked::last_ns`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Bucket {
    pub tat_ns: u64,
    /// Receive time (`FilterConfig::clock`) of the last beat queued in the ring.
    pub last_ns: u64,
    /// The pid the daemon tracks the agent under (`BeatRecord::observer_tgid`, else the host
    /// tgid for UDS; the frame pid for UDP), and the pid its frames carry.
    pub pid: u32,
    pub frame_pid: u32,
}

/// The key of an agent's bucket in [`map::BUCKETS`]: UDS agents are known by their attested
/// host tgid, UDP agents only by the transport and the pid they frame.
pub const fn agent_key(transport: u8, host_tgid: u32, frame_pid: u32) -> u64 {
    if transport == TRANSPORT_UDS {
        host_tgid as u64
    } else {
        ((transport as u64) << 32) | frame_pid as u64
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain repr(C) structs of integers with explicit padding fields: every bit
    // pattern is a valid value, so aya may copy them to and from kernel maps.
    unsafe impl aya::Pod for super::BeatRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FilterConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Verdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Tracked {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_holds_every_tracked_burst_within_its_bounds() {
        assert_eq!(RING_RECORD_BYTES, 80);
        assert_eq!(ring_bytes(256, 100), 2 << 20, "the defaults");
        assert_eq!(ring_bytes(1, 1), RING_BYTES);
        assert_eq!(ring_bytes(65_536, 100), RING_BYTES_MAX);
        for (capacity, burst) in [(300, 7), (1000, 10), (50, 200)] {
            let bytes = ring_bytes(capacity, burst);
            assert!(bytes.is_power_of_two());
            assert!(bytes >= capacity * burst * RING_RECORD_BYTES);
        }
    }
}
