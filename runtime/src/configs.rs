//! The operator's compiled configs, watched from its namespace and kept parsed in memory,
//! and the AccessPolicies deleted since their namespace's config was compiled.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use cloudpass_api::{AccessPolicy, CONFIG_DATA_KEY, CONFIG_NAMESPACE_LABEL, config::NamespaceConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

/// Parsed compiled configs by namespace.
#[derive(Default)]
pub struct Configs {
    by_namespace: RwLock<HashMap<String, Arc<NamespaceConfig>>>,
    loaded: AtomicBool,
    /// Policies of a compiled config that were deleted (or are being deleted) since it was
    /// compiled, by namespace: until the controller compiles the config again, which it
    /// does after a debounce and only while it runs, the broker refuses them at once.
    /// Only names the current config holds are kept, so the set stays bounded.
    withdrawn: RwLock<HashMap<String, HashSet<String>>>,
}

impl Configs {
    /// The config of a namespace, if it has Ready policies.
    pub fn get(&self, namespace: &str) -> Option<Arc<NamespaceConfig>> {
        self.by_namespace.read().unwrap_or_else(|e| e.into_inner()).get(namespace).cloned()
    }

    /// Whether the initial list has been loaded.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Replaces the config of a namespace (for tests and benchmarks).
    pub fn insert(&self, config: NamespaceConfig) {
        self.forget_withdrawn_outside(&config);
        self.by_namespace.write().unwrap_or_else(|e| e.into_inner()).insert(config.namespace.clone(), Arc::new(config));
    }

    /// Whether AccessPolicy `policy` of `namespace` was deleted, or is being deleted,
    /// since the namespace's config was compiled: a compiled policy that grants nothing.
    pub fn is_withdrawn(&self, namespace: &str, policy: &str) -> bool {
        let withdrawn = self.withdrawn.read().unwrap_or_else(|e| e.into_inner());
        withdrawn.get(namespace).is_some_and(|names| names.contains(policy))
    }

    /// AccessPolicy `policy` of `namespace` is gone or going (deleted, or deletion
    /// requested and held by a finalizer). Remembered only while the config holds it.
    pub fn withdraw(&self, namespace: &str, policy: &str) {
        let compiled = self.get(namespace).is_some_and(|c| c.policy(policy).is_some());
        if compiled {
            info!(namespace, policy, "AccessPolicy deleted; refused until the config is compiled again");
            let mut withdrawn = self.withdrawn.write().unwrap_or_else(|e| e.into_inner());
            withdrawn.entry(namespace.to_owned()).or_default().insert(policy.to_owned());
        }
    }

    /// An AccessPolicy `policy` of `namespace` exists and is not being deleted (created
    /// again under the same name): the config decides again.
    pub fn restore(&self, namespace: &str, policy: &str) {
        let mut withdrawn = self.withdrawn.write().unwrap_or_else(|e| e.into_inner());
        if let Some(names) = withdrawn.get_mut(namespace) {
            names.remove(policy);
            if names.is_empty() {
                withdrawn.remove(namespace);
            }
        }
    }

    /// A new config of a namespace: withdrawn policies it no longer holds are settled.
    fn forget_withdrawn_outside(&self, config: &NamespaceConfig) {
        let mut withdrawn = self.withdrawn.write().unwrap_or_else(|e| e.into_inner());
        if let Some(names) = withdrawn.get_mut(&config.namespace) {
            names.retain(|name| config.policy(name).is_some());
            if names.is_empty() {
                withdrawn.remove(&config.namespace);
            }
        }
    }

    fn apply(&self, cm: &ConfigMap) {
        let Some(namespace) = cm.labels().get(CONFIG_NAMESPACE_LABEL).cloned() else { return };
        let text = cm.data.as_ref().and_then(|d| d.get(CONFIG_DATA_KEY)).map(String::as_str).unwrap_or("");
        match NamespaceConfig::from_json(text) {
            Ok(config) if config.namespace == namespace => {
                info!(namespace, hash = %config.hash, policies = config.policies.len(), "config loaded");
                self.insert(config);
            }
            Ok(config) => {
                warn!(configmap = %cm.name_any(), label = namespace, document = config.namespace, "config namespace does not match its label; ignored")
            }
            // Keep serving the last good config: a broken document must not uninject pods.
            Err(e) => {
                warn!(configmap = %cm.name_any(), error = %e, reason = e.metric_label(), "config refused; keeping the previous one")
            }
        }
    }

