//! What every loopback endpoint shares: the refusal of relayed requests (`Forwarded`,
//! `X-Forwarded-For` and their kin), request metrics, constant-time proof comparison
//! and strict query parsing.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{Next, from_fn, from_fn_with_state},
    response::{IntoResponse, Response},
};

use crate::{endpoint::EndpointKind, metrics::Metrics, store::CredentialStore};

/// What every endpoint reads: the credentials held and the metrics it counts into.
#[derive(Clone)]
pub struct Shared {
    /// The credential of every delivery, written by the refresh loops.
    pub store: Arc<CredentialStore>,
    /// The agent's metrics, served on the health port.
    pub metrics: Arc<Metrics>,
}

/// Headers that a proxy, load balancer or relay adds to a request it passes on: the
/// standard `Forwarded` (RFC 7239) and `Via` (RFC 9110, which every proxy must add), and
/// the de-facto `X-Forwarded-*`, `X-Real-IP` and client-address headers. An SDK asking
/// the agent directly over loopback sends none of them.
pub const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-original-forwarded-for",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "client-ip",
];

/// The forwarding header `headers` carry, if any.
pub fn forwarding_header(headers: &HeaderMap) -> Option<&'static str> {
    FORWARDING_HEADERS.iter().copied().find(|name| headers.contains_key(*name))
}

/// Wraps an endpoint's router (routes and fallback already added): requests carrying
/// one of the [`FORWARDING_HEADERS`] are refused with 403 before anything else (the app
/// is relaying someone else's request, the classic SSRF path to a credential endpoint),
/// and every answer is counted by endpoint and result.
pub fn guarded(router: Router, endpoint: EndpointKind, metrics: Arc<Metrics>) -> Router {
    router.layer(from_fn(reject_forwarded)).layer(from_fn_with_state((endpoint.label(), metrics), observe))
}

async fn reject_forwarded(request: Request, next: Next) -> Response {
    if let Some(header) = forwarding_header(request.headers()) {
        tracing::debug!(path = %request.uri().path(), header, "relayed request refused");
        return forbidden();
    }
    next.run(request).await
}

async fn observe(
    State((endpoint, metrics)): State<(&'static str, Arc<Metrics>)>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    metrics.request(endpoint, result_label(response.status()));
    response
}

/// The metrics label of an answer's status.
pub fn result_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        300..=399 => "redirect",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "too_large",
        402..=499 => "client_error",
        502 => "bad_gateway",
        503 => "unavailable",
        504 => "gateway_timeout",
        _ => "error",
    }
}

/// `401` without detail: missing proof.
pub fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response()
}

/// `403` without detail: wrong proof, or a forwarded request.
pub fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, "forbidden\n").into_response()
}

/// `404`, as the real services answer undefined paths.
pub fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// Compares a presented proof with the expected one in time independent of where they
/// differ (the length of the expected proof is not secret).
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let diff = presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// What [`check_proof`] found in a request's proof header.
pub enum Proof {
    /// Present once and equal to the expected proof: the request may be served.
    Valid,
    /// Absent: answered 401.
    Missing,
    /// Present and different, or given several times: answered 403.
    Wrong,
}

/// Checks the proof header `name` against `expected`, in constant time.
pub fn check_proof(headers: &HeaderMap, name: &str, expected: &[u8]) -> Proof {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Proof::Missing,
        (Some(v), None) if constant_time_eq(v.as_bytes(), expected) => Proof::Valid,
        _ => Proof::Wrong,
    }
}

/// Parses a query string into a map, refusing a parameter given twice (which value the
/// caller meant is unknowable, and picking one is how smuggling starts).
pub fn parse_query(raw: Option<&str>) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if params.insert(key.to_string(), value.into_owned()).is_some() {
            return Err(format!("parameter {key} is given more than once"));
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn proofs() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        let mut headers = HeaderMap::new();
        assert!(matches!(check_proof(&headers, "x-p", b"s"), Proof::Missing));
        headers.insert("x-p", HeaderValue::from_static("s"));
        assert!(matches!(check_proof(&headers, "x-p", b"s"), Proof::Valid));
        assert!(matches!(check_proof(&headers, "x-p", b"t"), Proof::Wrong));
        headers.append("x-p", HeaderValue::from_static("s"));
        assert!(matches!(check_proof(&headers, "x-p", b"s"), Proof::Wrong), "two values are not a proof");
    }

    #[tokio::test]
    async fn every_kind_of_relayed_request_is_refused() {
        use axum::{body::Body, routing::get};
        use tower::ServiceExt;

        let router = guarded(Router::new().route("/", get(|| async { "ok" })), EndpointKind::Health, Metrics::new());
        let call = |header: Option<(&'static str, &'static str)>| {
            let router = router.clone();
            async move {
                let mut request = Request::get("/");
                if let Some((name, value)) = header {
                    request = request.header(name, value);
                }
                router.oneshot(request.body(Body::empty()).unwrap()).await.unwrap().status()
            }
        };
        assert_eq!(call(None).await, StatusCode::OK);
        for header in [
            ("Forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43"),
            ("Forwarded", "for=\"[2001:db8:cafe::17]:4711\""),
            ("Via", "1.1 proxy.example"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Host", "metadata.google.internal"),
            ("X-Forwarded-Proto", "https"),
            ("X-Real-IP", "10.0.0.1"),
            ("True-Client-IP", "10.0.0.1"),
            ("x-client-ip", "10.0.0.1"),
        ] {
            assert_eq!(call(Some(header)).await, StatusCode::FORBIDDEN, "{header:?}");
        }
    }

    #[test]
    fn queries() {
        let q = parse_query(Some("api-version=2019-08-01&resource=https%3A%2F%2Fstorage.azure.com%2F")).unwrap();
        assert_eq!(q["resource"], "https://storage.azure.com/");
        assert!(parse_query(None).unwrap().is_empty());
        assert!(parse_query(Some("a=1&a=2")).unwrap_err().contains("more than once"));
        // Malformed escapes are kept literally, never a panic.
        assert_eq!(parse_query(Some("a=%zz%")).unwrap()["a"], "%zz%");
    }
}
