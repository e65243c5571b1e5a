//! What the eBPF program and the daemon exchange: map names, the ring-buffer record, the
//! filter's configuration and the attestation verdicts for cross-namespace senders.

use crate::frame::FRAME_LEN;

pub const MAP_CONFIG: &str = "VARTA_CONFIG";
pub const MAP_DROPS: &str = "VARTA_DROPS";
pub const MAP_EVENTS: &str = "VARTA_EVENTS";
pub const MAP_VERDICTS: &str = "VARTA_VERDICTS";
pub const MAP_BUCKETS: &str = "VARTA_BUCKETS";
pub const PROGRAM_NAME: &str = "varta_filter";

/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const RING_BYTES: u32 = 1 << 20;
/// Most agents whose cross-namespace verdict the kernel remembers (LRU).
pub const VERDICT_ENTRIES: u32 = 8192;
/// Most agents whose per-agent token bucket the kernel keeps (LRU).
pub const BUCKET_ENTRIES: u32 = 16384;
/// A pending verification that got no verdict is asked again after this long.
pub const VERIFY_RETRY_NS: u64 = 1_000_000_000;

/// `BeatRecord::kind`.
pub const KIND_BEAT: u8 = 0;
/// A cross-namespace sender the kernel has no verdict for: the daemon checks the frame pid
/// against `NSpid` of `host_tgid` and answers in [`MAP_VERDICTS`].
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
    pub _pad: u32,
    /// UDP source address: IPv4 in the first 4 bytes, or IPv6.
    pub src_addr: [u8; 16],
}

pub const CLOCK_MONOTONIC: u32 = 0;
pub const CLOCK_BOOTTIME: u32 = 1;

/// The program's run-time configuration: one entry of the [`MAP_CONFIG`] array, rewritten by
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
    /// Above this many unread bytes in the ring buffer the program wakes the daemon.
    pub wakeup_watermark: u32,
}

/// `Verdict::state`.
pub const VERDICT_PENDING: u32 = 0;
/// Verified sender; its beats are accepted (namespace gate open).
pub const VERDICT_ALLOW: u32 = 1;
/// Verified sender in another namespace, refused by the namespace gate.
pub const VERDICT_DENY_NAMESPACE: u32 = 2;

/// What the kernel knows of a cross-namespace sender, keyed by host tgid in [`MAP_VERDICTS`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    pub state: u32,
    /// The sender's pid in its own namespace: the only pid its frames may carry.
    pub ns_pid: u32,
    /// When the verification was requested (pending entries are asked again after a while).
    pub asked_ns: u64,
}

/// Per-agent and global token bucket state, as a virtual clock: the bucket holds
/// `(now - tat) / interval` tokens, capped at the burst.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Bucket {
    pub tat_ns: u64,
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
}
