//! The agent's endpoints as the webhook's configuration names them: the kind of loopback
//! listener each delivery is served by (its port is `AgentEndpoint::port`), and the form
//! in which Azure resources are matched. Plain data about `cloudpass_api::agent::AgentEndpoint`, shared by the
//! settings check and the listeners.

use cloudpass_api::agent::AgentEndpoint;

/// The kinds of loopback listener the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointKind {
    /// The health port: `/ready`, `/healthz`, `/metrics`.
    Health,
    /// AWS container credentials (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
    Aws,
    /// Azure App Service managed identity (`IDENTITY_ENDPOINT`).
    Azure,
    /// GCP metadata server (`GCE_METADATA_HOST`).
    Gcp,
    /// HTTP proxy (`HTTP_PROXY`) of the `httpHeader` and `awsSigV4` deliveries.
    Proxy,
}

impl EndpointKind {
    /// Label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Aws => "aws",
            Self::Azure => "azure",
            Self::Gcp => "gcp",
            Self::Proxy => "proxy",
        }
    }

    /// The listener kind serving an endpoint; `None` for a file, which has no listener.
    pub fn of(endpoint: &AgentEndpoint) -> Option<Self> {
        Some(match endpoint {
            AgentEndpoint::AwsContainerCredentials { .. } => Self::Aws,
            AgentEndpoint::AzureManagedIdentity { .. } => Self::Azure,
            AgentEndpoint::GcpMetadata { .. } => Self::Gcp,
            AgentEndpoint::HttpHeader { .. } | AgentEndpoint::AwsSigV4 { .. } => Self::Proxy,
            AgentEndpoint::File { .. } => return None,
        })
    }
}

/// The listener serving an endpoint, by kind and port; `None` for a file.
pub fn listener(endpoint: &AgentEndpoint) -> Option<(EndpointKind, u16)> {
    EndpointKind::of(endpoint).zip(endpoint.port())
}

/// An Azure resource in the form used for matching: without trailing slashes, ASCII
/// lower case (Entra treats resource URIs case-insensitively; SDKs send the scope minus
/// `/.default`, usually without the trailing slash the policy may have).
pub fn normalize_resource(resource: &str) -> String {
    resource.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_normalize() {
        assert_eq!(normalize_resource("https://Storage.azure.com/"), "https://storage.azure.com");
        assert_eq!(normalize_resource("https://storage.azure.com"), "https://storage.azure.com");
    }
}
