//! The manifests of `examples/`, as a user applies them, with the few fields that name a
//! real cloud (STS endpoint, Entra authority, Google endpoints, token URLs) pointed at the
//! local emulators. Every change is recorded, so a scenario (and the demo) can say what
//! differs from the file.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::repo_root;

/// Kinds that run pods: no controller-manager runs them here; [`Example::pod`] makes
/// the pod their controller would create.
const WORKLOAD_KINDS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet"];

/// The ConfigMap, in each namespace of an app on the node, holding the CA of the cloud
/// emulators' certificates (`ca.crt`).
pub const CLOUD_CA_CONFIGMAP: &str = "cloud-ca";
/// Where apps on the node find it.
const CLOUD_CA_DIR: &str = "/etc/cloud-ca";

/// The app of a direction: which container of which workload runs which of the
/// scenarios' SDK programs (`e2e/src/scenario/apps/`), with which settings of its own
/// (endpoint URLs of the local emulators, a bucket name).
#[derive(Clone, Debug)]
pub struct App {
    /// The workload (Deployment, CronJob) in the example.
    pub workload: String,
    /// Its container that runs the program.
    pub container: String,
    /// The program's file name, e.g. `s3.py`.
    pub program: &'static str,
    /// The app's own environment for the local emulators.
    pub env: Vec<(String, String)>,
}

impl App {
    /// An app of `workload`/`container` running `program` with `env`.
    pub fn new(workload: &str, container: &str, program: &'static str, env: &[(&str, &str)]) -> Self {
        Self {
            workload: workload.into(),
            container: container.into(),
            program,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn env_refs(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

/// An example's documents and the changes made to them.
#[derive(Clone, Debug)]
pub struct Example {
    /// The file.
    pub path: PathBuf,
    /// Its documents, as JSON.
    pub docs: Vec<Value>,
    /// What was changed, in words (`CredentialProvider orders-s3: spec.awsSts.stsEndpoint = ...`).
    pub changes: Vec<String>,
}

impl Example {
    /// Loads `examples/<name>.yaml`.
    pub fn load(name: &str) -> Result<Self> {
        let path = repo_root().join("examples").join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
            .collect::<Result<Vec<serde_yaml::Value>>>()?
            .into_iter()
            .filter(|d| !d.is_null())
            .map(|d| serde_json::to_value(d).map_err(anyhow::Error::from))
            .collect::<Result<_>>()?;
        Ok(Self { path, docs, changes: Vec::new() })
    }

    /// The document of this kind and name.
    pub fn get(&self, kind: &str, name: &str) -> Result<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("{} has no {kind} {name}", self.path.display()))
    }

    /// Sets `pointer` (a JSON pointer under the object, e.g. `/spec/awsSts/stsEndpoint`) of
    /// the object of this kind and name, and records the change.
    pub fn set(&mut self, kind: &str, name: &str, pointer: &str, value: Value) -> Result<&mut Self> {
        let doc = self
            .docs
            .iter_mut()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("no {kind} {name}"))?;
        let (parent, field) = pointer.rsplit_once('/').ok_or_else(|| anyhow!("bad pointer {pointer}"))?;
        let target = if parent.is_empty() { Some(doc) } else { doc.pointer_mut(parent) };
        let object = target.and_then(Value::as_object_mut).ok_or_else(|| anyhow!("{kind} {name} has no {parent}"))?;
        let shown = match &value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        object.insert(field.to_owned(), value);
        self.changes.push(format!("{kind} {name}: {} = {shown}", pointer.trim_start_matches('/').replace('/', ".")));
        Ok(self)
    }

    /// The objects to apply (everything but the workloads), as one YAML stream.
    pub fn objects_yaml(&self) -> Result<String> {
        let mut out = String::new();
        for doc in self.docs.iter().filter(|d| !WORKLOAD_KINDS.contains(&d["kind"].as_str().unwrap_or_default())) {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(doc)?);
        }
        Ok(out)
    }

