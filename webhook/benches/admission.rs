//! `make bench`: the webhook's cost.
//!
//! (a) Pod-create latency through the real apiserver, p50/p90/p99 over 500 creates each,
//!     interleaved: into a namespace where the webhook injects, versus one it is not
//!     called for (baseline), versus the injected pod resubmitted there (the cost of the
//!     larger object without the call), versus the plain pod with the same added bytes
//!     as an annotation (the cost of the bytes alone); the larger pod's cost split by
//!     the apiserver's own stage histograms (admission plugins, etcd, the rest); and the
//!     stored pod's size, part by part.
//! (b) AdmissionReviews answered per second in process on one core, against parsing the
//!     same AdmissionReview alone (baseline).

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use cloudpass_e2e::{
    ControlPlane, WebhookRegistration, bench::percentile, certs::TestCa, process::ManagedProcess, repo_root,
};
use cloudpass_webhook::{
    admission::Admission,
    configs::Configs,
    inject::{AgentPorts, BrokerCa, InjectSettings},
    metrics::Metrics,
};
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::LabelSelector};
use kube::{
    Api,
    api::PostParams,
    core::{DynamicObject, admission::AdmissionReview},
};
use serde_json::json;

const CREATES: usize = 500;

fn review_body(policies: usize) -> (Admission, Vec<u8>) {
    let configs = std::sync::Arc::new(Configs::default());
    let compiled = (0..policies)
        .map(|i| {
            serde_json::from_value(json!({
                "name": format!("p{i:03}"),
                "client": {"podSelector": {"matchLabels": {"app": format!("svc-{i}")}}},
                "trustProviders": ["k8s"], "server": {"kind": "aws"}, "credentialProvider": "s3",
                "delivery": {"sdkEndpoint": {}},
            }))
            .unwrap()
        })
        .collect();
    configs.insert(cloudpass_api::config::NamespaceConfig::new(
        "team",
        [("k8s".into(), serde_json::from_value(json!({"kubernetesServiceAccount": {}})).unwrap())].into(),
        [(
            "s3".into(),
            serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap(),
        )]
        .into(),
        compiled,
    ));
    let admission = Admission {
        configs,
        settings: InjectSettings {
            image: "agent:1".into(),
            pull_policy: "IfNotPresent".into(),
            agent_path: "/usr/local/bin/cloudpass-agent".into(),
            broker_url: "https://cloudpass-broker.cloudpass-system.svc:8443".into(),
            broker_ca: BrokerCa::ConfigMap("cloudpass-broker-ca".into()),
            ports: AgentPorts::default(),
            token_seconds: 3600,
            version: "bench".into(),
            remote_cluster: false,
        },
        metrics: Metrics::new(),
    };
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "svc-7-", "namespace": "team", "labels": {"app": "svc-7", "version": "v3"}},
        "spec": {"serviceAccountName": "default", "containers": [
            {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
             "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
            {"name": "log", "image": "log:1"}]}});
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "7f0b2b1c-0000-4000-8000-000000000001",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "team", "operation": "CREATE", "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod, "dryRun": false}});
    (admission, serde_json::to_vec(&body).unwrap())
}

fn in_process() {
    let (admission, body) = review_body(50);
    let answer = serde_json::to_value(admission.review(&body).unwrap()).unwrap();
    assert!(answer["response"]["patch"].is_string(), "the bench pod is injected");
    let n = 20_000;
    let started = Instant::now();
    for _ in 0..n {
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(std::hint::black_box(&body)).unwrap();
        std::hint::black_box(review);
    }
    let parse_rate = n as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..n {
        let answer = admission.review(std::hint::black_box(&body)).unwrap();
        std::hint::black_box(serde_json::to_vec(&answer).unwrap());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    println!("in-process admission (one core, 50 policies in the namespace, injecting):");
    println!("  parse only (baseline):      {parse_rate:>10.0} reviews/s");
    println!("  full review + answer:       {rate:>10.0} reviews/s  ({:.2}x the baseline cost)", parse_rate / rate);
}

fn orders_pod() -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "orders-", "labels": {"app": "orders"}},
        "spec": {"serviceAccountName": "orders", "containers": [{"name": "api", "image": "orders:3"}]}}))
    .unwrap()
}

