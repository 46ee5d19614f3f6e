//! Credential providers: how the broker obtains the credential a policy hands out, from
//! AWS STS, Entra ID, Google STS (and IAM Credentials), an OAuth2 token endpoint, its own
//! issuer, or a Secret.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use cloudpass_api::{
    broker::Credential,
    config::CompiledPolicy,
    credential::{
        AwsStsCredential, AzureWorkloadIdentityCredential, ClientAuthentication, CredentialProviderSpec,
        GcpWorkloadIdentityCredential, OAuth2ClientCredentials, SubjectFormat,
    },
    secret::SecretString,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::{Value, json};

use crate::issuer::KeySet;
use crate::{
    Refusal,
    authn::Caller,
    aws,
    cache::Issued,
    egress::{Egress, error_reason, json_error},
    jwt::read_limited,
};

/// Largest token-endpoint answer read.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Lifetime of a broker-signed assertion exchanged at a cloud's token endpoint.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a credential read from a Secret is handed out before the agent asks again,
/// which is how fast a rotated Secret or a deleted policy takes effect.
const SECRET_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(20 * 60);
/// Default scope of Google tokens.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// What obtaining a credential needs.
pub struct MintContext<'a> {
    /// HTTP client for upstream calls, under the egress policy.
    pub http: &'a Egress,
    /// Kubernetes client, to read Secrets.
    pub client: &'a kube::Client,
    /// The issuer's signing keys: the active one signs every broker-signed token.
    pub keys: &'a KeySet,
    /// The issuer URL (`iss` of every broker-signed token).
    pub issuer_url: &'a str,
}

/// One request for a credential.
pub struct MintRequest<'a> {
    /// The CredentialProvider's name, in the caller's namespace (part of `sub`).
    pub provider: &'a str,
    /// The CredentialProvider's compiled spec.
    pub spec: &'a CredentialProviderSpec,
    /// The AccessPolicy that allowed the request (named in the signed claims).
    pub policy: &'a CompiledPolicy,
    /// The verified caller, whose namespace, service account and pod the signed claims
    /// and session names carry.
    pub caller: &'a Caller,
    /// The policy's `maxCredentialLifetime`: shortens what is asked for where the cloud
    /// allows it, and otherwise how long the credential is served.
    pub max_lifetime: Option<Duration>,
    /// When the policy's time window that allows this request closes, if it has windows:
    /// no credential is asked for, cached or served past it.
    pub access_ends: Option<Timestamp>,
}

fn subject_of(format: SubjectFormat, req: &MintRequest<'_>) -> String {
    format.subject(&req.caller.namespace, req.provider, &req.caller.service_account)
}

fn session_name(template: &str, req: &MintRequest<'_>) -> String {
    let rendered = template
        .replace("{namespace}", &req.caller.namespace)
        .replace("{serviceAccount}", &req.caller.service_account)
        .replace("{pod}", req.caller.pod.as_deref().unwrap_or("remote"))
        .replace("{policy}", &req.policy.name);
    // STS allows [\w+=,.@-]{2,64}.
    let clean: String = rendered
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) { c } else { '-' })
        .take(64)
        .collect();
    if clean.len() < 2 { "cloudpass".into() } else { clean }
}

/// The claims of every broker-signed token that come from the caller: `sub` and the
/// `cloudpass.dev` claim. A cloud may decide on any of them (a Google attribute
/// condition on `assertion['cloudpass.dev'].serviceAccount`, a partner on `pod`), so a
/// credential obtained with them is shared only with callers for which they are equal:
/// the cache key is made of the same fields ([`CallerClaims::write_key`]).
struct CallerClaims<'a> {
    subject: String,
    namespace: &'a str,
    service_account: &'a str,
    pod: Option<&'a str>,
    policy: &'a str,
    provider: &'a str,
}

impl<'a> CallerClaims<'a> {
    fn of(req: &MintRequest<'a>, subject: String) -> Self {
        Self {
            subject,
            namespace: &req.caller.namespace,
            service_account: &req.caller.service_account,
            pod: req.caller.pod.as_deref(),
            policy: &req.policy.name,
            provider: req.provider,
        }
    }

    /// The claims as they are signed.
    fn to_claims(&self) -> serde_json::Map<String, Value> {
        // Destructured, so that a claim added here cannot be left out of the key.
        let Self { subject, namespace, service_account, pod, policy, provider } = self;
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), json!(subject));
        claims.insert(
            "cloudpass.dev".into(),
            json!({
                "namespace": namespace,
                "serviceAccount": service_account,
                "pod": pod,
                "policy": policy,
                "credentialProvider": provider,
            }),
        );
        claims
    }

    /// Appends the same claims to a cache key: NUL-separated (no Kubernetes name holds
    /// one), without building the JSON on every request.
    fn write_key(&self, key: &mut String) {
        let Self { subject, namespace, service_account, pod, policy, provider } = self;
        let pod = pod.map_or(String::from("\u{1}"), |p| format!("={p}"));
        for part in [subject.as_str(), namespace, service_account, &pod, policy, provider] {
            key.push_str(part);
            key.push('\u{0}');
        }
    }
}

