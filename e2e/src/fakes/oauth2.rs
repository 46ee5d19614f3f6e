//! An OAuth 2.0 token endpoint for the client-credentials grant (RFC 6749 section 4.4),
//! as SaaS APIs run them: `POST /token` with client authentication by
//! `client_secret_basic` or `client_secret_post`, scopes limited per client, errors as in
//! RFC 6749 section 5.2. Issued tokens are remembered so that a test server standing in
//! for the protected API can check them ([`OAuth2Fake::is_valid`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};

use super::{Counters, Served, now, param, parse_form, random_hex};
use crate::certs::TestCa;

/// One registered client.
#[derive(Clone, Debug)]
pub struct OAuth2Client {
    /// `client_id`.
    pub client_id: String,
    /// `client_secret`.
    pub client_secret: String,
    /// Scopes the client may request; all of them are granted when it requests none.
    pub allowed_scopes: Vec<String>,
}

/// What the endpoint knows.
#[derive(Clone, Debug)]
pub struct OAuth2Config {
    /// Registered clients.
    pub clients: Vec<OAuth2Client>,
    /// Lifetime of issued tokens (`expires_in`).
    pub token_lifetime: Duration,
}

impl Default for OAuth2Config {
    fn default() -> Self {
        Self { clients: Vec::new(), token_lifetime: Duration::from_secs(3600) }
    }
}

/// A token the endpoint issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    /// The client it was issued to.
    pub client_id: String,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// Unix seconds when it expires.
    pub expires_at: i64,
}

struct OAuth2State {
    config: OAuth2Config,
    counters: Counters,
    issued: Mutex<HashMap<String, IssuedToken>>,
}

/// A running OAuth 2.0 token endpoint; stops on drop.
pub struct OAuth2Fake {
    served: Served,
    state: Arc<OAuth2State>,
}

impl OAuth2Fake {
    /// Starts the endpoint over HTTPS with a certificate of `ca`.
    pub async fn start(config: OAuth2Config, ca: &TestCa) -> Result<Self> {
        let state = Arc::new(OAuth2State { config, counters: Counters::default(), issued: Mutex::new(HashMap::new()) });
        let router = Router::new().route("/token", post(token)).with_state(state.clone());
        Ok(Self { served: Served::start(router, ca).await?, state })
    }

    /// Base URL, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        self.served.url()
    }

    /// The token endpoint, `<url>/token`.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.url())
    }

    /// Number of tokens issued.
    pub fn calls(&self) -> u64 {
        self.state.counters.calls()
    }

    /// Makes the next `count` token requests answer HTTP `status` with an RFC 6749 error
    /// (`server_error`, or `temporarily_unavailable` for 503).
    pub fn fail_next(&self, count: u32, status: u16) {
        self.state.counters.fail_next(count, status)
    }

    /// Whether `token` was issued here and has not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        self.token_info(token).is_some_and(|t| t.expires_at > now())
    }

    /// What `token` was issued for, if it was issued here (expired or not).
    pub fn token_info(&self, token: &str) -> Option<IssuedToken> {
        self.state.issued.lock().expect("issued lock").get(token).cloned()
    }
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    let mut response =
        (status, no_store(), axum::Json(json!({"error": code, "error_description": description}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6749 section 5.2: a 401 names the authentication scheme the client must use.
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static(r#"Basic realm="token""#));
    }
    response
}

/// RFC 6749 section 5.1: token responses must not be cached.
fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [(header::CACHE_CONTROL, "no-store"), (header::PRAGMA, "no-cache")]
}

async fn token(
    axum::extract::State(state): axum::extract::State<Arc<OAuth2State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(status) = state.counters.take_failure() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = if status == StatusCode::SERVICE_UNAVAILABLE { "temporarily_unavailable" } else { "server_error" };
        return error(status, code, "The authorization server is unavailable.");
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body must be application/x-www-form-urlencoded.",
        );
    }
    let form = parse_form(&body);
    let mut seen = std::collections::HashSet::new();
    if let Some((name, _)) = form.iter().find(|(name, _)| !seen.insert(name.as_str())) {
        return error(StatusCode::BAD_REQUEST, "invalid_request", &format!("Parameter {name} is repeated."));
    }

    // Client authentication: exactly one of HTTP Basic and body credentials.
    let basic = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(basic_credentials);
    let posted = param(&form, "client_secret").map(|secret| (param(&form, "client_id").unwrap_or_default(), secret));
    let (client_id, secret) = match (&basic, posted) {
        (Some(_), Some(_)) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "More than one client authentication method.");
        }
        (Some((id, secret)), None) => {
            if param(&form, "client_id").is_some_and(|body_id| body_id != id) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "client_id differs from the authenticated client.",
                );
            }
            (id.clone(), secret.clone())
        }
        (None, Some((id, secret))) => (id.to_owned(), secret.to_owned()),
        (None, None) => return error(StatusCode::UNAUTHORIZED, "invalid_client", "Client authentication is required."),
    };
    let Some(client) = state.config.clients.iter().find(|c| c.client_id == client_id && c.client_secret == secret)
    else {
        return error(StatusCode::UNAUTHORIZED, "invalid_client", "Client authentication failed.");
    };

    match param(&form, "grant_type") {
        None => return error(StatusCode::BAD_REQUEST, "invalid_request", "Missing grant_type."),
        Some("client_credentials") => {}
        Some(_) => {
            return error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "Only client_credentials is supported.");
        }
    }
    let scopes: Vec<String> = match param(&form, "scope") {
        Some(scope) => scope.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        None => client.allowed_scopes.clone(),
    };
    if let Some(scope) = scopes.iter().find(|s| !client.allowed_scopes.contains(s)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!("Scope {scope} is not allowed for this client."),
        );
    }

    let access_token = random_hex(32);
    let lifetime = state.config.token_lifetime.as_secs() as i64;
    let issued =
        IssuedToken { client_id: client.client_id.clone(), scopes: scopes.clone(), expires_at: now() + lifetime };
    state.issued.lock().expect("issued lock").insert(access_token.clone(), issued);
    state.counters.record_success();
    let body: Value = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": lifetime,
        "scope": scopes.join(" "),
    });
    (StatusCode::OK, no_store(), axum::Json(body)).into_response()
}

/// `client_id` and `client_secret` of an `Authorization: Basic` header; RFC 6749 section
/// 2.3.1 form-encodes both before base64.
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = String::from_utf8(B64.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| parse_form(format!("x={s}").as_bytes()).pop().map(|(_, v)| v).unwrap_or_default();
    Some((unescape(id), unescape(secret)))
}
