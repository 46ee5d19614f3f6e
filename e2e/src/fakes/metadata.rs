//! The clouds' link-local metadata services as a workload on a node reaches them: the
//! Azure Instance Metadata Service (managed-identity tokens), the GKE / Compute Engine
//! metadata server (identity tokens), AWS IMDSv2 (instance-role credentials) and the EKS
//! Pod Identity agent (container credentials). Plain HTTP on loopback, like the real
//! ones on 169.254.169.254 and 169.254.170.23, one listener for all (their paths do not
//! overlap).
//!
//! Each route checks what the real service checks before answering: Azure's
//! `Metadata: true` header, `api-version`, `resource` and, when given, the identity's
//! `client_id`; Google's
//! `Metadata-Flavor: Google` header and a non-empty `audience`; IMDSv2's session token
//! (obtained with a `PUT` carrying a TTL); the Pod Identity agent's `Authorization`
//! token. All of them refuse requests carrying `X-Forwarded-For`, as the real ones do, so
//! that a proxy cannot be used to reach them. The tokens are minted by the Entra and
//! Google fakes, signed with the keys their JWKS publish.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
};

use anyhow::Result;
use axum::{
    Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, put},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    Counters,
    entra::{EntraFake, ManagedIdentityClaims},
    google::GoogleFake,
    now, random_hex,
};

/// The Azure managed identity of the node (its `audience` is set per request).
pub struct AzureIdentity {
    /// The Entra tenant that signs its tokens.
    pub entra: Arc<EntraFake>,
    /// Who it is.
    pub claims: ManagedIdentityClaims,
    /// Whether the node has other user-assigned identities too, so that IMDS answers
    /// only requests naming this one's `client_id`.
    pub one_of_several: bool,
}

/// The Google service account of the node or pod.
pub struct GoogleIdentity {
    /// The issuer that signs its identity tokens.
    pub google: Arc<GoogleFake>,
    /// Its email.
    pub email: String,
    /// Its project.
    pub project_id: String,
}

/// AWS role credentials (as STS returned them) served by IMDS and the Pod Identity agent.
#[derive(Clone)]
pub struct AwsRoleCredentials {
    /// Name of the instance role (IMDS lists it).
    pub role_name: String,
    /// Access key ID.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token.
    pub session_token: String,
}

/// What the node's metadata services answer for; any may be absent (404).
#[derive(Default)]
pub struct MetadataIdentities {
    /// Azure IMDS.
    pub azure: Option<AzureIdentity>,
    /// GCP metadata server.
    pub google: Option<GoogleIdentity>,
    /// AWS IMDSv2 instance role.
    pub aws_instance_role: Option<AwsRoleCredentials>,
    /// EKS Pod Identity: the credentials and the authorization token the agent requires.
    pub aws_pod_identity: Option<(AwsRoleCredentials, String)>,
}

struct MetadataState {
    identities: MetadataIdentities,
    imds_sessions: Mutex<HashSet<String>>,
    counters: Counters,
    requests: Mutex<BTreeMap<&'static str, u64>>,
}

impl MetadataState {
    fn count(&self, service: &'static str) {
        *self.requests.lock().expect("requests lock").entry(service).or_default() += 1;
    }
}

/// A running fake of the metadata services; stops on drop.
pub struct MetadataFake {
    url: String,
    task: JoinHandle<()>,
    state: Arc<MetadataState>,
}

impl Drop for MetadataFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MetadataFake {
    /// Starts the fake on a free loopback port.
    pub async fn start(identities: MetadataIdentities) -> Result<Self> {
        let state = Arc::new(MetadataState {
            identities,
            imds_sessions: Mutex::new(HashSet::new()),
            counters: Counters::default(),
            requests: Mutex::new(BTreeMap::new()),
        });
        let router = Router::new()
            .route("/metadata/identity/oauth2/token", get(azure_token))
            .route("/computeMetadata/v1/instance/service-accounts/default/identity", get(google_identity))
            .route("/latest/api/token", put(imds_session))
            .route("/latest/meta-data/iam/security-credentials/", get(imds_roles))
            .route("/latest/meta-data/iam/security-credentials/{role}", get(imds_role_credentials))
            .route("/v1/credentials", get(pod_identity_credentials))
            .with_state(state.clone());
        let listener = TcpListener::bind((crate::net::listen_address(), 0)).await?;
        let url = crate::net::local_url("http", listener.local_addr()?.port());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { url, task, state })
    }

    /// Base URL, `http://127.0.0.1:<port>` (stands for `http://169.254.169.254`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The EKS Pod Identity credentials URL (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
    pub fn pod_identity_url(&self) -> String {
        format!("{}/v1/credentials", self.url)
    }

    /// Number of tokens or credentials handed out.
    pub fn calls(&self) -> u64 {
        self.state.counters.calls()
    }

    /// Requests received per service (`azure`, `google`, `aws-imds`, `aws-pod-identity`),
    /// answered or refused.
    pub fn requests(&self, service: &str) -> u64 {
        self.state.requests.lock().expect("requests lock").get(service).copied().unwrap_or(0)
    }
}

fn forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key("x-forwarded-for")
}

