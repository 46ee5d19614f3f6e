//! The contract between the webhook and the agent it injects: the agent's configuration
//! (one JSON document in the agent container's environment, left out when every field
//! has its default) and the fixed paths and environment variables both sides use.

use crate::policy::FileFormat;
use serde::{Deserialize, Serialize};

/// Name of the injected agent container (a native sidecar in `initContainers`).
pub const AGENT_CONTAINER: &str = "cloudpass-agent";
/// Environment variable holding the agent's [`AgentConfig`] as JSON.
pub const AGENT_CONFIG_ENV: &str = "CLOUDPASS_AGENT_CONFIG";
/// Environment variable holding the broker's CA certificate (PEM), for an agent that
/// does not mount [`BROKER_CA_FILE`] (a cluster other than the broker's).
pub const BROKER_CA_ENV: &str = "CLOUDPASS_BROKER_CA";
/// File name of the broker's CA bundle inside [`TOKEN_DIR`]: the operator's copy of the
/// published bundle in the pod's namespace, projected beside the token, which the kubelet
/// keeps current when the CA rotates.
pub const BROKER_CA_FILE: &str = "broker-ca.crt";
/// Directory of the projected service-account token (audience `cloudpass`), agent only.
/// The Kubernetes API token's usual place: mounted there, the agent's volume is also what
/// keeps the API token away from the agent (the ServiceAccount admission plugin mounts
/// none into a container that has something at that path), with one volume and one mount
/// rather than two of each in every injected pod.
pub const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// File name of the projected token inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "token";
/// In-memory directory shared with the app containers (read-only for them).
pub const SHARED_DIR: &str = "/var/run/cloudpass";
/// Where the agent finds the CA bundle of a policy's `server.tls` (mounted from its
/// ConfigMap): `<SERVER_CA_DIR>/<policy>/ca.crt`.
pub const SERVER_CA_DIR: &str = "/var/run/cloudpass.dev/server-ca";

/// The CA bundle file of `policy`'s server in the agent's container.
pub fn server_ca_file(policy: &str) -> String {
    format!("{SERVER_CA_DIR}/{policy}/ca.crt")
}

/// File in [`SHARED_DIR`] holding the AWS container-credentials authorization token.
pub const AWS_TOKEN_FILE: &str = "aws-token";
/// Path of the agent's readiness endpoint (all credentials fetched) on its health port.
pub const READY_PATH: &str = "/ready";
/// Path of the AWS container-credentials endpoint.
pub const AWS_CREDENTIALS_PATH: &str = "/v1/aws/credentials";
/// Path of the Azure App Service managed-identity endpoint.
pub const AZURE_TOKEN_PATH: &str = "/msi/token";

/// Pod annotation recording the injected agent version.
pub const INJECTED_ANNOTATION: &str = "cloudpass.dev/injected";
/// Pod annotation listing the policies the agent serves.
pub const POLICIES_ANNOTATION: &str = "cloudpass.dev/policies";
/// The policies a [`POLICIES_ANNOTATION`] value lists (comma-separated, in order).
pub fn annotated_policies(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

/// Pod annotation explaining what was not injected and why.
pub const SKIPPED_ANNOTATION: &str = "cloudpass.dev/injection-skipped";

/// The agent's health port unless the webhook says otherwise.
pub const DEFAULT_HEALTH_PORT: u16 = 15020;

/// The broker's URL unless the webhook says otherwise: the chart's default release
/// (`cloudpass` in `cloudpass-system`).
pub const DEFAULT_BROKER_URL: &str = "https://cloudpass-broker.cloudpass-system.svc:8443";

fn default_broker_url() -> String {
    DEFAULT_BROKER_URL.to_owned()
}

fn is_default_broker_url(url: &str) -> bool {
    url == DEFAULT_BROKER_URL
}

fn default_health_port() -> u16 {
    DEFAULT_HEALTH_PORT
}

fn is_default_health_port(port: &u16) -> bool {
    *port == DEFAULT_HEALTH_PORT
}

/// Everything the agent needs, written by the webhook. Every byte of it is stored in
/// every injected pod, so each field is left out at its default, and in the broker's own
/// cluster the deliveries too: the agent asks the broker for them at start
/// ([`AGENT_CONFIG_PATH`](crate::broker::AGENT_CONFIG_PATH)).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Base URL of the broker (`https://...`); left out when it is
    /// [`DEFAULT_BROKER_URL`].
    #[serde(default = "default_broker_url", skip_serializing_if = "is_default_broker_url")]
    pub broker_url: String,
    /// Port of `/ready`, `/healthz` and `/metrics` on loopback; left out of the JSON when
    /// it is [`DEFAULT_HEALTH_PORT`] (every byte here is stored in every injected pod).
    #[serde(default = "default_health_port", skip_serializing_if = "is_default_health_port")]
    pub health_port: u16,
    /// What to serve, one entry per policy. Empty: ask the broker, which answers for the
    /// policies of the pod's `cloudpass.dev/policies` annotation (pods of the broker's
    /// cluster); a remote cluster's webhook writes them here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<AgentDelivery>,
    /// Set when the pod runs in another cluster than the broker's: the namespace of the
    /// broker's cluster whose policies apply (sent as the credential request's
    /// `namespace`). Unset for pods of the broker's own cluster, whose namespace the
    /// broker takes from their token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_namespace: Option<String>,
}

