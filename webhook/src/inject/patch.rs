//! The JSON Patch (RFC 6902) that makes the injected pod of the pod as submitted.
//!
//! The webhook only adds: the agent as the first init container, its volumes, variables
//! and mounts appended to the containers that receive credentials, and its annotations.
//! [`Changes`] lists those additions; [`Changes::patch`] turns them into `add` operations
//! computed against the pod's JSON exactly as the apiserver sent it, so that fields the
//! webhook does not know (an apiserver newer than k8s-openapi) are never removed, replaced
//! or moved into another container. An array or object the pod does not have yet (or
//! has as `null`) is added whole; an existing one gets its members added one by one.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::api::core::v1::{Container, EnvVar, Volume, VolumeMount};
use serde::Serialize;
use serde_json::{Map, Value};

/// One of the two lists of a pod's containers that can receive credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ContainerList {
    /// `spec.initContainers`, native sidecars included.
    Init,
    /// `spec.containers`.
    App,
}

impl ContainerList {
    /// The list's field name in a pod spec.
    pub fn field(self) -> &'static str {
        match self {
            Self::Init => "initContainers",
            Self::App => "containers",
        }
    }
}

/// What the webhook appends to one container of the pod as submitted.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerAdditions {
    /// The list the container is in.
    pub list: ContainerList,
    /// Its index in that list, in the pod as submitted (before the agent is inserted).
    pub index: usize,
    /// Its name, checked against the submitted JSON before anything is patched.
    pub name: String,
    /// Variables appended to its `env`.
    pub env: Vec<EnvVar>,
    /// Mounts appended to its `volumeMounts`.
    pub volume_mounts: Vec<VolumeMount>,
}

impl ContainerAdditions {
    /// Nothing to append yet for the container `name` at `index` of `list`.
    pub fn new(list: ContainerList, index: usize, name: &str) -> Self {
        Self { list, index, name: name.to_owned(), env: Vec::new(), volume_mounts: Vec::new() }
    }

    /// True when nothing is appended to this container.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.volume_mounts.is_empty()
    }
}

/// Everything the webhook adds to one pod. Nothing of the pod is removed or replaced,
/// except the values of the webhook's own annotations when the pod already has them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Additions to the pod's own containers, init containers included.
    pub containers: Vec<ContainerAdditions>,
    /// The agent, inserted as the first init container (`None`: a skipped pod that only
    /// gets the annotation saying why).
    pub agent: Option<Container>,
    /// Volumes appended to `spec.volumes`.
    pub volumes: Vec<Volume>,
    /// Annotations set on the pod.
    pub annotations: BTreeMap<String, String>,
}

/// The submitted JSON does not have the shape its parsed form had (a container missing
/// at its index, a list that is not an array): no patch, rather than a wrong one.
#[derive(Debug, thiserror::Error)]
#[error("cannot patch the pod: {0}")]
pub struct PatchError(pub String);

impl Changes {
    /// The RFC 6902 operations that apply these changes to `pod`, the pod's JSON as the
    /// apiserver sent it (the same document the decision parsed).
    ///
    /// The operations are ordered so that every path refers to the pod as submitted:
    /// the containers' additions come before the agent is inserted at
    /// `/spec/initContainers/0`, which shifts the init containers by one.
    pub fn patch(&self, pod: &Value) -> Result<Patch, PatchError> {
        let mut ops = Ops { pod, ops: Vec::new() };
        for added in &self.containers {
            let container = pointer(&["spec", added.list.field(), &added.index.to_string()]);
            let name = pod.pointer(join(&container, &["name"]).as_str()).and_then(Value::as_str);
            if name != Some(added.name.as_str()) {
                return Err(PatchError(format!(
                    "expected container {} at {}, found {}",
                    added.name,
                    container.as_str(),
                    name.unwrap_or("none")
                )));
            }
            ops.append(join(&container, &["env"]), &added.env)?;
            ops.append(join(&container, &["volumeMounts"]), &added.volume_mounts)?;
        }
        if let Some(agent) = &self.agent {
            ops.prepend(pointer(&["spec", ContainerList::Init.field()]), agent)?;
        }
        ops.append(pointer(&["spec", "volumes"]), &self.volumes)?;
        ops.set_members(&["metadata", "annotations"], &self.annotations)?;
        Ok(Patch(ops.ops))
    }
}

