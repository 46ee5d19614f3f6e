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

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use aws_sigv4::http_request::SignableBody;
use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{
        HeaderMap, HeaderName, HeaderValue, Method, StatusCode,
        header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING},
    },
    response::{IntoResponse, Response},
};
use base64::Engine;
use cloudpass_api::{agent::AgentEndpoint, broker::Credential, secret::SecretString, selector::host_matches};
use tracing::debug;

use crate::{
    common::{Shared, guarded},
    endpoint::EndpointKind,
    error::AgentError,
    sigv4::{sign_v4, sigv4_scope_from_host},
    store::{CredentialStore, credential_type},
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

/// What the proxy does for a policy's hosts.
#[derive(Clone, Debug)]
pub enum Action {
    /// Set a header.
    Header {
        /// Header name.
        name: HeaderName,
        /// Value with `{token}` / `{basic}`.
        format: String,
    },
    /// Sign with SigV4.
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
    /// Policy.
    pub policy: String,
    /// Host patterns (`api.example.com`, `*.s3.amazonaws.com`).
    pub hosts: Vec<String>,
    /// Port of the upstream's HTTPS.
    pub upstream_port: u16,
    /// What to add.
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

/// The header value for `format` with the credential substituted in one pass (so a
/// credential containing `{basic}` is never expanded again): `{token}` is an access
/// token, JWT or API key; `{basic}` is base64 of `username:password`.
pub fn header_value(format: &str, credential: &Credential) -> Result<SecretString, String> {
    let token = match credential {
        Credential::AccessToken { access_token, .. } => Some(access_token.expose()),
        Credential::Jwt { token } => Some(token.expose()),
        Credential::ApiKey { key } => Some(key.expose()),
        _ => None,
    };
    let basic = match credential {
        Credential::UsernamePassword { username, password } => {
            Some(base64::engine::general_purpose::STANDARD.encode(format!("{username}:{}", password.expose())))
        }
        _ => None,
    };
    let mut out = String::with_capacity(format.len() + 64);
    let mut rest = format;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{token}") {
            out.push_str(token.ok_or_else(|| format!("{{token}} needs a token, not {}", credential_type(credential)))?);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{basic}") {
            out.push_str(basic.as_deref().ok_or_else(|| {
                format!("{{basic}} needs a username and password, not {}", credential_type(credential))
            })?);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    // A header cannot carry control characters; a line break would split it. The usual
    // cause is a Secret written with a trailing newline. Never echo the value.
    if out.chars().any(|c| c.is_control() && c != '\t') {
        let from = if format.chars().any(|c| c.is_control() && c != '\t') { "the format" } else { "the credential" };
        return Err(format!(
            "{from} contains a line break or another control character, which a header cannot carry (a trailing newline in the Secret?)"
        ));
    }
    Ok(SecretString::new(out))
}

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

fn refuse(status: StatusCode, message: String) -> Response {
    (status, format!("cloudpass proxy: {message}\n")).into_response()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// A request ready to go upstream.
pub struct Prepared {
    /// `https://host[:port]/path?query`.
    pub url: String,
    /// Method.
    pub method: Method,
    /// Headers, credential added.
    pub headers: HeaderMap,
    /// Body.
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
    let stream = |body: Body| reqwest::Body::wrap_stream(body.into_data_stream());

    let body = match &route.action {
        Action::Header { name, format } => {
            let value = header_value(format, &fetched.credential)
                .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("policy {}: {e}", route.policy)))?;
            let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
                refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("policy {}: the credential is not a header value", route.policy),
                )
            })?;
            value.set_sensitive(true);
            headers.remove(name);
            headers.insert(name.clone(), value);
            if empty_body { reqwest::Body::from(Vec::new()) } else { stream(body) }
        }
        Action::SigV4 { service, region } => {
            let Credential::Aws { access_key_id, secret_access_key, session_token, .. } = &fetched.credential else {
                return Err(refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "policy {} holds a {} credential, not AWS keys",
                        route.policy,
                        credential_type(&fetched.credential)
                    ),
                ));
            };
            let derived = sigv4_scope_from_host(&host);
            let (Some(service), Some(region)) = (
                service.clone().or_else(|| derived.as_ref().map(|d| d.0.clone())),
                region.clone().or_else(|| derived.as_ref().map(|d| d.1.clone())),
            ) else {
                return Err(refuse(
                    StatusCode::BAD_GATEWAY,
                    format!("cannot derive the SigV4 service and region from host {host}; set them in the policy"),
                ));
            };
            let signing_error = |e: AgentError| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            let method = parts.method.as_str();
            let sign_with = |headers: &mut HeaderMap, signable| {
                sign_v4(
                    method,
                    &url,
                    headers,
                    signable,
                    access_key_id,
                    secret_access_key,
                    Some(session_token),
                    &service,
                    &region,
                    now,
                )
            };
            if empty_body {
                sign_with(&mut headers, SignableBody::Bytes(&[])).map_err(signing_error)?;
                reqwest::Body::from(Vec::new())
            } else if service == "s3" {
                // S3 takes an unsigned payload over TLS: the body streams through.
                sign_with(&mut headers, SignableBody::UnsignedPayload).map_err(signing_error)?;
                stream(body)
            } else {
                let bytes = axum::body::to_bytes(body, max_body).await.map_err(|_| {
                    refuse(StatusCode::PAYLOAD_TOO_LARGE, AgentError::BodyTooLarge { limit: max_body }.to_string())
                })?;
                headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                sign_with(&mut headers, SignableBody::Bytes(&bytes)).map_err(signing_error)?;
                reqwest::Body::from(bytes)
            }
        }
    };
    Ok(Prepared { url, method: parts.method, headers, body, ca_file: route.ca_file.clone() })
}

