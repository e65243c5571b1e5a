//! The validated configuration the daemon runs with, built from the command line (and
//! environment). Every check names the flag it is about.

pub mod cli;
mod compat;
pub mod file;
mod reload;
mod settings;

pub use compat::warnings;
pub use file::parse_command_line;
pub use reload::reload;
pub use settings::Settings;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    actions::sink::SinkOptions,
    config::cli::{CommandLine, DatapathMode, EvictionPolicy, RecoveryArgs, SignalHandlerMode},
    sys::clock::ClockSource,
};

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
    pub env: Vec<(String, String)>,
    pub inherit_env: bool,
    pub allow_udp: bool,
    /// Bytes of output kept for the audit record (`--recovery-capture-stdio`).
    pub capture_bytes: Option<usize>,
}

/// The observer's own liveness (`daemon::liveness`).
#[derive(Debug, Clone, Default)]
pub struct LivenessConfig {
    pub self_watchdog: Option<Duration>,
    pub heartbeat_file: Option<PathBuf>,
    pub hw_watchdog: Option<PathBuf>,
    pub inject_wedge: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub uds_rcvbuf_bytes: u32,
    pub udp: Option<SocketAddr>,
    pub datapath: DatapathMode,
    pub junk_sample_one_in: u32,
    pub clock: ClockSource,
    pub limits: Limits,
    pub tracker_capacity: usize,
    pub eviction: EvictionPolicy,
    pub allow_cross_namespace: bool,
    pub recovery: Option<RecoveryConfig>,
    pub shutdown_grace: Duration,
    pub export_file: Option<SinkOptions>,
    pub audit_file: Option<SinkOptions>,
    pub prom_addr: Option<SocketAddr>,
    pub prom_token: Option<String>,
    pub signal_mode: SignalHandlerMode,
    pub shutdown_after: Option<Duration>,
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
        let udp = match a.receive.udp_port {
            None => None,
            Some(_) if !a.receive.i_accept_plaintext_udp && !a.secure_udp.has_key() => {
                return Err(bad(
                    "--udp-port",
                    "plaintext UDP cannot attest senders; add --i-accept-plaintext-udp to listen anyway",
                ));
            }
            // Secure UDP is not implemented: with keys only, no UDP listener starts (warned).
            Some(_) if !a.receive.i_accept_plaintext_udp => None,
            Some(port) => Some(SocketAddr::new(a.receive.udp_bind_addr, port)),
        };
        let recovery = recovery_config(&a.recovery)?;
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
            eviction: a.admission.tracker_eviction_policy,
            allow_cross_namespace: a.admission.allow_cross_namespace_agents,
            recovery,
            shutdown_grace: Duration::from_millis(a.recovery.shutdown_grace_ms),
            export_file: a.output.export_file.clone().map(|path| SinkOptions {
                path,
                max_bytes: a.output.export_file_max_bytes,
                sync_every: a.output.export_file_sync_every,
            }),
            audit_file: a
                .recovery
                .recovery_audit_file
                .clone()
                .map(|path| SinkOptions {
                    path,
                    max_bytes: a.recovery.recovery_audit_max_bytes,
                    sync_every: a.recovery.recovery_audit_sync_every,
                }),
            prom_addr: a.output.prom_addr,
            prom_token,
            signal_mode: a.observer.signal_handler_mode,
            shutdown_after: a.observer.shutdown_after_secs.map(Duration::from_secs),
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

fn recovery_config(a: &RecoveryArgs) -> Result<Option<RecoveryConfig>, ConfigError> {
    let command = match (&a.recovery_exec, &a.recovery_exec_file) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(path)) => read_private_file("--recovery-exec-file", path)?,
        (None, None) => return Ok(None),
    };
    let argv: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
    if argv.is_empty() {
        return Err(bad("--recovery-exec", "empty command"));
    }
    if a.recovery_timeout_ms == Some(0) {
        return Err(bad("--recovery-timeout-ms", "must be at least 1"));
    }
    Ok(Some(RecoveryConfig {
        argv,
        debounce: Duration::from_millis(a.recovery_debounce_ms),
        timeout: a.recovery_timeout_ms.map(Duration::from_millis),
        env: a.recovery_env.clone(),
        inherit_env: a.recovery_inherit_env,
        allow_udp: a.plaintext_udp_i_accept_recovery_on_unauthenticated_transport,
        capture_bytes: a
            .recovery_capture_stdio
            .then_some(a.recovery_capture_bytes as usize),
    }))
}

/// A secret or a command from a file only the observer's user can write or read.
fn read_private_file(flag: &'static str, path: &PathBuf) -> Result<String, ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).map_err(|e| bad(flag, format!("{}: {e}", path.display())))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid || meta.mode() & 0o077 != 0 {
        return Err(bad(
            flag,
            format!(
                "{} must be owned by uid {euid} with mode 0600",
                path.display()
            ),
        ));
    }
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| bad(flag, format!("{}: {e}", path.display())))
}

fn read_token(path: &PathBuf) -> Result<String, ConfigError> {
    let token = read_private_file("--prom-token-file", path)?;
    if token.len() < 16 || token.chars().any(char::is_whitespace) {
        return Err(bad(
            "--prom-token-file",
            "the token must be one word of at least 16 characters",
        ));
    }
    Ok(token)
}
