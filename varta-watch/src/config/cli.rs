//! The command line: one declaration per setting. Each daemon flag is declared once here,
//! under the help heading of its stage; that declaration drives parsing, the environment
//! variable (`VARTA_` + the flag name, see [`env_name`]), the `--config` file's keys (the
//! long flag names), and reloading: flags in the `live` group take effect on SIGHUP, every
//! other one is named as needing a restart. Every flag of the incumbent varta-watch 0.2.0
//! parses, so its unit files start this daemon unchanged (see `compat`).

use std::{net::SocketAddr, path::PathBuf};

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use super::compat::{CompatArgs, RemovedArgs};
use crate::{signal::SignalHandlerMode, sys::clock::ClockSource, sys::logger::LogFormat};

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
    /// A live view of a running observer's /metrics (ours or the incumbent's); `q` quits.
    /// With stdout not a terminal, prints one plain snapshot and exits.
    Top(TopArgs),
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
    /// After this many beats, send the panic-terminal frame and exit, as an agent's panic
    /// hook does (a demo of an agent dying).
    #[arg(long)]
    pub panic_after: Option<u64>,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The observer's --prom-addr (the default is what `cargo xtask run` uses).
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub addr: SocketAddr,
    /// File holding the bearer token of the observer's --prom-token-file.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvictionPolicy {
    /// Evict only agents already surfaced as stalled.
    Strict,
    /// Prefer stalled agents, else evict the one silent longest.
    Balanced,
}

/// `--after-handover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AfterHandover {
    /// Exit 0.
    Exit,
    /// Stay, idle and holding nothing, until SIGTERM.
    Hold,
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

