//! On the real node, against a baseline measured in the same run:
//!
//! - from `kubectl apply` of a Deployment to its app's first successful S3 call (the
//!   unchanged boto3 program of the AKS -> S3 example): with cloudpass (the webhook injects
//!   the agent, the kubelet starts it as a native sidecar, its postStart hook waits for the
//!   first federated credential) versus the same app in a namespace without cloudpass,
//!   given static keys of an IAM user. Rounds alternate the two, one pod at a time;
//! - the agent container's memory as the kubelet reports it (summary API: working set and
//!   RSS), after it served the app for a while;
//! - the images' sizes.
//!
//! `cargo bench -p cloudpass-e2e --bench node` (part of `make bench`); needs root, as the
//! node does. `CLOUDPASS_BENCH_ROUNDS` (default 10) sets the rounds.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cloudpass_e2e::{
    bench::percentile,
    cluster::{Cluster, NODE_NAME},
    scenario::{
        Deployed, Example,
        aws::{AksToS3, AwsCloud},
        installed::Installed,
    },
};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<()> {
    if let Some(reason) = Cluster::unsupported_reason() {
        println!("node benchmark skipped: this machine cannot run a node: {reason}");
        return Ok(());
    }
    let rounds: usize = std::env::var("CLOUDPASS_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let cluster = Cluster::start().await?;
    let installed = Installed::install(&cluster).await?;
    let aws = AwsCloud::start().await?;

    // With cloudpass: the example as it is, in an opted-in namespace.
    let with = "bench-cloudpass";
    installed.app_namespace(with).await?;
    let direction = AksToS3::prepare(&installed, &aws, with).await?;
    direction.apply(&installed).await?;
    let image = installed.apps_image()?.to_owned();
    let app = direction.app.clone();
    let mut with_example = direction.example.clone();
    with_example.run_app_on_node(&app, &image, Some(Duration::from_secs(1)))?;

    // Without: the same Deployment and program in a namespace the webhook does not touch,
    // with an IAM user's keys in its environment.
    let without = "bench-static";
    cluster.cp.create_namespace(without, &[]).await?;
    cluster.cp.create_service_account(without, "orders").await?;
    copy_config_map(&installed, with, without, cloudpass_e2e::scenario::example::CLOUD_CA_CONFIGMAP)?;
    let s3 = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
    let keys = aws.static_keys("bench-static-app", &s3).await?;
    let mut static_app = app.clone();
    static_app.env.extend(keys.env().into_iter().map(|(k, v)| (k.to_owned(), v)));
    let mut without_example = Example::load("aks-to-s3")?;
    without_example.run_app_on_node(&static_app, &image, Some(Duration::from_secs(1)))?;

    let mut cloudpass = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..rounds {
        // Alternate which goes first, so that neither always runs on a warmer node.
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for use_cloudpass in order {
            let (ns, example) = if use_cloudpass { (with, &with_example) } else { (without, &without_example) };
            let took = first_success(&installed, ns, example, &app.workload, &app.container).await?;
            if use_cloudpass { cloudpass.push(took) } else { baseline.push(took) }
        }
    }
    cloudpass.sort();
    baseline.sort();
    println!("\nDeployment applied -> the app's first successful S3 call ({rounds} rounds each, alternating):");
    let row = |name: &str, d: &[Duration]| {
        println!(
            "  {name:<28} p50 {:>6.0} ms   p90 {:>6.0} ms   min {:>6.0} ms   max {:>6.0} ms",
            percentile(d, 0.5),
            percentile(d, 0.9),
            percentile(d, 0.0),
            percentile(d, 1.0)
        )
    };
    row("static keys (baseline)", &baseline);
    row("cloudpass (sidecar + STS)", &cloudpass);
    println!(
        "  added by cloudpass at p50: {:+.0} ms (goal: <= +300 ms)",
        percentile(&cloudpass, 0.5) - percentile(&baseline, 0.5)
    );

    // The agent's memory after serving the app for a while.
    installed.cp().apply_yaml(Some(with), &with_example.workload_yaml(&app.workload)?)?;
    installed.wait_rollout(with, &app.workload, Duration::from_secs(120))?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let summary: Value = serde_json::from_str(&cluster.cp.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/api/v1/nodes/{NODE_NAME}/proxy/stats/summary"),
    ])?)?;
    println!("\nThe agent container's memory (kubelet summary API, after 30 s of one SDK call a second):");
    for pod in summary["pods"].as_array().into_iter().flatten().filter(|p| p["podRef"]["namespace"] == with) {
        for c in pod["containers"].as_array().into_iter().flatten().filter(|c| c["name"] == "cloudpass-agent") {
            let mib = |field: &str| c["memory"][field].as_f64().unwrap_or_default() / 1048576.0;
            let name = pod["podRef"]["name"].as_str().unwrap_or("?");
            println!(
                "  pod {name}: working set {:.1} MiB (goal <= 16 MiB), RSS {:.1} MiB (the cgroup's anonymous memory); \
                 process VmRSS {}",
                mib("workingSetBytes"),
                mib("rssBytes"),
                agent_vm_rss(&installed, with, name).unwrap_or_else(|e| format!("unknown ({e:#})"))
            );
        }
    }

    println!("\nImages (OCI archives as imported; compressed is what a registry stores):");
    for image in &cluster.images {
        println!(
            "  {:<50} {:>6.2} MB compressed {:>7.2} MB uncompressed",
            image.name,
            image.compressed_bytes as f64 / 1e6,
            image.uncompressed_bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// Applies the workload (one replica), waits for its app's first successful call, and
/// deletes it again (waiting until its pods are gone); the time from the apply to the
/// container runtime's timestamp of that call's result line.
async fn first_success(
    installed: &Installed<'_>,
    namespace: &str,
    example: &Example,
    workload: &str,
    container: &str,
) -> Result<Duration> {
    let cp = installed.cp();
    let mut manifest: Value = serde_yaml::from_str(&example.workload_yaml(workload)?)?;
    manifest["spec"]["replicas"] = json!(1);
    let applied_at = jiff::Timestamp::now();
    let started = Instant::now();
    cp.apply_yaml(Some(namespace), &manifest.to_string())?;
    let selector = format!("app={workload}");
    let took = loop {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("no successful call in {namespace} within 120 s:\n{}", installed.describe(namespace));
        }
        let pods = installed.pods(namespace, &selector)?;
        let first_ok = pods.iter().find_map(|pod| {
            let name = pod["metadata"]["name"].as_str()?;
            let lines = installed.json_logs(namespace, name, container).ok()?;
            lines.into_iter().find(|(_, v)| v["ok"] == true).map(|(at, _)| at)
        });
        if let Some(at) = first_ok {
            break Duration::try_from(at.duration_since(applied_at)).context("a result before the apply")?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cp.kubectl_ok(&["delete", "deployment", workload, "-n", namespace, "--wait=true", "--timeout=120s"])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !installed.pods(namespace, &selector)?.is_empty() {
        if Instant::now() > deadline {
            bail!("the pods of {namespace}/{workload} did not go away");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(took)
}

/// The agent process's resident set (`VmRSS`, binary pages included), found through its
/// container's cgroup.
fn agent_vm_rss(installed: &Installed<'_>, namespace: &str, pod: &str) -> Result<String> {
    let pod: Value =
        serde_json::from_str(&installed.cp().kubectl_ok(&["get", "pod", pod, "-n", namespace, "-o", "json"])?)?;
    let id = pod["status"]["initContainerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "cloudpass-agent")
        .and_then(|c| c["containerID"].as_str())
        .and_then(|id| id.strip_prefix("containerd://"))
        .context("no agent container ID")?
        .to_owned();
    let mut dirs = vec![std::path::PathBuf::from("/sys/fs/cgroup/memory/cloudpass-node")];
    while let Some(dir) = dirs.pop() {
        if dir.file_name().is_some_and(|n| n == id.as_str()) {
            let pid = std::fs::read_to_string(dir.join("cgroup.procs"))?;
            let pid = pid.lines().next().context("an empty cgroup")?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let rss = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
            return Ok(rss.trim_start_matches("VmRSS:").trim().to_owned());
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    bail!("no cgroup of container {id}")
}

fn copy_config_map(installed: &Installed<'_>, from: &str, to: &str, name: &str) -> Result<()> {
    let mut cm: Value =
        serde_json::from_str(&installed.cp().kubectl_ok(&["get", "configmap", name, "-n", from, "-o", "json"])?)?;
    cm["metadata"] = json!({"name": name, "namespace": to});
    installed.cp().apply_yaml(Some(to), &cm.to_string()).map(drop)
}
