//! The broker's HTTP surface: `POST /v1/credentials` and `GET /v1/agent-config` for
//! agents, and the OIDC issuer's discovery document and JWKS for the clouds that trust
//! cloudpass.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use cloudpass_api::broker::{AGENT_CONFIG_PATH, BrokerError, CREDENTIALS_PATH, ErrorCode, MAX_REQUEST_BYTES};

use crate::Broker;
use crate::issuer::{DISCOVERY_PATH, JWKS_PATH, discovery};

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    let body = BrokerError { code, message: message.into(), upstream_code: None };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn credentials(State(broker): State<Arc<Broker>>, headers: HeaderMap, body: Body) -> Response {
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BadRequest,
                format!("request body larger than {MAX_REQUEST_BYTES} bytes"),
            );
        }
    };
    let answer = broker.handle(bearer(&headers), &body).await;
    let mut response = respond(answer.result);
    if let Ok(id) = header::HeaderValue::from_str(&answer.decision_id) {
        response.headers_mut().insert(header::HeaderName::from_static("x-cloudpass-decision"), id);
    }
    response
}

async fn agent_config(State(broker): State<Arc<Broker>>, headers: HeaderMap) -> Response {
    respond(broker.agent_deliveries(bearer(&headers)).await)
}

/// `200` with the answer as JSON, or the refusal's status and error body.
fn respond<T: serde::Serialize>(result: Result<T, crate::Refusal>) -> Response {
    match result {
        Ok(answer) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")], Json(answer)).into_response(),
        Err(refusal) => {
            let status = StatusCode::from_u16(refusal.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, [(header::CACHE_CONTROL, "no-store")], Json(refusal.to_wire())).into_response();
            if refusal.code == ErrorCode::Unauthenticated {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

async fn discovery_document(State(broker): State<Arc<Broker>>) -> Response {
    ([(header::CACHE_CONTROL, "public, max-age=300")], Json(discovery(broker.issuer_url()))).into_response()
}

async fn jwks(State(broker): State<Arc<Broker>>) -> Response {
    match broker.jwks() {
        Some(keys) => ([(header::CACHE_CONTROL, "public, max-age=300")], Json(keys)).into_response(),
        None => error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "signing keys not loaded yet"),
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "no such endpoint")
}

/// Only the issuer's public documents, for a listener behind an Ingress.
pub fn issuer_router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route(DISCOVERY_PATH, get(discovery_document))
        .route(JWKS_PATH, get(jwks))
        .fallback(not_found)
        .with_state(broker)
}

/// The broker's full surface: credentials and the issuer's documents.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route(CREDENTIALS_PATH, post(credentials))
        .route(AGENT_CONFIG_PATH, get(agent_config))
        .route(DISCOVERY_PATH, get(discovery_document))
        .route(JWKS_PATH, get(jwks))
        .fallback(not_found)
        .with_state(broker)
}
