//! `/healthz`, `/readyz` and `/metrics`, served by every replica.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::metrics::Metrics;

/// What the probes and the scrape read.
#[derive(Clone)]
pub struct Health {
    /// The metrics to serve.
    pub metrics: Arc<Metrics>,
    /// Set once the instance can do its job: a standby as soon as it takes part in the
    /// election, the leader once its caches are warm.
    pub ready: Arc<AtomicBool>,
    /// The broker, when this instance serves one: ready also needs it ready.
    pub broker: Option<Arc<cloudpass_broker::Broker>>,
    /// The broker's serving certificate, when it serves one: without it every TLS
    /// handshake fails, so ready also needs it loaded.
    pub broker_cert: Option<Arc<cloudpass_runtime::tls::ReloadableCert>>,
    /// Set on SIGTERM: not ready any more, so that endpoints drop this replica while it
    /// still serves the broker for the shutdown delay.
    pub stopping: Arc<AtomicBool>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed)
        && !health.stopping.load(Ordering::Relaxed)
        && health.broker.as_ref().is_none_or(|b| b.is_ready())
        && health.broker_cert.as_ref().is_none_or(|c| c.is_loaded())
    {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], health.metrics.encode())
}

/// The router of the health and metrics endpoints.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// Binds `addr` and serves the endpoints in the background, within the default server
/// limits; returns the bound address.
pub async fn spawn(addr: SocketAddr, health: Health) -> Result<SocketAddr, cloudpass_runtime::Error> {
    cloudpass_runtime::tls::serve_plain(addr, router(health), Default::default(), Default::default()).await
}
