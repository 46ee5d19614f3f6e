//! The operator against the real local kube-apiserver: the real binary reconciles real
//! objects, and the tests read back status, Events and the compiled ConfigMap.

use std::time::{Duration, Instant};

use cloudpass_api::{CONFIG_DATA_KEY, CONFIG_HASH_ANNOTATION, config::NamespaceConfig};
use cloudpass_e2e::{ControlPlane, process::ManagedProcess, repo_root};
use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};

const OPERATOR_NS: &str = "cloudpass-system";

/// Tests share one control plane and one operator; they run one at a time because some
/// replace the operator.
static OPERATOR: Mutex<Option<Operator>> = Mutex::const_new(None);

/// A running `cloudpass-operator` process and the port of its metrics endpoint.
struct Operator {
    process: ManagedProcess,
    metrics_port: u16,
}

impl Operator {
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        let response = cloudpass_e2e::net::get(url).await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    }

    /// Value of an unlabelled metric, if exposed.
    async fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await?;
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    }

    fn log(&self) -> String {
        self.process.log_tail(100_000)
    }
}

fn start_operator(cp: &ControlPlane) -> Operator {
    start_operator_with(cp, &[])
}

fn start_operator_with(cp: &ControlPlane, extra: &[&str]) -> Operator {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let log = cp.dir().join(format!("operator-{stamp}.log"));
    let kubeconfig = cp.kubeconfig.to_string_lossy().to_string();
    let metrics_port = cloudpass_e2e::process::free_port().unwrap();
    let args: Vec<String> = [
        "--namespace",
        OPERATOR_NS,
        "--log-format",
        "text",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--lease-duration",
        "6",
        "--lease-renew-grace",
        "2",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    let process = ManagedProcess::spawn(
        "cloudpass-operator",
        std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator")),
        &args,
        &log,
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .expect("operator starts");
    Operator { process, metrics_port }
}

/// Waits until the operator holds the lease and its caches are warm.
async fn wait_leading(op: &Operator, within: Duration) {
    let deadline = Instant::now() + within;
    while op.metric("cloudpass_operator_leader").await != Some(1.0) || op.get("/readyz").await.map(|r| r.0) != Some(200)
    {
        assert!(Instant::now() < deadline, "operator did not become a ready leader:\n{}", op.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn setup() -> (&'static ControlPlane, MutexGuard<'static, Option<Operator>>) {
    let cp = ControlPlane::shared();
    let mut guard = OPERATOR.lock().await;
    if guard.is_none() {
        cp.install_crds().await.unwrap();
        cp.create_namespace(OPERATOR_NS, &[]).await.unwrap();
        let operator = start_operator(cp);
        wait_leading(&operator, Duration::from_secs(30)).await;
        *guard = Some(operator);
    }
    (cp, guard)
}

fn get_json(cp: &ControlPlane, args: &[&str]) -> Option<Value> {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend(["-o", "json"]);
    cp.kubectl_ok(&full).ok().map(|t| serde_json::from_str(&t).unwrap())
}

fn ready(object: &Value) -> (String, String, String) {
    let cond = object["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
    let s = |k: &str| cond.and_then(|c| c[k].as_str()).unwrap_or_default().to_owned();
    (s("status"), s("reason"), s("message"))
}

/// Waits until `kind/name` in `ns` has Ready with this status and reason.
async fn wait_ready(cp: &ControlPlane, ns: &str, kind: &str, name: &str, status: &str, reason: &str) -> Value {
    wait_ready_saying(cp, ns, kind, name, status, reason, "").await
}

/// Waits until `kind/name` in `ns` has Ready with this status and reason, and a message
/// containing `text`.
async fn wait_ready_saying(
    cp: &ControlPlane,
    ns: &str,
    kind: &str,
    name: &str,
    status: &str,
    reason: &str,
    text: &str,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let obj = get_json(cp, &[kind, name, "-n", ns]);
        if let Some(obj) = &obj {
            let (s, r, m) = ready(obj);
            if s == status && r == reason && m.contains(text) {
                return obj.clone();
            }
        }
        if Instant::now() > deadline {
            panic!(
                "{kind} {ns}/{name}: wanted Ready={status}/{reason}, last: {obj:?}\noperator log:\n{}",
                operator_log(cp)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tail of the newest operator log.
fn operator_log(cp: &ControlPlane) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(cp.dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("operator-")))
        .collect();
    logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let text = logs.last().map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default();
    text[text.len().saturating_sub(4000)..].to_owned()
}

fn config_map(cp: &ControlPlane, ns: &str) -> Option<Value> {
    get_json(cp, &["configmap", &format!("cloudpass-config-{ns}"), "-n", OPERATOR_NS])
}

async fn wait_config_gone(cp: &ControlPlane, ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while config_map(cp, ns).is_some() {
        assert!(Instant::now() < deadline, "compiled config of {ns} was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn happy_path_provider_deletion_and_policy_deletion() {
    let (cp, _operator) = setup().await;
    let _logs = cp.logs_on_panic();
    cp.create_namespace("team-happy", &[]).await.unwrap();
    cp.apply_path(Some("team-happy"), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();

    let policy = wait_ready(cp, "team-happy", "accesspolicy", "orders-to-s3", "True", "Ready").await;
    let tp = wait_ready(cp, "team-happy", "trustprovider", "this-cluster", "True", "Ready").await;
    assert_eq!(tp["status"]["providerKind"], "kubernetesServiceAccount");
    assert_eq!(policy["status"]["observedGeneration"], policy["metadata"]["generation"]);
    let cm = config_map(cp, "team-happy").expect("compiled config exists");
    let config = NamespaceConfig::from_json(cm["data"][CONFIG_DATA_KEY].as_str().unwrap()).unwrap();
    assert_eq!(
        cm["metadata"]["annotations"][CONFIG_HASH_ANNOTATION].as_str(),
        Some(config.hash.as_str()),
        "the ConfigMap is annotated with its document's hash"
    );
    let hash = config.policy_hash("orders-to-s3").unwrap();
    assert_eq!(policy["status"]["configHash"], hash.as_str(), "the policy records its compiled hash");
    assert_eq!(config.namespace, "team-happy");
    assert_eq!(config.policies.len(), 1);
    assert_eq!(config.policies[0].credential_provider, "orders-s3");
    assert_eq!(config.policies[0].trust_providers, ["this-cluster"]);
    assert!(config.credential_providers["orders-s3"].aws_sts.is_some());
    assert!(config.trust_providers["this-cluster"].kubernetes_service_account.is_some());

    // The transition to Ready was recorded as an Event.
    let events = cp.kubectl_ok(&["get", "events", "-n", "team-happy", "-o", "json"]).unwrap();
    assert!(events.contains("orders-to-s3") && events.contains("\"reason\": \"Ready\""), "{events}");

    // `kubectl get` shows the columns from real reconciles.
    let table = cp.kubectl_ok(&["get", "accesspolicy", "-n", "team-happy"]).unwrap();
    assert!(table.contains("True") && table.contains("Ready"), "{table}");

    cp.kubectl_ok(&["delete", "credentialprovider", "orders-s3", "-n", "team-happy"]).unwrap();
    let policy = wait_ready(cp, "team-happy", "accesspolicy", "orders-to-s3", "False", "ProviderNotFound").await;
    assert!(ready(&policy).2.contains("CredentialProvider orders-s3 not found"));
    assert!(policy["status"].get("configHash").is_none());
    wait_config_gone(cp, "team-happy").await;

    cp.apply_path(Some("team-happy"), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    wait_ready(cp, "team-happy", "accesspolicy", "orders-to-s3", "True", "Ready").await;
    let again = config_map(cp, "team-happy").expect("config recreated");
    assert_eq!(
        again["metadata"]["annotations"][CONFIG_HASH_ANNOTATION],
        config.hash.as_str(),
        "same content, same hash"
    );

    cp.kubectl_ok(&["delete", "accesspolicy", "orders-to-s3", "-n", "team-happy"]).unwrap();
    wait_config_gone(cp, "team-happy").await;
}

#[tokio::test]
async fn validation_errors_name_their_cause_and_fixing_them_recovers() {
    let (cp, _operator) = setup().await;
    let _logs = cp.logs_on_panic();
    let ns = "team-invalid";
    cp.create_namespace(ns, &[]).await.unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/http-api-key.yaml")).unwrap();

    // The Secret does not exist yet.
    let cp_obj = wait_ready(cp, ns, "credentialprovider", "weather-api-key", "False", "SecretNotFound").await;
    assert!(ready(&cp_obj).2.contains("Secret weather-api not found"), "{:?}", ready(&cp_obj));
    let policy = wait_ready(cp, ns, "accesspolicy", "forecaster-to-weather-api", "False", "ProviderNotReady").await;
    assert!(ready(&policy).2.contains("CredentialProvider weather-api-key is not Ready"));

    // Wrong key, then the right one: the Secret change is noticed without touching the provider.
    cp.kubectl_ok(&["create", "secret", "generic", "weather-api", "-n", ns, "--from-literal=wrong=x"]).unwrap();
    wait_ready_saying(
        cp,
        ns,
        "credentialprovider",
        "weather-api-key",
        "False",
        "SecretNotFound",
        "has no key \"api-key\"",
    )
    .await;
    let secret =
        r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"weather-api"},"stringData":{"api-key":"k"}}"#;
    cp.apply_yaml(Some(ns), secret).unwrap();
    wait_ready(cp, ns, "credentialprovider", "weather-api-key", "True", "Ready").await;
    wait_ready(cp, ns, "accesspolicy", "forecaster-to-weather-api", "True", "Ready").await;

    // A time zone the schema cannot judge, then a real one.
    let set_zone = |zone: &str| {
        let patch = format!(
            r#"{{"spec":{{"conditions":{{"timeWindows":[{{"timeZone":"{zone}","start":"00:00","end":"24:00"}}]}}}}}}"#
        );
        let args = ["patch", "accesspolicy", "forecaster-to-weather-api", "-n", ns, "--type=merge", "-p", &patch];
        cp.kubectl_ok(&args).unwrap();
    };
    set_zone("Europe/Atlantis");
    let policy = wait_ready(cp, ns, "accesspolicy", "forecaster-to-weather-api", "False", "InvalidSpec").await;
    assert!(ready(&policy).2.contains("Europe/Atlantis"));
    set_zone("Europe/Berlin");
    let policy = wait_ready(cp, ns, "accesspolicy", "forecaster-to-weather-api", "True", "Ready").await;
    assert_eq!(policy["status"]["observedGeneration"], policy["metadata"]["generation"]);
}

#[tokio::test]
async fn policies_sharing_an_endpoint_both_report_the_conflict() {
    let (cp, _operator) = setup().await;
    let _logs = cp.logs_on_panic();
    let ns = "team-conflict";
    cp.create_namespace(ns, &[]).await.unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    wait_ready(cp, ns, "accesspolicy", "orders-to-s3", "True", "Ready").await;
    let second = r#"
apiVersion: cloudpass.dev/v1alpha1
kind: AccessPolicy
metadata: {name: orders-to-s3-archive}
spec:
  client: {podSelector: {matchLabels: {app: orders}}}
  trustProviders: [{name: this-cluster}]
  server: {kind: aws}
  credentialProvider: {name: orders-s3}
"#;
    cp.apply_yaml(Some(ns), second).unwrap();
    let a = wait_ready(cp, ns, "accesspolicy", "orders-to-s3", "False", "Conflict").await;
    let b = wait_ready(cp, ns, "accesspolicy", "orders-to-s3-archive", "False", "Conflict").await;
    assert!(ready(&a).2.contains("AccessPolicy orders-to-s3-archive"), "{:?}", ready(&a));
    assert!(ready(&b).2.contains("AccessPolicy orders-to-s3"), "{:?}", ready(&b));
    wait_config_gone(cp, ns).await;
    cp.kubectl_ok(&["delete", "accesspolicy", "orders-to-s3-archive", "-n", ns]).unwrap();
    wait_ready(cp, ns, "accesspolicy", "orders-to-s3", "True", "Ready").await;
}

/// resourceVersion of every cloudpass object and compiled config in `ns`.
fn versions(cp: &ControlPlane, ns: &str) -> Vec<(String, String)> {
    let list = get_json(cp, &["cloudpass", "-n", ns]).unwrap();
    let mut out: Vec<(String, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()),
                o["metadata"]["resourceVersion"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let cm = config_map(cp, ns).expect("the namespace's compiled config exists (a restart deleted it?)");
    out.push(("ConfigMap".into(), cm["metadata"]["resourceVersion"].as_str().unwrap().to_owned()));
    out.sort();
    out
}

#[tokio::test]
async fn a_restart_with_nothing_changed_writes_nothing() {
    let (cp, mut operator) = setup().await;
    let _logs = cp.logs_on_panic();
    let ns = "team-steady";
    cp.create_namespace(ns, &[]).await.unwrap();
    for example in ["aks-to-s3.yaml", "any-to-gcs.yaml", "eks-to-azure-blob.yaml"] {
        cp.apply_path(Some(ns), &repo_root().join("examples").join(example)).unwrap();
    }
    for policy in ["orders-to-s3", "dashboards-to-gcs", "report-uploader-to-blob"] {
        wait_ready(cp, ns, "accesspolicy", policy, "True", "Ready").await;
    }
    // More AccessPolicies than one page of the initial list (500), in a namespace listed
    // after this one: the policies cache is complete only a round trip after this
    // namespace's policies arrive, and a reconcile in between would see none of them.
    let filler = "zz-restart-filler";
    cp.create_namespace(filler, &[]).await.unwrap();
    let mut docs = vec![
        "apiVersion: cloudpass.dev/v1alpha1\nkind: TrustProvider\nmetadata: {name: k8s}\nspec: {kubernetesServiceAccount: {}}".to_owned(),
        "apiVersion: cloudpass.dev/v1alpha1\nkind: CredentialProvider\nmetadata: {name: s3}\nspec: {awsSts: {roleArn: 'arn:aws:iam::123456789012:role/r', region: eu-west-1}}".to_owned(),
    ];
    docs.extend((0..550).map(|i| {
        format!(
            "apiVersion: cloudpass.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: p{i:03}}}\nspec: {{client: {{podSelector: {{matchLabels: {{app: svc-{i}}}}}}}, trustProviders: [{{name: k8s}}], server: {{kind: aws}}, credentialProvider: {{name: s3}}}}"
        )
    }));
    cp.apply_yaml(Some(filler), &docs.join("\n---\n")).unwrap();
    wait_ready(cp, filler, "accesspolicy", "p549", "True", "Ready").await;
    // Let the last writes settle, then take the picture.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = versions(cp, ns);

    // A restart re-lists everything and reconciles every namespace: a full resync.
    drop(operator.take());
    // No debounce: each namespace is reconciled as soon as its first object is listed,
    // which is before the cache is complete.
    let new = start_operator_with(cp, &["--reconcile-debounce=0s"]);
    // The old instance released the lease on SIGTERM, so the new one leads at once.
    wait_leading(&new, Duration::from_secs(20)).await;
    // Wait until the resync has reconciled every namespace at least once.
    let namespaces = cp.kubectl_ok(&["get", "namespaces", "-o", "name"]).unwrap().lines().count() as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while new.metric("cloudpass_operator_reconciles_total").await.unwrap_or(0.0) < namespaces {
        assert!(Instant::now() < deadline, "the resync did not finish:\n{}", new.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = versions(cp, ns);
    assert_eq!(before, after, "a resync of unchanged objects wrote something");
    assert!(config_map(cp, filler).is_some(), "the large namespace keeps its config");
    let (_, text) = new.get("/metrics").await.unwrap();
    assert!(!text.contains("cloudpass_operator_api_writes_total{"), "no write at all after a restart:\n{text}");
    *operator = Some(new);
}

#[tokio::test]
async fn health_and_metrics_are_served() {
    let (cp, operator) = setup().await;
    let _logs = cp.logs_on_panic();
    let ns = "team-metrics";
    cp.create_namespace(ns, &[]).await.unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/oauth2-client-credentials.yaml")).unwrap();
    wait_ready(cp, ns, "credentialprovider", "partner-api", "False", "SecretNotFound").await;
    let op = operator.as_ref().unwrap();
    assert_eq!(op.get("/healthz").await, Some((200, "ok".into())));
    assert_eq!(op.get("/readyz").await.map(|r| r.0), Some(200));
    let (_, text) = op.get("/metrics").await.unwrap();
    for wanted in [
        "cloudpass_operator_reconciles_total ",
        "cloudpass_operator_reconcile_duration_seconds_bucket{le=",
        "cloudpass_operator_leader 1",
        r#"cloudpass_operator_api_writes_total{target="status"}"#,
        r#"cloudpass_operator_objects{kind="CredentialProvider",ready="false",reason="SecretNotFound"}"#,
        r#"cloudpass_operator_objects{kind="AccessPolicy",ready="false",reason="ProviderNotReady"}"#,
    ] {
        assert!(text.contains(wanted), "/metrics lacks {wanted}:\n{text}");
    }
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let (cp, mut shared) = setup().await;
    let _logs = cp.logs_on_panic();
    drop(shared.take()); // SIGTERM: releases the lease
    let first = start_operator(cp);
    wait_leading(&first, Duration::from_secs(20)).await;
    let second = start_operator(cp);
    let deadline = Instant::now() + Duration::from_secs(20);
    while second.get("/readyz").await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "standby never became ready:\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ns = "team-leader";
    cp.create_namespace(ns, &[]).await.unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/gke-to-s3.yaml")).unwrap();
    wait_ready(cp, ns, "accesspolicy", "exporter-to-s3", "True", "Ready").await;
    assert_eq!(second.metric("cloudpass_operator_leader").await, Some(0.0));
    assert_eq!(second.metric("cloudpass_operator_reconciles_total").await, Some(0.0), "the standby reconciled");
    assert!(second.log().contains("standing by for leadership"));

    // The leader crashes without releasing its lease; the standby takes over once the
    // lease expires (6 s in this test, 15 s by default).
    let mut first = first;
    let killed = Instant::now();
    first.process.kill_hard();
    wait_leading(&second, Duration::from_secs(30)).await;
    let takeover = killed.elapsed();
    cp.kubectl_ok(&["delete", "credentialprovider", "exporter-s3", "-n", ns]).unwrap();
    wait_ready(cp, ns, "accesspolicy", "exporter-to-s3", "False", "ProviderNotFound").await;
    eprintln!("leader takeover after SIGKILL: {:.1}s (lease duration 6s)", takeover.as_secs_f64());
    assert!(second.metric("cloudpass_operator_reconciles_total").await.unwrap_or(0.0) > 0.0);
    *shared = Some(second);
}
