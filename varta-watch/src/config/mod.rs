//! The validated configuration the daemon runs with, built from the command line (and
//! environment). Every check names the flag it is about.

pub mod cli;
mod compat;
pub mod file;
pub mod private_file;
mod recovery_env;
mod reload;
pub mod secure_keys;
mod settings;

pub use file::parse_command_line;
pub use reload::reload;
pub use settings::Settings;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    config::cli::{
        AfterHandover, CommandLine, DaemonArgs, DatapathMode, EvictionPolicy, RecoveryArgs,
        SecureUdpArgs,
    },
    config::secure_keys::SecureKeys,
    signal::SignalHandlerMode,
    sys::clock::ClockSource,
};

/// `(--flag, why it has no effect)` for every compatibility flag given (see `compat`).
pub fn warnings(matches: &clap::ArgMatches) -> Vec<(String, String)> {
    compat::warnings(&cli::command(), matches)
}

/// A configuration error: `--flag: what is wrong`. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

fn bad(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        message: message.into(),
    }
}

/// Settings the datapaths and the tracker consult on every beat; SIGHUP may change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub threshold_ms: u64,
    pub per_pid_rate: u32,
    pub global_rate: u32,
    pub global_burst: u32,
}

impl Limits {
    pub fn threshold_ns(&self) -> u64 {
        self.threshold_ms * 1_000_000
    }