/// `CREATES` creates of each (namespace, pod), interleaved (one of each per round) so that
/// a slower phase of the machine weighs on every series alike; each series sorted.
async fn creates(series: &[(&Api<Pod>, &Pod)]) -> Vec<Vec<Duration>> {
    let mut times = vec![Vec::with_capacity(CREATES); series.len()];
    for _ in 0..CREATES {
        for ((pods, pod), times) in series.iter().zip(times.iter_mut()) {
            let started = Instant::now();
            pods.create(&PostParams::default(), pod).await.unwrap();
            times.push(started.elapsed());
        }
    }
    times.iter_mut().for_each(|t| t.sort());
    times
}

/// Bytes of an object's JSON, as `kubectl get -o json` shows it (managedFields included:
/// the apiserver stores them too).
fn json_size<T: serde::Serialize>(object: &T) -> usize {
    serde_json::to_vec(object).map_or(0, |b| b.len())
}

/// What the injection adds to the stored pod, part by part.
fn sizes(plain: &Pod, injected: &Pod) {
    let total = |p: &Pod| json_size(p);
    let managed = |p: &Pod| json_size(&p.metadata.managed_fields);
    let spec = injected.spec.as_ref().expect("spec");
    let agent = spec.init_containers.iter().flatten().find(|c| c.name == cloudpass_api::agent::AGENT_CONTAINER);
    let agent_env =
        |name: &str| agent.and_then(|a| a.env.iter().flatten().find(|e| e.name == name)).map_or(0, json_size);
    let plain_volumes = plain.spec.as_ref().map_or(0, |s| json_size(&s.volumes));
    println!("stored pod size (JSON as stored; its managedFields record nothing the webhook adds):");
    println!("  not injected (baseline):    {:>6} bytes", total(plain));
    println!("  injected:                   {:>6} bytes  (+{})", total(injected), total(injected) - total(plain));
    println!("    agent container:          {:>6} bytes", agent.map_or(0, json_size));
    println!("      broker CA env:          {:>6} bytes", agent_env(cloudpass_api::agent::BROKER_CA_ENV));
    // The CA comes from the namespace's copy; inline (`--remote-cluster`), its PEM would
    // be in the environment instead.
    let pem = TestCa::new("cloudpass-broker-ca").map_or(0, |ca| ca.cert_pem().len());
    println!("      (inline instead, --remote-cluster: +{pem} bytes of PEM, this bench's CA)");
    println!("      agent config env:       {:>6} bytes", agent_env(cloudpass_api::agent::AGENT_CONFIG_ENV));
    println!("    volumes added:            {:>6} bytes", json_size(&spec.volumes).saturating_sub(plain_volumes));
    println!("    managedFields added:      {:>6} bytes", managed(injected).saturating_sub(managed(plain)));
}

