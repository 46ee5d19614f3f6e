//! The secret-store kinds: the referenced provider's federated credential (obtained as
//! for the caller, so the store's access policy sees the workload's subject), then one
//! read of the secret. The value is handed out as an API key and never logged; what the
//! audit record gets is the secret's name and version.

use std::time::SystemTime;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use cloudpass_api::{
    broker::Credential,
    credential::CredentialProviderSpec,
    secret::SecretString,
    secret_store::{AwsSecretsManagerSecret, AzureKeyVaultSecret, GcpSecretManagerSecret, Store, extract},
};
use jiff::{SignedDuration, Timestamp};
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::{CLOUD_PLATFORM, MintContext, MintRequest, aws_sts, azure, expiry, finish, gcp, lifetime_for, send_json};
use crate::{Refusal, cache::Issued};

/// The resource of Key Vault tokens (`https://vault.azure.net/.default`).
pub const KEY_VAULT_RESOURCE: &str = "https://vault.azure.net";
/// The Key Vault REST API version.
const KEY_VAULT_API_VERSION: &str = "7.4";

/// A secret as read: its text and the version the store says it is.
struct Read {
    value: SecretString,
    version: String,
}

fn wrong_kind(store: Store<'_>, name: &str, spec: &CredentialProviderSpec) -> Refusal {
    Refusal::denied(format!(
        "CredentialProvider {name} is {}, but reading {} needs {}",
        spec.kind_name().unwrap_or("of no kind"),
        store.describe(),
        store.federated_kind()
    ))
}

fn text(bytes: Vec<u8>, service: &str) -> Result<SecretString, Refusal> {
    String::from_utf8(bytes)
        .map(SecretString::new)
        .map_err(|_| Refusal::upstream(format!("{service}: the secret is not UTF-8 text"), None))
}

fn field<'a>(answer: &'a Value, name: &str, service: &str) -> Result<&'a str, Refusal> {
    answer
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::upstream(format!("{service} answer has no {name}"), None))
}

/// Reads the secret of a store kind for the request's caller.
pub(super) async fn read(ctx: &MintContext<'_>, req: &MintRequest<'_>, store: Store<'_>) -> Result<Issued, Refusal> {
    let settings = store.read();
    let (name, spec) = req.reads_with.ok_or_else(|| {
        Refusal::unavailable(format!(
            "CredentialProvider {} that reads {} is not Ready",
            settings.credential_provider_ref.name,
            store.describe()
        ))
    })?;
    // The federated credential is the caller's (its claims), whatever the outer policy's
    // lifetime bounds: those apply to the secret as served.
    let federated =
        MintRequest { provider: name, spec, reads_with: None, max_lifetime: None, access_ends: None, ..*req };
    let read = match store {
        Store::Aws(secret) => {
            let sts = spec.aws_sts.as_ref().ok_or_else(|| wrong_kind(store, name, spec))?;
            let issued = aws_sts(ctx, &federated, sts).await?;
            let region = secret.region.as_deref().unwrap_or(&sts.region);
            aws_secret(ctx, secret, region, &issued.credential).await?
        }
        Store::Azure(secret) => {
            let entra = spec.azure_workload_identity.as_ref().ok_or_else(|| wrong_kind(store, name, spec))?;
            let issued = azure(ctx, &federated, entra, KEY_VAULT_RESOURCE).await?;
            key_vault_secret(ctx, secret, &issued.credential).await?
        }
        Store::Gcp(secret) => {
            let google = spec.gcp_workload_identity.as_ref().ok_or_else(|| wrong_kind(store, name, spec))?;
            let issued = gcp(ctx, &federated, google, vec![CLOUD_PLATFORM.to_owned()]).await?;
            secret_manager_secret(ctx, secret, &issued.credential).await?
        }
    };
    let key = extract(read.value.expose(), settings.json_key.as_deref())
        .map_err(|why| Refusal::upstream(format!("{} version {}: {why}", store.describe(), read.version), None))?;
    let now = Timestamp::now();
    let lifetime = lifetime_for(req, settings.refresh_interval.as_std(), now, std::time::Duration::from_secs(1));
    let until = expiry(now, SignedDuration::try_from(lifetime).unwrap_or(SignedDuration::ZERO), "the broker")?;
    let until = req.access_ends.map_or(until, |end| until.min(end));
    let mut issued = finish(req, Credential::ApiKey { key: SecretString::new(key) }, now, until);
    issued.source = Some(format!("{} version {}", store.describe(), read.version));
    Ok(issued)
}

fn bearer(credential: &Credential) -> Result<&str, Refusal> {
    match credential {
        Credential::AccessToken { access_token, .. } => Ok(access_token.expose()),
        _ => Err(Refusal::unavailable("the federated credential is not an access token")),
    }
}

