//! The Microsoft Entra ID token endpoint for workload identity federation, over HTTPS:
//! `POST /{tenant}/oauth2/v2.0/token` with `grant_type=client_credentials` and a
//! `client_assertion` JWT from an external issuer.
//!
//! Like Entra, it accepts the assertion only if the app has a federated identity
//! credential whose issuer, subject and audience equal the assertion's `iss`, `sub` and
//! one of its `aud` (exact, case-sensitive, no wildcards), and the signature verifies with
//! the issuer's published key. The answer is a v1 access token (`iss`
//! `https://sts.windows.net/<tenant>/`, as Azurite requires) signed RS256 by the fake's
//! own key, published at `/{tenant}/discovery/v2.0/keys` with tenant discovery at
//! `/{tenant}/v2.0/.well-known/openid-configuration`. Errors carry Entra's `AADSTS` codes.
//!
//! [`EntraFake::mint_managed_identity_token`] makes the access token a managed identity
//! would get from IMDS, for the broker's `azureManagedIdentity` trust provider.

use std::sync::{Arc, OnceLock};

use anyhow::Result;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use super::{
    Counters, Served, SigningKey,
    jwt::{Expected, JwtError, JwtVerifier, unverified_claims},
    now, param, parse_form, random_uuid,
};
use crate::certs::TestCa;

/// The audience Entra expects in assertions by default.
pub const DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of issued access tokens, as `expires_in`.
const TOKEN_LIFETIME: i64 = 3599;

/// A federated identity credential of an app: which external tokens it accepts.
#[derive(Clone, Debug)]
pub struct FederatedCredential {
    /// Exact `iss` of accepted assertions.
    pub issuer: String,
    /// Exact `sub`.
    pub subject: String,
    /// An `aud` the assertion must contain.
    pub audience: String,
}

impl FederatedCredential {
    /// A credential with Entra's default audience `api://AzureADTokenExchange`.
    pub fn new(issuer: &str, subject: &str) -> Self {
        Self { issuer: issuer.to_owned(), subject: subject.to_owned(), audience: DEFAULT_AUDIENCE.to_owned() }
    }
}

/// An app registration (or user-assigned managed identity) that workloads act as.
#[derive(Clone, Debug)]
pub struct EntraApp {
    /// Application (client) ID.
    pub client_id: String,
    /// Object ID of its service principal (`oid` of its tokens).
    pub object_id: String,
    /// Its federated identity credentials (Entra allows at most 20).
    pub federated_credentials: Vec<FederatedCredential>,
}

/// What the fake tenant knows.
#[derive(Clone, Debug)]
pub struct EntraConfig {
    /// The tenant ID (a GUID); other tenants in the path are "not found".
    pub tenant_id: String,
    /// App registrations.
    pub apps: Vec<EntraApp>,
    /// CA that the assertion issuers' HTTPS certificates chain to.
    pub issuer_ca_pem: String,
}

/// Who a managed-identity token is for ([`EntraFake::mint_managed_identity_token`]).
#[derive(Clone, Debug)]
pub struct ManagedIdentityClaims {
    /// Subscription of the identity.
    pub subscription_id: String,
    /// Resource group of the identity.
    pub resource_group: String,
    /// Name of the user-assigned identity.
    pub name: String,
    /// Object (principal) ID, `oid`.
    pub object_id: String,
    /// Client ID, `appid`.
    pub client_id: String,
    /// `aud`, the resource the token is for (e.g. `https://management.azure.com/`).
    pub audience: String,
}

struct EntraState {
    config: EntraConfig,
    url: OnceLock<String>,
    counters: Counters,
    verifier: JwtVerifier,
    key: SigningKey,
}

/// A running fake Entra tenant; stops on drop.
pub struct EntraFake {
    served: Served,
    state: Arc<EntraState>,
}

impl EntraFake {
    /// Starts the fake over HTTPS with a certificate of `ca`.
    pub async fn start(config: EntraConfig, ca: &TestCa) -> Result<Self> {
        let verifier = JwtVerifier::new(&config.issuer_ca_pem)?;
        let state = Arc::new(EntraState {
            config,
            url: OnceLock::new(),
            counters: Counters::default(),
            verifier,
            key: SigningKey::generate_rs256()?,
        });
        let router = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/{tenant}/discovery/v2.0/keys", get(keys))
            .route("/{tenant}/v2.0/.well-known/openid-configuration", get(discovery))
            .with_state(state.clone());
        let served = Served::start(router, ca).await?;
        let _ = state.url.set(served.url().to_owned());
        Ok(Self { served, state })
    }

    /// The authority host, `https://127.0.0.1:<port>` (`AZURE_AUTHORITY_HOST`).
    pub fn url(&self) -> &str {
        self.served.url()
    }

