//! The daemon's event loop, the same for both datapaths: wait for something to happen, run
//! what arrived through the observer, act on the events, repeat.

use crate::sys::logger::event;
use std::{sync::Arc, time::Instant};

use anyhow::{Context, Result};
use varta_common::DropReason;

use super::{
    health::Health,
    takeover::{self, Control, Handed, Request},
};
use crate::{
    actions::{
        Actions,
        audit::Audit,
        export::Exporter,
        metrics::{Metrics, SignalLabel},
        recovery::Recovery,
    },
    config::Config,
    datapath::Datapath,
    observer::Observer,
    signal::{Signal, Signals},
    sys::{clock::ClockSource, deadline::DeadlineTimer},
    vocab::{
        beat::Beat,
        drops::{DropCounters, KernelDrops},
        events::Event,
    },
};

/// How long the scrapes accepted before a handover have, at most, to be answered after it.
const SCRAPE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How the loop ended.
#[derive(Debug)]
pub enum Ended {
    /// Asked to stop (a signal, `--shutdown-after-secs`).
    Stopped,
    /// A successor took over this observer's sockets and state: it exits (or holds) without
    /// touching either (the socket file, the state file, the pins are the successor's now).
    HandedOver {
        peer_pid: u32,
        /// This observer's metrics listener when the successor, in another network
        /// namespace, did not take it: a held observer answers the probes there.
        metrics: Option<std::os::fd::OwnedFd>,
    },
}

/// What a successor may take over: the control socket it asks on, and this observer's
/// sockets (the metrics listener is added once served).
pub struct Succession {
    pub control: Option<Control>,
    pub fds: Handed,
    /// The metrics listener handed over by the predecessor (or passed), served as it is.
    pub metrics: Option<std::net::TcpListener>,
}

/// What start-up prepared for the loop, whichever datapath runs it.
pub struct Run<'s> {
    /// Borrowed: a held observer (`daemon::hold`) keeps waiting for them after the loop.
    pub signals: &'s mut Signals,
    pub drops: Arc<DropCounters>,
    /// The receive buffer the kernel granted the UDS.
    pub rcvbuf: u32,
    pub resume: super::state::Resume,
    pub state_path: std::path::PathBuf,
    pub succession: Succession,
}

