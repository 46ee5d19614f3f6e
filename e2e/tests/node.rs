//! cloudpass on a real node: the Helm chart and every example running as real pods.
//!
//! One cluster for the whole suite ([`Cluster::shared`]): etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, containerd with runc, a kubelet, kube-proxy
//! and CoreDNS on this machine, with the images of `make images`. cloudpass is installed
//! with `helm install` and the chart's default images; the examples are applied with
//! `kubectl` as Deployments (or a Job of the CronJob), whose pods the ReplicaSet and Job
//! controllers create, the scheduler places and the kubelet runs, the webhook injecting
//! the agent as a native sidecar. Nothing here sets `nodeName` or creates a pod a
//! controller would create. The apps are the unchanged SDK programs of the scenarios;
//! their output is read with `kubectl logs`.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use cloudpass_e2e::{
    cluster::Cluster,
    scenario::{
        AdmittedPod, Deployed, Example,
        aws::{AksToS3, AwsCloud, S3Direction},
        azure::{Azurite, EksToAzureBlob},
        example::App,
        gcs::AnyToGcs,
        http_api::HttpApiScenario,
        installed::{Installed, NAMESPACE},
    },
    start_once,
};
use serde_json::Value;

/// The suite's cluster with cloudpass installed, set up on first use.
fn installed() -> &'static Installed<'static> {
    static INSTALLED: OnceLock<Result<Installed<'static>, String>> = OnceLock::new();
    start_once(&INSTALLED, "cloudpass on the node", || async {
        let cluster = Cluster::shared();
        Installed::install(cluster).await.map_err(|e| e.context(cluster.log_tails()))
    })
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_runs_as_pods_on_the_node() {
    let installed = installed();
    let cp = installed.cp();
    eprintln!("helm install --wait took {:.1}s", installed.install_time.as_secs_f64());

    // Every Deployment available through its real probes, two replicas each.
    for deployment in ["cloudpass-operator", "cloudpass-broker", "cloudpass-webhook"] {
        let d = json(&cp.kubectl_ok(&["get", "deployment", deployment, "-n", NAMESPACE, "-o", "json"]).unwrap());
        assert_eq!(d["status"]["readyReplicas"], 2, "{deployment}: {}", d["status"]);
    }
    let pods = installed.pods(NAMESPACE, "app.kubernetes.io/name=cloudpass").unwrap();
    assert_eq!(pods.len(), 6, "two controllers, two brokers and two webhooks");
    for pod in &pods {
        assert_eq!(pod["spec"]["nodeName"], cloudpass_e2e::cluster::NODE_NAME, "placed by the scheduler");
        assert_eq!(pod["status"]["phase"], "Running");
        let container = &pod["status"]["containerStatuses"][0];
        assert_eq!(container["ready"], true, "{}", pod["metadata"]["name"]);
        assert_eq!(container["restartCount"], 0, "{}: {}", pod["metadata"]["name"], container);
        assert!(
            container["image"].as_str().unwrap().starts_with("ghcr.io/cloudpass-dev/cloudpass-"),
            "the chart's default image: {}",
            container["image"]
        );
    }

    // One operator holds the Lease, and it is one of the running pods.
    let lease = json(&cp.kubectl_ok(&["get", "lease", "cloudpass-operator", "-n", NAMESPACE, "-o", "json"]).unwrap());
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap();
    assert!(pods.iter().any(|p| p["metadata"]["name"] == holder), "lease holder {holder} is a running pod");

    // The webhook filled its configuration's caBundle; the operator published the broker CA.
    let config =
        json(&cp.kubectl_ok(&["get", "mutatingwebhookconfiguration", "cloudpass-webhook", "-o", "json"]).unwrap());
    let bundle = config["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap_or_default();
    assert!(!bundle.is_empty(), "caBundle filled");
    assert!(installed.issuer_ca_pem().contains("BEGIN CERTIFICATE"));

    // The broker answers through its Service (kube-proxy) and cluster DNS name: its issuer
    // discovery document, fetched as a cloud would.
    let http = cloudpass_e2e::net::client_builder()
        .tls_certs_only([reqwest::Certificate::from_pem(installed.issuer_ca_pem().as_bytes()).unwrap()])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    let discovery: Value = http
        .get(format!("{}/.well-known/openid-configuration", installed.issuer_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], installed.issuer_url(), "in {:?}", started.elapsed());
}

/// The cloud emulators every direction shares (processes, so any test's runtime can use
/// them): moto with authentication enforced, Azurite with OAuth over TLS.
struct Clouds {
    aws: AwsCloud,
    azurite: Azurite,
}

fn clouds() -> &'static Clouds {
    static CLOUDS: OnceLock<Result<Clouds, String>> = OnceLock::new();
    let installed = installed();
    start_once(&CLOUDS, "the cloud emulators", move || async move {
        Ok(Clouds { aws: AwsCloud::start().await?, azurite: Azurite::start(installed.cloud_ca()).await? })
    })
}

/// How often the Deployments' apps repeat their cloud call.
const EVERY: Duration = Duration::from_secs(2);
/// Bound on a rollout (pods scheduled, sidecar started, first credential, app ready).
const ROLLOUT: Duration = Duration::from_secs(120);

/// The status of container `name` of a pod (init containers included).
fn container_status<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["status"]["initContainerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["status"]["containerStatuses"].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no status of container {name}: {}", pod["status"]))
}

