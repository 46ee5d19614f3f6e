//! The webhook through the real apiserver: the real `cloudpass-webhook` binary registered
//! by URL, the real operator (in process) compiling the configs it reads, pods created
//! through the API and read back as stored.

use std::{
    collections::BTreeMap,
    sync::OnceLock,
    time::{Duration, Instant},
};

use cloudpass_e2e::{ControlPlane, WebhookRegistration, certs::TestCa, process::ManagedProcess, repo_root};
use k8s_openapi::{
    api::core::v1::{Pod, Secret},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

const SYSTEM_NS: &str = "cloudpass-system";

/// A running webhook process registered under its own configuration name.
struct Webhook {
    process: ManagedProcess,
    port: u16,
}

impl Webhook {
    async fn start(cp: &ControlPlane, name: &str, namespace_label: (&str, &str), extra: &[&str]) -> Webhook {
        let port = cloudpass_e2e::process::free_port().unwrap();
        let kubeconfig = cp.kubeconfig.to_string_lossy().to_string();
        let mut args: Vec<String> = [
            "--namespace",
            SYSTEM_NS,
            "--listen-addr",
            &format!("127.0.0.1:{port}"),
            "--extra-san",
            "127.0.0.1",
            "--webhook-config-name",
            name,
            "--cert-secret",
            &format!("{name}-tls"),
            "--cert-check-interval",
            "1s",
            "--agent-image",
            "example.com/cloudpass-agent:test",
            "--broker-url",
            "https://127.0.0.1:1",
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = ManagedProcess::spawn(
            name,
            std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-webhook")),
            &args,
            &cp.dir().join(format!("{name}.log")),
            &[("KUBECONFIG", kubeconfig.as_str())],
        )
        .unwrap();
        // Registered with a CA that did not sign the webhook's certificate: the webhook
        // must put its own CA into the caBundle before the apiserver can call it.
        let placeholder = TestCa::new("placeholder").unwrap().cert_pem();
        let url = format!("https://127.0.0.1:{port}/mutate");
        cp.register_pod_webhook(&WebhookRegistration {
            name,
            url: &url,
            ca_pem: &placeholder,
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    requirement(cloudpass_api::INJECTION_LABEL, "In", &[cloudpass_api::INJECTION_ENABLED]),
                    requirement(namespace_label.0, "In", &[namespace_label.1]),
                    requirement("kubernetes.io/metadata.name", "NotIn", &["kube-system", SYSTEM_NS]),
                ]),
                ..Default::default()
            }),
            failure_policy: "Fail",
        })
        .await
        .unwrap();
        let webhook = Webhook { process, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while webhook.get("/readyz").await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "webhook not ready:\n{}", webhook.process.log_tail(4000));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        webhook
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().ok()?;
        let r = http.get(format!("https://127.0.0.1:{}{path}", self.port)).send().await.ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await.unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok()).unwrap_or(0.0)
    }
}

fn requirement(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: op.into(),
        values: Some(values.iter().map(|v| v.to_string()).collect()),
    }
}

/// The control plane with CRDs and the operator running (in process, on its own thread).
fn setup() -> &'static ControlPlane {
    static READY: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    READY.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                cp.install_crds().await.unwrap();
                cp.create_namespace(SYSTEM_NS, &[]).await.unwrap();
                cp.create_service_account("kube-system", "default").await.unwrap();
                let client = cp.client().await.unwrap();
                let settings = cloudpass_operator::reconcile::Settings {
                    operator_namespace: SYSTEM_NS.into(),
                    instance: None,
                    concurrency: 4,
                    debounce: cloudpass_operator::reconcile::DEFAULT_DEBOUNCE,
                    broker_secret_access: None,
                    broker_ca_configmap: None,
                    verify: None,
                };
                let metrics = cloudpass_operator::metrics::Metrics::new();
                cloudpass_operator::reconcile::run(client, settings, metrics, std::future::pending(), move || {
                    tx.send(()).unwrap()
                })
                .await;
            });
        });
        rx.recv_timeout(Duration::from_secs(60)).expect("operator caches warm");
    });
    cp
}

/// A namespace opted in, with the AKS-to-S3 example applied and its policy Ready.
async fn team(cp: &ControlPlane, ns: &str, extra_label: (&str, &str)) {
    cp.create_namespace(ns, &[(cloudpass_api::INJECTION_LABEL, cloudpass_api::INJECTION_ENABLED), extra_label])
        .await
        .unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    cp.wait_for_condition("accesspolicy", ns, "orders-to-s3", "Ready", "True", Duration::from_secs(30)).await.unwrap();
}