/// The operations built so far, against the pod they will apply to.
struct Ops<'a> {
    pod: &'a Value,
    ops: Vec<PatchOperation>,
}

/// What is at a path of the submitted pod; `null` counts as absent, as for the apiserver.
enum Found {
    Absent,
    Array,
    Object,
}

impl Ops<'_> {
    fn find(&self, path: &PointerBuf) -> Result<Found, PatchError> {
        match self.pod.pointer(path.as_str()) {
            None | Some(Value::Null) => Ok(Found::Absent),
            Some(Value::Array(_)) => Ok(Found::Array),
            Some(Value::Object(_)) => Ok(Found::Object),
            Some(other) => Err(PatchError(format!("{} is neither a list nor an object: {other}", path.as_str()))),
        }
    }

    fn add(&mut self, path: PointerBuf, value: Value) {
        self.ops.push(PatchOperation::Add(AddOperation { path, value }));
    }

    /// Appends `items` to the array at `path`, or adds the array when there is none.
    fn append<T: Serialize>(&mut self, path: PointerBuf, items: &[T]) -> Result<(), PatchError> {
        if items.is_empty() {
            return Ok(());
        }
        let values = items.iter().map(to_value).collect::<Vec<_>>();
        match self.find(&path)? {
            Found::Absent => self.add(path, Value::Array(values)),
            Found::Array => {
                let end = join(&path, &["-"]);
                for value in values {
                    self.add(end.clone(), value);
                }
            }
            Found::Object => return Err(PatchError(format!("{} is not a list", path.as_str()))),
        }
        Ok(())
    }

    /// Inserts `item` first into the array at `path`, or adds the array when there is none.
    fn prepend<T: Serialize>(&mut self, path: PointerBuf, item: &T) -> Result<(), PatchError> {
        match self.find(&path)? {
            Found::Absent => self.add(path, Value::Array(vec![to_value(item)])),
            Found::Array => self.add(join(&path, &["0"]), to_value(item)),
            Found::Object => return Err(PatchError(format!("{} is not a list", path.as_str()))),
        }
        Ok(())
    }

    /// Sets `members` in the object at `path` (two levels: `metadata`, then the map),
    /// adding whichever of the two objects the pod does not have.
    fn set_members(&mut self, path: &[&str; 2], members: &BTreeMap<String, String>) -> Result<(), PatchError> {
        if members.is_empty() {
            return Ok(());
        }
        let map = || Value::Object(members.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect());
        let [outer, inner] = *path;
        match (self.find(&pointer(&[outer]))?, self.find(&pointer(path))?) {
            (Found::Absent, _) => self.add(pointer(&[outer]), Value::Object(Map::from_iter([(inner.into(), map())]))),
            (Found::Object, Found::Absent) => self.add(pointer(path), map()),
            (Found::Object, Found::Object) => {
                for (key, value) in members {
                    // The key is one token: `cloudpass.dev/injected` becomes
                    // `cloudpass.dev~1injected` (and a `~`, `~0`).
                    self.add(join(&pointer(path), &[key.as_str()]), Value::String(value.clone()));
                }
            }
            _ => return Err(PatchError(format!("/{outer}/{inner} is not an object"))),
        }
        Ok(())
    }
}

/// The JSON pointer of `tokens`, each escaped (`~` as `~0`, `/` as `~1`).
fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

/// `base` followed by `tokens`, each escaped.
fn join(base: &PointerBuf, tokens: &[&str]) -> PointerBuf {
    let mut path = base.clone();
    for token in tokens {
        path.push_back(*token);
    }
    path
}

fn to_value<T: Serialize>(item: &T) -> Value {
    serde_json::to_value(item).expect("a Kubernetes object serializes")
}
