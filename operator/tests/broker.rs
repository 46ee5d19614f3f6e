//! The broker end to end: the real `cloudpass-operator` binary (controller and broker)
//! against the real apiserver, agents' tokens minted by TokenRequest and bound to pods,
//! and credentials obtained from the cloud fakes under `e2e/` (which verify the
//! broker-signed tokens against the broker's own issuer documents, as clouds do).
//!
//! One operator process serves the whole suite; each test works in its own namespace.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use cloudpass_e2e::{
    ControlPlane, TokenOptions,
    broker::{BrokerOptions, RunningBroker},
    cloudpass_object,
};
use serde_json::{Value, json};

/// The operator under test and the control plane it runs against.
struct Broker {
    cp: &'static ControlPlane,
    running: RunningBroker,
}

impl std::ops::Deref for Broker {
    type Target = RunningBroker;
    fn deref(&self) -> &RunningBroker {
        &self.running
    }
}

impl Broker {
    /// Asks for a credential; the status and body.
    async fn ask(&self, token: Option<&str>, body: Value) -> (u16, Value) {
        self.running.ask(token, &body).await.unwrap()
    }
}

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let cp = ControlPlane::shared();
                let options = BrokerOptions {
                    namespace: "cloudpass-broker".into(),
                    // Short, so that a deleted pod's token is refused within the test.
                    token_cache_ttl: "1s".into(),
                    // Everything at trace level, dependencies included: the tests search the
                    // whole output for every token and secret they handled.
                    log_level: "trace".into(),
                    ..Default::default()
                };
                let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator"));
                Broker { cp, running: RunningBroker::start(cp, binary, &options).await.unwrap() }
            })
        })
        .join()
        .expect("operator start panicked")
    })
}

/// A second replica of the broker, as production runs it: `--allow-private-upstreams`
/// off (the suite's main broker has it on, since the cloud fakes listen on loopback). It
/// serves the same compiled configs and issuer keys, and stands by on a Lease held by
/// someone else, so it never reconciles and never takes over from the main operator.
/// Its own metrics count only what the tests send it: one test at a time holds it.
async fn strict_broker() -> (tokio::sync::MutexGuard<'static, ()>, &'static RunningBroker) {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let turn = TURN.lock().await;
    (turn, start_strict_broker())
}

fn start_strict_broker() -> &'static RunningBroker {
    static STRICT: OnceLock<RunningBroker> = OnceLock::new();
    let main = broker();
    STRICT.get_or_init(|| {
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let (namespace, lease) = ("cloudpass-broker", "cloudpass-strict-standby");
                let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S").to_string();
                let held = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": lease, "namespace": namespace},
                    "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 86400,
                             "acquireTime": format!("{now}.000000Z"), "renewTime": format!("{now}.000000Z")}
                });
                main.cp.apply_yaml(Some(namespace), &held.to_string()).unwrap();
                let options = BrokerOptions {
                    namespace: namespace.into(),
                    token_cache_ttl: "60s".into(),
                    log_level: "debug".into(),
                    allow_private_upstreams: false,
                    instance: "strict".into(),
                    lease_name: Some(lease.into()),
                    // The cloud fakes' certificates come from the main broker's CA: with
                    // that CA trusted, only the egress policy keeps this one away.
                    extra_upstream_ca_pem: Some(main.ca.cert_pem()),
                    issuer_url: None,
                    ..Default::default()
                };
                let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator"));
                RunningBroker::start(main.cp, binary, &options).await.unwrap()
            })
        })
        .join()
        .expect("the strict operator's start panicked")
    })
}

