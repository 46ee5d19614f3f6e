//! The agent's own settings: how it reaches the broker, where cloud evidence comes from,
//! retry delays, the shared directory and the proofs, together with the webhook's
//! configuration document ([`AgentConfig`]) they serve, checked once at start so that an
//! unservable combination stops the agent with the reason.
//!
//! The binary builds them from its command line and environment ([`Args`], in `args`);
//! tests build [`Settings`] directly. The flags other than the configuration have
//! production defaults and exist so that tests (and operators debugging) can point the
//! agent elsewhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use axum::http::HeaderName;
use cloudpass_api::{
    agent::{AWS_TOKEN_FILE, AgentConfig, AgentDelivery, AgentEndpoint, BROKER_CA_ENV, SERVER_CA_DIR},
    secret::SecretString,
};

mod args;

pub use args::{Args, Command, RunArgs};

use crate::{
    endpoint::{EndpointKind, listener, normalize_resource},
    error::AgentError,
};

/// The link-local address of every cloud's metadata service.
pub const LINK_LOCAL_METADATA: &str = "http://169.254.169.254";

/// How the agent's broker client reaches the broker: where, trusting what, with which
/// token, how long it waits, and where it gathers the cloud evidence it presents.
#[derive(Clone, Debug)]
pub struct BrokerClientSettings {
    /// Base URL (`https://...`), the configuration's `brokerUrl`.
    pub url: String,
    /// The broker's CA certificate(s): the only trust anchors for it unless
    /// `trust_system_roots`.
    pub ca: Option<BrokerCa>,
    /// Also trust the system's root CAs (a broker with a publicly trusted certificate).
    pub trust_system_roots: bool,
    /// The projected service-account token presented as bearer, re-read for every
    /// request.
    pub token_file: PathBuf,
    /// Time limit of one broker request, and of each metadata request for evidence.
    pub timeout: Duration,
    /// Where cloud evidence comes from.
    pub evidence: EvidenceSettings,
}

/// Where the agent's trust in the broker comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerCa {
    /// PEM given at start ([`BROKER_CA_ENV`]).
    Pem(String),
    /// A PEM file, read again before each broker call: the namespace's copy of the
    /// broker's CA, projected by the kubelet, which replaces it when the CA rotates.
    File(PathBuf),
}

/// Where the agent looks for cloud evidence: the metadata services and the pod's AWS
/// credentials, and the broker name signed into AWS evidence.
#[derive(Clone, Debug)]
pub struct EvidenceSettings {
    /// Base URL of the Azure Instance Metadata Service.
    pub azure_imds_url: String,
    /// Base URL of the GCP metadata server.
    pub gcp_metadata_url: String,
    /// Base URL of the AWS instance metadata service (IMDSv2).
    pub aws_imds_url: String,
    /// Where the pod's AWS credentials come from, for signing `GetCallerIdentity`.
    pub aws: AwsSource,
    /// The broker's server ID, signed into the AWS evidence as `x-cloudpass-server-id`.
    /// `None`: the broker client fills in the host of the broker URL, without the port.
    pub server_id: Option<String>,
}

impl Default for EvidenceSettings {
    fn default() -> Self {
        Self {
            azure_imds_url: LINK_LOCAL_METADATA.into(),
            gcp_metadata_url: LINK_LOCAL_METADATA.into(),
            aws_imds_url: LINK_LOCAL_METADATA.into(),
            aws: AwsSource::default(),
            server_id: None,
        }
    }
}

/// Where the pod's AWS credentials come from, read from the standard AWS variables.
#[derive(Clone, Debug, Default)]
pub struct AwsSource {
    /// Keys from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`,
    /// used first when the first two are set.
    pub static_keys: Option<(String, SecretString, Option<SecretString>)>,
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`: the container-credentials endpoint (EKS Pod
    /// Identity), used when there are no static keys.
    pub container_credentials_uri: Option<String>,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, read at every use (it is rotated).
    pub container_authorization_token_file: Option<PathBuf>,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN`: the token for that endpoint, when no token
    /// file is named.
    pub container_authorization_token: Option<SecretString>,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`; `us-east-1` when unset.
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL_STS` or `AWS_ENDPOINT_URL`: the STS endpoint the request is
    /// signed for (default: the regional endpoint).
    pub sts_endpoint: Option<String>,
}

