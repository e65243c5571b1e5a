//! varta-watch: the observer daemon, and a tiny agent for scripts and demos.
//!
//! Data flow: socket -> eBPF filter (or userspace receive) -> datapath -> observer (gates,
//! rate limits, tracker, stall deadlines) -> actions (log, export, metrics, recovery).

mod actions;
mod agent;
mod config;
mod datapath;
mod observer;
mod ratelimit;
mod signal;
mod sys;

use std::{
    net::UdpSocket,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;

use crate::{
    actions::Actions,
    actions::export::Exporter,
    actions::metrics::{KernelDrops, Metrics, SignalLabel},
    actions::recovery::Recovery,
    config::Config,
    config::cli::{Cli, Command, DaemonArgs, DatapathMode},
    datapath::{Beat, Datapath, ebpf::EbpfDatapath, userspace::UserspaceDatapath},
    observer::Observer,
    observer::drops::DropCounters,
    observer::events::Event,
    signal::{Signal, Signals},
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line that names the flag, not clap's usage block.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("varta-watch: error: {first}");
            return ExitCode::from(2);
        }
    };
    sys::logger::init();
    let cli = match (&cli.command, &cli.daemon.config) {
        (None, Some(path)) => match with_config_file(path) {
            Ok(cli) => cli,
            Err(e) => {
                eprintln!("varta-watch: error: --config: {e}");
                return ExitCode::from(2);
            }
        },
        _ => cli,
    };
    let result = match &cli.command {
        Some(Command::Beat(args)) => agent::beat(args),
        Some(Command::Agent(args)) => agent::agent(args),
        None => return daemon(&cli.daemon),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("varta-watch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line again, with the config file's keys in front (flags override them).
fn with_config_file(path: &std::path::Path) -> Result<Cli, String> {
    let file_args = config::file::args(path)?;
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    argv.splice(1..1, file_args.into_iter().map(Into::into));
    Cli::try_parse_from(argv).map_err(|e| {
        let text = e.to_string();
        format!(
            "{}: {}",
            path.display(),
            text.lines()
                .next()
                .unwrap_or("invalid")
                .trim_start_matches("error: ")
        )
    })
}

/// SIGHUP: the configuration file read again; the whole file is valid or nothing changes.
fn reload(running: &Config) -> Result<Config, String> {
    let path = running
        .config_file
        .as_ref()
        .ok_or("no --config file to re-read")?;
    let cli = with_config_file(path)?;
    Config::from_args(&cli.daemon).map_err(|e| format!("{}: {e}", path.display()))
}

fn daemon(args: &DaemonArgs) -> ExitCode {
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("varta-watch: error: {e}");
            return ExitCode::from(2);
        }
    };
    for (flag, why) in args.compat.warnings() {
        log::warn!("event=flag_ignored flag={flag} reason=\"{why}\"");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(
                "event=fatal error=\"{}\"",
                format!("{e:#}").replace('"', "'")
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(mut config: Config) -> Result<()> {
    let (signals, installed) =
        signal::install(config.signal_mode).context("installing signal handlers")?;
    log::info!(
        "event=signals_installed mode={} flags={:#x} restorer={} self_test=passed rseq_size={}",
        if installed.direct { "direct" } else { "libc" },
        installed.flags,
        installed
            .restorer
            .map_or("none".to_owned(), |r| format!("{r:#x}")),
        signal::rseq_size()
    );
    let (uds, granted) =
        sys::sock::bind_uds(&config.socket, config.socket_mode, config.uds_rcvbuf_bytes)
            .with_context(|| format!("binding {}", config.socket.display()))?;
    let udp = config
        .udp
        .map(|addr| {
            let sock = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
            sock.set_nonblocking(true)?;
            anyhow::Ok(sock)
        })
        .transpose()?;
    let drops = Arc::new(DropCounters::default());

    let ebpf = match config.datapath {
        DatapathMode::Userspace => None,
        DatapathMode::Ebpf | DatapathMode::Auto => {
            let sockets = (
                uds.try_clone()?,
                udp.as_ref().map(UdpSocket::try_clone).transpose()?,
            );
            match EbpfDatapath::start(
                sockets.0,
                sockets.1,
                config.clock,
                &config.limits,
                config.allow_cross_namespace,
                drops.clone(),
            ) {
                Ok(started) => Some(started),
                Err(e) if config.datapath == DatapathMode::Ebpf => {
                    let _ = std::fs::remove_file(&config.socket);
                    anyhow::bail!("--datapath ebpf: {e}");
                }
                Err(e) => {
                    log::warn!("event=datapath_fallback datapath=userspace reason=\"{e}\"");
                    datapath::ebpf::detach(&uds, udp.as_ref());
                    None
                }
            }
        }
    };
    let result = match ebpf {
        Some((datapath, kernel_drops)) => {
            serve(
                datapath,
                Some(kernel_drops),
                &mut config,
                signals,
                drops,
                granted,
            )
            .await
        }
        None => {
            let datapath = UserspaceDatapath::new(
                uds,
                udp,
                config.clock,
                config.allow_cross_namespace,
                drops.clone(),
            )?;
            serve(datapath, None, &mut config, signals, drops, granted).await
        }
    };
    let _ = std::fs::remove_file(&config.socket);
    result
}

/// The daemon's event loop, the same for both datapaths.
async fn serve<D: Datapath>(
    mut datapath: D,
    kernel_drops: Option<KernelDrops>,
    config: &mut Config,
    mut signals: Signals,
    drops: Arc<DropCounters>,
    rcvbuf: u32,
) -> Result<()> {
    let clock = config.clock;
    let metrics = Arc::new(Metrics::new(
        drops.clone(),
        datapath.mode(),
        config.tracker_capacity,
    ));
    if let Some(read) = kernel_drops {
        metrics.set_kernel_drops(read);
    }
    metrics.rcvbuf_bytes.set(rcvbuf as i64);
    let prom = match config.prom_addr {
        Some(addr) => Some(
            actions::http::serve(addr, metrics.clone(), config.prom_token.clone())
                .await
                .with_context(|| format!("--prom-addr {addr}"))?,
        ),
        None => None,
    };
    let export = match &config.export_file {
        Some(path) => Some(
            Exporter::open(path.clone())
                .with_context(|| format!("--export-file {}", path.display()))?,
        ),
        None => None,
    };
    let start_ns = clock.now_ns();
    let mut observer = Observer::new(config, drops, datapath.rate_limits_applied(), start_ns);
    let mut actions = Actions::new(
        metrics.clone(),
        export,
        config.recovery.clone().map(Recovery::new),
        start_ns,
    );
    metrics.pid_max.set(observer.pid_max() as i64);
    log::info!(
        "event=ready pid={} datapath={} socket={} udp={} metrics={} threshold_ms={}",
        std::process::id(),
        datapath.mode(),
        config.socket.display(),
        config.udp.map_or("-".to_owned(), |a| a.to_string()),
        prom.map_or("-".to_owned(), |a| a.to_string()),
        config.limits.threshold_ms,
    );

    let shutdown_at = config
        .shutdown_after
        .map(|d| tokio::time::Instant::now() + d);
    let mut beats: Vec<Beat> = Vec::with_capacity(256);
    let mut events: Vec<Event> = Vec::with_capacity(256);
    loop {
        let deadline = observer.next_deadline();
        let mut stop = false;
        tokio::select! {
            received = signals.recv() => {
                for sig in received.context("waiting for signals")? {
                    metrics.signals.get_or_create(&SignalLabel { signal: sig.name() }).inc();
                    match sig {
                        Signal::Term | Signal::Int => {
                            log::info!("event=shutdown signal={}", sig.name());
                            stop = true;
                        }
                        Signal::Hup => {
                            if let Some(export) = &mut actions.export {
                                match export.reopen() {
                                    Ok(()) => log::info!("event=export_reopened"),
                                    Err(e) => log::warn!("event=export_reopen_failed error=\"{e}\""),
                                }
                            }
                            if config.config_file.is_some() {
                                apply_reload(config, &mut datapath, &mut observer, &mut actions);
                            }
                        }
                        Signal::Usr1 => snapshot(&observer, clock.now_ns()),
                    }
                }
            }
            received = datapath.recv(&mut beats) => received.context("receiving")?,
            () = tokio::time::sleep_until(clock.instant_at(deadline.unwrap_or(0))), if deadline.is_some() => {
                // Beats still queued count before any stall is decided.
                datapath.drain(&mut beats);
            }
            (pid, outcome, detail) = async { actions.recovery.as_mut().expect("guarded").finished().await }, if actions.recovery.is_some() => {
                events.push(Event::Recovery { pid, outcome, detail });
            }
            () = tokio::time::sleep_until(shutdown_at.unwrap_or_else(tokio::time::Instant::now)), if shutdown_at.is_some() => {
                log::info!("event=shutdown reason=shutdown_after_secs");
                stop = true;
            }
        }
        if stop {
            datapath.drain(&mut beats);
        }
        metrics.delivered.inc_by(beats.len() as u64);
        for beat in beats.drain(..) {
            observer.admit(&beat, &mut events);
        }
        let now = clock.now_ns();
        observer.expire(now, &mut events);
        for event in &events {
            match event {
                Event::Stall { pid, agent, .. } => datapath.agent_silent(*pid, &agent.origin),
                Event::Exit { pid, origin, .. } => datapath.agent_silent(*pid, origin),
                _ => {}
            }
        }
        datapath.set_watching(observer.next_deadline().is_some());
        actions.handle_all(&mut events, now);
        metrics.pids_tracked.set(observer.tracker().len() as i64);
        metrics.pid_max.set(observer.pid_max() as i64);
        if stop {
            break;
        }
    }
    finish_recoveries(&mut actions, config.shutdown_grace, clock.now_ns()).await;
    actions.flush();
    Ok(())
}

fn apply_reload<D: Datapath>(
    config: &mut Config,
    datapath: &mut D,
    observer: &mut Observer,
    actions: &mut Actions,
) {
    let new = match reload(config) {
        Ok(new) => new,
        Err(e) => {
            log::warn!("event=reload_rejected reason=\"{}\"", e.replace('"', "'"));
            return;
        }
    };
    for key in config.restart_only_changes(&new) {
        log::warn!("event=reload_needs_restart key={key}");
    }
    let changed = config.live_changes(&new);
    if let Err(e) = datapath.set_limits(&new.limits) {
        log::warn!("event=reload_rejected reason=\"updating the eBPF configuration: {e}\"");
        return;
    }
    observer.set_limits(&new.limits);
    match (&mut actions.recovery, &new.recovery) {
        (Some(recovery), Some(cfg)) => recovery.set_config(cfg.clone()),
        (slot, cfg) => *slot = cfg.clone().map(Recovery::new),
    }
    config.limits = new.limits;
    config.recovery = new.recovery;
    log::info!(
        "event=reload changed={}",
        if changed.is_empty() {
            "none".to_owned()
        } else {
            changed.join(",")
        }
    );
}

/// Waits up to the grace period for running recovery commands, recording their outcomes.
async fn finish_recoveries(actions: &mut Actions, grace: Duration, now_ns: u64) {
    let deadline = Instant::now() + grace;
    while let Some(recovery) = actions.recovery.as_mut().filter(|r| r.running() > 0) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, recovery.finished()).await {
            Ok((pid, outcome, detail)) => {
                let mut events = vec![Event::Recovery {
                    pid,
                    outcome,
                    detail,
                }];
                actions.handle_all(&mut events, now_ns);
            }
            Err(_) => {
                log::warn!(
                    "event=shutdown_recoveries_abandoned running={}",
                    recovery.running()
                );
                break;
            }
        }
    }
}

/// SIGUSR1: one line per tracked agent.
fn snapshot(observer: &Observer, now_ns: u64) {
    log::info!("event=snapshot agents={}", observer.tracker().len());
    for (pid, agent) in observer.tracker().agents() {
        log::info!(
            "event=snapshot_agent pid={pid} frame_pid={} last_beat_age_ms={} status={} stalled={} dead={} last_nonce={} transport={}",
            agent.frame_pid,
            now_ns.saturating_sub(agent.last_beat_ns) / 1_000_000,
            agent.status.name(),
            agent.stalled,
            agent.dead,
            agent.last_nonce,
            agent.origin.transport()
        );
    }
}
