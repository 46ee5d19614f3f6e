//! Google Security Token Service and IAM Credentials, over HTTPS, for workload identity
//! federation, plus Google's identity-token issuer.
//!
//! - `POST /v1/token` (sts.googleapis.com): RFC 8693 token exchange. The `audience` must
//!   name a configured workload identity pool provider; the subject token is verified
//!   against that provider's issuer and allowed audiences (default
//!   `https://iam.googleapis.com/<provider name>`), with Google's extra rules (`iat`
//!   required, at most 24 h between `iat` and `exp`, `sub` at most 127 bytes) and an
//!   optional attribute condition on `sub`. The federated token's principal is
//!   `principal://iam.googleapis.com/projects/NUM/locations/global/workloadIdentityPools/POOL/subject/<sub>`.
//! - `POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken`
//!   (iamcredentials.googleapis.com): impersonation, allowed when the caller's principal
//!   is a configured member of the service account (`principal://...` exactly or a
//!   `principalSet://.../*` of its pool).
//! - Identity tokens ([`GoogleFake::mint_identity_token`]) like the metadata server's
//!   `format=full` ones, RS256 with keys at `/oauth2/v3/certs` and discovery at
//!   `/.well-known/openid-configuration`, for the broker's `gcpIdentityToken` provider.
//!
//! Every access token issued is remembered, so a storage gate can check it
//! ([`GoogleFake::check_access_token`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::Result;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    Counters, Served, SigningKey,
    jwt::{Expected, JwtError, JwtVerifier},
    now, param, parse_form, random_hex,
};
use crate::certs::TestCa;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const SUBJECT_TOKEN_TYPES: [&str; 2] =
    ["urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"];
/// The scope that lets a federated token call IAM Credentials.
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const IAM_SCOPE: &str = "https://www.googleapis.com/auth/iam";
/// Lifetime of federated access tokens, as `expires_in`.
const STS_TOKEN_LIFETIME: i64 = 3599;

/// A workload identity pool provider (OIDC).
#[derive(Clone, Debug)]
pub struct WorkloadIdentityProvider {
    /// Project number.
    pub project_number: String,
    /// Pool ID.
    pub pool: String,
    /// Provider ID.
    pub provider: String,
    /// The OIDC issuer it trusts (exact `iss`).
    pub issuer: String,
    /// Allowed `aud` values; empty means Google's default, `https://iam.googleapis.com/<name>`.
    pub allowed_audiences: Vec<String>,
    /// The provider's attribute condition, reduced to what tests need: when set, `sub` must
    /// match one of these patterns (`*` wildcards).
    pub subject_condition: Option<Vec<String>>,
    /// An attribute condition on another claim of the subject token, like Google's
    /// `assertion['cloudpass.dev'].serviceAccount in ['orders']`: the path of the claim
    /// (one segment per object level) and the values allowed (`*` wildcards).
    pub claim_condition: Option<(Vec<String>, Vec<String>)>,
}

impl WorkloadIdentityProvider {
    /// A provider with the default audience and no attribute condition.
    pub fn new(project_number: &str, pool: &str, provider: &str, issuer: &str) -> Self {
        Self {
            project_number: project_number.to_owned(),
            pool: pool.to_owned(),
            provider: provider.to_owned(),
            issuer: issuer.to_owned(),
            allowed_audiences: Vec::new(),
            subject_condition: None,
            claim_condition: None,
        }
    }

    /// `projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV`.
    pub fn name(&self) -> String {
        format!(
            "projects/{}/locations/global/workloadIdentityPools/{}/providers/{}",
            self.project_number, self.pool, self.provider
        )
    }

    /// The STS `audience` parameter naming it, `//iam.googleapis.com/<name>`.
    pub fn sts_audience(&self) -> String {
        format!("//iam.googleapis.com/{}", self.name())
    }

    /// The `aud` its subject tokens carry by default, `https://iam.googleapis.com/<name>`.
    pub fn default_token_audience(&self) -> String {
        format!("https://iam.googleapis.com/{}", self.name())
    }