/// The part of the cache key that depends on the caller: everything of the upstream
/// request that varies between callers. For providers that present a broker-signed
/// token, that is every caller claim the broker signs (`CallerClaims`), so a token
/// (or what a cloud exchanged it for) is never handed to a caller it was not signed for;
/// plus the rendered session name for AWS. Providers that present no caller data
/// (OAuth2 client credentials, Secrets) share one credential per policy.
pub fn cache_discriminator(req: &MintRequest<'_>) -> String {
    let spec = req.spec;
    let mut key = String::new();
    let format = if let Some(aws) = &spec.aws_sts {
        CallerClaims::of(req, subject_of(aws.subject, req)).write_key(&mut key);
        key.push_str(&session_name(&aws.session_name, req));
        return key;
    } else if let Some(a) = &spec.azure_workload_identity {
        a.subject
    } else if let Some(g) = &spec.gcp_workload_identity {
        g.subject
    } else if let Some(o) = &spec.oidc_token {
        o.subject
    } else {
        return key;
    };
    CallerClaims::of(req, subject_of(format, req)).write_key(&mut key);
    key
}

/// A random token ID.
fn jti() -> String {
    cloudpass_rand::hex(16)
}

/// Whole seconds of `d`, as a JWT time difference.
fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn sign(
    ctx: &MintContext<'_>,
    req: &MintRequest<'_>,
    subject: &str,
    audience: &str,
    issued_at: Timestamp,
    lifetime: Duration,
) -> Result<String, Refusal> {
    let now = issued_at.as_second();
    let mut claims = CallerClaims::of(req, subject.to_owned()).to_claims();
    claims.insert("iss".into(), json!(ctx.issuer_url));
    claims.insert("aud".into(), json!(audience));
    claims.insert("iat".into(), json!(now));
    claims.insert("nbf".into(), json!(now));
    claims.insert("exp".into(), json!(now.saturating_add(seconds(lifetime))));
    claims.insert("jti".into(), json!(jti()));
    ctx.keys.sign(&Value::Object(claims), now).map_err(|e| Refusal::unavailable(format!("cannot sign: {e}")))
}

/// The lifetime to ask for at `now`: `wanted`, shortened to `maxCredentialLifetime` and
/// to the time left in the policy's time window (rounded up to whole seconds), but not
/// below `floor`, the shortest the upstream issues.
fn lifetime_for(req: &MintRequest<'_>, wanted: Duration, now: Timestamp, floor: Duration) -> Duration {
    let mut lifetime = wanted;
    if let Some(max) = req.max_lifetime {
        lifetime = lifetime.min(max);
    }
    if let Some(end) = req.access_ends {
        let left_ms = end.as_millisecond().saturating_sub(now.as_millisecond()).max(0).unsigned_abs();
        lifetime = lifetime.min(Duration::from_secs(left_ms.div_ceil(1000)));
    }
    lifetime.max(floor)
}

/// `issued_at + lifetime`, or an upstream error when that is not a time.
fn expiry(issued_at: Timestamp, lifetime: SignedDuration, service: &str) -> Result<Timestamp, Refusal> {
    issued_at.checked_add(lifetime).map_err(|_| {
        Refusal::upstream(format!("{service} answered a lifetime of {lifetime:#} that is out of range"), None)
    })
}

/// The credential as handed out: `expires_at` bounded by `maxCredentialLifetime`, and
/// `serve_until` the end of the policy's time window when the credential outlives it.
fn finish(req: &MintRequest<'_>, credential: Credential, issued_at: Timestamp, expires_at: Timestamp) -> Issued {
    let expires_at = bounded(req, issued_at, expires_at);
    Issued { credential, issued_at, expires_at, serve_until: req.access_ends.filter(|end| *end < expires_at) }
}

fn bounded(req: &MintRequest<'_>, issued_at: Timestamp, expires_at: Timestamp) -> Timestamp {
    match req.max_lifetime.and_then(|d| SignedDuration::try_from(d).ok()) {
        Some(max) => expires_at.min(issued_at.checked_add(max).unwrap_or(expires_at)),
        None => expires_at,
    }
}

