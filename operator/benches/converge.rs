//! `make bench`: how fast the real operator converges a large cluster, against the real
//! local apiserver.
//!
//! - 10,000 AccessPolicies over 1,000 namespaces (plus their 2,000 providers) are created
//!   at once; the benchmark reports the time until every policy is Ready, the operator's
//!   peak RSS, and the API writes it issued. Baselines measured in the same run: the time
//!   the apiserver takes just to store the objects, the operator's idle RSS (namespaces
//!   created, no objects yet), and the ideal write count (one status write per object
//!   plus one ConfigMap per namespace).
//! - Then, in that steady state, one policy is edited: the time until its namespace's
//!   compiled config changes, and the writes it caused (ideal: its status and that one
//!   ConfigMap).
//! - The reconcile debounce weighed: 1,000 policies over 100 namespaces converged with the
//!   default 200 ms and with 20 ms, API writes of each against the ideal.
//! - The size of one namespace's compiled config with 1,000 policies.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use cloudpass_api::{AccessPolicy, CredentialProvider, TrustProvider, config::NamespaceConfig};
use cloudpass_e2e::{ControlPlane, process::ManagedProcess};
use cloudpass_operator::evaluate::{Snapshot, evaluate};
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

/// Namespaces of the large run; the debounce runs use a tenth.
const NAMESPACES: usize = 1000;
const POLICIES_PER_NAMESPACE: usize = 10;
const OPERATOR_NS: &str = "cloudpass-system";

fn trust(ns: &str) -> TrustProvider {
    serde_json::from_value(json!({
        "apiVersion": "cloudpass.dev/v1alpha1", "kind": "TrustProvider",
        "metadata": {"name": "this-cluster", "namespace": ns},
        "spec": {"kubernetesServiceAccount": {}},
    }))
    .unwrap()
}

fn credential(ns: &str) -> CredentialProvider {
    serde_json::from_value(json!({
        "apiVersion": "cloudpass.dev/v1alpha1", "kind": "CredentialProvider",
        "metadata": {"name": "s3", "namespace": ns},
        "spec": {"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/bench", "region": "eu-west-1"}},
    }))
    .unwrap()
}

fn policy(ns: &str, i: usize) -> AccessPolicy {
    serde_json::from_value(json!({
        "apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": format!("svc-{i}-to-s3"), "namespace": ns},
        "spec": {
            "client": {"podSelector": {"matchLabels": {"app": format!("svc-{i}")}}, "serviceAccountName": format!("svc-{i}")},
            "trustProviders": [{"name": "this-cluster"}],
            "server": {"kind": "aws", "hosts": ["*.s3.eu-west-1.amazonaws.com"]},
            "credentialProvider": {"name": "s3"},
            "conditions": {"maxCredentialLifetime": "15m", "timeWindows": [{"timeZone": "Europe/Berlin", "start": "06:00", "end": "22:00"}]},
        },
    }))
    .unwrap()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