/// Sets up metrics, the metrics endpoint and the export file, then runs the loop until a
/// shutdown is asked for, and shuts down.
pub async fn serve<D: Datapath>(
    datapath: D,
    kernel_drops: Option<KernelDrops>,
    config: &mut Config,
    run: Run<'_>,
) -> Result<Ended> {
    let Run {
        signals,
        drops,
        rcvbuf,
        resume,
        state_path,
        mut succession,
    } = run;
    let metrics = Arc::new(Metrics::new(
        drops.clone(),
        datapath.mode(),
        datapath.attest(),
        config.tracker_capacity,
    ));
    if let Some(read) = kernel_drops {
        metrics.set_kernel_drops(read);
    }
    metrics.rcvbuf_bytes.set(rcvbuf as i64);
    let (health, probes) = Health::new();
    let prom = match config.prom_addr {
        Some(addr) => Some(
            crate::daemon::http::serve(
                addr,
                succession.metrics.take(),
                metrics.clone(),
                config.prom_token.clone(),
                config.prom_rate_limit,
                probes,
            )
            .await
            .with_context(|| format!("--prom-addr {addr}"))?,
        ),
        None => None,
    };
    if let Some(served) = &prom {
        succession.fds.metrics = Some(served.listener.try_clone()?);
    }
    let export = match &config.export_file {
        Some(opts) => Some(
            Exporter::open(opts.clone(), metrics.files.clone())
                .with_context(|| format!("--export-file {}", opts.path.display()))?,
        ),
        None => None,
    };
    let audit = match &config.audit_file {
        Some(opts) => Some(
            Audit::open(opts.clone(), metrics.files.clone())
                .with_context(|| format!("--recovery-audit-file {}", opts.path.display()))?,
        ),
        None => None,
    };
    let liveness = super::liveness::Liveness::start(&config.liveness)?;
    let clock = config.clock;
    let start_ns = clock.now_ns();
    let mut observer = Observer::new(config, drops);
    let mut actions = Actions::new(
        metrics.clone(),
        export,
        config.recovery.clone().map(Recovery::new),
        audit,
        start_ns,
        config.series,
    );
    let mut datapath = datapath;
    // What a previous instance left: agents (pinned maps, state file) and counters.
    if let Some(state) = &resume.state {
        state.restore_counters(&metrics);
    }
    datapath.restore_held_seen(resume.state.as_ref().map_or(&[], |s| &s.held));
    for saved in resume.agents {
        let (pid, origin) = (saved.agent.pid, saved.agent.origin);
        if observer.restore(saved.agent) {
            actions.restore_identity(pid, &origin, saved.identity);
            datapath.agent_tracked(pid, &origin);
        }
    }
    datapath.set_watching(observer.next_deadline().is_some());
    metrics.pids_tracked.set(observer.tracker().len() as i64);
    resume.said.log();
    metrics.pid_max.set(observer.pid_max() as i64);
    event!(
        info,
        "ready",
        pid = std::process::id(),
        datapath = datapath.mode(),
        attest = datapath.attest(),
        socket:% = config.socket.display(),
        udp = config.udp.map(|a| a.to_string()),
        metrics = prom.as_ref().map(|p| p.addr.to_string()),
        threshold_ms = config.limits.threshold_ms,
    );
    health.set_ready();
    let mut event_loop = EventLoop {
        health,
        datapath,
        config,
        signals,
        metrics,
        observer,
        actions,
        liveness,
        clock,
        stall_timer: DeadlineTimer::new(clock).context("creating the stall timer")?,
        beats: Vec::with_capacity(256),
        events: Vec::with_capacity(256),
        state_path,
        checkpointed: Instant::now(),
        checkpoint_waiting: Vec::new(),
        succession,
        takeover: None,
        prom,
    };
    let result = event_loop.run().await;
    event_loop.liveness.disarm();
    if let Some(control) = &event_loop.succession.control {
        control.remove();
    }
    let ended = result?;
    event_loop.finish_recoveries().await;
    event_loop.actions.flush();
    if matches!(ended, Ended::Stopped) {
        event_loop.checkpoint();
    }
    event_loop.liveness.finish();
    Ok(ended)
}

struct EventLoop<'c, D> {
    health: Health,
    datapath: D,
    config: &'c mut Config,
    signals: &'c mut Signals,
    metrics: Arc<Metrics>,
    observer: Observer,
    actions: Actions,
    liveness: super::liveness::Liveness,
    clock: ClockSource,
    stall_timer: DeadlineTimer,
    /// Reused between wake-ups: what the datapath delivered, what the observer surfaced.
    beats: Vec<Beat>,
    events: Vec<Event>,
    /// The state file (`daemon::state`) and when it was last written.
    state_path: std::path::PathBuf,
    checkpointed: Instant,
    /// Scrapes waiting for the state file to hold their counters (`Probes::checkpoint`).
    checkpoint_waiting: Vec<tokio::sync::oneshot::Sender<()>>,
    succession: Succession,
    /// A successor asked to take over: handed over at the end of this round.
    takeover: Option<Request>,
    prom: Option<crate::daemon::http::Served>,
}