/// The group of settings SIGHUP may change at run time (see `config::settings`).
pub const LIVE: &str = "live";

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new(LIVE).multiple(true)))]
pub struct DaemonArgs {
    #[command(flatten)]
    pub receive: ReceiveArgs,
    #[command(flatten)]
    pub secure_udp: SecureUdpArgs,
    #[command(flatten)]
    pub stall: StallArgs,
    #[command(flatten)]
    pub admission: AdmissionArgs,
    #[command(flatten)]
    pub recovery: RecoveryArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub observer: ObserverArgs,
    #[command(flatten)]
    pub compat: CompatArgs,
    #[command(flatten)]
    pub removed: RemovedArgs,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Socket and receive")]
pub struct ReceiveArgs {
    /// Bind the observer's Unix datagram socket here.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// File mode of the socket (octal).
    #[arg(long, default_value = "0600", value_parser = parse_octal)]
    pub socket_mode: u32,
    /// SO_RCVBUF of the socket in bytes (0 = kernel default).
    #[arg(long, default_value_t = 1_048_576)]
    pub uds_rcvbuf_bytes: u32,
    /// Also listen on UDP on this port: secure frames with a key flag, plaintext ones with
    /// --i-accept-plaintext-udp.
    #[arg(long)]
    pub udp_port: Option<u16>,
    /// Address of the UDP listener [default: 127.0.0.1 with keys, else 0.0.0.0].
    #[arg(long)]
    pub udp_bind_addr: Option<std::net::IpAddr>,
    /// Acknowledge that plaintext UDP frames are unauthenticated (anyone can claim any pid).
    #[arg(long)]
    pub i_accept_plaintext_udp: bool,
    /// Where frames are received and validated.
    #[arg(long, value_enum, default_value = "auto")]
    pub datapath: DatapathMode,
    /// Userspace datapath: a classic BPF filter drops invalid frames in the kernel and lets
    /// one in N through to be counted by reason (a power of two; 1 counts every one exactly).
    #[arg(long, default_value_t = 1024, value_parser = parse_power_of_two)]
    pub userspace_junk_sample_one_in: u32,
}

/// Secure UDP: ChaCha20-Poly1305 frames (60 bytes shared key, 64 bytes master key), as
/// the varta-client crate's `secure-udp` feature sends them.
#[derive(Debug, Args)]
#[command(next_help_heading = "Secure UDP")]
pub struct SecureUdpArgs {
    /// Shared key: one 64-hex-digit key (file mode 0600, owned by the observer's user).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// More shared keys accepted, one per line (zero-downtime rotation; mode 0600).
    #[arg(long, value_name = "PATH")]
    pub accepted_key_file: Option<PathBuf>,
    /// Master key (64 hex digits, mode 0600): each agent's key is HKDF-SHA256 of it and its pid.
    #[arg(long, value_name = "PATH")]
    pub master_key_file: Option<PathBuf>,
    /// Allow secure UDP on a non-loopback --udp-bind-addr.
    #[arg(long)]
    pub i_accept_secure_udp_non_loopback: bool,
    /// Allow recovery for agents known only through secure UDP (their pid is the key
    /// holder's claim, not attested by the kernel).
    #[arg(long, group = LIVE)]
    pub secure_udp_i_accept_recovery_on_unauthenticated_transport: bool,
}

/// The longest duration a millisecond flag takes: a week (times in nanoseconds stay far from
/// overflowing, and an absurd value is refused instead of wrapping).
const MAX_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Debug, Args)]
#[command(next_help_heading = "Stall detection")]
pub struct StallArgs {
    /// Silence (ms) after which an agent is surfaced as stalled (at most a week).
    #[arg(long, group = LIVE, value_parser = clap::value_parser!(u64).range(1..=MAX_MS))]
    pub threshold_ms: Option<u64>,
    /// Clock for stall accounting: boottime also counts time the host was suspended.
    #[arg(long, value_enum, default_value = "monotonic")]
    pub clock_source: ClockSource,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Tracker and admission")]
pub struct AdmissionArgs {
    /// Distinct agents tracked at once (at most 1,048,576).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub tracker_capacity: u32,
    /// Quota of agents per uid (their process's real uid), binding once the tracker is
    /// full, so one user's processes cannot refuse or evict other users' agents: a uid at
    /// it makes room only from its own stalled or dead agents; a uid under it takes room
    /// from a uid over it first. 0: half of --tracker-capacity.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub tracker_max_per_uid: u32,
    /// Which agent makes room for a new one when the tracker is full.
    #[arg(long, value_enum, default_value = "strict")]
    pub tracker_eviction_policy: EvictionPolicy,
    /// Beats per second per agent (0 disables).
    #[arg(long, group = LIVE, default_value_t = 100)]
    pub max_beat_rate: u32,
    /// Beats per second from all agents together (0 disables).
    #[arg(long, group = LIVE, default_value_t = 5000)]
    pub global_beat_rate: u32,
    /// Capacity of the global token bucket.
    #[arg(long, group = LIVE, default_value_t = 10000)]
    pub global_beat_burst: u32,
    /// Accept agents from other pid namespaces (containers); tracked under their host pid.
    #[arg(long)]
    pub allow_cross_namespace_agents: bool,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Recovery")]
pub struct RecoveryArgs {
    /// Command run for a stalled or dying agent: split on whitespace, no shell; `{pid}` is
    /// replaced by the pid, which is appended when no argument holds `{pid}`.
    #[arg(long, group = LIVE)]
    pub recovery_exec: Option<String>,
    /// Read the recovery command from this file (mode 0600, owned by the observer's user).
    #[arg(long, group = LIVE, conflicts_with = "recovery_exec")]
    pub recovery_exec_file: Option<PathBuf>,
    /// At most one recovery per agent within this many ms.
    #[arg(long, group = LIVE, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=MAX_MS))]
    pub recovery_debounce_ms: u64,
    /// Kill a recovery command still running after this many ms.
    #[arg(long, group = LIVE, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=MAX_MS))]
    pub recovery_timeout_ms: u64,
    /// Most recovery commands running at once, all agents together (more are suppressed
    /// and counted).
    #[arg(long, group = LIVE, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub recovery_max_concurrent: u32,
    /// Most recovery commands started per second, all agents together (bursts of one
    /// second's worth; more are suppressed and counted).
    #[arg(long, group = LIVE, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub recovery_spawn_rate: u32,
    /// Most recovery commands running at once for the agents of one uid (the agent's
    /// process uid; of one pod, for agents in a Kubernetes pod), so that one user's agents
    /// cannot take every slot.
    #[arg(long, group = LIVE, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub recovery_max_concurrent_per_uid: u32,
    /// Most recovery commands started per second for the agents of one uid (of one pod, for
    /// agents in a Kubernetes pod; bursts of one second's worth).
    #[arg(long, group = LIVE, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub recovery_spawn_rate_per_uid: u32,
    /// An agent that beat for less than this many ms before its stall or exit is one-shot:
    /// one-shot agents together get at most half of --recovery-max-concurrent and of
    /// --recovery-spawn-rate, so established agents keep the other half.
    #[arg(long, group = LIVE, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=MAX_MS))]
    pub recovery_established_after_ms: u64,
    /// KEY=VALUE added to the recovery command's environment (repeatable).
    #[arg(long, group = LIVE, value_parser = parse_env_pair, value_delimiter = None)]
    pub recovery_env: Vec<(String, String)>,
    /// Give the recovery command the observer's whole environment.
    #[arg(long, group = LIVE)]
    pub recovery_inherit_env: bool,
    /// Let --recovery-env set loader variables (LD_*, GCONV_PATH, GLIBC_TUNABLES, ...),
    /// which make the recovery command load code or data from where they point.
    #[arg(long, group = LIVE)]
    pub i_accept_recovery_env_loader_variables: bool,
    /// Allow recovery for agents known only through plaintext UDP (their pid is unattested).
    #[arg(long, group = LIVE)]
    pub plaintext_udp_i_accept_recovery_on_unauthenticated_transport: bool,
    /// At shutdown, wait this long (ms) for running recovery commands before killing them
    /// (at most 10 minutes).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub shutdown_grace_ms: u64,
    /// Keep the recovery command's stdout and stderr (up to --recovery-capture-bytes) for
    /// its audit record.
    #[arg(long, group = LIVE)]
    pub recovery_capture_stdio: bool,
    /// Bytes of a recovery command's output kept with --recovery-capture-stdio.
    #[arg(long, group = LIVE, default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub recovery_capture_bytes: u64,
    /// Append one tab-separated record per recovery spawn and outcome to this file (mode
    /// 0600, not through a symlink; SIGHUP reopens it).
    #[arg(long, value_name = "PATH")]
    pub recovery_audit_file: Option<PathBuf>,
    /// Rotate the audit file before it grows past this size, keeping 5 generations.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FILE_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub recovery_audit_max_bytes: u64,
    /// fdatasync the audit file every N records (0: only at shutdown), off the event loop.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub recovery_audit_sync_every: u64,
}

/// The export and audit files' size before rotation unless set (64 MiB; the incumbent has
/// none): with 5 generations kept, a sender at its maximum rate cannot fill the disk.
pub const DEFAULT_FILE_MAX_BYTES: u64 = 64 << 20;

#[derive(Debug, Args)]
#[command(next_help_heading = "Export and metrics")]
pub struct OutputArgs {
    /// Append one tab-separated line per event to this file (mode 0600, not through a
    /// symlink; SIGHUP reopens it).
    #[arg(long)]
    pub export_file: Option<PathBuf>,
    /// Rotate the export file before it grows past this size, keeping 5 generations.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FILE_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub export_file_max_bytes: u64,
    /// fdatasync the export file every N lines (0: only at shutdown), off the event loop.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub export_file_sync_every: u64,
    /// Serve Prometheus metrics on GET /metrics at this address.
    #[arg(long)]
    pub prom_addr: Option<SocketAddr>,
    /// Bearer token file for /metrics (required for a non-loopback --prom-addr).
    #[arg(long)]
    pub prom_token_file: Option<PathBuf>,
    /// Scrapes of /metrics per second from one address, beyond which it answers 429
    /// (0: no limit; the probes are never limited).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub prom_rate_limit_per_sec: u32,
    /// Scrapes one address may make at once before --prom-rate-limit-per-sec applies.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub prom_rate_limit_burst: u32,
    /// Most agents with per-agent series (pid label: varta_beats_total, varta_stalls_total,
    /// varta_status, varta_exits_total, varta_criticals_total, varta_agent_info) at once;
    /// agents beyond it are counted only in the aggregates (varta_agents{state},
    /// varta_agent_stalls_total, varta_agent_exits_total) and in
    /// varta_agent_series_overflow_total.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub agent_series_max: u32,
    /// Seconds an agent's per-agent series stay in /metrics after it is gone (sent the
    /// panic-terminal frame, was evicted from the tracker, or stalled and its process
    /// exited), so that scrapes see its last stall or exit (at most a week).
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(0..=7 * 24 * 3600))]
    pub agent_series_retention_secs: u64,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "The observer itself")]
