//! A real Kubernetes control plane on loopback: etcd and kube-apiserver, built by
//! `make tools`, with RBAC, service-account token signing and admission webhooks on.
//!
//! There is no controller-manager, scheduler or kubelet: objects are admitted and stored,
//! not run. Service accounts are created by the helpers (the `ServiceAccount` admission
//! plugin is on, as in a real cluster, so a pod needs its service account to exist).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use k8s_openapi::{
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
        },
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::Value;
use tempfile::TempDir;

use crate::{
    certs::{CertPair, TestCa},
    process::{ManagedProcess, free_port},
    tools_bin,
};

/// A running etcd + kube-apiserver pair and everything needed to talk to it.
pub struct ControlPlane {
    // Field order is drop order: stop the apiserver before etcd, then delete the files.
    apiserver: Mutex<ManagedProcess>,
    etcd: Mutex<ManagedProcess>,
    dir: PlaneDir,
    /// The CA of the apiserver's serving certificate and of every client certificate it
    /// accepts (also the kubelet's, on a node cluster).
    pub ca: TestCa,
    /// The service-account signing key (PEM), which a controller-manager also needs.
    pub sa_key_file: PathBuf,
    /// `https://127.0.0.1:<port>` (`https://<node IP>:<port>` on a node cluster).
    pub server: String,
    /// The apiserver's CA certificate, PEM.
    pub ca_pem: String,
    /// Path of a kubeconfig with cluster-admin rights, for `kubectl`, `helm` and clients.
    pub kubeconfig: PathBuf,
    /// Issuer of service-account tokens (`iss` claim).
    pub issuer: String,
}

/// Options of a TokenRequest.
#[derive(Clone, Debug)]
pub struct TokenOptions {
    /// Audiences (`aud`); the apiserver's issuer is used when empty.
    pub audiences: Vec<String>,
    /// Requested lifetime; the apiserver enforces at least 10 minutes.
    pub expiration_seconds: i64,
    /// Bind the token to this pod (name, uid): it stops validating when the pod is deleted.
    pub bound_pod: Option<(String, String)>,
}

impl Default for TokenOptions {
    fn default() -> Self {
        Self { audiences: vec![cloudpass_api::BROKER_AUDIENCE.to_owned()], expiration_seconds: 3600, bound_pod: None }
    }
}

/// How to start a control plane: the defaults are an apiserver on loopback for suites
/// that need no node; [`crate::cluster::Cluster`] sets the rest.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Address the apiserver binds and advertises (the `kubernetes` Service's endpoint).
    pub address: std::net::IpAddr,
    /// Directory for its files; a fresh temporary directory (deleted after the test
    /// process exits) when `None`.
    pub dir: Option<PathBuf>,
    /// The Service IP range.
    pub service_cidr: String,
    /// Further names and addresses of the apiserver's serving certificate.
    pub extra_sans: Vec<String>,
    /// Further apiserver flags; a flag given here replaces a default of the same name.
    pub extra_args: Vec<String>,
    /// Give the apiserver a client certificate for kubelets (logs, exec) and make it
    /// verify their serving certificates with this control plane's CA.
    pub kubelet_client: bool,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            dir: None,
            service_cidr: "10.0.0.0/24".into(),
            extra_sans: Vec::new(),
            extra_args: Vec::new(),
            kubelet_client: false,
        }
    }
}

/// The control plane's directory: a temporary one, or one its owner manages.
enum PlaneDir {
    Temporary {
        dir: TempDir,
        // A shared control plane is never dropped; this watchdog deletes its files once
        // the test process has exited (see crate::process for the pipe mechanism).
        _cleanup: DirCleanup,
    },
    Owned(PathBuf),
}