    /// `kind/name` of the objects [`Example::objects_yaml`] holds.
    pub fn object_names(&self) -> Vec<String> {
        self.docs
            .iter()
            .filter(|d| !WORKLOAD_KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
            .map(|d| format!("{}/{}", d["kind"].as_str().unwrap_or("?"), d["metadata"]["name"].as_str().unwrap_or("?")))
            .collect()
    }

    /// The workload `name` (a Deployment, CronJob, ...), as YAML to apply.
    pub fn workload_yaml(&self, name: &str) -> Result<String> {
        Ok(serde_yaml::to_string(self.workload(name)?)?)
    }

    fn workload(&self, name: &str) -> Result<&Value> {
        self.docs
            .iter()
            .find(|d| WORKLOAD_KINDS.contains(&d["kind"].as_str().unwrap_or_default()) && d["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("no workload {name}"))
    }

    /// The pod `app`'s workload would create, with the app's environment (see
    /// [`Example::pod`]).
    pub fn app_pod(&mut self, app: &App) -> Result<Value> {
        self.pod(&app.workload, &app.container, &app.env_refs())
    }

    /// Makes `app`'s workload run on the test bed's node from the apps image `image`:
    /// the program once (a Job's pod) or, with `every`, again and again at that interval
    /// (a Deployment's pod), see [`Example::run_on_node`].
    pub fn run_app_on_node(&mut self, app: &App, image: &str, every: Option<Duration>) -> Result<()> {
        let program = format!("/apps/{}", app.program);
        let every_secs = every.map(|e| format!("{}", e.as_secs_f64()));
        let command: Vec<&str> = match &every_secs {
            Some(secs) => vec!["python3", "/apps/every.py", secs, &program],
            None => vec!["python3", &program],
        };
        self.run_on_node(&app.workload, &app.container, image, &command, &app.env_refs())
    }

    /// Makes workload `name` runnable on the test bed's node, recording each change:
    /// container `container` runs `command` from `image` (the test apps image, which
    /// holds the unchanged SDK programs) with `env` (the app's own settings for the local
    /// emulators), and trusts the emulators' CA from the ConfigMap [`CLOUD_CA_CONFIGMAP`]
    /// of its namespace (the app's own trust store, as an image would carry it).
    pub fn run_on_node(
        &mut self,
        name: &str,
        container: &str,
        image: &str,
        command: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let mut changes = Vec::new();
        let workload = self
            .docs
            .iter_mut()
            .find(|d| WORKLOAD_KINDS.contains(&d["kind"].as_str().unwrap_or_default()) && d["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("no workload {name}"))?;
        let template = match workload["kind"].as_str() {
            Some("CronJob") => &mut workload["spec"]["jobTemplate"]["spec"]["template"],
            _ => &mut workload["spec"]["template"],
        };
        let spec = template["spec"].as_object_mut().context("pod template without spec")?;
        let volumes = spec.entry("volumes").or_insert_with(|| json!([])).as_array_mut().context("volumes")?;
        if !volumes.iter().any(|v| v["name"] == "cloud-ca") {
            volumes.push(json!({"name": "cloud-ca", "configMap": {"name": CLOUD_CA_CONFIGMAP}}));
            changes.push(format!("{name}: volume cloud-ca from ConfigMap {CLOUD_CA_CONFIGMAP}"));
        }
        let containers = spec.get_mut("containers").and_then(Value::as_array_mut).context("containers")?;
        let c = containers
            .iter_mut()
            .find(|c| c["name"] == container)
            .ok_or_else(|| anyhow!("workload {name} has no container {container}"))?;
        c["image"] = json!(image);
        c["command"] = json!(command);
        changes.push(format!("{name}, container {container}: image {image}, command {}", command.join(" ")));
        let mounts = c.as_object_mut().context("container")?.entry("volumeMounts").or_insert_with(|| json!([]));
        mounts
            .as_array_mut()
            .context("volumeMounts")?
            .push(json!({"name": "cloud-ca", "mountPath": CLOUD_CA_DIR, "readOnly": true}));
        let bundle = format!("{CLOUD_CA_DIR}/ca.crt");
        let list = c.as_object_mut().context("container")?.entry("env").or_insert_with(|| json!([]));
        let list = list.as_array_mut().context("env")?;
        let trust = [("SSL_CERT_FILE", bundle.as_str()), ("REQUESTS_CA_BUNDLE", bundle.as_str())];
        for (k, v) in env.iter().chain(&trust) {
            match list.iter_mut().find(|e| e["name"] == *k) {
                Some(existing) => *existing = json!({"name": k, "value": v}),
                None => list.push(json!({"name": k, "value": v})),
            }
            changes.push(format!("{name}, container {container}: env {k}={v}"));
        }
        self.changes.extend(changes);
        Ok(())
    }

    /// The pod the controller of workload `name` would create: its pod template, with a
    /// generated name. `env` entries are set in container `container` (replacing a
    /// variable of the same name): the app's own settings for the local emulators (an
    /// endpoint URL, a bucket name), recorded.
    pub fn pod(&mut self, name: &str, container: &str, env: &[(&str, &str)]) -> Result<Value> {
        let workload = self.workload(name)?;
        let template = match workload["kind"].as_str() {
            Some("CronJob") => &workload["spec"]["jobTemplate"]["spec"]["template"],
            _ => &workload["spec"]["template"],
        };
        if template.is_null() {
            bail!("workload {name} has no pod template");
        }
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": template["metadata"].clone(),
            "spec": template["spec"].clone(),
        });
        pod["metadata"]["generateName"] = json!(format!("{name}-"));
        let containers = pod["spec"]["containers"].as_array_mut().context("pod template without containers")?;
        let c = containers
            .iter_mut()
            .find(|c| c["name"] == container)
            .ok_or_else(|| anyhow!("workload {name} has no container {container}"))?;
        if !env.is_empty() {
            let list = c.as_object_mut().context("container")?.entry("env").or_insert_with(|| json!([]));
            let list = list.as_array_mut().context("env")?;
            for (k, v) in env {
                match list.iter_mut().find(|e| e["name"] == *k) {
                    Some(existing) => *existing = json!({"name": k, "value": v}),
                    None => list.push(json!({"name": k, "value": v})),
                }
                self.changes.push(format!("pod of {name}, container {container}: env {k}={v}"));
            }
        }
        Ok(pod)
    }
}
