//! Pods through the real apiserver, and "running" them without a kubelet.
//!
//! [`AdmittedPod::create`] submits a pod with `kubectl` (the apiserver calls the webhook)
//! and reads the stored pod back. [`Node::run`] then does what a kubelet would with the
//! stored spec, and nothing else: it mints the projected service-account tokens with
//! TokenRequest (audience, lifetime and pod binding as the volume says), gives every volume
//! a host folder, starts the injected agent container as a process with exactly its
//! environment and arguments, runs its postStart hook, and runs app containers as Python
//! programs with exactly their environment. The only changes are paths under volume mounts
//! (moved to the host folders, for the agent through its `--token-file`/`--broker-ca-file`/
//! `--shared-dir` flags and in its configuration) and the machine's own settings an app's container image
//! would carry: `PATH`, `HOME` and a CA bundle holding the test bed's CA (`SSL_CERT_FILE`,
//! `REQUESTS_CA_BUNDLE`). The agent gets no such bundle: its image has the system roots.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use cloudpass_api::agent::{
    AGENT_CONFIG_ENV, AGENT_CONTAINER, AgentConfig, BROKER_CA_FILE, SERVER_CA_DIR, SHARED_DIR, TOKEN_DIR, TOKEN_FILE,
};
use serde_json::Value;
use tempfile::TempDir;

use crate::{ControlPlane, TokenOptions, process::ManagedProcess};

/// A pod as the apiserver stored it, after the admission webhooks.
#[derive(Clone, Debug)]
pub struct AdmittedPod {
    /// Namespace.
    pub namespace: String,
    /// Name (generated when the manifest has `generateName`).
    pub name: String,
    /// UID.
    pub uid: String,
    /// The manifest as submitted.
    pub submitted: Value,
    /// The pod as stored (read back from the apiserver).
    pub stored: Value,
    /// Warnings of the admission (what `kubectl` printed as `Warning: ...`).
    pub warnings: Vec<String>,
}

