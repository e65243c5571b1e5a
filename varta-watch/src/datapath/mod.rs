//! Where beats come from. Two datapaths deliver the same [`Beat`]s to the same pipeline
//! (gates, rate limits, tracker): the eBPF socket filter with its ring buffer, and the
//! userspace fallback that receives and validates every datagram itself.

pub mod attest;
pub mod deny;
pub mod ebpf;
pub mod secure;
pub mod udp;
pub mod userspace;

use varta_common::{DropReason, FRAME_LEN, Frame};

use crate::{
    sys::logger::event,
    vocab::beat::{Beat, Origin},
};

/// Datagrams one socket may hand over per wake-up before the event loop goes round (stall
/// decisions, probes, the other sockets) and comes back for the rest (H5 of the hardening
/// review: a sender keeping a socket full must not hold the single event loop).
pub const DRAIN_BUDGET: usize = 4096;

/// A plaintext frame received on a Unix socket (read whole unless `truncated`), or why it
/// is refused.
pub fn decode_plain(bytes: &[u8], truncated: bool) -> Result<Frame, DropReason> {
    let raw: Option<&[u8; FRAME_LEN]> = if truncated {
        None
    } else {
        bytes.try_into().ok()
    };
    decode(raw.ok_or(DropReason::Length)?, "uds")
}

/// A plaintext frame, or why it is refused; a refusal logged at debug level.
pub fn decode(raw: &[u8; FRAME_LEN], transport: &'static str) -> Result<Frame, DropReason> {
    Frame::decode(raw).map_err(|e| {
        event!(
            debug,
            "decode_error",
            transport = transport,
            kind = e.name()
        );
        DropReason::from_decode(e)
    })
}

/// How many of the routine beats the kernel held for one agent (`varta_common::wakeup` rule
/// 6) were folded in: when the daemon wrote the agent's entry (`filter::Tracked::since_ns`:
/// written again, its count starts from zero) and the entry's held count then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSeen {
    pub key: u64,
    pub since_ns: u64,
    pub held: u64,
}

impl HeldSeen {
    /// The beats held now that `before` (an earlier reading of the same key) had not seen: an
    /// entry written since counts from zero.
    pub fn since(&self, before: Option<&HeldSeen>) -> u64 {
        match before {
            Some(b) if b.since_ns == self.since_ns => self.held.saturating_sub(b.held),
            _ => self.held,
        }
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

    /// The observer refused `beat` over its agent's rate: a datapath that can keep such a
    /// sender's frames out of its queue may (the userspace one, [`deny`]).
    fn over_rate(&mut self, _beat: &Beat) {}

    /// The secure UDP replay sessions, for the next instance (state file, handover).
    fn secure_sessions(&self) -> Vec<secure::SavedSession>;

    /// How far the beats the kernel holds (`varta_common::wakeup` rule 6) were folded in,
    /// for the next instance: it goes on from there, counting none twice.
    fn held_seen(&self) -> Vec<HeldSeen> {
        Vec::new()
    }

    /// What a previous instance folded in ([`Self::held_seen`]).
    fn restore_held_seen(&mut self, _seen: &[HeldSeen]) {}

    /// New rate limits (SIGHUP reload).
    fn set_limits(&mut self, limits: &crate::config::Limits) -> anyhow::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::HeldSeen;

    #[test]
    fn held_beats_count_from_the_last_reading_of_the_same_entry() {
        let seen = |since_ns, held| HeldSeen {
            key: 7,
            since_ns,
            held,
        };
        assert_eq!(seen(100, 12).since(None), 12, "never read: all of them");
        assert_eq!(seen(100, 12).since(Some(&seen(100, 5))), 7);
        assert_eq!(seen(100, 12).since(Some(&seen(100, 12))), 0);
        assert_eq!(
            seen(300, 4).since(Some(&seen(100, 12))),
            4,
            "written again: from zero"
        );
    }
}
