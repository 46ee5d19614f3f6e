//! The broker's CA bundle in every opted-in namespace, where injected pods mount it.
//!
//! The broker publishes its CA bundle in a ConfigMap of the release namespace (its own CA
//! or cert-manager's `ca.crt`). A pod cannot mount a ConfigMap of another namespace, so
//! the controller keeps a copy of the same name in every namespace labelled
//! `cloudpass.dev/injection=enabled`, and the webhook projects it into the agent's token
//! volume. This keeps the PEM out of every pod spec (it was the largest part of the
//! injected pod), and the kubelet brings a rotated CA to running agents without a
//! restart. Istio's `istio-ca-root-cert` works the same way.
//!
//! A copy is written before the namespace's compiled config, so a pod the webhook
//! injects finds it; if it is missing anyway (the CA not published yet) the kubelet keeps
//! the pod waiting with a `FailedMount` Event naming it. The controller watches the
//! ConfigMaps of that one name in every namespace (a watch RBAC can limit by name), so a
//! copy deleted or edited by hand is restored at once, and one left in a namespace that
//! opted out is deleted, even across restarts. It may create ConfigMaps in any namespace
//! (a create cannot be limited by name) but read, update and delete only this name.

use cloudpass_runtime::certs::{CA_CONFIG_MAP_KEY, MANAGED_BY, publish_ca};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::DeleteParams,
    runtime::reflector::{ObjectRef, Store},
};
use tracing::info;

use crate::Error;

/// Owner named in the copies' `app.kubernetes.io/managed-by` label.
const OWNER: &str = "cloudpass-operator";

/// Keeps the broker's CA bundle, as published in the release namespace, in every
/// opted-in namespace under the same ConfigMap name.
pub struct NamespaceBrokerCa {
    client: Client,
    /// Name of the published ConfigMap and of every copy.
    name: String,
    /// Every ConfigMap of that name, in every namespace: the original and the copies.
    maps: Store<ConfigMap>,
}

impl NamespaceBrokerCa {
    /// Copies of ConfigMap `name`; `maps` caches every ConfigMap of that name.
    pub fn new(client: Client, name: String, maps: Store<ConfigMap>) -> Self {
        Self { client, name, maps }
    }

    fn bundle_in(&self, namespace: &str) -> Option<(String, bool)> {
        let map = self.maps.get(&ObjectRef::new(&self.name).within(namespace))?;
        let managed = map.labels().get(MANAGED_BY).map(String::as_str) == Some(OWNER);
        Some((map.data.as_ref().and_then(|d| d.get(CA_CONFIG_MAP_KEY)).cloned().unwrap_or_default(), managed))
    }

    /// Writes the copy into `namespace` when it `opted_in` and the copy differs from the
    /// published bundle, or deletes the copy this controller wrote when the namespace no
    /// longer is opted in. Nothing is written while no bundle is published: its first
    /// version reconciles every namespace again.
    pub async fn sync(&self, operator_namespace: &str, namespace: &str, opted_in: bool) -> Result<(), Error> {
        if namespace == operator_namespace {
            return Ok(());
        }
        let current = self.bundle_in(namespace);
        if !opted_in {
            if let Some((_, true)) = current {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
                match api.delete(&self.name, &DeleteParams::default()).await {
                    Ok(_) => info!(namespace, configmap = self.name, "broker CA copy deleted: namespace opted out"),
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(());
        }
        let Some((bundle, _)) = self.bundle_in(operator_namespace).filter(|(b, _)| !b.trim().is_empty()) else {
            return Ok(());
        };
        if current.is_some_and(|(copy, _)| copy == bundle) {
            return Ok(());
        }
        publish_ca(&self.client, namespace, &self.name, OWNER, &bundle).await?;
        Ok(())
    }
}
