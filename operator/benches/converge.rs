//! `make bench-operator`: how fast the real operator converges a large cluster, against
//! the real local apiserver.
//!
//! 1,000 AccessPolicies over 100 namespaces (plus their 200 providers) are created at
//! once; the benchmark reports the time until every policy is Ready, the operator's peak
//! RSS, and the API writes it issued. Baselines measured in the same run: the time the
//! apiserver takes just to store the objects, the operator's idle RSS, and the ideal
//! write count (one status write per object plus one ConfigMap per namespace).
//! It also reports the size of one namespace's compiled config with 1,000 policies.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use cloudpass_api::{AccessPolicy, CredentialProvider, TrustProvider, config::NamespaceConfig};
use cloudpass_e2e::{ControlPlane, process::ManagedProcess};
use cloudpass_operator::evaluate::{Snapshot, evaluate};
use futures::{StreamExt, stream};
use kube::{Api, Resource, ResourceExt, api::PostParams};
use serde_json::json;

const NAMESPACES: usize = 100;
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

/// Runs an operator with `debounce` and creates the objects in namespaces `{prefix}-NNN`.
async fn converge(cp: &ControlPlane, client: &kube::Client, debounce: &str, prefix: &str) -> Figures {
    let port = cloudpass_e2e::process::free_port().unwrap();
    let kubeconfig = cp.kubeconfig.to_string_lossy().to_string();
    let operator = ManagedProcess::spawn(
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
        &cp.dir().join(format!("operator-{prefix}.log")),
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .unwrap();
    let pid = operator.pid().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sum_metric(&metrics(port).await, "cloudpass_operator_leader ") < 1.0 {
        assert!(Instant::now() < deadline, "operator did not lead:\n{}", operator.log_tail(3000));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let namespaces: Vec<String> = (0..NAMESPACES).map(|i| format!("{prefix}-{i:03}")).collect();
    for ns in &namespaces {
        cp.create_namespace(ns, &[]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid, "VmRSS:");
    let writes_before = sum_metric(&metrics(port).await, "cloudpass_operator_api_writes_total");

    let started = Instant::now();
    let creates = namespaces.iter().flat_map(|ns| {
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

    let all: Api<AccessPolicy> = Api::all(client.clone());
    let mine = |p: &&AccessPolicy| p.namespace().is_some_and(|ns| ns.starts_with(prefix));
    let total = NAMESPACES * POLICIES_PER_NAMESPACE;
    let converged = loop {
        let ready = all
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(mine)
            .filter(|p| p.status.as_ref().is_some_and(|s| s.status.is_ready_for(p.meta().generation)))
            .count();
        if ready == total {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(300), "only {ready}/{total} Ready after 300 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Let trailing writes land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = metrics(port).await;
    let writes = sum_metric(&text, "cloudpass_operator_api_writes_total") - writes_before;
    let ideal = (NAMESPACES * (POLICIES_PER_NAMESPACE + 2) + NAMESPACES) as f64;
    let configs = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), OPERATOR_NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|c| c.name_any().starts_with(&format!("cloudpass-config-{prefix}-")))
        .count();
    assert_eq!(configs, NAMESPACES);
    let peak_rss = rss_kib(pid, "VmHWM:");
    drop(operator);
    Figures { stored, converged, writes, ideal, idle_rss, peak_rss }
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

    let figures = converge(&cp, &client, "200ms", "bench").await;
    // The same with a debounce ten times shorter: what a shorter debounce would cost in
    // writes (revocation does not need it: the broker watches deletions itself).
    let short = converge(&cp, &client, "20ms", "short").await;
    let Figures { stored, converged, writes, ideal, idle_rss, peak_rss } = figures;
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
    println!(
        "  API writes with a 20 ms debounce:           {:>8.0}    ({:.2}x the ideal; Ready in {:.2} s, {:.2}x its store time)",
        short.writes,
        short.writes / short.ideal,
        short.converged.as_secs_f64(),
        short.converged.as_secs_f64() / short.stored.as_secs_f64()
    );
    println!("  operator RSS idle (baseline):               {:>8.1} MB", idle_rss as f64 / 1024.0);
    println!(
        "  operator RSS peak:                          {:>8.1} MB  ({:.2}x idle)",
        peak_rss as f64 / 1024.0,
        peak_rss as f64 / idle_rss.max(1) as f64
    );
    println!(
        "  compiled config, 1,000 policies in one namespace: {} bytes (limit 1,048,576)",
        config_size_for_one_namespace()
    );
}
