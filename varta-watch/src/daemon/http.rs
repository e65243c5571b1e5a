//! GET /metrics (optionally behind a bearer token), and the probes /healthz (the event
//! loop answers) and /readyz (socket bound, datapath attached), which need no token.
//! Connections are bounded in number and time (`http_conn`).

use crate::sys::logger::event;
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::{ConnectInfo, State, connect_info::Connected},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
    serve::IncomingStream,
};

use varta_common::ratelimit::{Limit, is_full};

use crate::{
    actions::metrics::Metrics,
    daemon::{
        Probes,
        http_conn::{Held, LimitedListener},
    },
};

#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
    limiter: Option<Arc<ScrapeLimiter>>,
    probes: Probes,
}

/// Scrapes per source address (`--prom-rate-limit-per-sec`, `--prom-rate-limit-burst`), on
/// the integer buckets the datapaths use.
struct ScrapeLimiter {
    limit: Limit,
    started: std::time::Instant,
    clocks: Mutex<HashMap<IpAddr, u64>>,
}

/// Sources whose bucket is remembered; beyond it full buckets are forgotten (they equal a
/// new one), and a source that finds no room is refused.
const LIMITED_SOURCES: usize = 4096;

impl ScrapeLimiter {
    fn admit(&self, source: IpAddr) -> bool {
        let now = self.started.elapsed().as_nanos() as u64 + 1;
        let Ok(mut clocks) = self.clocks.lock() else {
            return false;
        };
        if clocks.len() >= LIMITED_SOURCES && !clocks.contains_key(&source) {
            clocks.retain(|_, tat| !is_full(*tat, now));
            if clocks.len() >= LIMITED_SOURCES {
                return false;
            }
        }
        self.limit.take(clocks.entry(source).or_insert(0), now)
    }
}

/// The client's address, for the per-source scrape limit.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl Connected<IncomingStream<'_, LimitedListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, LimitedListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// The metrics endpoint being served: its address, its listening socket (kept to be handed
/// over) and its connections.
pub struct Served {
    pub addr: SocketAddr,
    pub listener: std::os::fd::OwnedFd,
    /// Its connections: a handover stops accepting first.
    pub held: Held,
    /// Asks the server to end gracefully: requests read are answered, then it closes.
    end: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// After a handover (accepting stopped): answers every connection this server accepted,
    /// then closes them all; returns when done, or after `grace` at most. A connection not
    /// read from yet is waited for first: hyper's graceful shutdown would close it unanswered.
    pub async fn finish(self, grace: std::time::Duration) {
        let end = tokio::time::Instant::now() + grace;
        while self.held.unread() > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The server may have ended on its own (it logged why): nothing left to answer.
        let _ = self.end.send(());
        if tokio::time::timeout_at(end, self.task).await.is_err() {
            event!(
                warn,
                "metrics_connections_cut",
                grace_ms = grace.as_millis() as u64
            );
        }
    }
}

/// Binds now (so a taken port fails start-up), or serves on `listener` (handed over by a
/// previous observer, or passed by a service manager), in a background task.
pub async fn serve(
    addr: SocketAddr,
    listener: Option<std::net::TcpListener>,
    metrics: Arc<Metrics>,
    token: Option<String>,
    rate_limit: Option<Limit>,
    probes: Probes,
) -> std::io::Result<Served> {
    let listener = match listener {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)?
        }
        None => {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            // The kernel's backlog; `http_conn` accepts from it at once.
            socket.listen(1024)?
        }
    };
    let bound = listener.local_addr()?;
    let kept = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned()?;
    let state = Scrape {
        metrics,
        token: token.map(Arc::from),
        limiter: rate_limit.map(|limit| {
            Arc::new(ScrapeLimiter {
                limit,
                started: std::time::Instant::now(),
                clocks: Mutex::new(HashMap::new()),
            })
        }),
        probes: probes.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(state)
        .merge(
            Router::new()
                .route("/healthz", get(healthz))
                .route("/readyz", get(readyz))
                .with_state(probes),
        );
    let held = Held::default();
    let connections = held.clone();
    let (end, ended) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let listener = LimitedListener::new(listener, connections);
        let service = app.into_make_service_with_connect_info::<Peer>();
        let graceful = axum::serve(listener, service).with_graceful_shutdown(async move {
            // Dropped unsent: the process is ending anyway, serve on until then.
            if ended.await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        if let Err(e) = graceful.await {
            event!(error, "metrics_server_failed", error:% = e);
        }
    });
    Ok(Served {
        addr: bound,
        listener: kept,
        held,
        end,
        task,
    })
}

/// The probes of a held observer (`daemon::hold`), on its own listener: alive (`/healthz`
/// 200), not ready (`/readyz` 503: it receives nothing), and a `/metrics` with no samples
/// (its agents are counted by the observer that took over, under that one's target).
pub fn serve_held(listener: std::net::TcpListener) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "held\n") }))
        .route(
            "/readyz",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "held: another observer took over\n",
                )
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    "# EOF\n",
                )
            }),
        );
    tokio::spawn(async move {
        let listener = LimitedListener::new(listener, Held::default());
        if let Err(e) = axum::serve(listener, app.into_make_service()).await {
            event!(error, "metrics_server_failed", error:% = e);
        }
    });
    Ok(())
}

async fn healthz(State(p): State<Probes>) -> (StatusCode, &'static str) {
    if p.alive().await {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "event loop not responding\n",
        )
    }
}

async fn readyz(State(p): State<Probes>) -> (StatusCode, &'static str) {
    if p.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn scrape(
    State(s): State<Scrape>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Some(limiter) = &s.limiter
        && !limiter.admit(peer.ip())
    {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "rate-limited: --prom-rate-limit-per-sec\n",
        )
            .into_response();
    }
    if let Some(token) = &s.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            s.metrics.prom_auth_failures.inc();
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "unauthorized\n",
            )
                .into_response();
        }
    }
    // Encoded on a blocking thread: a large tracker's exposition (megabytes) must not hold
    // the event loop, which shares this runtime's one thread (L5 of the hardening review).
    let metrics = s.metrics.clone();
    let Ok(body) = tokio::task::spawn_blocking(move || metrics.encode()).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response();
    };
    // Answered only once the state file holds counters at least as high as these.
    s.probes.checkpoint().await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Compares without an early exit, so response timing does not reveal a token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