/// `secretsmanager:GetSecretValue`, signed with the federated AWS credentials.
async fn aws_secret(
    ctx: &MintContext<'_>,
    secret: &AwsSecretsManagerSecret,
    region: &str,
    credential: &Credential,
) -> Result<Read, Refusal> {
    let service = "AWS Secrets Manager";
    let Credential::Aws { access_key_id, secret_access_key, session_token, .. } = credential else {
        return Err(Refusal::unavailable("the federated credential is not AWS credentials"));
    };
    let url = secret.endpoint.clone().unwrap_or_else(|| format!("https://secretsmanager.{region}.amazonaws.com/"));
    let host = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| {
            Some(match u.port() {
                Some(port) => format!("{}:{port}", u.host_str()?),
                None => u.host_str()?.to_owned(),
            })
        })
        .ok_or_else(|| Refusal::denied(format!("{url} is not a URL with a host")))?;
    let mut body = json!({"SecretId": secret.secret_id});
    match (&secret.version_id, &secret.version_stage) {
        (Some(id), _) => body["VersionId"] = json!(id),
        (None, Some(stage)) => body["VersionStage"] = json!(stage),
        (None, None) => {}
    }
    let body = body.to_string();
    let mut headers = HeaderMap::new();
    let value = |v: &str| HeaderValue::from_str(v).map_err(|_| Refusal::denied(format!("{v:?} is not a header value")));
    headers.insert("host", value(&host)?);
    headers.insert("content-type", HeaderValue::from_static("application/x-amz-json-1.1"));
    headers.insert("x-amz-target", HeaderValue::from_static("secretsmanager.GetSecretValue"));
    cloudpass_outbound::sigv4::sign_v4(
        "POST",
        &url,
        &mut headers,
        aws_sigv4::http_request::SignableBody::Bytes(body.as_bytes()),
        access_key_id,
        secret_access_key.expose(),
        Some(session_token.expose()),
        "secretsmanager",
        region,
        SystemTime::now(),
    )
    .map_err(|e| Refusal::unavailable(e.to_string()))?;
    headers.remove("host");
    let builder = ctx.http.post(&url).map_err(|e| Refusal::denied(e.to_string()))?.headers(headers).body(body);
    let answer = send_json(builder, &url, service).await?;
    let version = field(&answer, "VersionId", service)?.to_owned();
    let value = match (
        answer.get("SecretString").and_then(Value::as_str),
        answer.get("SecretBinary").and_then(Value::as_str),
    ) {
        (Some(text), _) => SecretString::new(text),
        (None, Some(binary)) => text(
            B64.decode(binary)
                .map_err(|_| Refusal::upstream(format!("{service}: SecretBinary is not base64"), None))?,
            service,
        )?,
        (None, None) => return Err(Refusal::upstream(format!("{service} answer has no SecretString"), None)),
    };
    Ok(Read { value, version })
}

/// `GET {vault}/secrets/{name}/{version}`, with an Entra token for Key Vault.
async fn key_vault_secret(
    ctx: &MintContext<'_>,
    secret: &AzureKeyVaultSecret,
    credential: &Credential,
) -> Result<Read, Refusal> {
    let service = "Azure Key Vault";
    let url = format!(
        "{}/secrets/{}/{}?api-version={KEY_VAULT_API_VERSION}",
        secret.vault_url.trim_end_matches('/'),
        secret.name,
        secret.version.as_deref().unwrap_or_default()
    );
    let builder = ctx.http.get(&url).map_err(|e| Refusal::denied(e.to_string()))?.bearer_auth(bearer(credential)?);
    let answer = send_json(builder, &url, service).await?;
    let value = SecretString::new(field(&answer, "value", service)?);
    // `id` is `{vault}/secrets/{name}/{version}`.
    let version = field(&answer, "id", service)?.rsplit('/').next().unwrap_or_default().to_owned();
    Ok(Read { value, version })
}

/// `GET {endpoint}/v1/{secret}/versions/{version}:access`, with a Google token.
async fn secret_manager_secret(
    ctx: &MintContext<'_>,
    secret: &GcpSecretManagerSecret,
    credential: &Credential,
) -> Result<Read, Refusal> {
    let service = "Google Secret Manager";
    let base = secret.endpoint.as_deref().unwrap_or("https://secretmanager.googleapis.com").trim_end_matches('/');
    let url = format!("{base}/v1/{}/versions/{}:access", secret.secret, secret.version);
    let builder = ctx.http.get(&url).map_err(|e| Refusal::denied(e.to_string()))?.bearer_auth(bearer(credential)?);
    let answer = send_json(builder, &url, service).await?;
    // `name` is `projects/<number>/secrets/<secret>/versions/<n>`.
    let version = field(&answer, "name", service)?.rsplit('/').next().unwrap_or_default().to_owned();
    let data = answer
        .get("payload")
        .and_then(|p| p.get("data"))
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::upstream(format!("{service} answer has no payload.data"), None))?;
    let bytes =
        B64.decode(data).map_err(|_| Refusal::upstream(format!("{service}: payload.data is not base64"), None))?;
    Ok(Read { value: text(bytes, service)?, version })
}