impl Default for AgentConfig {
    /// Everything at its default: the broker of the default release, the default health
    /// port, the deliveries from the broker.
    fn default() -> Self {
        Self {
            broker_url: default_broker_url(),
            health_port: DEFAULT_HEALTH_PORT,
            deliveries: Vec::new(),
            policy_namespace: None,
        }
    }
}

impl AgentConfig {
    /// Whether the agent asks the broker for its deliveries.
    pub fn deliveries_from_broker(&self) -> bool {
        self.deliveries.is_empty()
    }
}

/// One policy and how its credential reaches the app.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentDelivery {
    /// Name of the AccessPolicy.
    pub policy: String,
    /// The endpoint serving it.
    pub endpoint: AgentEndpoint,
    /// Cloud evidence the policy's trust providers need beyond the pod's token, gathered
    /// by the agent from the cloud the pod runs in before every credential request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<EvidenceSource>,
}

/// Where the agent gets one piece of evidence, for one trust provider.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum EvidenceSource {
    /// A `sts:GetCallerIdentity` request pre-signed with the pod's own AWS credentials
    /// (environment, EKS Pod Identity, IRSA web identity, or the instance role).
    AwsGetCallerIdentity {
        /// Name of the `awsRole` TrustProvider.
        trust_provider: String,
    },
    /// An Entra token of the managed identity, from the Azure Instance Metadata Service.
    AzureManagedIdentity {
        /// Name of the `azureManagedIdentity` TrustProvider.
        trust_provider: String,
        /// Resource (audience) to ask for.
        resource: String,
        /// Client ID of the user-assigned identity to ask for, when the trust provider
        /// names exactly one (IMDS needs it on nodes with several identities).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
    /// A Google-signed identity token from the GKE or Compute Engine metadata server.
    GcpIdentityToken {
        /// Name of the `gcpIdentityToken` TrustProvider.
        trust_provider: String,
        /// Audience to ask for.
        audience: String,
    },
}

impl EvidenceSource {
    /// Name of the TrustProvider the evidence is for.
    pub fn trust_provider(&self) -> &str {
        match self {
            Self::AwsGetCallerIdentity { trust_provider }
            | Self::AzureManagedIdentity { trust_provider, .. }
            | Self::GcpIdentityToken { trust_provider, .. } => trust_provider,
        }
    }
}

