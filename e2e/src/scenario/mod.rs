//! End-to-end scenarios: the whole product, started from its real parts.
//!
//! A [`Stack`] is one control plane with the real `cloudpass-operator` (controller,
//! broker, issuer) and the real `cloudpass-webhook`, both started with the flags the Helm
//! chart uses and registered like the chart registers them. A scenario then does what a
//! user does: labels a namespace `cloudpass.dev/injection=enabled`, applies an example's
//! objects with `kubectl`, and creates a pod through the apiserver, which calls the
//! webhook. [`Node::run`] "runs" the stored pod without a kubelet: the agent process with
//! exactly the injected container's environment, and the app as a Python program using
//! the official SDKs with exactly its container's environment. Nothing the webhook should
//! inject is written by hand.
//!
//! The cloud side is local: moto (S3 with SigV4 enforced) behind the STS gate
//! ([`aws`]), Azurite with OAuth over TLS and the Entra fake ([`azure`]), and
//! fake-gcs-server behind a token-checking gate with the Google fake ([`gcs`]). All their
//! certificates come from the broker's test CA, which the broker trusts for upstream
//! calls and the "images" trust through [`Node::trust_bundle`].
//!
//! The agent's loopback ports are fixed by the webhook, so two injected pods cannot run
//! at once on this one "node": scenarios take [`exclusive`] first.

pub mod aws;
pub mod azure;
pub mod binaries;
pub mod example;
pub mod gcs;
pub mod http_api;
pub mod installed;
pub mod pod;
pub mod webhook;

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
pub use binaries::Binaries;
pub use example::Example;
pub use pod::{AdmittedPod, AppRun, InjectionSummary, Node, RunningPod};
use serde_json::{Value, json};
pub use webhook::RunningWebhook;

use crate::{
    ControlPlane,
    broker::{BrokerOptions, RunningBroker},
    certs::TestCa,
};

/// The operator's namespace (compiled configs, issuer keys, the webhook's registration
/// excludes it).
pub const SYSTEM_NAMESPACE: &str = "cloudpass-system";

/// Where cloudpass runs, as the scenarios' cloud side sees it: the control plane, the
/// issuer the clouds must trust, and the CA of the cloud fakes' certificates, which the
/// broker trusts for its upstream calls. [`Stack`] runs the binaries as processes;
/// [`installed::Installed`] is the Helm chart on a real node.
pub trait Deployed: Sync {
    /// The control plane.
    fn cp(&self) -> &ControlPlane;
    /// The issuer URL of every token the broker signs.
    fn issuer_url(&self) -> &str;
    /// The CA (PEM) of the issuer's HTTPS certificate, which the cloud fakes trust when
    /// they fetch its keys.
    fn issuer_ca_pem(&self) -> String;
    /// The CA that signs the cloud fakes' and emulators' certificates.
    fn cloud_ca(&self) -> &TestCa;

    /// Waits until AccessPolicy `namespace/name` is Ready.
    fn wait_policy_ready<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value>> + Send + 'a>> {
        Box::pin(self.cp().wait_for_condition(
            "accesspolicy",
            namespace,
            name,
            "Ready",
            "True",
            Duration::from_secs(30),
        ))
    }

    /// Applies `example`'s objects into `namespace` and waits until `policy` is Ready.
    fn apply_example<'a>(
        &'a self,
        namespace: &'a str,
        example: &'a Example,
        policy: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send + 'a>> {
        Box::pin(async move {
            let out = self.cp().apply_yaml(Some(namespace), &example.objects_yaml()?)?;
            self.wait_policy_ready(namespace, policy).await?;
            Ok(out)
        })
    }
}

/// The control plane with the operator (and its broker) and the webhook running.
pub struct Stack<'a> {
    /// The control plane.
    pub cp: &'a ControlPlane,
    /// The operator process, serving the broker and the issuer.
    pub broker: RunningBroker,
    /// The webhook process, registered with the apiserver.
    pub webhook: RunningWebhook,
    /// What runs pods.
    pub node: Node,
    /// The binaries under test.
    pub binaries: Binaries,
}

static SHARED: OnceLock<Result<Stack<'static>, String>> = OnceLock::new();

