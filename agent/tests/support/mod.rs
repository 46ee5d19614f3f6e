//! Test helpers: a throwaway CA and HTTPS server (the test bed's), and a scriptable
//! stand-in for the broker that speaks the broker's wire types
//! (`cloudpass_api::broker`).
//!
//! The stand-in exists to drive the agent's client through answers that are hard to get
//! from a real broker on demand (503 then 200, a credential about to expire, a server
//! that disappears, a time window closing in seconds). For a policy set with
//! [`FakeBroker::mint`] it answers as the broker's credential cache does
//! (`broker/src/cache.rs`): the same credential until its `refreshAt`, a quarter
//! of its lifetime before expiry, then a new one. The tests against the real broker and
//! the official Python SDKs are in `sdk.rs`.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use cloudpass_agent::{
    Settings,
    settings::{BrokerCa, BrokerClientSettings, RetrySettings},
};
use cloudpass_api::{
    agent::{AgentConfig, AgentDelivery},
    broker::{BrokerError, Credential, CredentialRequest, CredentialResponse, ErrorCode},
    secret::SecretString,
};
use cloudpass_e2e::{
    certs::{CertPair, TestCa},
    tls::serve_https,
};
use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// A CA and one serving certificate for `localhost` and 127.0.0.1 (the test bed's).
pub struct Tls {
    /// CA certificate, PEM.
    pub ca_pem: String,
    serving: CertPair,
}

impl Tls {
    /// A fresh CA and serving certificate.
    pub fn new() -> Self {
        let ca = TestCa::new("agent test CA").unwrap();
        Self { ca_pem: ca.cert_pem(), serving: ca.issue_server(&[]).unwrap() }
    }

    /// Serves `router` over HTTPS on a free loopback port until the handle is aborted
    /// (which also closes open connections).
    pub async fn serve(&self, router: Router) -> (SocketAddr, JoinHandle<()>) {
        serve_https(router, &self.serving).await.unwrap()
    }
}

/// What the stand-in broker received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `Authorization` header.
    pub authorization: String,
    /// Body.
    pub request: CredentialRequest,
}

type Replies = BTreeMap<String, VecDeque<(StatusCode, Value)>>;

/// A policy answered like the broker's cache answers it.
struct Minting {
    credential: Credential,
    lifetime: SignedDuration,
    current: Option<CredentialResponse>,
    counts: Minted,
}

/// What a minting policy's requests got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Minted {
    /// Requests answered with a new credential.
    pub new: usize,
    /// Requests answered with the cached credential: made before its `refreshAt`.
    pub cached: usize,
}

#[derive(Clone, Default)]
struct BrokerState {
    replies: Arc<Mutex<Replies>>,
    /// Answers of `GET /v1/agent-config`, in order; the last one repeats.
    agent_configs: Arc<Mutex<VecDeque<Value>>>,
    agent_config_asked: Arc<Mutex<usize>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    minting: Arc<Mutex<BTreeMap<String, Minting>>>,
}

/// A scriptable HTTPS server answering `POST /v1/credentials` like the broker.
pub struct FakeBroker {
    /// Base URL.
    pub url: String,
    /// Its CA, PEM.
    pub ca_pem: String,
    state: BrokerState,
    handle: JoinHandle<()>,
}

async fn answer(State(state): State<BrokerState>, headers: HeaderMap, body: String) -> (StatusCode, Json<Value>) {
    let Ok(request) = serde_json::from_str::<CredentialRequest>(&body) else {
        return (StatusCode::BAD_REQUEST, Json(json!({"code": "BadRequest", "message": "body"})));
    };
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    state.seen.lock().unwrap().push(Seen { authorization, request: request.clone() });
    if let Some(minting) = state.minting.lock().unwrap().get_mut(&request.policy) {
        let now = Timestamp::now();
        match &minting.current {
            Some(current) if now < current.refresh_at => minting.counts.cached += 1,
            _ => {
                let expires_at = now + minting.lifetime;
                minting.current = Some(CredentialResponse {
                    policy: request.policy.clone(),
                    credential: minting.credential.clone(),
                    expires_at,
                    refresh_at: expires_at - minting.lifetime / 4,
                    serve_until: None,
                });
                minting.counts.new += 1;
            }
        }
        return (StatusCode::OK, Json(serde_json::to_value(&minting.current).unwrap()));
    }
    let mut replies = state.replies.lock().unwrap();
    let queue = replies.entry(request.policy.clone()).or_default();
    // The last reply sticks.
    let reply = if queue.len() > 1 { queue.pop_front() } else { queue.front().cloned() };
    match reply {
        Some((status, body)) => (status, Json(body)),
        None => (
            StatusCode::FORBIDDEN,
            Json(json!({"code": "Denied", "message": format!("no policy {} for this pod", request.policy)})),
        ),
    }
}

async fn agent_config(State(state): State<BrokerState>) -> (StatusCode, Json<Value>) {
    *state.agent_config_asked.lock().unwrap() += 1;
    let mut answers = state.agent_configs.lock().unwrap();
    let answer = if answers.len() > 1 { answers.pop_front() } else { answers.front().cloned() };
    match answer {
        Some(body) => (StatusCode::OK, Json(body)),
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"code": "Unavailable", "message": "not scripted"}))),
    }
}

