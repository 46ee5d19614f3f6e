//! cloudpass installed with its Helm chart on the test bed's real node, as a user installs
//! it: `helm install` with the chart's default images (built locally by `make images`
//! and imported into containerd under their published names), the operator and webhook
//! as Deployments whose pods the kubelet runs, the broker behind its Service.
//!
//! The only values set are the ones a cluster with private token endpoints sets too:
//! `operator.broker.upstreamCA`, the CA of the local cloud emulators and fakes, and
//! `operator.broker.allowPrivateUpstreams`, since they listen on the node IP. The
//! issuer is the chart's default, the broker's in-cluster URL; the cloud fakes on this
//! host reach it through the broker Service's address (see [`crate::net`]).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{
    Deployed, Example,
    example::{App, CLOUD_CA_CONFIGMAP},
};
use crate::{
    ControlPlane,
    certs::TestCa,
    cluster::{Cluster, NODE_IP},
    images::APPS_IMAGE_REPOSITORY,
    repo_root,
};

/// The release's namespace.
pub const NAMESPACE: &str = "cloudpass-system";
/// The release's name (the chart names its objects after it).
pub const RELEASE: &str = "cloudpass";
/// The broker's Service.
pub const BROKER_SERVICE: &str = "cloudpass-broker";

/// cloudpass installed on a [`Cluster`].
pub struct Installed<'a> {
    /// The cluster.
    pub cluster: &'a Cluster,
    /// How long `helm install --wait` took.
    pub install_time: Duration,
    cloud_ca: TestCa,
    issuer_url: String,
    broker_ca_pem: String,
}

impl<'a> Installed<'a> {
    /// Installs the chart on `cluster` and waits until its Deployments are available
    /// (through their real readiness probes), the broker's CA is published and the
    /// webhook's configuration carries its CA. The test bed's servers listen on the node
    /// IP from here on (pods reach the host only there).
    pub async fn install(cluster: &'a Cluster) -> Result<Self> {
        crate::net::listen_on(NODE_IP.into())?;
        let cp = &cluster.cp;
        let cloud_ca = TestCa::new("cloudpass-e2e-cloud-ca")?;
        cp.kubectl_ok(&["create", "namespace", NAMESPACE])?;
        create_ca_config_map(cp, NAMESPACE, &cloud_ca)?;
        let started = Instant::now();
        let out = cp
            .helm()
            .args(["install", RELEASE])
            .arg(repo_root().join("charts/cloudpass"))
            .args(["-n", NAMESPACE, "--wait", "--timeout=4m"])
            .args(["--set", &format!("operator.broker.upstreamCA.configMap={CLOUD_CA_CONFIGMAP}")])
            // The emulators and fakes listen on the node IP, a private address.
            .args(["--set", "operator.broker.allowPrivateUpstreams=true"])
            .output()?;
        if !out.status.success() {
            bail!("helm install failed: {}\n{}", String::from_utf8_lossy(&out.stderr), describe_pods(cp, NAMESPACE));
        }
        let install_time = started.elapsed();
        cp.invalidate_discovery_cache();
        let broker_ca_pem = wait_for_broker_ca(cp, Duration::from_secs(60)).await?;
        let cluster_ip =
            cp.kubectl_ok(&["get", "service", BROKER_SERVICE, "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"])?;
        let host = format!("{BROKER_SERVICE}.{NAMESPACE}.svc");
        crate::net::resolve_as(&host, cluster_ip.trim().parse().context("the broker Service's ClusterIP")?);
        Ok(Self { cluster, install_time, cloud_ca, issuer_url: format!("https://{host}:8443"), broker_ca_pem })
    }

    /// Creates namespace `name` opted in to injection, with the emulators' CA in the
    /// ConfigMap apps mount ([`CLOUD_CA_CONFIGMAP`]).
    pub async fn app_namespace(&self, name: &str) -> Result<()> {
        let cp = &self.cluster.cp;
        cp.create_namespace(name, &[(cloudpass_api::INJECTION_LABEL, cloudpass_api::INJECTION_ENABLED)]).await?;
        create_ca_config_map(cp, name, &self.cloud_ca)
    }

    /// Waits until Deployment `namespace/name` has rolled out (`kubectl rollout status`).
    pub fn wait_rollout(&self, namespace: &str, name: &str, timeout: Duration) -> Result<()> {
        let out = self.cluster.cp.kubectl_output(
            &[
                "rollout",
                "status",
                "-n",
                namespace,
                &format!("deployment/{name}"),
                &format!("--timeout={}s", timeout.as_secs()),
            ],
            None,
        )?;
        if !out.status.success() {
            bail!(
                "deployment {namespace}/{name} did not roll out: {}\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                describe_pods(&self.cluster.cp, namespace)
            );
        }
        Ok(())
    }