    /// The principal of a federated subject.
    pub fn principal(&self, subject: &str) -> String {
        format!("{}{subject}", self.subject_prefix())
    }

    /// The principal set of every identity of its pool, `principalSet://.../POOL/*`.
    pub fn pool_principal_set(&self) -> String {
        format!(
            "principalSet://iam.googleapis.com/projects/{}/locations/global/workloadIdentityPools/{}/*",
            self.project_number, self.pool
        )
    }

    fn subject_prefix(&self) -> String {
        format!(
            "principal://iam.googleapis.com/projects/{}/locations/global/workloadIdentityPools/{}/subject/",
            self.project_number, self.pool
        )
    }
}

/// A service account and who may impersonate it (`roles/iam.workloadIdentityUser` or
/// `roles/iam.serviceAccountTokenCreator` members).
#[derive(Clone, Debug)]
pub struct ServiceAccount {
    /// Its email, `name@project.iam.gserviceaccount.com`.
    pub email: String,
    /// Members: `principal://...`, `principalSet://.../POOL/*`, or `serviceAccount:<email>`.
    pub allowed_members: Vec<String>,
}

/// What the fake Google knows.
#[derive(Clone, Debug)]
pub struct GoogleConfig {
    /// Workload identity pool providers.
    pub providers: Vec<WorkloadIdentityProvider>,
    /// Service accounts that can be impersonated.
    pub service_accounts: Vec<ServiceAccount>,
    /// CA that the subject-token issuers' HTTPS certificates chain to.
    pub issuer_ca_pem: String,
}

/// An access token this fake issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoogleAccessToken {
    /// Who it acts as: a federated `principal://...` or `serviceAccount:<email>`.
    pub identity: String,
    /// Its OAuth scopes.
    pub scopes: Vec<String>,
    /// Unix seconds when it expires.
    pub expires_at: i64,
}

struct GoogleState {
    config: GoogleConfig,
    url: OnceLock<String>,
    counters: Counters,
    verifier: JwtVerifier,
    key: SigningKey,
    issued: Mutex<HashMap<String, GoogleAccessToken>>,
}

/// A running fake of Google STS, IAM Credentials and the identity-token issuer; stops on drop.
pub struct GoogleFake {
    served: Served,
    state: Arc<GoogleState>,
}

impl GoogleFake {
    /// Starts the fake over HTTPS with a certificate of `ca`.
    pub async fn start(config: GoogleConfig, ca: &TestCa) -> Result<Self> {
        let verifier = JwtVerifier::new(&config.issuer_ca_pem)?;
        let state = Arc::new(GoogleState {
            config,
            url: OnceLock::new(),
            counters: Counters::default(),
            verifier,
            key: SigningKey::generate_rs256()?,
            issued: Mutex::new(HashMap::new()),
        });
        let router = Router::new()
            .route("/v1/token", post(sts_token))
            .route("/v1/projects/{project}/serviceAccounts/{action}", post(generate_access_token))
            .route("/oauth2/v3/certs", get(certs))
            .route("/.well-known/openid-configuration", get(discovery))
            .with_state(state.clone());
        let served = Served::start(router, ca).await?;
        let _ = state.url.set(served.url().to_owned());
        Ok(Self { served, state })
    }

    /// Base URL, `https://127.0.0.1:<port>`; also the `iss` of its identity tokens.
    pub fn url(&self) -> &str {
        self.served.url()
    }

    /// The STS token URL (`token_url` of an external_account configuration).
    pub fn sts_token_url(&self) -> String {
        format!("{}/v1/token", self.url())
    }

    /// The impersonation URL of `email` (`service_account_impersonation_url`).
    pub fn impersonation_url(&self, email: &str) -> String {
        format!("{}/v1/projects/-/serviceAccounts/{email}:generateAccessToken", self.url())
    }

    /// The parameters of the last STS or IAM Credentials requests, oldest first (see [`super::Counters::requests`]).
    pub fn requests(&self) -> Vec<Vec<(String, String)>> {
        self.state.counters.requests()
    }

    /// Number of access tokens issued (STS and impersonation together).
    pub fn calls(&self) -> u64 {
        self.state.counters.calls()
    }