async fn post_form(
    http: &Egress,
    url: &str,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
    service: &str,
) -> Result<Value, Refusal> {
    let mut builder =
        http.post(url).map_err(|e| Refusal::denied(e.to_string()))?.header("accept", "application/json").form(form);
    if let Some((user, password)) = basic {
        // RFC 6749 section 2.3.1: both parts are form-encoded before Basic encoding.
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        builder = builder
            .header("authorization", format!("Basic {}", B64.encode(format!("{}:{}", enc(user), enc(password)))));
    }
    send_json(builder, url, service).await
}

async fn send_json(builder: reqwest::RequestBuilder, url: &str, service: &str) -> Result<Value, Refusal> {
    let response = builder
        .send()
        .await
        .map_err(|e| Refusal::upstream(format!("{service} at {url} unreachable: {}", error_reason(&e)), None))?;
    let status = response.status();
    let body = read_limited(response, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| Refusal::upstream(format!("{service}: {e}"), None))?;
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status.is_success() {
        return if value.is_object() {
            Ok(value)
        } else {
            Err(Refusal::upstream(format!("{service} answered HTTP {status} without a JSON object"), None))
        };
    }
    // Only the upstream's error code and description, bounded: never the body itself.
    let (code, message) = json_error(&value);
    Err(Refusal::upstream(
        format!(
            "{service} refused the request (HTTP {}): {}",
            status.as_u16(),
            message.unwrap_or_else(|| "no description".into())
        ),
        code.or_else(|| Some(format!("HTTP{}", status.as_u16()))),
    ))
}

fn string_field(value: &Value, field: &str, service: &str) -> Result<String, Refusal> {
    value
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Refusal::upstream(format!("{service} answer has no {field}"), None))
}

/// The longest credential lifetime believed from an upstream answer (a year): anything
/// longer is a broken or hostile answer, refused rather than cached for ever.
pub const MAX_UPSTREAM_LIFETIME: SignedDuration = SignedDuration::from_hours(366 * 24);

/// `expires_in` (RFC 6749 section 5.1) as a number of seconds or a numeric string:
/// `Ok(None)` when absent, an error when present but not a whole number of seconds from
/// 1 to [`MAX_UPSTREAM_LIFETIME`] (`1e15`, `-1`, `0`, `"soon"`, 20 digits).
pub fn expires_in(value: &Value) -> Result<Option<SignedDuration>, String> {
    let max = MAX_UPSTREAM_LIFETIME.as_secs();
    let raw = match value.get("expires_in") {
        None | Some(Value::Null) => return Ok(None),
        Some(raw) => raw,
    };
    // Wide enough for any JSON integer serde_json keeps; floats saturate.
    let seconds: Option<i128> = match raw {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| n.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0).map(|f| f as i128)),
        Value::String(s) if s.len() <= 40 => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    let shown = || {
        let text = raw.to_string();
        if text.chars().count() > 32 { format!("{}...", text.chars().take(32).collect::<String>()) } else { text }
    };
    match seconds {
        Some(s) if (1..=i128::from(max)).contains(&s) => Ok(Some(SignedDuration::from_secs(s as i64))),
        Some(_) => Err(format!("expires_in {} is out of range (1 s to {} days)", shown(), max / 86400)),
        None => Err(format!("expires_in {} is not a whole number of seconds", shown())),
    }
}

/// An access token from a token endpoint's answer.
#[derive(Debug)]
pub struct TokenAnswer {
    /// `access_token`, redacted in `Debug`.
    pub access_token: SecretString,
    /// `token_type`; `Bearer` when absent.
    pub token_type: String,
    /// `expires_in`, when given (and then within range).
    pub expires_in: Option<SignedDuration>,
}

fn token_answer(value: &Value, service: &str, expires_in_required: bool) -> Result<TokenAnswer, Refusal> {
    let access_token = SecretString::new(string_field(value, "access_token", service)?);
    let token_type = match value.get("token_type") {
        None | Some(Value::Null) => "Bearer".to_owned(),
        Some(Value::String(t)) if !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()) => {
            t.clone()
        }
        Some(_) => return Err(Refusal::upstream(format!("{service} answer has an invalid token_type"), None)),
    };
    let expires_in = expires_in(value).map_err(|e| Refusal::upstream(format!("{service} answer: {e}"), None))?;
    if expires_in_required && expires_in.is_none() {
        return Err(Refusal::upstream(format!("{service} answer has no expires_in"), None));
    }
    Ok(TokenAnswer { access_token, token_type, expires_in })
}

/// An OAuth2 token endpoint's `client_credentials` answer (`expires_in` optional).
pub fn parse_oauth2_answer(value: &Value) -> Result<TokenAnswer, Refusal> {
    token_answer(value, "the OAuth2 token endpoint", false)
}

