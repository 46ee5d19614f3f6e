//! A gate in front of moto's STS that checks `AssumeRoleWithWebIdentity` tokens the way
//! AWS does, because moto does not read them at all.
//!
//! AWS's checks, in its order: the token's `iss` (without `https://`) must be a registered
//! IAM OIDC provider, its `aud` one of the provider's client IDs, its signature must verify
//! with a key from the issuer's JWKS, it must not have expired (60 s leeway); then the
//! role's trust policy decides: the role must trust that provider, and its conditions on
//! `<provider>:sub` (`StringLike`) and `<provider>:aud` must hold. `DurationSeconds` must be
//! within 900..=43200 and the role's maximum session duration. Refusals are AWS's XML
//! errors (`InvalidIdentityToken`, `IDPRejectedClaim`, `ExpiredTokenException`,
//! `AccessDenied`, `ValidationError`).
//!
//! An accepted request goes to moto with its form unchanged, and moto's answer (the
//! credentials) comes back unchanged. AWS takes `AssumeRoleWithWebIdentity` unsigned, but
//! moto with authentication enforced refuses unsigned requests, so when
//! [`StsGateConfig::forward_credentials`] is set the gate signs the forwarded request
//! (SigV4) with those moto IAM-user keys; the caller still sends it unsigned. Every other
//! request (e.g. a pre-signed `GetCallerIdentity`) is forwarded to moto as it came: method,
//! path, query, headers including `Host` and `Authorization`, body; so its signature still
//! verifies at moto.

use std::{fmt::Write as _, sync::Arc};

use anyhow::Result;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderName, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};

use super::{
    Counters, Served, glob_match,
    jwt::{Expected, JwtError, JwtVerifier, unverified_claims},
    param, parse_form, random_uuid,
};
use crate::{certs::TestCa, moto::AwsKeys};

/// An IAM OIDC identity provider registered in the account.
#[derive(Clone, Debug)]
pub struct AwsOidcProvider {
    /// The provider URL, as registered: the issuer with or without `https://`.
    pub url: String,
    /// The client ID list: allowed `aud` values.
    pub client_ids: Vec<String>,
}

/// A role's trust policy for web identities, reduced to its federation conditions.
#[derive(Clone, Debug)]
pub struct AwsRoleTrust {
    /// The role ARN, `arn:aws:iam::<account>:role/<name>`.
    pub role_arn: String,
    /// The trusted provider (`Principal.Federated` = `arn:aws:iam::<account>:oidc-provider/<this>`),
    /// with or without `https://`.
    pub provider: String,
    /// `StringLike` patterns for `<provider>:sub` (`*` and `?` wildcards); empty means no
    /// condition on `sub`.
    pub subjects: Vec<String>,
    /// `StringEquals` values for `<provider>:aud`; empty means no condition on `aud`.
    pub audiences: Vec<String>,
    /// The role's maximum session duration in seconds (AWS's default is 3600).
    pub max_session_duration: u32,
}

impl AwsRoleTrust {
    /// A role trusting `provider` for subjects matching `subject_pattern`, with AWS's
    /// default maximum session duration (1 h).
    pub fn new(role_arn: &str, provider: &str, subject_pattern: &str) -> Self {
        Self {
            role_arn: role_arn.to_owned(),
            provider: provider.to_owned(),
            subjects: vec![subject_pattern.to_owned()],
            audiences: Vec::new(),
            max_session_duration: 3600,
        }
    }
}

/// What the gate knows.
#[derive(Clone, Debug)]
pub struct StsGateConfig {
    /// moto's base URL ([`crate::moto::MotoServer::url`]).
    pub moto_url: String,
    /// Registered OIDC providers.
    pub providers: Vec<AwsOidcProvider>,
    /// Roles assumable with web identities.
    pub roles: Vec<AwsRoleTrust>,
    /// CA that the token issuers' HTTPS certificates chain to.
    pub issuer_ca_pem: String,
    /// moto IAM-user keys to sign forwarded `AssumeRoleWithWebIdentity` requests with,
    /// needed once moto enforces authentication (the user needs
    /// `sts:AssumeRoleWithWebIdentity`).
    pub forward_credentials: Option<AwsKeys>,
}

