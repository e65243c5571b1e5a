//! Flags of the incumbent varta-watch 0.2.0 that this observer accepts so that its unit
//! files start unchanged, but that have no effect here (yet). Each one's help text is the
//! reason, and each one given prints exactly that reason once at start-up
//! (`event=flag_ignored`): the declaration below is the only place it is written.

use std::path::PathBuf;

use clap::{ArgMatches, Args, Command, parser::ValueSource};

/// Help heading of the flags that are accepted without an effect.
const NO_EFFECT: &str = "Accepted for compatibility with varta-watch 0.2.0 (no effect)";
/// Flags the incumbent removed for security reasons. They are declared (hidden) only so
/// that giving one exits 2 with the incumbent's migration hint instead of a bare
/// "unexpected argument".
#[derive(Debug, Args)]
#[command(next_help_heading = "Removed by varta-watch 0.2.0")]
pub struct RemovedArgs {
    #[arg(long, hide = true, value_name = "CMD")]
    recovery_cmd: Option<String>,
    #[arg(long, hide = true, value_name = "PATH")]
    recovery_cmd_file: Option<PathBuf>,
    #[arg(long, hide = true)]
    i_accept_shell_risk: bool,
    #[arg(long, hide = true, value_name = "VAR")]
    key_env: Option<String>,
    #[arg(long, hide = true, value_name = "VAR")]
    master_key_env: Option<String>,
    #[arg(long, hide = true, value_name = "VAR")]
    accepted_key_env: Option<String>,
}

impl RemovedArgs {
    /// The first removed flag given, and what replaces it (the incumbent's words).
    pub fn given(&self) -> Option<(&'static str, &'static str)> {
        const KEY_FILE: &str = "--key-file (mode 0600, owned by the observer UID)";
        [
            (
                self.recovery_cmd.is_some(),
                "--recovery-cmd",
                "--recovery-exec",
            ),
            (
                self.recovery_cmd_file.is_some(),
                "--recovery-cmd-file",
                "--recovery-exec-file",
            ),
            (
                self.i_accept_shell_risk,
                "--i-accept-shell-risk",
                "--recovery-exec",
            ),
            (self.key_env.is_some(), "--key-env", KEY_FILE),
            (self.master_key_env.is_some(), "--master-key-env", KEY_FILE),
            (
                self.accepted_key_env.is_some(),
                "--accepted-key-env",
                KEY_FILE,
            ),
        ]
        .into_iter()
        .find(|(given, _, _)| *given)
        .map(|(_, flag, replacement)| (flag, replacement))
    }
}

/// Accepted, no effect. Fields are never read: the flag's presence is the whole story.
#[allow(dead_code)]
#[derive(Debug, Args)]
#[command(next_help_heading = NO_EFFECT)]
pub struct CompatArgs {
    /// no read timeout exists in an event-driven daemon
    #[arg(long, value_name = "MS")]
    read_timeout_ms: Option<u64>,
    /// eviction picks its victim from ordered queues without a scan
    #[arg(long, value_name = "N")]
    eviction_scan_window: Option<u32>,
    /// a cross-namespace agent is dropped and counted, never fatal to the observer
    #[arg(long)]
    strict_namespace_check: bool,
    /// the audit and export files are written by threads of their own, off the event loop: no budget to keep
    #[arg(long, value_name = "MS")]
    audit_fsync_budget_ms: Option<u64>,
    /// the audit and export files are written by threads of their own, off the event loop: no budget to keep
    #[arg(long, value_name = "MS")]
    audit_sync_interval_ms: Option<u64>,
    /// the audit and export files are written by threads of their own, off the event loop: no budget to keep
    #[arg(long, value_name = "MS")]
    audit_rotation_budget_ms: Option<u64>,
    /// there is no polling loop: the daemon is event-driven
    #[arg(long, value_name = "MS")]
    iteration_budget_ms: Option<u64>,
    /// scrapes are served by their own task and cannot stall the receive path
    #[arg(long, value_name = "MS")]
    scrape_budget_ms: Option<u64>,
}

/// `(--flag, why it has no effect)` for every such flag that was given, on the command
/// line, in the config file or in the environment.
pub fn warnings(command: &Command, matches: &ArgMatches) -> Vec<(String, String)> {
    command
        .get_arguments()
        .filter(|arg| arg.get_help_heading().is_some_and(|h| h == NO_EFFECT))
        .filter(|arg| {
            matches!(
                matches.value_source(arg.get_id().as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|arg| {
            (
                format!("--{}", arg.get_long().unwrap_or_default()),
                arg.get_help().map(|h| h.to_string()).unwrap_or_default(),
            )
        })
        .collect()
}
