//! The real `cloudpass-operator` binary with its broker on, for tests, benchmarks and
//! scenarios: serving HTTPS with a certificate of a test CA, trusting that CA for
//! upstream calls (so the cloud fakes, served with the same CA, are reachable), and
//! issuing as `https://127.0.0.1:<broker port>`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::{
    ControlPlane, TokenOptions,
    certs::TestCa,
    fakes::aws_sts::{AwsOidcProvider, AwsRoleTrust, StsGate, StsGateConfig},
    moto::MotoServer,
    process::{ManagedProcess, free_port},
};

/// A running operator with its broker.
pub struct RunningBroker {
    /// The process (logs and audit records go to [`RunningBroker::log_path`]).
    pub process: ManagedProcess,
    /// Broker and issuer URL, `https://127.0.0.1:<port>`.
    pub url: String,
    /// Health and metrics URL, `http://127.0.0.1:<port>`.
    pub metrics_url: String,
    /// CA of the broker's certificate; also trusted by the broker for upstream HTTPS.
    pub ca: TestCa,
    log: PathBuf,
}

/// Options of [`RunningBroker::start`].
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// The operator's namespace (compiled configs, Lease, issuer keys).
    pub namespace: String,
    /// `--token-cache-ttl`.
    pub token_cache_ttl: String,
    /// `--log-level`.
    pub log_level: String,
    /// `--allow-private-upstreams`: on by default, since the test bed's cloud fakes
    /// listen on loopback (or the node IP, a private address).
    pub allow_private_upstreams: bool,
    /// `--instance`, the leader-election identity; files and logs are kept apart per
    /// instance.
    pub instance: String,
    /// `--lease-name`; default: the operator's.
    pub lease_name: Option<String>,
    /// Further CA certificates (PEM) trusted for upstream HTTPS besides the broker's own
    /// test CA, e.g. another broker's, whose fakes this one must reach too.
    pub extra_upstream_ca_pem: Option<String>,
    /// `--verify-interval`; default `0s` (off): most suites name real cloud endpoints in
    /// providers they never use, which a check would call. The verification suite sets it.
    pub verify_interval: String,
    /// `--issuer-url`; default: this broker's own URL. A second replica of a broker names
    /// the first's, so that the clouds trust the tokens of both.
    pub issuer_url: Option<String>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            namespace: "cloudpass-system".into(),
            token_cache_ttl: "10s".into(),
            log_level: "info".into(),
            allow_private_upstreams: true,
            instance: "e2e".into(),
            lease_name: None,
            extra_upstream_ca_pem: None,
            issuer_url: None,
            verify_interval: "0s".into(),
        }
    }
}

impl RunningBroker {
    /// Starts `binary` (the `cloudpass-operator` under test) against `cp` as its admin and
    /// waits until `/readyz` passes.
    pub async fn start(cp: &ControlPlane, binary: &Path, options: &BrokerOptions) -> Result<Self> {
        Self::start_with(cp, binary, options, &[]).await
    }

