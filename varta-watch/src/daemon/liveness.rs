//! The observer's own liveness, driven by the event loop: every round bumps a progress
//! counter that the self-watchdog thread reads, rewrites the heartbeat file (at most once a
//! second) and kicks the hardware watchdog. While any of them is on, the loop also wakes on
//! a tick of its own, so an idle observer still shows progress.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{
    config::LivenessConfig,
    sys::{
        heartbeat::HeartbeatFile,
        logger::event,
        watchdog::{HwWatchdog, Progress, SelfWatchdog},
    },
};

/// Longest time between two rounds of an idle loop while liveness is watched.
const TICK: Duration = Duration::from_secs(1);
/// Least time between two hardware watchdog kicks.
const KICK_EVERY: Duration = Duration::from_millis(500);

pub struct Liveness {
    progress: Progress,
    watchdog: Option<SelfWatchdog>,
    heartbeat: Option<HeartbeatFile>,
    hw: Option<HwWatchdog>,
    last_kick: Option<Instant>,
    tick: Option<Duration>,
    wedge: Option<Duration>,
}

impl Liveness {
    /// Opens the files and starts the watchdog thread; errors name the flag.
    pub fn start(config: &LivenessConfig) -> Result<Self> {
        let progress = Progress::default();
        let heartbeat = config
            .heartbeat_file
            .as_ref()
            .map(|p| {
                HeartbeatFile::open(p).with_context(|| format!("--heartbeat-file {}", p.display()))
            })
            .transpose()?;
        let hw = config
            .hw_watchdog
            .as_ref()
            .map(|p| HwWatchdog::open(p).with_context(|| format!("--hw-watchdog {}", p.display())))
            .transpose()?;
        let watchdog = config
            .self_watchdog
            .map(|period| SelfWatchdog::start(progress.clone(), period))
            .transpose()
            .context("--self-watchdog-secs: starting the watchdog thread")?;
        let tick = (watchdog.is_some() || heartbeat.is_some() || hw.is_some()).then(|| {
            config
                .self_watchdog
                .map_or(TICK, |period| (period / 4).min(TICK))
        });
        let mut liveness = Liveness {
            progress,
            watchdog,
            heartbeat,
            hw,
            last_kick: None,
            tick,
            wedge: config.inject_wedge,
        };
        liveness.round(false);
        Ok(liveness)
    }

    /// When the loop should wake at the latest, if liveness is watched.
    pub fn next_wake(&self) -> Option<Duration> {
        self.tick
    }

    /// One round of the loop done; `took_beats` when it processed any.
    pub fn round(&mut self, took_beats: bool) {
        if took_beats && let Some(wedge) = self.wedge.take() {
            event!(warn, "inject_wedge", ms = wedge.as_millis());
            // The test hook: block the loop, as a bug would.
            std::thread::sleep(wedge);
        }
        let progress = self.progress.bump();
        if let Some(heartbeat) = &mut self.heartbeat {
            heartbeat.update(progress);
        }
        if let Some(hw) = &mut self.hw
            && self.last_kick.is_none_or(|t| t.elapsed() >= KICK_EVERY)
        {
            self.last_kick = Some(Instant::now());
            hw.kick();
        }
    }

    /// The loop has stopped on purpose: what follows (waiting for recovery commands) is
    /// not a wedge.
    pub fn disarm(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }

    /// Clean exit: the hardware watchdog's magic close.
    pub fn finish(&mut self) {
        self.disarm();
        if let Some(hw) = &mut self.hw {
            hw.close();
        }
    }
}
