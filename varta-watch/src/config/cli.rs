//! The command line. Every flag of the incumbent varta-watch 0.2.0 parses, so its unit files
//! start this daemon unchanged; the ones without an effect here print one warning each.
//! Every flag can also come from an environment variable (`VARTA_` + the flag name).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::sys::clock::ClockSource;

#[derive(Debug, Parser)]
#[command(
    name = "varta-watch",
    version,
    about = "Liveness observer for VLP v0.2 heartbeats, with its receive path in the kernel",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    // A flag given again (on the command line after --config's keys) overrides.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send one heartbeat frame and exit.
    Beat(BeatArgs),
    /// Beat at an interval until killed (a demo and test agent).
    Agent(AgentArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireStatus {
    Ok,
    Degraded,
    Critical,
}

#[derive(Debug, Args)]
pub struct BeatArgs {
    /// The observer's socket.
    #[arg(long, env = "VARTA_SOCKET")]
    pub socket: PathBuf,
    #[arg(long, value_enum, default_value = "ok")]
    pub status: WireStatus,
    #[arg(long, default_value_t = 0)]
    pub payload: u32,
    /// Nonce of the frame (a one-shot beat starts a session: 1).
    #[arg(long, default_value_t = 1)]
    pub nonce: u64,
    /// Send the panic-terminal frame (Critical, nonce u64::MAX) instead.
    #[arg(long)]
    pub panic: bool,
    /// Frame this pid instead of our own (to see a forged frame refused).
    #[arg(long)]
    pub pid: Option<u32>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(long, env = "VARTA_SOCKET")]
    pub socket: PathBuf,
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    #[arg(long, value_enum, default_value = "ok")]
    pub status: WireStatus,
    #[arg(long, default_value_t = 0)]
    pub payload: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvictionPolicy {
    /// Evict only agents already surfaced as stalled.
    Strict,
    /// Prefer stalled agents, else evict the one silent longest.
    Balanced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatapathMode {
    /// eBPF when this process may load it, else the userspace datapath (one line says why).
    Auto,
    /// eBPF or fail.
    Ebpf,
    /// recvmmsg with SCM_CREDENTIALS in the daemon.
    Userspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SignalHandlerMode {
    /// Raw rt_sigaction(2) with the daemon's own restorer.
    Direct,
    /// libc's sigaction (escape hatch).
    Libc,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    // ---- Socket and receive ----
    /// Bind the observer's Unix datagram socket here.
    #[arg(long, env = "VARTA_SOCKET", help_heading = "Socket and receive")]
    pub socket: Option<PathBuf>,
    /// File mode of the socket (octal).
    #[arg(long, env = "VARTA_SOCKET_MODE", default_value = "0600", value_parser = parse_octal, help_heading = "Socket and receive")]
    pub socket_mode: u32,
    /// SO_RCVBUF of the socket in bytes (0 = kernel default).
    #[arg(
        long,
        env = "VARTA_UDS_RCVBUF_BYTES",
        default_value_t = 1_048_576,
        help_heading = "Socket and receive"
    )]
    pub uds_rcvbuf_bytes: u32,
    /// Also listen for plaintext UDP on this port (needs --i-accept-plaintext-udp).
    #[arg(long, env = "VARTA_UDP_PORT", help_heading = "Socket and receive")]
    pub udp_port: Option<u16>,
    /// Address of the UDP listener.
    #[arg(
        long,
        env = "VARTA_UDP_BIND_ADDR",
        default_value = "0.0.0.0",
        help_heading = "Socket and receive"
    )]
    pub udp_bind_addr: std::net::IpAddr,
    /// Acknowledge that plaintext UDP frames are unauthenticated (anyone can claim any pid).
    #[arg(
        long,
        env = "VARTA_I_ACCEPT_PLAINTEXT_UDP",
        help_heading = "Socket and receive"
    )]
    pub i_accept_plaintext_udp: bool,
    /// Where frames are received and validated.
    #[arg(
        long,
        env = "VARTA_DATAPATH",
        value_enum,
        default_value = "auto",
        help_heading = "Socket and receive"
    )]
    pub datapath: DatapathMode,

    // ---- Stall detection ----
    /// Silence (ms) after which an agent is surfaced as stalled.
    #[arg(long, env = "VARTA_THRESHOLD_MS", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Stall detection")]
    pub threshold_ms: Option<u64>,
    /// Clock for stall accounting: boottime also counts time the host was suspended.
    #[arg(
        long,
        env = "VARTA_CLOCK_SOURCE",
        value_enum,
        default_value = "monotonic",
        help_heading = "Stall detection"
    )]
    pub clock_source: ClockSource,

    // ---- Tracker and admission ----
    /// Distinct agents tracked at once.
    #[arg(long, env = "VARTA_TRACKER_CAPACITY", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Tracker and admission")]
    pub tracker_capacity: u32,
    /// Which agent makes room for a new one when the tracker is full.
    #[arg(
        long,
        env = "VARTA_TRACKER_EVICTION_POLICY",
        value_enum,
        default_value = "strict",
        help_heading = "Tracker and admission"
    )]
    pub tracker_eviction_policy: EvictionPolicy,
    /// Beats per second per agent (0 disables).
    #[arg(
        long,
        env = "VARTA_MAX_BEAT_RATE",
        default_value_t = 100,
        help_heading = "Tracker and admission"
    )]
    pub max_beat_rate: u32,
    /// Beats per second from all agents together (0 disables).
    #[arg(
        long,
        env = "VARTA_GLOBAL_BEAT_RATE",
        default_value_t = 5000,
        help_heading = "Tracker and admission"
    )]
    pub global_beat_rate: u32,
    /// Capacity of the global token bucket.
    #[arg(
        long,
        env = "VARTA_GLOBAL_BEAT_BURST",
        default_value_t = 10000,
        help_heading = "Tracker and admission"
    )]
    pub global_beat_burst: u32,
    /// Accept agents from other pid namespaces (containers); tracked under their host pid.
    #[arg(
        long,
        env = "VARTA_ALLOW_CROSS_NAMESPACE_AGENTS",
        help_heading = "Tracker and admission"
    )]
    pub allow_cross_namespace_agents: bool,

    // ---- Recovery ----
    /// Command run for a stalled or dying agent: split on whitespace, no shell; `{pid}` is
    /// replaced by the pid, which is appended when no argument holds `{pid}`.
    #[arg(long, env = "VARTA_RECOVERY_EXEC", help_heading = "Recovery")]
    pub recovery_exec: Option<String>,
    /// Read the recovery command from this file (mode 0600, owned by the observer's user).
    #[arg(
        long,
        env = "VARTA_RECOVERY_EXEC_FILE",
        conflicts_with = "recovery_exec",
        help_heading = "Recovery"
    )]
    pub recovery_exec_file: Option<PathBuf>,
    /// At most one recovery per agent within this many ms.
    #[arg(
        long,
        env = "VARTA_RECOVERY_DEBOUNCE_MS",
        default_value_t = 1000,
        help_heading = "Recovery"
    )]
    pub recovery_debounce_ms: u64,
    /// Kill a recovery command still running after this many ms.
    #[arg(long, env = "VARTA_RECOVERY_TIMEOUT_MS", help_heading = "Recovery")]
    pub recovery_timeout_ms: Option<u64>,
    /// KEY=VALUE added to the recovery command's environment (repeatable).
    #[arg(long, env = "VARTA_RECOVERY_ENV", value_parser = parse_env_pair, value_delimiter = None, help_heading = "Recovery")]
    pub recovery_env: Vec<(String, String)>,
    /// Give the recovery command the observer's whole environment.
    #[arg(long, env = "VARTA_RECOVERY_INHERIT_ENV", help_heading = "Recovery")]
    pub recovery_inherit_env: bool,
    /// Allow recovery for agents known only through plaintext UDP (their pid is unattested).
    #[arg(
        long,
        env = "VARTA_PLAINTEXT_UDP_I_ACCEPT_RECOVERY_ON_UNAUTHENTICATED_TRANSPORT",
        help_heading = "Recovery"
    )]
    pub plaintext_udp_i_accept_recovery_on_unauthenticated_transport: bool,
    /// At shutdown, wait this long (ms) for running recovery commands before killing them.
    #[arg(
        long,
        env = "VARTA_SHUTDOWN_GRACE_MS",
        default_value_t = 5000,
        help_heading = "Recovery"
    )]
    pub shutdown_grace_ms: u64,

    // ---- Export and metrics ----
    /// Append one tab-separated line per event to this file.
    #[arg(long, env = "VARTA_EXPORT_FILE", help_heading = "Export and metrics")]
    pub export_file: Option<PathBuf>,
    /// Serve Prometheus metrics on GET /metrics at this address.
    #[arg(long, env = "VARTA_PROM_ADDR", help_heading = "Export and metrics")]
    pub prom_addr: Option<SocketAddr>,
    /// Bearer token file for /metrics (required for a non-loopback --prom-addr).
    #[arg(
        long,
        env = "VARTA_PROM_TOKEN_FILE",
        help_heading = "Export and metrics"
    )]
    pub prom_token_file: Option<PathBuf>,

    // ---- The observer itself ----
    /// TOML file with the same keys as the long flags; re-read on SIGHUP.
    #[arg(long, env = "VARTA_CONFIG", help_heading = "The observer itself")]
    pub config: Option<PathBuf>,
    /// How signal handlers are installed.
    #[arg(
        long,
        env = "VARTA_SIGNAL_HANDLER_MODE",
        value_enum,
        default_value = "direct",
        help_heading = "The observer itself"
    )]
    pub signal_handler_mode: SignalHandlerMode,
    /// Exit cleanly after this many seconds (tests).
    #[arg(
        long,
        env = "VARTA_SHUTDOWN_AFTER_SECS",
        help_heading = "The observer itself"
    )]
    pub shutdown_after_secs: Option<u64>,

    #[command(flatten)]
    pub compat: CompatArgs,
}