impl<D: Datapath> EventLoop<'_, D> {
    async fn run(&mut self) -> Result<Ended> {
        let shutdown_at = self
            .config
            .shutdown_after
            .map(|d| tokio::time::Instant::now() + d);
        loop {
            let stop = self.wait(shutdown_at).await?;
            if stop {
                self.health.set_stopping();
                if let Some(recovery) = self.actions.recovery.as_mut() {
                    recovery.stop_starting();
                }
                // Whatever is queued still counts.
                self.datapath.drain(&mut self.beats);
            }
            let took_beats = !self.beats.is_empty();
            self.process();
            self.liveness.round(took_beats);
            if stop {
                let Some(request) = self.takeover.take() else {
                    return Ok(Ended::Stopped);
                };
                let (peer_pid, shares_network) = (request.peer_pid, request.shares_network);
                if self.hand_over(request).await {
                    let metrics = self.succession.fds.metrics.take();
                    return Ok(Ended::HandedOver {
                        peer_pid,
                        metrics: metrics.filter(|_| !shares_network),
                    });
                }
                self.health.set_ready();
            }
        }
    }

    /// Hands this observer's sockets and state to the successor that asked: `true` when it
    /// took over. Nothing is received after the round that ended here, and the metrics
    /// endpoint stops accepting first, so no scrape sees this observer's counters after the
    /// successor's. When the successor does not confirm, this observer carries on.
    async fn hand_over(&mut self, request: Request) -> bool {
        let peer = request.peer_pid;
        if let Some(prom) = &self.prom {
            // No new connection is accepted here: the successor takes the ones queued.
            prom.held.stop_accepting();
        }
        let state = super::state::State::capture(
            self.clock,
            self.observer.tracker().agents(),
            |pid| self.actions.identity_of(pid),
            &self.metrics,
            self.datapath.secure_sessions(),
            self.datapath.held_seen(),
        );
        match takeover::hand_over(request, &self.succession.fds, &state) {
            Ok(()) => {
                event!(
                    info,
                    "handed_over",
                    peer_pid = peer,
                    agents = state.agents.len(),
                );
                // Those accepted here are answered (with the counters as handed over, which
                // the successor's only grow from), then closed.
                if let Some(prom) = self.prom.take() {
                    prom.finish(SCRAPE_GRACE).await;
                }
                true
            }
            Err(e) => {
                event!(
                    warn,
                    "takeover_failed",
                    peer_pid = peer,
                    error:% = e,
                    action = "carry_on",
                );
                if let Some(prom) = &self.prom {
                    prom.held.resume_accepting();
                }
                false
            }
        }
    }

    /// Waits for the next thing to happen and takes it in; `true` when the daemon should
    /// stop after this round.
    async fn wait(&mut self, shutdown_at: Option<tokio::time::Instant>) -> Result<bool> {
        let deadline = self.observer.next_deadline();
        let sweep = self
            .actions
            .next_sweep_ns()
            .map(|at| std::time::Duration::from_nanos(at.saturating_sub(self.clock.now_ns())));
        let recovery = self.actions.recovery.as_mut();
        let has_recovery = recovery.is_some();
        let tick = self.liveness.next_wake();
        let control = self.succession.control.as_mut();
        let has_control = control.is_some();
        tokio::select! {
            request = async { control.expect("guarded").next().await }, if has_control => {
                event!(
                    info,
                    "takeover_requested",
                    peer_pid = request.peer_pid,
                    version = request.version,
                );
                self.takeover = Some(request);
                Ok(true)
            }
            received = self.signals.recv() => {
                let received = received.context("waiting for signals")?;
                let mut stop = false;
                for sig in received {
                    stop |= self.on_signal(sig);
                }
                Ok(stop)
            }
            received = self.datapath.recv(&mut self.beats) => {
                received.context("receiving")?;
                Ok(false)
            }
            fired = self.stall_timer.wait_until(deadline.unwrap_or(0)), if deadline.is_some() => {
                fired.context("waiting for the stall timer")?;
                // Decided in `process`, after what the datapath holds is taken.
                Ok(false)
            }
            finished = async { recovery.expect("guarded").finished().await }, if has_recovery => {
                self.events.push(Event::Recovery(finished));
                Ok(false)
            }
            // Liveness is watched: an idle loop still goes round.
            () = tokio::time::sleep(tick.unwrap_or_default()), if tick.is_some() => Ok(false),
            // Gone agents' series are dropped when their retention ends.
            () = tokio::time::sleep(sweep.unwrap_or_default()), if sweep.is_some() => Ok(false),
            // /healthz probes and systemd's watchdog, answered only while this loop turns.
            () = self.health.answer_next(&mut self.checkpoint_waiting) => Ok(false),
            () = tokio::time::sleep_until(shutdown_at.unwrap_or_else(tokio::time::Instant::now)), if shutdown_at.is_some() => {
                event!(info, "shutdown", reason = "shutdown_after_secs");
                Ok(true)
            }
        }
    }

    /// One signal; `true` for the ones that stop the daemon.
    fn on_signal(&mut self, sig: Signal) -> bool {
        self.metrics
            .signals
            .get_or_create(&SignalLabel { signal: sig.name() })
            .inc();
        match sig {
            Signal::Term | Signal::Int => {
                event!(info, "shutdown", signal = sig.name());
                return true;
            }
            Signal::Hup => {
                self.actions.reopen_files();
                if self.config.config_file.is_some() {
                    self.reload();
                }
            }
            Signal::Usr1 => self.snapshot(),
        }
        false
    }

    /// Runs the beats that arrived through the observer.
    fn admit_beats(&mut self) {
        self.metrics
            .delivered
            .inc_by(self.beats.iter().map(Beat::count).sum());
        self.metrics
            .held
            .inc_by(self.beats.iter().map(|b| b.held).sum());
        for beat in self.beats.drain(..) {
            if let Err(DropReason::RatePerPid) = self.observer.admit(&beat, &mut self.events) {
                self.datapath.over_rate(&beat);
            }
        }
    }

    /// Runs what arrived through the observer, tells the datapath what that changed, and
    /// acts on the events.
    fn process(&mut self) {
        self.admit_beats();
        let now = self.clock.now_ns();
        // Rule 3 of `varta_common::wakeup`, whichever arm woke this round: what the datapath
        // still holds (queued, or held in the kernel) is taken before any stall is decided;
        // nothing is when the agents due beat since (their deadlines move on).
        self.observer.settle(now);
        if self.observer.next_deadline().is_some_and(|at| at <= now) {
            self.datapath.drain(&mut self.beats);
            self.admit_beats();
        }
        self.observer.expire(now, &mut self.events);
        for event in &self.events {
            match event {
                Event::NewAgent {
                    pid,
                    origin,
                    evicted,
                    ..
                } => {
                    if let Some(old) = evicted {
                        self.datapath.agent_untracked(*old);
                    }
                    self.datapath.agent_tracked(*pid, origin);
                }
                // The agent under this pid is gone (its place taken): its kernel key too.
                Event::Replaced { pid } => self.datapath.agent_untracked(*pid),
                Event::Stall { pid, origin, .. } => self.datapath.agent_silent(*pid, origin),
                Event::Exit { pid, origin, .. } => self.datapath.agent_silent(*pid, origin),
                _ => {}
            }
        }
        self.datapath
            .set_watching(self.observer.next_deadline().is_some());
        let stalled = self
            .events
            .iter()
            .any(|e| matches!(e, Event::Stall { .. } | Event::Exit { .. }));
        self.actions.handle_all(&mut self.events, now);
        self.actions.sweep(now);
        for (state, n) in self.observer.tracker().counts() {
            self.metrics
                .agents
                .get_or_create(&crate::actions::metrics::StateLabel {
                    state: state.name(),
                })
                .set(n as i64);
        }
        let since = self.checkpointed.elapsed().as_millis() as u64;
        if since >= super::state::CHECKPOINT_MS
            || (stalled && since >= super::state::STALL_CHECKPOINT_MS)
            || !self.checkpoint_waiting.is_empty()
        {
            self.checkpoint();
        }
        self.metrics
            .pids_tracked
            .set(self.observer.tracker().len() as i64);
        self.metrics.pid_max.set(self.observer.pid_max() as i64);
    }

    /// Writes the state file: what the next instance needs to carry on.
    fn checkpoint(&mut self) {
        self.checkpointed = Instant::now();
        let state = super::state::State::capture(
            self.clock,
            self.observer.tracker().agents(),
            |pid| self.actions.identity_of(pid),
            &self.metrics,
            self.datapath.secure_sessions(),
            self.datapath.held_seen(),
        );
        if let Err(e) = state.save(&self.state_path) {
            event!(
                warn,
                "state_save_failed",
                path:% = self.state_path.display(),
                error:% = e,
            );
        }
        for waiting in self.checkpoint_waiting.drain(..) {
            let _ = waiting.send(());
        }
    }

    /// SIGHUP with a configuration file: the whole file is valid or nothing changes.
    fn reload(&mut self) {
        let new = match crate::config::reload(self.config) {
            Ok(new) => new,
            Err(e) => {
                event!(warn, "reload_rejected", reason:% = e);
                return;
            }
        };
        for key in self.config.settings.restart_only_changes(&new.settings) {
            event!(warn, "reload_needs_restart", key = key);
        }
        let changed = self.config.settings.live_changes(&new.settings);
        if let Err(e) = self.datapath.set_limits(&new.limits) {
            event!(
                warn,
                "reload_rejected",
                reason = format!("updating the eBPF configuration: {e}"),
            );
            return;
        }
        self.observer.set_limits(&new.limits);
        match (&mut self.actions.recovery, &new.recovery) {
            (Some(recovery), Some(cfg)) => recovery.set_config(cfg.clone()),
            (slot, cfg) => *slot = cfg.clone().map(Recovery::new),
        }
        self.config.limits = new.limits;
        self.config.recovery = new.recovery;
        self.config.settings.adopt_live(&new.settings);
        event!(
            info,
            "reload",
            changed = if changed.is_empty() {
                "none".to_owned()
            } else {
                changed.join(",")
            },
        );
    }

    /// Waits up to the grace period for running recovery commands, recording their outcomes.
    async fn finish_recoveries(&mut self) {
        /// How long killed commands may take to be reaped (a guard; SIGKILL is prompt).
        const KILL_REAP_GUARD: std::time::Duration = std::time::Duration::from_secs(2);
        let grace = self.config.shutdown_grace;
        let mut deadline = Instant::now() + grace;
        let mut deadline_passed = false;
        while let Some(recovery) = self.actions.recovery.as_mut().filter(|r| r.running() > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, recovery.finished()).await {
                Ok(finished) => {
                    let mut events = vec![Event::Recovery(finished)];
                    self.actions.handle_all(&mut events, self.clock.now_ns());
                }
                Err(_) if deadline_passed => break,
                Err(_) => {
                    // Past the grace period: killed, then reaped (their outcomes recorded).
                    event!(
                        warn,
                        "shutdown_recoveries_killed",
                        running = recovery.kill_all(),
                        grace_ms = grace.as_millis(),
                    );
                    deadline_passed = true;
                    deadline = Instant::now() + KILL_REAP_GUARD;
                }
            }
        }
    }

    /// SIGUSR1: one line per tracked agent.
    fn snapshot(&self) {
        let now_ns = self.clock.now_ns();
        let tracker = self.observer.tracker();
        event!(info, "snapshot", agents = tracker.len());
        for (pid, agent) in tracker.agents() {
            event!(
                info,
                "snapshot_agent",
                pid = pid,
                frame_pid = agent.frame_pid,
                last_beat_age_ms = now_ns.saturating_sub(agent.last_beat_ns) / 1_000_000,
                status = agent.status.name(),
                stalled = agent.stalled,
                dead = agent.dead,
                last_nonce = agent.last_nonce,
                transport = agent.origin.transport(),
            );
        }
    }
}
