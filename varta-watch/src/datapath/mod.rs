//! Where beats come from. Two datapaths deliver the same [`Beat`]s to the same pipeline
//! (gates, rate limits, tracker): the eBPF socket filter with its ring buffer, and the
//! userspace fallback that receives and validates every datagram itself.

pub mod attest;
pub mod ebpf;
pub mod secure;
pub mod udp;
pub mod userspace;

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
}

impl Beat {
    /// The agent's key for rate limits ([`Origin::agent_key`]).
    pub fn agent_key(&self) -> u64 {
        self.origin.agent_key(self.pid)
    }
}

/// A receive path. `recv` waits for traffic and appends what it accepted; datagrams it
/// refused are counted in the shared drop counters, never returned.
pub trait Datapath {
    /// The `mode` label of `varta_datapath_info`.
    fn mode(&self) -> &'static str;

    /// How senders are attested: the `attest` label of `varta_datapath_info`.
    fn attest(&self) -> &'static str;

    /// Waits until beats may be available, then appends every one that is.
    fn recv(&mut self, out: &mut Vec<Beat>) -> impl Future<Output = std::io::Result<()>>;

    /// Appends what is already queued, without waiting: run before deciding on stalls, so a
    /// beat that arrived just in time is never missed.
    fn drain(&mut self, out: &mut Vec<Beat>);

    /// Whether any agent is being watched for a stall. While none is, the eBPF datapath
    /// stops its drain timer, so an idle daemon sleeps.
    fn set_watching(&mut self, _watching: bool) {}

    /// An agent went silent (stall or exit): its next beat must wake the daemon at once.
    fn agent_silent(&mut self, _pid: u32, _origin: &Origin) {}

    /// The tracker took in a new agent: from now on the global bucket does not apply to it
    /// (`varta_common::ratelimit::global_applies`). The observer knows this for the beats it
    /// limits itself; a datapath that limits in the kernel is told here.
    fn agent_tracked(&mut self, _pid: u32, _origin: &Origin) {}

    /// The tracker evicted the agent `pid`: it is charged to the global bucket again.
    fn agent_untracked(&mut self, _pid: u32) {}

    /// New rate limits (SIGHUP reload).
    fn set_limits(&mut self, limits: &crate::config::Limits) -> anyhow::Result<()>;
}
