//! `make demo`: the whole product on this machine, narrated, with pods that really run.
//!
//! Starts a one-node Kubernetes cluster (a real kubelet with containerd, a pod network
//! that stays on this machine), the cloud emulators and fakes, and installs cloudpass
//! with its Helm chart and the locally built images. Then it does what a user does for
//! two directions (AKS -> S3 and EKS -> Azure Blob): applies the example with kubectl,
//! lets its Deployment run (the webhook injects the agent, the kubelet starts it as a
//! native sidecar, the unchanged SDK app calls the emulated cloud), and says at each step
//! what happened. Everything keeps running for `kubectl` until Ctrl-C, then stops and
//! leaves nothing behind.
#![forbid(unsafe_code)]

use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cloudpass_e2e::{
    cluster::{Cluster, NODE_IP, POD_SUBNET},
    scenario::{
        AdmittedPod, Deployed,
        aws::{AksToS3, AwsCloud, BUCKET},
        azure::{Azurite, EksToAzureBlob},
        example::App,
        installed::{Installed, NAMESPACE},
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

/// How often the demo's apps repeat their cloud call.
const EVERY: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() {
    if let Some(reason) = Cluster::unsupported_reason() {
        eprintln!("The demo runs a real Kubernetes node (kubelet, containerd) on this machine, and cannot here:");
        eprintln!("  {reason}");
        eprintln!("It needs root, cgroup v1 hierarchies and the tools of `make tools`; see docs/testbed.md.");
        std::process::exit(1);
    }
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
    println!("cloudpass demo: pods on one \"cloud\" read another cloud's storage with short-lived,");
    println!("federated credentials and no secret in the pod. Everything runs on this machine.");
    let tools = tools_bin()?;

    n.step("Starting a one-node Kubernetes cluster: etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet, kube-proxy, CoreDNS");
    let cluster = Cluster::start().await?;
    n.say(&format!(
        "pod network {POD_SUBNET} on bridge cloudpass0 (node {NODE_IP}): no default route, no NAT, nothing leaves this machine"
    ));
    for image in &cluster.images {
        n.say(&format!(
            "image {} ({:.1} MB), built here and imported into containerd",
            image.name,
            image.compressed_bytes as f64 / 1e6
        ));
    }
    n.done(&format!("node Ready, apiserver at {}", cluster.cp.server));

    n.step("helm install cloudpass charts/cloudpass -n cloudpass-system (the chart's default images)");
    let installed = Installed::install(&cluster).await?;
    for line in cluster.cp.kubectl_ok(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])?.lines() {
        n.say(line);
    }
    n.say(&format!(
        "the operator serves the broker and the OIDC issuer at {} (its Service, through kube-proxy and CoreDNS)",
        installed.issuer_url()
    ));
    n.done(&format!("installed and Ready in {:.1}s", installed.install_time.as_secs_f64()));

    n.step("Starting the AWS side: moto (IAM, STS, S3) with request signing enforced");
    let aws = AwsCloud::start().await?;
    n.say("moto refuses every request that is not SigV4-signed with keys it issued itself.");
    n.done(&format!("moto at {}", aws.moto.url()));

    let ns = "team-orders";
    n.step(&format!("AKS -> S3: opting namespace {ns} in and preparing the AWS account the way an AWS admin would"));
    installed.app_namespace(ns).await?;
    let mut s3 = AksToS3::prepare(&installed, &aws, ns).await?;
    n.say(&format!("IAM role {} may use bucket s3://{BUCKET}", s3.role_arn));
    n.say(&format!(
        "AWS STS (the gate at {}) trusts the cloudpass issuer for subject system:cloudpass:{ns}:orders-s3, audience sts.amazonaws.com",
        s3.gate.url()
    ));
    n.done("AWS side ready");

    n.step("kubectl apply -f examples/aks-to-s3.yaml");
    let app = s3.app.clone();
    show_applied(&n, &installed, ns, &mut s3.example, &app, "orders-to-s3").await?;
    n.done("AccessPolicy orders-to-s3 is Ready; Deployment orders rolled out");
    show_verified(&n, &installed, ns, "orders-s3").await?;
    let orders = show_pods(&n, &installed, ns, "app=orders", &app).await?;
    if let Some(first) = orders.first() {
        n.say(&format!(
            "boto3 found credentials via {} (AWS_CONTAINER_CREDENTIALS_FULL_URI, the agent on 127.0.0.1)",
            str_of(first, "credentialSource")
        ));
        n.say(&format!("acting as {}", str_of(first, "identity")));
        n.say(&format!(
            "wrote and read back s3://{}/{}: {:?}",
            str_of(first, "bucket"),
            str_of(first, "key"),
            str_of(first, "read")
        ));
    }
    n.done("AKS -> S3 works");

    n.step("Starting the Azure side: Azurite (Blob Storage) with OAuth over TLS, and an Entra ID tenant");
    let azurite = Azurite::start(installed.cloud_ca()).await?;
    n.say("Azurite accepts only Entra bearer tokens over HTTPS; the Entra fake checks federated");
    n.say("credentials exactly (issuer, subject, audience), like Entra ID.");
    n.done(&format!("Azurite at {}", azurite.url));

    let blob_ns = "team-reports";
    n.step(&format!("EKS -> Azure Blob: opting namespace {blob_ns} in and registering the federated credential"));
    installed.app_namespace(blob_ns).await?;
    let mut blob = EksToAzureBlob::prepare(&installed, &azurite, blob_ns).await?;
    n.say(&format!(
        "Entra app 11111111-2222-3333-4444-555555555555 trusts the cloudpass issuer for subject {}, audience api://AzureADTokenExchange",
        blob.subject
    ));
    n.done("Entra side ready");

    n.step("kubectl apply -f examples/eks-to-azure-blob.yaml");
    let blob_app = blob.app.clone();
    show_applied(&n, &installed, blob_ns, &mut blob.example, &blob_app, "report-uploader-to-blob").await?;
    n.done("AccessPolicy report-uploader-to-blob is Ready; Deployment report-uploader rolled out");
    show_verified(&n, &installed, blob_ns, "azure-blob-writer").await?;
    let reports = show_pods(&n, &installed, blob_ns, "app=report-uploader", &blob_app).await?;
    if let Some(first) = reports.first() {
        n.say(&format!(
            "ManagedIdentityCredential used {} (IDENTITY_ENDPOINT, the agent on 127.0.0.1)",
            str_of(first, "credential")
        ));
        n.say(&format!(
            "uploaded and downloaded {}/{}: {:?}",
            str_of(first, "container"),
            str_of(first, "blob"),
            str_of(first, "read")
        ));
    }
    n.done("EKS -> Azure Blob works");

    println!(
        "\nBoth directions work, in {:.0}s. Everything keeps running until you press Ctrl-C.",
        n.started.elapsed().as_secs_f64()
    );
    println!("\nTry, in another terminal:");
    println!("  export KUBECONFIG={} PATH={}:$PATH", cluster.cp.kubeconfig.display(), tools.display());
    println!("  kubectl get pods -A -o wide");
    println!("  kubectl logs -n {ns} deploy/orders -c api -f               # the app, every {}s", EVERY.as_secs());
    println!("  kubectl logs -n {ns} deploy/orders -c cloudpass-agent -f   # its agent");
    println!(
        "  kubectl logs -n {NAMESPACE} -l app.kubernetes.io/component=broker -f | grep cloudpass.dev/audit   # the broker's decisions"
    );
    println!("  kubectl get accesspolicies,credentialproviders,trustproviders -A");
    println!("  kubectl delete accesspolicy orders-to-s3 -n {ns}   # revoke: the agent's next refresh is refused");
    let _ = std::io::stdout().flush();

    stop.await;
    println!("\nStopping: the emulators, then the cluster (pods, containerd, kubelet, network, control plane) ...");
    drop((s3, blob, azurite, aws, installed));
    drop(cluster);
    println!("Stopped. Nothing is left running, and the machine's network and kernel settings are restored.");
    Ok(())
}

/// Applies the example's objects, then its workload made to run `app` from the apps
/// image, printing the changes made for this machine and what kubectl said.
async fn show_applied(
    n: &Narrator,
    installed: &Installed<'_>,
    namespace: &str,
    example: &mut cloudpass_e2e::scenario::Example,
    app: &App,
    policy: &str,
) -> Result<()> {
    example.run_app_on_node(app, installed.apps_image()?, Some(EVERY))?;
    for change in &example.changes {
        n.say(&format!("changed for this machine: {change}"));
    }
    for line in installed.apply_example(namespace, example, policy).await?.lines() {
        n.say(line);
    }
    let applied = installed.cp().apply_yaml(Some(namespace), &example.workload_yaml(&app.workload)?)?;
    for line in applied.lines() {
        n.say(line);
    }
    installed.wait_rollout(namespace, &app.workload, Duration::from_secs(120))
}

/// Shows the `Verified` condition the controller wrote after its own exchange with the
/// cloud, as `kubectl get credentialprovider` does.
async fn show_verified(n: &Narrator, installed: &Installed<'_>, namespace: &str, name: &str) -> anyhow::Result<()> {
    let provider = installed
        .cp()
        .wait_for_condition("credentialprovider", namespace, name, "Verified", "True", Duration::from_secs(60))
        .await?;
    let conditions = provider["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let verified = conditions.iter().find(|c| c["type"] == "Verified").cloned().unwrap_or_default();
    n.say(&format!(
        "CredentialProvider {name}: Verified=True, the controller's own check at the cloud: {}",
        verified["message"].as_str().unwrap_or_default()
    ));
    Ok(())
}

/// Shows the workload's pods as kubectl does, what the webhook injected into the first,
/// what the broker decided for it, and returns each pod's first app result.
async fn show_pods(
    n: &Narrator,
    installed: &Installed<'_>,
    namespace: &str,
    selector: &str,
    app: &App,
) -> Result<Vec<Value>> {
    let results = installed.wait_results(namespace, selector, &app.container, (1, 1), Duration::from_secs(120)).await?;
    for line in installed.cp().kubectl_ok(&["get", "pods", "-n", namespace, "-l", selector])?.lines() {
        n.say(line);
    }
    let (first_pod, _) = results.first().context("no pod")?;
    let stored: Value =
        serde_json::from_str(&installed.cp().kubectl_ok(&["get", "pod", first_pod, "-n", namespace, "-o", "json"])?)?;
    // What the ReplicaSet submitted: the Deployment's pod template.
    let deployment: Value = serde_json::from_str(&installed.cp().kubectl_ok(&[
        "get",
        "deployment",
        &app.workload,
        "-n",
        namespace,
        "-o",
        "json",
    ])?)?;
    let template = &deployment["spec"]["template"];
    let submitted = serde_json::json!({"metadata": template["metadata"], "spec": template["spec"]});
    describe_injection(n, &AdmittedPod::from_stored(stored, submitted)?);
    describe_credential(n, installed, namespace, first_pod)?;
    let mut firsts = Vec::new();
    for (pod, lines) in &results {
        let (_, first) = lines.first().context("no result")?;
        if first["ok"] != true {
            bail!("pod {pod}'s app failed: {first}");
        }
        firsts.push(first.clone());
    }
    n.say(&format!(
        "the app's first call in each pod succeeded (kubectl logs -n {namespace} {first_pod} -c {})",
        app.container
    ));
    Ok(firsts)
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
        "  volumes: {} (the projected token, audience cloudpass, and the namespace's copy of the broker CA, mounted into the agent only)",
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
fn describe_credential(n: &Narrator, installed: &Installed<'_>, namespace: &str, pod: &str) -> Result<()> {
    let records = installed.audit_records(namespace, pod)?;
    let Some(record) = records.iter().find(|r| r["outcome"] == "allowed") else {
        n.say("the broker has no allowed decision for this pod yet");
        return Ok(());
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
    Ok(())
}

fn str_of<'a>(record: &'a Value, field: &str) -> &'a str {
    record[field].as_str().unwrap_or("?")
}
