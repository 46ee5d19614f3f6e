//! The app's side of the proxy: what it may ask (absolute `http://` requests for a host a
//! policy names, on no other port; no `CONNECT`, so no TLS interception), the refusals
//! otherwise, and the request prepared for the upstream: hop-by-hop headers dropped,
//! `Host` set, the credential added.

use std::time::SystemTime;

use axum::{
    extract::Request,
    http::{
        HeaderMap, HeaderValue, Method, StatusCode,
        header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING},
    },
    response::Response,
};
use tracing::debug;

use super::{
    inject::{Outgoing, add_credential},
    relay::{refuse, strip_hop_by_hop},
    route::{ProxyRoute, find_route},
};
use crate::store::CredentialStore;

/// A request ready to go upstream.
pub struct Prepared {
    /// `https://host[:port]/path?query`: the upstream's address with the app's path and
    /// query.
    pub url: String,
    /// The app's method, unchanged.
    pub method: Method,
    /// The app's headers without the hop-by-hop ones, `Host` set to the upstream's
    /// authority, and the credential added (header or SigV4 signature).
    pub headers: HeaderMap,
    /// The app's body: streamed through, or buffered when SigV4 signs it.
    pub body: reqwest::Body,
    /// The route's CA bundle, which picks the upstream client.
    pub ca_file: Option<String>,
}

/// Checks an app's request and turns it into the upstream request, or the refusal.
pub async fn prepare(
    routes: &[ProxyRoute],
    store: &CredentialStore,
    max_body: usize,
    request: Request,
    now: SystemTime,
) -> Result<Prepared, Response> {
    let (parts, body) = request.into_parts();
    if parts.method == Method::CONNECT {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: send plain http:// requests, the agent adds the credential and uses TLS upstream"
                .into(),
        ));
    }
    let uri = &parts.uri;
    if uri.scheme_str() != Some("http") {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "expected an absolute http:// request (set HTTP_PROXY and use http:// URLs)".into(),
        ));
    }
    let host = uri.host().unwrap_or_default().trim_end_matches('.').to_ascii_lowercase();
    let Some(route) = find_route(routes, &host) else {
        debug!(%host, "proxy request for a host no policy names refused");
        return Err(refuse(StatusCode::FORBIDDEN, format!("host {host} is not served by this proxy")));
    };
    if let Some(port) = uri.port_u16().filter(|p| *p != 80 && *p != route.upstream_port) {
        return Err(refuse(StatusCode::FORBIDDEN, format!("port {port} of host {host} is not served by this proxy")));
    }
    let fetched = store.valid(&route.policy).map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let authority = if route.upstream_port == 443 { host.clone() } else { format!("{host}:{}", route.upstream_port) };
    let url = format!("https://{authority}{}", uri.path_and_query().map_or("/", |p| p.as_str()));

    let mut headers = parts.headers;
    let content_length: Option<u64> =
        headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let empty_body =
        content_length == Some(0) || (content_length.is_none() && !headers.contains_key(TRANSFER_ENCODING));
    strip_hop_by_hop(&mut headers);
    headers.insert(
        HOST,
        HeaderValue::from_str(&authority).map_err(|_| refuse(StatusCode::BAD_REQUEST, "bad host".into()))?,
    );
    let outgoing = Outgoing { method: &parts.method, url: &url, host: &host, headers: &mut headers, body, empty_body };
    let body = add_credential(route, &fetched.credential, outgoing, max_body, now).await?;
    Ok(Prepared { url, method: parts.method, headers, body, ca_file: route.ca_file.clone() })
}