impl<'a> Stack<'a> {
    /// Starts the operator and the webhook on `cp`.
    pub async fn start(cp: &'a ControlPlane, binaries: Binaries) -> Result<Self> {
        let options = BrokerOptions { namespace: SYSTEM_NAMESPACE.into(), ..Default::default() };
        let broker = RunningBroker::start(cp, &binaries.operator, &options).await?;
        let webhook = RunningWebhook::start(cp, &binaries.webhook, &broker, SYSTEM_NAMESPACE).await?;
        let trust_bundle = cp.dir().join("scenario-trust-bundle.pem");
        std::fs::write(&trust_bundle, broker.ca.cert_pem())?;
        let node = Node {
            agent: binaries.agent.clone(),
            python: crate::python::interpreter()?,
            trust_bundle,
            metadata_url: None,
        };
        Ok(Self { cp, broker, webhook, node, binaries })
    }

    /// Creates namespace `name` labelled `cloudpass.dev/injection=enabled`.
    pub async fn opted_in_namespace(&self, name: &str) -> Result<()> {
        self.cp.create_namespace(name, &[(cloudpass_api::INJECTION_LABEL, cloudpass_api::INJECTION_ENABLED)]).await
    }

    /// Creates a pod through the apiserver (the webhook is called) and reads it back.
    /// With `expect_injection`, first waits (dry runs) until the webhook has loaded the
    /// namespace's policies, so that the pod is not created in the moment before.
    pub async fn create_pod(&self, namespace: &str, manifest: &Value, expect_injection: bool) -> Result<AdmittedPod> {
        if expect_injection {
            AdmittedPod::wait_until_injectable(self.cp, namespace, manifest, Duration::from_secs(30)).await?;
        }
        AdmittedPod::create(self.cp, namespace, manifest)
    }

    /// The broker's audit records about a pod.
    pub fn audit_records(&self, namespace: &str, pod: &str) -> Vec<Value> {
        self.broker.audit_records().into_iter().filter(|r| r["namespace"] == namespace && r["pod"] == pod).collect()
    }

    /// Asks the broker for `policy` exactly as the pod's agent does (its projected token,
    /// `{"policy": ...}`), returning status and body; for measuring what the agent's next
    /// refresh would get.
    pub async fn ask_as_agent(&self, pod: &RunningPod, policy: &str) -> Result<(u16, Value)> {
        let dir = pod.volume_dir("cloudpass-token").context("the pod has no cloudpass-token volume")?;
        let token = std::fs::read_to_string(dir.join(cloudpass_api::agent::TOKEN_FILE))?;
        self.broker.ask(Some(token.trim()), &json!({"policy": policy})).await
    }

    /// Polls [`Stack::ask_as_agent`] until the broker denies (403), returning the time
    /// that took and the denial.
    pub async fn wait_denied(&self, pod: &RunningPod, policy: &str, limit: Duration) -> Result<(Duration, Value)> {
        let started = Instant::now();
        loop {
            let (status, answer) = self.ask_as_agent(pod, policy).await?;
            if status == 403 {
                return Ok((started.elapsed(), answer));
            }
            if started.elapsed() > limit {
                bail!("still answered {status} {} after {limit:?}", answer["code"]);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Deployed for Stack<'_> {
    fn cp(&self) -> &ControlPlane {
        self.cp
    }

    fn issuer_url(&self) -> &str {
        &self.broker.url
    }

    fn issuer_ca_pem(&self) -> String {
        self.broker.ca.cert_pem()
    }

    fn cloud_ca(&self) -> &TestCa {
        &self.broker.ca
    }
}

impl Stack<'static> {
    /// The stack shared by every scenario of this test binary, on
    /// [`ControlPlane::shared`], started on first use. Panics if it cannot start.
    pub fn shared() -> &'static Stack<'static> {
        crate::start_once(&SHARED, "the cloudpass stack", || async {
            Stack::start(ControlPlane::shared(), Binaries::locate()?).await
        })
    }
}

/// Serialises scenarios that run injected pods: the agent's ports are fixed.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Directory of the installed emulators (`azurite-blob`, `fake-gcs-server`):
/// `$CLOUDPASS_EMULATORS_BIN`, else the cache that `e2e/tools/emulators.sh` fills. Fails
/// with the command to run if one is missing.
pub fn emulators_bin() -> Result<PathBuf> {
    let dir = match std::env::var_os("CLOUDPASS_EMULATORS_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = std::process::Command::new(crate::repo_root().join("e2e/tools/emulators.sh"))
                .arg("--print")
                .output()
                .context("running e2e/tools/emulators.sh --print")?;
            PathBuf::from(String::from_utf8(out.stdout)?.trim())
        }
    };
    for tool in ["azurite-blob", "fake-gcs-server"] {
        if !dir.join(tool).is_file() {
            bail!("{} is missing: run `make tools` (installs Azurite and fake-gcs-server)", dir.join(tool).display());
        }
    }
    Ok(dir)
}

/// The last `max` bytes of a file (on a character boundary).
pub fn file_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}
