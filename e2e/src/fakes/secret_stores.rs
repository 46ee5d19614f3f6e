//! Fakes of the Azure Key Vault and Google Secret Manager data planes, for what no
//! emulator installable here offers (lowkey-vault's app jar is not served by the Maven
//! registry this machine reaches, and it checks no token; Secret Manager has no
//! emulator). Each checks the bearer token the way the real service does, with the
//! issuing fake's keys and records ([`super::entra::EntraFake::access_token_check`],
//! [`super::google::GoogleFake::access_token_check`]), decides on the caller's identity
//! like the service's access control (Key Vault RBAC on the token's `oid`, Secret
//! Manager IAM on the principal), and answers in the service's formats and error codes
//! (docs/cloud-errors.md). AWS Secrets Manager is moto's, with authentication enforced.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};

use super::{Counters, Served, now};
use crate::certs::TestCa;

/// Verifies a bearer token as the service's identity platform would: its claims, or why not.
pub type TokenCheck = Arc<dyn Fn(&str) -> Result<Value, String> + Send + Sync>;

/// One secret: its versions (oldest first) and who may read it.
#[derive(Clone, Debug, Default)]
struct StoredSecret {
    versions: Vec<(String, String)>,
    readers: Vec<String>,
}

struct StoreState {
    check: TokenCheck,
    secrets: Mutex<BTreeMap<String, StoredSecret>>,
    counters: Counters,
    url: std::sync::OnceLock<String>,
}

impl StoreState {
    fn new(check: TokenCheck) -> Arc<Self> {
        Arc::new(Self { check, secrets: Mutex::default(), counters: Counters::default(), url: Default::default() })
    }

    /// Adds a version of `name` readable by `readers`; its version ID.
    fn put(&self, name: &str, value: &str, readers: &[String], version: impl FnOnce(usize) -> String) -> String {
        let mut secrets = self.secrets.lock().expect("secrets lock");
        let secret = secrets.entry(name.to_owned()).or_default();
        let id = version(secret.versions.len());
        secret.versions.push((id.clone(), value.to_owned()));
        secret.readers = readers.to_vec();
        id
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The audience of Key Vault tokens.
pub const KEY_VAULT_AUDIENCE: &str = "https://vault.azure.net";

/// A running fake Key Vault (one vault); stops on drop.
pub struct KeyVaultFake {
    served: Served,
    state: Arc<StoreState>,
    tenant: String,
}

fn vault_error(status: StatusCode, code: &str, message: &str, inner: Option<&str>) -> Response {
    let mut error = json!({"code": code, "message": message});
    if let Some(inner) = inner {
        error["innererror"] = json!({"code": inner});
    }
    (status, Json(json!({"error": error}))).into_response()
}

impl KeyVaultFake {
    /// Starts a vault of `tenant` whose tokens `check` verifies (signature, issuer, expiry).
    pub async fn start(tenant: &str, check: TokenCheck, ca: &TestCa) -> Result<Self> {
        let state = StoreState::new(check);
        let router = Router::new()
            .route("/secrets/{name}", get(key_vault_get))
            .route("/secrets/{name}/", get(key_vault_get))
            .route("/secrets/{name}/{version}", get(key_vault_get_version))
            .with_state((state.clone(), tenant.to_owned()));
        let served = Served::start(router, ca).await?;
        let _ = state.url.set(served.url().to_owned());
        Ok(Self { served, state, tenant: tenant.to_owned() })
    }

    /// The vault URL (`vaultUrl`).
    pub fn url(&self) -> &str {
        self.served.url()
    }

    /// Sets a new version of secret `name`, readable by the Entra object IDs `readers`
    /// ("Key Vault Secrets User" on it); its version ID (32 hex digits).
    pub fn set_secret(&self, name: &str, value: &str, readers: &[&str]) -> String {
        let readers: Vec<String> = readers.iter().map(|r| r.to_string()).collect();
        self.state.put(name, value, &readers, |_| super::random_uuid().replace('-', ""))
    }

    /// Successful reads.
    pub fn calls(&self) -> u64 {
        self.state.counters.calls()
    }

    /// The tenant whose tokens it accepts.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

type VaultState = (Arc<StoreState>, String);

async fn key_vault_get(
    State(state): State<VaultState>,
    Path(name): Path<String>,
    query: Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    key_vault_read(&state, &name, None, &query, &headers)
}

async fn key_vault_get_version(
    State(state): State<VaultState>,
    Path((name, version)): Path<(String, String)>,
    query: Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    key_vault_read(&state, &name, Some(version).filter(|v| !v.is_empty()), &query, &headers)
}

fn key_vault_read(
    (state, tenant): &VaultState,
    name: &str,
    version: Option<String>,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    if !query.contains_key("api-version") {
        return vault_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "The 'api-version' query parameter is missing.",
            None,
        );
    }
    let challenge = || {
        let mut response = vault_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "AKV10000: Request is missing a Bearer or PoP token.",
            None,
        );
        let value = format!(
            r#"Bearer authorization="https://login.microsoftonline.com/{tenant}", resource="{KEY_VAULT_AUDIENCE}""#
        );
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value.parse().expect("a header value"));
        response
    };
    let Some(token) = bearer(headers) else { return challenge() };
    let claims = match (state.check)(token) {
        Ok(claims) => claims,
        Err(why) => return vault_error(StatusCode::UNAUTHORIZED, "Unauthorized", &format!("AKV10032: {why}"), None),
    };
    let audience = claims["aud"].as_str().unwrap_or_default().trim_end_matches('/');
    if audience != KEY_VAULT_AUDIENCE {
        return vault_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            &format!("AKV10022: Invalid audience. Expected {KEY_VAULT_AUDIENCE}, found: {audience}."),
            None,
        );
    }
    if claims["tid"].as_str() != Some(tenant.as_str()) {
        return vault_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            &format!("AKV10032: Invalid issuer. Expected one of https://sts.windows.net/{tenant}/."),
            None,
        );
    }
    let oid = claims["oid"].as_str().unwrap_or_default();
    let url = state.url.get().cloned().unwrap_or_default();
    let secrets = state.secrets.lock().expect("secrets lock");
    let secret = secrets.get(name);
    // RBAC is checked before existence: a caller without a role learns nothing.
    if !secret.is_some_and(|s| s.readers.iter().any(|r| r == oid)) {
        return vault_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid={};oid={oid};iss=https://sts.windows.net/{tenant}/\r\nAction: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'\r\nResource: '{url}/secrets/{name}'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\nVault: fake;location=local\r\n",
                claims["appid"].as_str().unwrap_or_default()
            ),
            Some("ForbiddenByRbac"),
        );
    }
    let secret = secret.expect("checked above");
    let found = match &version {
        None => secret.versions.last(),
        Some(v) => secret.versions.iter().find(|(id, _)| id == v),
    };
    let Some((id, value)) = found else {
        return vault_error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!(
                "A secret with (name/id) {name}/{} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
                version.unwrap_or_default()
            ),
            None,
        );
    };
    state.counters.record_success();
    let at = now();
    Json(json!({
        "value": value,
        "id": format!("{url}/secrets/{name}/{id}"),
        "attributes": {"enabled": true, "created": at, "updated": at, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
        "tags": {},
    }))
    .into_response()
}