pub struct ObserverArgs {
    /// TOML file with the same keys as the long flags; re-read on SIGHUP.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The observer's nice value, so it keeps a CPU share on a saturated node (needs
    /// CAP_SYS_NICE to go below 0; without it the priority stays and one line says so).
    /// 0 keeps the inherited priority.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub observer_nice: i32,
    /// How signal handlers are installed.
    #[arg(long, value_enum, default_value = "direct")]
    pub signal_handler_mode: SignalHandlerMode,
    /// Test-only hook, hidden from `--help` (the incumbent's flag, kept so its test scripts
    /// run): exit cleanly after this many seconds.
    #[arg(long, hide = true)]
    pub shutdown_after_secs: Option<u64>,
    /// Where the eBPF filter's maps are pinned, so that a restarted observer resumes them
    /// (one subdirectory per socket and map layout). bpffs is mounted here when absent.
    #[arg(long, value_name = "DIR", default_value = varta_common::filter::PIN_ROOT)]
    pub bpf_pin_dir: PathBuf,
    /// Start empty on purpose: remove this socket's pinned maps and the state file.
    #[arg(long)]
    pub fresh_state: bool,
    /// Refuse to start while another observer runs on this socket, instead of taking over
    /// from it (its sockets and state, over `<socket>.ctl`; the default).
    #[arg(long)]
    pub no_takeover: bool,
    /// What this observer does once a successor took over its sockets and state: exit 0,
    /// or hold: keep none of the observer's sockets, do no work, answer only the probes of
    /// --prom-addr when the successor did not take that address, and exit 0 on SIGTERM.
    /// Hold is for a DaemonSet rolled with maxSurge: its kubelet restarts a container that
    /// exits, and the restarted one would take the node back.
    #[arg(long, value_enum, value_name = "WHAT", default_value = "exit")]
    pub after_handover: AfterHandover,
    /// With --after-handover hold: this file is written when the observer hands over, and
    /// an observer started while it exists holds at once instead of taking over (a held
    /// pod's container restarted by its kubelet). Put it where it lives exactly as long as
    /// the pod (an emptyDir).
    #[arg(long, value_name = "PATH")]
    pub hold_marker: Option<PathBuf>,
    /// Abort (for a supervisor to restart the observer) when its event loop has made no
    /// progress for this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub self_watchdog_secs: Option<u64>,
    /// Rewrite this file with `ts=<unix time> progress=<loop rounds>` at most once a second.
    #[arg(long, value_name = "PATH")]
    pub heartbeat_file: Option<PathBuf>,
    /// Kick this watchdog device (e.g. /dev/watchdog) while the event loop runs; write the
    /// magic `V` at a clean shutdown.
    #[arg(long, value_name = "PATH")]
    pub hw_watchdog: Option<PathBuf>,
    /// Test-only hook, hidden from `--help` (the incumbent's flag, kept so its test scripts
    /// run): block the event loop this long once, when it first takes in beats.
    #[arg(long, value_name = "MS", hide = true)]
    pub inject_wedge_ms: Option<u64>,
    /// Log lines as `key=value` text, or one JSON object per line for log shippers.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The environment variable a daemon flag may also come from: `--max-beat-rate` is
/// `VARTA_MAX_BEAT_RATE`.
pub fn env_name(long: &str) -> String {
    format!("VARTA_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// The command definition, with every daemon flag's environment variable set.
pub fn command() -> clap::Command {
    Cli::command().mut_args(|arg| match arg.get_long() {
        Some(long) if !matches!(long, "help" | "version") => {
            let env = env_name(long);
            arg.env(env)
        }
        _ => arg,
    })
}

/// A parsed command line, and the matches it came from (the reload diff and the
/// compatibility warnings read which flags were given and how).
#[derive(Debug)]
pub struct CommandLine {
    pub cli: Cli,
    pub matches: ArgMatches,
}

impl CommandLine {
    pub fn parse_from<I, T>(argv: I) -> Result<CommandLine, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = command().try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        Ok(CommandLine { cli, matches })
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

fn parse_power_of_two(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() => Ok(n),
        _ => Err(format!("'{s}' is not a power of two (1, 2, 4, ...)")),
    }
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