struct GateState {
    config: StsGateConfig,
    counters: Counters,
    verifier: JwtVerifier,
    http: reqwest::Client,
}

/// A running STS gate; stops on drop.
pub struct StsGate {
    served: Served,
    state: Arc<GateState>,
}

impl StsGate {
    /// Starts the gate over HTTPS with a certificate of `ca`.
    pub async fn start(config: StsGateConfig, ca: &TestCa) -> Result<Self> {
        let verifier = JwtVerifier::new(&config.issuer_ca_pem)?;
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build()?;
        let state = Arc::new(GateState { config, counters: Counters::default(), verifier, http });
        let router = Router::new().fallback(handle).with_state(state.clone());
        Ok(Self { served: Served::start(router, ca).await?, state })
    }

    /// The STS endpoint, `https://127.0.0.1:<port>` (`AWS_ENDPOINT_URL_STS`).
    pub fn url(&self) -> &str {
        self.served.url()
    }

    /// The parameters of the last `AssumeRoleWithWebIdentity` requests, oldest first (see [`super::Counters::requests`]).
    pub fn requests(&self) -> Vec<Vec<(String, String)>> {
        self.state.counters.requests()
    }

    /// Number of requests moto answered with a 2xx through the gate.
    pub fn calls(&self) -> u64 {
        self.state.counters.calls()
    }

    /// Makes the next `count` `AssumeRoleWithWebIdentity` requests answer HTTP `status`
    /// with an AWS error (`ServiceUnavailable` for 503, else `InternalFailure`).
    pub fn fail_next(&self, count: u32, status: u16) {
        self.state.counters.fail_next(count, status)
    }
}

/// An AWS Query API error response.
fn aws_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{code}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{}</RequestId>\n</ErrorResponse>\n",
        xml_escape(message),
        random_uuid()
    );
    (status, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

fn sender_error(status: StatusCode, code: &str, message: &str) -> Response {
    aws_error(status, "Sender", code, message)
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

async fn handle(
    State(state): State<Arc<GateState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut params = parse_form(uri.query().unwrap_or_default().as_bytes());
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        params.extend(parse_form(&body));
    }
    if param(&params, "Action") != Some("AssumeRoleWithWebIdentity") {
        return forward_unchanged(&state, method, &uri, &headers, body).await;
    }
    state.counters.record_request(&params);
    if let Some(status) = state.counters.take_failure() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return if status == StatusCode::SERVICE_UNAVAILABLE {
            aws_error(status, "Receiver", "ServiceUnavailable", "Service is unavailable. Please try again later.")
        } else {
            aws_error(status, "Receiver", "InternalFailure", "An internal error occurred. Please try again.")
        };
    }
    if let Err(refusal) = check_assume_role(&state, &params).await {
        return refusal;
    }
    // The same form, as a POST body, whichever way it came.
    let form = if is_form { body } else { Bytes::from(uri.query().unwrap_or_default().to_owned()) };
    forward_assume_role(&state, form).await
}

