//! `make bench`: what a user of cloudpass waits for, measured on the whole stack (the real
//! operator, webhook and agent on the local apiserver, AWS STS through the gate into moto).
//!
//! - Revocation latency: from the AccessPolicy delete request to the broker denying the
//!   next credential request of a pod that was being served (asked exactly as its agent
//!   asks). Baseline in the same run: from the same delete request to a watch on the
//!   AccessPolicy delivering the `Deleted` event, the earliest any controller can know.
//!   The broker sees the deletion with its own watch. An edit that stops selecting the
//!   pod is measured too: it takes the controller's path (debounce, compiled config).
//! - Pod admitted to first credential: from the apiserver's answer to the pod creation
//!   (the webhook has injected it) to the agent reporting ready (`GET /ready` passes: it
//!   holds an STS credential for the pod), including the TokenRequest for its projected
//!   token and the agent's start. Baseline in the same run: from the same point to the
//!   agent's health endpoint accepting connections (process started, listening), i.e.
//!   everything but the credential fetch.

use std::time::{Duration, Instant};

use cloudpass_e2e::{
    ControlPlane,
    bench::percentile,
    scenario::{
        Binaries, Stack,
        aws::{AksToS3, AwsCloud},
        exclusive,
    },
};
use futures::StreamExt;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, WatchEvent, WatchParams},
};

const REVOCATIONS: usize = 10;
const PODS: usize = 10;
const NS: &str = "bench-scenario";
const POLICY: &str = "orders-to-s3";

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "  {name:<44} p50 {:>7.1} ms   p90 {:>7.1} ms   max {:>7.1} ms",
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 1.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cp = ControlPlane::start().await.expect("control plane");
    let aws = AwsCloud::start().await.expect("moto");
    let stack = Stack::start(&cp, Binaries::locate().expect("binaries (make bench builds them)")).await.expect("stack");
    let _one = exclusive().await;
    stack.opted_in_namespace(NS).await.unwrap();
    let setup = AksToS3::prepare(&stack, &aws, NS).await.unwrap();
    setup.apply(&stack).await.unwrap();
    let health = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();

    // Pod admitted to first credential, and its baseline.
    let (mut first_credential, mut listening) = (Vec::new(), Vec::new());
    for i in 0..=PODS {
        let pod = stack.create_pod(NS, &setup.pod, i == 0).await.unwrap();
        let admitted = Instant::now();
        let health_port = pod.agent_config().unwrap().unwrap().health_port;
        let ready_url = format!("http://127.0.0.1:{health_port}{}", cloudpass_api::agent::READY_PATH);
        let mut running = stack.node.run(&cp, pod).await.unwrap();
        let mut listen_at = None;
        let deadline = admitted + Duration::from_secs(30);
        loop {
            match health.get(&ready_url).send().await {
                Ok(answer) => {
                    listen_at.get_or_insert_with(|| admitted.elapsed());
                    if answer.status().is_success() {
                        break;
                    }
                }
                Err(_) => assert!(Instant::now() < deadline, "agent never listened:\n{}", running.agent_log_text()),
            }
            assert!(Instant::now() < deadline, "agent never ready:\n{}", running.agent_log_text());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The first pod warms up caches (TokenReview client, issuer keys): not counted.
        if i > 0 {
            first_credential.push(admitted.elapsed());
            listening.push(listen_at.unwrap());
        }
        running.stop();
    }

    // Revocation latency, and its baseline.
    let policies: Api<kube::api::DynamicObject> = Api::namespaced_with(
        cp.client().await.unwrap(),
        NS,
        &kube::api::ApiResource {
            group: "cloudpass.dev".into(),
            version: "v1alpha1".into(),
            api_version: "cloudpass.dev/v1alpha1".into(),
            kind: "AccessPolicy".into(),
            plural: "accesspolicies".into(),
        },
    );
    let pod = stack.create_pod(NS, &setup.pod, true).await.unwrap();
    let mut running = stack.node.run(&cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    let (mut revoked, mut observed) = (Vec::new(), Vec::new());
    for _ in 0..REVOCATIONS {
        setup.apply(&stack).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while stack.ask_as_agent(&running, POLICY).await.unwrap().0 != 200 {
            assert!(Instant::now() < deadline, "the broker never served the policy again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let current = policies.get(POLICY).await.unwrap();
        let version = current.metadata.resource_version.clone().unwrap();
        let params = WatchParams::default().fields(&format!("metadata.name={POLICY}"));
        let mut events = policies.watch(&params, &version).await.unwrap().boxed();
        let watcher = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if matches!(event, Ok(WatchEvent::Deleted(_))) {
                    return Instant::now();
                }
            }
            panic!("the watch ended without a Deleted event");
        });
        let deleted = Instant::now();
        policies.delete(POLICY, &DeleteParams::default()).await.unwrap();
        stack.wait_denied(&running, POLICY, Duration::from_secs(30)).await.unwrap();
        revoked.push(deleted.elapsed());
        observed.push(watcher.await.unwrap() - deleted);
    }
    // An edit that stops selecting the pod goes through the controller: its debounce, the
    // compiled config's write and the broker's config watch.
    let mut narrowed = Vec::new();
    for _ in 0..REVOCATIONS {
        setup.apply(&stack).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while stack.ask_as_agent(&running, POLICY).await.unwrap().0 != 200 {
            assert!(Instant::now() < deadline, "the broker never served the policy again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let nobody = serde_json::json!({"spec": {"client": {"podSelector": {"matchLabels": {"app": "nobody"}}}}});
        let patched = Instant::now();
        policies.patch(POLICY, &PatchParams::default(), &Patch::Merge(&nobody)).await.unwrap();
        stack.wait_denied(&running, POLICY, Duration::from_secs(30)).await.unwrap();
        narrowed.push(patched.elapsed());
        // The next apply creates it afresh (the patch's fields have another manager).
        policies.delete(POLICY, &DeleteParams::default()).await.unwrap();
    }
    running.stop();

    println!("pod admitted -> first credential ({PODS} pods, one at a time; AWS STS via the gate into moto):");
    summary("agent listening (baseline: no credential yet)", listening);
    summary("agent ready: holds the pod's STS credential", first_credential);
    println!("revocation ({REVOCATIONS} rounds): AccessPolicy delete request ->");
    summary("watch delivers Deleted (baseline)", observed);
    summary("broker denies the agent's next request", revoked);
    println!("revocation by edit ({REVOCATIONS} rounds): AccessPolicy patched to select other pods ->");
    summary("broker denies the agent's next request", narrowed);
}