    fn remove(&self, cm: &ConfigMap) {
        if let Some(namespace) = cm.labels().get(CONFIG_NAMESPACE_LABEL) {
            info!(namespace, "config removed");
            self.by_namespace.write().unwrap_or_else(|e| e.into_inner()).remove(namespace);
            self.withdrawn.write().unwrap_or_else(|e| e.into_inner()).remove(namespace);
        }
    }
}

/// Watches the compiled-config ConfigMaps in `namespace` forever, updating `configs`.
pub async fn watch(client: Client, namespace: String, configs: Arc<Configs>) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut seen_in_init: Vec<String> = Vec::new();
    let mut stream = watcher(api, watcher::Config::default().labels(CONFIG_NAMESPACE_LABEL)).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(cm)) => configs.apply(&cm),
            Ok(watcher::Event::Delete(cm)) => configs.remove(&cm),
            Ok(watcher::Event::Init) => seen_in_init.clear(),
            Ok(watcher::Event::InitApply(cm)) => {
                seen_in_init.extend(cm.labels().get(CONFIG_NAMESPACE_LABEL).cloned());
                configs.apply(&cm);
            }
            Ok(watcher::Event::InitDone) => {
                // A relist: forget namespaces whose config disappeared meanwhile.
                configs
                    .by_namespace
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|ns, _| seen_in_init.contains(ns));
                configs.loaded.store(true, Ordering::Relaxed);
            }
            Err(e) => warn!(error = %e, "config watch error; retrying"),
        }
    }
}

/// Watches the metadata of every AccessPolicy forever, withdrawing from `configs` those
/// deleted or being deleted: revocation takes the watch's latency rather than the
/// controller's debounce and write, and works while no controller runs. Metadata only:
/// the broker never holds the policies themselves.
pub async fn watch_withdrawals(client: Client, configs: Arc<Configs>) {
    let api: Api<PartialObjectMeta<AccessPolicy>> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let seen = |meta: &PartialObjectMeta<AccessPolicy>| {
        let (namespace, name) = (meta.namespace().unwrap_or_default(), meta.name_any());
        if meta.metadata.deletion_timestamp.is_some() {
            configs.withdraw(&namespace, &name);
        } else {
            configs.restore(&namespace, &name);
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(meta) | watcher::Event::InitApply(meta)) => seen(&meta),
            Ok(watcher::Event::Delete(meta)) => {
                configs.withdraw(&meta.namespace().unwrap_or_default(), &meta.name_any())
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => warn!(error = %e, "AccessPolicy watch error; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudpass_api::config::CompiledPolicy;
    use serde_json::json;

    fn config(policies: &[&str]) -> NamespaceConfig {
        let policies: Vec<CompiledPolicy> = policies
            .iter()
            .map(|name| {
                serde_json::from_value(json!({
                    "name": name,
                    "client": {"podSelector": {}},
                    "trustProviders": [],
                    "server": {"kind": "aws"},
                    "credentialProvider": "cred",
                    "delivery": {"sdkEndpoint": {}},
                }))
                .unwrap()
            })
            .collect();
        NamespaceConfig::new("team", Default::default(), Default::default(), policies)
    }

    #[test]
    fn a_deleted_policy_is_withdrawn_until_its_config_is_compiled_again() {
        let configs = Configs::default();
        configs.insert(config(&["a", "b"]));
        configs.withdraw("team", "a");
        assert!(configs.is_withdrawn("team", "a"));
        assert!(!configs.is_withdrawn("team", "b"));
        assert!(!configs.is_withdrawn("other", "a"));
        // A config compiled before the deletion was seen keeps it withdrawn.
        configs.insert(config(&["a", "b", "c"]));
        assert!(configs.is_withdrawn("team", "a"));
        // The config without it settles it: nothing is left to remember.
        configs.insert(config(&["b"]));
        assert!(!configs.is_withdrawn("team", "a"));
        assert!(configs.withdrawn.read().unwrap().is_empty());
    }

    #[test]
    fn only_compiled_policies_are_remembered_and_a_new_one_of_the_same_name_restores() {
        let configs = Configs::default();
        configs.withdraw("team", "never-compiled");
        configs.insert(config(&["a"]));
        configs.withdraw("team", "never-compiled");
        assert!(configs.withdrawn.read().unwrap().is_empty(), "bounded by what configs hold");
        configs.withdraw("team", "a");
        configs.restore("team", "a");
        assert!(!configs.is_withdrawn("team", "a"));
        assert!(configs.withdrawn.read().unwrap().is_empty());
    }
}
