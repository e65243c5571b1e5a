//! The attestation decision both datapaths take for a Unix datagram: is its sender who its
//! frame says, and may it be tracked? The kernel asks it for a sender in the observer's pid
//! namespace (`varta-ebpf/src/filter.rs`) and with the daemon's verdict on a sender in
//! another one; the daemon asks it with what `/proc` says of the sender
//! (`varta-watch/src/datapath/attest.rs`).

use crate::DropReason;

/// A frame claiming `frame_pid` from a sender whose own pid (as it sees itself, in its pid
/// namespace) is `honest_pid`. A lie is refused ([`DropReason::Spoof`]) before the namespace
/// policy is asked: a sender from another pid namespace (`cross_namespace`) is tracked only
/// when that is allowed (`--allow-cross-namespace-agents`, else
/// [`DropReason::Namespace`]).
#[inline(always)]
pub const fn decide(
    frame_pid: u32,
    honest_pid: u32,
    cross_namespace: bool,
    allow_cross_namespace: bool,
) -> Result<(), DropReason> {
    if frame_pid != honest_pid {
        return Err(DropReason::Spoof);
    }
    if cross_namespace && !allow_cross_namespace {
        return Err(DropReason::Namespace);
    }
    Ok(())
}