impl AdmittedPod {
    /// Creates `manifest` in `namespace` with `kubectl create` and reads the stored pod
    /// back. Fails with kubectl's message when the apiserver refuses the pod.
    pub fn create(cp: &ControlPlane, namespace: &str, manifest: &Value) -> Result<Self> {
        let out =
            cp.kubectl_output(&["create", "-n", namespace, "-o", "json", "-f", "-"], Some(&manifest.to_string()))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!("the apiserver refused the pod: {}", stderr.trim());
        }
        let created: Value = serde_json::from_slice(&out.stdout)?;
        let name = created["metadata"]["name"].as_str().context("created pod has no name")?.to_owned();
        let stored: Value =
            serde_json::from_str(&cp.kubectl_ok(&["get", "pod", &name, "-n", namespace, "-o", "json"])?)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            uid: stored["metadata"]["uid"].as_str().context("stored pod has no uid")?.to_owned(),
            name,
            submitted: manifest.clone(),
            stored,
            warnings: warnings(&stderr),
        })
    }

    /// A pod as the apiserver stored it (e.g. one a ReplicaSet created on a real node,
    /// read with `kubectl get pod -o json`), created from `submitted` (its controller's pod
    /// template, as a Pod).
    pub fn from_stored(stored: Value, submitted: Value) -> Result<Self> {
        let field = |name: &str| -> Result<String> {
            stored["metadata"][name].as_str().map(str::to_owned).with_context(|| format!("stored pod without {name}"))
        };
        Ok(Self {
            namespace: field("namespace")?,
            name: field("name")?,
            uid: field("uid")?,
            submitted,
            stored,
            warnings: Vec::new(),
        })
    }

    /// Submits `manifest` as a server-side dry run (admission runs, nothing is stored)
    /// until the webhook injects the agent: the apiserver and the webhook pick up new
    /// configurations and policies a moment after they are written.
    pub async fn wait_until_injectable(
        cp: &ControlPlane,
        namespace: &str,
        manifest: &Value,
        timeout: Duration,
    ) -> Result<()> {
        Self::wait_until_serving(cp, namespace, manifest, &[], timeout).await
    }

    /// [`AdmittedPod::wait_until_injectable`], until the injection serves every one of
    /// `policies` too (policies applied together reach the webhook one by one).
    pub async fn wait_until_serving(
        cp: &ControlPlane,
        namespace: &str,
        manifest: &Value,
        policies: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = cp.kubectl_output(
                &["create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-"],
                Some(&manifest.to_string()),
            )?;
            if out.status.success() {
                let pod: Value = serde_json::from_slice(&out.stdout)?;
                let served = pod["metadata"]["annotations"][cloudpass_api::agent::POLICIES_ANNOTATION]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .collect::<Vec<_>>();
                if agent_of(&pod).is_some() && policies.iter().all(|p| served.contains(p)) {
                    return Ok(());
                }
                let last = format!(
                    "injected {}, serving {served:?} of {policies:?}; warnings: {:?}",
                    agent_of(&pod).is_some(),
                    warnings(&String::from_utf8_lossy(&out.stderr))
                );
                if Instant::now() > deadline {
                    bail!("the webhook did not serve the pod within {timeout:?}: {last}");
                }
            } else if Instant::now() > deadline {
                bail!(
                    "the webhook did not inject the pod within {timeout:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the webhook injected the agent.
    pub fn is_injected(&self) -> bool {
        self.agent().is_some()
    }

    /// The injected agent container (an init container with `restartPolicy: Always`).
    pub fn agent(&self) -> Option<&Value> {
        agent_of(&self.stored)
    }

    /// The agent's configuration as the webhook wrote it (the defaults where it wrote
    /// none), or `None` without an agent.
    pub fn agent_config(&self) -> Option<Result<AgentConfig>> {
        let agent = self.agent()?;
        let env = agent["env"].as_array().into_iter().flatten();
        Some(match env.into_iter().find(|e| e["name"] == AGENT_CONFIG_ENV) {
            None => Ok(AgentConfig::default()),
            Some(e) => serde_json::from_str(e["value"].as_str().unwrap_or_default())
                .context("the agent's configuration is not an AgentConfig"),
        })
    }

    /// The service account the pod runs as.
    pub fn service_account(&self) -> &str {
        self.stored["spec"]["serviceAccountName"].as_str().unwrap_or("default")
    }

    /// An annotation of the stored pod.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.stored["metadata"]["annotations"][key].as_str()
    }

    /// The stored (app) containers.
    pub fn containers(&self) -> Vec<&Value> {
        self.stored["spec"]["containers"].as_array().map(|c| c.iter().collect()).unwrap_or_default()
    }

    /// What admission changed, in words a person reads: containers, volumes and the
    /// environment variable names added to each app container (values are not shown: some
    /// are secrets).
    pub fn injection_summary(&self) -> InjectionSummary {
        let names = |pod: &Value, field: &str| -> Vec<String> {
            pod["spec"][field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["name"].as_str())
                .map(str::to_owned)
                .collect()
        };
        let added = |field: &str| -> Vec<String> {
            let before = names(&self.submitted, field);
            names(&self.stored, field).into_iter().filter(|n| !before.contains(n)).collect()
        };
        let mut env_added = BTreeMap::new();
        for container in self.containers() {
            let name = container["name"].as_str().unwrap_or_default().to_owned();
            let submitted = self.submitted["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["name"] == name.as_str())
                .cloned()
                .unwrap_or(Value::Null);
            let before: Vec<&str> =
                submitted["env"].as_array().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();
            let new: Vec<String> = container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["name"].as_str())
                .filter(|n| !before.contains(n))
                .map(str::to_owned)
                .collect();
            env_added.insert(name, new);
        }
        let agent_env = self
            .agent()
            .map(|a| {
                a["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["name"].as_str())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        InjectionSummary {
            init_containers: added("initContainers"),
            // The ServiceAccount admission plugin adds the API token volume, not cloudpass.
            volumes: added("volumes").into_iter().filter(|v| !v.starts_with("kube-api-access-")).collect(),
            agent_image: self.agent().and_then(|a| a["image"].as_str()).map(str::to_owned),
            agent_env,
            env_added,
            policies: self.annotation(cloudpass_api::agent::POLICIES_ANNOTATION).map(str::to_owned),
        }
    }
}

/// What the webhook added to a pod (names only).
#[derive(Clone, Debug, Default)]
pub struct InjectionSummary {
    /// Init containers added (the agent, as a native sidecar).
    pub init_containers: Vec<String>,
    /// Volumes the webhook added.
    pub volumes: Vec<String>,
    /// The agent's image.
    pub agent_image: Option<String>,
    /// Names of the agent's environment variables.
    pub agent_env: Vec<String>,
    /// Per app container, the names of the environment variables added.
    pub env_added: BTreeMap<String, Vec<String>>,
    /// The `cloudpass.dev/policies` annotation: the policies served.
    pub policies: Option<String>,
}

fn agent_of(pod: &Value) -> Option<&Value> {
    pod["spec"]["initContainers"].as_array()?.iter().find(|c| c["name"] == AGENT_CONTAINER)
}

fn warnings(stderr: &str) -> Vec<String> {
    stderr.lines().filter_map(|l| l.strip_prefix("Warning: ")).map(str::to_owned).collect()
}

/// What the node provides to run pods: the binary inside the agent image, the Python
/// with the SDKs inside the app images, and the CA bundle of the images' trust stores.
#[derive(Clone, Debug)]
pub struct Node {
    /// The `cloudpass-agent` binary (the agent image's entrypoint).
    pub agent: PathBuf,
    /// The Python interpreter of the venv with the cloud SDKs.
    pub python: PathBuf,
    /// PEM bundle the "images" trust: the test bed's CA, which signed the emulators'
    /// and fakes' certificates.
    pub trust_bundle: PathBuf,
    /// The node's link-local metadata services (`http://169.254.169.254` on a cloud
    /// node), when the scenario runs a fake of them.
    pub metadata_url: Option<String>,
}

impl Node {
    /// Runs `pod`: mints its tokens, makes its volumes, starts its agent container (if
    /// injected). Call [`RunningPod::wait_started`] before running app containers, as the
    /// kubelet waits for a native sidecar's postStart hook.
    pub async fn run(&self, cp: &ControlPlane, pod: AdmittedPod) -> Result<RunningPod> {
        let dir = tempfile::Builder::new().prefix(&format!("cloudpass-pod-{}-", pod.name)).tempdir()?;
        let mut volumes = BTreeMap::new();
        for volume in pod.stored["spec"]["volumes"].as_array().into_iter().flatten() {
            let name = volume["name"].as_str().context("volume without a name")?;
            let host = dir.path().join("volumes").join(name);
            std::fs::create_dir_all(&host)?;
            if let Some(config_map) = volume["configMap"]["name"].as_str() {
                project_config_map(cp, &pod.namespace, config_map, &volume["configMap"]["items"], &host)?;
            }
            for source in volume["projected"]["sources"].as_array().into_iter().flatten() {
                // `kube-root-ca.crt` is published by kube-controller-manager, which this
                // test bed does not run; no container here reads the API server's CA.
                if let Some(config_map) = source["configMap"]["name"].as_str().filter(|n| *n != "kube-root-ca.crt") {
                    project_config_map(cp, &pod.namespace, config_map, &source["configMap"]["items"], &host)?;
                }
                let token = &source["serviceAccountToken"];
                if token.is_null() {
                    continue;
                }
                let options = TokenOptions {
                    audiences: token["audience"].as_str().map(|a| vec![a.to_owned()]).unwrap_or_default(),
                    expiration_seconds: token["expirationSeconds"].as_i64().unwrap_or(3600),
                    bound_pod: Some((pod.name.clone(), pod.uid.clone())),
                };
                let jwt = cp.token(&pod.namespace, pod.service_account(), &options).await?;
                let path = host.join(token["path"].as_str().context("token projection without a path")?);
                std::fs::write(&path, jwt)?;
            }
            volumes.insert(name.to_owned(), host);
        }
        let mut running = RunningPod { pod, node: self.clone(), dir, volumes, agent: None, agent_log: None };
        if running.pod.is_injected() {
            running.start_agent()?;
        }
        Ok(running)
    }
}

/// Writes ConfigMap `namespace/name` into `dir` as the kubelet does for a `configMap`
/// volume: every key, or only `items` (key to path).
fn project_config_map(cp: &ControlPlane, namespace: &str, name: &str, items: &Value, dir: &Path) -> Result<()> {
    let cm: Value =
        serde_json::from_str(&cp.kubectl_ok(&["get", "configmap", name, "-n", namespace, "-o", "json"])?)?;
    let data = cm["data"].as_object().cloned().unwrap_or_default();
    let files: Vec<(String, String)> = match items.as_array() {
        Some(items) => items
            .iter()
            .map(|i| {
                (i["key"].as_str().unwrap_or_default().to_owned(), i["path"].as_str().unwrap_or_default().to_owned())
            })
            .collect(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    for (key, path) in files {
        let value =
            data.get(&key).and_then(Value::as_str).with_context(|| format!("ConfigMap {name} has no key {key}"))?;
        std::fs::write(dir.join(path), value)?;
    }
    Ok(())
}

/// A pod being "run" by [`Node::run`]. Dropping it stops its agent.
pub struct RunningPod {
    /// The pod as stored.
    pub pod: AdmittedPod,
    node: Node,
    dir: TempDir,
    volumes: BTreeMap<String, PathBuf>,
    agent: Option<ManagedProcess>,
    agent_log: Option<PathBuf>,
}

/// The outcome of one app container run.
#[derive(Clone, Debug)]
pub struct AppRun {
    /// Whether it exited with 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl AppRun {
    /// The last line of stdout as JSON (the app scripts print their result that way).
    pub fn json(&self) -> Result<Value> {
        let line = self.stdout.lines().last().ok_or_else(|| anyhow!("the app printed nothing:\n{}", self.stderr))?;
        serde_json::from_str(line).with_context(|| format!("the app's last line is not JSON: {line}"))
    }

    /// [`AppRun::json`] of a successful run; else an error with the app's output.
    pub fn ok_json(&self) -> Result<Value> {
        if !self.success {
            bail!("the app failed:\n{}{}", self.stdout, self.stderr);
        }
        self.json()
    }
}

impl RunningPod {
    /// The host folder standing in for a volume.
    pub fn volume_dir(&self, volume: &str) -> Option<&Path> {
        self.volumes.get(volume).map(PathBuf::as_path)
    }

    /// A container's (mount path, host folder) pairs.
    fn mounts(&self, container: &Value) -> Vec<(String, PathBuf)> {
        container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let host = self.volumes.get(m["name"].as_str()?)?;
                Some((m["mountPath"].as_str()?.trim_end_matches('/').to_owned(), host.clone()))
            })
            .collect()
    }

    /// A container's environment, resolved like the kubelet does (`value`, and the
    /// `fieldRef`s of the pod's own metadata), paths under its mounts moved.
    fn env_of(&self, container: &Value) -> Result<Vec<(String, String)>> {
        let mounts = self.mounts(container);
        let mut env = Vec::new();
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().context("env without a name")?.to_owned();
            let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Some(v), _) => v.to_owned(),
                (None, Some("metadata.name")) => self.pod.name.clone(),
                (None, Some("metadata.namespace")) => self.pod.namespace.clone(),
                (None, Some("metadata.uid")) => self.pod.uid.clone(),
                (None, Some("spec.serviceAccountName")) => self.pod.service_account().to_owned(),
                (None, None) if e.get("valueFrom").is_none() => String::new(),
                _ => bail!("env {name}: only values and fieldRefs of the pod's own metadata are supported"),
            };
            env.push((name.clone(), if name == AGENT_CONFIG_ENV { value } else { remap(&value, &mounts) }));
        }
        Ok(env)
    }

    fn start_agent(&mut self) -> Result<()> {
        let agent = self.pod.agent().context("no agent container")?.clone();
        // The agent's ports are fixed: on one "node" only one injected pod can run.
        let port = self.pod.agent_config().context("no agent container")??.health_port;
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!("port {port} is taken, by another pod's agent? Stop that pod first: agents use fixed loopback ports");
        }
        let mounts = self.mounts(&agent);
        let mut args: Vec<String> = agent["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .map(|a| remap(a, &mounts))
            .collect();
        // The only additions: the agent's fixed paths, moved with their volumes...
        args.push(format!("--token-file={}", remap(&format!("{TOKEN_DIR}/{TOKEN_FILE}"), &mounts)));
        args.push(format!("--broker-ca-file={}", remap(&format!("{TOKEN_DIR}/{BROKER_CA_FILE}"), &mounts)));
        args.push(format!("--shared-dir={}", remap(SHARED_DIR, &mounts)));
        // The server CA bundles are one mount per policy under SERVER_CA_DIR: gathered
        // under one folder, as in the container.
        let server_cas = self.dir.path().join("server-ca");
        std::fs::create_dir_all(&server_cas)?;
        for (mount, host) in &mounts {
            if let Some(policy) = mount.strip_prefix(&format!("{SERVER_CA_DIR}/")) {
                std::os::unix::fs::symlink(host, server_cas.join(policy))?;
            }
        }
        args.push(format!("--server-ca-dir={}", server_cas.display()));
        // ...a policy edit reaching the running agent in a second rather than a minute...
        args.push("--config-refresh=1s".into());
        // ...and the node's metadata address, moved to its fake.
        if let Some(url) = &self.node.metadata_url {
            args.extend(["azure-imds-url", "gcp-metadata-url", "aws-imds-url"].map(|flag| format!("--{flag}={url}")));
        }
        // Nothing else: the agent's image carries only the system roots; the broker's CA
        // comes from its namespace's copy (or its environment) and a private API's CA
        // through server.tls.
        let env = self.env_of(&agent)?;
        // `env -i`: the container's environment only, nothing of the test process.
        let mut argv: Vec<String> = vec!["-i".into()];
        argv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        argv.push(self.node.agent.to_string_lossy().into_owned());
        argv.extend(args);
        let log = self.dir.path().join("agent.log");
        let process = ManagedProcess::spawn(&format!("agent-{}", self.pod.name), Path::new("env"), &argv, &log, &[])?;
        self.agent = Some(process);
        self.agent_log = Some(log);
        Ok(())
    }

    /// The agent's postStart hook command (the image's binary and its arguments).
    fn hook_args(&self) -> Result<Vec<String>> {
        let agent = self.pod.agent().context("no agent container")?;
        let command: Vec<String> = agent["lifecycle"]["postStart"]["exec"]["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        let (_, args) = command.split_first().context("the agent has no exec postStart hook")?;
        Ok(args.to_vec())
    }

    /// Runs the agent binary with `args` and the agent container's environment, on a
    /// blocking thread (the fakes the agent's broker calls may share this runtime).
    async fn run_hook(&self, args: Vec<String>) -> Result<bool> {
        let agent = self.pod.agent().context("no agent container")?;
        let env = self.env_of(agent)?;
        let binary = self.node.agent.clone();
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary)
                .args(args)
                .env_clear()
                .envs(env)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        })
        .await??;
        Ok(status.success())
    }

    /// The agent's readiness check once: its postStart hook's command without `--wait`,
    /// with the container's environment.
    pub async fn probe(&self) -> Result<bool> {
        let args: Vec<String> = self.hook_args()?.into_iter().filter(|a| !a.starts_with("--wait")).collect();
        self.run_hook(args).await
    }

    /// Runs the agent's postStart hook as the kubelet does before it starts the next
    /// container (waiting at most `limit` instead of the hook's own wait), returning how
    /// long it took, or fails with the agent's log.
    pub async fn wait_started(&mut self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut args: Vec<String> = self.hook_args()?.into_iter().filter(|a| !a.starts_with("--wait")).collect();
        args.push(format!("--wait={}s", limit.as_secs().max(1)));
        if self.run_hook(args).await? {
            return Ok(started.elapsed());
        }
        if let Some(agent) = self.agent.as_mut()
            && agent.has_exited()
        {
            bail!("the agent exited; its log:\n{}", self.agent_log_text());
        }
        bail!("the agent's postStart hook did not pass within {limit:?}; its log:\n{}", self.agent_log_text())
    }

    /// Runs app container `container` as a Python program (`script`), with exactly the
    /// container's environment plus `PATH`, `HOME` and the CA bundle variables.
    pub async fn run_app(&self, container: &str, script: &str) -> Result<AppRun> {
        let spec = self
            .pod
            .containers()
            .into_iter()
            .find(|c| c["name"] == container)
            .ok_or_else(|| anyhow!("pod {} has no container {container}", self.pod.name))?
            .clone();
        let home = self.dir.path().join(format!("home-{container}"));
        std::fs::create_dir_all(&home)?;
        let python = &self.node.python;
        let bin = python.parent().map(Path::to_path_buf).unwrap_or_default();
        let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display());
        let bundle = self.node.trust_bundle.to_string_lossy().into_owned();
        let mut command = tokio::process::Command::new(python);
        command
            .arg("-c")
            .arg(script)
            .env_clear()
            .envs(self.env_of(&spec)?)
            .env("PATH", path)
            .env("HOME", &home)
            .env("SSL_CERT_FILE", &bundle)
            .env("REQUESTS_CA_BUNDLE", &bundle)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .context("the app did not finish within 120 s")?
            .context("running the app")?;
        Ok(AppRun {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// The agent's log so far (JSON lines; never holds a credential).
    pub fn agent_log_text(&self) -> String {
        self.agent_log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// Stops the agent (SIGTERM), as the kubelet does when the pod ends.
    pub fn stop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop();
        }
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `value` with a leading mount path replaced by the volume's host folder.
/// The agent's configuration with the files it names under volume mounts (a policy's
/// server CA bundle) moved like [`remap`] moves paths.
fn remap(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let (flag, path) = value.split_once('=').filter(|(f, _)| f.starts_with("--")).unwrap_or(("", value));
    for (mount, host) in mounts {
        if let Some(rest) = path.strip_prefix(mount.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            let moved = format!("{}{rest}", host.display());
            return if flag.is_empty() { moved } else { format!("{flag}={moved}") };
        }
    }
    value.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_mounts_move_and_nothing_else() {
        let mounts = vec![("/var/run/x".to_owned(), PathBuf::from("/tmp/v/x"))];
        assert_eq!(remap("/var/run/x/token", &mounts), "/tmp/v/x/token");
        assert_eq!(remap("/var/run/x", &mounts), "/tmp/v/x");
        assert_eq!(remap("--file=/var/run/x/t", &mounts), "--file=/tmp/v/x/t");
        assert_eq!(remap("/var/run/xy/t", &mounts), "/var/run/xy/t");
        assert_eq!(remap("http://127.0.0.1:1/a=b", &mounts), "http://127.0.0.1:1/a=b");
    }
}