fn orders_pod(extra: Value) -> Pod {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "orders-", "labels": {"app": "orders"}},
        "spec": {"serviceAccountName": "orders", "containers": [{"name": "api", "image": "orders:3"}]},
    });
    merge(&mut pod, extra);
    serde_json::from_value(pod).unwrap()
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

fn injected(pod: &Pod) -> bool {
    pod.spec.as_ref().unwrap().init_containers.iter().flatten().any(|c| c.name == "cloudpass-agent")
}

/// Creates pods until the apiserver has picked up the webhook and its caBundle (a new
/// configuration takes a moment to be used), and returns the first injected one.
async fn first_injected(pods: &Api<Pod>, webhook: &Webhook) -> Pod {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(pod) = pods.create(&PostParams::default(), &orders_pod(json!({}))).await
            && injected(&pod)
        {
            return pod;
        }
        assert!(Instant::now() < deadline, "no pod was injected:\n{}", webhook.process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn selected_pods_are_injected_and_no_others() {
    let cp = setup();
    let _logs = cp.logs_on_panic();
    let webhook = Webhook::start(cp, "cloudpass-webhook", ("cloudpass-e2e/suite", "main"), &[]).await;
    team(cp, "inject-main", ("cloudpass-e2e/suite", "main")).await;
    let client = cp.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "inject-main");
    first_injected(&pods, &webhook).await;

    // generateName, several containers, an existing init container and existing env.
    let pod = orders_pod(json!({"spec": {
        "initContainers": [{"name": "migrate", "image": "migrate:1"}],
        "containers": [
            {"name": "api", "image": "orders:3", "env": [{"name": "LOG_LEVEL", "value": "debug"}]},
            {"name": "metrics", "image": "exporter:1"},
        ],
    }}));
    let stored = pods.create(&PostParams::default(), &pod).await.unwrap();
    let stored = pods.get(stored.metadata.name.as_deref().unwrap()).await.unwrap();
    let spec = stored.spec.as_ref().unwrap();
    let init: Vec<_> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(init, ["cloudpass-agent", "migrate"]);
    assert_eq!(spec.init_containers.as_ref().unwrap()[0].restart_policy.as_deref(), Some("Always"));
    for c in &spec.containers {
        let env: BTreeMap<_, _> = c.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
        assert!(env.contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"), "{}: {env:?}", c.name);
        if c.name == "api" {
            assert_eq!(env["LOG_LEVEL"], Some("debug"));
        }
    }
    let volumes: Vec<_> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert!(volumes.contains(&"cloudpass-token") && volumes.contains(&"cloudpass-shared"), "{volumes:?}");
    // The ServiceAccount admission plugin mounted the API token into the app containers
    // but not into the agent, which has an empty directory there instead.
    let agent_mounts: Vec<_> =
        spec.init_containers.as_ref().unwrap()[0].volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
    assert!(!agent_mounts.iter().any(|m| m.starts_with("kube-api-access")), "{agent_mounts:?}");
    assert!(spec.containers[0].volume_mounts.iter().flatten().any(|m| m.name.starts_with("kube-api-access")));
    let ann = stored.metadata.annotations.unwrap();
    assert_eq!(ann["cloudpass.dev/policies"], "orders-to-s3");
    assert!(ann.contains_key("cloudpass.dev/injected"));

    // Not selected by any policy: stored unchanged.
    let other = pods
        .create(&PostParams::default(), &orders_pod(json!({"metadata": {"labels": {"app": "billing"}}})))
        .await
        .unwrap();
    assert!(!injected(&other) && other.metadata.annotations.is_none_or(|a| !a.contains_key("cloudpass.dev/injected")));

    // A namespace that did not opt in, with the same policy Ready: unchanged.
    cp.create_namespace("inject-off", &[]).await.unwrap();
    cp.apply_path(Some("inject-off"), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    cp.wait_for_condition("accesspolicy", "inject-off", "orders-to-s3", "Ready", "True", Duration::from_secs(30))
        .await
        .unwrap();
    let off: Api<Pod> = Api::namespaced(client.clone(), "inject-off");
    assert!(!injected(&off.create(&PostParams::default(), &orders_pod(json!({}))).await.unwrap()));

    // kube-system is excluded even when labelled.
    cp.kubectl_ok(&[
        "label",
        "namespace",
        "kube-system",
        "cloudpass.dev/injection=enabled",
        "cloudpass-e2e/suite=main",
        "--overwrite",
    ])
    .unwrap();
    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let sys_pod = orders_pod(json!({"spec": {"serviceAccountName": "default"}}));
    assert!(!injected(&system.create(&PostParams::default(), &sys_pod).await.unwrap()));

    // A container that already uses IRSA keeps it, and kubectl shows why.
    let irsa = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "irsa", "labels": {"app": "orders"}},
        "spec": {"serviceAccountName": "orders", "containers": [{"name": "api", "image": "orders:3",
            "env": [{"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"}]}]}});
    let out = cp.kubectl_output(&["create", "-n", "inject-main", "-f", "-"], Some(&irsa.to_string())).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Warning: cloudpass: container api sets AWS_WEB_IDENTITY_TOKEN_FILE"), "{stderr}");
    assert!(!injected(&pods.get("irsa").await.unwrap()));

    // The caBundle now holds the webhook's own CA, from its Secret.
    let secret: Secret = Api::namespaced(client.clone(), SYSTEM_NS).get("cloudpass-webhook-tls").await.unwrap();
    let bundle = secret.data.unwrap()["ca-bundle.crt"].0.clone();
    let config = cp.kubectl_ok(&["get", "mutatingwebhookconfiguration", "cloudpass-webhook", "-o", "json"]).unwrap();
    let config: Value = serde_json::from_str(&config).unwrap();
    use base64::Engine;
    let ca_bundle = base64::engine::general_purpose::STANDARD
        .decode(config["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap())
        .unwrap();
    assert_eq!(ca_bundle, bundle);
    assert!(webhook.metric("cloudpass_webhook_injections_total").await >= 2.0);
    // The apiserver keeps its connection to the webhook: no TLS handshake per pod.
    let before = webhook.metric("cloudpass_webhook_connections_total").await;
    for _ in 0..10 {
        assert!(injected(&pods.create(&PostParams::default(), &orders_pod(json!({}))).await.unwrap()));
    }
    let opened = webhook.metric("cloudpass_webhook_connections_total").await - before - 1.0;
    assert!(opened <= 1.0, "the apiserver opened {opened} connections for 10 pods");
    // Hostile input gets a precise error and the server keeps serving.
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let url = format!("https://127.0.0.1:{}/mutate", webhook.port);
    let bad = http.post(&url).body("{\"request\": [").send().await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().await.unwrap().starts_with("malformed AdmissionReview"));
    let huge = http.post(&url).body(vec![b' '; 5 * 1024 * 1024]).send().await.unwrap();
    assert_eq!(huge.status().as_u16(), 413, "bodies over 4 MiB are refused");
    assert_eq!(webhook.get("/healthz").await, Some((200, "ok".into())));
    // One call per pod: nothing modified the pod after the webhook, so no reinvocation.
    let (_, metrics) = webhook.get("/metrics").await.unwrap();
    assert!(!metrics.contains(r#"cloudpass_webhook_skips_total{reason="already_injected"}"#), "{metrics}");
}

#[tokio::test]
async fn a_stopped_webhook_blocks_only_opted_in_namespaces() {
    let cp = setup();
    let _logs = cp.logs_on_panic();
    let mut webhook = Webhook::start(cp, "cloudpass-webhook-down", ("cloudpass-e2e/suite", "down"), &[]).await;
    team(cp, "down-on", ("cloudpass-e2e/suite", "down")).await;
    cp.create_namespace("down-off", &[]).await.unwrap();
    cp.create_service_account("down-off", "orders").await.unwrap();
    let client = cp.client().await.unwrap();
    let on: Api<Pod> = Api::namespaced(client.clone(), "down-on");
    let off: Api<Pod> = Api::namespaced(client.clone(), "down-off");
    first_injected(&on, &webhook).await;

    webhook.process.stop();
    let err = on.create(&PostParams::default(), &orders_pod(json!({}))).await.unwrap_err().to_string();
    assert!(err.contains("failed calling webhook") && err.contains("cloudpass-webhook-down"), "{err}");
    off.create(&PostParams::default(), &orders_pod(json!({}))).await.expect("other namespaces are unaffected");
    cp.kubectl_ok(&["delete", "mutatingwebhookconfiguration", "cloudpass-webhook-down"]).unwrap();
}

#[tokio::test]
async fn certificate_rotation_while_pods_are_created_fails_no_admission() {
    let cp = setup();
    let _logs = cp.logs_on_panic();
    // Certificates renewed every ~4 s and the CA every ~10 s.
    let webhook = Webhook::start(
        cp,
        "cloudpass-webhook-rotate",
        ("cloudpass-e2e/suite", "rotate"),
        &["--cert-validity", "6s", "--ca-validity", "15s"],
    )
    .await;
    team(cp, "rotate", ("cloudpass-e2e/suite", "rotate")).await;
    let client = cp.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "rotate");
    first_injected(&pods, &webhook).await;
    let secrets: Api<Secret> = Api::namespaced(client, SYSTEM_NS);
    let ca_name = |s: &Secret| s.metadata.annotations.clone().unwrap_or_default().get("cloudpass.dev/ca-name").cloned();
    let first_ca = ca_name(&secrets.get("cloudpass-webhook-rotate-tls").await.unwrap());
    let reloads_before = webhook.metric("cloudpass_webhook_certificate_reloads_total").await;

    let started = Instant::now();
    let (mut created, mut cas) = (0, std::collections::BTreeSet::new());
    while started.elapsed() < Duration::from_secs(25) {
        let pod = pods.create(&PostParams::default(), &orders_pod(json!({}))).await.unwrap_or_else(|e| {
            panic!("admission failed during rotation after {created} pods: {e}\n{}", webhook.process.log_tail(3000))
        });
        assert!(injected(&pod));
        created += 1;
        cas.extend(ca_name(&secrets.get("cloudpass-webhook-rotate-tls").await.unwrap()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reloads = webhook.metric("cloudpass_webhook_certificate_reloads_total").await - reloads_before;
    eprintln!("{created} pods admitted during rotation; {reloads} certificate reloads; {} CAs", cas.len());
    assert!(reloads >= 3.0, "expected several renewals, saw {reloads}");
    assert!(cas.len() >= 2 && cas.iter().any(|c| Some(c) != first_ca.as_ref()), "the CA rotated: {cas:?}");
}

#[tokio::test]
async fn pods_using_the_webhooks_names_are_admitted() {
    let cp = setup();
    let _logs = cp.logs_on_panic();
    let webhook = Webhook::start(cp, "cloudpass-webhook-names", ("cloudpass-e2e/suite", "names"), &[]).await;
    team(cp, "names", ("cloudpass-e2e/suite", "names")).await;
    let client = cp.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "names");
    first_injected(&pods, &webhook).await;

    // Volumes named like the webhook's: the pod is injected, its volumes kept, the
    // webhook's volumes named so as not to clash (the apiserver refuses duplicates).
    let own = ["cloudpass-token", "cloudpass-shared"];
    let pod = orders_pod(json!({"spec": {
        "volumes": own.iter().map(|name| json!({"name": name, "emptyDir": {}})).collect::<Vec<_>>(),
        "containers": [{"name": "api", "image": "orders:3",
                        "volumeMounts": [{"name": "cloudpass-token", "mountPath": "/data"}]}],
    }}));
    let stored = pods.create(&PostParams::default(), &pod).await.expect("the pod is admitted");
    assert!(injected(&stored));
    let spec = stored.spec.as_ref().unwrap();
    let volumes: Vec<_> = spec.volumes.iter().flatten().collect();
    for name in own {
        let matching: Vec<_> = volumes.iter().filter(|v| v.name == name).collect();
        assert!(matching.len() == 1 && matching[0].empty_dir.is_some(), "{name}: the pod's own volume");
    }
    let agent = &spec.init_containers.as_ref().unwrap()[0];
    let token = agent.volume_mounts.iter().flatten().find(|m| m.mount_path == cloudpass_api::agent::TOKEN_DIR).unwrap();
    assert_ne!(token.name, "cloudpass-token");
    assert!(volumes.iter().any(|v| v.name == token.name && v.projected.is_some()), "{token:?}");
    let api_mounts: Vec<_> =
        spec.containers[0].volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m.mount_path.as_str())).collect();
    assert!(api_mounts.contains(&("cloudpass-token", "/data")), "{api_mounts:?}");

    // An app container named like the agent: admitted without an agent, and kubectl says why.
    let named = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "named-like-the-agent", "labels": {"app": "orders"}},
        "spec": {"serviceAccountName": "orders", "containers": [{"name": "cloudpass-agent", "image": "orders:3"}]}});
    let out = cp.kubectl_output(&["create", "-n", "names", "-f", "-"], Some(&named.to_string())).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Warning: cloudpass: not injected") && stderr.contains("already named cloudpass-agent"),
        "{stderr}"
    );
    let stored = pods.get("named-like-the-agent").await.unwrap();
    let spec = stored.spec.as_ref().unwrap();
    assert!(spec.init_containers.is_none(), "no agent was added");
    assert_eq!(spec.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["cloudpass-agent"]);
    let annotations = stored.metadata.annotations.unwrap_or_default();
    assert!(
        annotations.get("cloudpass.dev/injection-skipped").is_some_and(|a| a.contains("already named cloudpass-agent")),
        "{annotations:?}"
    );
    assert!(!annotations.contains_key("cloudpass.dev/injected"));
    let (_, metrics) = webhook.get("/metrics").await.unwrap();
    assert!(metrics.contains(r#"cloudpass_webhook_skips_total{reason="name_conflict"} 1"#), "{metrics}");
}