    /// Makes the next `count` token requests (STS or impersonation) answer HTTP `status`
    /// with Google's JSON error (`INTERNAL`, or `UNAVAILABLE` for 503).
    pub fn fail_next(&self, count: u32, status: u16) {
        self.state.counters.fail_next(count, status)
    }

    /// How a Google API (Secret Manager) knows the access tokens this fake issued: a
    /// live token's `identity` and `scopes`.
    pub fn access_token_check(&self) -> super::secret_stores::TokenCheck {
        let state = self.state.clone();
        Arc::new(move |token: &str| {
            let issued = state.issued.lock().expect("issued lock").get(token).filter(|t| t.expires_at > now()).cloned();
            let issued = issued.ok_or("not a live token of this fake")?;
            Ok(serde_json::json!({"identity": issued.identity, "scopes": issued.scopes}))
        })
    }

    /// What `token` is, if this fake issued it and it has not expired.
    pub fn check_access_token(&self, token: &str) -> Option<GoogleAccessToken> {
        self.state.issued.lock().expect("issued lock").get(token).filter(|t| t.expires_at > now()).cloned()
    }

    /// A Google-signed identity token of the service account `email` for `audience`, like
    /// the metadata server's `identity?audience=...&format=full`.
    pub fn mint_identity_token(&self, audience: &str, email: &str, project_id: &str) -> String {
        let now = now();
        let unique_id = numeric_id(email, 21);
        self.state.key.sign(&json!({
            "iss": self.url(),
            "aud": audience,
            "azp": unique_id,
            "sub": unique_id,
            "email": email,
            "email_verified": true,
            "iat": now,
            "exp": now + 3600,
            "google": {
                "compute_engine": {
                    "instance_creation_timestamp": now - 86400,
                    "instance_id": numeric_id(&format!("instance:{email}"), 19),
                    "instance_name": "gke-node-1",
                    "project_id": project_id,
                    "project_number": numeric_id(&format!("project:{project_id}"), 12).parse::<u64>().unwrap_or(1),
                    "zone": "us-central1-a",
                }
            },
        }))
    }
}

/// A stable decimal ID of `digits` digits derived from `seed` (Google IDs are numeric).
fn numeric_id(seed: &str, digits: usize) -> String {
    let hash = Sha256::digest(seed.as_bytes());
    let mut id: String = hash.iter().map(|b| char::from(b'0' + b % 10)).take(digits).collect();
    if id.starts_with('0') {
        id.replace_range(0..1, "1");
    }
    id
}

/// STS errors are OAuth-style: 400 `{"error", "error_description"}`.
fn sts_error(code: &str, description: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": code, "error_description": description}))).into_response()
}

/// Google API errors: `{"error": {"code", "message", "status"}}`.
fn api_error(status: StatusCode, message: &str, status_name: &str) -> Response {
    (status, Json(json!({"error": {"code": status.as_u16(), "message": message, "status": status_name}})))
        .into_response()
}

fn planned_failure(state: &GoogleState) -> Option<Response> {
    let status = StatusCode::from_u16(state.counters.take_failure()?).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Some(if status == StatusCode::SERVICE_UNAVAILABLE {
        api_error(status, "The service is currently unavailable.", "UNAVAILABLE")
    } else {
        api_error(status, "Internal error encountered.", "INTERNAL")
    })
}

