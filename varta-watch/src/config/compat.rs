//! Flags of the incumbent varta-watch 0.2.0 that this observer accepts so that its unit
//! files start unchanged, but that have no effect here (yet). Each one's help text is the
//! reason, and each one given prints exactly that reason once at start-up
//! (`event=flag_ignored`): the declaration below is the only place it is written.

use std::path::PathBuf;

use clap::{ArgMatches, Args, parser::ValueSource};

/// Help heading of the flags that are accepted without an effect.
const NO_EFFECT: &str = "Accepted for compatibility with varta-watch 0.2.0 (no effect)";
/// Help heading of the secure UDP flags: they decide whether a UDP listener starts.
const SECURE_UDP: &str = "Secure UDP (not implemented yet)";

/// Secure (AEAD) UDP. Not implemented yet; but a key given without
/// `--i-accept-plaintext-udp` means no UDP listener starts, which is an effect.
#[derive(Debug, Args)]
#[command(next_help_heading = SECURE_UDP)]
pub struct SecureUdpArgs {
    /// secure (AEAD) UDP is not implemented yet; no secure UDP listener is started
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// secure (AEAD) UDP is not implemented yet; no secure UDP listener is started
    #[arg(long, value_name = "PATH")]
    pub accepted_key_file: Option<PathBuf>,
    /// secure (AEAD) UDP is not implemented yet; no secure UDP listener is started
    #[arg(long, value_name = "PATH")]
    pub master_key_file: Option<PathBuf>,
    /// secure (AEAD) UDP is not implemented yet; no secure UDP listener is started
    #[arg(long)]
    pub i_accept_secure_udp_non_loopback: bool,
    /// secure (AEAD) UDP is not implemented yet; no secure UDP listener is started
    #[arg(long)]
    pub secure_udp_i_accept_recovery_on_unauthenticated_transport: bool,
}

impl SecureUdpArgs {
    pub fn has_key(&self) -> bool {
        self.key_file.is_some() || self.master_key_file.is_some()
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
    /// the recovery audit log is not implemented; outcomes go to the log, the export file and varta_recovery_outcomes_total
    #[arg(long, value_name = "MS")]
    audit_fsync_budget_ms: Option<u64>,
    /// the recovery audit log is not implemented; outcomes go to the log, the export file and varta_recovery_outcomes_total
    #[arg(long, value_name = "MS")]
    audit_sync_interval_ms: Option<u64>,
    /// the recovery audit log is not implemented; outcomes go to the log, the export file and varta_recovery_outcomes_total
    #[arg(long, value_name = "MS")]
    audit_rotation_budget_ms: Option<u64>,
    /// /metrics is not rate-limited; protect it with --prom-token-file
    #[arg(long, value_name = "N")]
    prom_rate_limit_per_sec: Option<u32>,
    /// /metrics is not rate-limited; protect it with --prom-token-file
    #[arg(long, value_name = "N")]
    prom_rate_limit_burst: Option<u32>,
    /// there is no polling loop: the daemon is event-driven
    #[arg(long, value_name = "MS")]
    iteration_budget_ms: Option<u64>,
    /// scrapes are served by their own task and cannot stall the receive path
    #[arg(long, value_name = "MS")]
    scrape_budget_ms: Option<u64>,
}

/// `(--flag, why it has no effect)` for every such flag that was given, on the command
/// line, in the config file or in the environment.
pub fn warnings(matches: &ArgMatches) -> Vec<(String, String)> {
    super::cli::command()
        .get_arguments()
        .filter(|arg| {
            arg.get_help_heading()
                .is_some_and(|h| h == NO_EFFECT || h == SECURE_UDP)
        })
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
