//! `make demo`: the whole product on this machine, narrated.
//!
//! Starts a local Kubernetes control plane, the cloud emulators and fakes, the real
//! cloudpass operator (with its broker) and webhook; applies two examples as a user would
//! (AKS -> S3 and EKS -> Azure Blob), creates a pod for each, runs it with the real agent
//! and an unchanged SDK program, and says at each step what happened. Then it keeps everything running for `kubectl` until Ctrl-C,
//! and stops it all.
#![forbid(unsafe_code)]

use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::Result;
use cloudpass_e2e::{
    ControlPlane,
    scenario::{
        AdmittedPod, Binaries, RunningPod, Stack,
        aws::{AksToS3, AwsCloud, S3_APP},
        azure::{Azurite, BLOB_APP, EksToAzureBlob},
    },
    tools_bin,
};
use serde_json::Value;

/// Prints numbered steps with their durations.
struct Narrator {
    step: u32,
    started: Instant,
    step_started: Instant,
}

impl Narrator {
    fn new() -> Self {
        Self { step: 0, started: Instant::now(), step_started: Instant::now() }
    }

    fn step(&mut self, title: &str) {
        self.step += 1;
        self.step_started = Instant::now();
        println!("\n{}. {title}", self.step);
        let _ = std::io::stdout().flush();
    }

    fn say(&self, text: &str) {
        println!("   {text}");
        let _ = std::io::stdout().flush();
    }

