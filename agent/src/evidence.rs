//! Cloud evidence: proof of who the pod is in the cloud it runs in, for trust providers
//! that need more than its service-account token. Gathered fresh before every credential
//! request, from the same places the clouds' own SDKs look:
//!
//! - `awsGetCallerIdentity`: the pod's AWS credentials, from (in the SDKs' order) the
//!   `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` variables, the
//!   container-credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`, as EKS Pod
//!   Identity sets it), or the instance role through IMDSv2; then a `GetCallerIdentity`
//!   request signed with them (SigV4) and handed to the broker, which sends it to STS.
//!   The credentials themselves never leave the pod. The signed headers include
//!   `x-cloudpass-server-id` naming the broker it is meant for (as Vault's AWS auth
//!   method's server-ID header), so that a request captured on the way cannot be replayed
//!   to another broker.
//! - `azureManagedIdentity`: a token from the Azure Instance Metadata Service
//!   (`Metadata: true`) for the trust provider's audience (and its client ID, when it
//!   names exactly one).
//! - `gcpIdentityToken`: an identity token from the GKE or Compute Engine metadata server
//!   (`Metadata-Flavor: Google`, `format=full`) for the trust provider's audience.
//!
//! The metadata services are plain HTTP on a link-local address by design; requests to
//! them carry no secret of the agent's, follow no redirect and use no proxy.

use std::{
    collections::BTreeMap,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use aws_sigv4::http_request::SignableBody;
use axum::http::{HeaderMap, HeaderValue, header};
use cloudpass_api::{
    agent::EvidenceSource,
    broker::{Evidence, SERVER_ID_HEADER, SignedRequest},
    secret::SecretString,
};
use reqwest::{Method, redirect::Policy};
use serde::Deserialize;

use cloudpass_outbound::{BodyError, chain, read_limited};

use crate::{
    error::AgentError,
    settings::{AwsSource, EvidenceSettings},
};

/// Largest metadata answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The body of the one request the broker accepts as AWS evidence.
const GET_CALLER_IDENTITY: &str = "Action=GetCallerIdentity&Version=2011-06-15";

impl AwsSource {
    fn region(&self) -> &str {
        self.region.as_deref().unwrap_or("us-east-1")
    }

    /// The STS URL the request is signed for and sent to.
    fn sts_url(&self) -> String {
        match &self.sts_endpoint {
            Some(url) => format!("{}/", url.trim_end_matches('/')),
            None => {
                let region = self.region();
                let domain = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
                format!("https://sts.{region}.{domain}/")
            }
        }
    }
}

/// The default server ID of the broker at `url`: its host, without the port, which is
/// what the broker accepts by default (the host of its issuer URL and its Service's
/// name). `None` when `url` has no host.
pub fn server_id_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    url.host_str().map(str::to_owned)
}

/// AWS credentials as the container-credentials endpoint and IMDS return them.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsCredentials {
    access_key_id: String,
    secret_access_key: SecretString,
    #[serde(default)]
    token: Option<SecretString>,
}

/// Azure IMDS's token answer (only what is used).
#[derive(Deserialize)]
struct ImdsToken {
    access_token: SecretString,
}

/// `url` with `query`, encoded.
fn with_query(source: &EvidenceSource, url: &str, query: &[(&str, &str)]) -> Result<reqwest::Url, AgentError> {
    reqwest::Url::parse_with_params(url, query).map_err(|e| failed(source, format!("metadata URL {url:?}: {e}")))
}

/// Gathers evidence for the deliveries of one agent.
pub struct EvidenceGatherer {
    /// Built on first use: most agents gather no evidence and need no second client.
    http: OnceLock<reqwest::Client>,
    timeout: Duration,
    settings: EvidenceSettings,
}

fn failed(source: &EvidenceSource, message: impl Into<String>) -> AgentError {
    AgentError::Evidence { trust_provider: source.trust_provider().to_owned(), message: message.into() }
}

impl EvidenceGatherer {
    /// A gatherer whose every request is bounded by `timeout`.
    pub fn new(settings: EvidenceSettings, timeout: Duration) -> Self {
        Self { http: OnceLock::new(), timeout, settings }
    }