    /// [`RunningBroker::start`] with extra flags.
    pub async fn start_with(
        cp: &ControlPlane,
        binary: &Path,
        options: &BrokerOptions,
        extra: &[String],
    ) -> Result<Self> {
        cp.install_crds().await?;
        cp.create_namespace(&options.namespace, &[]).await?;
        let ca = TestCa::new("cloudpass-broker-ca")?;
        let serving = ca.issue_server(&[])?;
        let dir = match options.instance.as_str() {
            "e2e" => cp.dir().join(format!("broker-{}", options.namespace)),
            instance => cp.dir().join(format!("broker-{}-{instance}", options.namespace)),
        };
        std::fs::create_dir_all(&dir)?;
        let write = |name: &str, text: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p.to_string_lossy().into_owned())
        };
        let (cert, key, ca_file) = (
            write("tls.crt", &serving.cert_pem)?,
            write("tls.key", &serving.key_pem)?,
            write("ca.crt", &(ca.cert_pem() + options.extra_upstream_ca_pem.as_deref().unwrap_or_default()))?,
        );
        let (broker_port, metrics_port) = (free_port()?, free_port()?);
        let url = format!("https://127.0.0.1:{broker_port}");
        let mut args: Vec<String> = [
            "--namespace",
            &options.namespace,
            "--instance",
            &options.instance,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--broker-addr",
            &format!("127.0.0.1:{broker_port}"),
            "--broker-tls-cert-file",
            &cert,
            "--broker-tls-key-file",
            &key,
            "--issuer-url",
            options.issuer_url.as_deref().unwrap_or(&url),
            "--upstream-ca-file",
            &ca_file,
            "--token-cache-ttl",
            &options.token_cache_ttl,
            "--lease-duration",
            "4",
            "--lease-renew-grace",
            "2",
            "--log-level",
            &options.log_level,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .collect();
        args.push(format!("--allow-private-upstreams={}", options.allow_private_upstreams));
        args.push(format!("--verify-interval={}", options.verify_interval));
        if let Some(lease) = &options.lease_name {
            args.push(format!("--lease-name={lease}"));
        }
        let log = dir.join("operator.log");
        let kubeconfig = cp.kubeconfig.to_string_lossy().into_owned();
        let process = ManagedProcess::spawn("operator", binary, &args, &log, &[("KUBECONFIG", &kubeconfig)])?;
        let http = client_trusting(&ca)?;
        let metrics_url = format!("http://127.0.0.1:{metrics_port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = http.get(format!("{metrics_url}/readyz")).send().await.map(|r| r.status().is_success());
            if ready.unwrap_or(false) {
                break;
            }
            if Instant::now() > deadline {
                bail!("operator not ready in 60 s:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self { process, url, metrics_url, ca, log })
    }

    /// Where the operator's output (logs and audit records) goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The operator's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its audit records so far.
    pub fn audit_records(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "cloudpass.dev/audit")
            .collect()
    }

    /// A new client trusting only [`RunningBroker::ca`]. New, because the broker outlives
    /// the tokio runtime of each test while a client's pooled connections do not: a
    /// shared client would hand a later test a connection of a dropped runtime.
    pub fn http(&self) -> reqwest::Client {
        client_trusting(&self.ca).expect("the test CA makes a client")
    }

    /// `POST /v1/credentials` with `token` as bearer; the status and JSON body.
    pub async fn ask(&self, token: Option<&str>, body: &Value) -> Result<(u16, Value)> {
        let mut req = self.http().post(format!("{}/v1/credentials", self.url)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Asks what the agent of the token's pod serves (`GET /v1/agent-config`); the
    /// status and body.
    pub async fn agent_config(&self, token: Option<&str>) -> Result<(u16, Value)> {
        let mut req = self.http().get(format!("{}{}", self.url, cloudpass_api::broker::AGENT_CONFIG_PATH));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self.http().get(format!("{}/metrics", self.metrics_url)).send().await?.text().await?)
    }

    /// An STS gate in front of `moto` that knows this broker's issuer as an IAM OIDC
    /// provider (client ID `sts.amazonaws.com`) and lets it assume `roles`; served with
    /// a certificate of this broker's CA, which the broker trusts upstream.
    pub async fn sts_gate(&self, moto: &MotoServer, roles: Vec<AwsRoleTrust>) -> Result<StsGate> {
        StsGate::start(
            StsGateConfig {
                moto_url: moto.url().to_owned(),
                providers: vec![AwsOidcProvider {
                    url: self.url.clone(),
                    client_ids: vec!["sts.amazonaws.com".into()],
                }],
                roles,
                issuer_ca_pem: self.ca.cert_pem(),
                forward_credentials: None,
            },
            &self.ca,
        )
        .await
    }
}

fn client_trusting(ca: &TestCa) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes())?])
        .build()?)
}

/// Creates a pod (stored, not run: there is no kubelet) running as `service_account`
/// and returns a token for the agent: audience `cloudpass`, bound to the pod.
pub async fn pod_token(
    cp: &ControlPlane,
    namespace: &str,
    pod: &str,
    service_account: &str,
    labels: Value,
) -> Result<String> {
    annotated_pod_token(cp, namespace, pod, service_account, labels, json!({})).await
}

/// [`pod_token`] of a pod with these annotations too.
pub async fn annotated_pod_token(
    cp: &ControlPlane,
    namespace: &str,
    pod: &str,
    service_account: &str,
    labels: Value,
    annotations: Value,
) -> Result<String> {
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"serviceAccountName": service_account, "automountServiceAccountToken": false,
                 "containers": [{"name": "app", "image": "example.com/app:1"}]}
    });
    cp.apply_yaml(Some(namespace), &manifest.to_string())?;
    let uid = cp.kubectl_ok(&["get", "pod", pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}"])?;
    let options = TokenOptions { bound_pod: Some((pod.to_owned(), uid)), ..Default::default() };
    cp.token(namespace, service_account, &options).await
}