/// The operator's metrics; empty while it is not listening yet.
async fn metrics(port: u16) -> String {
    match cloudpass_e2e::net::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(answer) => answer.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn sum_metric(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

fn config_size_for_one_namespace() -> usize {
    let (t, c) = (trust("big"), credential("big"));
    let policies: Vec<AccessPolicy> = (0..1000).map(|i| policy("big", i)).collect();
    let snapshot = Snapshot {
        namespace: "big",
        trust: vec![&t],
        credential: vec![&c],
        policies: policies.iter().collect(),
        secrets: Default::default(),
    };
    let config: NamespaceConfig = evaluate(&snapshot).config.expect("all Ready");
    assert_eq!(config.policies.len(), 1000);
    config.to_json().len()
}

/// What one convergence run measured.
struct Figures {
    stored: Duration,
    converged: Duration,
    writes: f64,
    ideal: f64,
    idle_rss: u64,
    peak_rss: u64,
}

/// A running operator and its metrics port.
struct Operator {
    process: ManagedProcess,
    port: u16,
}

impl Operator {
    async fn start(cp: &ControlPlane, debounce: &str, name: &str) -> Self {
        let port = cloudpass_e2e::process::free_port().unwrap();
        let kubeconfig = cp.kubeconfig.to_string_lossy().to_string();
        let process = ManagedProcess::spawn(
            "cloudpass-operator",
            Path::new(env!("CARGO_BIN_EXE_cloudpass-operator")),
            &[
                "--namespace".into(),
                OPERATOR_NS.into(),
                "--metrics-addr".into(),
                format!("127.0.0.1:{port}"),
                "--log-level".into(),
                "warn".into(),
                "--reconcile-debounce".into(),
                debounce.into(),
            ],
            &cp.dir().join(format!("operator-{name}.log")),
            &[("KUBECONFIG", kubeconfig.as_str())],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while sum_metric(&metrics(port).await, "cloudpass_operator_leader ") < 1.0 {
            assert!(Instant::now() < deadline, "operator did not lead:\n{}", process.log_tail(3000));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { process, port }
    }

    async fn writes(&self) -> f64 {
        sum_metric(&metrics(self.port).await, "cloudpass_operator_api_writes_total")
    }

    /// AccessPolicies the operator counts Ready, in every namespace.
    async fn ready_policies(&self) -> f64 {
        sum_metric(&metrics(self.port).await, r#"cloudpass_operator_objects{kind="AccessPolicy",ready="true""#)
    }

    fn rss_kib(&self, field: &str) -> u64 {
        rss_kib(self.process.pid().unwrap(), field)
    }
}

/// Creates `namespaces` namespaces `{prefix}-NNNN` and their objects at once and waits
/// until the operator counts `ready_before` + all of their policies Ready.
async fn converge(
    cp: &ControlPlane,
    client: &kube::Client,
    operator: &Operator,
    prefix: &str,
    namespaces: usize,
    ready_before: usize,
) -> Figures {
    let names: Vec<String> = (0..namespaces).map(|i| format!("{prefix}-{i:04}")).collect();
    stream::iter(names.iter().map(|ns| cp.create_namespace(ns, &[])))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .for_each(|created| created.unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = operator.rss_kib("VmRSS:");
    let writes_before = operator.writes().await;

    let started = Instant::now();
    let creates = names.iter().flat_map(|ns| {
        let c = client.clone();
        let mut jobs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = Vec::new();
        let (t, cr) = (trust(ns), credential(ns));
        let (c1, c2, nsa, nsb) = (c.clone(), c.clone(), ns.clone(), ns.clone());
        jobs.push(Box::pin(async move {
            Api::<TrustProvider>::namespaced(c1, &nsa).create(&PostParams::default(), &t).await.unwrap();
        }));
        jobs.push(Box::pin(async move {
            Api::<CredentialProvider>::namespaced(c2, &nsb).create(&PostParams::default(), &cr).await.unwrap();
        }));
        for i in 0..POLICIES_PER_NAMESPACE {
            let (c, ns, p) = (c.clone(), ns.clone(), policy(ns, i));
            jobs.push(Box::pin(async move {
                Api::<AccessPolicy>::namespaced(c, &ns).create(&PostParams::default(), &p).await.unwrap();
            }));
        }
        jobs
    });
    stream::iter(creates).buffer_unordered(32).collect::<Vec<()>>().await;
    let stored = started.elapsed();

    // Watched through the operator's own count (cheap to poll), checked below on the
    // statuses themselves.
    let total = namespaces * POLICIES_PER_NAMESPACE;
    let target = (ready_before + total) as f64;
    let converged = loop {
        let ready = operator.ready_policies().await;
        if ready >= target {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(900), "only {ready}/{target} Ready after 900 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let trailing writes land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = operator.writes().await - writes_before;
    let ideal = (namespaces * (POLICIES_PER_NAMESPACE + 2) + namespaces) as f64;
    let all: Vec<AccessPolicy> =
        Api::<AccessPolicy>::all(client.clone()).list(&Default::default()).await.unwrap().items;
    let ready = all
        .iter()
        .filter(|p| p.namespace().is_some_and(|ns| ns.starts_with(&format!("{prefix}-"))))
        .filter(|p| p.status.as_ref().is_some_and(|s| s.status.is_ready_for(p.meta().generation)))
        .count();
    assert_eq!(ready, total, "statuses Ready for their generation");
    let configs = Api::<ConfigMap>::namespaced(client.clone(), OPERATOR_NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|c| c.name_any().starts_with(&format!("cloudpass-config-{prefix}-")))
        .count();
    assert_eq!(configs, namespaces);
    let peak_rss = operator.rss_kib("VmHWM:");
    Figures { stored, converged, writes, ideal, idle_rss, peak_rss }
}

/// In the steady state, one policy stops selecting its pods: the time until its
/// namespace's compiled config changes, and the writes that caused.
async fn one_change(client: &kube::Client, operator: &Operator, namespace: &str) -> (Duration, f64) {
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), OPERATOR_NS);
    let config_name = format!("cloudpass-config-{namespace}");
    let hash = |cm: &ConfigMap| cm.annotations().get(cloudpass_api::CONFIG_HASH_ANNOTATION).cloned();
    let before = hash(&configs.get(&config_name).await.unwrap());
    let writes_before = operator.writes().await;
    let edit = json!({"spec": {"client": {"podSelector": {"matchLabels": {"app": "svc-3-canary"}}}}});
    let started = Instant::now();
    Api::<AccessPolicy>::namespaced(client.clone(), namespace)
        .patch("svc-3-to-s3", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let changed = loop {
        if hash(&configs.get(&config_name).await.unwrap()) != before {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the config never changed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    (changed, operator.writes().await - writes_before)
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; anything else (e.g. `cargo test --benches`) only checks
    // that this builds and the config part works.
    if !std::env::args().any(|a| a == "--bench") {
        println!("config for 1,000 policies in one namespace: {} bytes", config_size_for_one_namespace());
        return;
    }
    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crds().await.unwrap();
    cp.create_namespace(OPERATOR_NS, &[]).await.unwrap();
    let client = cp.client().await.unwrap();

    let operator = Operator::start(&cp, "200ms", "large").await;
    let large = converge(&cp, &client, &operator, "large", NAMESPACES, 0).await;
    let (changed, change_writes) = one_change(&client, &operator, "large-0500").await;
    drop(operator);

    // The debounce weighed, on a tenth of the namespaces each, one operator per run (each
    // also finds the namespaces before it already converged, which it does not rewrite).
    let mut debounced = Vec::new();
    let mut ready_before = NAMESPACES * POLICIES_PER_NAMESPACE;
    for (debounce, prefix) in [("200ms", "debounce-200"), ("20ms", "debounce-20")] {
        let operator = Operator::start(&cp, debounce, prefix).await;
        debounced.push((debounce, converge(&cp, &client, &operator, prefix, NAMESPACES / 10, ready_before).await));
        ready_before += NAMESPACES / 10 * POLICIES_PER_NAMESPACE;
    }

    let Figures { stored, converged, writes, ideal, idle_rss, peak_rss } = large;
    println!(
        "operator convergence: {} policies in {NAMESPACES} namespaces ({} objects)",
        NAMESPACES * POLICIES_PER_NAMESPACE,
        NAMESPACES * (POLICIES_PER_NAMESPACE + 2)
    );
    println!("  objects stored by the apiserver (baseline): {:>8.2} s", stored.as_secs_f64());
    println!(
        "  all policies Ready:                         {:>8.2} s  ({:.2}x the baseline)",
        converged.as_secs_f64(),
        converged.as_secs_f64() / stored.as_secs_f64()
    );
    println!(
        "  API writes:                                 {writes:>8.0}    ({:.2}x the ideal {ideal:.0})",
        writes / ideal
    );
    println!("  operator RSS idle (baseline):               {:>8.1} MB", idle_rss as f64 / 1024.0);
    println!(
        "  operator RSS peak:                          {:>8.1} MB  ({:.2}x idle)",
        peak_rss as f64 / 1024.0,
        peak_rss as f64 / idle_rss.max(1) as f64
    );
    println!("one policy edited in that steady state:");
    println!("  its namespace's compiled config changed after {:>6.1} ms", changed.as_secs_f64() * 1000.0);
    println!("  API writes:                                 {change_writes:>8.0}    (ideal 2: its status, the config)");
    println!(
        "reconcile debounce ({} policies in {} namespaces each):",
        NAMESPACES / 10 * POLICIES_PER_NAMESPACE,
        NAMESPACES / 10
    );
    for (debounce, f) in &debounced {
        println!(
            "  {debounce:>5}: Ready in {:>6.2} s ({:.2}x its store time), {:>5.0} API writes ({:.2}x the ideal {:.0})",
            f.converged.as_secs_f64(),
            f.converged.as_secs_f64() / f.stored.as_secs_f64(),
            f.writes,
            f.writes / f.ideal,
            f.ideal
        );
    }
    println!(
        "compiled config, 1,000 policies in one namespace: {} bytes (limit 1,048,576)",
        config_size_for_one_namespace()
    );
}