/// AWS's checks of an `AssumeRoleWithWebIdentity` request.
async fn check_assume_role(state: &GateState, params: &[(String, String)]) -> Result<(), Response> {
    let validation = |message: String| sender_error(StatusCode::BAD_REQUEST, "ValidationError", &message);
    let role_arn = param(params, "RoleArn").ok_or_else(|| {
        validation("1 validation error detected: Value null at 'roleArn' failed to satisfy constraint: Member must not be null".into())
    })?;
    let session_name = param(params, "RoleSessionName").unwrap_or_default();
    let session_name_ok = (2..=64).contains(&session_name.len())
        && session_name.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
    if !session_name_ok {
        return Err(validation(format!(
            "1 validation error detected: Value '{session_name}' at 'roleSessionName' failed to satisfy constraint: Member must have length between 2 and 64 and match [\\w+=,.@-]*"
        )));
    }
    let duration = match param(params, "DurationSeconds") {
        None => 3600,
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| validation(format!("Value '{text}' at 'durationSeconds' is not a valid integer")))?,
    };
    if duration < 900 {
        return Err(validation(format!(
            "1 validation error detected: Value '{duration}' at 'durationSeconds' failed to satisfy constraint: Member must have value greater than or equal to 900"
        )));
    }
    if duration > 43200 {
        return Err(validation(format!(
            "1 validation error detected: Value '{duration}' at 'durationSeconds' failed to satisfy constraint: Member must have value less than or equal to 43200"
        )));
    }
    let token = param(params, "WebIdentityToken").ok_or_else(|| {
        validation("1 validation error detected: Value null at 'webIdentityToken' failed to satisfy constraint: Member must not be null".into())
    })?;

    let invalid = |message: &str| sender_error(StatusCode::BAD_REQUEST, "InvalidIdentityToken", message);
    let claims = unverified_claims(token).map_err(|_| {
        invalid("The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)")
    })?;
    let provider_id = without_scheme(&claims.iss);
    let Some(provider) = state.config.providers.iter().find(|p| without_scheme(&p.url) == provider_id) else {
        return Err(invalid(&format!("No OpenIDConnect provider found in your account for {}", claims.iss)));
    };
    let verified = state
        .verifier
        .verify(token, &Expected { issuer: &claims.iss, audiences: &provider.client_ids })
        .await
        .map_err(|e| match e {
            JwtError::AudienceMismatch { .. } => invalid("Incorrect token audience"),
            JwtError::Expired { exp, now } => sender_error(
                StatusCode::BAD_REQUEST,
                "ExpiredTokenException",
                &format!("Token expired: current date/time {now} must be before the expiration date/time{exp}"),
            ),
            JwtError::NotYetValid { .. } | JwtError::IssuedInFuture { .. } | JwtError::MissingClaim(_) => {
                sender_error(StatusCode::FORBIDDEN, "IDPRejectedClaim", "Token claims are not valid: they are missing or not yet valid.")
            }
            JwtError::KeyRetrieval { .. } | JwtError::UnknownKey { .. } => invalid(
                "Couldn't retrieve verification key from your identity provider,  please reference AssumeRoleWithWebIdentity documentation for requirements",
            ),
            JwtError::InvalidSignature | JwtError::UnsupportedAlgorithm(_) | JwtError::MissingKeyId => {
                invalid("The web identity token that was passed could not be validated by AWS. Get a new identity token from the identity provider and then retry the request.")
            }
            JwtError::Malformed(_) | JwtError::IssuerMismatch { .. } => invalid("The ID Token provided is not a valid JWT."),
        })?;

    // The role's trust policy. AWS does not say which condition failed.
    let denied = || {
        sender_error(StatusCode::FORBIDDEN, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
    };
    let role = state.config.roles.iter().find(|r| r.role_arn == role_arn).ok_or_else(denied)?;
    if without_scheme(&role.provider) != provider_id {
        return Err(denied());
    }
    let subject = verified.claims.sub.as_deref().unwrap_or_default();
    if !role.subjects.is_empty() && !role.subjects.iter().any(|p| glob_match(p, subject)) {
        return Err(denied());
    }
    if !role.audiences.is_empty() && !verified.claims.aud.iter().any(|a| role.audiences.contains(a)) {
        return Err(denied());
    }
    if duration > role.max_session_duration {
        return Err(validation(
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.".into(),
        ));
    }
    Ok(())
}

fn without_scheme(url: &str) -> &str {
    url.strip_prefix("https://").unwrap_or(url).trim_end_matches('/')
}

