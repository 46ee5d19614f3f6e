//! The proxy deliveries end to end: an app-side HTTP client using the agent as its
//! `HTTP_PROXY`, the agent adding the credential and originating TLS to a local HTTPS
//! upstream that echoes what it received (trusted through `--upstream-ca-file`'s
//! setting). moto checking real SigV4 signatures comes with the broker's test bed.

mod support;

use std::{net::SocketAddr, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use cloudpass_agent::{Agent, EndpointKind};
use cloudpass_api::agent::{AgentDelivery, AgentEndpoint};
use serde_json::{Value, json};
use support::{FakeBroker, Files, Tls, api_key, aws_keys, ok, settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes the request as JSON; `/redirect` answers 302 to another host.
async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    if uri.path() == "/redirect" {
        return (StatusCode::FOUND, [("location", "https://elsewhere.example.com/")]).into_response();
    }
    let headers: Vec<(String, String)> =
        headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
    Json(json!({"method": method.as_str(), "uri": uri.to_string(), "headers": headers, "body_len": body.len()}))
        .into_response()
}

fn header<'a>(echoed: &'a Value, name: &str) -> Vec<&'a str> {
    echoed["headers"].as_array().unwrap().iter().filter(|h| h[0] == name).map(|h| h[1].as_str().unwrap()).collect()
}

struct Setup {
    agent: Agent,
    upstream: SocketAddr,
    _broker: FakeBroker,
    _files: Files,
}

impl Setup {
    async fn new() -> Self {
        let tls = Tls::new();
        let (upstream, _) = tls.serve(Router::new().fallback(echo)).await;
        let broker = FakeBroker::start().await;
        broker.script("api", vec![ok("api", api_key("the-api-key"), 3600, 3000)]);
        broker.script("sig", vec![ok("sig", aws_keys(), 3600, 3000)]);
        broker.script("dead", vec![ok("dead", api_key("k"), 3600, 3000)]);
        let files = Files::new("t");
        // The upstream's private CA, as the webhook mounts a policy's server.tls ConfigMap.
        let ca_file = Some(files.write("server-ca.crt", &tls.ca_pem).to_string_lossy().into_owned());
        let deliveries = vec![
            AgentDelivery {
                policy: "api".into(),
                endpoint: AgentEndpoint::HttpHeader {
                    port: 0,
                    hosts: vec!["localhost".into()],
                    upstream_port: upstream.port(),
                    name: "Authorization".into(),
                    format: "Bearer {token}".into(),
                    ca_file: ca_file.clone(),
                },
                evidence: vec![],
            },
            AgentDelivery {
                policy: "sig".into(),
                endpoint: AgentEndpoint::AwsSigV4 {
                    port: 0,
                    hosts: vec!["127.0.0.1".into()],
                    upstream_port: upstream.port(),
                    service: Some("s3".into()),
                    region: Some("eu-west-1".into()),
                    ca_file: ca_file.clone(),
                },
                evidence: vec![],
            },
            AgentDelivery {
                policy: "dead".into(),
                endpoint: AgentEndpoint::HttpHeader {
                    port: 0,
                    hosts: vec!["127.0.0.2".into()],
                    upstream_port: std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
                    name: "X-Key".into(),
                    format: "{token}".into(),
                    ca_file: None,
                },
                evidence: vec![],
            },
        ];
        let s = settings(&broker, &files, deliveries);
        let agent = Agent::start(s).await.unwrap();
        let store = agent.store().clone();
        assert!(support::eventually(Duration::from_secs(5), || store.not_ready().is_empty()).await);
        Self { agent, upstream, _broker: broker, _files: files }
    }

    fn app_client(&self) -> reqwest::Client {
        let proxy = format!("http://{}", self.agent.local_addr(EndpointKind::Proxy).unwrap());
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(proxy).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }
}

#[tokio::test]
async fn adds_the_header_over_tls_replacing_the_apps() {
    let setup = Setup::new().await;
    let port = setup.upstream.port();
    let response = setup
        .app_client()
        .get(format!("http://localhost:{port}/v1/items?page=2"))
        .header("Authorization", "Bearer the-apps-own")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["uri"], "/v1/items?page=2");
    assert_eq!(header(&echoed, "authorization"), ["Bearer the-api-key"]);
    assert_eq!(header(&echoed, "host"), [format!("localhost:{port}")]);
    assert!(header(&echoed, "proxy-connection").is_empty());

    // Bodies stream through with their length.
    let response = setup
        .app_client()
        .post(format!("http://localhost:{port}/upload"))
        .body(vec![7u8; 100_000])
        .send()
        .await
        .unwrap();
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["body_len"], 100_000);

    // A redirect goes back to the app, not followed with the credential.
    let response = setup.app_client().get(format!("http://localhost:{port}/redirect")).send().await.unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(response.headers()["location"], "https://elsewhere.example.com/");
    setup.agent.shutdown().await;
}

#[tokio::test]
async fn signs_with_sigv4() {
    let setup = Setup::new().await;
    let port = setup.upstream.port();
    let response =
        setup.app_client().put(format!("http://127.0.0.1:{port}/bucket/key")).body("hello").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let echoed: Value = response.json().await.unwrap();
    let auth = header(&echoed, "authorization");
    assert_eq!(auth.len(), 1);
    assert!(
        auth[0].starts_with("AWS4-HMAC-SHA256 Credential=ASIATESTKEY/")
            && auth[0].contains("/eu-west-1/s3/aws4_request"),
        "{auth:?}"
    );
    assert_eq!(header(&echoed, "x-amz-security-token"), ["test-session-token"]);
    assert_eq!(header(&echoed, "x-amz-content-sha256"), ["UNSIGNED-PAYLOAD"]);
    assert_eq!(echoed["body_len"], 5);
    setup.agent.shutdown().await;
}

#[tokio::test]
async fn refuses_other_hosts_connect_and_forwarded_requests() {
    let setup = Setup::new().await;
    let client = setup.app_client();
    let port = setup.upstream.port();
    let other = client.get("http://example.com/").send().await.unwrap();
    assert_eq!(other.status(), 403);
    assert!(other.text().await.unwrap().contains("example.com is not served"));
    let metadata = client.get("http://169.254.169.254/latest/meta-data/").send().await.unwrap();
    assert_eq!(metadata.status(), 403);
    // Relayed requests, whichever header says so (RFC 7239's `Forwarded` included).
    let served = client.get(format!("http://localhost:{port}/")).send().await.unwrap();
    assert_eq!(served.status(), 200);
    for (name, value) in [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9;proto=http"),
        ("X-Forwarded-Host", "localhost"),
        ("X-Real-IP", "203.0.113.9"),
        ("Via", "1.1 relay"),
    ] {
        let forwarded = client.get(format!("http://localhost:{port}/")).header(name, value).send().await.unwrap();
        assert_eq!(forwarded.status(), 403, "{name}");
    }

    // CONNECT (what an https:// URL through HTTP_PROXY would do) is refused.
    let proxy = setup.agent.local_addr(EndpointKind::Proxy).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 12];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 405");

    // Another port of a served host is not served.
    let wrong_port = client.get("http://localhost:1/").send().await.unwrap();
    assert_eq!(wrong_port.status(), 403);
    // An upstream that is down: 502 with the reason, not a hang.
    let down = client.get("http://127.0.0.2/").send().await.unwrap();
    assert_eq!(down.status(), 502);
    assert!(down.text().await.unwrap().contains("upstream 127.0.0.2"));
    setup.agent.shutdown().await;
}