/// A running fake Secret Manager; stops on drop.
pub struct SecretManagerFake {
    served: Served,
    state: Arc<StoreState>,
}

fn google_error(status: StatusCode, message: &str, code: &str) -> Response {
    (status, Json(json!({"error": {"code": status.as_u16(), "message": message, "status": code}}))).into_response()
}

/// The scopes that open Secret Manager.
const SECRET_MANAGER_SCOPES: &[&str] =
    &["https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/secretmanager"];

impl SecretManagerFake {
    /// Starts Secret Manager, with Google tokens checked by `check` (its claims are the
    /// issued token's `identity` and `scopes`).
    pub async fn start(check: TokenCheck, ca: &TestCa) -> Result<Self> {
        let state = StoreState::new(check);
        let router = Router::new()
            .route("/v1/projects/{project}/secrets/{secret}/versions/{version}", get(secret_manager_access))
            .with_state(state.clone());
        let served = Served::start(router, ca).await?;
        let _ = state.url.set(served.url().to_owned());
        Ok(Self { served, state })
    }

    /// The API's base URL (`endpoint`).
    pub fn url(&self) -> &str {
        self.served.url()
    }

    /// Adds a version of `secret` (`projects/<p>/secrets/<s>`) that the members `readers`
    /// (`roles/secretmanager.secretAccessor`; `principal://...`, `serviceAccount:...`)
    /// may access; its version number.
    pub fn add_version(&self, secret: &str, value: &str, readers: &[&str]) -> String {
        let readers: Vec<String> = readers.iter().map(|r| r.to_string()).collect();
        self.state.put(secret, value, &readers, |n| (n + 1).to_string())
    }

    /// Successful accesses.
    pub fn calls(&self) -> u64 {
        self.state.counters.calls()
    }
}

async fn secret_manager_access(
    State(state): State<Arc<StoreState>>,
    Path((project, secret, version)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(version) = version.strip_suffix(":access") else {
        return google_error(StatusCode::NOT_FOUND, "Method not found.", "NOT_FOUND");
    };
    let unauthenticated = || {
        google_error(
            StatusCode::UNAUTHORIZED,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            "UNAUTHENTICATED",
        )
    };
    let Some(claims) = bearer(&headers).and_then(|t| (state.check)(t).ok()) else { return unauthenticated() };
    let scopes: Vec<&str> = claims["scopes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if !scopes.iter().any(|s| SECRET_MANAGER_SCOPES.contains(s)) {
        return google_error(
            StatusCode::FORBIDDEN,
            "Request had insufficient authentication scopes.",
            "PERMISSION_DENIED",
        );
    }
    let identity = claims["identity"].as_str().unwrap_or_default();
    let name = format!("projects/{project}/secrets/{secret}");
    let secrets = state.secrets.lock().expect("secrets lock");
    let stored = secrets.get(&name);
    if !stored.is_some_and(|s| s.readers.iter().any(|r| super::google::member_matches(r, identity))) {
        return google_error(
            StatusCode::FORBIDDEN,
            &format!(
                "Permission 'secretmanager.versions.access' denied for resource '{name}/versions/{version}' (or it may not exist)."
            ),
            "PERMISSION_DENIED",
        );
    }
    let stored = stored.expect("checked above");
    let found = match version {
        "latest" => stored.versions.last(),
        n => stored.versions.iter().find(|(id, _)| id == n),
    };
    let Some((id, value)) = found else {
        return google_error(
            StatusCode::NOT_FOUND,
            &format!("Secret Version [{name}/versions/{version}] not found."),
            "NOT_FOUND",
        );
    };
    state.counters.record_success();
    Json(json!({"name": format!("{name}/versions/{id}"), "payload": {"data": B64.encode(value)}})).into_response()
}