    /// The token endpoint of the tenant.
    pub fn token_url(&self) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.url(), self.state.config.tenant_id)
    }

    /// The JWKS URL of the tenant (Entra's signing keys).
    pub fn jwks_url(&self) -> String {
        format!("{}/{}/discovery/v2.0/keys", self.url(), self.state.config.tenant_id)
    }

    /// How a resource (Key Vault) verifies the access tokens this tenant issues: the
    /// signature with the tenant's key, the expiry and the v1 issuer; the claims.
    pub fn access_token_check(&self) -> super::secret_stores::TokenCheck {
        let (state, issuer) = (self.state.clone(), self.access_token_issuer());
        std::sync::Arc::new(move |token: &str| {
            let claims = state.key.verify(token)?;
            if claims["iss"].as_str() != Some(issuer.as_str()) {
                return Err(format!("Invalid issuer. Expected {issuer}."));
            }
            Ok(claims)
        })
    }

    /// The issuer of the v1 access tokens it mints, `https://sts.windows.net/<tenant>/`.
    pub fn access_token_issuer(&self) -> String {
        v1_issuer(&self.state.config.tenant_id)
    }

    /// The parameters of the last token requests, oldest first (see [`super::Counters::requests`]).
    pub fn requests(&self) -> Vec<Vec<(String, String)>> {
        self.state.counters.requests()
    }

    /// Number of access tokens issued at the token endpoint.
    pub fn calls(&self) -> u64 {
        self.state.counters.calls()
    }

    /// Makes the next `count` token requests answer HTTP `status` with Entra's error body
    /// (`temporarily_unavailable` AADSTS90033 for 503, else `server_error` AADSTS50000).
    pub fn fail_next(&self, count: u32, status: u16) {
        self.state.counters.fail_next(count, status)
    }

    /// An Entra-signed access token of a user-assigned managed identity, as IMDS (or the
    /// App Service endpoint) would hand to a workload.
    pub fn mint_managed_identity_token(&self, identity: &ManagedIdentityClaims) -> String {
        let tenant = &self.state.config.tenant_id;
        let now = now();
        let mirid = format!(
            "/subscriptions/{}/resourcegroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
            identity.subscription_id, identity.resource_group, identity.name
        );
        self.state.key.sign(&json!({
            "aud": identity.audience,
            "iss": v1_issuer(tenant),
            "iat": now,
            "nbf": now,
            "exp": now + 86399,
            "aio": random_uuid(),
            "appid": identity.client_id,
            "appidacr": "2",
            "idp": v1_issuer(tenant),
            "idtyp": "app",
            "oid": identity.object_id,
            "rh": random_uuid(),
            "sub": identity.object_id,
            "tid": tenant,
            "uti": random_uuid(),
            "ver": "1.0",
            "xms_mirid": mirid,
        }))
    }
}

fn v1_issuer(tenant: &str) -> String {
    format!("https://sts.windows.net/{tenant}/")
}

/// An Entra error: `AADSTS<code>: <message>` with trace and correlation IDs and a timestamp.
fn error(status: StatusCode, error: &str, code: u32, message: &str) -> Response {
    let timestamp = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%SZ").to_string();
    let (trace_id, correlation_id) = (random_uuid(), random_uuid());
    let description = format!(
        "AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
    );
    let body = json!({
        "error": error,
        "error_description": description,
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, Json(body)).into_response()
}

fn tenant_not_found(tenant: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        90002,
        &format!(
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
        ),
    )
}

fn missing(name: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        &format!("The request body must contain the following parameter: '{name}'."),
    )
}

async fn token(State(state): State<Arc<EntraState>>, Path(tenant): Path<String>, body: Bytes) -> Response {
    if let Some(status) = state.counters.take_failure() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return if status == StatusCode::SERVICE_UNAVAILABLE {
            error(status, "temporarily_unavailable", 90033, "A transient error has occurred. Please try again.")
        } else {
            error(
                status,
                "server_error",
                50000,
                "There was an error issuing a token or an issue with our sign-in service.",
            )
        };
    }
    if tenant != state.config.tenant_id {
        return tenant_not_found(&tenant);
    }
    let form = parse_form(&body);
    state.counters.record_request(&form);
    match param(&form, "grant_type") {
        None => return missing("grant_type"),
        Some("client_credentials") => {}
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{other}'."),
            );
        }
    }
    let Some(client_id) = param(&form, "client_id") else { return missing("client_id") };
    let Some(scope) = param(&form, "scope") else { return missing("scope") };
    let Some(resource) = single_default_scope(scope) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        );
    };
    let Some(app) = state.config.apps.iter().find(|a| a.client_id == client_id) else {
        return error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        );
    };
    let Some(assertion) = param(&form, "client_assertion") else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        );
    };
    if param(&form, "client_assertion_type") != Some(JWT_BEARER) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50027,
            &format!("client_assertion_type must be '{JWT_BEARER}'."),
        );
    }

    match check_assertion(&state, app, assertion).await {
        Ok(()) => {}
        Err(response) => return response,
    }

    let now = now();
    let access_token = state.key.sign(&json!({
        "aud": resource,
        "iss": v1_issuer(&tenant),
        "iat": now,
        "nbf": now,
        "exp": now + TOKEN_LIFETIME,
        "aio": random_uuid(),
        "appid": app.client_id,
        "appidacr": "2",
        "idp": v1_issuer(&tenant),
        "idtyp": "app",
        "oid": app.object_id,
        "rh": random_uuid(),
        "sub": app.object_id,
        "tid": tenant,
        "uti": random_uuid(),
        "ver": "1.0",
    }));
    state.counters.record_success();
    Json(json!({
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME,
        "ext_expires_in": TOKEN_LIFETIME,
        "access_token": access_token,
    }))
    .into_response()
}

