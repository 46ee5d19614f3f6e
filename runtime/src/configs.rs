//! The operator's compiled configs, watched from its namespace and kept parsed in memory.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use cloudpass_api::{CONFIG_DATA_KEY, CONFIG_NAMESPACE_LABEL, config::NamespaceConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

/// Parsed compiled configs by namespace.
#[derive(Default)]
pub struct Configs {
    by_namespace: RwLock<HashMap<String, Arc<NamespaceConfig>>>,
    loaded: AtomicBool,
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
        self.by_namespace.write().unwrap_or_else(|e| e.into_inner()).insert(config.namespace.clone(), Arc::new(config));
    }

    fn apply(&self, cm: &ConfigMap) {
        let Some(namespace) = cm.labels().get(CONFIG_NAMESPACE_LABEL).cloned() else { return };
        let text = cm.data.as_ref().and_then(|d| d.get(CONFIG_DATA_KEY)).map(String::as_str).unwrap_or("");
        match NamespaceConfig::from_json(text) {
            Ok(config) if config.namespace == namespace => {
                info!(namespace, hash = %config.hash, policies = config.policies.len(), "config loaded");
                self.by_namespace.write().unwrap_or_else(|e| e.into_inner()).insert(namespace, Arc::new(config));
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
