//! GET /metrics (optionally behind a bearer token), and the probes /healthz (the event
//! loop answers) and /readyz (socket bound, datapath attached), which need no token.
//! Connections are bounded in number and time (`http_conn`).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{actions::metrics::Metrics, daemon::Probes};

#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
}

/// Binds now (so a taken port fails start-up) and serves in a background task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    token: Option<String>,
    probes: Probes,
) -> std::io::Result<SocketAddr> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // Connections beyond the accepted few wait here, in the kernel (see `http_conn`).
    let listener = socket.listen(1024)?;
    let bound = listener.local_addr()?;
    let state = Scrape {
        metrics,
        token: token.map(Arc::from),
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
    tokio::spawn(async move {
        let listener = crate::actions::http_conn::LimitedListener::new(listener);
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("event=metrics_server_failed error={e}");
        }
    });
    Ok(bound)
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

async fn scrape(State(s): State<Scrape>, headers: HeaderMap) -> Response {
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
    let body = s.metrics.encode();
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
