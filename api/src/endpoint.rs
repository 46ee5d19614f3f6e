//! What one Ready policy makes the agent serve: the kind of delivery, the loopback
//! endpoint and the cloud evidence to gather. One rule for the two places that need it:
//! the webhook (the app's variables point at these ports) and the broker (which answers
//! the agent's [`AGENT_CONFIG_PATH`](crate::broker::AGENT_CONFIG_PATH) with them).

use crate::{
    agent::{AgentDelivery, AgentEndpoint, DEFAULT_HEALTH_PORT, EvidenceSource, server_ca_file},
    config::{CompiledPolicy, NamespaceConfig},
    policy::{Delivery, Server, ServerKind},
};

/// Loopback ports of the agent's endpoints, the same for every injected pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPorts {
    /// `/ready`, `/healthz`, `/metrics`.
    pub health: u16,
    /// AWS container credentials.
    pub aws: u16,
    /// Azure managed identity.
    pub azure: u16,
    /// GCP metadata server.
    pub gcp: u16,
    /// HTTP proxy (header and SigV4 deliveries).
    pub proxy: u16,
}

impl Default for AgentPorts {
    fn default() -> Self {
        Self { health: DEFAULT_HEALTH_PORT, aws: 15021, azure: 15022, gcp: 15023, proxy: 15024 }
    }
}

/// How a policy's credential reaches the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeliveryKind {
    /// The AWS container-credentials endpoint.
    Aws,
    /// The Azure managed-identity endpoint.
    Azure,
    /// The GCP metadata server.
    Gcp,
    /// The HTTP proxy (header or SigV4).
    Proxy,
    /// A file in the shared volume.
    File,
}

impl DeliveryKind {
    /// The kind of a policy's delivery; `None` for an SDK endpoint of a server kind
    /// with no SDK (which the operator does not let become Ready).
    pub fn of(server: &Server, delivery: &Delivery) -> Option<Self> {
        if delivery.file.is_some() {
            return Some(Self::File);
        }
        if delivery.sdk_endpoint.is_some() {
            return match server.kind {
                ServerKind::Aws => Some(Self::Aws),
                ServerKind::Azure => Some(Self::Azure),
                ServerKind::Gcp => Some(Self::Gcp),
                ServerKind::Http => None,
            };
        }
        Some(Self::Proxy)
    }
}

/// What the agent serves for `policy`, if it can be delivered at all.
pub fn agent_delivery(
    policy: &CompiledPolicy,
    config: Option<&NamespaceConfig>,
    ports: &AgentPorts,
) -> Option<AgentDelivery> {
    Some(AgentDelivery {
        policy: policy.name.clone(),
        endpoint: agent_endpoint(&policy.name, &policy.server, &policy.delivery, ports)?,
        evidence: evidence(policy, config),
    })
}

/// The cloud evidence the agent gathers for `policy`: one source per trust provider that
/// needs more than the pod's token. `oidc` evidence comes from outside any pod.
fn evidence(policy: &CompiledPolicy, config: Option<&NamespaceConfig>) -> Vec<EvidenceSource> {
    let Some(config) = config else { return vec![] };
    policy.trust_providers.iter().filter_map(|name| config.trust_providers.get(name)?.evidence_source(name)).collect()
}

/// The endpoint the agent serves for the policy `name` reaching `server` with
/// `delivery`; `None` when no endpoint fits ([`DeliveryKind::of`]).
pub fn agent_endpoint(name: &str, server: &Server, delivery: &Delivery, ports: &AgentPorts) -> Option<AgentEndpoint> {
    let upstream_port = server.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(443);
    let ca_file = server.tls.as_ref().map(|_| server_ca_file(name));
    Some(match DeliveryKind::of(server, delivery)? {
        DeliveryKind::Aws => AgentEndpoint::AwsContainerCredentials { port: ports.aws },
        DeliveryKind::Azure => AgentEndpoint::AzureManagedIdentity {
            port: ports.azure,
            resource: server.resource.clone().unwrap_or_default(),
        },
        DeliveryKind::Gcp => AgentEndpoint::GcpMetadata { port: ports.gcp, scopes: server.google_scopes() },
        DeliveryKind::File => {
            let file = delivery.file.clone()?;
            AgentEndpoint::File { name: file.name, format: file.format }
        }
        DeliveryKind::Proxy => match (&delivery.http_header, &delivery.aws_sig_v4) {
            (Some(h), _) => AgentEndpoint::HttpHeader {
                port: ports.proxy,
                hosts: server.hosts.clone(),
                upstream_port,
                name: h.name.clone(),
                format: h.format.clone(),
                ca_file,
            },
            (None, sig) => AgentEndpoint::AwsSigV4 {
                port: ports.proxy,
                hosts: server.hosts.clone(),
                upstream_port,
                service: sig.as_ref().and_then(|s| s.service.clone()),
                region: sig.as_ref().and_then(|s| s.region.clone()),
                ca_file,
            },
        },
    })
}