impl AwsSource {
    /// The source described by this process's environment.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let static_keys = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => {
                Some((id, SecretString::new(secret), var("AWS_SESSION_TOKEN").map(SecretString::new)))
            }
            _ => None,
        };
        Self {
            static_keys,
            container_credentials_uri: var("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            container_authorization_token_file: var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
            container_authorization_token: var("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(SecretString::new),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            sts_endpoint: var("AWS_ENDPOINT_URL_STS").or_else(|| var("AWS_ENDPOINT_URL")),
        }
    }
}

/// Retry delays after failed fetches: `initial`, doubled per failure up to `max`, with
/// jitter (`cloudpass_outbound::Retry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetrySettings {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay, however many failures.
    pub max: Duration,
}

/// Everything the agent needs to run, checked. Built from [`RunArgs`] by the binary, or
/// directly by tests.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The webhook's configuration document: broker URL, health port, deliveries.
    pub config: AgentConfig,
    /// How to reach the broker and gather evidence for it.
    pub broker: BrokerClientSettings,
    /// Directory shared read-only with the app containers, where the AWS authorization
    /// token file is written.
    pub shared_dir: PathBuf,
    /// The proof Azure SDKs send as `X-IDENTITY-HEADER` (`IDENTITY_HEADER`); required
    /// with an Azure delivery.
    pub identity_header: Option<SecretString>,
    /// Extra CA bundle (PEM) trusted for proxied upstreams besides the system roots.
    pub upstream_ca_pem: Option<Vec<u8>>,
    /// Delays between retries of failed fetches.
    pub retry: RetrySettings,
    /// Largest request body the SigV4 proxy buffers to sign (not S3, whose bodies
    /// stream unsigned); larger ones are refused with 413.
    pub sigv4_max_body_bytes: usize,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Where the server CA bundles the webhook mounts are (`<dir>/<policy>/ca.crt`):
    /// a delivery's `caFile` under [`SERVER_CA_DIR`] is read from here.
    pub server_ca_dir: PathBuf,
    /// How often an agent whose deliveries come from the broker asks it again, so that
    /// a changed AccessPolicy reaches the running pod.
    pub config_refresh: Duration,
}

impl Settings {
    /// Moves each delivery's `caFile` under [`SERVER_CA_DIR`] to [`Settings::server_ca_dir`]
    /// (the same place in a pod; elsewhere in tests that run the agent outside one).
    pub fn locate_server_cas(&mut self) {
        locate_server_cas(&mut self.config.deliveries, &self.server_ca_dir);
    }

