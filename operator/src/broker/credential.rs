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

use super::{
    Refusal,
    authn::Caller,
    aws,
    cache::Issued,
    egress::{Egress, error_reason, json_error},
    jwt::read_limited,
};
use crate::issuer::KeySet;

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
    /// The issuer's keys.
    pub keys: &'a KeySet,
    /// The issuer URL (`iss` of every broker-signed token).
    pub issuer_url: &'a str,
}

/// One request for a credential.
pub struct MintRequest<'a> {
    /// CredentialProvider name.
    pub provider: &'a str,
    /// Its spec.
    pub spec: &'a CredentialProviderSpec,
    /// The policy.
    pub policy: &'a CompiledPolicy,
    /// The verified caller.
    pub caller: &'a Caller,
    /// The policy's `maxCredentialLifetime`.
    pub max_lifetime: Option<Duration>,
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

/// The part of the cache key that depends on the caller: callers that would get the same
/// upstream request share a cached credential.
pub fn cache_discriminator(spec: &CredentialProviderSpec, policy: &CompiledPolicy, caller: &Caller) -> String {
    let req = MintRequest { provider: "", spec, policy, caller, max_lifetime: None };
    let subject = |format: SubjectFormat| match format {
        SubjectFormat::Provider => String::new(),
        SubjectFormat::ServiceAccount => caller.service_account.clone(),
    };
    if let Some(aws) = &spec.aws_sts {
        format!("{}/{}", subject(aws.subject), session_name(&aws.session_name, &req))
    } else if let Some(a) = &spec.azure_workload_identity {
        subject(a.subject)
    } else if let Some(g) = &spec.gcp_workload_identity {
        subject(g.subject)
    } else if let Some(o) = &spec.oidc_token {
        subject(o.subject)
    } else {
        String::new()
    }
}

/// A random token ID.
fn jti() -> String {
    let mut buf = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut buf).expect("system random source");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn sign(
    ctx: &MintContext<'_>,
    req: &MintRequest<'_>,
    subject: &str,
    audience: &str,
    lifetime: Duration,
) -> Result<String, Refusal> {
    let now = Timestamp::now().as_second();
    let claims = json!({
        "iss": ctx.issuer_url,
        "sub": subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime.as_secs() as i64,
        "jti": jti(),
        "cloudpass.dev": {
            "namespace": req.caller.namespace,
            "serviceAccount": req.caller.service_account,
            "pod": req.caller.pod,
            "policy": req.policy.name,
            "credentialProvider": req.provider,
        },
    });
    ctx.keys.sign(&claims, now).map_err(|e| Refusal::unavailable(format!("cannot sign: {e}")))
}