async fn through_apiserver() {
    let cp = ControlPlane::start().await.unwrap();
    cp.install_crds().await.unwrap();
    cp.create_namespace("cloudpass-system", &[]).await.unwrap();
    let client = cp.client().await.unwrap();
    let operator_client = client.clone();
    tokio::spawn(async move {
        let settings = cloudpass_operator::reconcile::Settings {
            operator_namespace: "cloudpass-system".into(),
            instance: None,
            concurrency: 4,
            debounce: cloudpass_operator::reconcile::DEFAULT_DEBOUNCE,
            broker_secret_access: None,
            broker_ca_configmap: None,
            verify: None,
        };
        cloudpass_operator::reconcile::run(
            operator_client,
            settings,
            cloudpass_operator::metrics::Metrics::new(),
            std::future::pending(),
            || {},
        )
        .await;
    });
    for (ns, labels) in
        [("bench-on", vec![(cloudpass_api::INJECTION_LABEL, cloudpass_api::INJECTION_ENABLED)]), ("bench-off", vec![])]
    {
        cp.create_namespace(ns, &labels).await.unwrap();
        cp.apply_path(Some(ns), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
        cp.wait_for_condition("accesspolicy", ns, "orders-to-s3", "Ready", "True", Duration::from_secs(30))
            .await
            .unwrap();
    }
    let port = cloudpass_e2e::process::free_port().unwrap();
    let kubeconfig = cp.kubeconfig.to_string_lossy().to_string();
    let _webhook = ManagedProcess::spawn(
        "cloudpass-webhook",
        Path::new(env!("CARGO_BIN_EXE_cloudpass-webhook")),
        &[
            "--namespace",
            "cloudpass-system",
            "--listen-addr",
            &format!("127.0.0.1:{port}"),
            "--extra-san",
            "127.0.0.1",
            "--log-level",
            "warn",
        ]
        .map(String::from),
        &cp.dir().join("webhook.log"),
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .unwrap();
    let placeholder = TestCa::new("placeholder").unwrap().cert_pem();
    cp.register_pod_webhook(&WebhookRegistration {
        name: "cloudpass-webhook",
        url: &format!("https://127.0.0.1:{port}/mutate"),
        ca_pem: &placeholder,
        namespace_selector: Some(LabelSelector {
            match_labels: Some(
                [(cloudpass_api::INJECTION_LABEL.to_owned(), cloudpass_api::INJECTION_ENABLED.to_owned())].into(),
            ),
            ..Default::default()
        }),
        failure_policy: "Fail",
    })
    .await
    .unwrap();
    let on: Api<Pod> = Api::namespaced(client.clone(), "bench-on");
    let off: Api<Pod> = Api::namespaced(client.clone(), "bench-off");
    // Wait until the apiserver calls the webhook with the right caBundle.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let probe: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "probe-", "labels": {"app": "orders"}},
            "spec": {"serviceAccountName": "orders", "containers": [{"name": "api", "image": "orders:3"}]}}))
        .unwrap();
        if let Ok(p) = on.create(&PostParams::default(), &probe).await
            && p.spec.unwrap().init_containers.is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "webhook never called");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The injected pod as stored, resubmitted where the webhook is not called: the cost
    // of the larger object alone, without the webhook call.
    let mut big = on.create(&PostParams::default(), &orders_pod()).await.unwrap();
    // The bytes the injection adds to the stored pod, as one annotation on the plain pod:
    // how much of the larger pod's cost is its size, and how much the apiserver's work
    // on one more container and more volumes.
    let stored_plain_size = json_size(&off.create(&PostParams::default(), &orders_pod()).await.unwrap());
    let added = json_size(&big).saturating_sub(stored_plain_size);
    let mut padded = orders_pod();
    let key = "bench.cloudpass.dev/padding";
    // `"key":"value",` around the value.
    let value = "x".repeat(added.saturating_sub(key.len() + 6));
    padded.metadata.annotations.get_or_insert_with(Default::default).insert(key.into(), value);
    big.metadata = kube::api::ObjectMeta {
        generate_name: Some("big-".into()),
        labels: big.metadata.labels.take(),
        annotations: big.metadata.annotations.take(),
        ..Default::default()
    };
    big.status = None;
    if let Some(spec) = big.spec.as_mut() {
        // The apiserver adds its own token volume again on create.
        spec.volumes.get_or_insert_with(Vec::new).retain(|v| !v.name.starts_with("kube-api-access"));
        for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
            c.volume_mounts.get_or_insert_with(Vec::new).retain(|m| !m.name.starts_with("kube-api-access"));
        }
    }
    // Warm every path, then measure.
    let plain = orders_pod();
    creates(&[(&off, &plain), (&off, &big), (&on, &plain), (&off, &padded)]).await;
    let measured = creates(&[(&off, &plain), (&off, &big), (&on, &plain), (&off, &padded)]).await;
    let [baseline, big_baseline, injected, padded_baseline] = &measured[..] else { unreachable!() };
    let p = |t: &[Duration], q: f64| percentile(t, q);
    println!("pod create through the real apiserver ({CREATES} creates each, sequential, interleaved):");
    let row = |name: &str, t: &[Duration]| {
        println!("  {name:<40} p50 {:>6.2} ms   p90 {:>6.2} ms   p99 {:>6.2} ms", p(t, 0.5), p(t, 0.9), p(t, 0.99))
    };
    row("webhook not called (baseline)", baseline);
    row("injected pod resubmitted, no webhook", big_baseline);
    row("webhook injecting", injected);
    row(&format!("plain pod + {added} bytes of annotation"), padded_baseline);
    let diff = |name: &str, a: &[Duration], b: &[Duration]| {
        println!(
            "  {name:<40} p50 {:>6.2} ms   p90 {:>6.2} ms   p99 {:>6.2} ms",
            p(a, 0.5) - p(b, 0.5),
            p(a, 0.9) - p(b, 0.9),
            p(a, 0.99) - p(b, 0.99)
        )
    };
    diff("added in total, webhook vs none", injected, baseline);
    diff("  the larger pod (no webhook call)", big_baseline, baseline);
    diff("  the webhook call", injected, big_baseline);
    diff("the same bytes alone (annotation)", padded_baseline, baseline);
    // The injected pod's parts alone: the agent container (without its mounts), the
    // volumes (without the container), to tell which costs what.
    let spec = big.spec.clone().unwrap_or_default();
    let mut container_only = plain.clone();
    if let Some(s) = container_only.spec.as_mut() {
        let mut agent = spec.init_containers.clone().unwrap_or_default();
        agent.iter_mut().for_each(|c| c.volume_mounts = None);
        s.init_containers = Some(agent);
    }
    let mut volumes_only = plain.clone();
    if let Some(s) = volumes_only.spec.as_mut() {
        s.volumes = spec.volumes.clone();
    }
    larger_pod_by_stage(
        &client,
        &off,
        &[
            ("plain pod (baseline)", &plain),
            ("+ the agent container, no mounts", &container_only),
            ("+ the injected volumes, no container", &volumes_only),
            ("the injected pod", &big),
        ],
    )
    .await;
    let stored_plain = off.create(&PostParams::default(), &plain).await.unwrap();
    let stored_injected = on.create(&PostParams::default(), &plain).await.unwrap();
    sizes(&stored_plain, &stored_injected);
    let dump = std::env::temp_dir().join("cloudpass-bench-injected-pod.json");
    if std::fs::write(&dump, serde_json::to_vec_pretty(&stored_injected).unwrap_or_default()).is_ok() {
        println!("  the injected pod as stored: {}", dump.display());
    }
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let text = http.get(format!("https://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| -> f64 {
        text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let (sum, count) =
        (value("cloudpass_webhook_latency_seconds_sum"), value("cloudpass_webhook_latency_seconds_count"));
    println!(
        "  webhook's own time per review: {:.3} ms mean over {count} reviews ({} injected, {} skipped)",
        sum / count.max(1.0) * 1000.0,
        value("cloudpass_webhook_requests_total{result=\"injected\"}"),
        value("cloudpass_webhook_requests_total{result=\"skipped\"}")
    );
    println!("  TLS connections accepted:      {}", value("cloudpass_webhook_connections_total"));
}

/// The labels of one Prometheus text-format sample, `name{k="v",...} value`.
fn sample(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let mut map = BTreeMap::new();
    for pair in labels.split("\",") {
        let (k, v) = pair.split_once("=\"")?;
        map.insert(k, v.trim_end_matches('"'));
    }
    Some((name, map, value.trim().parse().ok()?))
}

/// The apiserver's own timing of pod creates, stage by stage: (sum seconds, count) of
/// each histogram that times one: the whole request, each admission plugin and webhook,
/// and the etcd write.
async fn apiserver_stages(client: &kube::Client) -> BTreeMap<String, (f64, f64)> {
    let request = axum::http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    let mut stages: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = sample(line) else { continue };
        let (base, is_sum) = match (name.strip_suffix("_sum"), name.strip_suffix("_count")) {
            (Some(base), _) => (base, true),
            (_, Some(base)) => (base, false),
            _ => continue,
        };
        let label = |k: &str| labels.get(k).copied().unwrap_or_default();
        // Admission metrics carry no resource: while the stages are measured, the pod
        // creates are the only creates (`larger_pod_by_stage`).
        let create = label("operation") == "CREATE" && label("rejected") == "false";
        let stage = match base {
            "apiserver_request_duration_seconds"
                if label("resource") == "pods" && label("verb") == "POST" && label("subresource").is_empty() =>
            {
                "the whole create".to_owned()
            }
            "apiserver_admission_controller_admission_duration_seconds" if create => {
                format!("admission plugin {} ({})", label("name"), label("type"))
            }
            "apiserver_admission_webhook_admission_duration_seconds" if create => {
                format!("admission webhook {}", label("name"))
            }
            "etcd_request_duration_seconds"
                if label("operation") == "create"
                    && (label("resource") == "pods" || label("type").contains("pods")) =>
            {
                "etcd write".to_owned()
            }
            _ => continue,
        };
        let entry = stages.entry(stage).or_default();
        if is_sum {
            entry.0 += value;
        } else {
            entry.1 += value;
        }
    }
    stages
}

