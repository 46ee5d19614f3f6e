//! What every step of the proxy shares as a relay of HTTP messages: the headers that
//! concern one connection, dropped both ways, and the proxy's own refusal of a request
//! it does not pass on.

use axum::{
    http::{HeaderMap, HeaderName, StatusCode, header::CONNECTION},
    response::{IntoResponse, Response},
};

/// Headers that concern one connection, not the request: never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The proxy's own answer to a request it does not pass on, with the reason as text.
pub(super) fn refuse(status: StatusCode, message: String) -> Response {
    (status, format!("cloudpass proxy: {message}\n")).into_response()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().map(HeaderName::as_str).chain(HOP_BY_HOP) {
        headers.remove(name);
    }
}