    /// Checks what the types cannot: the webhook's config must be servable as a whole.
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |m: String| Err(AgentError::Config(m));
        let config = &self.config;
        if !config.broker_url.starts_with("https://") {
            return bad(format!(
                "brokerUrl {:?} must be https:// (the agent sends its token there)",
                config.broker_url
            ));
        }
        if self.broker.ca.is_none() && !self.broker.trust_system_roots {
            return bad(format!(
                "no broker CA: mount it at --broker-ca-file, or set {BROKER_CA_ENV} or --broker-trust-system-roots"
            ));
        }
        if let Some(id) = &self.broker.evidence.server_id
            && axum::http::HeaderValue::from_str(id).is_err()
        {
            return bad(format!("broker server ID {id:?} is not a valid header value"));
        }
        if self.retry.initial.is_zero() || self.retry.max < self.retry.initial {
            return bad("retry delays must be positive and --retry-max at least --retry-initial".into());
        }
        if self.config_refresh.is_zero() {
            return bad("--config-refresh must be positive".into());
        }
        let mut policies = BTreeSet::new();
        // Listener per port; port 0 (tests) gives every kind its own ephemeral port.
        let mut port_kinds: BTreeMap<u16, EndpointKind> = BTreeMap::new();
        if config.health_port != 0 {
            port_kinds.insert(config.health_port, EndpointKind::Health);
        }
        let mut aws_ports = BTreeSet::new();
        let mut azure_resources = BTreeSet::new();
        let mut file_names = BTreeSet::new();
        for delivery in &config.deliveries {
            let policy = &delivery.policy;
            if policy.is_empty() || !policies.insert(policy.as_str()) {
                return bad(format!("policy {policy:?} is empty or listed twice"));
            }
            if let Some((kind, port)) = listener(&delivery.endpoint)
                && port != 0
            {
                match port_kinds.insert(port, kind) {
                    Some(other) if other != kind => {
                        return bad(format!(
                            "port {port} is used by both the {} and the {} endpoint",
                            other.label(),
                            kind.label()
                        ));
                    }
                    _ => {}
                }
            }
            match &delivery.endpoint {
                AgentEndpoint::AwsContainerCredentials { port } => {
                    // One URL serves one credential: the SDKs give no way to choose.
                    if !aws_ports.insert(*port) {
                        return bad(format!(
                            "two AWS deliveries on port {port} (policy {policy}): an AWS endpoint serves one credential"
                        ));
                    }
                }
                AgentEndpoint::AzureManagedIdentity { port, resource } => {
                    if normalize_resource(resource).is_empty() {
                        return bad(format!("Azure delivery of policy {policy} has no resource"));
                    }
                    if !azure_resources.insert((*port, normalize_resource(resource))) {
                        return bad(format!("two Azure deliveries for resource {resource} (policy {policy})"));
                    }
                    if self.identity_header.is_none() {
                        return bad(format!(
                            "policy {policy} is delivered through the Azure endpoint, which needs IDENTITY_HEADER"
                        ));
                    }
                }
                AgentEndpoint::GcpMetadata { .. } => {}
                AgentEndpoint::HttpHeader { hosts, upstream_port, name, format, .. } => {
                    check_proxy(policy, hosts, *upstream_port)?;
                    if HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return bad(format!("policy {policy}: {name:?} is not a header name"));
                    }
                    if format.contains(['\r', '\n']) {
                        return bad(format!("policy {policy}: the header format contains a line break"));
                    }
                }
                AgentEndpoint::File { name, .. } => {
                    let plain = !name.is_empty()
                        && !name.starts_with('.')
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                    if !plain || name == AWS_TOKEN_FILE || !file_names.insert(name.as_str()) {
                        return bad(format!(
                            "policy {policy}: file {name:?} is not a plain file name, is {AWS_TOKEN_FILE}, or is used twice"
                        ));
                    }
                }
                AgentEndpoint::AwsSigV4 { hosts, upstream_port, service, region, .. } => {
                    check_proxy(policy, hosts, *upstream_port)?;
                    for value in [service, region].into_iter().flatten() {
                        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                            return bad(format!("policy {policy}: SigV4 service/region {value:?} is not valid"));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Moves each delivery's `caFile` under [`SERVER_CA_DIR`] to `server_ca_dir`.
pub fn locate_server_cas(deliveries: &mut [AgentDelivery], server_ca_dir: &Path) {
    for delivery in deliveries {
        if let AgentEndpoint::HttpHeader { ca_file: Some(file), .. }
        | AgentEndpoint::AwsSigV4 { ca_file: Some(file), .. } = &mut delivery.endpoint
            && let Some(rest) = file.strip_prefix(SERVER_CA_DIR)
        {
            *file = format!("{}{rest}", server_ca_dir.display());
        }
    }
}

fn check_proxy(policy: &str, hosts: &[String], upstream_port: u16) -> Result<(), AgentError> {
    if hosts.is_empty() || hosts.iter().any(|h| h.is_empty()) {
        return Err(AgentError::Config(format!("proxy delivery of policy {policy} names no host")));
    }
    if upstream_port == 0 {
        return Err(AgentError::Config(format!("proxy delivery of policy {policy} has upstream port 0")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(deliveries: Vec<AgentDelivery>) -> Settings {
        Settings {
            config: AgentConfig {
                broker_url: "https://broker:8443".into(),
                health_port: 15020,
                deliveries,
                policy_namespace: None,
            },
            broker: BrokerClientSettings {
                url: "https://broker:8443".into(),
                ca: Some(BrokerCa::Pem("pem".into())),
                trust_system_roots: false,
                token_file: "/t".into(),
                timeout: Duration::from_secs(1),
                evidence: Default::default(),
            },
            shared_dir: "/s".into(),
            identity_header: Some(SecretString::new("h")),
            upstream_ca_pem: None,
            retry: RetrySettings { initial: Duration::from_secs(1), max: Duration::from_secs(60) },
            sigv4_max_body_bytes: 1024,
            shutdown_grace: Duration::from_secs(1),
            server_ca_dir: SERVER_CA_DIR.into(),
            config_refresh: Duration::from_secs(60),
        }
    }

    fn d(policy: &str, endpoint: AgentEndpoint) -> AgentDelivery {
        AgentDelivery { policy: policy.into(), endpoint, evidence: vec![] }
    }

    fn azure(resource: &str) -> AgentEndpoint {
        AgentEndpoint::AzureManagedIdentity { port: 15022, resource: resource.into() }
    }

    fn header(hosts: &[&str], name: &str) -> AgentEndpoint {
        AgentEndpoint::HttpHeader {
            port: 15024,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            upstream_port: 443,
            name: name.into(),
            format: "Bearer {token}".into(),
            ca_file: None,
        }
    }

    #[test]
    fn the_webhooks_shape_is_accepted() {
        let s = settings(vec![
            d("s3", AgentEndpoint::AwsContainerCredentials { port: 15021 }),
            d("blob", azure("https://storage.azure.com/")),
            d("vault", azure("https://vault.azure.net")),
            d("gcs", AgentEndpoint::GcpMetadata { port: 15023, scopes: vec!["s".into()] }),
            d("api", header(&["api.example.com"], "Authorization")),
            d(
                "sig",
                AgentEndpoint::AwsSigV4 {
                    port: 15024,
                    hosts: vec!["*.s3.amazonaws.com".into()],
                    upstream_port: 443,
                    service: None,
                    region: Some("eu-west-1".into()),
                    ca_file: None,
                },
            ),
        ]);
        s.validate().unwrap();
    }

    #[test]
    fn unservable_configs_are_refused_with_the_reason() {
        let cases: Vec<(Settings, &str)> = vec![
            (
                {
                    let mut s = settings(vec![]);
                    s.config.broker_url = "http://broker".into();
                    s
                },
                "must be https",
            ),
            (
                {
                    let mut s = settings(vec![]);
                    s.broker.ca = None;
                    s
                },
                "no broker CA",
            ),
            (
                settings(vec![
                    d("a", AgentEndpoint::AwsContainerCredentials { port: 15021 }),
                    d("a", AgentEndpoint::GcpMetadata { port: 15023, scopes: vec![] }),
                ]),
                "listed twice",
            ),
            (
                settings(vec![
                    d("a", AgentEndpoint::AwsContainerCredentials { port: 15021 }),
                    d("b", AgentEndpoint::AwsContainerCredentials { port: 15021 }),
                ]),
                "two AWS deliveries",
            ),
            (
                settings(vec![d("a", AgentEndpoint::AwsContainerCredentials { port: 15020 })]),
                "port 15020 is used by both",
            ),
            (settings(vec![d("a", azure("https://x/")), d("b", azure("https://X"))]), "two Azure deliveries"),
            (settings(vec![d("a", azure("/"))]), "has no resource"),
            (
                {
                    let mut s = settings(vec![d("a", azure("https://x"))]);
                    s.identity_header = None;
                    s
                },
                "needs IDENTITY_HEADER",
            ),
            (
                {
                    let mut s = settings(vec![]);
                    s.broker.evidence.server_id = Some("broker\nx".into());
                    s
                },
                "server ID",
            ),
            (settings(vec![d("a", header(&[], "X"))]), "names no host"),
            (settings(vec![d("a", header(&["h"], "bad header"))]), "not a header name"),
        ];
        for (s, want) in cases {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
