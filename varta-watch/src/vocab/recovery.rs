//! What became of a recovery command: the outcome `actions::recovery` reports and the audit
//! file, the log and the metrics record.

use std::{process::ExitStatus, time::Duration};

/// What became of a recovery: run to an end, or not run at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Timeout,
    SpawnFailed,
    Debounced,
    Refused,
    Suppressed,
}

impl Outcome {
    /// The `outcome` label and log value.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::SpawnFailed => "spawn_failed",
            Outcome::Debounced => "debounced",
            Outcome::Refused => "refused",
            Outcome::Suppressed => "suppressed",
        }
    }
}

/// A recovery command that ended (or could not start) for the agent `pid`.
#[derive(Debug, Clone)]
pub struct Finished {
    pub pid: u32,
    pub outcome: Outcome,
    pub detail: String,
    /// Why it did not run, for a refused or suppressed recovery: the `reason` label of
    /// `varta_recovery_refused_total` or `varta_recovery_suppressed_total`.
    pub reason: Option<&'static str>,
    /// The command's run, when it started (for the audit record).
    pub run: Option<Run>,
}

/// Why a recovery did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRun {
    Debounced,
    Refused(&'static str),
    /// A global limit bit (`max_running`, `spawn_rate`), the pid is no longer the agent's
    /// (`pid_reused`), or the observer is stopping (`shutdown`).
    Suppressed(&'static str),
}

/// How a recovery command that started went.
#[derive(Debug, Clone)]
pub struct Run {
    pub child: u32,
    /// None when it could not be waited for.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
    /// Captured output (`--recovery-capture-stdio`).
    pub output: Option<String>,
}
