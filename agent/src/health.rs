//! The health port: `/ready` (every delivery holds a credential that may be served),
//! `/healthz` (the process answers) and `/metrics`; and the `probe` client the kubelet
//! runs inside the container, since the endpoints listen on loopback only.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use cloudpass_api::agent::READY_PATH;

use crate::{
    common::{Shared, guarded, not_found},
    endpoint::EndpointKind,
};

/// The health port's router: `/ready`, `/healthz` and `/metrics`, relayed requests
/// refused like on every endpoint.
pub fn router(shared: &Shared) -> Router {
    let router = Router::new()
        .route(READY_PATH, get(ready))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { not_found() })
        .with_state(shared.clone());
    guarded(router, EndpointKind::Health, shared.metrics.clone())
}

async fn ready(State(shared): State<Shared>) -> Response {
    let missing = shared.store.not_ready();
    if missing.is_empty() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("no valid credential yet for policies: {}\n", missing.join(", ")))
            .into_response()
    }
}

async fn metrics(State(shared): State<Shared>) -> Response {
    (
        [(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        shared.metrics.encode(&shared.store),
    )
        .into_response()
}

/// `GET /ready` on `127.0.0.1:port`: `Ok` on 200, else why not. A blocking, dependency-free
/// HTTP/1.1 exchange, so that the exec probe starts no runtime.
/// [`probe`] again every [`WAIT_INTERVAL`] until it passes or `wait` is over, for the
/// kubelet's postStart hook: the hook returns the moment the first credential is there,
/// where a startup probe would pass only at its next period. Fails with the last reason.
pub fn wait_ready(port: u16, timeout: Duration, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        match probe(port, timeout) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(WAIT_INTERVAL),
        }
    }
}

/// How often [`wait_ready`] asks.
pub const WAIT_INTERVAL: Duration = Duration::from_millis(25);

/// One `GET /ready` on the loopback health port within `timeout`: `Ok` on 200, else the
/// status line and body (or the connection error).
pub fn probe(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_write_timeout(Some(left())).map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET {READY_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        stream.set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
        if answer.len() > 64 * 1024 {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        Err(format!("{status_line}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::{Body, to_bytes};
    use tower::ServiceExt;

    use super::*;
    use crate::{
        metrics::Metrics,
        store::{
            CredentialStore,
            tests::{api_key, fetched},
        },
    };

    async fn get(router: &Router, uri: &str) -> (StatusCode, String) {
        let response =
            router.clone().oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        (status, String::from_utf8(to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_when_every_delivery_has_a_credential() {
        let shared = Shared { store: Arc::new(CredentialStore::new(["a", "b"])), metrics: Metrics::new() };
        let router = router(&shared);
        assert_eq!(
            get(&router, "/ready").await,
            (StatusCode::SERVICE_UNAVAILABLE, "no valid credential yet for policies: a, b\n".into())
        );
        shared.store.put("a", fetched(api_key("k"), 3600));
        shared.store.put("b", fetched(api_key("k"), 3600));
        assert_eq!(get(&router, "/ready").await.0, StatusCode::OK);
        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&router, "/nope").await.0, StatusCode::NOT_FOUND);
        let (status, text) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains(r#"cloudpass_agent_requests_total{endpoint="health",result="unavailable"} 1"#), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn probe_talks_http_to_the_health_port() {
        let shared = Shared { store: Arc::new(CredentialStore::new(["a"])), metrics: Metrics::new() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(axum::serve(listener, router(&shared)).into_future());
        let probe_now = move || tokio::task::spawn_blocking(move || probe(port, Duration::from_secs(2)));
        let err = probe_now().await.unwrap().unwrap_err();
        assert!(err.contains("503") && err.contains("policies: a"), "{err}");
        shared.store.put("a", fetched(api_key("k"), 3600));
        probe_now().await.unwrap().unwrap();
        // Nothing listening: a clear failure, quickly.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err =
            tokio::task::spawn_blocking(move || probe(closed, Duration::from_secs(1))).await.unwrap().unwrap_err();
        assert!(err.contains("connect"), "{err}");
    }
}
