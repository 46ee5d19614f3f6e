//! The proxy's unit tests: routing, header formats, refusals and signing, on requests
//! built in memory (`agent/tests/proxy.rs` runs a real client through a listener).

use axum::{body::Body, http::HeaderName};
use cloudpass_api::{broker::Credential, secret::SecretString};

use super::*;
use crate::store::tests::{api_key, fetched};

/// 2015-08-30T12:36:00Z, the time of the AWS SigV4 test suite.
fn suite_time() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160)
}

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
    let basic = Credential::UsernamePassword { username: "Aladdin".into(), password: SecretString::new("open sesame") };
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

async fn prep(routes: &[ProxyRoute], store: &CredentialStore, req: Request) -> Result<Prepared, (StatusCode, String)> {
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
        (request("GET", "http://evil.example.com/", &[], ""), StatusCode::FORBIDDEN, "evil.example.com is not served"),
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
    assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/s3/aws4_request"), "{auth}");
    assert!(auth.contains("x-amz-content-sha256"), "{auth}");
    assert_eq!(get.headers["x-amz-content-sha256"], "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
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