/// Entra ID's `client_credentials` answer (`expires_in` required).
pub fn parse_entra_answer(value: &Value) -> Result<TokenAnswer, Refusal> {
    token_answer(value, "Entra ID", true)
}

/// Google STS's token-exchange answer (`expires_in` required).
pub fn parse_google_sts_answer(value: &Value) -> Result<TokenAnswer, Refusal> {
    token_answer(value, "Google STS", true)
}

/// Google IAM Credentials' `generateAccessToken` answer: the token and its `expireTime`,
/// which must be after `issued_at` and at most [`MAX_UPSTREAM_LIFETIME`] later.
pub fn parse_google_iam_answer(value: &Value, issued_at: Timestamp) -> Result<(SecretString, Timestamp), Refusal> {
    let service = "Google IAM Credentials";
    let token = SecretString::new(string_field(value, "accessToken", service)?);
    let expire = string_field(value, "expireTime", service)?;
    let expire: Timestamp = expire
        .parse()
        .map_err(|e| Refusal::upstream(format!("{service} answer has an invalid expireTime: {e}"), None))?;
    Ok((token, check_expiry(issued_at, expire, service)?))
}

/// An absolute expiry from an upstream answer, refused unless after `issued_at` and at
/// most [`MAX_UPSTREAM_LIFETIME`] later.
pub fn check_expiry(issued_at: Timestamp, expires_at: Timestamp, service: &str) -> Result<Timestamp, Refusal> {
    let lifetime = expires_at.duration_since(issued_at);
    if lifetime <= SignedDuration::ZERO || lifetime > MAX_UPSTREAM_LIFETIME {
        return Err(Refusal::upstream(
            format!("{service} answered an expiry of {expires_at}, which is not within a year after {issued_at}"),
            None,
        ));
    }
    Ok(expires_at)
}

/// The expiry of a token answer: `issued_at + expires_in`, or `issued_at + default`.
fn answer_expiry(
    answer: &TokenAnswer,
    issued_at: Timestamp,
    default: SignedDuration,
    service: &str,
) -> Result<Timestamp, Refusal> {
    expiry(issued_at, answer.expires_in.unwrap_or(default), service)
}

async fn aws_sts(ctx: &MintContext<'_>, req: &MintRequest<'_>, spec: &AwsStsCredential) -> Result<Issued, Refusal> {
    let audience = spec.audience.as_deref().unwrap_or("sts.amazonaws.com");
    let issued_at = Timestamp::now();
    let token = sign(ctx, req, &subject_of(spec.subject, req), audience, issued_at, ASSERTION_LIFETIME)?;
    let endpoint = spec.sts_endpoint.clone().unwrap_or_else(|| format!("https://sts.{}.amazonaws.com/", spec.region));
    // STS refuses less than 15 minutes; a shorter maximum or window end is applied to
    // what the agent serves.
    let duration = lifetime_for(req, spec.session_duration.as_std(), issued_at, Duration::from_secs(900));
    let creds = aws::assume_role_with_web_identity(
        ctx.http,
        &endpoint,
        &spec.role_arn,
        &session_name(&spec.session_name, req),
        duration.as_secs(),
        &token,
    )
    .await?;
    let expires_at = check_expiry(issued_at, creds.expiration, "AWS STS")?;
    let credential = Credential::Aws {
        access_key_id: creds.access_key_id,
        secret_access_key: creds.secret_access_key,
        session_token: creds.session_token,
        account_id: creds.account_id,
    };
    Ok(finish(req, credential, issued_at, expires_at))
}

async fn azure(
    ctx: &MintContext<'_>,
    req: &MintRequest<'_>,
    spec: &AzureWorkloadIdentityCredential,
) -> Result<Issued, Refusal> {
    let resource = req.policy.server.resource.as_deref().ok_or_else(|| {
        Refusal::bad_request(format!("policy {} names no Azure resource (server.resource)", req.policy.name))
    })?;
    let audience = spec.audience.as_deref().unwrap_or("api://AzureADTokenExchange");
    let issued_at = Timestamp::now();
    let assertion = sign(ctx, req, &subject_of(spec.subject, req), audience, issued_at, ASSERTION_LIFETIME)?;
    let authority = spec.authority_host.as_deref().unwrap_or("https://login.microsoftonline.com").trim_end_matches('/');
    let url = format!("{authority}/{}/oauth2/v2.0/token", spec.tenant_id);
    let scope = format!("{}/.default", resource.trim_end_matches('/'));
    // Entra's client_credentials grant takes no lifetime: a window end or maximum shorter
    // than its token is applied to what the agent serves.
    let answer = post_form(
        ctx.http,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &spec.client_id),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", &assertion),
            ("scope", &scope),
        ],
        None,
        "Entra ID",
    )
    .await?;
    let answer = parse_entra_answer(&answer)?;
    let expires_at = answer_expiry(&answer, issued_at, SignedDuration::ZERO, "Entra ID")?;
    let credential = Credential::AccessToken {
        access_token: answer.access_token,
        token_type: answer.token_type,
        resource: Some(resource.to_owned()),
        client_id: Some(spec.client_id.clone()),
        service_account_email: None,
        project_id: None,
    };
    Ok(finish(req, credential, issued_at, expires_at))
}

