//! Command line, environment and the webhook's JSON configuration, checked once at start.
//!
//! The webhook starts the agent with no arguments: everything comes from the environment
//! it sets (`CLOUDPASS_AGENT_CONFIG`, `CLOUDPASS_BROKER_CA`, `IDENTITY_HEADER`) and the
//! fixed paths of `cloudpass_api::agent`. The other flags have production defaults and
//! exist so that tests (and operators debugging) can point the agent elsewhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use axum::http::HeaderName;
use clap::{Parser, Subcommand};
use cloudpass_api::{
    agent::{AGENT_CONFIG_ENV, AgentConfig, AgentEndpoint, BROKER_CA_ENV, SHARED_DIR, TOKEN_DIR, TOKEN_FILE},
    duration::Duration as TextDuration,
    secret::SecretString,
};
use cloudpass_cli::LogArgs;

use crate::{
    endpoint::{EndpointKind, normalize_resource, port_of},
    error::AgentError,
};

/// The cloudpass agent: fetches this pod's credentials from the cloudpass broker and
/// serves them on loopback to unchanged cloud SDKs (AWS container credentials, Azure
/// App Service managed identity, GCP metadata server) and through an HTTP proxy that adds
/// a header or signs with AWS SigV4.
#[derive(Parser, Debug)]
#[command(name = "cloudpass-agent", version)]
pub struct Args {
    /// What to do; without a subcommand the agent runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of the running agent (also read by `probe` for the health port).
    #[command(flatten)]
    pub run: RunArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Readiness check: `GET /ready` on the loopback health port; exits 0 when the agent
    /// holds a credential for every delivery, 1 otherwise. The kubelet runs it as the
    /// agent's postStart hook with `--wait` (the image has no shell or curl).
    Probe {
        /// Health port to ask; default: `healthPort` of the configuration.
        #[arg(long)]
        port: Option<u16>,
        /// Give up on one request after this long.
        #[arg(long, default_value = "2s")]
        timeout: TextDuration,
        /// Keep asking until ready for up to this long (the webhook's postStart hook: the
        /// kubelet starts the app the moment it returns). Default: ask once.
        #[arg(long, default_value = "0s")]
        wait: TextDuration,
    },
}

/// Flags and environment of the running agent.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The agent configuration as JSON (broker URL, health port, deliveries), written by
    /// the webhook.
    #[arg(long, env = AGENT_CONFIG_ENV, hide_env_values = true)]
    pub config: Option<String>,
    /// PEM certificate(s) of the CA that signed the broker's serving certificate. Only
    /// these are trusted for the broker unless `--broker-trust-system-roots`.
    #[arg(long, env = BROKER_CA_ENV, hide_env_values = true)]
    pub broker_ca: Option<String>,
    /// Also trust the system's root CAs for the broker (a broker behind a publicly
    /// trusted certificate).
    #[arg(long, env = "CLOUDPASS_BROKER_TRUST_SYSTEM_ROOTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub broker_trust_system_roots: bool,
    /// Projected service-account token (audience `cloudpass`) presented to the broker;
    /// re-read on every request, so the kubelet's rotation is picked up.
    #[arg(long, env = "CLOUDPASS_TOKEN_FILE", default_value_t = default_token_file())]
    pub token_file: String,
    /// Directory shared read-only with the app containers, where the agent writes the
    /// AWS authorization token file.
    #[arg(long, env = "CLOUDPASS_SHARED_DIR", default_value = SHARED_DIR)]
    pub shared_dir: PathBuf,
    /// Proof the Azure SDKs send as `X-IDENTITY-HEADER` (the webhook generates one per
    /// pod). Required when an Azure delivery is configured.
    #[arg(long, env = "IDENTITY_HEADER", hide_env_values = true)]
    pub identity_header: Option<String>,
    /// Extra PEM CA bundle trusted for proxied upstreams, besides the system roots.
    #[arg(long, env = "CLOUDPASS_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Time limit of one broker request.
    #[arg(long, env = "CLOUDPASS_BROKER_TIMEOUT", default_value = "10s")]
    pub broker_timeout: TextDuration,
    /// First retry delay after a failed fetch; it doubles per failure (with jitter).
    #[arg(long, env = "CLOUDPASS_RETRY_INITIAL", default_value = "1s")]
    pub retry_initial: TextDuration,
    /// Longest retry delay.
    #[arg(long, env = "CLOUDPASS_RETRY_MAX", default_value = "1m")]
    pub retry_max: TextDuration,
    /// Largest request body the SigV4 proxy buffers to sign (services other than S3;
    /// S3 bodies stream with `UNSIGNED-PAYLOAD`).
    #[arg(long, env = "CLOUDPASS_SIGV4_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub sigv4_max_body_bytes: usize,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "CLOUDPASS_SHUTDOWN_GRACE", default_value = "5s")]
    pub shutdown_grace: TextDuration,
    /// Azure Instance Metadata Service, for `azureManagedIdentity` evidence.
    #[arg(long, env = "CLOUDPASS_AZURE_IMDS_URL", default_value = LINK_LOCAL_METADATA)]
    pub azure_imds_url: String,
    /// GKE / Compute Engine metadata server, for `gcpIdentityToken` evidence.
    #[arg(long, env = "CLOUDPASS_GCP_METADATA_URL", default_value = LINK_LOCAL_METADATA)]
    pub gcp_metadata_url: String,
    /// The broker's server ID, signed into `awsRole` evidence (the pre-signed
    /// `GetCallerIdentity`) as `x-cloudpass-server-id` so that it is valid for this broker
    /// only. Default: the host (`host[:port]`) of the configuration's broker URL; set it
    /// when the broker knows itself by another name.
    #[arg(long, env = "CLOUDPASS_BROKER_SERVER_ID")]
    pub broker_server_id: Option<String>,
    /// AWS instance metadata service (IMDSv2), for `awsRole` evidence when neither AWS
    /// keys nor `AWS_CONTAINER_CREDENTIALS_FULL_URI` are set (the standard AWS variables,
    /// `AWS_REGION` and `AWS_ENDPOINT_URL_STS` included, are read as the AWS SDKs do).
    #[arg(long, env = "CLOUDPASS_AWS_IMDS_URL", default_value = LINK_LOCAL_METADATA)]
    pub aws_imds_url: String,
}