fn header_is(headers: &HeaderMap, name: &str, value: &str) -> bool {
    headers.get(name).and_then(|v| v.to_str().ok()) == Some(value)
}

/// Azure IMDS's error shape.
fn azure_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, axum::Json(json!({"error": error, "error_description": description}))).into_response()
}

async fn azure_token(
    State(state): State<Arc<MetadataState>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    state.count("azure");
    if forwarded(&headers) {
        return azure_error(StatusCode::FORBIDDEN, "invalid_request", "X-Forwarded-For header is not allowed");
    }
    if !header_is(&headers, "metadata", "true") {
        return azure_error(StatusCode::BAD_REQUEST, "invalid_request", "Required metadata header not specified");
    }
    if query.get("api-version").is_none_or(String::is_empty) {
        return azure_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'api-version' is missing",
        );
    }
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return azure_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'resource' is missing",
        );
    };
    let Some(identity) = &state.identities.azure else {
        return azure_error(StatusCode::BAD_REQUEST, "invalid_request", "Identity not found");
    };
    match query.get("client_id") {
        Some(id) if !id.eq_ignore_ascii_case(&identity.claims.client_id) => {
            return azure_error(StatusCode::BAD_REQUEST, "invalid_request", "Identity not found");
        }
        None if identity.one_of_several => {
            return azure_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
            );
        }
        _ => {}
    }
    let claims = ManagedIdentityClaims { audience: resource.clone(), ..identity.claims.clone() };
    let token = identity.entra.mint_managed_identity_token(&claims);
    let now = now();
    state.counters.record_success();
    axum::Json(json!({
        "access_token": token,
        "client_id": claims.client_id,
        "expires_in": "86399",
        "expires_on": (now + 86399).to_string(),
        "ext_expires_in": "86399",
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    }))
    .into_response()
}

fn google_answer(status: StatusCode, body: String) -> Response {
    (status, [("metadata-flavor", "Google"), ("content-type", "text/html")], body).into_response()
}

async fn google_identity(
    State(state): State<Arc<MetadataState>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    state.count("google");
    if forwarded(&headers) || !header_is(&headers, "metadata-flavor", "Google") {
        return google_answer(StatusCode::FORBIDDEN, "Missing Metadata-Flavor:Google header.".into());
    }
    let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
        return google_answer(StatusCode::BAD_REQUEST, "non-empty audience parameter required".into());
    };
    let Some(identity) = &state.identities.google else {
        return google_answer(StatusCode::NOT_FOUND, "Not Found".into());
    };
    state.counters.record_success();
    google_answer(StatusCode::OK, identity.google.mint_identity_token(audience, &identity.email, &identity.project_id))
}

async fn imds_session(State(state): State<Arc<MetadataState>>, headers: HeaderMap) -> Response {
    state.count("aws-imds");
    if forwarded(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if !ttl.is_some_and(|t| (1..=21600).contains(&t)) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let token = random_hex(24);
    state.imds_sessions.lock().expect("sessions lock").insert(token.clone());
    token.into_response()
}

/// The instance role, if the request carries a valid IMDSv2 session token.
fn imds_role<'s>(state: &'s MetadataState, headers: &HeaderMap) -> Result<&'s AwsRoleCredentials, StatusCode> {
    if forwarded(headers) {
        return Err(StatusCode::FORBIDDEN);
    }
    let session = headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !state.imds_sessions.lock().expect("sessions lock").contains(session) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    state.identities.aws_instance_role.as_ref().ok_or(StatusCode::NOT_FOUND)
}

async fn imds_roles(State(state): State<Arc<MetadataState>>, headers: HeaderMap) -> Response {
    state.count("aws-imds");
    match imds_role(&state, &headers) {
        Ok(role) => role.role_name.clone().into_response(),
        Err(status) => status.into_response(),
    }
}

fn aws_credentials_json(credentials: &AwsRoleCredentials) -> Value {
    let expiration = jiff::Timestamp::from_second(now() + 3600).expect("a valid time");
    json!({
        "Code": "Success",
        "LastUpdated": jiff::Timestamp::from_second(now()).expect("a valid time").to_string(),
        "Type": "AWS-HMAC",
        "AccessKeyId": credentials.access_key_id,
        "SecretAccessKey": credentials.secret_access_key,
        "Token": credentials.session_token,
        "Expiration": expiration.to_string(),
    })
}

async fn imds_role_credentials(
    State(state): State<Arc<MetadataState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    state.count("aws-imds");
    match imds_role(&state, &headers) {
        Ok(role) if role.role_name == name => {
            state.counters.record_success();
            axum::Json(aws_credentials_json(role)).into_response()
        }
        Ok(_) => StatusCode::NOT_FOUND.into_response(),
        Err(status) => status.into_response(),
    }
}

async fn pod_identity_credentials(State(state): State<Arc<MetadataState>>, headers: HeaderMap) -> Response {
    state.count("aws-pod-identity");
    if forwarded(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Some((credentials, token)) = &state.identities.aws_pod_identity else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !header_is(&headers, "authorization", token) {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"Message": "Authorization token is invalid"})))
            .into_response();
    }
    state.counters.record_success();
    axum::Json(aws_credentials_json(credentials)).into_response()
}