/// The resource of a client-credentials scope: exactly one `<resource>/.default`.
fn single_default_scope(scope: &str) -> Option<&str> {
    let mut scopes = scope.split(' ').filter(|s| !s.is_empty());
    let (Some(only), None) = (scopes.next(), scopes.next()) else { return None };
    only.strip_suffix("/.default").filter(|resource| !resource.is_empty())
}

/// Checks the assertion against the app's federated credentials, as Entra does.
async fn check_assertion(state: &EntraState, app: &EntraApp, assertion: &str) -> Result<(), Response> {
    let malformed = || error(StatusCode::UNAUTHORIZED, "invalid_client", 50027, "JWT token is invalid or malformed.");
    let claims = unverified_claims(assertion).map_err(|_| malformed())?;
    // Entra names the claim that matched no federated credential: the issuer first (no
    // credential of the app trusts it), then the audience, then the subject (AADSTS700211,
    // 700212, 700213, replacing the older catch-all AADSTS70021; docs/cloud-errors.md).
    let no_match = |code: u32, claim: &str, value: &str| {
        error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            &format!(
                "No matching federated identity record found for presented assertion {claim} '{value}'. Check your federated identity credential Subject, Audience and Issuer against the presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
            ),
        )
    };
    let candidates: Vec<&FederatedCredential> =
        app.federated_credentials.iter().filter(|c| c.issuer == claims.iss).collect();
    if candidates.is_empty() {
        // Entra fetches keys only from issuers the app trusts.
        return Err(no_match(700211, "issuer", &claims.iss));
    }
    let audiences: Vec<String> = candidates.iter().map(|c| c.audience.clone()).collect();
    let verified = state
        .verifier
        .verify(assertion, &Expected { issuer: &claims.iss, audiences: &audiences })
        .await
        .map_err(|e| match e {
            JwtError::AudienceMismatch { .. } => no_match(700212, "audience", &claims.aud.join(",")),
            JwtError::Expired { exp, now }
            | JwtError::NotYetValid { nbf: exp, now }
            | JwtError::IssuedInFuture { iat: exp, now } => error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700024,
                &format!(
                    "Client assertion is not within its valid time range. Current time: {now}, assertion time: {exp}."
                ),
            ),
            JwtError::KeyRetrieval { issuer, .. } => error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                50166,
                &format!("Request to External OIDC endpoint failed. Issuer: '{issuer}'."),
            ),
            JwtError::UnknownKey { .. } | JwtError::InvalidSignature => error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                "Client assertion failed signature validation.",
            ),
            JwtError::Malformed(_)
            | JwtError::UnsupportedAlgorithm(_)
            | JwtError::MissingKeyId
            | JwtError::MissingClaim(_)
            | JwtError::IssuerMismatch { .. } => malformed(),
        })?;
    let subject = verified.claims.sub.as_deref().unwrap_or_default();
    let matched = candidates.iter().any(|c| c.subject == subject && verified.claims.aud.contains(&c.audience));
    if !matched {
        return Err(no_match(700213, "subject", subject));
    }
    Ok(())
}

async fn keys(State(state): State<Arc<EntraState>>, Path(tenant): Path<String>) -> Response {
    if tenant != state.config.tenant_id {
        return tenant_not_found(&tenant);
    }
    Json(json!({ "keys": [state.key.jwk()] })).into_response()
}

async fn discovery(State(state): State<Arc<EntraState>>, Path(tenant): Path<String>) -> Response {
    if tenant != state.config.tenant_id {
        return tenant_not_found(&tenant);
    }
    let base = format!("{}/{tenant}", state.url.get().cloned().unwrap_or_default());
    let body: Value = json!({
        "issuer": format!("{base}/v2.0"),
        "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
        "token_endpoint": format!("{base}/oauth2/v2.0/token"),
        "jwks_uri": format!("{base}/discovery/v2.0/keys"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "tenant_region_scope": "EU",
    });
    Json(body).into_response()
}
