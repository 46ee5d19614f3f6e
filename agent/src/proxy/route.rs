//! Which policy serves which host: the proxy deliveries of the configuration as routes,
//! and the choice of a route for the host an app asks for.

use axum::http::HeaderName;
use cloudpass_api::{agent::AgentEndpoint, selector::host_matches};

/// What the proxy does for a policy's hosts.
#[derive(Clone, Debug)]
pub enum Action {
    /// Set a header (`httpHeader` delivery), replacing any the app sent.
    Header {
        /// The header to set.
        name: HeaderName,
        /// Value with `{token}` / `{basic}`.
        format: String,
    },
    /// Sign the request with SigV4 (`awsSigV4` delivery).
    SigV4 {
        /// Signing name; derived from the host when absent.
        service: Option<String>,
        /// Region; derived from the host when absent.
        region: Option<String>,
    },
}

/// One policy served by the proxy.
#[derive(Clone, Debug)]
pub struct ProxyRoute {
    /// The policy whose credential is added.
    pub policy: String,
    /// Host patterns (`api.example.com`, `*.s3.amazonaws.com`).
    pub hosts: Vec<String>,
    /// Port of the upstream's HTTPS.
    pub upstream_port: u16,
    /// What the proxy adds: a header or a SigV4 signature.
    pub action: Action,
    /// CA bundle trusted for this upstream besides the system roots (`server.tls`).
    pub ca_file: Option<String>,
}

impl ProxyRoute {
    /// The route of a proxy delivery (`None` for other endpoints or an invalid header
    /// name, which config validation refuses first).
    pub fn from_endpoint(policy: &str, endpoint: &AgentEndpoint) -> Option<Self> {
        let (hosts, upstream_port, action, ca_file) = match endpoint {
            AgentEndpoint::HttpHeader { hosts, upstream_port, name, format, ca_file, .. } => (
                hosts,
                upstream_port,
                Action::Header { name: HeaderName::from_bytes(name.as_bytes()).ok()?, format: format.clone() },
                ca_file,
            ),
            AgentEndpoint::AwsSigV4 { hosts, upstream_port, service, region, ca_file, .. } => {
                (hosts, upstream_port, Action::SigV4 { service: service.clone(), region: region.clone() }, ca_file)
            }
            _ => return None,
        };
        Some(Self {
            policy: policy.to_owned(),
            hosts: hosts.clone(),
            upstream_port: *upstream_port,
            action,
            ca_file: ca_file.clone(),
        })
    }
}

/// The route for `host`: an exact pattern wins over a wildcard, then configuration order.
pub fn find_route<'a>(routes: &'a [ProxyRoute], host: &str) -> Option<&'a ProxyRoute> {
    let matching = |exact: bool| {
        routes.iter().find(|r| r.hosts.iter().any(|p| p.starts_with("*.") != exact && host_matches(p, host)))
    };
    matching(true).or_else(|| matching(false))
}