/// An endpoint the agent serves on loopback.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum AgentEndpoint {
    /// AWS container credentials (`AWS_CONTAINER_CREDENTIALS_FULL_URI`); the agent writes a
    /// random authorization token to [`SHARED_DIR`]/[`AWS_TOKEN_FILE`].
    AwsContainerCredentials {
        /// Loopback port the agent serves the endpoint on.
        port: u16,
    },
    /// Azure managed identity (`IDENTITY_ENDPOINT`); the proof is the agent's own
    /// `IDENTITY_HEADER` variable. Several policies may share the port, one per resource.
    AzureManagedIdentity {
        /// Loopback port the agent serves the endpoint on (shared by the policies of
        /// one pod that use this endpoint).
        port: u16,
        /// Resource the token is for.
        resource: String,
    },
    /// GCP metadata server (`GCE_METADATA_HOST`).
    GcpMetadata {
        /// Loopback port the agent serves the endpoint on.
        port: u16,
        /// OAuth scopes the token is for.
        scopes: Vec<String>,
    },
    /// HTTP proxy adding a header for the given hosts.
    HttpHeader {
        /// Port (shared by every proxy delivery).
        port: u16,
        /// Host patterns served.
        hosts: Vec<String>,
        /// Upstream port.
        upstream_port: u16,
        /// Header name.
        name: String,
        /// Header value with `{token}` or `{basic}`.
        format: String,
        /// CA bundle (PEM file) trusted for the upstream besides the system roots.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<String>,
    },
    /// HTTP proxy signing requests for the given hosts with AWS SigV4.
    AwsSigV4 {
        /// Port (shared by every proxy delivery).
        port: u16,
        /// Host patterns served.
        hosts: Vec<String>,
        /// Upstream port.
        upstream_port: u16,
        /// Signing name, if not derived from the host.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        /// Signing region, if not derived from the host.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// CA bundle (PEM file) trusted for the upstream besides the system roots.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<String>,
    },
    /// A file the agent writes to [`SHARED_DIR`]`/<name>` (no port).
    File {
        /// File name in [`SHARED_DIR`].
        name: String,
        /// How the credential is written.
        #[serde(default, skip_serializing_if = "is_raw")]
        format: FileFormat,
    },
}

fn is_raw(format: &FileFormat) -> bool {
    *format == FileFormat::Raw
}

impl AgentEndpoint {
    /// The loopback port it is served on; `None` for a file.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::AwsContainerCredentials { port }
            | Self::AzureManagedIdentity { port, .. }
            | Self::GcpMetadata { port, .. }
            | Self::HttpHeader { port, .. }
            | Self::AwsSigV4 { port, .. } => Some(*port),
            Self::File { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_refuses_unknown_fields() {
        let config = AgentConfig {
            broker_url: "https://cloudpass-broker.cloudpass-system.svc:8443".into(),
            health_port: 15020,
            policy_namespace: None,
            deliveries: vec![
                AgentDelivery {
                    policy: "s3".into(),
                    endpoint: AgentEndpoint::AwsContainerCredentials { port: 15021 },
                    evidence: vec![EvidenceSource::GcpIdentityToken {
                        trust_provider: "gke".into(),
                        audience: "cloudpass".into(),
                    }],
                },
                AgentDelivery {
                    policy: "api".into(),
                    endpoint: AgentEndpoint::HttpHeader {
                        port: 15024,
                        hosts: vec!["api.example.com".into()],
                        upstream_port: 443,
                        name: "Authorization".into(),
                        format: "Bearer {token}".into(),
                        ca_file: Some(server_ca_file("api")),
                    },
                    evidence: vec![],
                },
            ],
        };
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains(r#""type":"awsContainerCredentials""#), "{json}");
        assert!(json.contains(r#""evidence":[{"type":"gcpIdentityToken","trustProvider":"gke""#), "{json}");
        assert_eq!(serde_json::from_str::<AgentConfig>(&json).unwrap(), config);
        assert!(serde_json::from_str::<AgentConfig>(&json.replace("deliveries", "delivery")).is_err());
        assert!(!json.contains("healthPort"), "the default port is left out: {json}");
        let other = AgentConfig { health_port: 15030, ..config };
        let json = serde_json::to_string(&other).unwrap();
        assert!(json.contains(r#""healthPort":15030"#), "{json}");
        assert_eq!(serde_json::from_str::<AgentConfig>(&json).unwrap(), other);
        assert!(serde_json::from_str::<AgentConfig>(&json.replace("healthPort", "helthPort")).is_err());
    }
}