fn bounded(req: &MintRequest<'_>, issued_at: Timestamp, expires_at: Timestamp) -> Timestamp {
    match req.max_lifetime.and_then(|d| SignedDuration::try_from(d).ok()) {
        Some(max) => expires_at.min(issued_at + max),
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
    let mut builder = http.post(url).map_err(Refusal::denied)?.header("accept", "application/json").form(form);
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

/// `expires_in` as a number or a numeric string.
fn expires_in(value: &Value) -> Option<i64> {
    match value.get("expires_in")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

async fn aws_sts(ctx: &MintContext<'_>, req: &MintRequest<'_>, spec: &AwsStsCredential) -> Result<Issued, Refusal> {
    let audience = spec.audience.as_deref().unwrap_or("sts.amazonaws.com");
    let token = sign(ctx, req, &subject_of(spec.subject, req), audience, ASSERTION_LIFETIME)?;
    let endpoint = spec.sts_endpoint.clone().unwrap_or_else(|| format!("https://sts.{}.amazonaws.com/", spec.region));
    let mut duration = spec.session_duration.as_std();
    if let Some(max) = req.max_lifetime {
        duration = duration.min(max);
    }
    // STS refuses less than 15 minutes; a shorter maximum is applied to what the agent serves.
    let seconds = duration.as_secs().max(900);
    let issued_at = Timestamp::now();
    let creds = aws::assume_role_with_web_identity(
        ctx.http,
        &endpoint,
        &spec.role_arn,
        &session_name(&spec.session_name, req),
        seconds,
        &token,
    )
    .await?;
    Ok(Issued {
        credential: Credential::Aws {
            access_key_id: creds.access_key_id,
            secret_access_key: SecretString::new(creds.secret_access_key),
            session_token: SecretString::new(creds.session_token),
            account_id: creds.account_id,
        },
        issued_at,
        expires_at: bounded(req, issued_at, creds.expiration),
    })
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
    let assertion = sign(ctx, req, &subject_of(spec.subject, req), audience, ASSERTION_LIFETIME)?;
    let authority = spec.authority_host.as_deref().unwrap_or("https://login.microsoftonline.com").trim_end_matches('/');
    let url = format!("{authority}/{}/oauth2/v2.0/token", spec.tenant_id);
    let scope = format!("{}/.default", resource.trim_end_matches('/'));
    let issued_at = Timestamp::now();
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
    let access_token = string_field(&answer, "access_token", "Entra ID")?;
    let lifetime = expires_in(&answer).ok_or_else(|| Refusal::upstream("Entra ID answer has no expires_in", None))?;
    Ok(Issued {
        credential: Credential::AccessToken {
            access_token: SecretString::new(access_token),
            token_type: answer.get("token_type").and_then(Value::as_str).unwrap_or("Bearer").to_owned(),
            resource: Some(resource.to_owned()),
            client_id: Some(spec.client_id.clone()),
            service_account_email: None,
            project_id: None,
        },
        issued_at,
        expires_at: bounded(req, issued_at, issued_at + SignedDuration::from_secs(lifetime)),
    })
}

async fn gcp(
    ctx: &MintContext<'_>,
    req: &MintRequest<'_>,
    spec: &GcpWorkloadIdentityCredential,
) -> Result<Issued, Refusal> {
    let provider = &spec.workload_identity_provider;
    let default_audience = format!("https://iam.googleapis.com/{provider}");
    let audience = spec.audience.as_deref().unwrap_or(&default_audience);
    let subject_token = sign(ctx, req, &subject_of(spec.subject, req), audience, ASSERTION_LIFETIME)?;
    let sts = spec.sts_endpoint.as_deref().unwrap_or("https://sts.googleapis.com").trim_end_matches('/');
    let scopes: Vec<String> = if req.policy.server.scopes.is_empty() {
        vec![CLOUD_PLATFORM.into()]
    } else {
        req.policy.server.scopes.clone()
    };
    // With impersonation the federated token only needs to call IAM Credentials.
    let sts_scope = if spec.service_account_email.is_some() { CLOUD_PLATFORM.to_owned() } else { scopes.join(" ") };
    let issued_at = Timestamp::now();
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
    let federated = string_field(&answer, "access_token", "Google STS")?;
    let (token, expires_at) = match &spec.service_account_email {
        None => {
            let lifetime =
                expires_in(&answer).ok_or_else(|| Refusal::upstream("Google STS answer has no expires_in", None))?;
            (federated, issued_at + SignedDuration::from_secs(lifetime))
        }
        Some(email) => {
            let iam = spec
                .iam_credentials_endpoint
                .as_deref()
                .unwrap_or("https://iamcredentials.googleapis.com")
                .trim_end_matches('/');
            let url = format!("{iam}/v1/projects/-/serviceAccounts/{email}:generateAccessToken");
            let mut lifetime = spec.token_lifetime.as_std();
            if let Some(max) = req.max_lifetime {
                lifetime = lifetime.min(max);
            }
            let builder = ctx
                .http
                .post(&url)
                .map_err(Refusal::denied)?
                .bearer_auth(&federated)
                .json(&json!({"scope": scopes, "lifetime": format!("{}s", lifetime.as_secs())}));
            let answer = send_json(builder, &url, "Google IAM Credentials").await?;
            let token = string_field(&answer, "accessToken", "Google IAM Credentials")?;
            let expire = string_field(&answer, "expireTime", "Google IAM Credentials")?;
            let expire: Timestamp = expire.parse().map_err(|e| {
                Refusal::upstream(format!("Google IAM Credentials answer has an invalid expireTime: {e}"), None)
            })?;
            (token, expire)
        }
    };
    Ok(Issued {
        credential: Credential::AccessToken {
            access_token: SecretString::new(token),
            token_type: "Bearer".into(),
            resource: None,
            client_id: None,
            service_account_email: spec.service_account_email.clone(),
            project_id: spec.project_id.clone(),
        },
        issued_at,
        expires_at: bounded(req, issued_at, expires_at),
    })
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
    let answer = post_form(ctx.http, &spec.token_url, &form, basic, "the OAuth2 token endpoint").await?;
    let token = string_field(&answer, "access_token", "the OAuth2 token endpoint")?;
    // RFC 6749 makes expires_in optional; assume an hour, re-asked well before.
    let lifetime = expires_in(&answer).unwrap_or(3600);
    Ok(Issued {
        credential: Credential::AccessToken {
            access_token: SecretString::new(token),
            token_type: answer.get("token_type").and_then(Value::as_str).unwrap_or("Bearer").to_owned(),
            resource: None,
            client_id: Some(spec.client_id.clone()),
            service_account_email: None,
            project_id: None,
        },
        issued_at,
        expires_at: bounded(req, issued_at, issued_at + SignedDuration::from_secs(lifetime)),
    })
}

/// Obtains the credential of one request from its provider.
pub async fn obtain(ctx: &MintContext<'_>, req: &MintRequest<'_>) -> Result<Issued, Refusal> {
    let spec = req.spec;
    let static_until = |now: Timestamp| {
        bounded(req, now, now + SignedDuration::try_from(SECRET_CREDENTIAL_LIFETIME).unwrap_or_default())
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
        let mut lifetime = o.lifetime.as_std();
        if let Some(max) = req.max_lifetime {
            lifetime = lifetime.min(max);
        }
        let issued_at = Timestamp::now();
        let token = sign(ctx, req, &subject_of(o.subject, req), &o.audience, lifetime)?;
        Ok(Issued {
            credential: Credential::Jwt { token: SecretString::new(token) },
            issued_at,
            expires_at: issued_at + SignedDuration::from_secs(lifetime.as_secs() as i64),
        })
    } else if let Some(k) = &spec.api_key {
        let key = secret_value(ctx, &req.caller.namespace, &k.secret_ref.name, &k.secret_ref.key).await?;
        let now = Timestamp::now();
        Ok(Issued {
            credential: Credential::ApiKey { key: SecretString::new(key) },
            issued_at: now,
            expires_at: static_until(now),
        })
    } else if let Some(u) = &spec.username_password {
        let r = &u.secret_ref;
        let username = secret_value(ctx, &req.caller.namespace, &r.name, &r.username_key).await?;
        let password = secret_value(ctx, &req.caller.namespace, &r.name, &r.password_key).await?;
        let now = Timestamp::now();
        Ok(Issued {
            credential: Credential::UsernamePassword { username, password: SecretString::new(password) },
            issued_at: now,
            expires_at: static_until(now),
        })
    } else {
        Err(Refusal::bad_request("the credential provider sets no kind"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::broker::authn::Origin;

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

    #[test]
    fn session_names_are_rendered_and_sanitised() {
        let spec: CredentialProviderSpec =
            serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap();
        let p = policy();
        let c = caller(Some("orders-7d9f/x"));
        let req = MintRequest { provider: "s3", spec: &spec, policy: &p, caller: &c, max_lifetime: None };
        assert_eq!(session_name("cloudpass-{namespace}-{pod}", &req), "cloudpass-team-a-orders-7d9f-x");
        assert_eq!(session_name(&"{policy}".repeat(20), &req).len(), 64);
        assert_eq!(cache_discriminator(&spec, &p, &c), "/cloudpass-team-a-orders-7d9f-x");
        let other_pod = caller(Some("orders-2"));
        assert_ne!(cache_discriminator(&spec, &p, &c), cache_discriminator(&spec, &p, &other_pod));
    }

    #[test]
    fn max_lifetime_bounds_expiry() {
        let spec: CredentialProviderSpec =
            serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap();
        let (p, c) = (policy(), caller(None));
        let req = MintRequest {
            provider: "k",
            spec: &spec,
            policy: &p,
            caller: &c,
            max_lifetime: Some(Duration::from_secs(300)),
        };
        let now = Timestamp::now();
        let bound = bounded(&req, now, now + SignedDuration::from_secs(3600));
        assert_eq!(bound.as_second() - now.as_second(), 300);
    }

    #[test]
    fn expires_in_number_or_string() {
        assert_eq!(expires_in(&json!({"expires_in": 3599})), Some(3599));
        assert_eq!(expires_in(&json!({"expires_in": "3599"})), Some(3599));
        assert_eq!(expires_in(&json!({"expires_in": "soon"})), None);
    }
}