    /// An agent may burst one second's worth of beats.
    pub fn per_pid_burst(&self) -> u32 {
        self.per_pid_rate.max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryConfig {
    /// argv template; `{pid}` is substituted (or the pid appended).
    pub argv: Vec<String>,
    pub debounce: Duration,
    pub timeout: Option<Duration>,
    /// Most commands running at once (`--recovery-max-concurrent`).
    pub max_running: usize,
    /// Most commands started per second (`--recovery-spawn-rate`).
    pub spawn_rate: u32,
    /// The same limits for the agents of one uid (`--recovery-max-concurrent-per-uid`,
    /// `--recovery-spawn-rate-per-uid`).
    pub max_running_per_uid: usize,
    pub spawn_rate_per_uid: u32,
    /// Agents that beat for less than this are one-shot: they share half the global
    /// limits (`--recovery-established-after-ms`).
    pub established_after: Duration,
    pub env: Vec<(String, String)>,
    pub inherit_env: bool,
    pub allow_udp: bool,
    /// Bytes of output kept for the audit record (`--recovery-capture-stdio`).
    pub capture_bytes: Option<usize>,
}

/// A durable file of records (`--export-file`, `--recovery-audit-file`; see `actions::sink`).
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub path: PathBuf,
    /// Rotate before a write would take the file past this size.
    pub max_bytes: Option<u64>,
    /// fdatasync after this many records (0: only at close).
    pub sync_every: u64,
}

/// The observer's own liveness (`daemon::liveness`).
#[derive(Debug, Clone, Default)]
pub struct LivenessConfig {
    pub self_watchdog: Option<Duration>,
    pub heartbeat_file: Option<PathBuf>,
    pub hw_watchdog: Option<PathBuf>,
    pub inject_wedge: Option<Duration>,
}

/// Per-agent metric series: at most `max` agents have them; a gone agent's stay
/// `retention_ns` (`--agent-series-max`, `--agent-series-retention-secs`).
#[derive(Debug, Clone, Copy)]
pub struct SeriesLimits {
    pub max: usize,
    pub retention_ns: u64,
}

impl Default for SeriesLimits {
    fn default() -> Self {
        SeriesLimits {
            max: 10_000,
            retention_ns: 300_000_000_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub uds_rcvbuf_bytes: u32,
    pub udp: Option<SocketAddr>,
    /// Secure UDP keys (empty: plaintext only).
    pub secure: SecureKeys,
    /// Plaintext (32-byte) frames are accepted on UDP.
    pub plaintext_udp: bool,
    pub datapath: DatapathMode,
    pub junk_sample_one_in: u32,
    pub clock: ClockSource,
    pub limits: Limits,
    pub tracker_capacity: usize,
    /// `--tracker-max-per-uid` (0 given: half the capacity).
    pub tracker_max_per_uid: usize,
    /// `--agent-series-max`, `--agent-series-retention-secs`.
    pub series: SeriesLimits,
    pub eviction: EvictionPolicy,
    pub allow_cross_namespace: bool,
    pub recovery: Option<RecoveryConfig>,
    pub shutdown_grace: Duration,
    pub export_file: Option<SinkOptions>,
    pub audit_file: Option<SinkOptions>,
    pub prom_addr: Option<SocketAddr>,
    pub prom_token: Option<String>,
    /// Scrapes per second and burst per source address (`--prom-rate-limit-*`).
    pub prom_rate_limit: Option<varta_common::ratelimit::Limit>,
    pub signal_mode: SignalHandlerMode,
    pub nice: i32,
    pub shutdown_after: Option<Duration>,
    /// `--bpf-pin-dir`.
    pub pin_root: PathBuf,
    /// `--fresh-state`.
    pub fresh_state: bool,
    /// `--no-takeover`.
    pub no_takeover: bool,
    /// `--after-handover hold`, with its `--hold-marker`: `None` exits after a handover.
    pub hold: Option<HoldConfig>,
    pub config_file: Option<PathBuf>,
    pub liveness: LivenessConfig,
    /// Every setting as given, for the reload diff.
    pub settings: Settings,
}

impl Config {
    /// The configuration of a parsed daemon command line, checked; every error names its
    /// flag.
    pub fn from_command_line(line: &CommandLine) -> Result<Config, ConfigError> {
        let a = &line.cli.daemon;
        if let Some((flag, replacement)) = a.removed.given() {
            return Err(bad(
                flag,
                format!("has been removed for security reasons; use {replacement}"),
            ));
        }
        let socket = a
            .receive
            .socket
            .clone()
            .ok_or_else(|| bad("--socket", "required: where to bind the observer's socket"))?;
        let threshold_ms = a
            .stall
            .threshold_ms
            .ok_or_else(|| bad("--threshold-ms", "required: silence before a stall"))?;
        if a.admission.global_beat_rate > 0 && a.admission.global_beat_burst == 0 {
            return Err(bad(
                "--global-beat-burst",
                "must be at least 1 while --global-beat-rate is on",
            ));
        }
        let (udp, secure) = udp_config(a)?;
        let mut recovery = recovery_config(&a.recovery)?;
        if let (Some(_), Some(recovery)) = (udp, &mut recovery) {
            check_udp_recovery(a, !secure.is_empty())?;
            recovery.allow_udp = true;
        }
        let prom_token = match &a.output.prom_token_file {
            None => None,
            Some(path) => Some(read_token(path)?),
        };
        if let Some(addr) = a.output.prom_addr
            && prom_token.is_none()
            && !addr.ip().is_loopback()
        {
            return Err(bad(
                "--prom-addr",
                format!(
                    "{addr} is not a loopback address: serving metrics beyond this host needs --prom-token-file"
                ),
            ));
        }
        Ok(Config {
            socket,
            socket_mode: a.receive.socket_mode,
            uds_rcvbuf_bytes: a.receive.uds_rcvbuf_bytes,
            udp,
            plaintext_udp: udp.is_some() && a.receive.i_accept_plaintext_udp,
            secure,
            datapath: a.receive.datapath,
            junk_sample_one_in: a.receive.userspace_junk_sample_one_in,
            clock: a.stall.clock_source,
            limits: Limits {
                threshold_ms,
                per_pid_rate: a.admission.max_beat_rate,
                global_rate: a.admission.global_beat_rate,
                global_burst: a.admission.global_beat_burst,
            },
            tracker_capacity: a.admission.tracker_capacity as usize,
            tracker_max_per_uid: match a.admission.tracker_max_per_uid {
                0 => (a.admission.tracker_capacity as usize).div_ceil(2),
                n => n as usize,
            },
            series: SeriesLimits {
                max: a.output.agent_series_max as usize,
                retention_ns: a.output.agent_series_retention_secs * 1_000_000_000,
            },
            eviction: a.admission.tracker_eviction_policy,
            allow_cross_namespace: a.admission.allow_cross_namespace_agents,
            recovery,
            shutdown_grace: Duration::from_millis(a.recovery.shutdown_grace_ms),
            export_file: a.output.export_file.clone().map(|path| SinkOptions {
                path,
                max_bytes: Some(a.output.export_file_max_bytes),
                sync_every: a.output.export_file_sync_every,
            }),
            audit_file: a
                .recovery
                .recovery_audit_file
                .clone()
                .map(|path| SinkOptions {
                    path,
                    max_bytes: Some(a.recovery.recovery_audit_max_bytes),
                    sync_every: a.recovery.recovery_audit_sync_every,
                }),
            prom_addr: a.output.prom_addr,
            prom_token,
            prom_rate_limit: varta_common::ratelimit::Limit::new(
                a.output.prom_rate_limit_per_sec,
                a.output.prom_rate_limit_burst,
            ),
            signal_mode: a.observer.signal_handler_mode,
            nice: a.observer.observer_nice,
            shutdown_after: a.observer.shutdown_after_secs.map(Duration::from_secs),
            pin_root: a.observer.bpf_pin_dir.clone(),
            fresh_state: a.observer.fresh_state,
            no_takeover: a.observer.no_takeover,
            hold: hold_config(a)?,
            config_file: a.observer.config.clone(),
            liveness: LivenessConfig {
                self_watchdog: a.observer.self_watchdog_secs.map(Duration::from_secs),
                heartbeat_file: a.observer.heartbeat_file.clone(),
                hw_watchdog: a.observer.hw_watchdog.clone(),
                inject_wedge: a.observer.inject_wedge_ms.map(Duration::from_millis),
            },
            settings: Settings::from_matches(&line.matches),
        })
    }
}

/// What `--after-handover hold` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldConfig {
    /// `--hold-marker`.
    pub marker: Option<PathBuf>,
}

fn hold_config(a: &DaemonArgs) -> Result<Option<HoldConfig>, ConfigError> {
    match (a.observer.after_handover, &a.observer.hold_marker) {
        (AfterHandover::Hold, marker) => Ok(Some(HoldConfig {
            marker: marker.clone(),
        })),
        (AfterHandover::Exit, None) => Ok(None),
        (AfterHandover::Exit, Some(_)) => Err(bad(
            "--hold-marker",
            "only with --after-handover hold (an observer that exits after a handover holds nothing)",
        )),
    }
}

fn recovery_config(a: &RecoveryArgs) -> Result<Option<RecoveryConfig>, ConfigError> {
    if let Some(name) =
        recovery_env::refused(&a.recovery_env, a.i_accept_recovery_env_loader_variables)
    {
        return Err(bad(
            "--recovery-env",
            format!(
                "{name} makes the recovery command load code or data from where its value points; add --i-accept-recovery-env-loader-variables to pass it anyway"
            ),
        ));
    }
    let command = match (&a.recovery_exec, &a.recovery_exec_file) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(path)) => read_private_file("--recovery-exec-file", path)?,
        (None, None) => return Ok(None),
    };
    let argv: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
    if argv.is_empty() {
        return Err(bad("--recovery-exec", "empty command"));
    }
    Ok(Some(RecoveryConfig {
        argv,
        debounce: Duration::from_millis(a.recovery_debounce_ms),
        timeout: Some(Duration::from_millis(a.recovery_timeout_ms)),
        max_running: a.recovery_max_concurrent as usize,
        spawn_rate: a.recovery_spawn_rate,
        max_running_per_uid: a.recovery_max_concurrent_per_uid as usize,
        spawn_rate_per_uid: a.recovery_spawn_rate_per_uid,
        established_after: Duration::from_millis(a.recovery_established_after_ms),
        env: a.recovery_env.clone(),
        inherit_env: a.recovery_inherit_env,
        allow_udp: false,
        capture_bytes: a
            .recovery_capture_stdio
            .then_some(a.recovery_capture_bytes as usize),
    }))
}