    fn http(&self) -> Result<&reqwest::Client, AgentError> {
        if let Some(http) = self.http.get() {
            return Ok(http);
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(Policy::none())
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .user_agent(concat!("cloudpass-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AgentError::Config(format!("evidence client: {e}")))?;
        Ok(self.http.get_or_init(|| http))
    }

    /// The evidence for `sources` (empty when there are none).
    pub async fn gather(&self, sources: &[EvidenceSource]) -> Result<Evidence, AgentError> {
        let mut evidence = Evidence::default();
        for source in sources {
            match source {
                EvidenceSource::AwsGetCallerIdentity { .. } => {
                    if evidence.aws_get_caller_identity.is_none() {
                        evidence.aws_get_caller_identity = Some(self.aws(source).await?);
                    }
                }
                EvidenceSource::AzureManagedIdentity { trust_provider, resource, client_id } => {
                    let url = format!(
                        "{}/metadata/identity/oauth2/token",
                        self.settings.azure_imds_url.trim_end_matches('/')
                    );
                    let mut query = vec![("api-version", "2018-02-01"), ("resource", resource.as_str())];
                    query.extend(client_id.as_deref().map(|id| ("client_id", id)));
                    let request = self.http()?.get(with_query(source, &url, &query)?).header("Metadata", "true");
                    let body = self.send(source, request).await?;
                    let token: ImdsToken = serde_json::from_slice(&body)
                        .map_err(|e| failed(source, format!("Azure IMDS answer not understood: {e}")))?;
                    evidence.tokens.insert(trust_provider.clone(), token.access_token);
                }
                EvidenceSource::GcpIdentityToken { trust_provider, audience } => {
                    let url = format!(
                        "{}/computeMetadata/v1/instance/service-accounts/default/identity",
                        self.settings.gcp_metadata_url.trim_end_matches('/')
                    );
                    let query = [("audience", audience.as_str()), ("format", "full")];
                    let request =
                        self.http()?.get(with_query(source, &url, &query)?).header("Metadata-Flavor", "Google");
                    let body = self.send(source, request).await?;
                    let token = String::from_utf8(body)
                        .ok()
                        .map(|t| t.trim().to_owned())
                        .filter(|t| t.split('.').count() == 3)
                        .ok_or_else(|| failed(source, "the metadata server's answer is not a JWT"))?;
                    evidence.tokens.insert(trust_provider.clone(), SecretString::new(token));
                }
            }
        }
        Ok(evidence)
    }

    /// Sends `request`, returning the body of a 200 answer; errors name the status only
    /// (a metadata error body may echo a token).
    async fn send(&self, source: &EvidenceSource, request: reqwest::RequestBuilder) -> Result<Vec<u8>, AgentError> {
        let response =
            request.send().await.map_err(|e| failed(source, format!("metadata service unreachable: {}", chain(&e))))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(source, format!("metadata service answered HTTP {status}")));
        }
        read_limited(response, MAX_ANSWER_BYTES).await.map_err(|e| match e {
            BodyError::Read(why) => failed(source, why),
            BodyError::TooLarge(limit) => failed(source, format!("metadata answer larger than {limit} bytes")),
        })
    }

    /// The pod's AWS credentials, in the SDKs' order.
    async fn aws_credentials(&self, source: &EvidenceSource) -> Result<AwsCredentials, AgentError> {
        let aws = &self.settings.aws;
        if let Some((id, secret, token)) = &aws.static_keys {
            return Ok(AwsCredentials {
                access_key_id: id.clone(),
                secret_access_key: secret.clone(),
                token: token.clone(),
            });
        }
        let request = if let Some(uri) = &aws.container_credentials_uri {
            let token = match (&aws.container_authorization_token_file, &aws.container_authorization_token) {
                (Some(path), _) => Some(SecretString::new(
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| failed(source, format!("{}: {e}", path.display())))?
                        .trim(),
                )),
                (None, token) => token.clone(),
            };
            let request = self.http()?.get(uri);
            match token {
                Some(token) => request.header(reqwest::header::AUTHORIZATION, token.expose()),
                None => request,
            }
        } else {
            // IMDSv2: a session token first, then the role's credentials.
            let base = format!("{}/latest", self.settings.aws_imds_url.trim_end_matches('/'));
            let http = self.http()?;
            let put = http
                .request(Method::PUT, format!("{base}/api/token"))
                .header("X-aws-ec2-metadata-token-ttl-seconds", "60");
            let session = SecretString::new(
                String::from_utf8(self.send(source, put).await?)
                    .map_err(|_| failed(source, "IMDS session token is not text"))?,
            );
            let roles_url = format!("{base}/meta-data/iam/security-credentials/");
            let get = |url: String| http.get(url).header("X-aws-ec2-metadata-token", session.expose());
            let roles = String::from_utf8(self.send(source, get(roles_url.clone())).await?).unwrap_or_default();
            let role = roles
                .lines()
                .map(str::trim)
                .find(|r| !r.is_empty())
                .ok_or_else(|| failed(source, "the instance has no IAM role"))?
                .to_owned();
            get(format!("{roles_url}{role}"))
        };
        let body = self.send(source, request).await?;
        serde_json::from_slice(&body).map_err(|e| failed(source, format!("AWS credentials answer not understood: {e}")))
    }