async fn handle(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let prepared = match prepare(&state.routes, &state.store, state.max_body, request, SystemTime::now()).await {
        Ok(p) => p,
        Err(refusal) => return refusal,
    };
    let host = prepared.headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
    let Some(client) = state.clients.get(&prepared.ca_file) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "no upstream client for this route".into());
    };
    let upstream = client.request(prepared.method, &prepared.url).headers(prepared.headers).body(prepared.body);
    match upstream.send().await {
        Ok(response) => {
            let mut response = axum::http::Response::<reqwest::Body>::from(response).map(Body::new);
            strip_hop_by_hop(response.headers_mut());
            response
        }
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            let error = AgentError::Upstream { host, message };
            debug!(error = %error, "proxied request failed");
            refuse(StatusCode::BAD_GATEWAY, error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        sigv4::tests::suite_time,
        store::tests::{api_key, fetched},
    };

    fn route(policy: &str, hosts: &[&str], action: Action) -> ProxyRoute {
        ProxyRoute {
            policy: policy.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            upstream_port: 443,
            action,
            ca_file: None,
        }
    }

    #[test]
    fn one_upstream_client_per_server_ca_and_a_missing_bundle_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.internal".into()]).unwrap();
        let pem_file = dir.path().join("ca.crt");
        std::fs::write(&pem_file, ca.cert.pem()).unwrap();
        let with = |policy: &str, file: Option<&std::path::Path>| ProxyRoute {
            ca_file: file.map(|f| f.to_string_lossy().into_owned()),
            ..route(policy, &[policy], bearer())
        };
        let routes = [with("a", Some(&pem_file)), with("b", Some(&pem_file)), with("c", None)];
        let clients = upstream_clients(&routes, None).unwrap();
        assert_eq!(clients.len(), 2, "shared by a and b, and the system roots for c");
        let missing = dir.path().join("missing.crt");
        let err = upstream_clients(&[with("d", Some(&missing))], None).unwrap_err().to_string();
        assert!(err.contains("missing.crt"), "{err}");
    }

    fn bearer() -> Action {
        Action::Header { name: HeaderName::from_static("authorization"), format: "Bearer {token}".into() }
    }

    fn sigv4() -> Action {
        Action::SigV4 { service: None, region: None }
    }

    fn aws_keys() -> Credential {
        Credential::Aws {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: SecretString::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: SecretString::new("6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"),
            account_id: None,
        }
    }

    #[test]
    fn routes_by_host_exact_before_wildcard() {
        let routes = vec![
            route("wild", &["*.example.com"], bearer()),
            route("exact", &["api.example.com"], bearer()),
            route("s3", &["*.s3.amazonaws.com"], sigv4()),
        ];
        assert_eq!(find_route(&routes, "api.example.com").unwrap().policy, "exact");
        assert_eq!(find_route(&routes, "other.example.com").unwrap().policy, "wild");
        assert_eq!(find_route(&routes, "bucket.s3.amazonaws.com").unwrap().policy, "s3");
        assert!(find_route(&routes, "example.com").is_none());
        assert!(find_route(&routes, "evil.com").is_none());
        assert!(find_route(&routes, "api.example.com.evil.com").is_none());
    }

    #[test]
    fn header_formats() {
        let key = api_key("k-123");
        assert_eq!(header_value("Bearer {token}", &key).unwrap().expose(), "Bearer k-123");
        assert_eq!(header_value("{token}", &key).unwrap().expose(), "k-123");
        assert_eq!(header_value("static {x}", &key).unwrap().expose(), "static {x}");
        let basic =
            Credential::UsernamePassword { username: "Aladdin".into(), password: SecretString::new("open sesame") };
        assert_eq!(header_value("Basic {basic}", &basic).unwrap().expose(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(header_value("Basic {basic}", &key).unwrap_err().contains("needs a username"));
        assert!(header_value("{token}", &basic).unwrap_err().contains("needs a token"));
        // A credential containing a placeholder is not expanded again.
        let tricky = api_key("{basic}");
        assert_eq!(header_value("{token}", &tricky).unwrap().expose(), "{basic}");
        let newline = Credential::ApiKey { key: SecretString::new("k-123\n") };
        let e = header_value("{token}", &newline).unwrap_err();
        assert!(e.starts_with("the credential contains a line break") && !e.contains("k-123"), "{e}");
        assert!(
            header_value("BB\0\n{token}", &key).unwrap_err().starts_with("the format"),
            "found by fuzz/hosts_and_formats"
        );
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)], body: &'static str) -> Request {
        let mut r = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(Body::from(body)).unwrap()
    }

    async fn prep(
        routes: &[ProxyRoute],
        store: &CredentialStore,
        req: Request,
    ) -> Result<Prepared, (StatusCode, String)> {
        match prepare(routes, store, 1024, req, suite_time()).await {
            Ok(p) => Ok(p),
            Err(r) => {
                let status = r.status();
                let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
                Err((status, String::from_utf8(body.to_vec()).unwrap()))
            }
        }
    }

    #[tokio::test]
    async fn adds_the_header_replacing_the_apps_and_drops_hop_by_hop() {
        let routes = vec![route("api", &["api.example.com"], bearer())];
        let store = CredentialStore::new(["api"]);
        store.put("api", fetched(api_key("tok"), 3600));
        let req = request(
            "GET",
            "http://api.example.com/v1/items?page=2",
            &[
                ("authorization", "Bearer app-own"),
                ("Authorization", "Bearer second"),
                ("proxy-authorization", "Basic x"),
                ("connection", "keep-alive, x-private"),
                ("x-private", "1"),
                ("accept", "application/json"),
            ],
            "",
        );
        let p = prep(&routes, &store, req).await.unwrap();
        assert_eq!(p.url, "https://api.example.com/v1/items?page=2");
        assert_eq!(p.headers.get_all("authorization").iter().collect::<Vec<_>>(), ["Bearer tok"]);
        assert!(p.headers["authorization"].is_sensitive());
        assert_eq!(p.headers["host"], "api.example.com");
        assert_eq!(p.headers["accept"], "application/json");
        for gone in ["proxy-authorization", "connection", "x-private"] {
            assert!(!p.headers.contains_key(gone), "{gone}");
        }
    }

    #[tokio::test]
    async fn refusals() {
        let mut routes = vec![route("api", &["api.example.com"], bearer())];
        routes[0].upstream_port = 8443;
        let store = CredentialStore::new(["api"]);
        let cases: Vec<(Request, StatusCode, &str)> = vec![
            (request("CONNECT", "api.example.com:443", &[], ""), StatusCode::METHOD_NOT_ALLOWED, "CONNECT"),
            (request("GET", "/v1/items", &[("host", "api.example.com")], ""), StatusCode::BAD_REQUEST, "absolute"),
            (request("GET", "https://api.example.com/", &[], ""), StatusCode::BAD_REQUEST, "absolute"),
            (
                request("GET", "http://evil.example.com/", &[], ""),
                StatusCode::FORBIDDEN,
                "evil.example.com is not served",
            ),
            (request("GET", "http://169.254.169.254/latest", &[], ""), StatusCode::FORBIDDEN, "not served"),
            (request("GET", "http://api.example.com:9999/", &[], ""), StatusCode::FORBIDDEN, "port 9999"),
            (request("GET", "http://api.example.com/", &[], ""), StatusCode::SERVICE_UNAVAILABLE, "not fetched"),
        ];
        for (req, want, text) in cases {
            let uri = req.uri().clone();
            let (status, body) = prep(&routes, &store, req).await.err().unwrap();
            assert_eq!(status, want, "{uri}: {body}");
            assert!(body.contains(text), "{uri}: {body}");
        }
        store.put("api", fetched(api_key("tok"), 3600));
        for uri in ["http://api.example.com:8443/x", "http://API.example.com./x", "http://api.example.com:80/x"] {
            let p = prep(&routes, &store, request("GET", uri, &[], "")).await.unwrap();
            assert_eq!(p.url, "https://api.example.com:8443/x");
            assert_eq!(p.headers["host"], "api.example.com:8443");
        }
    }

    #[tokio::test]
    async fn sigv4_requests_are_signed_for_the_derived_scope() {
        let routes = vec![
            route("s3", &["*.s3.eu-west-1.amazonaws.com"], sigv4()),
            route("sqs", &["sqs.eu-west-1.amazonaws.com"], sigv4()),
            route("local", &["localhost"], Action::SigV4 { service: None, region: Some("eu-west-1".into()) }),
        ];
        let store = CredentialStore::new(["s3", "sqs", "local"]);
        for p in ["s3", "sqs", "local"] {
            store.put(p, fetched(aws_keys(), 3600));
        }
        let get = prep(&routes, &store, request("GET", "http://bucket.s3.eu-west-1.amazonaws.com/key%20one", &[], ""))
            .await
            .unwrap();
        let auth = get.headers["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/s3/aws4_request"),
            "{auth}"
        );
        assert!(auth.contains("x-amz-content-sha256"), "{auth}");
        assert_eq!(
            get.headers["x-amz-content-sha256"],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(get.headers.contains_key("x-amz-security-token"));

        let put = request("PUT", "http://bucket.s3.eu-west-1.amazonaws.com/k", &[("content-length", "5")], "hello");
        let put = prep(&routes, &store, put).await.unwrap();
        assert_eq!(put.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD", "S3 bodies stream");
        assert_eq!(put.headers["content-length"], "5");

        let post = request(
            "POST",
            "http://sqs.eu-west-1.amazonaws.com/",
            &[("content-type", "application/x-www-form-urlencoded"), ("content-length", "20")],
            "Action=ListQueues&V=",
        );
        let post = prep(&routes, &store, post).await.unwrap();
        let auth = post.headers["authorization"].to_str().unwrap();
        assert!(auth.contains("/eu-west-1/sqs/aws4_request") && auth.contains("content-type"), "{auth}");
        assert!(!post.headers.contains_key("x-amz-content-sha256"));

        let too_big = request(
            "POST",
            "http://sqs.eu-west-1.amazonaws.com/",
            &[("content-length", "2000")],
            Box::leak("x".repeat(2000).into_boxed_str()),
        );
        assert_eq!(prep(&routes, &store, too_big).await.err().unwrap().0, StatusCode::PAYLOAD_TOO_LARGE);

        let (status, body) = prep(&routes, &store, request("GET", "http://localhost/", &[], "")).await.err().unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("set them in the policy"), "{body}");

        store.put("sqs", fetched(api_key("k"), 3600));
        let (status, body) =
            prep(&routes, &store, request("GET", "http://sqs.eu-west-1.amazonaws.com/", &[], "")).await.err().unwrap();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("not AWS keys"), "{body}");
    }
}