/// The UDP listener's address and the secure UDP keys.
fn udp_config(a: &DaemonArgs) -> Result<(Option<SocketAddr>, SecureKeys), ConfigError> {
    let Some(port) = a.receive.udp_port else {
        return Ok((None, SecureKeys::default()));
    };
    let secure = read_keys(&a.secure_udp)?;
    if secure.is_empty() && !a.receive.i_accept_plaintext_udp {
        return Err(bad(
            "--udp-port",
            "plaintext UDP cannot attest senders; add --i-accept-plaintext-udp to listen anyway, or a --key-file for secure UDP",
        ));
    }
    let default_ip = if secure.is_empty() {
        std::net::Ipv4Addr::UNSPECIFIED
    } else {
        std::net::Ipv4Addr::LOCALHOST
    };
    let ip = a.receive.udp_bind_addr.unwrap_or(default_ip.into());
    if !secure.is_empty() && !ip.is_loopback() && !a.secure_udp.i_accept_secure_udp_non_loopback {
        return Err(bad(
            "--udp-bind-addr",
            format!(
                "{ip} is not a loopback address: secure UDP beyond this host needs --i-accept-secure-udp-non-loopback"
            ),
        ));
    }
    Ok((Some(SocketAddr::new(ip, port)), secure))
}

fn read_keys(a: &SecureUdpArgs) -> Result<SecureKeys, ConfigError> {
    let mut keys = SecureKeys::default();
    if let Some(path) = &a.key_file {
        keys.shared
            .push(secure_keys::read_key_file(path).map_err(|e| bad("--key-file", e))?);
    }
    if let Some(path) = &a.accepted_key_file {
        keys.shared.extend(
            secure_keys::read_accepted_keys(path).map_err(|e| bad("--accepted-key-file", e))?,
        );
    }
    if let Some(path) = &a.master_key_file {
        keys.master =
            Some(secure_keys::read_key_file(path).map_err(|e| bad("--master-key-file", e))?);
    }
    Ok(keys)
}

