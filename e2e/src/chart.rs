//! The Helm chart as rendered by the real helm, and the container specs in it, so tests
//! can run the real binaries exactly as a Deployment would (there is no kubelet: volumes
//! are host folders that tests fill the way the kubelet would).

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_yaml::Value;

use crate::{ControlPlane, repo_root};

/// The documents of `helm template <release> charts/cloudpass -n <namespace> <extra>`.
pub fn render(cp: &ControlPlane, release: &str, namespace: &str, extra: &[&str]) -> Result<Vec<Value>> {
    let chart = repo_root().join("charts/cloudpass");
    let out = cp.helm().args(["template", release]).arg(&chart).args(["-n", namespace]).args(extra).output()?;
    if !out.status.success() {
        bail!("helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect())
}

/// The object of this kind and name among rendered documents.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("{kind} {name} not rendered"))
}

/// A container's arguments and environment.
#[derive(Debug, Clone)]
pub struct ContainerCommand {
    /// The arguments.
    pub args: Vec<String>,
    /// The environment, resolved.
    pub env: Vec<(String, String)>,
}

/// The arguments and environment of a Deployment's container, with `fieldRef`s resolved
/// as the kubelet would for a pod named `pod_name` in `namespace`.
pub fn container_command(
    deployment: &Value,
    container: &str,
    namespace: &str,
    pod_name: &str,
) -> Result<ContainerCommand> {
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_sequence().context("containers")?;
    let c = containers.iter().find(|c| c["name"] == container).ok_or_else(|| anyhow!("no container {container}"))?;
    let args = c["args"]
        .as_sequence()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let fields: BTreeMap<&str, &str> = [("metadata.namespace", namespace), ("metadata.name", pod_name)].into();
    let mut env = Vec::new();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().context("env name")?.to_owned();
        let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(v), _) => v.to_owned(),
            (None, Some(path)) => fields.get(path).ok_or_else(|| anyhow!("unsupported fieldRef {path}"))?.to_string(),
            _ => bail!("env {name}: only values and fieldRefs are supported"),
        };
        env.push((name, value));
    }
    Ok(ContainerCommand { args, env })
}

/// The port a container declares under this name.
pub fn container_port(deployment: &Value, container: &str, port_name: &str) -> Result<u16> {
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_sequence().context("containers")?;
    let c = containers.iter().find(|c| c["name"] == container).ok_or_else(|| anyhow!("no container {container}"))?;
    let port = c["ports"].as_sequence().into_iter().flatten().find(|p| p["name"] == port_name);
    Ok(port.and_then(|p| p["containerPort"].as_u64()).ok_or_else(|| anyhow!("no port {port_name}"))? as u16)
}

/// `helm install <release> charts/cloudpass -n <namespace> --create-namespace`, then the
/// rendered documents of the same release.
pub fn install(cp: &ControlPlane, release: &str, namespace: &str) -> Result<Vec<Value>> {
    let out = cp
        .helm()
        .args(["install", release])
        .arg(repo_root().join("charts/cloudpass"))
        .args(["-n", namespace, "--create-namespace"])
        .output()?;
    if !out.status.success() {
        bail!("helm install failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    cp.invalidate_discovery_cache();
    render(cp, release, namespace, &[])
}

/// The host folder standing in for a volume of the Deployment's pod in [`run_container`]:
/// arguments under the volume's mount path point there instead.
pub fn volume_dir(cp: &ControlPlane, deployment: &Value, volume: &str) -> Result<PathBuf> {
    let name = deployment["metadata"]["name"].as_str().context("deployment name")?;
    Ok(cp.dir().join(format!("chart-{name}-volumes")).join(volume))
}

/// Does what the kubelet does for a `configMap` volume of the Deployment's pod: writes
/// each key of the live ConfigMap into [`volume_dir`], each file replaced atomically.
/// `Ok(false)` when the ConfigMap does not exist (yet).
pub fn project_config_map(cp: &ControlPlane, deployment: &Value, volume: &str) -> Result<bool> {
    let namespace = deployment["metadata"]["namespace"].as_str().context("deployment namespace")?;
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].as_sequence().context("volumes")?;
    let spec = volumes.iter().find(|v| v["name"] == volume).ok_or_else(|| anyhow!("no volume {volume}"))?;
    let name = spec["configMap"]["name"].as_str().ok_or_else(|| anyhow!("volume {volume} is not a configMap"))?;
    let out = cp.kubectl_output(&["get", "configmap", name, "-n", namespace, "-o", "json"], None)?;
    if !out.status.success() {
        return Ok(false);
    }
    let cm: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dir = volume_dir(cp, deployment, volume)?;
    std::fs::create_dir_all(&dir)?;
    for (key, value) in cm["data"].as_object().into_iter().flatten() {
        let tmp = dir.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, value.as_str().unwrap_or_default())?;
        std::fs::rename(&tmp, dir.join(key))?;
    }
    Ok(true)
}