async fn gcp(
    ctx: &MintContext<'_>,
    req: &MintRequest<'_>,
    spec: &GcpWorkloadIdentityCredential,
) -> Result<Issued, Refusal> {
    let provider = &spec.workload_identity_provider;
    let default_audience = format!("https://iam.googleapis.com/{provider}");
    let audience = spec.audience.as_deref().unwrap_or(&default_audience);
    let issued_at = Timestamp::now();
    let subject_token = sign(ctx, req, &subject_of(spec.subject, req), audience, issued_at, ASSERTION_LIFETIME)?;
    let sts = spec.sts_endpoint.as_deref().unwrap_or("https://sts.googleapis.com").trim_end_matches('/');
    let scopes: Vec<String> = if req.policy.server.scopes.is_empty() {
        vec![CLOUD_PLATFORM.into()]
    } else {
        req.policy.server.scopes.clone()
    };
    // With impersonation the federated token only needs to call IAM Credentials.
    let sts_scope = if spec.service_account_email.is_some() { CLOUD_PLATFORM.to_owned() } else { scopes.join(" ") };
    let sts_url = format!("{sts}/v1/token");
    let answer = post_form(
        ctx.http,
        &sts_url,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("audience", &format!("//iam.googleapis.com/{provider}")),
            ("scope", &sts_scope),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("subject_token", &subject_token),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ],
        None,
        "Google STS",
    )
    .await?;
    let federated = parse_google_sts_answer(&answer)?;
    let (token, expires_at) = match &spec.service_account_email {
        // A federated token's lifetime is Google's: a shorter window or maximum is
        // applied to what the agent serves.
        None => {
            let expires_at = answer_expiry(&federated, issued_at, SignedDuration::ZERO, "Google STS")?;
            (federated.access_token, expires_at)
        }
        Some(email) => {
            let iam = spec
                .iam_credentials_endpoint
                .as_deref()
                .unwrap_or("https://iamcredentials.googleapis.com")
                .trim_end_matches('/');
            let url = format!("{iam}/v1/projects/-/serviceAccounts/{email}:generateAccessToken");
            let lifetime = lifetime_for(req, spec.token_lifetime.as_std(), issued_at, Duration::from_secs(1));
            let builder = ctx
                .http
                .post(&url)
                .map_err(|e| Refusal::denied(e.to_string()))?
                .bearer_auth(federated.access_token.expose())
                .json(&json!({"scope": scopes, "lifetime": format!("{}s", lifetime.as_secs())}));
            let answer = send_json(builder, &url, "Google IAM Credentials").await?;
            parse_google_iam_answer(&answer, issued_at)?
        }
    };
    let credential = Credential::AccessToken {
        access_token: token,
        token_type: "Bearer".into(),
        resource: None,
        client_id: None,
        service_account_email: spec.service_account_email.clone(),
        project_id: spec.project_id.clone(),
    };
    Ok(finish(req, credential, issued_at, expires_at))
}

/// Reads one key of a Secret in the caller's namespace, at the moment it is needed.
async fn secret_value(ctx: &MintContext<'_>, namespace: &str, name: &str, key: &str) -> Result<String, Refusal> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| Refusal::unavailable(format!("reading Secret {namespace}/{name} failed: {e}")))?
        .ok_or_else(|| Refusal::unavailable(format!("Secret {namespace}/{name} does not exist")))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(key)).map(|s| s.clone().into_bytes()))
        .ok_or_else(|| Refusal::unavailable(format!("Secret {namespace}/{name} has no key {key}")))?;
    String::from_utf8(bytes)
        .map_err(|_| Refusal::unavailable(format!("Secret {namespace}/{name} key {key} is not UTF-8")))
}