    /// A `GetCallerIdentity` request signed with the pod's AWS credentials.
    async fn aws(&self, source: &EvidenceSource) -> Result<SignedRequest, AgentError> {
        let credentials = self.aws_credentials(source).await?;
        let aws = &self.settings.aws;
        let url = aws.sts_url();
        let mut headers = HeaderMap::new();
        headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"));
        let host = reqwest::Url::parse(&url)
            .ok()
            .and_then(|u| u.host_str().map(|h| u.port().map(|p| format!("{h}:{p}")).unwrap_or_else(|| h.to_owned())))
            .ok_or_else(|| failed(source, format!("STS endpoint {url:?} is not a URL")))?;
        headers.insert(header::HOST, HeaderValue::from_str(&host).map_err(|e| failed(source, e.to_string()))?);
        // Signed like every header here: the broker checks it names itself.
        let server_id = self
            .settings
            .server_id
            .as_deref()
            .ok_or_else(|| failed(source, "no broker server ID to sign into the request"))?;
        headers.insert(
            SERVER_ID_HEADER,
            HeaderValue::from_str(server_id)
                .map_err(|_| failed(source, format!("broker server ID {server_id:?} is not a header value")))?,
        );
        cloudpass_outbound::sigv4::sign_v4(
            "POST",
            &url,
            &mut headers,
            SignableBody::Bytes(GET_CALLER_IDENTITY.as_bytes()),
            &credentials.access_key_id,
            credentials.secret_access_key.expose(),
            credentials.token.as_ref().map(|t| t.expose()),
            "sts",
            aws.region(),
            SystemTime::now(),
        )
        .map_err(|e| AgentError::Signing(e.to_string()))?;
        let headers: BTreeMap<String, SecretString> = headers
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), SecretString::new(v))))
            .collect();
        Ok(SignedRequest { method: "POST".into(), url, headers, body: GET_CALLER_IDENTITY.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_url_is_regional_or_the_configured_endpoint() {
        let mut aws = AwsSource::default();
        assert_eq!(aws.sts_url(), "https://sts.us-east-1.amazonaws.com/");
        aws.region = Some("cn-north-1".into());
        assert_eq!(aws.sts_url(), "https://sts.cn-north-1.amazonaws.com.cn/");
        aws.sts_endpoint = Some("https://sts-fips.us-east-1.amazonaws.com".into());
        assert_eq!(aws.sts_url(), "https://sts-fips.us-east-1.amazonaws.com/");
    }

    #[test]
    fn the_default_server_id_is_the_brokers_host() {
        assert_eq!(
            server_id_of("https://broker.cloudpass-system.svc:8443").as_deref(),
            Some("broker.cloudpass-system.svc"),
            "the name the broker accepts by default"
        );
        assert_eq!(server_id_of("https://broker.example.com/").as_deref(), Some("broker.example.com"));
        assert_eq!(server_id_of("https://[::1]:9443").as_deref(), Some("[::1]"));
        assert_eq!(server_id_of("not a url"), None);
    }

    #[tokio::test]
    async fn without_a_server_id_no_evidence_is_signed() {
        let settings = EvidenceSettings {
            aws: AwsSource {
                static_keys: Some(("AKIDEXAMPLE".into(), SecretString::new("wJalr-secret"), None)),
                ..Default::default()
            },
            ..Default::default()
        };
        let gatherer = EvidenceGatherer::new(settings, Duration::from_secs(1));
        let source = EvidenceSource::AwsGetCallerIdentity { trust_provider: "aws".into() };
        let err = gatherer.gather(&[source]).await.unwrap_err().to_string();
        assert!(err.contains("no broker server ID"), "{err}");
    }

    #[tokio::test]
    async fn static_keys_sign_exactly_get_caller_identity_without_revealing_the_secret() {
        let settings = EvidenceSettings {
            aws: AwsSource {
                static_keys: Some(("AKIDEXAMPLE".into(), SecretString::new("wJalr-secret"), None)),
                region: Some("eu-west-1".into()),
                ..Default::default()
            },
            server_id: Some("broker.cloudpass-system.svc:8443".into()),
            ..Default::default()
        };
        let gatherer = EvidenceGatherer::new(settings, Duration::from_secs(1));
        let source = EvidenceSource::AwsGetCallerIdentity { trust_provider: "aws".into() };
        let evidence = gatherer.gather(&[source.clone(), source]).await.unwrap();
        let signed = evidence.aws_get_caller_identity.unwrap();
        assert_eq!(signed.url, "https://sts.eu-west-1.amazonaws.com/");
        assert_eq!(signed.body, GET_CALLER_IDENTITY);
        let auth = signed.headers["authorization"].expose();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{auth}");
        assert!(auth.contains("/eu-west-1/sts/aws4_request"), "{auth}");
        // The broker's server ID is sent and covered by the signature.
        assert_eq!(signed.headers[SERVER_ID_HEADER].expose(), "broker.cloudpass-system.svc:8443");
        let signed_headers = auth.split("SignedHeaders=").nth(1).unwrap().split(',').next().unwrap();
        assert!(signed_headers.split(';').any(|h| h == SERVER_ID_HEADER), "{auth}");
        let json = serde_json::to_string(&signed).unwrap();
        assert!(!json.contains("wJalr-secret"), "the secret key never leaves the pod");
    }
}