impl PlaneDir {
    fn path(&self) -> &Path {
        match self {
            Self::Temporary { dir, .. } => dir.path(),
            Self::Owned(path) => path,
        }
    }
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use.
    /// It lives until the test process exits (its processes are tied to it, see
    /// [`crate::process`]). Panics with the startup error and logs if it cannot start.
    pub fn shared() -> &'static ControlPlane {
        crate::start_once(&SHARED, "the local control plane", Self::start)
    }

    /// Starts a new control plane (prefer [`ControlPlane::shared`]; one per test binary).
    pub async fn start() -> Result<Self> {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    /// Starts a new control plane as `options` say.
    pub async fn start_with(options: ControlPlaneOptions) -> Result<Self> {
        let started = Instant::now();
        let bin = tools_bin()?;
        let dir = match &options.dir {
            Some(path) => {
                fs::create_dir_all(path)?;
                PlaneDir::Owned(path.clone())
            }
            None => {
                let dir = tempfile::Builder::new().prefix("cloudpass-cp-").tempdir()?;
                let cleanup = DirCleanup::spawn(dir.path())?;
                PlaneDir::Temporary { dir, _cleanup: cleanup }
            }
        };
        let path = dir.path().to_path_buf();
        let address = options.address;

        let ca = TestCa::new("cloudpass-e2e-ca")?;
        let mut names: Vec<String> = vec![address.to_string()];
        names.extend(options.extra_sans.iter().cloned());
        let serving = ca.issue_server(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
        let admin = ca.issue_client("cloudpass-e2e-admin", &["system:masters"])?;
        let sa_key = rcgen::KeyPair::generate()?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let p = path.join(name);
            fs::write(&p, text)?;
            Ok(p)
        };
        let ca_file = write("ca.crt", &ca.cert_pem())?;
        let serving_cert = write("apiserver.crt", &serving.cert_pem)?;
        let serving_key = write("apiserver.key", &serving.key_pem)?;
        let sa_key_file = write("sa.key", &sa_key.serialize_pem())?;
        let sa_pub_file = write("sa.pub", &sa_key.public_key_pem())?;

        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = ManagedProcess::spawn(
            "etcd",
            &bin.join("etcd"),
            &[
                format!("--data-dir={}", path.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--name=default".into(),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &path.join("etcd.log"),
            &[],
        )?;
        let server = format!("https://{}:{api_port}", host_in_url(address));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        etcd.wait_until("etcd /health", Duration::from_secs(30), || {
            let http = http.clone();
            let url = format!("{etcd_url}/health");
            async move { http.get(url).send().await.map(|r| r.status().is_success()).unwrap_or(false) }
        })
        .await?;

        let issuer = server.clone();
        let mut defaults = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", path.join("certs").display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", ca_file.display()),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-issuer={issuer}"),
            format!("--service-account-key-file={}", sa_pub_file.display()),
            format!("--service-account-signing-key-file={}", sa_key_file.display()),
            format!("--service-cluster-ip-range={}", options.service_cidr),
            "--allow-privileged=true".into(),
            "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ServiceAccount".into(),
            "--endpoint-reconciler-type=none".into(),
            "--v=1".into(),
        ];
        if options.kubelet_client {
            let client = ca.issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
            defaults.extend([
                format!("--kubelet-client-certificate={}", write("kubelet-client.crt", &client.cert_pem)?.display()),
                format!("--kubelet-client-key={}", write("kubelet-client.key", &client.key_pem)?.display()),
                format!("--kubelet-certificate-authority={}", ca_file.display()),
            ]);
        }
        let mut apiserver = ManagedProcess::spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &merge_flags(&defaults, &options.extra_args),
            &path.join("kube-apiserver.log"),
            &[],
        )?;

        let identity = reqwest::Identity::from_pem(format!("{}{}", admin.cert_pem, admin.key_pem).as_bytes())?;
        let admin_http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes())?)
            .identity(identity)
            .timeout(Duration::from_secs(2))
            .build()?;
        apiserver
            .wait_until("kube-apiserver /readyz", Duration::from_secs(60), || {
                let http = admin_http.clone();
                let url = format!("{server}/readyz");
                async move { http.get(url).send().await.map(|r| r.status().is_success()).unwrap_or(false) }
            })
            .await?;

        let kubeconfig = path.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_yaml(&server, &ca.cert_pem(), &admin))?;
        let plane = Self {
            apiserver: Mutex::new(apiserver),
            etcd: Mutex::new(etcd),
            dir,
            server,
            ca_pem: ca.cert_pem(),
            ca,
            sa_key_file,
            kubeconfig,
            issuer,
        };
        plane.bootstrap().await?;
        eprintln!(
            "control plane ready at {} in {:.1}s (files: {})",
            plane.server,
            started.elapsed().as_secs_f64(),
            plane.dir.path().display()
        );
        Ok(plane)
    }

    /// Lets anonymous clients read the issuer discovery document and JWKS, as public
    /// clouds require of an OIDC issuer (the cloud-side fakes fetch them this way).
    async fn bootstrap(&self) -> Result<()> {
        let client = self.client().await?;
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some("cloudpass-e2e:anonymous-issuer-discovery".into()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: "system:service-account-issuer-discovery".into(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Group".into(),
                name: "system:unauthenticated".into(),
                ..Default::default()
            }]),
        };
        create_or_keep(&Api::<ClusterRoleBinding>::all(client), &binding).await
    }

    /// A new client with cluster-admin rights, bound to the calling async runtime.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Directory holding this control plane's files and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process IDs of etcd and kube-apiserver.
    pub fn pids(&self) -> Vec<u32> {
        [&self.etcd, &self.apiserver].iter().filter_map(|p| p.lock().ok()?.pid()).collect()
    }

    /// The tails of the etcd and apiserver logs.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for p in [&self.etcd, &self.apiserver] {
            if let Ok(p) = p.lock() {
                out.push_str(&format!("---- {} ({}) ----\n{}\n", p.name(), p.log_path().display(), p.log_tail(6000)));
            }
        }
        out
    }

    /// A guard that prints the control plane's logs if the test panics while it lives.
    pub fn logs_on_panic(&self) -> LogsOnPanic<'_> {
        LogsOnPanic(self)
    }

    /// `kubectl` against this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(tools_bin().expect("tools built").join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).arg("--cache-dir").arg(self.kubectl_cache_dir());
        cmd
    }

    fn kubectl_cache_dir(&self) -> PathBuf {
        self.dir().join("kubectl-cache")
    }

    /// Forgets kubectl's cached API discovery, e.g. after installing CRDs, so that
    /// `kubectl explain` and `kubectl get <short name>` see the new resources.
    pub fn invalidate_discovery_cache(&self) {
        let _ = fs::remove_dir_all(self.kubectl_cache_dir());
    }

    /// `helm` against this control plane, with its caches inside the control plane's dir.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(tools_bin().expect("tools built").join("helm"));
        let home = self.dir().join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Runs `kubectl args...` with `stdin`, returning its output whatever the exit code.
    pub fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        run_with_stdin(self.kubectl().args(args), stdin)
    }

    /// Runs `kubectl args...` and returns stdout; fails with stderr on a non-zero exit.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(args, None)?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Server-side applies YAML (one or more documents) into `namespace`.
    pub fn apply_yaml(&self, namespace: Option<&str>, yaml: &str) -> Result<String> {
        let mut args = vec!["apply", "--server-side", "--field-manager=cloudpass-e2e", "-f", "-"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let out = self.kubectl_output(&args, Some(yaml))?;
        if !out.status.success() {
            bail!("kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Server-side applies a file or a directory of YAML files.
    pub fn apply_path(&self, namespace: Option<&str>, path: &Path) -> Result<String> {
        let path = path.to_string_lossy();
        let mut args = vec!["apply", "--server-side", "--field-manager=cloudpass-e2e", "-f", &path];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.kubectl_ok(&args)
    }

    /// Installs the CRDs from `crds/` and waits until they are Established **and** listed
    /// by API discovery (which the apiserver updates a moment after Established), so
    /// that `kubectl explain`, short names and clients see them right away.
    pub async fn install_crds(&self) -> Result<()> {
        self.apply_path(None, &crate::repo_root().join("crds"))?;
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/trustproviders.cloudpass.dev",
            "crd/credentialproviders.cloudpass.dev",
            "crd/accesspolicies.cloudpass.dev",
        ])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.invalidate_discovery_cache();
            let listed =
                self.kubectl_ok(&["api-resources", "--api-group=cloudpass.dev", "-o", "name"]).unwrap_or_default();
            let kinds = ["trustproviders", "credentialproviders", "accesspolicies"];
            // Discovery and the OpenAPI document (what `kubectl explain` and
            // `--validate=strict` read) are published separately; wait for both.
            if kinds.iter().all(|r| listed.contains(r))
                && kinds.iter().all(|r| self.kubectl_ok(&["explain", &format!("{r}.spec")]).is_ok())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cloudpass CRDs never appeared in API discovery and OpenAPI; listed: {listed}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a namespace with labels, and its `default` service account (there is no
    /// controller-manager to do it).
    pub async fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let client = self.client().await?;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Default::default()
        };
        create_or_keep(&Api::<Namespace>::all(client), &ns).await?;
        self.create_service_account(name, "default").await
    }

    /// Creates a service account (no error if it exists).
    pub async fn create_service_account(&self, namespace: &str, name: &str) -> Result<()> {
        let client = self.client().await?;
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        };
        create_or_keep(&Api::<ServiceAccount>::namespaced(client, namespace), &sa).await
    }

    /// Mints a service-account token with the TokenRequest API.
    pub async fn token(&self, namespace: &str, service_account: &str, options: &TokenOptions) -> Result<String> {
        let client = self.client().await?;
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: Some(TokenRequestSpec {
                audiences: Some(options.audiences.clone()),
                expiration_seconds: Some(options.expiration_seconds),
                bound_object_ref: options.bound_pod.as_ref().map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.clone()),
                    uid: Some(uid.clone()),
                }),
                ..Default::default()
            }),
            status: None,
        };
        let api = Api::<ServiceAccount>::namespaced(client, namespace);
        let answer = api.create_token_request(service_account, &PostParams::default(), &request).await?;
        answer.status.and_then(|s| s.token).ok_or_else(|| anyhow!("TokenRequest answered without a token"))
    }

    /// Writes a kubeconfig that authenticates as a service account (a TokenRequest token
    /// valid for an hour), to run a component with exactly the rights its RBAC grants.
    pub async fn kubeconfig_for(&self, namespace: &str, service_account: &str) -> Result<PathBuf> {
        let options = TokenOptions { audiences: vec![], expiration_seconds: 3600, bound_pod: None };
        let token = self.token(namespace, service_account, &options).await?;
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cloudpass-e2e", "cluster": {"server": self.server, "certificate-authority-data": B64.encode(&self.ca_pem)}}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "cloudpass-e2e", "user": service_account, "namespace": namespace}}],
            "current-context": "sa",
        });
        let path = self.dir().join(format!("kubeconfig-{namespace}-{service_account}"));
        fs::write(&path, serde_yaml::to_string(&doc)?)?;
        Ok(path)
    }

    /// Writes a kubeconfig that authenticates with a new client certificate of this
    /// control plane's CA for user `common_name` in `groups` (how the kubelet, kube-proxy
    /// and the scheduler authenticate), named `kubeconfig-<file_name>`.
    pub fn kubeconfig_for_user(&self, file_name: &str, common_name: &str, groups: &[&str]) -> Result<PathBuf> {
        let pair = self.ca.issue_client(common_name, groups)?;
        let path = self.dir().join(format!("kubeconfig-{file_name}"));
        fs::write(&path, kubeconfig_yaml(&self.server, &self.ca_pem, &pair))?;
        Ok(path)
    }

    /// The issuer's discovery document and JWKS, fetched anonymously over HTTPS as a
    /// cloud would.
    pub async fn issuer_documents(&self) -> Result<(Value, Value)> {
        let http = self.anonymous_http()?;
        let discovery: Value = http
            .get(format!("{}/.well-known/openid-configuration", self.server))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let jwks_uri = discovery["jwks_uri"].as_str().ok_or_else(|| anyhow!("discovery without jwks_uri"))?;
        let jwks: Value = http.get(jwks_uri).send().await?.error_for_status()?.json().await?;
        Ok((discovery, jwks))
    }

    /// An HTTP client that trusts the apiserver's CA but presents no credentials.
    pub fn anonymous_http(&self) -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    /// Registers (or replaces) a mutating webhook for pod creation, called by URL.
    pub async fn register_pod_webhook(&self, registration: &WebhookRegistration<'_>) -> Result<()> {
        let client = self.client().await?;
        let config = MutatingWebhookConfiguration {
            metadata: ObjectMeta { name: Some(registration.name.into()), ..Default::default() },
            webhooks: Some(vec![MutatingWebhook {
                name: format!("{}.cloudpass.dev", registration.name),
                admission_review_versions: vec!["v1".into()],
                client_config: WebhookClientConfig {
                    url: Some(registration.url.into()),
                    ca_bundle: Some(k8s_openapi::ByteString(registration.ca_pem.as_bytes().to_vec())),
                    service: None,
                },
                rules: Some(vec![RuleWithOperations {
                    api_groups: Some(vec!["".into()]),
                    api_versions: Some(vec!["v1".into()]),
                    operations: Some(vec!["CREATE".into()]),
                    resources: Some(vec!["pods".into()]),
                    scope: Some("Namespaced".into()),
                }]),
                namespace_selector: registration.namespace_selector.clone(),
                side_effects: "None".into(),
                failure_policy: Some(registration.failure_policy.into()),
                reinvocation_policy: Some("IfNeeded".into()),
                timeout_seconds: Some(5),
                ..Default::default()
            }]),
        };
        let api = Api::<MutatingWebhookConfiguration>::all(client);
        let _ = api.delete(registration.name, &DeleteParams::default()).await;
        api.create(&PostParams::default(), &config).await?;
        Ok(())
    }

    /// Polls `kubectl get <resource> <name> -n <ns>` until condition `type_` has `status`,
    /// returning the object's JSON.
    pub async fn wait_for_condition(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        type_: &str,
        status: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok(text) = self.kubectl_ok(&["get", resource, name, "-n", namespace, "-o", "json"]) {
                last = serde_json::from_str(&text)?;
                let found = last["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == type_ && c["status"] == status);
                if found {
                    return Ok(last);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("{resource} {namespace}/{name}: condition {type_}={status} not reached in {timeout:?}; last seen: {last}")
    }
}

/// `defaults` with every flag of `overrides` replacing the default of the same name
/// (`--name=value` flags), overrides appended in order.
fn merge_flags(defaults: &[String], overrides: &[String]) -> Vec<String> {
    let name = |flag: &str| flag.split_once('=').map_or(flag, |(n, _)| n).to_owned();
    let overridden: Vec<String> = overrides.iter().map(|f| name(f)).collect();
    defaults.iter().filter(|f| !overridden.contains(&name(f))).chain(overrides).cloned().collect()
}

/// An IP address as the host part of a URL (IPv6 in brackets).
pub fn host_in_url(address: std::net::IpAddr) -> String {
    match address {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Deletes a directory after the test process exits (stdin pipe closes).
struct DirCleanup {
    _child: std::process::Child,
}

impl DirCleanup {
    fn spawn(dir: &Path) -> Result<Self> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"cat >/dev/null; sleep 7; rm -rf "$1""#)
            .arg("cloudpass-e2e-cleanup")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { _child: child })
    }
}

/// Where and how the apiserver calls a test webhook.
pub struct WebhookRegistration<'a> {
    /// Name of the MutatingWebhookConfiguration.
    pub name: &'a str,
    /// HTTPS URL the apiserver posts AdmissionReviews to.
    pub url: &'a str,
    /// CA that signed the webhook's serving certificate.
    pub ca_pem: &'a str,
    /// Namespaces the webhook applies to (`None`: all).
    pub namespace_selector: Option<LabelSelector>,
    /// `Fail` or `Ignore`.
    pub failure_policy: &'a str,
}

/// Prints the control plane's logs when dropped during a panic.
pub struct LogsOnPanic<'a>(&'a ControlPlane);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; control plane logs:\n{}", self.0.log_tails());
        }
    }
}

async fn create_or_keep<K>(api: &Api<K>, object: &K) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn run_with_stdin(cmd: &mut Command, stdin: Option<&str>) -> Result<Output> {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    if let Some(text) = stdin {
        child.stdin.take().expect("piped").write_all(text.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, admin: &CertPair) -> String {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cloudpass-e2e", "cluster": {"server": server, "certificate-authority-data": B64.encode(ca_pem)}}],
        "users": [{"name": "admin", "user": {
            "client-certificate-data": B64.encode(&admin.cert_pem),
            "client-key-data": B64.encode(&admin.key_pem),
        }}],
        "contexts": [{"name": "cloudpass-e2e", "context": {"cluster": "cloudpass-e2e", "user": "admin"}}],
        "current-context": "cloudpass-e2e",
    });
    serde_yaml::to_string(&doc).expect("kubeconfig serializes")
}

/// Labels as a `BTreeMap`, for selectors.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}
