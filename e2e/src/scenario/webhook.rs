//! The real `cloudpass-webhook` process, started with the flags the Helm chart gives it
//! (certificate files, as with `certManager.enabled`, here from a [`TestCa`]) and
//! registered with the apiserver by URL, so that the real apiserver calls it.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use crate::{
    ControlPlane, WebhookRegistration,
    broker::RunningBroker,
    certs::TestCa,
    process::{ManagedProcess, free_port},
};

/// Name of the MutatingWebhookConfiguration (and of the chart's webhook objects).
pub const WEBHOOK_NAME: &str = "cloudpass-webhook";

/// A running, registered webhook. It can be stopped and started again on the same port
/// (the webhook-down scenario).
pub struct RunningWebhook {
    process: Mutex<Option<ManagedProcess>>,
    binary: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    kubeconfig: String,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// CA of the serving certificate (the `caBundle` of the registration).
    pub ca: TestCa,
    http: reqwest::Client,
}

impl RunningWebhook {
    /// Starts `binary` in `namespace` (the operator's, where the compiled configs are),
    /// pointing agents at `broker`, registers it for pod creation in namespaces labelled
    /// `cloudpass.dev/injection=enabled` (except kube-system and `namespace`) with
    /// `failurePolicy: Fail`, as the chart does, and waits until it is ready.
    pub async fn start(cp: &ControlPlane, binary: &Path, broker: &RunningBroker, namespace: &str) -> Result<Self> {
        Self::start_with(cp, binary, broker, namespace, &[]).await
    }

    /// Starts a webhook in `cp`, **another** cluster than the broker's (`broker_cp`): it
    /// reads the compiled configs of the broker's cluster (`--config-kubeconfig`, its
    /// `namespace`) and marks its agents as remote (`--remote-cluster`), so that they name
    /// their namespace to the broker.
    pub async fn start_remote(
        cp: &ControlPlane,
        binary: &Path,
        broker: &RunningBroker,
        broker_cp: &ControlPlane,
        namespace: &str,
    ) -> Result<Self> {
        let extra = [
            "--remote-cluster=true".to_owned(),
            format!("--config-kubeconfig={}", broker_cp.kubeconfig.display()),
            format!("--config-namespace={namespace}"),
        ];
        Self::start_with(cp, binary, broker, namespace, &extra).await
    }

    /// [`RunningWebhook::start`] with extra flags.
    pub async fn start_with(
        cp: &ControlPlane,
        binary: &Path,
        broker: &RunningBroker,
        namespace: &str,
        extra: &[String],
    ) -> Result<Self> {
        let dir = cp.dir().join("webhook");
        std::fs::create_dir_all(&dir)?;
        let ca = TestCa::new("cloudpass-webhook-ca")?;
        let serving = ca.issue_server(&[])?;
        let write = |name: &str, text: &str| -> Result<String> {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path.to_string_lossy().into_owned())
        };
        let cert = write("tls.crt", &serving.cert_pem)?;
        let key = write("tls.key", &serving.key_pem)?;
        // The chart mounts the ConfigMap the operator publishes; here the file holds the
        // test broker's CA directly.
        let broker_ca = write("broker-ca.crt", &broker.ca.cert_pem())?;
        let port = free_port()?;
        let args: Vec<String> = [
            format!("--namespace={namespace}"),
            format!("--listen-addr=127.0.0.1:{port}"),
            format!("--service-name={WEBHOOK_NAME}"),
            format!("--webhook-config-name={WEBHOOK_NAME}"),
            format!("--agent-image=ghcr.io/cloudpass-dev/cloudpass-agent:{}", env!("CARGO_PKG_VERSION")),
            "--agent-pull-policy=IfNotPresent".into(),
            format!("--broker-url={}", broker.url),
            format!("--broker-ca-file={broker_ca}"),
            "--cert-mode=files".into(),
            format!("--tls-cert-file={cert}"),
            format!("--tls-key-file={key}"),
            "--log-format=json".into(),
            "--log-level=info".into(),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes())?])
            .timeout(Duration::from_secs(5))
            // The webhook outlives each test's runtime; pooled connections would not.
            .pool_max_idle_per_host(0)
            .build()?;
        let webhook = Self {
            process: Mutex::new(None),
            binary: binary.to_path_buf(),
            args,
            log: dir.join("webhook.log"),
            kubeconfig: cp.kubeconfig.to_string_lossy().into_owned(),
            url: format!("https://127.0.0.1:{port}"),
            ca,
            http,
        };
        webhook.spawn()?;
        let url = format!("{}/mutate", webhook.url);
        let requirement = |key: &str, operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        cp.register_pod_webhook(&WebhookRegistration {
            name: WEBHOOK_NAME,
            url: &url,
            ca_pem: &webhook.ca.cert_pem(),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    requirement(cloudpass_api::INJECTION_LABEL, "In", &[cloudpass_api::INJECTION_ENABLED]),
                    requirement("kubernetes.io/metadata.name", "NotIn", &["kube-system", namespace]),
                ]),
                ..Default::default()
            }),
            failure_policy: "Fail",
        })
        .await?;
        webhook.wait_ready().await?;
        Ok(webhook)
    }

    fn spawn(&self) -> Result<()> {
        let process = ManagedProcess::spawn(
            "webhook",
            &self.binary,
            &self.args,
            &self.log,
            &[("KUBECONFIG", self.kubeconfig.as_str())],
        )?;
        *self.process.lock().expect("webhook lock") = Some(process);
        Ok(())
    }

    /// Waits until `/readyz` answers 200 (certificate loaded, broker CA read).
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.http.get(format!("{}/readyz", self.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("webhook not ready in 30 s; log tail:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the process (the registration stays: the apiserver then fails to call it).
    pub fn stop(&self) {
        if let Some(mut process) = self.process.lock().expect("webhook lock").take() {
            process.stop();
        }
    }

    /// Starts the process again with the same flags and port, and waits until ready.
    pub async fn restart(&self) -> Result<()> {
        self.stop();
        self.spawn()?;
        self.wait_ready().await
    }

    /// Process ID of the running webhook, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.lock().expect("webhook lock").as_ref().and_then(ManagedProcess::pid)
    }

    /// Where the webhook logs.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last part of its log.
    pub fn log_tail(&self) -> String {
        super::file_tail(&self.log, 4000)
    }
}
