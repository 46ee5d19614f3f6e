//! The test bed is real: the CRDs, examples and tokens are checked by a real
//! kube-apiserver, and the apiserver really calls a webhook registered by URL.
//! One control plane serves every test of this binary.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::post};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use cloudpass_e2e::{ControlPlane, TokenOptions, WebhookRegistration, certs::TestCa, process::is_running, repo_root};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

fn plane() -> &'static ControlPlane {
    ControlPlane::shared()
}

/// Installs crds/ once per test binary.
async fn install_crds() {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async { plane().install_crds().await.expect("CRDs installed") }).await;
}

fn yaml_files(dir: PathBuf) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn crds_are_served_explained_and_listed() {
    let cp = plane();
    let _logs = cp.logs_on_panic();
    install_crds().await;

    let explain = cp.kubectl_ok(&["explain", "accesspolicy.spec.client"]).unwrap();
    assert!(explain.contains("Which pods of this namespace receive the credential"), "{explain}");
    assert!(explain.contains("podSelector") && explain.contains("serviceAccountName"), "{explain}");
    let explain = cp.kubectl_ok(&["explain", "credentialprovider.spec.awsSts.sessionDuration"]).unwrap();
    assert!(explain.contains("from 15m to 12h"), "{explain}");

    cp.create_namespace("listing", &[]).await.unwrap();
    cp.apply_path(Some("listing"), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    let listing = cp.kubectl_ok(&["get", "cloudpass", "-n", "listing"]).unwrap();
    for wanted in [
        "trustprovider.cloudpass.dev/this-cluster",
        "credentialprovider.cloudpass.dev/orders-s3",
        "accesspolicy.cloudpass.dev/orders-to-s3",
        "READY",
        "REASON",
        "AGE",
    ] {
        assert!(listing.contains(wanted), "`kubectl get cloudpass` lacks {wanted}:\n{listing}");
    }
    let policies = cp.kubectl_ok(&["get", "ap", "-n", "listing"]).unwrap();
    let header = policies.lines().next().unwrap_or_default();
    for column in ["NAME", "SERVER", "HOSTS", "CREDENTIAL", "READY", "REASON", "AGE"] {
        assert!(header.contains(column), "column {column} missing: {header}");
    }
    assert!(policies.contains("orders-s3") && policies.contains("aws"), "{policies}");

    // The schema applied its defaults: delivery and the STS session name.
    let stored: Value =
        serde_json::from_str(&cp.kubectl_ok(&["get", "ap", "orders-to-s3", "-n", "listing", "-o", "json"]).unwrap())
            .unwrap();
    assert_eq!(stored["spec"]["delivery"], json!({"sdkEndpoint": {}}));
}

#[tokio::test]
async fn every_example_is_accepted_by_the_apiserver() {
    let cp = plane();
    let _logs = cp.logs_on_panic();
    install_crds().await;
    let files = yaml_files(repo_root().join("examples"));
    assert!(files.len() >= 6);
    for (i, file) in files.iter().enumerate() {
        let ns = format!("example-{i}");
        cp.create_namespace(&ns, &[]).await.unwrap();
        let path = file.to_string_lossy();
        let out = cp
            .kubectl_output(
                &["apply", "--server-side", "--dry-run=server", "--validate=strict", "-n", &ns, "-f", &path],
                None,
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{} refused by the apiserver: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn every_invalid_example_is_refused_with_its_message() {
    let cp = plane();
    let _logs = cp.logs_on_panic();
    install_crds().await;
    cp.create_namespace("invalid-examples", &[]).await.unwrap();
    let files = yaml_files(repo_root().join("examples/invalid"));
    assert!(files.len() >= 8);
    let mut failures = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let expect = text.lines().find_map(|l| l.strip_prefix("# expect: ")).expect("expect line").trim();
        let path = file.to_string_lossy();
        let out = cp
            .kubectl_output(
                &[
                    "apply",
                    "--server-side",
                    "--dry-run=server",
                    "--validate=strict",
                    "-n",
                    "invalid-examples",
                    "-f",
                    &path,
                ],
                None,
            )
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains(expect) {
            failures.push(format!("{}: expected refusal containing {expect:?}, got: {stderr}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn token_request_tokens_verify_against_the_served_jwks() {
    let cp = plane();
    let _logs = cp.logs_on_panic();
    cp.create_namespace("tokens", &[]).await.unwrap();
    cp.create_service_account("tokens", "app").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(cp.client().await.unwrap(), "tokens");
    let pod = pods.create(&PostParams::default(), &simple_pod("app-0", Some("app"), BTreeMap::new())).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();

    let token = cp
        .token(
            "tokens",
            "app",
            &TokenOptions {
                bound_pod: Some(("app-0".into(), uid.clone())),
                expiration_seconds: 600,
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let (discovery, jwks) = cp.issuer_documents().await.unwrap();
    assert_eq!(discovery["issuer"], cp.issuer.as_str());
    let jwks: JwkSet = serde_json::from_value(jwks).unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwk = jwks.find(header.kid.as_deref().expect("kid")).expect("the token's key is in the JWKS");
    let key = DecodingKey::from_jwk(jwk).unwrap();

    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[cp.issuer.as_str()]);
    validation.set_audience(&["cloudpass"]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap().claims;
    assert_eq!(claims["sub"], "system:serviceaccount:tokens:app");
    assert_eq!(claims["kubernetes.io"]["namespace"], "tokens");
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "app");
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "app-0");
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], uid.as_str());
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 600);

    // The same token is refused for another audience, and with a pinned algorithm it
    // was not signed with.
    let mut wrong_audience = Validation::new(header.alg);
    wrong_audience.set_audience(&["sts.amazonaws.com"]);
    assert!(jsonwebtoken::decode::<Value>(&token, &key, &wrong_audience).is_err());
    let other_alg = if header.alg == Algorithm::RS256 { Algorithm::ES256 } else { Algorithm::RS256 };
    assert!(jsonwebtoken::decode::<Value>(&token, &key, &Validation::new(other_alg)).is_err());
}

fn simple_pod(name: &str, service_account: Option<&str>, labels: BTreeMap<String, String>) -> Pod {
    Pod {
        metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..Default::default() },
        spec: Some(PodSpec {
            service_account_name: service_account.map(str::to_owned),
            containers: vec![Container {
                name: "app".into(),
                image: Some("example/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// What the trivial webhook saw.
#[derive(Default)]
struct Seen {
    requests: Vec<Value>,
}

async fn mutate(State(seen): State<Arc<Mutex<Seen>>>, Json(review): Json<Value>) -> Json<Value> {
    let uid = review["request"]["uid"].clone();
    seen.lock().unwrap().requests.push(review);
    let patch =
        json!([{"op": "add", "path": "/metadata/annotations", "value": {"e2e.cloudpass.dev/seen-by": "test-webhook"}}]);
    Json(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": B64.encode(patch.to_string())},
    }))
}

#[tokio::test]
async fn apiserver_calls_a_webhook_registered_by_url() {
    let cp = plane();
    let _logs = cp.logs_on_panic();
    let ca = TestCa::new("test-webhook-ca").unwrap();
    let serving = ca.issue_server(&[]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let router = Router::new().route("/mutate", post(mutate)).with_state(seen.clone());
    let (addr, server) = cloudpass_e2e::tls::serve_https(router, &serving).await.unwrap();

    let url = format!("https://{addr}/mutate");
    cp.register_pod_webhook(&WebhookRegistration {
        name: "e2e-trivial",
        url: &url,
        ca_pem: &ca.cert_pem(),
        namespace_selector: Some(LabelSelector {
            match_labels: Some([("e2e-webhook".to_owned(), "on".to_owned())].into()),
            ..Default::default()
        }),
        failure_policy: "Fail",
    })
    .await
    .unwrap();
    cp.create_namespace("webhook-on", &[("e2e-webhook", "on")]).await.unwrap();
    cp.create_namespace("webhook-off", &[]).await.unwrap();
    let client = cp.client().await.unwrap();

    // The apiserver needs a moment to see a new webhook configuration.
    let pods_on: Api<Pod> = Api::namespaced(client.clone(), "webhook-on");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let stored = loop {
        n += 1;
        let pod =
            pods_on.create(&PostParams::default(), &simple_pod(&format!("p{n}"), None, BTreeMap::new())).await.unwrap();
        if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("e2e.cloudpass.dev/seen-by")) {
            break pod;
        }
        assert!(Instant::now() < deadline, "the apiserver never called the webhook");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let name = stored.metadata.name.clone().unwrap();
    let reread = pods_on.get(&name).await.unwrap();
    assert_eq!(reread.metadata.annotations.unwrap()["e2e.cloudpass.dev/seen-by"], "test-webhook");
    {
        let seen = seen.lock().unwrap();
        let review = seen.requests.last().unwrap();
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(review["request"]["operation"], "CREATE");
        assert_eq!(review["request"]["namespace"], "webhook-on");
        assert_eq!(review["request"]["object"]["metadata"]["name"], name.as_str());
    }

    // A namespace without the label is not sent to the webhook.
    let before = seen.lock().unwrap().requests.len();
    let pods_off: Api<Pod> = Api::namespaced(client.clone(), "webhook-off");
    let plain = pods_off.create(&PostParams::default(), &simple_pod("plain", None, BTreeMap::new())).await.unwrap();
    assert!(plain.metadata.annotations.is_none_or(|a| !a.contains_key("e2e.cloudpass.dev/seen-by")));
    assert_eq!(seen.lock().unwrap().requests.len(), before);

    // With the webhook gone and failurePolicy Fail, pod creation in the selected
    // namespace fails loudly while other namespaces are unaffected.
    server.abort();
    let _ = server.await;
    let err = pods_on.create(&PostParams::default(), &simple_pod("refused", None, BTreeMap::new())).await.unwrap_err();
    assert!(err.to_string().contains("failed calling webhook"), "{err}");
    pods_off.create(&PostParams::default(), &simple_pod("still-fine", None, BTreeMap::new())).await.unwrap();
}

fn probe_pids(stdout: &str) -> Vec<u32> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("pids "))
        .map(|rest| rest.split_whitespace().map(|p| p.parse().unwrap()).collect())
        .unwrap_or_default()
}

fn assert_all_exit(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while pids.iter().any(|&p| is_running(p)) {
        assert!(Instant::now() < deadline, "orphaned processes still running: {pids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_panicking_test_leaves_no_processes_and_prints_logs() {
    let out = Command::new(env!("CARGO_BIN_EXE_e2e-orphan-probe")).arg("panic").output().unwrap();
    assert!(!out.status.success(), "the probe panics");
    let pids = probe_pids(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(pids.len(), 2, "etcd and apiserver pids: {}", String::from_utf8_lossy(&out.stderr));
    assert_all_exit(&pids, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control plane logs") && stderr.contains("---- kube-apiserver"), "{stderr}");
}

#[test]
fn a_killed_test_process_leaves_no_processes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_e2e-orphan-probe"))
        .arg("hang")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let pids = probe_pids(&line);
    assert_eq!(pids.len(), 2, "{line}");
    assert!(pids.iter().all(|&p| is_running(p)));
    child.kill().unwrap(); // SIGKILL: no unwinding, no Drop
    child.wait().unwrap();
    assert_all_exit(&pids, Duration::from_secs(10));
}