fn started_at(status: &Value) -> jiff::Timestamp {
    let state = &status["state"];
    let at = state["running"]["startedAt"].as_str().or(state["terminated"]["startedAt"].as_str());
    at.unwrap_or_else(|| panic!("not started: {status}")).parse().unwrap()
}

/// Checks what every injected pod of a direction shows: the agent ran as a native
/// sidecar whose postStart hook passed before the app started, and the app's very
/// first cloud call succeeded, because the kubelet held the app until then.
fn assert_sidecar_first(
    installed: &Installed,
    namespace: &str,
    results: &[(String, Vec<(jiff::Timestamp, Value)>)],
    container: &str,
) {
    for (pod_name, lines) in results {
        let pod = json(&installed.cp().kubectl_ok(&["get", "pod", pod_name, "-n", namespace, "-o", "json"]).unwrap());
        let agent = pod["spec"]["initContainers"][0].clone();
        assert_eq!(agent["name"], "cloudpass-agent", "{pod_name}: injected first");
        assert_eq!(agent["restartPolicy"], "Always", "{pod_name}: a native sidecar");
        assert!(
            agent["lifecycle"]["postStart"]["exec"].is_object(),
            "{pod_name}: holding the app until the first credential"
        );
        let agent_status = container_status(&pod, "cloudpass-agent");
        if pod["status"]["phase"] == "Succeeded" {
            // A Job's pod: the kubelet stopped the sidecar after the app, and it stopped cleanly.
            assert_eq!(agent_status["state"]["terminated"]["exitCode"], 0, "{pod_name}: {agent_status}");
        } else {
            assert_eq!(agent_status["started"], true, "{pod_name}: {agent_status}");
            assert_eq!(agent_status["ready"], true, "{pod_name}: {agent_status}");
        }
        assert!(
            started_at(container_status(&pod, container)) >= started_at(agent_status),
            "{pod_name}: the app started after the agent"
        );
        let (_, first) = lines.first().unwrap_or_else(|| panic!("{pod_name}: no result"));
        assert_eq!(first["ok"], true, "{pod_name}: the first call already had credentials: {first}");
    }
}