async fn oauth2(
    ctx: &MintContext<'_>,
    req: &MintRequest<'_>,
    spec: &OAuth2ClientCredentials,
) -> Result<Issued, Refusal> {
    let secret =
        secret_value(ctx, &req.caller.namespace, &spec.client_secret_ref.name, &spec.client_secret_ref.key).await?;
    let scope = spec.scopes.join(" ");
    let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
    if !scope.is_empty() {
        form.push(("scope", &scope));
    }
    if let Some(audience) = &spec.audience {
        form.push(("audience", audience));
    }
    let basic = match spec.client_authentication {
        ClientAuthentication::ClientSecretBasic => Some((spec.client_id.as_str(), secret.as_str())),
        ClientAuthentication::ClientSecretPost => {
            form.push(("client_id", &spec.client_id));
            form.push(("client_secret", &secret));
            None
        }
    };
    let issued_at = Timestamp::now();
    let service = "the OAuth2 token endpoint";
    let answer = post_form(ctx.http, &spec.token_url, &form, basic, service).await?;
    let answer = parse_oauth2_answer(&answer)?;
    // RFC 6749 makes expires_in optional; assume an hour, re-asked well before.
    let expires_at = answer_expiry(&answer, issued_at, SignedDuration::from_hours(1), service)?;
    let credential = Credential::AccessToken {
        access_token: answer.access_token,
        token_type: answer.token_type,
        resource: None,
        client_id: Some(spec.client_id.clone()),
        service_account_email: None,
        project_id: None,
    };
    Ok(finish(req, credential, issued_at, expires_at))
}