    fn done(&self, text: &str) {
        println!("   -> {text} ({:.1}s)", self.step_started.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
    }
}

#[tokio::main]
async fn main() {
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    if let Err(e) = run(stop).await {
        eprintln!("\ndemo failed: {e:#}");
        std::process::exit(1);
    }
}

async fn run(stop: impl std::future::Future<Output = ()>) -> Result<()> {
    let mut n = Narrator::new();
    println!("cloudpass demo: a pod on one \"cloud\" reads another cloud's storage with short-lived,");
    println!("federated credentials and no secret in the pod. Everything runs locally on loopback.");

    let binaries = Binaries::locate()?;
    let tools = tools_bin()?;

    n.step("Starting a local Kubernetes control plane (etcd + kube-apiserver, no kubelet)");
    let cp = ControlPlane::start().await?;
    n.done(&format!("apiserver at {}", cp.server));

    n.step("Starting the AWS side: moto (IAM, STS, S3) with request signing enforced");
    let aws = AwsCloud::start().await?;
    n.say("moto now refuses every request that is not SigV4-signed with keys it issued itself.");
    n.done(&format!("moto at {}", aws.moto.url()));

    n.step("Starting cloudpass: the operator (controllers, broker, OIDC issuer) and the webhook");
    let stack = Stack::start(&cp, binaries).await?;
    n.say(&format!("broker and issuer: {}", stack.broker.url));
    n.say(&format!(
        "webhook:           {} (registered as MutatingWebhookConfiguration cloudpass-webhook)",
        stack.webhook.url
    ));
    n.done("both ready");

    let ns = "team-orders";
    n.step(&format!("Opting namespace {ns} in (label cloudpass.dev/injection=enabled)"));
    stack.opted_in_namespace(ns).await?;
    n.done("namespace created");

    n.step("AKS -> S3: preparing the AWS account the way an AWS admin would");
    let s3 = AksToS3::prepare(&stack, &aws, ns).await?;
    n.say(&format!("IAM role {} may use bucket s3://{}", s3.role_arn, cloudpass_e2e::scenario::aws::BUCKET));
    n.say(&format!(
        "AWS STS (the gate at {}) trusts the cloudpass issuer {} for subject system:cloudpass:{ns}:orders-s3, audience sts.amazonaws.com",
        s3.gate.url(),
        stack.broker.url
    ));
    n.done("AWS side ready");

    n.step("Applying examples/aks-to-s3.yaml with kubectl");
    for change in &s3.example.changes {
        n.say(&format!("changed for this machine: {change}"));
    }
    let applied = s3.apply(&stack).await?;
    for line in applied.lines() {
        n.say(line);
    }
    n.done("AccessPolicy orders-to-s3 is Ready");

    n.step("Creating a pod of the orders Deployment (as its ReplicaSet would)");
    let pod = stack.create_pod(ns, &s3.pod, true).await?;
    describe_injection(&n, &pod);
    n.done(&format!("pod {ns}/{} stored", pod.name));

    n.step("Running the pod: the agent sidecar first, then the unchanged boto3 app");
    let mut running = stack.node.run(&cp, pod).await?;
    let ready = running.wait_started(Duration::from_secs(60)).await?;
    n.say(&format!(
        "the agent's startup probe passed {:.2}s after it started: it holds a credential",
        ready.as_secs_f64()
    ));
    describe_credential(&n, &stack, &running);
    let app = running.run_app("api", S3_APP).await?;
    let result = app.ok_json()?;
    n.say(&format!(
        "boto3 found credentials via {} (AWS_CONTAINER_CREDENTIALS_FULL_URI, served by the agent on 127.0.0.1)",
        result["credentialSource"].as_str().unwrap_or("?")
    ));
    n.say(&format!("acting as {}", result["identity"].as_str().unwrap_or("?")));
    n.say(&format!(
        "wrote and read back s3://{}/{}: {:?}",
        result["bucket"].as_str().unwrap_or("?"),
        result["key"].as_str().unwrap_or("?"),
        result["read"].as_str().unwrap_or("?")
    ));
    n.done("AKS -> S3 works");
    n.say(&format!(
        "(stopping pod {}'s agent: the agents' loopback ports are fixed, and here all pods share one machine)",
        running.pod.name
    ));
    running.stop();

    n.step("Starting the Azure side: Azurite (Blob Storage) with OAuth over TLS, and an Entra ID tenant");
    let azurite = Azurite::start(&stack.broker.ca).await?;
    n.say("Azurite accepts only Entra bearer tokens for Azure Storage over HTTPS; the Entra fake");
    n.say("checks federated credentials exactly (issuer, subject, audience), like Entra ID.");
    n.done(&format!("Azurite at {}", azurite.url));

    let blob_ns = "team-reports";
    n.step(&format!("EKS -> Azure Blob: opting namespace {blob_ns} in and registering the federated credential"));
    stack.opted_in_namespace(blob_ns).await?;
    let blob = EksToAzureBlob::prepare(&stack, &azurite, blob_ns).await?;
    n.say(&format!(
        "Entra app 11111111-2222-3333-4444-555555555555 trusts issuer {} for subject {}, audience api://AzureADTokenExchange",
        stack.broker.url, blob.subject
    ));
    n.done("Entra side ready");

    n.step("Applying examples/eks-to-azure-blob.yaml with kubectl");
    for change in &blob.example.changes {
        n.say(&format!("changed for this machine: {change}"));
    }
    for line in blob.apply(&stack).await?.lines() {
        n.say(line);
    }
    n.done("AccessPolicy report-uploader-to-blob is Ready");

    n.step("Creating a pod of the report-uploader Deployment");
    let pod = stack.create_pod(blob_ns, &blob.pod, true).await?;
    describe_injection(&n, &pod);
    n.done(&format!("pod {blob_ns}/{} stored", pod.name));

    n.step("Running it: the agent, then an unchanged azure-identity + azure-storage-blob app");
    let mut blob_running = stack.node.run(&cp, pod).await?;
    let ready = blob_running.wait_started(Duration::from_secs(60)).await?;
    n.say(&format!("the agent's startup probe passed {:.2}s after it started", ready.as_secs_f64()));
    describe_credential(&n, &stack, &blob_running);
    let app = blob_running.run_app("app", BLOB_APP).await?;
    let result = app.ok_json()?;
    n.say(&format!(
        "ManagedIdentityCredential used {} (IDENTITY_ENDPOINT, served by the agent on 127.0.0.1)",
        result["credential"].as_str().unwrap_or("?")
    ));
    n.say(&format!(
        "uploaded and downloaded {}/{}: {:?}",
        result["container"].as_str().unwrap_or("?"),
        result["blob"].as_str().unwrap_or("?"),
        result["read"].as_str().unwrap_or("?")
    ));
    n.done("EKS -> Azure Blob works");

    println!(
        "\nAll directions passed in {:.0}s. Everything keeps running until you press Ctrl-C.",
        n.started.elapsed().as_secs_f64()
    );
    println!("\nTry, in another terminal:");
    println!("  export KUBECONFIG={} PATH={}:$PATH", cp.kubeconfig.display(), tools.display());
    println!("  kubectl get trustproviders,credentialproviders,accesspolicies -n {ns}");
    println!("  kubectl describe accesspolicy orders-to-s3 -n {ns}");
    println!("  kubectl get pod {} -n {ns} -o yaml      # what the webhook injected", running.pod.name);
    println!("  kubectl get pod {} -n {blob_ns} -o yaml", blob_running.pod.name);
    println!("  kubectl get configmaps -n cloudpass-system   # the compiled per-namespace configs");
    println!("  kubectl delete accesspolicy orders-to-s3 -n {ns}   # revoke: the broker refuses the next refresh");
    println!("  tail -f {}   # the broker's audit records", stack.broker.log_path().display());
    let _ = std::io::stdout().flush();

    stop.await;
    println!("\nStopping: the agent, STS gate, Entra, Azurite, webhook, operator, moto, apiserver, etcd ...");
    blob_running.stop();
    drop(running);
    drop(blob_running);
    drop(s3);
    drop(blob);
    drop(azurite);
    drop(stack);
    drop(aws);
    drop(cp);
    println!("Stopped. Nothing is left running.");
    Ok(())
}

/// Says what the webhook added to the pod.
fn describe_injection(n: &Narrator, pod: &AdmittedPod) {
    let s = pod.injection_summary();
    if !pod.is_injected() {
        n.say("the webhook left the pod unchanged");
        return;
    }
    n.say(&format!(
        "the webhook injected {} (image {}) as a native sidecar, for policy {}",
        s.init_containers.join(", "),
        s.agent_image.as_deref().unwrap_or("?"),
        s.policies.as_deref().unwrap_or("?")
    ));
    n.say(&format!("  agent environment: {}", s.agent_env.join(", ")));
    n.say(&format!(
        "  volumes: {} (the projected token, audience cloudpass, is mounted into the agent only)",
        s.volumes.join(", ")
    ));
    for (container, env) in &s.env_added {
        n.say(&format!("  container {container} gets: {}", env.join(", ")));
    }
    for w in &pod.warnings {
        n.say(&format!("  warning: {w}"));
    }
}

/// Says what the broker decided for the pod, from its audit record (never a secret).
fn describe_credential(n: &Narrator, stack: &Stack<'_>, pod: &RunningPod) {
    let records = stack.audit_records(&pod.pod.namespace, &pod.pod.name);
    let Some(record) = records.iter().rev().find(|r| r["outcome"] == "allowed") else {
        n.say("the broker has no allowed decision for this pod yet");
        return;
    };
    let trust: Vec<String> = record["trustProviders"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            format!("{} ({})", t["name"].as_str().unwrap_or("?"), if t["passed"] == true { "passed" } else { "failed" })
        })
        .collect();
    n.say(&format!(
        "the broker verified pod {} (service account {}) with trust provider {}",
        str_of(record, "pod"),
        str_of(record, "serviceAccount"),
        trust.join(", ")
    ));
    let expires = record["expiresAt"].as_str().and_then(|e| e.parse::<jiff::Timestamp>().ok());
    let lifetime = expires.map(|e| e.as_second() - jiff::Timestamp::now().as_second()).unwrap_or_default();
    n.say(&format!(
        "and minted a credential of kind {} through CredentialProvider {}, valid until {} (~{} min; cache {}, decided in {:.0} ms)",
        str_of(record, "credentialKind"),
        str_of(record, "credentialProvider"),
        str_of(record, "expiresAt"),
        (lifetime + 30) / 60,
        str_of(record, "cache"),
        record["latencyMs"].as_f64().unwrap_or_default()
    ));
}

fn str_of<'a>(record: &'a Value, field: &str) -> &'a str {
    record[field].as_str().unwrap_or("?")
}
