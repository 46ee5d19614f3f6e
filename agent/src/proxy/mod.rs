//! The HTTP proxy of the `httpHeader` and `awsSigV4` deliveries (`HTTP_PROXY`).
//!
//! The app sends plain absolute-form requests (`GET http://api.example.com/v1/x`); the
//! agent serves only hosts matching a policy's host patterns (403 for anything else, so
//! it is never an open relay), adds the credential (a header, replacing any the app
//! sent, or an AWS SigV4 signature), and sends the request over TLS to
//! `https://<host>:<upstreamPort>`, verifying the certificate against the system roots
//! plus an optional extra CA bundle. `CONNECT` is refused (405): the agent does not
//! intercept TLS. Redirects are passed back to the app, never followed, so a credential
//! never travels to a host the policy does not name.
//!
//! One step per module: `route` picks the policy for a host, `request` checks the app's
//! request and prepares the upstream one, `inject` adds the credential of each kind of
//! delivery, `upstream` holds the HTTPS clients and forwards, and `relay` has what they
//! share (the proxy's refusal, the hop-by-hop headers). This module is the listener that
//! runs them in that order.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    response::Response,
};

use crate::{
    common::{Shared, guarded},
    endpoint::EndpointKind,
    store::CredentialStore,
};

mod inject;
mod relay;
mod request;
mod route;
mod upstream;

pub use inject::header_value;
pub use request::{Prepared, prepare};
pub use route::{Action, ProxyRoute, find_route};
pub use upstream::{UpstreamClients, upstream_client, upstream_clients};

use relay::refuse;

#[cfg(test)]
mod tests;

/// What a proxy listener needs for every request.
struct ProxyState {
    routes: Vec<ProxyRoute>,
    clients: UpstreamClients,
    store: Arc<CredentialStore>,
    max_body: usize,
}

/// The proxy for `routes`, sending upstream with `clients` (see [`upstream_clients`]).
pub fn router(routes: Vec<ProxyRoute>, clients: UpstreamClients, max_body: usize, shared: &Shared) -> Router {
    let state = Arc::new(ProxyState { routes, clients, store: shared.store.clone(), max_body });
    guarded(Router::new().fallback(handle).with_state(state), EndpointKind::Proxy, shared.metrics.clone())
}

/// Every request the listener accepts: prepared (or refused), then forwarded with the
/// client trusting its route's CA bundle.
async fn handle(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let prepared = match prepare(&state.routes, &state.store, state.max_body, request, SystemTime::now()).await {
        Ok(p) => p,
        Err(refusal) => return refusal,
    };
    let Some(client) = state.clients.get(&prepared.ca_file) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "no upstream client for this route".into());
    };
    upstream::forward(client, prepared).await
}