/// Waits until `broker` answers `policy` with something other than "no Ready policy".
async fn ask_loaded(broker: &RunningBroker, token: &str, body: Value) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = broker.ask(Some(token), &body).await.unwrap();
        let loading = status == 403 && answer["message"].as_str().is_some_and(|m| m.contains("no Ready AccessPolicy"));
        if !loading || Instant::now() > deadline {
            return (status, answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A counter of `broker`'s metrics, by its exact series (`name{labels}`); 0 when absent.
async fn counter(broker: &RunningBroker, series: &str) -> f64 {
    let text = broker.metrics().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// TokenReviews the apiserver has answered so far (`apiserver_request_total`), from
/// every client.
fn apiserver_token_reviews(cp: &ControlPlane) -> f64 {
    let text = cp.kubectl_ok(&["get", "--raw", "/metrics"]).unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains(r#"resource="tokenreviews""#))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, n)| n.parse::<f64>().ok()))
        .sum()
}

/// A namespace with a service account and a pod running as it, and a token bound to the pod.
struct Workload {
    namespace: String,
    pod: String,
    token: String,
}

async fn workload(cp: &ControlPlane, namespace: &str, pod: &str, sa: &str, labels: Value) -> Workload {
    cp.create_namespace(namespace, &[]).await.unwrap();
    cp.create_service_account(namespace, sa).await.unwrap();
    let token = pod_token(cp, namespace, pod, sa, labels).await;
    Workload { namespace: namespace.into(), pod: pod.into(), token }
}

async fn pod_token(cp: &ControlPlane, namespace: &str, pod: &str, sa: &str, labels: Value) -> String {
    cloudpass_e2e::broker::pod_token(cp, namespace, pod, sa, labels).await.unwrap()
}

async fn wait_ready(cp: &ControlPlane, namespace: &str, policies: &[&str]) {
    for p in policies {
        cp.wait_for_condition("accesspolicy", namespace, p, "Ready", "True", Duration::from_secs(30)).await.unwrap();
    }
}

/// Waits until the broker answers `policy` with something other than "no Ready policy"
/// (the broker's config watch trails the policy's Ready condition slightly).
async fn ask_when_loaded(b: &Broker, token: &str, body: Value) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = b.ask(Some(token), body.clone()).await;
        let loading = status == 403 && answer["message"].as_str().is_some_and(|m| m.contains("no Ready AccessPolicy"));
        if !loading || Instant::now() > deadline {
            return (status, answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const K8S_TRUST: &str = r#"
apiVersion: cloudpass.dev/v1alpha1
kind: TrustProvider
metadata: {name: this-cluster}
spec:
  kubernetesServiceAccount:
    serviceAccounts: ["orders"]
"#;

fn policy(
    name: &str,
    app: &str,
    credential: &str,
    server: Value,
    delivery: Value,
    conditions: Option<Value>,
) -> String {
    let mut spec = json!({
        "client": {"podSelector": {"matchLabels": {"app": app}}},
        "trustProviders": [{"name": "this-cluster"}],
        "server": server,
        "credentialProvider": {"name": credential},
        "delivery": delivery,
    });
    if let Some(c) = conditions {
        spec["conditions"] = c;
    }
    cloudpass_object("AccessPolicy", name, spec).to_string()
}

#[tokio::test]
async fn kubernetes_trust_with_secret_and_issuer_credentials() {
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let w = workload(cp, "broker-k8s", "orders-1", "orders", json!({"app": "orders"})).await;
    let ns = w.namespace.as_str();
    cp.kubectl_ok(&["create", "secret", "generic", "weather", "-n", ns, "--from-literal=api-key=wx-Key-7f3a9c"])
        .unwrap();
    cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "db",
        "-n",
        ns,
        "--from-literal=username=alice",
        "--from-literal=password=Pw-5e1d2b",
    ])
    .unwrap();
    cp.apply_yaml(Some(ns), K8S_TRUST).unwrap();
    let providers = r#"
apiVersion: cloudpass.dev/v1alpha1
kind: CredentialProvider
metadata: {name: weather-key}
spec: {apiKey: {secretRef: {name: weather, key: api-key}}}
---
apiVersion: cloudpass.dev/v1alpha1
kind: CredentialProvider
metadata: {name: db-login}
spec: {usernamePassword: {secretRef: {name: db}}}
---
apiVersion: cloudpass.dev/v1alpha1
kind: CredentialProvider
metadata: {name: partner-jwt}
spec: {oidcToken: {audience: "https://partner.example.com", lifetime: 10m, subject: ServiceAccount}}
"#;
    cp.apply_yaml(Some(ns), providers).unwrap();
    let http = |hosts: &[&str]| json!({"kind": "http", "hosts": hosts});
    let header = |format: &str| json!({"httpHeader": {"name": "Authorization", "format": format}});
    // From two to three hours from now (UTC): closed, whatever the hour the test runs.
    let this_hour = jiff::Timestamp::now().as_second() / 3600;
    let hour = |h: i64| format!("{:02}:00", (this_hour + h).rem_euclid(24));
    let (start, end) = (hour(2), hour(3));
    for doc in [
        policy("weather", "orders", "weather-key", http(&["api.weather.example.com"]), header("{token}"), None),
        policy("db", "orders", "db-login", http(&["db.example.com"]), header("Basic {basic}"), None),
        policy("partner", "orders", "partner-jwt", http(&["partner.example.com"]), header("Bearer {token}"), None),
        policy("not-mine", "billing", "weather-key", http(&["api.weather.example.com"]), header("{token}"), None),
        policy(
            "night-only",
            "orders",
            "weather-key",
            http(&["night.weather.example.com"]),
            header("{token}"),
            Some(json!({"timeWindows": [{"timeZone": "UTC", "days": [], "start": start, "end": end}]})),
        ),
    ] {
        cp.apply_yaml(Some(ns), &doc).unwrap();
    }
    wait_ready(cp, ns, &["weather", "db", "partner", "not-mine", "night-only"]).await;

    // API key and username/password, read from the Secret at use.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "weather"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["credential"], json!({"type": "apiKey", "key": "wx-Key-7f3a9c"}));
    let expires: jiff::Timestamp = answer["expiresAt"].as_str().unwrap().parse().unwrap();
    let refresh: jiff::Timestamp = answer["refreshAt"].as_str().unwrap().parse().unwrap();
    assert!(refresh < expires && expires > jiff::Timestamp::now(), "{answer}");
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "db"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["credential"], json!({"type": "usernamePassword", "username": "alice", "password": "Pw-5e1d2b"}));

    // A broker-signed JWT verifies against the broker's own published issuer documents.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "partner"})).await;
    assert_eq!(status, 200, "{answer}");
    let jwt = answer["credential"]["token"].as_str().unwrap().to_owned();
    let discovery: Value =
        b.http().get(format!("{}/.well-known/openid-configuration", b.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(discovery["issuer"], b.url.as_str());
    let jwks: jsonwebtoken::jwk::JwkSet =
        b.http().get(discovery["jwks_uri"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(&jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(header.kid.as_deref().unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&[&b.url]);
    validation.set_audience(&["https://partner.example.com"]);
    let claims = jsonwebtoken::decode::<Value>(&jwt, &key, &validation).unwrap().claims;
    assert_eq!(claims["sub"], "system:cloudpass:broker-k8s:partner-jwt:orders");
    assert_eq!(claims["cloudpass.dev"]["pod"], w.pod.as_str());
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 600);

    // Denials say why.
    let denied = |answer: &Value, want: &str| {
        assert_eq!(answer["code"], "Denied", "{answer}");
        assert!(answer["message"].as_str().unwrap().contains(want), "{want}: {answer}");
    };
    let (status, answer) = b.ask(Some(&w.token), json!({"policy": "not-mine"})).await;
    assert_eq!(status, 403);
    denied(&answer, "policy not-mine does not select pod orders-1");
    let (status, answer) = b.ask(Some(&w.token), json!({"policy": "night-only"})).await;
    assert_eq!(status, 403);
    denied(&answer, &format!("outside the policy's time windows: {start}-{end} UTC"));
    let (status, answer) = b.ask(Some(&w.token), json!({"policy": "nothing-here"})).await;
    assert_eq!(status, 403);
    denied(&answer, "no Ready AccessPolicy nothing-here in namespace broker-k8s");
    let (status, answer) = b.ask(Some(&w.token), json!({"policy": "weather", "namespace": "default"})).await;
    assert_eq!(status, 403);
    denied(&answer, "cannot use policies of namespace default");

    // A service account the trust provider does not name.
    cp.create_service_account(ns, "intruder").await.unwrap();
    let intruder = pod_token(cp, ns, "intruder-1", "intruder", json!({"app": "orders"})).await;
    let (status, answer) = b.ask(Some(&intruder), json!({"policy": "weather"})).await;
    assert_eq!(status, 403);
    denied(&answer, "trust provider this-cluster refused the caller: service account intruder is not trusted");

    // Unauthenticated: no token, a token for another audience, an unbound token, garbage.
    let (status, answer) = b.ask(None, json!({"policy": "weather"})).await;
    assert_eq!((status, answer["code"].as_str()), (401, Some("Unauthenticated")));
    let other_aud = TokenOptions { audiences: vec!["sts.amazonaws.com".into()], ..Default::default() };
    let wrong_aud = cp.token(ns, "orders", &other_aud).await.unwrap();
    let (status, _) = b.ask(Some(&wrong_aud), json!({"policy": "weather"})).await;
    assert_eq!(status, 401);
    let unbound = cp.token(ns, "orders", &TokenOptions::default()).await.unwrap();
    let (status, answer) = b.ask(Some(&unbound), json!({"policy": "weather"})).await;
    assert_eq!(status, 401);
    assert!(answer["message"].as_str().unwrap().contains("not bound to a pod"), "{answer}");
    let (status, _) = b.ask(Some("not-a-token"), json!({"policy": "weather"})).await;
    assert_eq!(status, 401);

    // Bad requests.
    let raw =
        |body: &'static str| b.http().post(format!("{}/v1/credentials", b.url)).bearer_auth(&w.token).body(body).send();
    let resp = raw("{not json").await.unwrap();
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.unwrap();
    assert!(answer["message"].as_str().unwrap().contains("not a credential request"), "{answer}");
    let resp = raw(r#"{"policy":"weather","pod":"other"}"#).await.unwrap();
    assert_eq!(resp.status(), 400);
    let big = format!(r#"{{"policy":"{}"}}"#, "x".repeat(100_000));
    let resp = b.http().post(format!("{}/v1/credentials", b.url)).bearer_auth(&w.token).body(big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(b.http().get(format!("{}/v1/nothing", b.url)).send().await.unwrap().status(), 404);

    // Deleting the policy revokes: the next request is denied.
    cp.kubectl_ok(&["delete", "accesspolicy", "db", "-n", ns]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = b.ask(Some(&w.token), json!({"policy": "db"})).await;
        if status == 403 {
            // The broker's watch of deletions refuses before the config is compiled again.
            denied(&answer, "AccessPolicy db in namespace broker-k8s is deleted or being deleted");
            break;
        }
        assert!(Instant::now() < deadline, "still served after the policy was deleted: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A deleted pod's token stops working (after the 1 s token cache of this suite).
    cp.kubectl_ok(&["delete", "pod", &w.pod, "-n", ns, "--wait=true"]).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, answer) = b.ask(Some(&w.token), json!({"policy": "weather"})).await;
    assert_eq!(status, 401, "{answer}");

    // Every decision is audited, without the secrets.
    let log = b.log_text();
    let records: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "cloudpass.dev/audit" && v["namespace"] == "broker-k8s")
        .collect();
    let allowed =
        records.iter().find(|r| r["outcome"] == "allowed" && r["policy"] == "weather").expect("allowed record");
    assert_eq!(allowed["pod"], "orders-1");
    assert_eq!(allowed["serviceAccount"], "orders");
    assert_eq!(allowed["credentialProvider"], "weather-key");
    assert_eq!(allowed["credentialKind"], "apiKey");
    assert_eq!(allowed["trustProviders"][0]["name"], "this-cluster");
    assert_eq!(allowed["trustProviders"][0]["passed"], true);
    assert!(allowed["expiresAt"].is_string() && allowed["latencyMs"].is_number() && allowed["decisionId"].is_string());
    let refused = records.iter().find(|r| r["policy"] == "night-only").expect("denied record");
    assert_eq!(refused["outcome"], "denied");
    assert!(refused["reason"].as_str().unwrap().contains("time windows"));
    let metrics = b.running.metrics().await.unwrap();
    assert!(metrics.contains(r#"cloudpass_operator_broker_requests_total{outcome="allowed",code="OK"}"#), "{metrics}");
    assert!(metrics.contains(r#"cloudpass_operator_broker_requests_total{outcome="denied",code="Denied"}"#));
    assert!(metrics.contains("cloudpass_operator_broker_request_duration_seconds_bucket"));
    for secret in ["wx-Key-7f3a9c", "Pw-5e1d2b", jwt.as_str(), w.token.as_str(), intruder.as_str(), unbound.as_str()] {
        assert!(!log.contains(secret), "a secret or token appears in the operator's output");
        assert!(!metrics.contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_told_what_to_serve_for_the_policies_its_pod_lists() {
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-agent-config";
    cp.create_namespace(ns, &[]).await.unwrap();
    cp.create_service_account(ns, "orders").await.unwrap();
    cp.kubectl_ok(&["create", "secret", "generic", "weather", "-n", ns, "--from-literal=api-key=wx-Key-2b8d"]).unwrap();
    let http = json!({"kind": "http", "hosts": ["api.weather.example.com"], "port": 8443});
    let header = json!({"httpHeader": {"name": "X-Api-Key", "format": "{token}"}});
    let docs = [
        K8S_TRUST.to_owned(),
        credential_provider("weather-key", json!({"apiKey": {"secretRef": {"name": "weather", "key": "api-key"}}})),
        policy("weather", "orders", "weather-key", http.clone(), header.clone(), None),
        policy("billing-only", "billing", "weather-key", http, header, None),
    ];
    apply_ready(cp, ns, &docs, &["weather", "billing-only"]).await;
    let listed = json!({"cloudpass.dev/policies": "weather,billing-only,gone"});
    let token =
        cloudpass_e2e::broker::annotated_pod_token(cp, ns, "orders-1", "orders", json!({"app": "orders"}), listed)
            .await
            .unwrap();

    // The broker's config watch trails the policies' Ready condition slightly.
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let (status, answer) = b.agent_config(Some(&token)).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        if answer["deliveries"].as_array().is_some_and(|d| !d.is_empty()) || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        answer["deliveries"],
        json!([{"policy": "weather", "endpoint": {"type": "httpHeader", "port": 15024,
            "hosts": ["api.weather.example.com"], "upstreamPort": 8443, "name": "X-Api-Key", "format": "{token}"}}]),
        "the endpoint the webhook pointed the app at: {answer}"
    );
    let unavailable = answer["unavailable"].as_array().unwrap();
    assert_eq!(unavailable.len(), 2, "{answer}");
    assert_eq!(unavailable[0]["policy"], "billing-only");
    assert!(unavailable[0]["message"].as_str().unwrap().contains("does not select pod orders-1"), "{answer}");
    assert_eq!(unavailable[1]["policy"], "gone");
    assert!(unavailable[1]["message"].as_str().unwrap().contains("no Ready AccessPolicy gone"), "{answer}");
    assert!(!answer.to_string().contains("wx-Key-2b8d"), "no credential in the answer");

    let (status, refused) = b.agent_config(None).await.unwrap();
    assert_eq!((status, refused["code"].as_str()), (401, Some("Unauthenticated")), "{refused}");
    let (status, refused) = b.agent_config(Some("not-a-token")).await.unwrap();
    assert_eq!(status, 401, "{refused}");
    let logs = b.log_text();
    assert!(!logs.contains(&token), "the token is never logged");
}

/// Applies a TrustProvider, CredentialProviders and policies, and waits until the
/// policies are Ready.
async fn apply_ready(cp: &ControlPlane, ns: &str, docs: &[String], policies: &[&str]) {
    for doc in docs {
        cp.apply_yaml(Some(ns), doc).unwrap();
    }
    wait_ready(cp, ns, policies).await;
}

fn credential_provider(name: &str, spec: Value) -> String {
    cloudpass_object("CredentialProvider", name, spec).to_string()
}

fn sdk(kind: &str, extra: Value) -> Value {
    let mut server = json!({"kind": kind});
    if let (Some(s), Some(e)) = (server.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_sts_credentials_through_the_gate_work_in_moto() {
    use cloudpass_e2e::moto::MotoServer;
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-aws";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    let moto = MotoServer::start().await.unwrap();
    moto.create_bucket("orders").await.unwrap();
    let (role, gate) = s3_role_behind_gate(b, &moto, ns, "orders-s3").await;
    let sts = |subject: &str, audience: Option<&str>| {
        let mut spec = json!({"roleArn": role, "region": "us-east-1", "stsEndpoint": gate.url(), "subject": subject,
                              "sessionName": "cloudpass-{pod}"});
        if let Some(a) = audience {
            spec["audience"] = json!(a);
        }
        json!({"awsSts": spec})
    };
    let sdk_delivery = json!({"sdkEndpoint": {}});
    apply_ready(
        cp,
        ns,
        &[
            K8S_TRUST.to_owned(),
            credential_provider("s3", sts("Provider", None)),
            credential_provider("s3-per-sa", sts("ServiceAccount", None)),
            credential_provider("s3-wrong-aud", sts("Provider", Some("example.com"))),
            policy("to-s3", "orders", "s3", sdk("aws", json!({})), sdk_delivery.clone(), None),
            policy("per-sa", "per-sa", "s3-per-sa", sdk("aws", json!({})), sdk_delivery.clone(), None),
            policy("wrong-aud", "wrong-aud", "s3-wrong-aud", sdk("aws", json!({})), sdk_delivery.clone(), None),
        ],
        &["to-s3", "per-sa", "wrong-aud"],
    )
    .await;

    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "to-s3"})).await;
    assert_eq!(status, 200, "{answer}");
    let cred = &answer["credential"];
    assert_eq!(cred["type"], "aws");
    assert_eq!(cred["accountId"], "123456789012");
    assert_eq!(gate.calls(), 1);

    // The credentials are real: moto, with SigV4 and IAM enforced, accepts them for S3.
    moto.enforce_auth(0).await.unwrap();
    let script = r#"
import boto3
s3 = boto3.client("s3")
s3.put_object(Bucket="orders", Key="hello.txt", Body=b"from cloudpass")
print(s3.get_object(Bucket="orders", Key="hello.txt")["Body"].read().decode())
"#;
    let env = [
        ("AWS_ACCESS_KEY_ID", cred["accessKeyId"].as_str().unwrap()),
        ("AWS_SECRET_ACCESS_KEY", cred["secretAccessKey"].as_str().unwrap()),
        ("AWS_SESSION_TOKEN", cred["sessionToken"].as_str().unwrap()),
    ];
    assert_eq!(moto.python_with_env(script, &env).await.unwrap().trim(), "from cloudpass");
    let forged =
        [("AWS_ACCESS_KEY_ID", "ASIAFORGED000000000"), ("AWS_SECRET_ACCESS_KEY", "x"), ("AWS_SESSION_TOKEN", "y")];
    assert!(moto.python_with_env(script, &forged).await.is_err(), "moto enforces authentication");
    moto.disable_auth().await.unwrap();

    // Cached: asking again costs no STS call.
    let (status, again) = b.ask(Some(&w.token), json!({"policy": "to-s3"})).await;
    assert_eq!(status, 200);
    assert_eq!(again["credential"]["accessKeyId"], cred["accessKeyId"]);
    assert_eq!(gate.calls(), 1, "a cache hit");

    // Concurrent first requests of another pod (another session name) coalesce into one call.
    let token2 = pod_token(cp, ns, "orders-2", "orders", json!({"app": "orders"})).await;
    let asks: Vec<_> = (0..8).map(|_| b.ask(Some(&token2), json!({"policy": "to-s3"}))).collect();
    let answers = futures::future::join_all(asks).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let keys: std::collections::BTreeSet<_> =
        answers.iter().map(|(_, a)| a["credential"]["accessKeyId"].to_string()).collect();
    assert_eq!(keys.len(), 1, "one credential for all concurrent requests");
    assert_eq!(gate.calls(), 2, "one upstream call for eight concurrent requests");

    // The cloud refuses a subject its trust policy does not name, and an audience its
    // provider does not list; the broker reports the upstream code.
    for (app, policy_name, code) in
        [("per-sa", "per-sa", "AccessDenied"), ("wrong-aud", "wrong-aud", "InvalidIdentityToken")]
    {
        let token = pod_token(cp, ns, &format!("{app}-1"), "orders", json!({"app": app})).await;
        let (status, answer) = b.ask(Some(&token), json!({"policy": policy_name})).await;
        assert_eq!(status, 502, "{answer}");
        assert_eq!(answer["code"], "UpstreamFailure");
        assert_eq!(answer["upstreamCode"], code, "{answer}");
    }

    // An upstream outage is a 502 with the upstream code, remembered briefly, then healed.
    let token3 = pod_token(cp, ns, "orders-3", "orders", json!({"app": "orders"})).await;
    gate.fail_next(1, 503);
    let (status, answer) = b.ask(Some(&token3), json!({"policy": "to-s3"})).await;
    assert_eq!((status, answer["upstreamCode"].as_str()), (502, Some("ServiceUnavailable")), "{answer}");
    let calls = gate.calls();
    let (status, _) = b.ask(Some(&token3), json!({"policy": "to-s3"})).await;
    assert_eq!((status, gate.calls()), (502, calls), "the failure is served from the cache for a few seconds");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, answer) = b.ask(Some(&token3), json!({"policy": "to-s3"})).await;
    assert_eq!(status, 200, "{answer}");

    let log = b.log_text();
    for (_, a) in &answers {
        for field in ["secretAccessKey", "sessionToken"] {
            assert!(!log.contains(a["credential"][field].as_str().unwrap()), "{field} in the operator's output");
        }
    }
    assert!(!log.contains(w.token.as_str()) && !log.contains(token2.as_str()));
}

const TENANT: &str = "8c1d3f0e-7b6a-4e55-9f21-0a3b5c7d9e11";
const CLIENT_ID: &str = "4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55";
const OBJECT_ID: &str = "0b7e6d5c-4a39-4e28-8f17-2d3c4b5a6978";

/// An Entra ID fake whose one app trusts the broker's tokens for
/// `system:cloudpass:<ns>:blob`.
async fn entra_trusting(b: &Broker, ns: &str) -> cloudpass_e2e::fakes::entra::EntraFake {
    use cloudpass_e2e::fakes::entra::{EntraApp, EntraConfig, EntraFake, FederatedCredential};
    let app = EntraApp {
        client_id: CLIENT_ID.into(),
        object_id: OBJECT_ID.into(),
        federated_credentials: vec![FederatedCredential::new(&b.url, &format!("system:cloudpass:{ns}:blob"))],
    };
    let config = EntraConfig { tenant_id: TENANT.into(), apps: vec![app], issuer_ca_pem: b.ca.cert_pem() };
    EntraFake::start(config, &b.ca).await.unwrap()
}

/// A role `name` in `moto` allowed every S3 action, trusting the broker's tokens for
/// `system:cloudpass:<ns>:s3` (audience `sts.amazonaws.com`), behind an STS gate: the
/// role's ARN and the gate.
async fn s3_role_behind_gate(
    b: &Broker,
    moto: &cloudpass_e2e::moto::MotoServer,
    ns: &str,
    name: &str,
) -> (String, cloudpass_e2e::fakes::aws_sts::StsGate) {
    use cloudpass_e2e::fakes::aws_sts::AwsRoleTrust;
    let s3_all =
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
    let role = moto.create_role(name, &s3_all).await.unwrap();
    let mut trust = AwsRoleTrust::new(&role, &b.url, &format!("system:cloudpass:{ns}:s3"));
    trust.audiences = vec!["sts.amazonaws.com".into()];
    let gate = b.sts_gate(moto, vec![trust]).await.unwrap();
    (role, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_google_and_oauth2_credentials() {
    use cloudpass_e2e::fakes::{
        google::{GoogleConfig, GoogleFake, ServiceAccount, WorkloadIdentityProvider},
        oauth2::{OAuth2Client, OAuth2Config, OAuth2Fake},
    };
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-clouds";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    let entra = entra_trusting(b, ns).await;
    let wip = WorkloadIdentityProvider::new("123456789", "cloudpass-pool", "broker", &b.url);
    let sa_email = "reader@orders-project.iam.gserviceaccount.com";
    let google = GoogleFake::start(
        GoogleConfig {
            providers: vec![wip.clone()],
            service_accounts: vec![ServiceAccount {
                email: sa_email.into(),
                allowed_members: vec![wip.principal(&format!("system:cloudpass:{ns}:gcs"))],
            }],
            issuer_ca_pem: b.ca.cert_pem(),
        },
        &b.ca,
    )
    .await
    .unwrap();
    let oauth = OAuth2Fake::start(
        OAuth2Config {
            clients: vec![OAuth2Client {
                client_id: "orders".into(),
                client_secret: "Oa-9d8c7b6a".into(),
                allowed_scopes: vec!["invoices.read".into()],
            }],
            ..Default::default()
        },
        &b.ca,
    )
    .await
    .unwrap();
    cp.kubectl_ok(&["create", "secret", "generic", "oauth", "-n", ns, "--from-literal=secret=Oa-9d8c7b6a"]).unwrap();
    cp.kubectl_ok(&["create", "secret", "generic", "oauth-wrong", "-n", ns, "--from-literal=secret=wrong"]).unwrap();
    let oauth_spec = |secret: &str, auth: &str| {
        json!({"oauth2ClientCredentials": {"tokenUrl": oauth.token_url(), "clientId": "orders",
               "clientSecretRef": {"name": secret, "key": "secret"}, "scopes": ["invoices.read"],
               "clientAuthentication": auth}})
    };
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    let sdk_delivery = json!({"sdkEndpoint": {}});
    apply_ready(
        cp,
        ns,
        &[
            K8S_TRUST.to_owned(),
            credential_provider(
                "blob",
                json!({"azureWorkloadIdentity": {"tenantId": TENANT, "clientId": CLIENT_ID, "authorityHost": entra.url()}}),
            ),
            credential_provider(
                "gcs",
                json!({"gcpWorkloadIdentity": {"workloadIdentityProvider": wip.name(), "serviceAccountEmail": sa_email,
                        "projectId": "orders-project", "stsEndpoint": google.url(), "iamCredentialsEndpoint": google.url(),
                        "tokenLifetime": "30m"}}),
            ),
            credential_provider("invoices", oauth_spec("oauth", "ClientSecretBasic")),
            credential_provider("invoices-post", oauth_spec("oauth", "ClientSecretPost")),
            credential_provider("invoices-wrong", oauth_spec("oauth-wrong", "ClientSecretBasic")),
            policy(
                "to-blob",
                "orders",
                "blob",
                sdk("azure", json!({"resource": "https://storage.azure.com/"})),
                sdk_delivery.clone(),
                Some(json!({"maxCredentialLifetime": "10m"})),
            ),
            policy("to-gcs", "orders", "gcs", sdk("gcp", json!({})), sdk_delivery.clone(), None),
            policy("invoices", "orders", "invoices", json!({"kind": "http", "hosts": ["invoices.example.com"]}), header.clone(), None),
            policy("invoices-post", "post", "invoices-post", json!({"kind": "http", "hosts": ["invoices.example.com"]}), header.clone(), None),
            policy("invoices-wrong", "wrong", "invoices-wrong", json!({"kind": "http", "hosts": ["invoices.example.com"]}), header, None),
        ],
        &["to-blob", "to-gcs", "invoices", "invoices-post", "invoices-wrong"],
    )
    .await;

    // Entra: a v1 access token for the storage resource; maxCredentialLifetime bounds how
    // long the agent serves it.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "to-blob"})).await;
    assert_eq!(status, 200, "{answer}");
    let cred = &answer["credential"];
    assert_eq!((cred["type"].as_str(), cred["clientId"].as_str()), (Some("accessToken"), Some(CLIENT_ID)));
    assert_eq!(cred["resource"], "https://storage.azure.com/");
    let claims = cloudpass_e2e::fakes::jwt::unverified_claims(cred["accessToken"].as_str().unwrap()).unwrap();
    assert_eq!(claims.iss, format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(claims.aud, ["https://storage.azure.com"]);
    let expires: jiff::Timestamp = answer["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = expires.as_second() - jiff::Timestamp::now().as_second();
    assert!((590..=600).contains(&left), "maxCredentialLifetime 10m: {left}s left");
    assert_eq!(entra.calls(), 1);

    // Google: STS exchange, then impersonation; the token is one Google's IAM issued.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "to-gcs"})).await;
    assert_eq!(status, 200, "{answer}");
    let cred = &answer["credential"];
    assert_eq!(cred["serviceAccountEmail"], sa_email);
    assert_eq!(cred["projectId"], "orders-project");
    let issued = google.check_access_token(cred["accessToken"].as_str().unwrap()).expect("a token the fake issued");
    assert_eq!(issued.identity, format!("serviceAccount:{sa_email}"));
    let expires: jiff::Timestamp = answer["expiresAt"].as_str().unwrap().parse().unwrap();
    assert!((1790..=1800).contains(&(expires.as_second() - jiff::Timestamp::now().as_second())), "{answer}");

    // OAuth2 client credentials with either client authentication; a wrong secret is the
    // upstream's invalid_client.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "invoices"})).await;
    assert_eq!(status, 200, "{answer}");
    assert!(oauth.is_valid(answer["credential"]["accessToken"].as_str().unwrap()));
    let post = pod_token(cp, ns, "post-1", "orders", json!({"app": "post"})).await;
    let (status, answer) = ask_when_loaded(b, &post, json!({"policy": "invoices-post"})).await;
    assert_eq!(status, 200, "{answer}");
    let wrong = pod_token(cp, ns, "wrong-1", "orders", json!({"app": "wrong"})).await;
    let (status, answer) = ask_when_loaded(b, &wrong, json!({"policy": "invoices-wrong"})).await;
    assert_eq!((status, answer["upstreamCode"].as_str()), (502, Some("invalid_client")), "{answer}");

    // The Secret is read at use: once it is gone the broker says so (or, once the
    // operator noticed, the policy is no longer Ready).
    cp.kubectl_ok(&["delete", "secret", "oauth", "-n", ns]).unwrap();
    cp.apply_yaml(Some(ns), &credential_provider("invoices-gone", oauth_spec("oauth", "ClientSecretPost"))).unwrap();
    let gone = pod_token(cp, ns, "gone-1", "orders", json!({"app": "gone"})).await;
    cp.apply_yaml(
        Some(ns),
        &policy(
            "gone",
            "gone",
            "invoices-gone",
            json!({"kind": "http", "hosts": ["gone.example.com"]}),
            json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}}),
            None,
        ),
    )
    .unwrap();
    let (status, answer) = b.ask(Some(&gone), json!({"policy": "gone"})).await;
    assert!(status == 503 || status == 403, "{status} {answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("oauth") || answer["message"].as_str().unwrap().contains("gone"),
        "{answer}"
    );

    // A changed namespace config starts from fresh credentials; an Entra outage then is a
    // 502 with Entra's own error code.
    // (Deleting the Secret made `invoices` not Ready: wait until the broker sees that.)
    cp.wait_for_condition("accesspolicy", ns, "invoices", "Ready", "False", Duration::from_secs(30)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.ask(Some(&w.token), json!({"policy": "invoices"})).await.0 != 403 {
        assert!(Instant::now() < deadline, "the broker still serves a policy that is not Ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    entra.fail_next(1, 503);
    let (status, answer) = b.ask(Some(&w.token), json!({"policy": "to-blob"})).await;
    assert_eq!((status, answer["upstreamCode"].as_str()), (502, Some("temporarily_unavailable")), "{answer}");

    let log = b.log_text();
    assert!(!log.contains("Oa-9d8c7b6a"), "the client secret appears in the operator's output");
    assert!(!log.contains(w.token.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_aws_role_trust_providers() {
    use cloudpass_e2e::{
        fakes::{
            aws_sts::{StsGate, StsGateConfig},
            entra::{EntraConfig, EntraFake, ManagedIdentityClaims},
            google::{GoogleConfig, GoogleFake},
            test_issuer::TestIssuer,
        },
        moto::MotoServer,
    };
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-trust";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    let entra =
        EntraFake::start(EntraConfig { tenant_id: TENANT.into(), apps: vec![], issuer_ca_pem: b.ca.cert_pem() }, &b.ca)
            .await
            .unwrap();
    let google = GoogleFake::start(
        GoogleConfig { providers: vec![], service_accounts: vec![], issuer_ca_pem: b.ca.cert_pem() },
        &b.ca,
    )
    .await
    .unwrap();
    let ci = TestIssuer::start(&b.ca).await.unwrap();
    let moto = MotoServer::start().await.unwrap();
    let gate = StsGate::start(
        StsGateConfig {
            moto_url: moto.url().to_owned(),
            providers: vec![],
            roles: vec![],
            issuer_ca_pem: b.ca.cert_pem(),
            forward_credentials: None,
        },
        &b.ca,
    )
    .await
    .unwrap();
    let read_only =
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]});
    let role = moto.create_role("ci-runner", &read_only).await.unwrap();
    let trust = |name: &str, spec: Value| cloudpass_object("TrustProvider", name, spec).to_string();
    let sub = "0b1c2d3e-aaaa-bbbb-cccc-1234567890ab";
    let docs = vec![
        K8S_TRUST.to_owned(),
        trust(
            "azure-mi",
            json!({"azureManagedIdentity": {"tenantId": TENANT, "audiences": ["api://cloudpass"],
              "objectIds": [OBJECT_ID], "subscriptionIds": [sub], "authorityHost": entra.url()}}),
        ),
        trust(
            "gcp-id",
            json!({"gcpIdentityToken": {"audiences": ["https://cloudpass.example"],
              "serviceAccountEmails": ["*@orders-project.iam.gserviceaccount.com"], "projectIds": ["orders-project"],
              "issuer": google.url(), "jwksUri": format!("{}/oauth2/v3/certs", google.url())}}),
        ),
        trust(
            "ci",
            json!({"oidc": {"issuer": ci.url(), "audiences": ["cloudpass"], "subjects": ["repo:shop/orders:*"],
              "claims": [{"claim": "ref", "values": ["refs/heads/main"]}], "algorithms": ["ES256"]}}),
        ),
        trust(
            "aws-role",
            json!({"awsRole": {"roleArns": ["arn:aws:iam::123456789012:role/ci-*"], "stsEndpoints": [gate.url()]}}),
        ),
        credential_provider("partner", json!({"oidcToken": {"audience": "https://partner.example.com"}})),
    ];
    let mut policies = Vec::new();
    for t in ["azure-mi", "gcp-id", "ci", "aws-role"] {
        let mut doc: Value = serde_json::from_str(&policy(
            &format!("via-{t}"),
            "orders",
            "partner",
            json!({"kind": "http", "hosts": [format!("{t}.partner.example.com")]}),
            json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}}),
            None,
        ))
        .unwrap();
        doc["spec"]["trustProviders"] = json!([{"name": "this-cluster"}, {"name": t}]);
        policies.push(doc.to_string());
    }
    let all: Vec<String> = docs.into_iter().chain(policies).collect();
    apply_ready(cp, ns, &all, &["via-azure-mi", "via-gcp-id", "via-ci", "via-aws-role"]).await;
    let with = |policy: &str, evidence: Value| json!({"policy": policy, "evidence": evidence});
    let expect_denied = |answer: &Value, want: &str| {
        assert_eq!(answer["code"], "Denied", "{answer}");
        assert!(answer["message"].as_str().unwrap().contains(want), "{want}: {answer}");
    };

    // Azure managed identity.
    let mi = |oid: &str, audience: &str| ManagedIdentityClaims {
        subscription_id: sub.into(),
        resource_group: "rg".into(),
        name: "orders".into(),
        object_id: oid.into(),
        client_id: CLIENT_ID.into(),
        audience: audience.into(),
    };
    let good = entra.mint_managed_identity_token(&mi(OBJECT_ID, "api://cloudpass"));
    let (status, answer) =
        ask_when_loaded(b, &w.token, with("via-azure-mi", json!({"tokens": {"azure-mi": good}}))).await;
    assert_eq!(status, 200, "{answer}");
    let other = entra.mint_managed_identity_token(&mi("11111111-2222-4333-8444-555555555555", "api://cloudpass"));
    let (_, answer) = b.ask(Some(&w.token), with("via-azure-mi", json!({"tokens": {"azure-mi": other}}))).await;
    expect_denied(&answer, "trust provider azure-mi refused the caller: object ID");
    let wrong_aud = entra.mint_managed_identity_token(&mi(OBJECT_ID, "https://management.azure.com/"));
    let (_, answer) = b.ask(Some(&w.token), with("via-azure-mi", json!({"tokens": {"azure-mi": wrong_aud}}))).await;
    expect_denied(&answer, "audience is none of");
    let (_, answer) = b.ask(Some(&w.token), with("via-azure-mi", json!({}))).await;
    expect_denied(&answer, "no token for trust provider azure-mi");

    // Google identity token.
    let id = google.mint_identity_token(
        "https://cloudpass.example",
        "ci@orders-project.iam.gserviceaccount.com",
        "orders-project",
    );
    let (status, answer) = ask_when_loaded(b, &w.token, with("via-gcp-id", json!({"tokens": {"gcp-id": id}}))).await;
    assert_eq!(status, 200, "{answer}");
    let stranger = google.mint_identity_token(
        "https://cloudpass.example",
        "ci@other-project.iam.gserviceaccount.com",
        "other-project",
    );
    let (_, answer) = b.ask(Some(&w.token), with("via-gcp-id", json!({"tokens": {"gcp-id": stranger}}))).await;
    expect_denied(&answer, "service account");

    // Any OIDC issuer: subject and claim matchers, expiry, unknown keys, alg none.
    let mut claims = ci.claims("repo:shop/orders:ref:refs/heads/main", "cloudpass");
    claims["ref"] = json!("refs/heads/main");
    let (status, answer) =
        ask_when_loaded(b, &w.token, with("via-ci", json!({"tokens": {"ci": ci.sign(&claims)}}))).await;
    assert_eq!(status, 200, "{answer}");
    let mut branch = claims.clone();
    branch["ref"] = json!("refs/heads/feature");
    let mut expired = claims.clone();
    expired["exp"] = json!(jiff::Timestamp::now().as_second() - 3600);
    let mut other_repo = claims.clone();
    other_repo["sub"] = json!("repo:shop/billing:ref:refs/heads/main");
    for (token, want) in [
        (ci.sign(&branch), "claim ref does not match"),
        (ci.sign(&expired), "expired"),
        (ci.sign(&other_repo), "subject"),
        (ci.sign_with_unpublished_key(&claims), "not in the issuer's JWKS"),
        (ci.sign_alg_none(&claims), "not a JWT"),
        (ci.sign_hs256_with_public_key(&claims), "not accepted"),
    ] {
        let (status, answer) = b.ask(Some(&w.token), with("via-ci", json!({"tokens": {"ci": token}}))).await;
        assert_eq!(status, 403, "{want}: {answer}");
        expect_denied(&answer, want);
    }
    // A rotated issuer key is fetched on first sight of its kid, but refetches are
    // bounded: right after the unknown-key attempt above it is not fetched yet.
    ci.rotate().unwrap();
    let rotated = ci.sign(&claims);
    let (status, _) = b.ask(Some(&w.token), with("via-ci", json!({"tokens": {"ci": rotated.clone()}}))).await;
    assert_eq!(status, 403, "refetches are rate limited");
    tokio::time::sleep(cloudpass_broker::jwt::REFETCH_INTERVAL).await;
    let (status, answer) = b.ask(Some(&w.token), with("via-ci", json!({"tokens": {"ci": rotated}}))).await;
    assert_eq!(status, 200, "{answer}");

    // AWS role: a pre-signed GetCallerIdentity of moto-issued role credentials, bound to
    // this broker by its server ID (by default the host of its issuer URL, 127.0.0.1
    // here) in a signed x-cloudpass-server-id header. Also signed: without the header,
    // with it added after signing, and for another server.
    let presign = r#"
import boto3, json, os
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
sts = boto3.client("sts")
c = sts.assume_role(RoleArn=os.environ["ROLE"], RoleSessionName="runner-7")["Credentials"]
session = boto3.session.Session(aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                                aws_session_token=c["SessionToken"], region_name="us-east-1")
def presign(server_id=None, added_after=None):
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if server_id:
        headers["X-Cloudpass-Server-Id"] = server_id
    req = AWSRequest(method="POST", url=os.environ["GATE"] + "/", data="Action=GetCallerIdentity&Version=2011-06-15",
                     headers=headers)
    SigV4Auth(session.get_credentials(), "sts", "us-east-1").add_auth(req)
    if added_after:
        req.headers["X-Cloudpass-Server-Id"] = added_after
    body = req.body.decode() if isinstance(req.body, bytes) else req.body
    headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in req.headers.items()}
    return {"method": "POST", "url": req.url, "headers": headers, "body": body}
print(json.dumps({"right": presign("127.0.0.1"), "none": presign(), "unsigned": presign(added_after="127.0.0.1"),
                  "other": presign("vault.other.example")}))
"#;
    let variants: Value = serde_json::from_str(
        moto.python_with_env(presign, &[("ROLE", &role), ("GATE", gate.url())]).await.unwrap().trim(),
    )
    .unwrap();
    let signed = variants["right"].clone();
    let (status, answer) =
        ask_when_loaded(b, &w.token, with("via-aws-role", json!({"awsGetCallerIdentity": signed.clone()}))).await;
    assert_eq!(status, 200, "{answer}");
    let gate_calls = gate.calls();
    for (variant, want) in [
        ("none", "evidence has no x-cloudpass-server-id header"),
        ("unsigned", "x-cloudpass-server-id header is not covered by the signature"),
        ("other", "signed for server ID \"vault.other.example\", not for this broker (127.0.0.1"),
    ] {
        let (status, answer) =
            b.ask(Some(&w.token), with("via-aws-role", json!({"awsGetCallerIdentity": variants[variant]}))).await;
        assert_eq!(status, 403, "{variant}: {answer}");
        expect_denied(&answer, want);
    }
    assert_eq!(gate.calls(), gate_calls, "evidence not bound to this broker is not even sent to STS");
    let mut elsewhere = signed.clone();
    elsewhere["url"] = json!("https://sts.amazonaws.com.evil.example/");
    let (_, answer) = b.ask(Some(&w.token), with("via-aws-role", json!({"awsGetCallerIdentity": elsewhere}))).await;
    expect_denied(&answer, "not an allowed STS endpoint");
    let mut other_action = signed;
    other_action["body"] = json!("Action=AssumeRole&Version=2011-06-15&RoleArn=x&RoleSessionName=y");
    let (_, answer) = b.ask(Some(&w.token), with("via-aws-role", json!({"awsGetCallerIdentity": other_action}))).await;
    expect_denied(&answer, "exactly an sts:GetCallerIdentity request");

    let records: Vec<Value> = b
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "cloudpass.dev/audit" && v["namespace"] == ns && v["outcome"] == "allowed")
        .collect();
    let aws = records.iter().find(|r| r["policy"] == "via-aws-role").expect("audited");
    assert_eq!(aws["trustProviders"][1]["detail"], "arn:aws:sts::123456789012:assumed-role/ci-runner/runner-7");
    assert!(!b.log_text().contains(&good));
}

/// A pod of another cluster (a second local control plane), verified against that
/// cluster's keys through a `kubernetesServiceAccount` TrustProvider with an issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_tokens_are_verified_by_its_keys() {
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let remote = ControlPlane::start().await.unwrap();
    let remote_pod = workload(&remote, "shop", "orders-1", "orders", json!({"app": "orders"})).await;
    remote.create_namespace("billing", &[]).await.unwrap();
    remote.create_service_account("billing", "orders").await.unwrap();
    let billing = pod_token(&remote, "billing", "orders-1", "orders", json!({"app": "orders"})).await;
    let (_, jwks) = remote.issuer_documents().await.unwrap();

    let ns = "broker-remote";
    cp.create_namespace(ns, &[]).await.unwrap();
    let trust = cloudpass_object(
        "TrustProvider",
        "shop-cluster",
        json!({"kubernetesServiceAccount": {"issuer": remote.issuer, "jwks": jwks.to_string(),
               "namespaces": ["shop"], "serviceAccounts": ["orders"]}}),
    );
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    let mut any_pod: Value = serde_json::from_str(&policy(
        "from-shop",
        "unused",
        "partner",
        json!({"kind": "http", "hosts": ["partner.example.com"]}),
        header.clone(),
        None,
    ))
    .unwrap();
    any_pod["spec"]["client"] = json!({"podSelector": {}, "serviceAccountName": "orders"});
    any_pod["spec"]["trustProviders"] = json!([{"name": "shop-cluster"}]);
    let mut labelled = any_pod.clone();
    labelled["metadata"]["name"] = json!("labelled");
    labelled["spec"]["client"] = json!({"podSelector": {"matchLabels": {"app": "orders"}}});
    labelled["spec"]["server"]["hosts"] = json!(["other.example.com"]);
    apply_ready(
        cp,
        ns,
        &[
            trust.to_string(),
            credential_provider("partner", json!({"oidcToken": {"audience": "https://partner.example.com"}})),
            any_pod.to_string(),
            labelled.to_string(),
        ],
        &["from-shop", "labelled"],
    )
    .await;

    let ask = json!({"policy": "from-shop", "namespace": ns});
    let (status, answer) = ask_when_loaded(b, &remote_pod.token, ask.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let jwt = answer["credential"]["token"].as_str().unwrap();
    let claims = cloudpass_e2e::fakes::jwt::unverified_claims(jwt).unwrap();
    assert_eq!(claims.sub.as_deref(), Some(format!("system:cloudpass:{ns}:partner").as_str()));

    // Without naming the namespace the token goes to this cluster's TokenReview: refused.
    let (status, _) = b.ask(Some(&remote_pod.token), json!({"policy": "from-shop"})).await;
    assert_eq!(status, 401);
    // Another namespace of the remote cluster is not trusted.
    let (status, answer) = b.ask(Some(&billing), ask.clone()).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("namespace billing"), "{answer}");
    // Pod labels of another cluster are unknown here: label selectors cannot select it.
    let (status, answer) = b.ask(Some(&remote_pod.token), json!({"policy": "labelled", "namespace": ns})).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("does not select"), "{answer}");

    let record = b
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["kind"] == "cloudpass.dev/audit" && v["namespace"] == ns && v["outcome"] == "allowed")
        .expect("audited");
    assert_eq!(record["remoteIssuer"], remote.issuer.as_str());
    assert_eq!(record["remoteNamespace"], "shop");
}

/// A credential obtained with a broker-signed token is never handed to a caller the
/// token was not signed for (finding: with `subject: Provider` the first caller's token,
/// or what Google exchanged it for, was served from the cache to every other caller,
/// bypassing the cloud's conditions on the other claims).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_claims_are_never_shared_between_callers() {
    use cloudpass_e2e::fakes::google::{GoogleConfig, GoogleFake, WorkloadIdentityProvider};
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-claims";
    let orders = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    cp.create_service_account(ns, "billing").await.unwrap();
    let billing = pod_token(cp, ns, "billing-1", "billing", json!({"app": "orders"})).await;
    let orders2 = pod_token(cp, ns, "orders-2", "orders", json!({"app": "orders"})).await;
    // Google's attribute condition: only tokens signed for service account `orders`.
    let mut wip = WorkloadIdentityProvider::new("123456789", "cloudpass-pool", "claims", &b.url);
    wip.claim_condition = Some((vec!["cloudpass.dev".into(), "serviceAccount".into()], vec!["orders".into()]));
    let google = GoogleFake::start(
        GoogleConfig { providers: vec![wip.clone()], service_accounts: vec![], issuer_ca_pem: b.ca.cert_pem() },
        &b.ca,
    )
    .await
    .unwrap();
    let trust = r#"
apiVersion: cloudpass.dev/v1alpha1
kind: TrustProvider
metadata: {name: this-cluster}
spec:
  kubernetesServiceAccount:
    serviceAccounts: ["orders", "billing"]
"#;
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    apply_ready(
        cp,
        ns,
        &[
            trust.to_owned(),
            credential_provider("partner", json!({"oidcToken": {"audience": "https://partner.example.com"}})),
            credential_provider(
                "gcs",
                json!({"gcpWorkloadIdentity": {"workloadIdentityProvider": wip.name(), "stsEndpoint": google.url()}}),
            ),
            policy(
                "partner",
                "orders",
                "partner",
                json!({"kind": "http", "hosts": ["partner.example.com"]}),
                header,
                None,
            ),
            policy("to-gcs", "orders", "gcs", sdk("gcp", json!({})), json!({"sdkEndpoint": {}}), None),
        ],
        &["partner", "to-gcs"],
    )
    .await;

    // The partner's JWT names the caller it was minted for, whoever asked first.
    let signed_for = |answer: &Value| {
        let claims =
            cloudpass_e2e::fakes::jwt::unverified_claims(answer["credential"]["token"].as_str().unwrap()).unwrap();
        assert_eq!(claims.sub.as_deref(), Some("system:cloudpass:broker-claims:partner"), "subject: Provider");
        let ours = &claims.all["cloudpass.dev"];
        (ours["serviceAccount"].as_str().unwrap().to_owned(), ours["pod"].as_str().unwrap().to_owned())
    };
    let (status, answer) = ask_when_loaded(b, &orders.token, json!({"policy": "partner"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(signed_for(&answer), ("orders".into(), "orders-1".into()));
    let (status, answer) = b.ask(Some(&billing), json!({"policy": "partner"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(signed_for(&answer), ("billing".into(), "billing-1".into()), "not the token signed for orders-1");
    let (_, answer) = b.ask(Some(&orders2), json!({"policy": "partner"})).await;
    assert_eq!(signed_for(&answer), ("orders".into(), "orders-2".into()));
    // The same caller again: from the cache.
    let (_, again) = b.ask(Some(&orders.token), json!({"policy": "partner"})).await;
    assert_eq!(signed_for(&again), ("orders".into(), "orders-1".into()));

    // Google decides on the signed claims: the federated token of orders-1 does not
    // reach billing-1, whose own exchange Google refuses.
    let (status, answer) = ask_when_loaded(b, &orders.token, json!({"policy": "to-gcs"})).await;
    assert_eq!(status, 200, "{answer}");
    let federated = answer["credential"]["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(google.calls(), 1);
    let (status, answer) = b.ask(Some(&billing), json!({"policy": "to-gcs"})).await;
    assert_eq!((status, answer["upstreamCode"].as_str()), (502, Some("invalid_grant")), "{answer}");
    assert!(!answer.to_string().contains(&federated));
    let (status, answer) = b.ask(Some(&orders2), json!({"policy": "to-gcs"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_ne!(answer["credential"]["accessToken"].as_str(), Some(federated.as_str()), "exchanged for orders-2");
    let (_, again) = b.ask(Some(&orders.token), json!({"policy": "to-gcs"})).await;
    assert_eq!(again["credential"]["accessToken"].as_str(), Some(federated.as_str()), "a cache hit");
    assert_eq!(google.calls(), 2, "one exchange per caller, none for the cache hit");
}

/// The credential ends with the policy's time window (finding: a one-hour credential
/// fetched a minute before the window closed was served for the whole hour). The
/// window here closes 25 to 85 seconds after the policies are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_time_window_bounds_the_credential() {
    use cloudpass_e2e::moto::MotoServer;
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-window";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    cp.kubectl_ok(&["create", "secret", "generic", "weather", "-n", ns, "--from-literal=api-key=wx-Key-4d2e"]).unwrap();
    let moto = MotoServer::start().await.unwrap();
    let (role, gate) = s3_role_behind_gate(b, &moto, ns, "window-s3").await;
    let entra = entra_trusting(b, ns).await;

    // A window (UTC, every day) that opened ten minutes ago and closes at the first
    // minute boundary at least 25 s from now.
    let now = jiff::Timestamp::now().as_second();
    let end_second = (now + 25).div_euclid(60) * 60 + if (now + 25).rem_euclid(60) == 0 { 0 } else { 60 };
    let end = jiff::Timestamp::from_second(end_second).unwrap();
    let hh_mm = |t: jiff::Timestamp| t.strftime("%H:%M").to_string();
    let window = json!({"timeWindows": [{"timeZone": "UTC", "days": [],
        "start": hh_mm(end - jiff::SignedDuration::from_mins(10)), "end": hh_mm(end)}]});
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    let http = |host: &str| json!({"kind": "http", "hosts": [host]});
    apply_ready(
        cp,
        ns,
        &[
            K8S_TRUST.to_owned(),
            credential_provider("partner", json!({"oidcToken": {"audience": "https://partner.example.com", "lifetime": "1h"}})),
            credential_provider("weather", json!({"apiKey": {"secretRef": {"name": "weather", "key": "api-key"}}})),
            credential_provider(
                "s3",
                json!({"awsSts": {"roleArn": role, "stsEndpoint": gate.url(), "sessionDuration": "1h"}}),
            ),
            credential_provider(
                "blob",
                json!({"azureWorkloadIdentity": {"tenantId": TENANT, "clientId": CLIENT_ID, "authorityHost": entra.url()}}),
            ),
            policy("partner", "orders", "partner", http("partner.example.com"), header.clone(), Some(window.clone())),
            policy("weather", "orders", "weather", http("api.weather.example.com"), header, Some(window.clone())),
            policy("to-s3", "orders", "s3", sdk("aws", json!({})), json!({"sdkEndpoint": {}}), Some(window.clone())),
            policy(
                "to-blob",
                "orders",
                "blob",
                sdk("azure", json!({"resource": "https://storage.azure.com/"})),
                json!({"sdkEndpoint": {}}),
                Some(window),
            ),
        ],
        &["partner", "weather", "to-s3", "to-blob"],
    )
    .await;
    let time = |answer: &Value, field: &str| answer[field].as_str().map(|t| t.parse::<jiff::Timestamp>().unwrap());

    // Credentials the broker makes itself end with the window: the JWT's exp, the
    // Secret's hand-out period.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "partner"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(time(&answer, "expiresAt"), Some(end), "{answer}");
    assert_eq!(answer.get("serveUntil"), None, "it does not outlive the window");
    let claims = cloudpass_e2e::fakes::jwt::unverified_claims(answer["credential"]["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims.exp, Some(end_second), "exp at the window's end, not an hour later");
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "weather"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(time(&answer, "expiresAt"), Some(end), "{answer}");

    // AWS STS issues at least 15 minutes: the shortest is asked for, and the agent is
    // told to stop serving it when the window closes.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "to-s3"})).await;
    assert_eq!(status, 200, "{answer}");
    let asked_at = jiff::Timestamp::now();
    let session = time(&answer, "expiresAt").unwrap().duration_since(asked_at).as_secs();
    assert!((880..=900).contains(&session), "DurationSeconds 900, not the provider's hour: {session}s");
    assert_eq!(time(&answer, "serveUntil"), Some(end), "{answer}");
    assert!(time(&answer, "refreshAt").unwrap() <= end, "{answer}");

    // Entra's lifetime is its own: served until the window closes.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "to-blob"})).await;
    assert_eq!(status, 200, "{answer}");
    assert!(time(&answer, "expiresAt").unwrap() > end + jiff::SignedDuration::from_mins(30), "{answer}");
    assert_eq!(time(&answer, "serveUntil"), Some(end), "{answer}");
    assert!(time(&answer, "refreshAt").unwrap() <= end, "{answer}");
    let audited = b.audit_records().into_iter().filter(|r| r["namespace"] == ns && r["outcome"] == "allowed").count();
    assert_eq!(audited, 4);

    // Once the window has closed, nothing more: neither fresh nor from the cache.
    let wait = end.duration_since(jiff::Timestamp::now()) + jiff::SignedDuration::from_millis(500);
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
    for policy in ["partner", "weather", "to-s3", "to-blob"] {
        let (status, answer) = b.ask(Some(&w.token), json!({"policy": policy})).await;
        assert_eq!(status, 403, "{policy}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("outside the policy's time windows"), "{answer}");
    }
}

/// A token endpoint answering an absurd lifetime is an audited upstream error, and the
/// broker keeps answering (finding: `expires_in` of 1e15 seconds overflowed the expiry
/// and panicked the request, which left no audit record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_upstream_lifetimes_are_audited_errors() {
    use cloudpass_e2e::fakes::oauth2::{OAuth2Client, OAuth2Config, OAuth2Fake};
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-hostile";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    let client = OAuth2Client {
        client_id: "orders".into(),
        client_secret: "Oa-1f2e3d4c".into(),
        allowed_scopes: vec!["invoices.read".into()],
    };
    let absurd = OAuth2Fake::start(
        OAuth2Config { clients: vec![client.clone()], token_lifetime: Duration::from_secs(1_000_000_000_000_000) },
        &b.ca,
    )
    .await
    .unwrap();
    let sane = OAuth2Fake::start(OAuth2Config { clients: vec![client], ..Default::default() }, &b.ca).await.unwrap();
    cp.kubectl_ok(&["create", "secret", "generic", "oauth", "-n", ns, "--from-literal=secret=Oa-1f2e3d4c"]).unwrap();
    let spec = |url: String| {
        json!({"oauth2ClientCredentials": {"tokenUrl": url, "clientId": "orders",
               "clientSecretRef": {"name": "oauth", "key": "secret"}, "scopes": ["invoices.read"]}})
    };
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    let http = |host: &str| json!({"kind": "http", "hosts": [host]});
    apply_ready(
        cp,
        ns,
        &[
            K8S_TRUST.to_owned(),
            credential_provider("absurd", spec(absurd.token_url())),
            credential_provider("sane", spec(sane.token_url())),
            policy("absurd", "orders", "absurd", http("absurd.example.com"), header.clone(), None),
            policy("sane", "orders", "sane", http("invoices.example.com"), header, None),
        ],
        &["absurd", "sane"],
    )
    .await;

    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "absurd"})).await;
    assert_eq!((status, answer["code"].as_str()), (502, Some("UpstreamFailure")), "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("expires_in 1000000000000000 is out of range"), "{message}");
    assert_eq!(absurd.calls(), 1);
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "sane"})).await;
    assert_eq!(status, 200, "the broker still answers: {answer}");
    let record = b
        .audit_records()
        .into_iter()
        .find(|r| r["namespace"] == ns && r["policy"] == "absurd")
        .expect("the failure is audited");
    assert_eq!(record["outcome"], "error");
    assert_eq!(record["code"], "UpstreamFailure");
    assert!(record["reason"].as_str().unwrap().contains("expires_in"), "{record}");
    assert!(!b.log_text().contains("panicked"), "no panic in the operator's output");
}

/// Issue 14, finding 6: the URLs providers name are called only at public addresses
/// unless `--allow-private-upstreams`. The main broker of this suite has it on and
/// reaches the fakes on 127.0.0.1; the strict replica refuses, says why, and never
/// connects: neither the token endpoint nor the JWKS host sees a request from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_are_refused_unless_allowed() {
    use cloudpass_e2e::fakes::{
        oauth2::{OAuth2Client, OAuth2Config, OAuth2Fake},
        test_issuer::TestIssuer,
    };
    let b = broker();
    let (_turn, strict) = strict_broker().await;
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-egress";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    let oauth = OAuth2Fake::start(
        OAuth2Config {
            clients: vec![OAuth2Client {
                client_id: "orders".into(),
                client_secret: "Eg-4c3b2a1f".into(),
                allowed_scopes: vec!["invoices.read".into()],
            }],
            ..Default::default()
        },
        &b.ca,
    )
    .await
    .unwrap();
    let ci = TestIssuer::start(&b.ca).await.unwrap();
    cp.kubectl_ok(&["create", "secret", "generic", "oauth", "-n", ns, "--from-literal=secret=Eg-4c3b2a1f"]).unwrap();
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    let http = |host: &str| json!({"kind": "http", "hosts": [host]});
    let trust = |name: &str, spec: Value| cloudpass_object("TrustProvider", name, spec).to_string();
    // The same JWKS by name: `localhost` resolves to loopback only.
    let jwks_by_name = format!("{}/jwks", ci.url().replace("127.0.0.1", "localhost"));
    let oidc = |jwks_uri: Option<&str>| {
        let mut spec =
            json!({"issuer": ci.url(), "audiences": ["cloudpass"], "subjects": ["ci"], "algorithms": ["ES256"]});
        if let Some(uri) = jwks_uri {
            spec["jwksUri"] = json!(uri);
        }
        json!({"oidc": spec})
    };
    let mut docs = vec![
        K8S_TRUST.to_owned(),
        trust("ci", oidc(None)),
        trust("ci-by-name", oidc(Some(&jwks_by_name))),
        credential_provider(
            "invoices",
            json!({"oauth2ClientCredentials": {"tokenUrl": oauth.token_url(), "clientId": "orders",
                   "clientSecretRef": {"name": "oauth", "key": "secret"}, "scopes": ["invoices.read"]}}),
        ),
        credential_provider("partner", json!({"oidcToken": {"audience": "https://partner.example.com"}})),
        policy("invoices", "orders", "invoices", http("invoices.example.com"), header.clone(), None),
    ];
    for (name, trust) in [("via-ci", "ci"), ("via-ci-by-name", "ci-by-name")] {
        let mut doc: Value = serde_json::from_str(&policy(
            name,
            "orders",
            "partner",
            http(&format!("{name}.example.com")),
            header.clone(),
            None,
        ))
        .unwrap();
        doc["spec"]["trustProviders"] = json!([{"name": "this-cluster"}, {"name": trust}]);
        docs.push(doc.to_string());
    }
    apply_ready(cp, ns, &docs, &["invoices", "via-ci", "via-ci-by-name"]).await;
    let ci_token = ci.sign(&ci.claims("ci", "cloudpass"));
    let with_ci =
        |policy: &str, name: &str| json!({"policy": policy, "evidence": {"tokens": {name: ci_token.clone()}}});

    // Allowed: the main broker reaches the token endpoint and the JWKS, by address and by name.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "invoices"})).await;
    assert_eq!(status, 200, "{answer}");
    for (policy, name) in [("via-ci", "ci"), ("via-ci-by-name", "ci-by-name")] {
        let (status, answer) = ask_when_loaded(b, &w.token, with_ci(policy, name)).await;
        assert_eq!(status, 200, "{policy}: {answer}");
    }

    // Refused: the strict replica names the address and the flag, and connects nowhere.
    let (oauth_calls, jwks_fetches) = (oauth.calls(), ci.jwks_fetches());
    let (status, answer) = ask_loaded(strict, &w.token, json!({"policy": "invoices"})).await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("Denied")), "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains("refused to call https://127.0.0.1:")
            && message.contains("127.0.0.1 is a loopback address")
            && message.contains("--allow-private-upstreams"),
        "{answer}"
    );
    let (status, answer) = ask_loaded(strict, &w.token, with_ci("via-ci", "ci")).await;
    assert_eq!(status, 403, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("trust provider ci refused the caller") && message.contains("loopback"), "{answer}");
    let (status, answer) = ask_loaded(strict, &w.token, with_ci("via-ci-by-name", "ci-by-name")).await;
    assert_eq!(status, 403, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("refused to call localhost") && message.contains("loopback"), "{answer}");
    assert_eq!((oauth.calls(), ci.jwks_fetches()), (oauth_calls, jwks_fetches), "the strict broker connected");
    let log = strict.log_text();
    assert!(!log.contains("Eg-4c3b2a1f") && !log.contains(w.token.as_str()) && !log.contains(ci_token.as_str()));
}

/// Issue 14, finding 8: tokens that cannot pass TokenReview are refused before one is
/// sent (not a JWT, another audience, expired, not signed by this cluster's keys), and
/// a refused token is remembered: floods of both cost the apiserver a bounded number of
/// TokenReviews. Counted on the strict replica, which only this test sends tokens to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_costs_a_bounded_number_of_token_reviews() {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B};
    use futures::StreamExt;
    let (_turn, strict) = strict_broker().await;
    let cp = broker().cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-flood";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    cp.apply_yaml(Some(ns), K8S_TRUST).unwrap();
    cp.apply_yaml(
        Some(ns),
        &credential_provider("partner", json!({"oidcToken": {"audience": "https://partner.example.com"}})),
    )
    .unwrap();
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    cp.apply_yaml(
        Some(ns),
        &policy(
            "partner",
            "orders",
            "partner",
            json!({"kind": "http", "hosts": ["partner.example.com"]}),
            header,
            None,
        ),
    )
    .unwrap();
    wait_ready(cp, ns, &["partner"]).await;
    let (status, answer) = ask_loaded(strict, &w.token, json!({"policy": "partner"})).await;
    assert_eq!(status, 200, "{answer}");

    // Well-formed tokens that the apiserver would refuse: made up (this cluster's issuer
    // and key ID, no valid signature), another audience, expired; a real token of a
    // deleted pod, and a real token for another audience.
    let (_, jwks) = cp.issuer_documents().await.unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let now = jiff::Timestamp::now().as_second();
    let forged = |i: usize, aud: &str, exp: i64| {
        let header = json!({"alg": "RS256", "kid": kid});
        let claims = json!({"iss": cp.issuer, "aud": [aud], "exp": exp, "iat": now, "nbf": now,
                            "sub": format!("system:serviceaccount:{ns}:orders-{i}")});
        format!("{}.{}.{}", B.encode(header.to_string()), B.encode(claims.to_string()), B.encode(format!("sig-{i}")))
    };
    let gone = pod_token(cp, ns, "gone-1", "orders", json!({"app": "orders"})).await;
    cp.kubectl_ok(&["delete", "pod", "gone-1", "-n", ns, "--wait=true"]).unwrap();
    let other_aud = TokenOptions { audiences: vec!["sts.amazonaws.com".into()], ..Default::default() };
    let wrong_aud = cp.token(ns, "orders", &other_aud).await.unwrap();
    let mut tokens: Vec<(String, &str)> = Vec::new();
    for i in 0..150 {
        tokens.push((format!("garbage-{i}-{}", "x".repeat(i)), "not a JWT"));
        tokens.push((forged(i, "cloudpass", now + 600), "not signed by this cluster's service-account keys"));
        tokens.push((forged(i, "other", now + 600), "audience is not cloudpass"));
        tokens.push((forged(i, "cloudpass", now - 3600), "expired"));
        tokens.push((gone.clone(), "refused"));
        tokens.push((wrong_aud.clone(), "audience is not cloudpass"));
    }
    let series = r#"cloudpass_operator_broker_cache_lookups_total{cache="token_review",result="miss"}"#;
    let reviews_before = counter(strict, series).await;
    let apiserver_before = apiserver_token_reviews(cp);
    let http = strict.http();
    let url = format!("{}/v1/credentials", strict.url);
    let answers: Vec<(u16, Value, &str)> = futures::stream::iter(tokens.iter())
        .map(|(token, want)| {
            let request = http.post(&url).bearer_auth(token).json(&json!({"policy": "partner"}));
            async move {
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.json::<Value>().await.unwrap(), *want)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    // As the apiserver counts (the other tests of this suite, running meanwhile against
    // the main broker, add a few of their own): nowhere near one per bad token.
    let apiserver = apiserver_token_reviews(cp) - apiserver_before;
    assert!(apiserver < 100.0, "{} bad tokens cost the apiserver {apiserver} TokenReviews", tokens.len());
    // As the strict replica counts its own: the deleted pod's token is reviewed once (the
    // replica remembers answers for 60 s); everything else costs none.
    let reviews = counter(strict, series).await - reviews_before;
    assert!(reviews <= 1.0, "{} bad tokens cost {reviews} TokenReviews", tokens.len());
    for (status, answer, want) in &answers {
        assert_eq!(*status, 401, "{answer}");
        assert!(answer["message"].as_str().unwrap().contains(want), "{want}: {answer}");
    }
    let refused =
        counter(strict, r#"cloudpass_operator_broker_cache_lookups_total{cache="token_review",result="refused"}"#)
            .await;
    assert!(refused >= 600.0, "refused without TokenReview: {refused}");
    // Good tokens still work.
    let (status, answer) = ask_loaded(strict, &w.token, json!({"policy": "partner"})).await;
    assert_eq!(status, 200, "{answer}");
}

/// Issue 14, finding 9: only Ready TrustProviders verify, and only those the requested
/// policy lists. One with private key material in its inline JWKS is not Ready, its
/// policy is not Ready, and a token signed with that key is refused; a token verified by
/// another Ready TrustProvider of the same issuer is refused for a policy that does not
/// list that provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_ready_trust_providers_of_the_policy_verify() {
    use cloudpass_e2e::fakes::SigningKey;
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-not-ready";
    cp.create_namespace(ns, &[]).await.unwrap();
    let issuer = "https://oidc.other-cluster.example/id/4f1e";
    let (leaked, other, shop) = (
        SigningKey::generate_es256().unwrap(),
        SigningKey::generate_es256().unwrap(),
        SigningKey::generate_es256().unwrap(),
    );
    let mut leaked_jwk = leaked.jwk().clone();
    leaked_jwk["d"] = json!("cHJpdmF0ZSBwYXJ0IG9mIHRoZSBrZXk");
    let remote = |name: &str, jwk: &Value| {
        cloudpass_object(
            "TrustProvider",
            name,
            json!({"kubernetesServiceAccount": {"issuer": issuer, "jwks": json!({"keys": [jwk]}).to_string(),
                   "namespaces": ["shop"]}}),
        )
        .to_string()
    };
    let from = |name: &str, trust: &str| {
        let mut doc: Value = serde_json::from_str(&policy(
            name,
            "unused",
            "partner",
            json!({"kind": "http", "hosts": [format!("{name}.example.com")]}),
            json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}}),
            None,
        ))
        .unwrap();
        doc["spec"]["client"] = json!({"podSelector": {}, "serviceAccountName": "orders"});
        doc["spec"]["trustProviders"] = json!([{"name": trust}]);
        doc.to_string()
    };
    for doc in [
        remote("leaked", &leaked_jwk),
        // Sorted before `shop`: the first TrustProvider of the issuer in the namespace.
        remote("other-keys", other.jwk()),
        remote("shop", shop.jwk()),
        credential_provider("partner", json!({"oidcToken": {"audience": "https://partner.example.com"}})),
        from("from-leaked", "leaked"),
        from("from-other", "other-keys"),
        from("from-shop", "shop"),
    ] {
        cp.apply_yaml(Some(ns), &doc).unwrap();
    }
    wait_ready(cp, ns, &["from-other", "from-shop"]).await;
    let leaked_status =
        cp.wait_for_condition("trustprovider", ns, "leaked", "Ready", "False", Duration::from_secs(30)).await.unwrap();
    let condition = leaked_status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(condition["reason"], "InvalidSpec", "{condition}");
    assert!(condition["message"].as_str().unwrap().contains("private key material"), "{condition}");
    cp.wait_for_condition("accesspolicy", ns, "from-leaked", "Ready", "False", Duration::from_secs(30)).await.unwrap();

    let now = jiff::Timestamp::now().as_second();
    let claims = json!({"iss": issuer, "aud": ["cloudpass"], "sub": "system:serviceaccount:shop:orders",
                        "iat": now, "nbf": now, "exp": now + 600,
                        "kubernetes.io": {"namespace": "shop", "pod": {"name": "orders-1", "uid": "5f0c"}}});
    let ask = |policy: &str| json!({"policy": policy, "namespace": ns});
    let (status, answer) = ask_when_loaded(b, &other.sign(&claims), ask("from-other")).await;
    assert_eq!(status, 200, "{answer}");
    // A key of another Ready provider of the same issuer verifies nothing for `from-shop`,
    // which does not list that provider; its own provider's key does.
    let (status, answer) = b.ask(Some(&other.sign(&claims)), ask("from-shop")).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("is not in the issuer's JWKS"), "{answer}");
    let (status, answer) = b.ask(Some(&shop.sign(&claims)), ask("from-shop")).await;
    assert_eq!(status, 200, "{answer}");

    // The leaked key verifies nothing: not for its own policy, not for another.
    let forged = leaked.sign(&claims);
    let (status, answer) = b.ask(Some(&forged), ask("from-leaked")).await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("no Ready TrustProvider of AccessPolicy from-leaked"),
        "{answer}"
    );
    let (status, answer) = b.ask(Some(&forged), ask("from-shop")).await;
    assert_eq!(status, 401, "{answer}");
}

/// A deleted AccessPolicy is refused as soon as the broker's own watch sees the deletion,
/// not when the controller compiles the namespace's config again. A finalizer keeps the
/// policy (and so the compiled config) in place: only the broker's watch can refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_being_deleted_is_refused_before_its_config_is_compiled_again() {
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let w = workload(cp, "broker-withdraw", "orders-1", "orders", json!({"app": "orders"})).await;
    let ns = w.namespace.as_str();
    cp.kubectl_ok(&["create", "secret", "generic", "weather", "-n", ns, "--from-literal=api-key=wx-Key-withdraw"])
        .unwrap();
    cp.apply_yaml(Some(ns), K8S_TRUST).unwrap();
    let provider =
        credential_provider("weather-key", json!({"apiKey": {"secretRef": {"name": "weather", "key": "api-key"}}}));
    let header = json!({"httpHeader": {"name": "Authorization", "format": "{token}"}});
    let weather = policy(
        "weather",
        "orders",
        "weather-key",
        json!({"kind": "http", "hosts": ["api.weather.example.com"]}),
        header,
        None,
    );
    apply_ready(cp, ns, &[provider, weather.clone()], &["weather"]).await;
    let body = json!({"policy": "weather"});
    let (status, answer) = ask_when_loaded(b, &w.token, body.clone()).await;
    assert_eq!(status, 200, "{answer}");

    let hold = r#"{"metadata":{"finalizers":["test.cloudpass.dev/hold"]}}"#;
    cp.kubectl_ok(&["patch", "accesspolicy", "weather", "-n", ns, "--type=merge", "-p", hold]).unwrap();
    cp.kubectl_ok(&["delete", "accesspolicy", "weather", "-n", ns, "--wait=false"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let (status, answer) = b.ask(Some(&w.token), body.clone()).await;
        if status == 403 {
            break answer;
        }
        assert_eq!(status, 200, "{answer}");
        assert!(Instant::now() < deadline, "the policy being deleted is still served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("AccessPolicy weather in namespace broker-withdraw is deleted or being deleted"),
        "{refused}"
    );

    // Gone for good, then created again under the same name: served again.
    cp.kubectl_ok(&[
        "patch",
        "accesspolicy",
        "weather",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .unwrap();
    cp.kubectl_ok(&["wait", "--for=delete", "accesspolicy/weather", "-n", ns, "--timeout=30s"]).unwrap();
    apply_ready(cp, ns, &[weather], &["weather"]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = b.ask(Some(&w.token), body.clone()).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the policy created again is not served: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_each_clouds_store_are_read_with_the_workloads_federated_credential() {
    use cloudpass_e2e::{
        fakes::{
            aws_sts::{AwsOidcProvider, AwsRoleTrust, StsGate, StsGateConfig},
            google::{GoogleConfig, GoogleFake, WorkloadIdentityProvider},
            secret_stores::{KeyVaultFake, SecretManagerFake},
        },
        moto::MotoServer,
    };
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-stores";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    let sub = |provider: &str| format!("system:cloudpass:{ns}:{provider}");
    let (db_v1, db_v2, vault_value, google_value) = (
        r#"{"username":"app","password":"Pw-v1-7d3c9a"}"#,
        r#"{"username":"app","password":"Pw-v2-e81f04"}"#,
        "pk-live-5b2e8c",
        "whsec-91af3d",
    );

    // AWS: Secrets Manager in moto with authentication enforced; a role that may read it
    // and one that may not, each trusting one provider's subject, behind the STS gate.
    let moto = MotoServer::start().await.unwrap();
    let everything =
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
    let admin = moto.create_user_keys("admin", &everything).await.unwrap();
    let admin_env: Vec<(&str, String)> = admin.env();
    let admin_env: Vec<(&str, &str)> = admin_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (_, v1) = moto.put_secret("prod/db", db_v1, &admin_env).await.unwrap();
    let read_secrets = json!({"Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "*"}]});
    let reader = moto.create_role("db-reader", &read_secrets).await.unwrap();
    let s3_only =
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]});
    let outsider = moto.create_role("no-secrets", &s3_only).await.unwrap();
    let trust = |role: &str, provider: &str| {
        let mut t = AwsRoleTrust::new(role, &b.url, &sub(provider));
        t.audiences = vec!["sts.amazonaws.com".into()];
        t
    };
    let gate = StsGate::start(
        StsGateConfig {
            moto_url: moto.url().to_owned(),
            providers: vec![AwsOidcProvider { url: b.url.clone(), client_ids: vec!["sts.amazonaws.com".into()] }],
            roles: vec![trust(&reader, "aws"), trust(&outsider, "aws-no-secrets")],
            issuer_ca_pem: b.ca.cert_pem(),
            forward_credentials: Some(admin.clone()),
        },
        &b.ca,
    )
    .await
    .unwrap();
    moto.enforce_auth(0).await.unwrap();
    let front = moto.https_front(&b.ca).await.unwrap();

    // Azure: Key Vault trusting the Entra tenant, the app's object ID a secrets user.
    let entra = entra_trusting(b, ns).await;
    let vault = KeyVaultFake::start(TENANT, entra.access_token_check(), &b.ca).await.unwrap();
    let vault_version = vault.set_secret("partner-api-key", vault_value, &[OBJECT_ID]);

    // Google: Secret Manager readable by the federated principal of the gcs provider.
    let wip = WorkloadIdentityProvider::new("123456789", "cloudpass-pool", "broker", &b.url);
    let google = GoogleFake::start(
        GoogleConfig { providers: vec![wip.clone()], service_accounts: vec![], issuer_ca_pem: b.ca.cert_pem() },
        &b.ca,
    )
    .await
    .unwrap();
    let manager = SecretManagerFake::start(google.access_token_check(), &b.ca).await.unwrap();
    let google_secret = "projects/orders-project/secrets/webhook-token";
    manager.add_version(google_secret, google_value, &[&wip.principal(&sub("gcs"))]);

    let sts = |_: ()| json!({"awsSts": {"roleArn": reader, "stsEndpoint": gate.url()}});
    let sm = |reader: &str| {
        json!({"awsSecretsManager": {"secretId": "prod/db", "endpoint": front.url(), "jsonKey": "password",
               "refreshInterval": "10s", "credentialProviderRef": {"name": reader}}})
    };
    let http = |host: &str| json!({"kind": "http", "hosts": [host]});
    let header = json!({"httpHeader": {"name": "Authorization", "format": "Bearer {token}"}});
    apply_ready(
        cp,
        ns,
        &[
            K8S_TRUST.to_owned(),
            credential_provider("aws", sts(())),
            credential_provider("aws-no-secrets", json!({"awsSts": {"roleArn": outsider, "stsEndpoint": gate.url()}})),
            credential_provider("db", sm("aws")),
            credential_provider("db-refused", sm("aws-no-secrets")),
            credential_provider("db-wrong-reader", sm("blob")),
            credential_provider(
                "blob",
                json!({"azureWorkloadIdentity": {"tenantId": TENANT, "clientId": CLIENT_ID, "authorityHost": entra.url()}}),
            ),
            credential_provider(
                "partner-key",
                json!({"azureKeyVault": {"vaultUrl": vault.url(), "name": "partner-api-key", "credentialProviderRef": {"name": "blob"}}}),
            ),
            credential_provider(
                "gcs",
                json!({"gcpWorkloadIdentity": {"workloadIdentityProvider": wip.name(), "stsEndpoint": google.url()}}),
            ),
            credential_provider(
                "webhook-token",
                json!({"gcpSecretManager": {"secret": google_secret, "endpoint": manager.url(), "credentialProviderRef": {"name": "gcs"}}}),
            ),
            policy("db", "orders", "db", http("db.example.com"), header.clone(), None),
            policy("db-refused", "orders", "db-refused", http("refused.example.com"), header.clone(), None),
            policy("partner", "orders", "partner-key", http("partner.example.com"), header.clone(), None),
            policy("webhooks", "orders", "webhook-token", http("hooks.example.com"), header.clone(), None),
        ],
        &["db", "db-refused", "partner", "webhooks"],
    )
    .await;

    // A reader of another cloud's kind is refused in status, naming both kinds.
    let wrong = cp
        .wait_for_condition("credentialprovider", ns, "db-wrong-reader", "Ready", "False", Duration::from_secs(30))
        .await
        .unwrap();
    let ready = &wrong["status"]["conditions"][0];
    assert_eq!(ready["reason"], "InvalidSpec", "{wrong}");
    assert!(ready["message"].as_str().unwrap().contains("of kind awsSts; blob is of kind azureWorkloadIdentity"));

    // Each store's secret, as an API key; the audit record names the secret and version.
    let audited = |policy: &str| {
        b.audit_records().into_iter().rev().find(|r| r["policy"] == policy && r["outcome"] == "allowed").unwrap()
    };
    for (policy, value, secret) in [
        ("db", "Pw-v1-7d3c9a", format!("secretsmanager:prod/db version {v1}")),
        ("partner", vault_value, format!("{}/secrets/partner-api-key version {vault_version}", vault.url())),
        ("webhooks", google_value, format!("{google_secret} version 1")),
    ] {
        let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": policy})).await;
        assert_eq!(status, 200, "{policy}: {answer}");
        assert_eq!(
            (answer["credential"]["type"].as_str(), answer["credential"]["key"].as_str()),
            (Some("apiKey"), Some(value))
        );
        assert_eq!(audited(policy)["secret"], secret.as_str());
    }
    assert_eq!((vault.calls(), manager.calls()), (1, 1));

    // The store's refusal reaches the caller with its code.
    let (status, answer) = ask_when_loaded(b, &w.token, json!({"policy": "db-refused"})).await;
    assert_eq!(status, 502, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("AWS Secrets Manager"), "{answer}");
    // moto answers its XML `AccessDenied`, AWS the JSON `AccessDeniedException`: both are read.
    assert!(answer["upstreamCode"].as_str().unwrap().starts_with("AccessDenied"), "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("not authorized to perform: secretsmanager:GetSecretValue"));

    // A new version reaches callers within refreshInterval (10s), without a change here.
    let (_, v2) = moto.put_secret("prod/db", db_v2, &admin_env).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = b.ask(Some(&w.token), json!({"policy": "db"})).await;
        assert_eq!(status, 200, "{answer}");
        if answer["credential"]["key"] == "Pw-v2-e81f04" {
            break;
        }
        assert!(Instant::now() < deadline, "the new version never came: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(audited("db")["secret"], format!("secretsmanager:prod/db version {v2}"));

    // No value in the broker's log (trace level, the audit records included).
    let log = b.log_text();
    for value in ["Pw-v1-7d3c9a", "Pw-v2-e81f04", vault_value, google_value] {
        assert!(!log.contains(value), "{value} in the broker's log");
    }
}
