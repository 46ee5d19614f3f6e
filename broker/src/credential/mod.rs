//! Credential providers: how the broker obtains the credential a policy hands out, from
//! AWS STS, Entra ID, Google STS (and IAM Credentials), an OAuth2 token endpoint, its own
//! issuer, or a Secret.

use std::time::Duration;

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

mod answers;
mod exchange;
mod store;

pub use answers::{
    MAX_UPSTREAM_LIFETIME, TokenAnswer, check_expiry, expires_in, parse_entra_answer, parse_google_iam_answer,
    parse_google_sts_answer, parse_oauth2_answer,
};
pub(crate) use answers::{answer_expiry, post_form, send_json};
pub(crate) use exchange::{ENTRA_AUTHORITY, aws_sts_endpoint, entra_token, google_impersonate, google_sts};

use crate::issuer::KeySet;
use crate::{Refusal, authn::Caller, aws, cache::Issued, egress::Egress};

/// Lifetime of a broker-signed assertion exchanged at a cloud's token endpoint.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a credential read from a Secret is handed out before the agent asks again,
/// which is how fast a rotated Secret or a deleted policy takes effect.
const SECRET_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(20 * 60);
/// Default scope of Google tokens.
pub(crate) use cloudpass_api::policy::CLOUD_PLATFORM_SCOPE as CLOUD_PLATFORM;

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
    /// For the secret-store kinds: the CredentialProvider whose federated credential reads
    /// the secret, by name, and its spec (`None` when it is not Ready).
    pub reads_with: Option<(&'a str, &'a CredentialProviderSpec)>,
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
        let mut push = |parts: &[&str]| {
            parts.iter().for_each(|part| key.push_str(part));
            key.push('\u{0}');
        };
        push(&[subject]);
        push(&[namespace]);
        push(&[service_account]);
        // `=name`, or U+0001 for no pod, so that no pod and any pod name differ.
        push(&pod.map_or(["\u{1}", ""], |name| ["=", name]));
        push(&[policy]);
        push(&[provider]);
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
    // A secret read with a federated credential is shared as that credential would be.
    if spec.store().is_some() {
        return match req.reads_with {
            Some((provider, spec)) => cache_discriminator(&MintRequest { provider, spec, reads_with: None, ..*req }),
            None => String::new(),
        };
    }
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
    let claims = CallerClaims::of(req, subject.to_owned()).to_claims();
    sign_token(ctx.keys, ctx.issuer_url, claims, audience, issued_at, lifetime)
        .map_err(|e| Refusal::unavailable(format!("cannot sign: {e}")))
}

/// Signs `claims` (`sub` and `cloudpass.dev`) as a broker-signed token: issuer
/// `issuer_url`, audience `audience`, issued and valid from `issued_at`, expiring
/// `lifetime` later, with a fresh `jti`.
pub(crate) fn sign_token(
    keys: &KeySet,
    issuer_url: &str,
    mut claims: serde_json::Map<String, Value>,
    audience: &str,
    issued_at: Timestamp,
    lifetime: Duration,
) -> Result<String, crate::issuer::IssuerError> {
    let now = issued_at.as_second();
    claims.insert("iss".into(), json!(issuer_url));
    claims.insert("aud".into(), json!(audience));
    claims.insert("iat".into(), json!(now));
    claims.insert("nbf".into(), json!(now));
    claims.insert("exp".into(), json!(now.saturating_add(seconds(lifetime))));
    claims.insert("jti".into(), json!(jti()));
    keys.sign(&Value::Object(claims), now)
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
    Issued {
        credential,
        issued_at,
        expires_at,
        serve_until: req.access_ends.filter(|end| *end < expires_at),
        source: None,
    }
}

fn bounded(req: &MintRequest<'_>, issued_at: Timestamp, expires_at: Timestamp) -> Timestamp {
    match req.max_lifetime.and_then(|d| SignedDuration::try_from(d).ok()) {
        Some(max) => expires_at.min(issued_at.checked_add(max).unwrap_or(expires_at)),
        None => expires_at,
    }
}

async fn aws_sts(ctx: &MintContext<'_>, req: &MintRequest<'_>, spec: &AwsStsCredential) -> Result<Issued, Refusal> {
    let audience = spec.audience();
    let issued_at = Timestamp::now();
    let token = sign(ctx, req, &subject_of(spec.subject, req), audience, issued_at, ASSERTION_LIFETIME)?;
    let endpoint = aws_sts_endpoint(spec);
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
        None,
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

/// The Azure resource a policy's tokens are for.
fn azure_resource<'a>(req: &MintRequest<'a>) -> Result<&'a str, Refusal> {
    req.policy.server.resource.as_deref().ok_or_else(|| {
        Refusal::bad_request(format!("policy {} names no Azure resource (server.resource)", req.policy.name))
    })
}

async fn azure(
    ctx: &MintContext<'_>,
    req: &MintRequest<'_>,
    spec: &AzureWorkloadIdentityCredential,
    resource: &str,
) -> Result<Issued, Refusal> {
    let audience = spec.audience();
    let issued_at = Timestamp::now();
    let assertion = sign(ctx, req, &subject_of(spec.subject, req), audience, issued_at, ASSERTION_LIFETIME)?;
    let scope = format!("{}/.default", resource.trim_end_matches('/'));
    // Entra's client_credentials grant takes no lifetime: a window end or maximum shorter
    // than its token is applied to what the agent serves.
    let (answer, expires_at) = entra_token(ctx.http, spec, &assertion, &scope, issued_at).await?;
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
    scopes: Vec<String>,
) -> Result<Issued, Refusal> {
    let audience = spec.audience();
    let issued_at = Timestamp::now();
    let subject_token = sign(ctx, req, &subject_of(spec.subject, req), &audience, issued_at, ASSERTION_LIFETIME)?;
    // With impersonation the federated token only needs to call IAM Credentials.
    let sts_scope = if spec.service_account_email.is_some() { CLOUD_PLATFORM.to_owned() } else { scopes.join(" ") };
    let federated = google_sts(ctx.http, spec, &subject_token, &sts_scope).await?;
    let (token, expires_at) = match &spec.service_account_email {
        // A federated token's lifetime is Google's: a shorter window or maximum is
        // applied to what the agent serves.
        None => {
            let expires_at = answer_expiry(&federated, issued_at, SignedDuration::ZERO, "Google STS")?;
            (federated.access_token, expires_at)
        }
        Some(email) => {
            let lifetime = lifetime_for(req, spec.token_lifetime.as_std(), issued_at, Duration::from_secs(1));
            google_impersonate(ctx.http, spec, email, &federated.access_token, &scopes, lifetime.as_secs(), issued_at)
                .await?
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
        azure(ctx, req, a, azure_resource(req)?).await
    } else if let Some(g) = &spec.gcp_workload_identity {
        gcp(ctx, req, g, req.policy.server.google_scopes()).await
    } else if let Some(s) = spec.store() {
        store::read(ctx, req, s).await
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
mod tests;
