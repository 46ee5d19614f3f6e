//! The webhook's HTTP routes.

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};

use crate::{
    admission::{Admission, MAX_BODY_BYTES},
    tls::ReloadableCert,
};

/// Shared state of the routes.
#[derive(Clone)]
pub struct AppState {
    /// The admission handler.
    pub admission: Arc<Admission>,
    /// The serving certificate (for readiness).
    pub cert: Arc<ReloadableCert>,
    /// Set on SIGTERM: not ready, still serving for the shutdown delay.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

async fn mutate(State(state): State<AppState>, body: Bytes) -> Response {
    match state.admission.review(&body) {
        Ok(review) => axum::Json(review).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    // Without the broker CA every injected agent would fail its postStart hook: better
    // not ready (the apiserver then applies the failure policy) than injecting broken pods.
    let broker_ca = state.admission.settings.broker_ca.is_loaded();
    if state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping").into_response();
    }
    match (state.admission.configs.loaded(), state.cert.is_loaded(), broker_ca) {
        (true, true, true) => (StatusCode::OK, "ready").into_response(),
        (false, _, _) => (StatusCode::SERVICE_UNAVAILABLE, "compiled configs not loaded yet").into_response(),
        (_, false, _) => (StatusCode::SERVICE_UNAVAILABLE, "serving certificate not loaded yet").into_response(),
        (_, _, false) => (StatusCode::SERVICE_UNAVAILABLE, "broker CA not loaded yet").into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.admission.metrics.encode())
        .into_response()
}

/// All routes: `POST /mutate`, `/healthz`, `/readyz`, `/metrics`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