/// Seconds spent in each stage between two readings (stages that timed something).
fn stage_seconds(before: &BTreeMap<String, (f64, f64)>, after: &BTreeMap<String, (f64, f64)>) -> Vec<(String, f64)> {
    after
        .iter()
        .filter_map(|(stage, (sum, count))| {
            let (sum0, count0) = before.get(stage).copied().unwrap_or_default();
            (*count > count0).then(|| (stage.clone(), sum - sum0))
        })
        .collect()
}

/// Where the apiserver spends the larger pod's extra time: blocks of creates of each of
/// `series` (all where no webhook is called; the first is the baseline), alternating so
/// that a slower phase of the machine weighs on each alike; each stage's time per create
/// from the apiserver's own histograms, read around every block.
async fn larger_pod_by_stage(client: &kube::Client, pods: &Api<Pod>, series: &[(&str, &Pod)]) {
    const ROUNDS: usize = 10;
    const BLOCK: usize = 30;
    let mut totals: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); series.len()];
    for _ in 0..ROUNDS {
        for ((_, pod), total) in series.iter().zip(totals.iter_mut()) {
            let before = apiserver_stages(client).await;
            for _ in 0..BLOCK {
                pods.create(&PostParams::default(), pod).await.unwrap();
            }
            for (stage, seconds) in stage_seconds(&before, &apiserver_stages(client).await) {
                *total.entry(stage).or_default() += seconds;
            }
        }
    }
    // Milliseconds per create: (whole, every admission plugin, etcd write, each plugin).
    let creates = (ROUNDS * BLOCK) as f64;
    let means: Vec<BTreeMap<String, f64>> =
        totals.iter().map(|t| t.iter().map(|(stage, s)| (stage.clone(), s / creates * 1000.0)).collect()).collect();
    let part = |m: &BTreeMap<String, f64>, prefix: &str| -> f64 {
        m.iter().filter(|(stage, _)| stage.starts_with(prefix)).map(|(_, ms)| ms).sum()
    };
    let split = |m: &BTreeMap<String, f64>| {
        let (whole, admission, etcd) = (part(m, "the whole"), part(m, "admission"), part(m, "etcd"));
        [whole, admission, etcd, whole - admission - etcd]
    };
    let base = split(&means[0]);
    println!(
        "the larger pod's cost by apiserver stage ({} creates each, ms per create over the baseline, from its histograms):",
        ROUNDS * BLOCK
    );
    println!("  {:<38} {:>8} {:>10} {:>8} {:>22}", "pod", "whole", "admission", "etcd", "the rest (decode, default,");
    println!("  {:<38} {:>8} {:>10} {:>8} {:>22}", "", "", "plugins", "write", "validate, managedFields)");
    println!(
        "  {:<38} {:>8.3} {:>10.3} {:>8.3} {:>22.3}   (absolute)",
        series[0].0, base[0], base[1], base[2], base[3]
    );
    for ((name, _), m) in series.iter().zip(&means).skip(1) {
        let d = split(m);
        println!(
            "  {name:<38} {:>+8.3} {:>+10.3} {:>+8.3} {:>+22.3}",
            d[0] - base[0],
            d[1] - base[1],
            d[2] - base[2],
            d[3] - base[3]
        );
    }
    // The plugins whose time grew with the injected pod.
    let (first, last) = (&means[0], &means[series.len() - 1]);
    for (stage, ms) in last.iter().filter(|(stage, _)| stage.starts_with("admission")) {
        let grew = ms - first.get(stage).copied().unwrap_or_default();
        if grew.abs() >= 0.005 {
            println!("    {stage}: {grew:+.3} ms");
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches`: only check that the in-process path works.
        let (admission, body) = review_body(5);
        assert!(admission.review(&body).is_ok());
        return;
    }
    in_process();
    tokio::runtime::Runtime::new().unwrap().block_on(through_apiserver());
}