/// An argument with a path under one of the mount paths moved to the volume's host folder.
fn remap_mounts(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    let (flag, value) = arg.split_once('=').map_or(("", arg), |(f, v)| (f, v));
    for (mount_path, host) in mounts {
        if let Some(rest) = value.strip_prefix(mount_path.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            let moved = format!("{}{rest}", host.display());
            return if flag.is_empty() { moved } else { format!("{flag}={moved}") };
        }
    }
    arg.to_owned()
}

/// A chart container running here as a process; every port it listens on was moved to
/// a free one on 127.0.0.1, so that tests never depend on a fixed port being free.
pub struct ChartProcess {
    /// The process.
    pub process: crate::process::ManagedProcess,
    /// Rendered port → the port it listens on here.
    ports: std::collections::BTreeMap<u16, u16>,
}

impl ChartProcess {
    /// Where the container's rendered listen port `rendered` listens here.
    pub fn port(&self, rendered: u16) -> u16 {
        *self.ports.get(&rendered).unwrap_or_else(|| panic!("the container does not listen on port {rendered}"))
    }
}

impl std::ops::Deref for ChartProcess {
    type Target = crate::process::ManagedProcess;
    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

/// Moves every `=0.0.0.0:<port>` bind address in `args` to `=127.0.0.1:<free port>`.
fn move_listen_ports(args: &[String]) -> Result<(Vec<String>, std::collections::BTreeMap<u16, u16>)> {
    let mut ports = std::collections::BTreeMap::new();
    let mut moved = Vec::new();
    for arg in args {
        let Some((flag, port)) = arg.split_once("=0.0.0.0:") else {
            moved.push(arg.clone());
            continue;
        };
        let rendered: u16 = port.parse().with_context(|| format!("port of {arg}"))?;
        let here = match ports.get(&rendered) {
            Some(p) => *p,
            None => crate::process::free_port()?,
        };
        ports.insert(rendered, here);
        moved.push(format!("{flag}=127.0.0.1:{here}"));
    }
    Ok((moved, ports))
}

/// Starts `binary` as the Deployment's container would run: its rendered arguments and
/// environment, each bind address moved to a free port on loopback
/// ([`ChartProcess::port`]), paths under its volume mounts moved
/// to [`volume_dir`] (created empty), authenticated as `service_account` so that only
/// the chart's RBAC applies.
pub async fn run_container(
    cp: &ControlPlane,
    deployment: &Value,
    container: &str,
    service_account: &str,
    binary: &std::path::Path,
) -> Result<ChartProcess> {
    let namespace = deployment["metadata"]["namespace"].as_str().context("deployment namespace")?;
    let name = deployment["metadata"]["name"].as_str().context("deployment name")?;
    let command = container_command(deployment, container, namespace, &format!("{name}-0"))?;
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_sequence().context("containers")?;
    let c = containers.iter().find(|c| c["name"] == container).ok_or_else(|| anyhow!("no container {container}"))?;
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
        let volume = m["name"].as_str().context("volumeMount name")?;
        let dir = volume_dir(cp, deployment, volume)?;
        std::fs::create_dir_all(&dir)?;
        mounts.push((m["mountPath"].as_str().context("mountPath")?.trim_end_matches('/').to_owned(), dir));
    }
    let (args, ports) = move_listen_ports(&command.args)?;
    let args: Vec<String> = args.iter().map(|a| remap_mounts(a, &mounts)).collect();
    let kubeconfig = cp.kubeconfig_for(namespace, service_account).await?.to_string_lossy().into_owned();
    let mut env: Vec<(&str, &str)> = command.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.push(("KUBECONFIG", &kubeconfig));
    let process = crate::process::ManagedProcess::spawn(
        &format!("chart-{name}"),
        binary,
        &args,
        &cp.dir().join(format!("chart-{name}.log")),
        &env,
    )?;
    Ok(ChartProcess { process, ports })
}