/// Flags of the incumbent that have no effect here. Each given one is named in one start-up
/// warning with the reason.
#[derive(Debug, Args)]
#[command(next_help_heading = "Accepted for compatibility with varta-watch 0.2.0 (no effect)")]
pub struct CompatArgs {
    #[arg(long, env = "VARTA_READ_TIMEOUT_MS", value_name = "MS")]
    pub read_timeout_ms: Option<u64>,
    #[arg(long, env = "VARTA_EVICTION_SCAN_WINDOW", value_name = "N")]
    pub eviction_scan_window: Option<u32>,
    #[arg(long, env = "VARTA_STRICT_NAMESPACE_CHECK")]
    pub strict_namespace_check: bool,
    #[arg(long, env = "VARTA_KEY_FILE", value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    #[arg(long, env = "VARTA_ACCEPTED_KEY_FILE", value_name = "PATH")]
    pub accepted_key_file: Option<PathBuf>,
    #[arg(long, env = "VARTA_MASTER_KEY_FILE", value_name = "PATH")]
    pub master_key_file: Option<PathBuf>,
    #[arg(long, env = "VARTA_I_ACCEPT_SECURE_UDP_NON_LOOPBACK")]
    pub i_accept_secure_udp_non_loopback: bool,
    #[arg(
        long,
        env = "VARTA_SECURE_UDP_I_ACCEPT_RECOVERY_ON_UNAUTHENTICATED_TRANSPORT"
    )]
    pub secure_udp_i_accept_recovery_on_unauthenticated_transport: bool,
    #[arg(long, env = "VARTA_RECOVERY_CAPTURE_STDIO")]
    pub recovery_capture_stdio: bool,
    #[arg(long, env = "VARTA_RECOVERY_CAPTURE_BYTES", value_name = "N")]
    pub recovery_capture_bytes: Option<u64>,
    #[arg(long, env = "VARTA_RECOVERY_AUDIT_FILE", value_name = "PATH")]
    pub recovery_audit_file: Option<PathBuf>,
    #[arg(long, env = "VARTA_RECOVERY_AUDIT_MAX_BYTES", value_name = "N")]
    pub recovery_audit_max_bytes: Option<u64>,
    #[arg(long, env = "VARTA_RECOVERY_AUDIT_SYNC_EVERY", value_name = "N")]
    pub recovery_audit_sync_every: Option<u64>,
    #[arg(long, env = "VARTA_AUDIT_FSYNC_BUDGET_MS", value_name = "MS")]
    pub audit_fsync_budget_ms: Option<u64>,
    #[arg(long, env = "VARTA_AUDIT_SYNC_INTERVAL_MS", value_name = "MS")]
    pub audit_sync_interval_ms: Option<u64>,
    #[arg(long, env = "VARTA_AUDIT_ROTATION_BUDGET_MS", value_name = "MS")]
    pub audit_rotation_budget_ms: Option<u64>,
    #[arg(long, env = "VARTA_EXPORT_FILE_MAX_BYTES", value_name = "N")]
    pub export_file_max_bytes: Option<u64>,
    #[arg(long, env = "VARTA_EXPORT_FILE_SYNC_EVERY", value_name = "N")]
    pub export_file_sync_every: Option<u64>,
    #[arg(long, env = "VARTA_PROM_RATE_LIMIT_PER_SEC", value_name = "N")]
    pub prom_rate_limit_per_sec: Option<u32>,
    #[arg(long, env = "VARTA_PROM_RATE_LIMIT_BURST", value_name = "N")]
    pub prom_rate_limit_burst: Option<u32>,
    #[arg(long, env = "VARTA_ITERATION_BUDGET_MS", value_name = "MS")]
    pub iteration_budget_ms: Option<u64>,
    #[arg(long, env = "VARTA_SCRAPE_BUDGET_MS", value_name = "MS")]
    pub scrape_budget_ms: Option<u64>,
    #[arg(long, env = "VARTA_HEARTBEAT_FILE", value_name = "PATH")]
    pub heartbeat_file: Option<PathBuf>,
    #[arg(long, env = "VARTA_SELF_WATCHDOG_SECS", value_name = "SECS")]
    pub self_watchdog_secs: Option<u64>,
    #[arg(long, env = "VARTA_HW_WATCHDOG", value_name = "PATH")]
    pub hw_watchdog: Option<PathBuf>,
    #[arg(long, env = "VARTA_INJECT_WEDGE_MS", value_name = "MS")]
    pub inject_wedge_ms: Option<u64>,
}

