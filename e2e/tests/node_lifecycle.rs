//! cloudpass's own lifecycle on a real node, in a cluster of its own (these steps disturb
//! every other pod): a rolling restart of the controller and the broker under traffic, then `helm
//! uninstall`. One test, because the steps follow each other.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cloudpass_e2e::{
    TokenOptions,
    cluster::Cluster,
    scenario::{
        Deployed,
        http_api::HttpApiScenario,
        installed::{Installed, NAMESPACE},
    },
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

/// The operator image's pods: controllers and brokers.
const OPERATOR_PODS: &str = "app.kubernetes.io/component in (operator,broker)";

/// When a request was sent, and its HTTP status or why it got none.
type Outcome = (Instant, Result<u16, String>);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// What the apiserver showed of each pod of `namespace` matching `selector` while this
/// watch ran, by name: the first version marked for deletion (its `deletionTimestamp`
/// is the request plus the grace period; the kubelet's final delete moves it to now) and
/// the last version (the containers' final states).
type Seen = BTreeMap<String, (Option<Pod>, Pod)>;

fn watch_pods(client: kube::Client, namespace: &str, selector: &str) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::new()));
    let api = kube::Api::<Pod>::namespaced(client, namespace);
    let stream = watcher(api, watcher::Config::default().labels(selector)).default_backoff().applied_objects();
    let record = seen.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(Ok(pod)) = stream.next().await {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let mut seen = record.lock().unwrap();
            let entry = seen.entry(name).or_insert_with(|| (None, pod.clone()));
            if entry.0.is_none() && pod.metadata.deletion_timestamp.is_some() {
                entry.0 = Some(pod.clone());
            }
            entry.1 = pod;
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_rolls_under_traffic_and_helm_uninstall_leaves_nothing_running() {
    let installed = Installed::install(Cluster::shared()).await.unwrap();
    let cp = installed.cp();

    // Traffic: the API-key example's app calling every second through its agent.
    let ns = "lifecycle";
    installed.app_namespace(ns).await.unwrap();
    let mut direction = HttpApiScenario::api_key(&installed, ns).await.unwrap();
    direction.apply(&installed).await.unwrap();
    let app = direction.app.clone();
    installed.deploy_app(ns, &mut direction.example, &app, Some(Duration::from_secs(1))).unwrap();
    installed.wait_rollout(ns, &app.workload, Duration::from_secs(120)).unwrap();
    let selector = format!("app={}", app.workload);
    let results = installed.wait_results(ns, &selector, &app.container, (1, 1), Duration::from_secs(60)).await.unwrap();
    let pod_name = results[0].0.clone();
    let pod = json(&cp.kubectl_ok(&["get", "pod", &pod_name, "-n", ns, "-o", "json"]).unwrap());

    // And what the agent's refreshes do, ten times a second: ask the broker through its
    // Service with the pod's own kind of token (audience cloudpass, bound to the pod).
    let options = TokenOptions {
        bound_pod: Some((pod_name.clone(), pod["metadata"]["uid"].as_str().unwrap().to_owned())),
        ..Default::default()
    };
    let token = cp.token(ns, "default", &options).await.unwrap();
    let http = cloudpass_e2e::net::client_builder()
        .tls_certs_only([reqwest::Certificate::from_pem(installed.issuer_ca_pem().as_bytes()).unwrap()])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let asker = {
        let (outcomes, url, policy) =
            (outcomes.clone(), format!("{}/v1/credentials", installed.issuer_url()), direction.policy.clone());
        tokio::spawn(async move {
            // Bounded: at most 10 minutes of asking.
            for _ in 0..6000 {
                let sent = Instant::now();
                let result = http.post(&url).bearer_auth(&token).json(&json!({"policy": policy})).send().await;
                let outcome = result.map(|r| r.status().as_u16()).map_err(|e| format!("{e:#}"));
                outcomes.lock().unwrap().push((sent, outcome));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_rx.wait_for(|stop| *stop) => return,
                }
            }
        })
    };

    // The rolling restart.
    let client = cp.client().await.unwrap();
    let seen = watch_pods(client, NAMESPACE, OPERATOR_PODS);
    // The holder; none for a moment after a leader released the Lease on SIGTERM and
    // before a standby took it.
    let holder = |cp: &cloudpass_e2e::ControlPlane| {
        json(&cp.kubectl_ok(&["get", "lease", "cloudpass-operator", "-n", NAMESPACE, "-o", "json"]).unwrap())["spec"]
            ["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    };
    // Waits (bounded by a lease duration and then some) for a holder other than `old`.
    let lease = async |cp: &cloudpass_e2e::ControlPlane, old: &[String]| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match holder(cp) {
                Some(h) if !old.contains(&h) => return h,
                _ if Instant::now() > deadline => panic!("no new Lease holder within 60 s: {:?}", holder(cp)),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    };
    let leader_before = lease(cp, &[]).await;
    let old: Vec<String> = installed
        .pods(NAMESPACE, OPERATOR_PODS)
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = Instant::now();
    // Both at once: the brokers answering the agents' requests, the controllers moving the Lease.
    cp.kubectl_ok(&[
        "rollout",
        "restart",
        "deployment/cloudpass-broker",
        "deployment/cloudpass-operator",
        "-n",
        NAMESPACE,
    ])
    .unwrap();
    installed.wait_rollout(NAMESPACE, "cloudpass-broker", Duration::from_secs(240)).unwrap();
    installed.wait_rollout(NAMESPACE, "cloudpass-operator", Duration::from_secs(240)).unwrap();
    // Every old pod gone, and how each one ended.
    let deadline = Instant::now() + Duration::from_secs(120);
    while installed
        .pods(NAMESPACE, OPERATOR_PODS)
        .unwrap()
        .iter()
        .any(|p| old.contains(&p["metadata"]["name"].as_str().unwrap().to_owned()))
    {
        assert!(Instant::now() < deadline, "old operator pods still there");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rolled = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    asker.await.unwrap();

    for name in &old {
        let (deleting, pod) = seen.lock().unwrap().get(name).cloned().unwrap_or_else(|| panic!("never saw {name}"));
        let deleting = deleting.unwrap_or_else(|| panic!("{name} never marked for deletion"));
        let grace = deleting.metadata.deletion_grace_period_seconds.unwrap_or(30);
        let deleted_at = deleting.metadata.deletion_timestamp.clone().unwrap().0;
        let status =
            pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first()).cloned().unwrap();
        let terminated = status.state.and_then(|s| s.terminated).unwrap_or_else(|| panic!("{name}: no final state"));
        // deletionTimestamp is the deadline: the deletion request plus the grace period.
        let requested = deleted_at - jiff::SignedDuration::from_secs(grace);
        let finished = terminated.finished_at.clone().unwrap().0;
        let took = finished.duration_since(requested);
        eprintln!(
            "{name}: exit code {} {:.1}s after deletion (grace {grace}s)",
            terminated.exit_code,
            took.as_secs_f64()
        );
        assert_eq!(terminated.exit_code, 0, "{name} stopped on SIGTERM by itself, not killed: {terminated:?}");
        assert!(took.as_secs() < grace, "{name} exited within its grace period: {took:?}");
    }

    let leader_after = lease(cp, &old).await;
    assert_ne!(leader_after, leader_before, "the Lease moved to a new pod");
    assert!(!old.contains(&leader_after), "held by a new pod: {leader_after}");

    let outcomes = outcomes.lock().unwrap().clone();
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.as_ref().map_or(true, |s| *s != 200)).collect();
    // The agent retries a failed fetch after 1 s, then 2 s, ...: a request that failed is
    // fine if the next one, a retry's worth later, succeeded.
    let mut longest_outage = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for (at, result) in &outcomes {
        match (result, since) {
            (Ok(200), Some(start)) => {
                longest_outage = longest_outage.max(at.duration_since(start));
                since = None;
            }
            (Ok(200), None) => {}
            (_, None) => since = Some(*at),
            (_, Some(_)) => {}
        }
    }
    eprintln!(
        "rollout: {:.1}s; broker requests: {} ({} failed, longest outage {:.1}s): {:?}",
        rolled.as_secs_f64(),
        outcomes.len(),
        failed.len(),
        longest_outage.as_secs_f64(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(since.is_none(), "the broker answers again after the rollout");
    assert!(
        longest_outage < Duration::from_secs(1),
        "an agent's first retry (after 1 s) would have succeeded: {failed:?}"
    );
    let app_lines = installed.json_logs(ns, &pod_name, &app.container).unwrap();
    assert!(app_lines.iter().all(|(_, v)| v["ok"] == true), "every app call succeeded: {app_lines:?}");

    // helm uninstall: nothing of cloudpass runs any more, and the opted-in namespace
    // still admits and runs pods (no webhook configuration left to refuse them).
    let out = cp.helm().args(["uninstall", "cloudpass", "-n", NAMESPACE, "--wait", "--timeout=2m"]).output().unwrap();
    assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !installed.pods(NAMESPACE, "app.kubernetes.io/name=cloudpass").unwrap().is_empty() {
        assert!(Instant::now() < deadline, "cloudpass pods still running after uninstall");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let webhooks = cp.kubectl_ok(&["get", "mutatingwebhookconfigurations", "-o", "name"]).unwrap();
    assert!(!webhooks.contains("cloudpass"), "webhook configuration removed: {webhooks}");
    let left = cp.kubectl_ok(&["get", "all,configmaps,secrets,leases", "-n", NAMESPACE, "-o", "name"]).unwrap();
    eprintln!("left in {NAMESPACE} after helm uninstall:\n{left}");
    assert!(!left.contains("pod/") && !left.contains("deployment.apps/") && !left.contains("service/"), "{left}");

    let unselected = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "unselected"},
        "spec": {
            "selector": {"matchLabels": {"app": "unselected"}},
            "template": {
                "metadata": {"labels": {"app": "unselected"}},
                "spec": {"containers": [{"name": "pause", "image": cloudpass_e2e::images::PAUSE_IMAGE}]},
            },
        },
    });
    cp.apply_yaml(Some(ns), &unselected.to_string()).unwrap();
    installed.wait_rollout(ns, "unselected", Duration::from_secs(60)).unwrap();
}
