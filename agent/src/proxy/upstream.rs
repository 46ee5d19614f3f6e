//! The upstream side of the proxy: HTTPS clients trusting the system roots plus the
//! configured CA bundles, one per bundle, and the forwarding of a prepared request with
//! the answer relayed to the app (redirects included, never followed).

use std::collections::BTreeMap;

use axum::{
    body::Body,
    http::{StatusCode, header::HOST},
    response::Response,
};
use tracing::debug;

use super::{
    relay::{refuse, strip_hop_by_hop},
    request::Prepared,
    route::ProxyRoute,
};
use crate::error::AgentError;

/// The client that sends proxied requests upstream.
pub fn upstream_client(extra_ca_pem: Option<&[u8]>) -> Result<reqwest::Client, AgentError> {
    let extra = match extra_ca_pem {
        Some(pem) => {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| AgentError::Tls(format!("upstream CA bundle: {e}")))?;
            if certs.is_empty() {
                return Err(AgentError::Tls("upstream CA bundle: no certificate in the PEM".into()));
            }
            certs
        }
        None => Vec::new(),
    };
    reqwest::Client::builder()
        .no_proxy()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        .tls_certs_merge(extra)
        .build()
        .map_err(|e| AgentError::Tls(format!("upstream client: {e}")))
}

/// The upstream clients of the proxy: one per CA bundle its routes trust, `None` for
/// the system roots (plus the agent's `--upstream-ca-file`).
pub type UpstreamClients = BTreeMap<Option<String>, reqwest::Client>;

/// Builds a client for each distinct `ca_file` of `routes`, each trusting the system
/// roots, `extra_ca_pem` and that file; fails naming the file that cannot be read.
pub fn upstream_clients(routes: &[ProxyRoute], extra_ca_pem: Option<&[u8]>) -> Result<UpstreamClients, AgentError> {
    let mut clients = UpstreamClients::new();
    for ca_file in routes.iter().map(|r| r.ca_file.clone()) {
        if clients.contains_key(&ca_file) {
            continue;
        }
        let mut pem = extra_ca_pem.map(<[u8]>::to_vec).unwrap_or_default();
        if let Some(path) = &ca_file {
            let file = std::fs::read(path).map_err(|e| AgentError::Tls(format!("server CA bundle {path}: {e}")))?;
            pem.extend_from_slice(b"\n");
            pem.extend_from_slice(&file);
        }
        let client = upstream_client((!pem.is_empty()).then_some(pem.as_slice()))?;
        clients.insert(ca_file, client);
    }
    Ok(clients)
}

/// Sends `prepared` with `client` and relays the answer, hop-by-hop headers removed;
/// when the upstream cannot be reached or its answer read, 502 with the reason.
pub(super) async fn forward(client: &reqwest::Client, prepared: Prepared) -> Response {
    let host = prepared.headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
    let upstream = client.request(prepared.method, &prepared.url).headers(prepared.headers).body(prepared.body);
    match upstream.send().await {
        Ok(response) => {
            let mut response = axum::http::Response::<reqwest::Body>::from(response).map(Body::new);
            strip_hop_by_hop(response.headers_mut());
            response
        }
        Err(e) => {
            let error = AgentError::Upstream { host, message: cloudpass_outbound::chain(&e) };
            debug!(error = %error, "proxied request failed");
            refuse(StatusCode::BAD_GATEWAY, error.to_string())
        }
    }
}