async fn sts_token(State(state): State<Arc<GoogleState>>, body: Bytes) -> Response {
    if let Some(failure) = planned_failure(&state) {
        return failure;
    }
    let form = parse_form(&body);
    state.counters.record_request(&form);
    if param(&form, "grant_type") != Some(TOKEN_EXCHANGE) {
        return sts_error("invalid_request", "Invalid value for \"grant_type\".");
    }
    if param(&form, "requested_token_type") != Some(ACCESS_TOKEN_TYPE) {
        return sts_error("invalid_request", "Invalid value for \"requested_token_type\".");
    }
    if !param(&form, "subject_token_type").is_some_and(|t| SUBJECT_TOKEN_TYPES.contains(&t)) {
        return sts_error("invalid_request", "Invalid value for \"subject_token_type\".");
    }
    let Some(subject_token) = param(&form, "subject_token").filter(|t| !t.is_empty()) else {
        return sts_error("invalid_request", "Missing required field \"subject_token\".");
    };
    let audience = param(&form, "audience").unwrap_or_default();
    let Some(provider) = state.config.providers.iter().find(|p| p.sts_audience() == audience) else {
        return sts_error(
            "invalid_target",
            "The target service indicated by the \"audience\" parameters is invalid. This might either be because the pool or provider is disabled or deleted or because it doesn't exist.",
        );
    };
    let scopes: Vec<String> = match param(&form, "scope") {
        Some(scope) => scope.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        None => vec![CLOUD_PLATFORM.to_owned()],
    };

    let audiences = if provider.allowed_audiences.is_empty() {
        vec![provider.default_token_audience()]
    } else {
        provider.allowed_audiences.clone()
    };
    let verified =
        match state.verifier.verify(subject_token, &Expected { issuer: &provider.issuer, audiences: &audiences }).await
        {
            Ok(verified) => verified,
            Err(e) => return sts_error("invalid_grant", &describe(&e, &provider.issuer, &audiences)),
        };
    let claims = &verified.claims;
    let Some(iat) = claims.iat else { return sts_error("invalid_grant", "The JWT is missing the \"iat\" claim.") };
    if claims.exp.unwrap_or_default() - iat > 86400 {
        return sts_error("invalid_grant", "The lifetime of the JWT (exp - iat) must not exceed 24 hours.");
    }
    let Some(subject) = claims.sub.as_deref().filter(|s| !s.is_empty()) else {
        return sts_error("invalid_grant", "The JWT is missing the \"sub\" claim.");
    };
    if subject.len() > 127 {
        return sts_error("invalid_grant", "The mapped attribute google.subject exceeds the 127 byte limit.");
    }
    if let Some(patterns) = &provider.subject_condition
        && !patterns.iter().any(|p| super::glob_match(p, subject))
    {
        return sts_error("invalid_grant", "The given credential is rejected by the attribute condition.");
    }
    if let Some((path, patterns)) = &provider.claim_condition {
        let mut claim = claims.all.get(path.first().map(String::as_str).unwrap_or_default());
        for segment in path.iter().skip(1) {
            claim = claim.and_then(|c| c.get(segment));
        }
        if !claim.and_then(Value::as_str).is_some_and(|v| patterns.iter().any(|p| super::glob_match(p, v))) {
            return sts_error("invalid_grant", "The given credential is rejected by the attribute condition.");
        }
    }

    let access_token = format!("ya29.d.sts-{}", random_hex(32));
    let issued =
        GoogleAccessToken { identity: provider.principal(subject), scopes, expires_at: now() + STS_TOKEN_LIFETIME };
    state.issued.lock().expect("issued lock").insert(access_token.clone(), issued);
    state.counters.record_success();
    Json(json!({
        "access_token": access_token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": STS_TOKEN_LIFETIME,
    }))
    .into_response()
}

/// Google STS's wording for a refused subject token.
fn describe(error: &JwtError, issuer: &str, audiences: &[String]) -> String {
    match error {
        JwtError::IssuerMismatch { actual, .. } => {
            format!("The issuer in ID Token {actual} does not match the expected ones: {issuer}.")
        }
        JwtError::AudienceMismatch { actual } => format!(
            "The audience in ID Token [{}] does not match the expected audience {}.",
            actual.join(", "),
            audiences.join(", ")
        ),
        JwtError::Expired { .. } => "The ID Token has expired.".into(),
        JwtError::NotYetValid { .. } | JwtError::IssuedInFuture { .. } => "The ID Token is not yet valid.".into(),
        JwtError::KeyRetrieval { .. } => format!("Unable to retrieve the public keys of issuer {issuer}."),
        JwtError::UnknownKey { .. } | JwtError::InvalidSignature => "Invalid JWT signature.".into(),
        JwtError::UnsupportedAlgorithm(alg) => format!("Unsupported JWT signing algorithm {alg}."),
        JwtError::MissingKeyId => "The JWT header is missing the \"kid\" field.".into(),
        JwtError::MissingClaim(claim) => format!("The JWT is missing the \"{claim}\" claim."),
        JwtError::Malformed(_) => "Unable to parse the ID Token.".into(),
    }
}