/// The form as moto re-encodes it to check a signature (Python's `urlencode`: `quote_plus`,
/// which escapes `*` and keeps `~`, unlike the form encoding of most HTTP clients): signed
/// as sent, a parameter such as a session `Policy` with a `*` would not verify there.
fn moto_canonical_form(form: &[u8]) -> Bytes {
    let quote = |text: &str| {
        let mut out = String::with_capacity(text.len());
        for b in text.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => out.push(b as char),
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    let pairs: Vec<String> =
        parse_form(form).iter().map(|(name, value)| format!("{}={}", quote(name), quote(value))).collect();
    Bytes::from(pairs.join("&"))
}

/// Sends the accepted form to moto (signed, if configured) and relays its answer.
async fn forward_assume_role(state: &GateState, form: Bytes) -> Response {
    let form = moto_canonical_form(&form);
    let url = format!("{}/", state.config.moto_url.trim_end_matches('/'));
    let mut request =
        state.http.post(&url).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded; charset=utf-8");
    if let Some(keys) = &state.config.forward_credentials {
        let host = url.trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/');
        for (name, value) in sigv4_headers(keys, host, &form, jiff::Timestamp::now()) {
            request = request.header(name, value);
        }
    }
    relay(state, request.body(form).send().await).await
}

/// Forwards a request to moto as it came.
async fn forward_unchanged(state: &GateState, method: Method, uri: &Uri, headers: &HeaderMap, body: Bytes) -> Response {
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = format!("{}{path_and_query}", state.config.moto_url.trim_end_matches('/'));
    let mut request = state.http.request(method, url).body(body);
    for (name, value) in headers {
        // Host stays: the client signed it. Hop-by-hop headers and the length do not.
        if !is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
            request = request.header(name, value);
        }
    }
    relay(state, request.send().await).await
}

async fn relay(state: &GateState, answer: reqwest::Result<reqwest::Response>) -> Response {
    let answer = match answer {
        Ok(answer) => answer,
        Err(_) => {
            return aws_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Receiver",
                "ServiceUnavailable",
                "moto did not answer.",
            );
        }
    };
    // reqwest and axum share the `http` crate, so status and headers pass as they are.
    let status = answer.status();
    let mut headers = HeaderMap::new();
    for (name, value) in answer.headers() {
        if !is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
            headers.append(name, value.clone());
        }
    }
    let body = answer.bytes().await.unwrap_or_default();
    if status.is_success() {
        state.counters.record_success();
    }
    (status, headers, body).into_response()
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// SigV4 headers (`X-Amz-Date`, `Authorization`) for `POST /` of `body` to STS in
/// us-east-1 at `host`, signed over content-type, host and x-amz-date.
fn sigv4_headers(keys: &AwsKeys, host: &str, body: &[u8], now: jiff::Timestamp) -> Vec<(&'static str, String)> {
    const REGION: &str = crate::moto::REGION;
    const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
    let amz_date = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let date = &amz_date[..8];
    let mut signed_headers = "content-type;host;x-amz-date".to_owned();
    let mut canonical_headers = format!("content-type:{CONTENT_TYPE}\nhost:{host}\nx-amz-date:{amz_date}\n");
    if let Some(token) = &keys.session_token {
        signed_headers.push_str(";x-amz-security-token");
        let _ = writeln!(canonical_headers, "x-amz-security-token:{token}");
    }
    let canonical_request = format!("POST\n/\n\n{canonical_headers}\n{signed_headers}\n{}", hex(&Sha256::digest(body)));
    let scope = format!("{date}/{REGION}/sts/aws4_request");
    let string_to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
    let mut key = hmac_sha256(format!("AWS4{}", keys.secret_access_key).as_bytes(), date.as_bytes());
    for part in [REGION, "sts", "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let signature = hex(&hmac_sha256(&key, string_to_sign.as_bytes()));
    let mut headers = vec![
        ("X-Amz-Date", amz_date),
        (
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                keys.access_key_id
            ),
        ),
    ];
    if let Some(token) = &keys.session_token {
        headers.push(("X-Amz-Security-Token", token.clone()));
    }
    headers
}

/// HMAC-SHA256 (RFC 2104) over sha2, to keep one crypto dependency.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 64;
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block_key.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block_key.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn sigv4_matches_the_aws_example_signing_key() {
        // The derived-key example of the AWS SigV4 documentation.
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let mut key = hmac_sha256(format!("AWS4{secret}").as_bytes(), b"20120215");
        for part in ["us-east-1", "iam", "aws4_request"] {
            key = hmac_sha256(&key, part.as_bytes());
        }
        assert_eq!(hex(&key), "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
    }
}