/// Obtains the credential of one request from its provider.
pub async fn obtain(ctx: &MintContext<'_>, req: &MintRequest<'_>) -> Result<Issued, Refusal> {
    let spec = req.spec;
    // Credentials whose lifetime is the broker's own (Secrets, its JWTs) end with the
    // window: the agent asks again then, and is refused.
    let own = |wanted: Duration, now: Timestamp| {
        let lifetime = lifetime_for(req, wanted, now, Duration::from_secs(1));
        let until = expiry(now, SignedDuration::from_secs(seconds(lifetime)), "the broker")?;
        Ok::<_, Refusal>(req.access_ends.map_or(until, |end| until.min(end)))
    };
    if let Some(s) = &spec.aws_sts {
        aws_sts(ctx, req, s).await
    } else if let Some(a) = &spec.azure_workload_identity {
        azure(ctx, req, a).await
    } else if let Some(g) = &spec.gcp_workload_identity {
        gcp(ctx, req, g).await
    } else if let Some(o) = &spec.oauth2_client_credentials {
        oauth2(ctx, req, o).await
    } else if let Some(o) = &spec.oidc_token {
        let issued_at = Timestamp::now();
        let lifetime = lifetime_for(req, o.lifetime.as_std(), issued_at, Duration::from_secs(1));
        let token = sign(ctx, req, &subject_of(o.subject, req), &o.audience, issued_at, lifetime)?;
        // `exp` is whole seconds after `iat`, which is `issued_at` cut to the second.
        let iat = Timestamp::from_second(issued_at.as_second()).unwrap_or(issued_at);
        let expires_at = expiry(iat, SignedDuration::from_secs(seconds(lifetime)), "the broker")?;
        Ok(finish(req, Credential::Jwt { token: SecretString::new(token) }, iat, expires_at))
    } else if let Some(k) = &spec.api_key {
        let key = secret_value(ctx, &req.caller.namespace, &k.secret_ref.name, &k.secret_ref.key).await?;
        let now = Timestamp::now();
        let expires_at = own(SECRET_CREDENTIAL_LIFETIME, now)?;
        Ok(finish(req, Credential::ApiKey { key: SecretString::new(key) }, now, expires_at))
    } else if let Some(u) = &spec.username_password {
        let r = &u.secret_ref;
        let username = secret_value(ctx, &req.caller.namespace, &r.name, &r.username_key).await?;
        let password = secret_value(ctx, &req.caller.namespace, &r.name, &r.password_key).await?;
        let now = Timestamp::now();
        let expires_at = own(SECRET_CREDENTIAL_LIFETIME, now)?;
        let credential = Credential::UsernamePassword { username, password: SecretString::new(password) };
        Ok(finish(req, credential, now, expires_at))
    } else {
        Err(Refusal::bad_request("the credential provider sets no kind"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::authn::Origin;

    fn caller(pod: Option<&str>) -> Caller {
        Caller {
            namespace: "team-a".into(),
            service_account: "orders".into(),
            pod: pod.map(str::to_owned),
            pod_uid: None,
            labels: BTreeMap::new(),
            audiences: vec![],
            origin: Origin::ThisCluster,
        }
    }

    fn policy() -> CompiledPolicy {
        serde_json::from_value(json!({
            "name": "to-s3", "client": {"podSelector": {}}, "trustProviders": ["k8s"],
            "server": {"kind": "aws"}, "credentialProvider": "s3", "delivery": {}
        }))
        .unwrap()
    }

    fn request<'a>(
        spec: &'a CredentialProviderSpec,
        policy: &'a CompiledPolicy,
        caller: &'a Caller,
    ) -> MintRequest<'a> {
        MintRequest { provider: "p", spec, policy, caller, max_lifetime: None, access_ends: None }
    }

    #[test]
    fn session_names_are_rendered_and_sanitised() {
        let spec: CredentialProviderSpec =
            serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap();
        let p = policy();
        let c = caller(Some("orders-7d9f/x"));
        let req = request(&spec, &p, &c);
        assert_eq!(session_name("cloudpass-{namespace}-{pod}", &req), "cloudpass-team-a-orders-7d9f-x");
        assert_eq!(session_name(&"{policy}".repeat(20), &req).len(), 64);
        assert!(cache_discriminator(&req).ends_with("\u{0}cloudpass-team-a-orders-7d9f-x"));
        let other_pod = caller(Some("orders-2"));
        assert_ne!(cache_discriminator(&req), cache_discriminator(&request(&spec, &p, &other_pod)));
    }

    /// Finding: with `subject: Provider` every caller got the token (or the cloud's
    /// exchange of it) minted for the first one. The key covers every signed caller claim.
    #[test]
    fn the_cache_key_covers_every_signed_caller_claim() {
        let p = policy();
        let orders = caller(Some("orders-1"));
        let mut billing = caller(Some("billing-1"));
        billing.service_account = "billing".into();
        let mut other_pod = caller(Some("orders-2"));
        other_pod.pod_uid = Some("u".into());
        for spec in [
            json!({"oidcToken": {"audience": "https://partner.example.com"}}),
            json!({"gcpWorkloadIdentity": {"workloadIdentityProvider": "projects/1/locations/global/workloadIdentityPools/pool/providers/prov"}}),
            json!({"azureWorkloadIdentity": {"tenantId": "8c1d3f0e-7b6a-4e55-9f21-0a3b5c7d9e11", "clientId": "4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55"}}),
            json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r", "sessionName": "fixed"}}),
        ] {
            let spec: CredentialProviderSpec = serde_json::from_value(spec).unwrap();
            let key = |c: &Caller| cache_discriminator(&request(&spec, &p, c));
            assert_ne!(key(&orders), key(&billing), "{spec:?}: service accounts share");
            assert_ne!(key(&orders), key(&other_pod), "{spec:?}: pods share");
            assert_eq!(key(&orders), key(&orders.clone()));
            // Exactly what is signed: every caller claim is in the key.
            let req = request(&spec, &p, &billing);
            let claims = Value::Object(CallerClaims::of(&req, "s".into()).to_claims()).to_string();
            for part in ["billing-1", "billing", "team-a", "to-s3", "p"] {
                assert!(claims.contains(&format!("\"{part}\"")), "{part} in {claims}");
                assert!(key(&billing).contains(&format!("{part}\u{0}")), "{part} in {:?}", key(&billing));
            }
        }
        // Nothing of the caller reaches an OAuth2 server or a Secret: one credential.
        let secret: CredentialProviderSpec =
            serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap();
        assert_eq!(
            cache_discriminator(&request(&secret, &p, &orders)),
            cache_discriminator(&request(&secret, &p, &billing))
        );
    }

    #[test]
    fn max_lifetime_bounds_expiry() {
        let spec: CredentialProviderSpec =
            serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap();
        let (p, c) = (policy(), caller(None));
        let req = MintRequest { max_lifetime: Some(Duration::from_secs(300)), ..request(&spec, &p, &c) };
        let now = Timestamp::now();
        let bound = bounded(&req, now, now + SignedDuration::from_secs(3600));
        assert_eq!(bound.as_second() - now.as_second(), 300);
    }

    #[test]
    fn lifetimes_end_with_the_window() {
        let spec: CredentialProviderSpec =
            serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap();
        let (p, c) = (policy(), caller(None));
        let now: Timestamp = "2026-11-23T16:59:30.250Z".parse().unwrap();
        let end: Timestamp = "2026-11-23T17:00:00Z".parse().unwrap();
        let req = MintRequest { access_ends: Some(end), ..request(&spec, &p, &c) };
        let hour = Duration::from_secs(3600);
        // What may be asked for: up to the window's end (rounded up to whole seconds),
        // not below what the upstream issues.
        assert_eq!(lifetime_for(&req, hour, now, Duration::from_secs(1)), Duration::from_secs(30));
        assert_eq!(lifetime_for(&req, hour, now, Duration::from_secs(900)), Duration::from_secs(900));
        let late = MintRequest { max_lifetime: Some(Duration::from_secs(10)), ..request(&spec, &p, &c) };
        assert_eq!(lifetime_for(&late, hour, now, Duration::from_secs(1)), Duration::from_secs(10));
        assert_eq!(lifetime_for(&request(&spec, &p, &c), hour, now, Duration::ZERO), hour);
        // A credential that outlives the window is served until its end; one that does
        // not needs no serve_until.
        let cred = || Credential::ApiKey { key: SecretString::new("k") };
        let outlives = finish(&req, cred(), now, now + SignedDuration::from_secs(900));
        assert_eq!(outlives.serve_until, Some(end));
        assert_eq!(outlives.refresh_at(), end);
        let within = finish(&req, cred(), now, end);
        assert_eq!((within.serve_until, within.expires_at), (None, end));
    }

    #[test]
    fn expires_in_number_or_string() {
        let secs = |s: i64| Ok(Some(SignedDuration::from_secs(s)));
        assert_eq!(expires_in(&json!({"expires_in": 3599})), secs(3599));
        assert_eq!(expires_in(&json!({"expires_in": "3599"})), secs(3599));
        assert_eq!(expires_in(&json!({"expires_in": 3599.0})), secs(3599));
        assert_eq!(expires_in(&json!({})), Ok(None));
        assert_eq!(expires_in(&json!({"expires_in": null})), Ok(None));
        assert!(expires_in(&json!({"expires_in": "soon"})).unwrap_err().contains("not a whole number"));
    }

    /// Finding: `expires_in: 1e15` overflowed the expiry and panicked the request, with
    /// no audit record. Every hostile number is a precise upstream error now.
    #[test]
    fn hostile_lifetimes_are_upstream_errors_not_panics() {
        let hostile = [
            json!(1e15),
            json!(1_000_000_000_000_000_i64),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(-1),
            json!(0),
            json!(-0.0),
            json!(1e308),
            json!(3599.5),
            json!("1e15"),
            json!("99999999999999999999999999999"),
            json!("-5"),
            json!(" "),
            json!("9".repeat(100_000)),
            json!([3600]),
            json!({"seconds": 3600}),
            json!(true),
        ];
        let now = Timestamp::now();
        for value in hostile {
            let answer = json!({"access_token": "at", "token_type": "Bearer", "expires_in": value});
            let err = expires_in(&answer).unwrap_err();
            assert!(err.starts_with("expires_in ") && err.len() < 120, "{value}: {err}");
            for parse in [parse_oauth2_answer, parse_entra_answer, parse_google_sts_answer] {
                let refusal = parse(&answer).unwrap_err();
                assert!(refusal.is_upstream() && refusal.message.contains("expires_in"), "{refusal:?}");
                assert!(!refusal.message.contains("\"at\""), "no token in the message");
            }
        }
        // Entra and Google STS need a lifetime; OAuth2 does not.
        let bare = json!({"access_token": "at"});
        assert!(parse_entra_answer(&bare).unwrap_err().message.contains("no expires_in"));
        assert!(parse_google_sts_answer(&bare).is_err());
        assert_eq!(parse_oauth2_answer(&bare).unwrap().token_type, "Bearer");
        let bad_type = json!({"access_token": "at", "token_type": "x".repeat(100), "expires_in": 60});
        assert!(parse_oauth2_answer(&bad_type).is_err());

        // Absolute expiries: Google's expireTime, AWS's Expiration.
        let iam = |expire: &str| parse_google_iam_answer(&json!({"accessToken": "t", "expireTime": expire}), now);
        let in_an_hour = (now + SignedDuration::from_hours(1)).to_string();
        assert_eq!(iam(&in_an_hour).unwrap().1.to_string(), in_an_hour);
        for expire in ["9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z", "-009999-01-02T01:59:59Z", "yesterday"] {
            let refusal = iam(expire).unwrap_err();
            assert!(refusal.is_upstream(), "{expire}: {refusal:?}");
        }
        assert!(check_expiry(now, now, "AWS STS").is_err());
        assert!(check_expiry(now, Timestamp::MAX, "AWS STS").unwrap_err().message.contains("AWS STS"));
        // The broker's own arithmetic saturates instead of overflowing.
        assert!(expiry(Timestamp::MAX, SignedDuration::from_secs(1), "x").is_err());
        assert!(
            bounded(
                &MintRequest { max_lifetime: Some(Duration::MAX), ..request(&bare_spec(), &policy(), &caller(None)) },
                now,
                now
            ) == now
        );
    }

    fn bare_spec() -> CredentialProviderSpec {
        serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap()
    }
}