/// Recovery for agents whose pid only UDP vouches for runs only with the operator's
/// explicit opt-in for that transport, checked at start like the incumbent.
fn check_udp_recovery(a: &DaemonArgs, secure: bool) -> Result<(), ConfigError> {
    let plaintext_ok = a
        .recovery
        .plaintext_udp_i_accept_recovery_on_unauthenticated_transport;
    let secure_ok = a
        .secure_udp
        .secure_udp_i_accept_recovery_on_unauthenticated_transport;
    if a.receive.i_accept_plaintext_udp && !plaintext_ok {
        return Err(bad(
            "--plaintext-udp-i-accept-recovery-on-unauthenticated-transport",
            "recovery with plaintext UDP lets anyone who can send a datagram trigger it; add this flag to run it anyway",
        ));
    }
    if secure && !secure_ok {
        return Err(bad(
            "--secure-udp-i-accept-recovery-on-unauthenticated-transport",
            "recovery with secure UDP runs for a pid any key holder may claim; add this flag to run it anyway",
        ));
    }
    Ok(())
}

/// A secret or a command from a file only the observer's user can read.
fn read_private_file(flag: &'static str, path: &std::path::Path) -> Result<String, ConfigError> {
    private_file::read_private(path)
        .map(|text| text.trim().to_owned())
        .map_err(|e| bad(flag, e))
}

fn read_token(path: &std::path::Path) -> Result<String, ConfigError> {
    let token = read_private_file("--prom-token-file", path)?;
    if token.len() < 16 || token.chars().any(char::is_whitespace) {
        return Err(bad(
            "--prom-token-file",
            "the token must be one word of at least 16 characters",
        ));
    }
    Ok(token)
}
