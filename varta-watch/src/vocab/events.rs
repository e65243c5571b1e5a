//! What the observer surfaces. Each event goes to the log, the export file, the metrics and,
//! for stalls and exits, to recovery (see `actions`).

use varta_common::{Frame, Status};

use crate::{
    sys::process::StartTime,
    vocab::{beat::Origin, recovery::Finished},
};

#[derive(Debug, Clone)]
pub enum Event {
    /// An accepted beat, received at `recv_ns` (on the observer's clock); `count` beats when
    /// the kernel held routine ones (`varta_common::wakeup` rule 6), the latest as `frame`.
    Beat {
        pid: u32,
        frame: Frame,
        recv_ns: u64,
        count: u64,
    },
    /// An agent seen for the first time (it may have replaced an evicted one).
    NewAgent {
        pid: u32,
        frame_pid: u32,
        origin: Origin,
        evicted: Option<u32>,
        /// When its process started (`None`: unknown, or the pid was reused before /proc
        /// was read): what its identity, read later, must still match.
        started: Option<StartTime>,
    },
    /// A Critical beat: surfaced at once.
    Critical {
        pid: u32,
        frame: Frame,
    },
    /// The panic-terminal frame: the agent is dying. No stall follows for this death.
    Exit {
        pid: u32,
        frame: Frame,
        origin: Origin,
        /// The agent beat before this frame (a first frame that is a death is not).
        known: bool,
        /// When the agent's process started (see `Agent::started`).
        started: Option<StartTime>,
        /// How long it beat, first beat to this frame (u64::MAX: unknown, taken over).
        beating_ns: u64,
    },
    /// Silent past the threshold: the agent as its last beat left it.
    Stall {
        pid: u32,
        last_nonce: u64,
        last_status: Status,
        origin: Origin,
        /// When the agent's process started (see `Agent::started`).
        started: Option<StartTime>,
        silent_ms: u64,
        /// How long it beat, first beat to last (u64::MAX: unknown, taken over).
        beating_ns: u64,
    },
    /// A stalled agent beats again.
    Resumed {
        pid: u32,
    },
    /// Nonce 1 again: a new session of the same process.
    Restarted {
        pid: u32,
    },
    /// Another process took a tracked agent's pid (a `NewAgent` follows).
    Replaced {
        pid: u32,
    },
    NonceWrapped {
        pid: u32,
    },
    /// A recovery command finished, failed, or was not run.
    Recovery(Finished),
}