/// The link-local address of every cloud's metadata service.
pub const LINK_LOCAL_METADATA: &str = "http://169.254.169.254";

fn default_token_file() -> String {
    format!("{TOKEN_DIR}/{TOKEN_FILE}")
}

/// How the agent reaches the broker.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Base URL (`https://...`).
    pub url: String,
    /// PEM CA certificate(s) of the broker.
    pub ca_pem: Option<String>,
    /// Also trust the system roots.
    pub trust_system_roots: bool,
    /// The projected token file.
    pub token_file: PathBuf,
    /// Time limit of one request.
    pub timeout: Duration,
    /// Where cloud evidence comes from.
    pub evidence: EvidenceSettings,
}

/// Where the agent looks for evidence.
#[derive(Clone, Debug)]
pub struct EvidenceSettings {
    /// Base URL of the Azure Instance Metadata Service.
    pub azure_imds_url: String,
    /// Base URL of the GCP metadata server.
    pub gcp_metadata_url: String,
    /// Base URL of the AWS instance metadata service (IMDSv2).
    pub aws_imds_url: String,
    /// The pod's AWS credentials.
    pub aws: AwsSource,
    /// The broker's server ID, signed into the AWS evidence as `x-cloudpass-server-id`.
    /// `None`: the broker client fills in the host (`host[:port]`) of the broker URL.
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
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    pub static_keys: Option<(String, SecretString, Option<SecretString>)>,
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub container_credentials_uri: Option<String>,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, read at every use (it is rotated).
    pub container_authorization_token_file: Option<PathBuf>,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
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

/// Retry delays after failed fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetrySettings {
    /// First delay.
    pub initial: Duration,
    /// Cap.
    pub max: Duration,
}

/// Everything the agent needs to run, checked. Built from [`RunArgs`] by the binary, or
/// directly by tests.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The webhook's configuration.
    pub config: AgentConfig,
    /// Broker connection.
    pub broker: BrokerSettings,
    /// Shared directory for the AWS authorization token file.
    pub shared_dir: PathBuf,
    /// Azure proof (`IDENTITY_HEADER`).
    pub identity_header: Option<SecretString>,
    /// Extra CA bundle (PEM) for proxied upstreams.
    pub upstream_ca_pem: Option<Vec<u8>>,
    /// Retry delays.
    pub retry: RetrySettings,
    /// Largest body the SigV4 proxy buffers.
    pub sigv4_max_body_bytes: usize,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
}

