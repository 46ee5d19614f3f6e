//! The broker end to end: the real `cloudpass-operator` binary (controller and broker)
//! against the real apiserver, agents' tokens minted by TokenRequest and bound to pods,
//! and credentials obtained from the cloud fakes under `e2e/` (which verify the
//! broker-signed tokens against the broker's own issuer documents, as clouds do).
//!
//! One operator process serves the whole suite; each test works in its own namespace.

use std::{
    path::PathBuf,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use cloudpass_e2e::{ControlPlane, TokenOptions, certs::TestCa, process::ManagedProcess, process::free_port};
use serde_json::{Value, json};

/// The operator under test and how to reach its broker.
struct Broker {
    cp: &'static ControlPlane,
    process: Mutex<ManagedProcess>,
    url: String,
    metrics_url: String,
    /// CA of the broker's certificate and of every fake (the operator's upstream CA).
    ca: TestCa,
    http: reqwest::Client,
    log: PathBuf,
}

const OPERATOR_NAMESPACE: &str = "cloudpass-broker";

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| {
        std::thread::spawn(|| tokio::runtime::Runtime::new().unwrap().block_on(start()))
            .join()
            .expect("operator start panicked")
    })
}

async fn start() -> Broker {
    let cp = ControlPlane::shared();
    cp.install_crds().await.unwrap();
    cp.create_namespace(OPERATOR_NAMESPACE, &[]).await.unwrap();
    let ca = TestCa::new("cloudpass-broker-test-ca").unwrap();
    let serving = ca.issue_server(&[]).unwrap();
    let dir = cp.dir().join("broker");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let (cert, key, ca_file) =
        (write("tls.crt", &serving.cert_pem), write("tls.key", &serving.key_pem), write("ca.crt", &ca.cert_pem()));
    let (broker_port, metrics_port) = (free_port().unwrap(), free_port().unwrap());
    let url = format!("https://127.0.0.1:{broker_port}");
    let args: Vec<String> = [
        "--namespace",
        OPERATOR_NAMESPACE,
        "--instance",
        "broker-test",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--broker-addr",
        &format!("127.0.0.1:{broker_port}"),
        "--broker-tls-cert-file",
        &cert,
        "--broker-tls-key-file",
        &key,
        "--issuer-url",
        &url,
        "--upstream-ca-file",
        &ca_file,
        "--token-cache-ttl",
        "1s",
        "--lease-duration",
        "4",
        "--lease-renew-grace",
        "2",
        "--log-level",
        "debug,kube=info,hyper=info,reqwest=info,rustls=info,tower=info,h2=info",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = cp.dir().join("broker-operator.log");
    let kubeconfig = cp.kubeconfig.to_string_lossy().into_owned();
    let process = ManagedProcess::spawn(
        "broker-operator",
        std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator")),
        &args,
        &log,
        &[("KUBECONFIG", &kubeconfig)],
    )
    .unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http.get(format!("{metrics_url}/readyz")).send().await.map(|r| r.status().is_success());
        if ready.unwrap_or(false) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "operator not ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Broker { cp, process: Mutex::new(process), url, metrics_url, ca, http, log }
}

impl Broker {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks for `policy` with `token`; returns the status and body.
    async fn ask(&self, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}/v1/credentials", self.url)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.metrics_url)).send().await.unwrap().text().await.unwrap()
    }
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
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace, "labels": labels},
        "spec": {"serviceAccountName": sa, "automountServiceAccountToken": false,
                 "containers": [{"name": "app", "image": "example.com/app:1"}]}
    });
    cp.apply_yaml(Some(namespace), &manifest.to_string()).unwrap();
    let uid = cp.kubectl_ok(&["get", "pod", pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}"]).unwrap();
    let options = TokenOptions { bound_pod: Some((pod.to_owned(), uid)), ..Default::default() };
    cp.token(namespace, sa, &options).await.unwrap()
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
    json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": name}, "spec": spec})
        .to_string()
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
            Some(json!({"timeWindows": [{"timeZone": "UTC", "days": [], "start": "00:00", "end": "00:01"}]})),
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
        b.http.get(format!("{}/.well-known/openid-configuration", b.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(discovery["issuer"], b.url.as_str());
    let jwks: jsonwebtoken::jwk::JwkSet =
        b.http.get(discovery["jwks_uri"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
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
    denied(&answer, "outside the policy's time windows: 00:00-00:01 UTC");
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
        |body: &'static str| b.http.post(format!("{}/v1/credentials", b.url)).bearer_auth(&w.token).body(body).send();
    let resp = raw("{not json").await.unwrap();
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.unwrap();
    assert!(answer["message"].as_str().unwrap().contains("not a credential request"), "{answer}");
    let resp = raw(r#"{"policy":"weather","pod":"other"}"#).await.unwrap();
    assert_eq!(resp.status(), 400);
    let big = format!(r#"{{"policy":"{}"}}"#, "x".repeat(100_000));
    let resp = b.http.post(format!("{}/v1/credentials", b.url)).bearer_auth(&w.token).body(big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(b.http.get(format!("{}/v1/nothing", b.url)).send().await.unwrap().status(), 404);

    // Deleting the policy revokes: the next request is denied.
    cp.kubectl_ok(&["delete", "accesspolicy", "db", "-n", ns]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = b.ask(Some(&w.token), json!({"policy": "db"})).await;
        if status == 403 {
            denied(&answer, "no Ready AccessPolicy db");
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
    let metrics = b.metrics().await;
    assert!(metrics.contains(r#"cloudpass_operator_broker_requests_total{outcome="allowed",code="OK"}"#), "{metrics}");
    assert!(metrics.contains(r#"cloudpass_operator_broker_requests_total{outcome="denied",code="Denied"}"#));
    assert!(metrics.contains("cloudpass_operator_broker_request_duration_seconds_bucket"));
    for secret in ["wx-Key-7f3a9c", "Pw-5e1d2b", jwt.as_str(), w.token.as_str(), intruder.as_str(), unbound.as_str()] {
        assert!(!log.contains(secret), "a secret or token appears in the operator's output");
        assert!(!metrics.contains(secret));
    }
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
    json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": "CredentialProvider", "metadata": {"name": name}, "spec": spec})
        .to_string()
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
    use cloudpass_e2e::{
        fakes::aws_sts::{AwsOidcProvider, AwsRoleTrust, StsGate, StsGateConfig},
        moto::MotoServer,
    };
    let b = broker();
    let cp = b.cp;
    let _logs = cp.logs_on_panic();
    let ns = "broker-aws";
    let w = workload(cp, ns, "orders-1", "orders", json!({"app": "orders"})).await;
    let moto = MotoServer::start().await.unwrap();
    moto.create_bucket("orders").await.unwrap();
    let s3_all =
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
    let role = moto.create_role("orders-s3", &s3_all).await.unwrap();
    let mut trust = AwsRoleTrust::new(&role, &b.url, &format!("system:cloudpass:{ns}:s3"));
    trust.audiences = vec!["sts.amazonaws.com".into()];
    let gate = StsGate::start(
        StsGateConfig {
            moto_url: moto.url().to_owned(),
            providers: vec![AwsOidcProvider { url: b.url.clone(), client_ids: vec!["sts.amazonaws.com".into()] }],
            roles: vec![trust],
            issuer_ca_pem: b.ca.cert_pem(),
            forward_credentials: None,
        },
        &b.ca,
    )
    .await
    .unwrap();
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