impl CompatArgs {
    /// `(flag, why it has no effect)` for every compatibility flag that was given.
    pub fn warnings(&self) -> Vec<(&'static str, &'static str)> {
        const SECURE_UDP: &str =
            "secure (AEAD) UDP is not implemented yet; no secure UDP listener is started";
        const AUDIT: &str = "the recovery audit log is not implemented; outcomes go to the log, the export file and varta_recovery_outcomes_total";
        const LOOP: &str = "there is no polling loop: the daemon is event-driven";
        let given = [
            (
                self.read_timeout_ms.is_some(),
                "--read-timeout-ms",
                "no read timeout exists in an event-driven daemon",
            ),
            (
                self.eviction_scan_window.is_some(),
                "--eviction-scan-window",
                "eviction picks its victim from ordered queues without a scan",
            ),
            (
                self.strict_namespace_check,
                "--strict-namespace-check",
                "a cross-namespace agent is dropped and counted, never fatal to the observer",
            ),
            (self.key_file.is_some(), "--key-file", SECURE_UDP),
            (
                self.accepted_key_file.is_some(),
                "--accepted-key-file",
                SECURE_UDP,
            ),
            (
                self.master_key_file.is_some(),
                "--master-key-file",
                SECURE_UDP,
            ),
            (
                self.i_accept_secure_udp_non_loopback,
                "--i-accept-secure-udp-non-loopback",
                SECURE_UDP,
            ),
            (
                self.secure_udp_i_accept_recovery_on_unauthenticated_transport,
                "--secure-udp-i-accept-recovery-on-unauthenticated-transport",
                SECURE_UDP,
            ),
            (
                self.recovery_capture_stdio,
                "--recovery-capture-stdio",
                "recovery output is not captured; the command inherits /dev/null",
            ),
            (
                self.recovery_capture_bytes.is_some(),
                "--recovery-capture-bytes",
                "recovery output is not captured; the command inherits /dev/null",
            ),
            (
                self.recovery_audit_file.is_some(),
                "--recovery-audit-file",
                AUDIT,
            ),
            (
                self.recovery_audit_max_bytes.is_some(),
                "--recovery-audit-max-bytes",
                AUDIT,
            ),
            (
                self.recovery_audit_sync_every.is_some(),
                "--recovery-audit-sync-every",
                AUDIT,
            ),
            (
                self.audit_fsync_budget_ms.is_some(),
                "--audit-fsync-budget-ms",
                AUDIT,
            ),
            (
                self.audit_sync_interval_ms.is_some(),
                "--audit-sync-interval-ms",
                AUDIT,
            ),
            (
                self.audit_rotation_budget_ms.is_some(),
                "--audit-rotation-budget-ms",
                AUDIT,
            ),
            (
                self.export_file_max_bytes.is_some(),
                "--export-file-max-bytes",
                "the export file is not rotated here; rotate it externally and send SIGHUP to reopen it",
            ),
            (
                self.export_file_sync_every.is_some(),
                "--export-file-sync-every",
                "the export file is flushed after every batch of events and at shutdown",
            ),
            (
                self.prom_rate_limit_per_sec.is_some(),
                "--prom-rate-limit-per-sec",
                "/metrics is not rate-limited; protect it with --prom-token-file",
            ),
            (
                self.prom_rate_limit_burst.is_some(),
                "--prom-rate-limit-burst",
                "/metrics is not rate-limited; protect it with --prom-token-file",
            ),
            (
                self.iteration_budget_ms.is_some(),
                "--iteration-budget-ms",
                LOOP,
            ),
            (
                self.scrape_budget_ms.is_some(),
                "--scrape-budget-ms",
                "scrapes are served by their own task and cannot stall the receive path",
            ),
            (self.heartbeat_file.is_some(), "--heartbeat-file", LOOP),
            (
                self.self_watchdog_secs.is_some(),
                "--self-watchdog-secs",
                "the systemd/self watchdog is not implemented",
            ),
            (
                self.hw_watchdog.is_some(),
                "--hw-watchdog",
                "the hardware watchdog is not implemented",
            ),
            (
                self.inject_wedge_ms.is_some(),
                "--inject-wedge-ms",
                "test hook of the incumbent's polling loop",
            ),
        ];
        given
            .into_iter()
            .filter(|(on, _, _)| *on)
            .map(|(_, flag, why)| (flag, why))
            .collect()
    }
}

fn parse_octal(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode =
        u32::from_str_radix(digits, 8).map_err(|_| format!("'{s}' is not an octal file mode"))?;
    if mode > 0o7777 {
        return Err(format!("'{s}' is not a file mode (at most 7777)"));
    }
    Ok(mode)
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn octal_modes() {
        assert_eq!(parse_octal("0660"), Ok(0o660));
        assert_eq!(parse_octal("600"), Ok(0o600));
        assert!(parse_octal("0999").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env_pair("=x").is_err());
        assert!(parse_env_pair("novalue").is_err());
    }
}