impl RunArgs {
    /// The parsed and checked agent configuration only (what `probe` needs).
    pub fn agent_config(&self) -> Result<AgentConfig, AgentError> {
        let json = self
            .config
            .as_deref()
            .ok_or_else(|| AgentError::Config(format!("no configuration: set {AGENT_CONFIG_ENV} or --config")))?;
        serde_json::from_str(json).map_err(|e| AgentError::Config(format!("{AGENT_CONFIG_ENV} is not valid: {e}")))
    }

    /// Checked settings of the running agent.
    pub fn into_settings(self) -> Result<Settings, AgentError> {
        let config = self.agent_config()?;
        let upstream_ca_pem = match &self.upstream_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| AgentError::Config(format!("--upstream-ca-file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let settings = Settings {
            broker: BrokerSettings {
                url: config.broker_url.clone(),
                ca_pem: self.broker_ca.filter(|pem| !pem.trim().is_empty()),
                trust_system_roots: self.broker_trust_system_roots,
                token_file: PathBuf::from(self.token_file),
                timeout: self.broker_timeout.as_std(),
                evidence: EvidenceSettings {
                    azure_imds_url: self.azure_imds_url,
                    gcp_metadata_url: self.gcp_metadata_url,
                    aws_imds_url: self.aws_imds_url,
                    aws: AwsSource::from_env(),
                    server_id: self.broker_server_id.filter(|id| !id.is_empty()),
                },
            },
            config,
            shared_dir: self.shared_dir,
            identity_header: self.identity_header.filter(|h| !h.is_empty()).map(SecretString::new),
            upstream_ca_pem,
            retry: RetrySettings { initial: self.retry_initial.as_std(), max: self.retry_max.as_std() },
            sigv4_max_body_bytes: self.sigv4_max_body_bytes,
            shutdown_grace: self.shutdown_grace.as_std(),
        };
        settings.validate()?;
        Ok(settings)
    }
}

impl Settings {
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
        if self.broker.ca_pem.is_none() && !self.broker.trust_system_roots {
            return bad(format!("no broker CA: set {BROKER_CA_ENV} or --broker-trust-system-roots"));
        }
        if let Some(id) = &self.broker.evidence.server_id
            && axum::http::HeaderValue::from_str(id).is_err()
        {
            return bad(format!("broker server ID {id:?} is not a valid header value"));
        }
        if self.retry.initial.is_zero() || self.retry.max < self.retry.initial {
            return bad("retry delays must be positive and --retry-max at least --retry-initial".into());
        }
        let mut policies = BTreeSet::new();
        // Listener per port; port 0 (tests) gives every kind its own ephemeral port.
        let mut port_kinds: BTreeMap<u16, EndpointKind> = BTreeMap::new();
        if config.health_port != 0 {
            port_kinds.insert(config.health_port, EndpointKind::Health);
        }
        let mut aws_ports = BTreeSet::new();
        let mut azure_resources = BTreeSet::new();
        for delivery in &config.deliveries {
            let policy = &delivery.policy;
            if policy.is_empty() || !policies.insert(policy.as_str()) {
                return bad(format!("policy {policy:?} is empty or listed twice"));
            }
            let kind = EndpointKind::of(&delivery.endpoint);
            let port = port_of(&delivery.endpoint);
            if port != 0 {
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
    use clap::CommandFactory;
    use cloudpass_api::agent::AgentDelivery;

    use super::*;

    fn settings(deliveries: Vec<AgentDelivery>) -> Settings {
        Settings {
            config: AgentConfig {
                broker_url: "https://broker:8443".into(),
                health_port: 15020,
                deliveries,
                policy_namespace: None,
            },
            broker: BrokerSettings {
                url: "https://broker:8443".into(),
                ca_pem: Some("pem".into()),
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
                    s.broker.ca_pem = None;
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

    #[test]
    fn help_documents_every_flag_and_hides_secret_values() {
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        for flag in [
            "--config",
            "CLOUDPASS_AGENT_CONFIG",
            "--broker-ca",
            "CLOUDPASS_BROKER_CA",
            "--token-file",
            "--shared-dir",
            "--identity-header",
            "IDENTITY_HEADER",
            "--upstream-ca-file",
            "--retry-max",
            "--broker-server-id",
            "--log-format",
            "probe",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        let command = Args::command();
        for secret in ["config", "broker_ca", "identity_header"] {
            let arg = command.get_arguments().find(|a| a.get_id() == secret).unwrap();
            assert!(arg.is_hide_env_values_set(), "--help must not print the value of {secret}");
        }
    }
}