impl FakeBroker {
    /// Starts one.
    pub async fn start() -> Self {
        let tls = Tls::new();
        let state = BrokerState::default();
        let router = Router::new()
            .route("/v1/credentials", post(answer))
            .route(cloudpass_api::broker::AGENT_CONFIG_PATH, axum::routing::get(agent_config))
            .with_state(state.clone());
        let (addr, handle) = tls.serve(router).await;
        Self { url: format!("https://localhost:{}", addr.port()), ca_pem: tls.ca_pem, state, handle }
    }

    /// Sets the answers of `GET /v1/agent-config`, in order; the last one repeats.
    pub fn script_agent_config(&self, answers: Vec<Value>) {
        *self.state.agent_configs.lock().unwrap() = answers.into();
    }

    /// How often `GET /v1/agent-config` was asked.
    pub fn agent_config_asked(&self) -> usize {
        *self.state.agent_config_asked.lock().unwrap()
    }

    /// Sets the answers for `policy`, in order; the last one repeats.
    pub fn script(&self, policy: &str, replies: Vec<(StatusCode, Value)>) {
        self.state.replies.lock().unwrap().insert(policy.into(), replies.into());
    }

    /// Answers `policy` as the broker's cache would: `credential`, valid for `lifetime`
    /// from when it is minted, handed out again until its `refreshAt`.
    pub fn mint(&self, policy: &str, credential: Credential, lifetime: Duration) {
        let lifetime = SignedDuration::try_from(lifetime).unwrap();
        let minting = Minting { credential, lifetime, current: None, counts: Minted::default() };
        self.state.minting.lock().unwrap().insert(policy.into(), minting);
    }

    /// What the requests for a minting `policy` got so far.
    pub fn minted(&self, policy: &str) -> Minted {
        self.state.minting.lock().unwrap().get(policy).map(|m| m.counts).unwrap_or_default()
    }

    /// Requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Stops answering (connections are closed).
    pub fn stop(&self) {
        self.handle.abort();
    }
}

/// A 200 answer for `policy` with `credential`, expiring in `expires_in` seconds with a
/// refresh suggested after `refresh_in`.
pub fn ok(policy: &str, credential: Credential, expires_in: i64, refresh_in: i64) -> (StatusCode, Value) {
    let now = Timestamp::now();
    let response = CredentialResponse {
        policy: policy.into(),
        credential,
        expires_at: now + SignedDuration::from_secs(expires_in),
        refresh_at: now + SignedDuration::from_secs(refresh_in),
        serve_until: None,
    };
    (StatusCode::OK, serde_json::to_value(response).unwrap())
}

/// [`ok`], to be served only until `serve_until` (the end of the policy's time window).
pub fn ok_until(
    policy: &str,
    credential: Credential,
    expires_in: i64,
    refresh_in: i64,
    serve_until: Timestamp,
) -> (StatusCode, Value) {
    let (status, mut body) = ok(policy, credential, expires_in, refresh_in);
    body["serveUntil"] = serde_json::to_value(serve_until).unwrap();
    (status, body)
}

/// An error answer in the broker's format.
pub fn err(status: u16, code: ErrorCode, message: &str) -> (StatusCode, Value) {
    let body = BrokerError { code, message: message.into(), upstream_code: None };
    (StatusCode::from_u16(status).unwrap(), serde_json::to_value(body).unwrap())
}

/// AWS keys.
pub fn aws_keys() -> Credential {
    Credential::Aws {
        access_key_id: "ASIATESTKEY".into(),
        secret_access_key: SecretString::new("test-secret-access-key"),
        session_token: SecretString::new("test-session-token"),
        account_id: Some("123456789012".into()),
    }
}

/// An API key.
pub fn api_key(key: &str) -> Credential {
    Credential::ApiKey { key: SecretString::new(key) }
}

/// A projected-token file and a shared directory in a temporary directory.
pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    /// With `token` in the token file.
    pub fn new(token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        let files = Self { dir };
        files.set_token(token);
        files
    }

    /// Rewrites the token (as the kubelet does when rotating).
    pub fn set_token(&self, token: &str) {
        std::fs::write(self.token_file(), token).unwrap();
    }

    /// The token file.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// The shared directory.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    /// Writes `contents` to `name` in the directory; its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

/// Settings for an agent talking to `broker`, with fast retries and ephemeral ports.
pub fn settings(broker: &FakeBroker, files: &Files, deliveries: Vec<AgentDelivery>) -> Settings {
    Settings {
        config: AgentConfig { broker_url: broker.url.clone(), health_port: 0, deliveries, policy_namespace: None },
        broker: BrokerClientSettings {
            url: broker.url.clone(),
            ca: Some(BrokerCa::Pem(broker.ca_pem.clone())),
            trust_system_roots: false,
            token_file: files.token_file(),
            timeout: Duration::from_secs(5),
            evidence: Default::default(),
        },
        shared_dir: files.shared_dir(),
        identity_header: Some(SecretString::new("identity-proof")),
        upstream_ca_pem: None,
        retry: RetrySettings { initial: Duration::from_millis(50), max: Duration::from_millis(200) },
        sigv4_max_body_bytes: 1024 * 1024,
        shutdown_grace: Duration::from_secs(2),
        server_ca_dir: cloudpass_api::agent::SERVER_CA_DIR.into(),
        config_refresh: Duration::from_secs(60),
    }
}

/// Polls `check` every 20 ms until it is true, for at most `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    eventually_async(limit, || std::future::ready(check())).await
}

/// Awaits `check` every 20 ms until it is true, for at most `limit`.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check().await
}