/// Deploys `app`'s workload of `example` (its app repeating every [`EVERY`]), waits until
/// it rolled out and each of its `pods` printed a result, and checks what every injected
/// pod shows ([`assert_sidecar_first`]); the results per pod.
async fn deploy_and_check(
    installed: &Installed<'_>,
    namespace: &str,
    example: &mut Example,
    app: &App,
    pods: usize,
) -> Vec<(String, Vec<(jiff::Timestamp, Value)>)> {
    installed.deploy_app(namespace, example, app, Some(EVERY)).unwrap();
    installed.wait_rollout(namespace, &app.workload, ROLLOUT).unwrap();
    let selector = format!("app={}", app.workload);
    let results = installed.wait_results(namespace, &selector, &app.container, (pods, 1), ROLLOUT).await.unwrap();
    assert_sidecar_first(installed, namespace, &results, &app.container);
    results
}

#[tokio::test(flavor = "multi_thread")]
async fn aks_to_s3_runs_as_a_deployment_with_an_init_container_and_survives_a_killed_agent() {
    let installed = installed();
    let clouds = clouds();
    let ns = "node-aks-to-s3";
    installed.app_namespace(ns).await.unwrap();
    let mut direction = AksToS3::prepare(installed, &clouds.aws, ns).await.unwrap();
    direction.apply(installed).await.unwrap();
    // A migration step before the app, with the same program and settings: it needs
    // credentials while the pod is still initialising.
    let image = installed.apps_image().unwrap().to_owned();
    direction.example.run_app_on_node(&direction.app, &image, Some(EVERY)).unwrap();
    let deployment = direction.example.docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    let spec = &mut deployment["spec"]["template"]["spec"];
    let mut migrate = spec["containers"][0].clone();
    migrate["name"] = "migrate".into();
    migrate["command"] = serde_json::json!(["python3", "/apps/s3.py"]);
    spec["initContainers"] = serde_json::json!([migrate]);
    installed.cp().apply_yaml(Some(ns), &direction.example.workload_yaml("orders").unwrap()).unwrap();
    installed.wait_rollout(ns, "orders", ROLLOUT).unwrap();

    let results = installed.wait_results(ns, "app=orders", "api", (2, 1), ROLLOUT).await.unwrap();
    assert_sidecar_first(installed, ns, &results, "api");
    for (pod_name, lines) in &results {
        let (_, first) = &lines[0];
        let identity = first["identity"].as_str().unwrap();
        assert!(identity.contains(":assumed-role/aks-orders-s3/"), "{pod_name}: {first}");
        assert_eq!(first["credentialSource"], "container-role", "{pod_name}: through the agent: {first}");
        let migrated = installed.json_logs(ns, pod_name, "migrate").unwrap();
        assert_eq!(
            migrated.last().map(|(_, v)| v["ok"].clone()),
            Some(true.into()),
            "{pod_name}: init container: {migrated:?}"
        );
        let pod = json(&installed.cp().kubectl_ok(&["get", "pod", pod_name, "-n", ns, "-o", "json"]).unwrap());
        // The agent trusted the broker through the namespace's copy of its CA, which the
        // kubelet projected beside its token: no PEM in the pod spec.
        let agent = pod["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "cloudpass-agent");
        // Nor anything else: with the chart's defaults the agent's configuration is its
        // own defaults, and its deliveries came from the broker.
        let agent = agent.unwrap();
        assert_eq!(agent.get("env"), None, "{pod_name}: {agent}");
        assert_eq!(agent["securityContext"].get("runAsUser"), None, "{pod_name}: the image's user: {agent}");
        let identities = agent_process_identities();
        assert!(!identities.is_empty(), "no agent process on the node");
        for (uid, gid) in identities {
            assert_eq!(
                (uid.as_str(), gid.as_str()),
                ("65532", "65532"),
                "every agent runs as the image's user and group"
            );
        }
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        let projected_ca = volumes
            .iter()
            .flat_map(|v| v["projected"]["sources"].as_array().into_iter().flatten())
            .any(|s| s["configMap"]["name"].as_str().is_some_and(|n| n.ends_with("broker-ca")));
        assert!(projected_ca, "{pod_name}: {volumes:?}");
        // kubectl cloudpass explain pod: the policy selects it, both containers get the
        // AWS endpoint, and the broker's audit records show its allowed decisions.
        let plugin = cloudpass_e2e::workspace_binary("kubectl-cloudpass").unwrap();
        let out = std::process::Command::new(plugin)
            .args(["explain", "pod", pod_name, "-n", ns, "-o", "json"])
            .env("KUBECONFIG", &installed.cp().kubeconfig)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let explained = json(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(explained["namespaceOptedIn"], true, "{explained}");
        let verdict = explained["policies"].as_array().unwrap().iter().find(|p| p["policy"] == "orders-to-s3").unwrap();
        assert_eq!(verdict["selects"], true, "{explained}");
        assert_eq!(explained["deliveries"][0]["endpoint"], "awsContainerCredentials :15021", "{explained}");
        assert_eq!(explained["deliveries"][0]["containers"], serde_json::json!(["migrate", "api"]), "{explained}");
        let decisions = explained["decisions"].as_array().unwrap();
        assert!(decisions.iter().any(|d| d["outcome"] == "allowed" && d["policy"] == "orders-to-s3"), "{explained}");
        let migrate = container_status(&pod, "migrate");
        assert_eq!(migrate["state"]["terminated"]["exitCode"], 0, "{migrate}");
        assert!(started_at(migrate) >= started_at(container_status(&pod, "cloudpass-agent")));
    }

    // Kill one pod's agent as an OOM kill would: the kubelet restarts the sidecar, the app
    // container keeps running, and its calls after the restart succeed.
    let (pod_name, _) = &results[0];
    let pod = json(&installed.cp().kubectl_ok(&["get", "pod", pod_name, "-n", ns, "-o", "json"]).unwrap());
    let id = container_status(&pod, "cloudpass-agent")["containerID"]
        .as_str()
        .unwrap()
        .trim_start_matches("containerd://")
        .to_owned();
    let killed_at = jiff::Timestamp::now();
    let ctr = cloudpass_e2e::tools_bin().unwrap().join("ctr");
    let out = std::process::Command::new(ctr)
        .arg("--address")
        .arg(installed.cluster.containerd_socket())
        .args(["-n", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", &id])
        .output()
        .unwrap();
    assert!(out.status.success(), "ctr tasks kill: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + ROLLOUT;
    loop {
        let pod = json(&installed.cp().kubectl_ok(&["get", "pod", pod_name, "-n", ns, "-o", "json"]).unwrap());
        let agent = container_status(&pod, "cloudpass-agent");
        let app = container_status(&pod, "api");
        assert_eq!(app["restartCount"], 0, "the app container keeps running: {app}");
        if agent["restartCount"].as_u64() >= Some(1) && agent["ready"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the agent was not restarted: {agent}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let restarted_at = jiff::Timestamp::now();
    tokio::time::sleep(EVERY * 3).await;
    let lines = installed.json_logs(ns, pod_name, "api").unwrap();
    let during: Vec<_> = lines.iter().filter(|(at, _)| *at >= killed_at && *at < restarted_at).collect();
    let after: Vec<_> = lines.iter().filter(|(at, _)| *at >= restarted_at).collect();
    eprintln!(
        "calls while the agent restarted: {} ({} failed)",
        during.len(),
        during.iter().filter(|(_, v)| v["ok"] != true).count()
    );
    assert!(after.len() >= 2, "the app keeps calling: {lines:?}");
    assert!(after.iter().all(|(_, v)| v["ok"] == true), "after the restart every call succeeds: {after:?}");
}

/// The AWS credentials as files on the real kubelet: the agent (its own UID) writes them
/// into the in-memory volume, the app's boto3 runs `cat` on the JSON file as its
/// `credential_process` (the example's ConfigMap), the tool reads the shared credentials
/// file, both through read-only mounts.
#[tokio::test(flavor = "multi_thread")]
async fn aws_credentials_as_files_run_as_a_deployment() {
    let installed = installed();
    let clouds = clouds();
    let ns = "node-aws-files";
    installed.app_namespace(ns).await.unwrap();
    let mut direction = S3Direction::credentials_file(installed, &clouds.aws, ns).await.unwrap();
    direction.apply(installed).await.unwrap();
    let both = ["reports-s3-process", "reports-s3-profile"];
    AdmittedPod::wait_until_serving(installed.cp(), ns, &direction.pod, &both, ROLLOUT).await.unwrap();
    let tool = direction.tool.clone().unwrap();
    direction.example.run_app_on_node(&tool, installed.apps_image().unwrap(), Some(EVERY)).unwrap();
    let app = direction.app.clone();
    let results = deploy_and_check(installed, ns, &mut direction.example, &app, 1).await;
    let (_, lines) = &results[0];
    assert_eq!(lines[0].1["credentialSource"], "custom-process", "{:?}", lines[0]);
    let selector = format!("app={}", app.workload);
    let synced = installed.wait_results(ns, &selector, &tool.container, (1, 1), ROLLOUT).await.unwrap();
    let (_, first) = &synced[0].1[0];
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["credentialSource"], "shared-credentials-file", "{first}");
}

#[tokio::test(flavor = "multi_thread")]
async fn eks_to_azure_blob_runs_as_a_deployment() {
    let installed = installed();
    let clouds = clouds();
    let ns = "node-eks-to-azure";
    installed.app_namespace(ns).await.unwrap();
    let mut direction = EksToAzureBlob::prepare(installed, &clouds.azurite, ns).await.unwrap();
    direction.apply(installed).await.unwrap();
    let app = direction.app.clone();
    deploy_and_check(installed, ns, &mut direction.example, &app, 1).await;
    assert!(direction.entra.calls() >= 1, "the broker's token came from Entra (the fake)");
    // The chart's controller, in its pod with its own RBAC, read the issuer's keys and
    // checked the cloud side itself.
    let provider = installed
        .cp()
        .wait_for_condition("credentialprovider", ns, "azure-blob-writer", "Verified", "True", ROLLOUT)
        .await
        .unwrap();
    assert!(provider["status"]["lastVerification"]["time"].is_string(), "{provider}");
}

#[tokio::test(flavor = "multi_thread")]
async fn any_to_gcs_runs_as_a_deployment() {
    let installed = installed();
    let ns = "node-any-to-gcs";
    installed.app_namespace(ns).await.unwrap();
    let mut direction = AnyToGcs::prepare(installed, ns).await.unwrap();
    direction.apply(installed).await.unwrap();
    let app = direction.app.clone();
    deploy_and_check(installed, ns, &mut direction.example, &app, 1).await;
    assert!(direction.gcs.served() >= 1, "the gate let the app's token through");
}

#[tokio::test(flavor = "multi_thread")]
async fn gke_to_s3_runs_as_a_job_of_the_cronjob() {
    let installed = installed();
    let clouds = clouds();
    let ns = "node-gke-to-s3";
    installed.app_namespace(ns).await.unwrap();
    let mut direction = S3Direction::gke(installed, &clouds.aws, ns).await.unwrap();
    direction.apply(installed).await.unwrap();
    let app = direction.app.clone();
    let image = installed.apps_image().unwrap().to_owned();
    // The example's log shipper cannot be pulled here: it becomes a program that says
    // whether it received AWS settings (the policy names only the exporter container).
    direction
        .example
        .run_on_node(
            "exporter",
            "log-shipper",
            &image,
            &[
                "python3",
                "-c",
                "import json, os; print(json.dumps({'ok': 'AWS_CONTAINER_CREDENTIALS_FULL_URI' not in os.environ}))",
            ],
            &[],
        )
        .unwrap();
    installed.deploy_app(ns, &mut direction.example, &app, None).unwrap();
    // What the schedule would do at 01:30, now: a Job from the CronJob's template.
    installed.cp().kubectl_ok(&["create", "job", "exporter-now", "--from=cronjob/exporter", "-n", ns]).unwrap();
    let waited = installed
        .cp()
        .kubectl_output(&["wait", "-n", ns, "--for=condition=complete", "job/exporter-now", "--timeout=120s"], None)
        .unwrap();
    assert!(
        waited.status.success(),
        "the Job completed: {}\n{}",
        String::from_utf8_lossy(&waited.stderr),
        installed.describe(ns)
    );
    let results = installed.wait_results(ns, "job-name=exporter-now", &app.container, (1, 1), ROLLOUT).await.unwrap();
    assert_sidecar_first(installed, ns, &results, &app.container);
    let (pod_name, lines) = &results[0];
    let (_, result) = &lines[0];
    assert!(result["identity"].as_str().unwrap().contains("assumed-role/"), "{result}");
    let shipper = installed.json_logs(ns, pod_name, "log-shipper").unwrap();
    assert_eq!(
        shipper.last().map(|(_, v)| v["ok"].clone()),
        Some(true.into()),
        "the log shipper got no AWS settings: {shipper:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_key_and_an_oauth2_api_through_the_agents_proxy() {
    let installed = installed();
    for (ns, which) in [("node-api-key", "api-key"), ("node-oauth2", "oauth2")] {
        installed.app_namespace(ns).await.unwrap();
        let mut direction = match which {
            "api-key" => HttpApiScenario::api_key(installed, ns).await.unwrap(),
            _ => HttpApiScenario::oauth2(installed, ns).await.unwrap(),
        };
        direction.apply(installed).await.unwrap();
        let app = direction.app.clone();
        deploy_and_check(installed, ns, &mut direction.example, &app, 1).await;
        assert!(direction.api.served() >= 1, "{which}: the API saw the agent's credential");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_policy_is_refused_at_the_agents_next_refresh() {
    let installed = installed();
    let ns = "node-revoked";
    installed.app_namespace(ns).await.unwrap();
    // Tokens of 30 s: the agent asks the broker again about 22 s after each fetch.
    let mut direction =
        HttpApiScenario::oauth2_with_token_lifetime(installed, ns, Duration::from_secs(30)).await.unwrap();
    direction.apply(installed).await.unwrap();
    let app = direction.app.clone();
    let results = deploy_and_check(installed, ns, &mut direction.example, &app, 1).await;
    let (pod_name, _) = &results[0];

    installed.cp().kubectl_ok(&["delete", "accesspolicy", &direction.policy, "-n", ns]).unwrap();
    let deleted_at = jiff::Timestamp::now();
    // The agent's next refresh is refused: it says so in its log, stops serving, and the
    // app's next call fails with the reason.
    let deadline = Instant::now() + Duration::from_secs(90);
    let refusal = loop {
        let log = installed.cp().kubectl_ok(&["logs", "-n", ns, pod_name, "-c", "cloudpass-agent"]).unwrap();
        if let Some(line) = log.lines().find(|l| l.contains("the broker refused this pod")) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no refusal in the agent's log:\n{log}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("agent: {refusal}");
    assert!(refusal.contains(&direction.policy), "the log names the policy: {refusal}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = installed.json_logs(ns, pod_name, &app.container).unwrap();
        if let Some((_, failed)) = lines.iter().find(|(at, v)| *at > deleted_at && v["ok"] == false) {
            eprintln!("app: {failed}");
            break;
        }
        assert!(Instant::now() < deadline, "the app kept succeeding: {lines:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The real UID and GID of every running agent on this host (`/proc/<pid>/status` of
/// the processes whose command is the agent without a subcommand).
fn agent_process_identities() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
        if args.len() != 1 || !args[0].ends_with(b"/cloudpass-agent") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .map(str::to_owned)
        };
        if let (Some(uid), Some(gid)) = (field("Uid:"), field("Gid:")) {
            found.push((uid, gid));
        }
    }
    found
}