    /// The pods of `namespace` matching label selector `selector`, as JSON.
    pub fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<Value>> {
        let list: Value = serde_json::from_str(
            &self.cluster.cp.kubectl_ok(&["get", "pods", "-n", namespace, "-l", selector, "-o", "json"])?,
        )?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The JSON lines a container printed (`kubectl logs`), with the time the container
    /// runtime recorded each (`--timestamps`).
    pub fn json_logs(&self, namespace: &str, pod: &str, container: &str) -> Result<Vec<(jiff::Timestamp, Value)>> {
        let text = self.cluster.cp.kubectl_ok(&["logs", "-n", namespace, pod, "-c", container, "--timestamps"])?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let (at, rest) = line.split_once(' ')?;
                Some((at.parse().ok()?, serde_json::from_str(rest.trim()).ok()?))
            })
            .collect())
    }

    /// The test apps image (the unchanged SDK programs of the scenarios).
    pub fn apps_image(&self) -> Result<&str> {
        Ok(&self.cluster.image(APPS_IMAGE_REPOSITORY)?.name)
    }

    /// Applies `app`'s workload from `example`, made to run `app`'s program from the apps
    /// image (once, or every `every`), as `kubectl apply` does.
    pub fn deploy_app(&self, namespace: &str, example: &mut Example, app: &App, every: Option<Duration>) -> Result<()> {
        example.run_app_on_node(app, self.apps_image()?, every)?;
        self.cluster.cp.apply_yaml(Some(namespace), &example.workload_yaml(&app.workload)?).map(drop)
    }

    /// Waits until every pod of `namespace` matching `selector` (at least `pods` of them)
    /// has printed at least `results` JSON results (lines with an `ok` field) in
    /// `container`; returns them per pod name.
    pub async fn wait_results(
        &self,
        namespace: &str,
        selector: &str,
        container: &str,
        (pods, results): (usize, usize),
        timeout: Duration,
    ) -> Result<Vec<(String, Vec<(jiff::Timestamp, Value)>)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = Vec::new();
            for pod in self.pods(namespace, selector)? {
                let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let lines = self.json_logs(namespace, &name, container).unwrap_or_default();
                all.push((name, lines.into_iter().filter(|(_, v)| v.get("ok").is_some()).collect::<Vec<_>>()));
            }
            if all.len() >= pods && all.iter().all(|(_, lines)| lines.len() >= results) {
                return Ok(all);
            }
            if Instant::now() > deadline {
                bail!(
                    "no {results} results from {pods} pods ({selector}) in {timeout:?}: {all:?}\n{}",
                    self.describe(namespace)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The broker's audit records about pod `namespace/pod`, from every broker pod's
    /// log (`kubectl logs`): who was verified how, which credential, until when.
    pub fn audit_records(&self, namespace: &str, pod: &str) -> Result<Vec<Value>> {
        let text = self.cluster.cp.kubectl_ok(&[
            "logs",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=broker",
            "--tail=-1",
        ])?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "cloudpass.dev/audit" && v["namespace"] == namespace && v["pod"] == pod)
            .collect())
    }

    /// What `kubectl describe pods` says about `namespace`, for failure messages.
    pub fn describe(&self, namespace: &str) -> String {
        describe_pods(&self.cluster.cp, namespace)
    }
}

impl Deployed for Installed<'_> {
    fn cp(&self) -> &ControlPlane {
        &self.cluster.cp
    }

    fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    fn issuer_ca_pem(&self) -> String {
        self.broker_ca_pem.clone()
    }

    fn cloud_ca(&self) -> &TestCa {
        &self.cloud_ca
    }
}

fn create_ca_config_map(cp: &ControlPlane, namespace: &str, ca: &TestCa) -> Result<()> {
    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CLOUD_CA_CONFIGMAP, "namespace": namespace},
        "data": {"ca.crt": ca.cert_pem()},
    });
    cp.apply_yaml(Some(namespace), &manifest.to_string()).map(drop)
}

/// The broker CA bundle the operator publishes (`<release>-broker-ca`).
async fn wait_for_broker_ca(cp: &ControlPlane, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let name = format!("{BROKER_SERVICE}-ca");
        let out =
            cp.kubectl_output(&["get", "configmap", &name, "-n", NAMESPACE, "-o", "jsonpath={.data.ca\\.crt}"], None)?;
        let pem = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && pem.contains("BEGIN CERTIFICATE") {
            return Ok(pem);
        }
        if Instant::now() > deadline {
            bail!("the operator did not publish ConfigMap {name} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubectl describe pods` and the last log lines of every container of `namespace`,
/// for failure messages.
fn describe_pods(cp: &ControlPlane, namespace: &str) -> String {
    let run = |args: &[&str]| {
        let out = cp.kubectl_output(args, None).map(|o| o.stdout).unwrap_or_default();
        let text = String::from_utf8_lossy(&out).into_owned();
        let mut start = text.len().saturating_sub(6000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    };
    let describe = run(&["describe", "pods", "-n", namespace]);
    let names = run(&["get", "pods", "-n", namespace, "-o", "name"]);
    let mut logs = String::new();
    for pod in names.lines().take(4) {
        // The agent alone first: the app's containers may not have started.
        logs.push_str(&run(&["logs", "-n", namespace, pod, "-c", "cloudpass-agent", "--prefix", "--tail=15"]));
        logs.push_str(&run(&["logs", "-n", namespace, pod, "--all-containers", "--prefix", "--tail=15"]));
    }
    format!("{describe}\n---- logs ----\n{logs}")
}
