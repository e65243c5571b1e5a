//! Liveness and readiness as the event loop itself reports them. `/healthz` is answered by
//! the event loop, not by the HTTP task: a probe is a message the loop must take from its
//! own `select!`, so a loop that is stuck (or spinning without returning to it) fails the
//! probe. The same arm sends systemd's `WATCHDOG=1`. `/readyz` is true from `event=ready`
//! (socket bound, datapath attached) until a shutdown begins.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::sys::notify;

/// How long `/healthz` waits for the event loop before answering 503.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the HTTP server holds.
#[derive(Clone)]
pub struct Probes {
    ready: Arc<AtomicBool>,
    ping: mpsc::Sender<oneshot::Sender<()>>,
    checkpoint: mpsc::Sender<oneshot::Sender<()>>,
}

impl Probes {
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Whether the event loop answered within [`PROBE_TIMEOUT`].
    pub async fn alive(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        // A full queue means the loop has not taken earlier probes: not alive.
        if self.ping.try_send(tx).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(PROBE_TIMEOUT, rx).await, Ok(Ok(())))
    }

    /// Has the event loop write its state file after a scrape is encoded and before it is
    /// answered, so no answered scrape shows a counter the state file does not hold: an
    /// observer restarted after a crash carries on from at least what Prometheus last saw
    /// (a counter going down would read as a reset). Requests queued together share one
    /// write. Gives up after [`PROBE_TIMEOUT`] (a stuck loop must not stop scrapes), and at
    /// once while the loop is not running (starting, or stopping: its counters no longer
    /// move then).
    pub async fn checkpoint(&self) {
        if !self.ready() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let asked = async {
            if self.checkpoint.send(tx).await.is_ok() {
                let _ = rx.await;
            }
        };
        // Timed out or not, the scrape is answered: the wait only orders the two.
        let _ = tokio::time::timeout(PROBE_TIMEOUT, asked).await;
    }
}

/// What the event loop holds.
pub struct Health {
    ready: Arc<AtomicBool>,
    pings: mpsc::Receiver<oneshot::Sender<()>>,
    checkpoints: mpsc::Receiver<oneshot::Sender<()>>,
    watchdog: Option<tokio::time::Interval>,
}

impl Health {
    pub fn new() -> (Health, Probes) {
        let ready = Arc::new(AtomicBool::new(false));
        let (ping, pings) = mpsc::channel(8);
        // Scrapes beyond these wait for room: a connection holds at most one.
        let (checkpoint, checkpoints) = mpsc::channel(64);
        let watchdog = notify::watchdog_period().map(|period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        (
            Health {
                ready: ready.clone(),
                pings,
                checkpoints,
                watchdog,
            },
            Probes {
                ready,
                ping,
                checkpoint,
            },
        )
    }

    /// The socket is bound and the datapath attached: `/readyz` answers 200, systemd hears
    /// `READY=1`.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
        notify::send(notify::NotifyState::Ready);
    }

    /// A shutdown began: `/readyz` answers 503, systemd hears `STOPPING=1`.
    pub fn set_stopping(&self) {
        self.ready.store(false, Ordering::Relaxed);
        notify::send(notify::NotifyState::Stopping);
    }

    /// Waits for the next probe or watchdog tick and answers it, or for checkpoint requests
    /// (all those queued), which go to `checkpoint` for the loop to answer once it has
    /// written the state. Cancel-safe (a `select!` arm of the event loop): every wait is,
    /// and the rest is done without awaiting.
    pub async fn answer_next(&mut self, checkpoint: &mut Vec<oneshot::Sender<()>>) {
        let watchdog = self.watchdog.as_mut();
        let has_watchdog = watchdog.is_some();
        tokio::select! {
            Some(reply) = self.pings.recv() => {
                let _ = reply.send(());
            }
            Some(first) = self.checkpoints.recv() => {
                checkpoint.push(first);
                while let Ok(more) = self.checkpoints.try_recv() {
                    checkpoint.push(more);
                }
            }
            _ = async { watchdog.expect("guarded").tick().await }, if has_watchdog => {
                notify::send(notify::NotifyState::Watchdog);
            }
            // No HTTP server and no watchdog: nothing to answer, ever.
            else => std::future::pending().await,
        }
    }
}