async fn generate_access_token(
    State(state): State<Arc<GoogleState>>,
    Path((_project, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(email) = action.strip_suffix(":generateAccessToken").map(str::to_owned) else {
        return api_error(StatusCode::NOT_FOUND, "Method not found.", "NOT_FOUND");
    };
    if let Some(failure) = planned_failure(&state) {
        return failure;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some(caller) = state.issued.lock().expect("issued lock").get(bearer).filter(|t| t.expires_at > now()).cloned()
    else {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            "UNAUTHENTICATED",
        );
    };
    if !caller.scopes.iter().any(|s| s == CLOUD_PLATFORM || s == IAM_SCOPE) {
        return api_error(
            StatusCode::FORBIDDEN,
            "Request had insufficient authentication scopes.",
            "PERMISSION_DENIED",
        );
    }
    let permitted = state
        .config
        .service_accounts
        .iter()
        .find(|sa| sa.email == email)
        .is_some_and(|sa| sa.allowed_members.iter().any(|member| member_matches(member, &caller.identity)));
    if !permitted {
        return api_error(
            StatusCode::FORBIDDEN,
            "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
            "PERMISSION_DENIED",
        );
    }

    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "Invalid JSON payload received.", "INVALID_ARGUMENT");
    };
    let fields: Vec<(String, String)> = request
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
        .collect();
    state.counters.record_request(&fields);
    let scopes: Vec<String> = request["scope"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if scopes.is_empty() {
        return api_error(StatusCode::BAD_REQUEST, "Scope required.", "INVALID_ARGUMENT");
    }
    if request["delegates"].as_array().is_some_and(|d| !d.is_empty()) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "Delegation chains are not supported by this fake.",
            "INVALID_ARGUMENT",
        );
    }
    let lifetime = match request["lifetime"].as_str() {
        None => 3600,
        Some(text) => match text.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()) {
            Some(seconds) if seconds > 0.0 && seconds <= 3600.0 => seconds as i64,
            _ => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "The lifetime must be a duration in seconds between 1s and 3600s (longer needs an organization policy).",
                    "INVALID_ARGUMENT",
                );
            }
        },
    };

    let access_token = format!("ya29.c.sa-{}", random_hex(32));
    let expires_at = now() + lifetime;
    let issued = GoogleAccessToken { identity: format!("serviceAccount:{email}"), scopes, expires_at };
    state.issued.lock().expect("issued lock").insert(access_token.clone(), issued);
    state.counters.record_success();
    // No fractional seconds: google-auth parses expireTime with "%Y-%m-%dT%H:%M:%SZ".
    let expire_time = jiff::Timestamp::from_second(expires_at)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    Json(json!({ "accessToken": access_token, "expireTime": expire_time })).into_response()
}

/// Whether an IAM policy member covers `identity`.
pub(crate) fn member_matches(member: &str, identity: &str) -> bool {
    match member.strip_prefix("principalSet://").and_then(|rest| rest.strip_suffix("/*")) {
        // principalSet://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/*
        Some(pool) => identity
            .strip_prefix("principal://")
            .and_then(|id| id.strip_prefix(pool))
            .is_some_and(|rest| rest.starts_with("/subject/")),
        None => member == identity,
    }
}

async fn certs(State(state): State<Arc<GoogleState>>) -> Json<Value> {
    Json(json!({ "keys": [state.key.jwk()] }))
}

async fn discovery(State(state): State<Arc<GoogleState>>) -> Json<Value> {
    let url = state.url.get().cloned().unwrap_or_default();
    Json(json!({
        "issuer": url,
        "jwks_uri": format!("{url}/oauth2/v3/certs"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "claims_supported": ["aud", "email", "email_verified", "exp", "iat", "iss", "sub"],
    }))
}
