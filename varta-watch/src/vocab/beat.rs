//! What a datapath hands the observer: a [`Beat`], and where it came from ([`Origin`]).

use std::net::SocketAddr;

use varta_common::{
    Frame,
    filter::{TRANSPORT_UDP4, TRANSPORT_UDP6, TRANSPORT_UDS, agent_key},
};

/// How an agent reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Unix datagram socket: the kernel attested the sender.
    Uds {
        /// The sender lives in another pid namespace than the observer's (a container).
        cross_namespace: bool,
    },
    /// Plaintext UDP: the pid is the sender's claim only.
    Udp { source: SocketAddr },
}

impl Origin {
    pub fn is_cross_namespace(&self) -> bool {
        matches!(
            self,
            Origin::Uds {
                cross_namespace: true
            }
        )
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Origin::Uds { .. } => "uds",
            Origin::Udp { .. } => "udp",
        }
    }

    /// The rate-limit key of the agent tracked as `pid`, the same as the kernel's: UDS
    /// agents by their attested pid, UDP agents by transport and claimed pid, so the two
    /// never share a key.
    pub fn agent_key(&self, pid: u32) -> u64 {
        agent_key(self.transport_code(), pid, pid)
    }

    /// The transport as the kernel records it (`BeatRecord::transport`).
    pub fn transport_code(&self) -> u8 {
        match self {
            Origin::Uds { .. } => TRANSPORT_UDS,
            Origin::Udp { source } if source.is_ipv4() => TRANSPORT_UDP4,
            Origin::Udp { .. } => TRANSPORT_UDP6,
        }
    }
}

/// A valid, attested frame, ready for the gates and the tracker.
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    /// The pid the agent is tracked under: the attested pid as the observer's namespace sees
    /// it (for a container agent, its host pid), or the claimed pid for UDP.
    pub pid: u32,
    pub frame: Frame,
    pub origin: Origin,
    /// Receive time on the configured clock.
    pub recv_ns: u64,
    /// The rate limits were applied already (in the kernel); else the observer applies them.
    pub rate_limited: bool,
    /// What binds the pid to the process that beat when /proc is read later, after the pid
    /// may have been reused.
    pub sender: SenderStart,
    /// 0: one beat. Else this many routine beats the kernel held (`varta_common::wakeup`
    /// rule 6), folded into one: the latest's nonce, status and receive time.
    pub held: u64,
}

/// When the sender of a beat started, as far as its datapath knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderStart {
    /// Not known: /proc is taken at its word (UDP, a kernel without BTF).
    Unknown,
    /// At these clock ticks since boot, low 32 bits (`BeatRecord::start_ticks`; the
    /// kernel's task on the eBPF datapath, /proc read through a pidfd and checked against the
    /// frame's arrival on the userspace one).
    Ticks(u32),
    /// The sender had exited before it could be read: nothing /proc shows is its.
    Exited,
}

impl SenderStart {
    /// From a ring record's `start_ticks` (0: the kernel did not read it).
    pub fn from_record(start_ticks: u32) -> Self {
        match start_ticks {
            0 => SenderStart::Unknown,
            t => SenderStart::Ticks(t),
        }
    }
}

impl Beat {
    /// How many beats this is.
    pub fn count(&self) -> u64 {
        self.held.max(1)
    }

    /// The agent's key for rate limits ([`Origin::agent_key`]).
    pub fn agent_key(&self) -> u64 {
        self.origin.agent_key(self.pid)
    }
}
