//! The broker's access to the Secrets that CredentialProviders reference, and to nothing
//! else.
//!
//! When the broker runs as its own Deployment (the chart's default), its service account
//! holds no cluster-wide right on Secrets. Instead the controller keeps, in every
//! namespace whose CredentialProviders reference Secrets, a Role that grants `get` on
//! exactly those Secrets by name, and a RoleBinding of that Role to the broker's service
//! account. A namespace that references none has neither: a Role whose `resourceNames`
//! is empty would grant every Secret, so it is deleted, never written empty.
//!
//! The controller may create such a Role because it holds `get` on Secrets itself (the
//! apiserver refuses to let anyone grant what they do not hold), which it needs anyway to
//! check that the referenced keys exist; it cannot list or watch Secrets.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use tracing::info;

use crate::Error;

/// How long a namespace's Role is trusted to be as last written before it is read again,
/// so that one deleted or edited by hand is restored.
const RECHECK: Duration = Duration::from_secs(300);

/// What a namespace's Role was last seen or written to grant.
struct Granted {
    /// UID of the namespace: one deleted and created again starts without the Role.
    namespace_uid: String,
    secrets: BTreeSet<String>,
    at: Instant,
}

/// Label on every Role and RoleBinding the controller writes, naming who manages them.
const MANAGED_BY: (&str, &str) = (cloudpass_runtime::certs::MANAGED_BY, "cloudpass-operator");

/// Keeps the per-namespace Roles of one broker service account in line with what the
/// namespace's CredentialProviders reference.
pub struct BrokerSecretAccess {
    client: Client,
    /// Namespace of the broker's service account.
    service_account_namespace: String,
    /// The broker's service account.
    service_account: String,
    /// Per namespace, so that an unchanged namespace costs no API call.
    granted: Mutex<BTreeMap<String, Granted>>,
}

impl BrokerSecretAccess {
    /// Access for `service_account` in `service_account_namespace`.
    pub fn new(client: Client, service_account_namespace: String, service_account: String) -> Self {
        Self { client, service_account_namespace, service_account, granted: Mutex::default() }
    }

    /// Name of the Role and RoleBinding in each namespace: the service account's name
    /// with `-secrets`, so that two releases in one cluster do not share them.
    pub fn role_name(&self) -> String {
        format!("{}-secrets", self.service_account)
    }

    /// Makes the broker able to `get` exactly `secrets` in `namespace` (of UID
    /// `namespace_uid`).
    pub async fn sync(&self, namespace: &str, namespace_uid: &str, secrets: &BTreeSet<String>) -> Result<(), Error> {
        if let Some(granted) = self.granted.lock().unwrap_or_else(|e| e.into_inner()).get(namespace)
            && granted.namespace_uid == namespace_uid
            && &granted.secrets == secrets
            && granted.at.elapsed() < RECHECK
        {
            return Ok(());
        }
        let name = self.role_name();
        let roles: Api<Role> = Api::namespaced(self.client.clone(), namespace);
        let bindings: Api<RoleBinding> = Api::namespaced(self.client.clone(), namespace);
        if secrets.is_empty() {
            // The binding first: a Role left behind without it grants nobody anything.
            delete_if_present(&bindings, &name).await?;
            delete_if_present(&roles, &name).await?;
        } else {
            let role = self.role(namespace, secrets);
            match roles.get_opt(&name).await? {
                None => {
                    roles.create(&PostParams::default(), &role).await?;
                    info!(namespace, role = name, secrets = secrets.len(), "broker granted its Secrets");
                }
                Some(current) if current.rules != role.rules || !managed(&current.metadata) => {
                    let role = Role {
                        metadata: ObjectMeta { resource_version: current.metadata.resource_version, ..role.metadata },
                        ..role
                    };
                    roles.replace(&name, &PostParams::default(), &role).await?;
                    info!(namespace, role = name, secrets = secrets.len(), "broker's Secrets changed");
                }
                Some(_) => {}
            }
            let binding = self.binding(namespace);
            match bindings.get_opt(&name).await? {
                None => {
                    bindings.create(&PostParams::default(), &binding).await?;
                }
                Some(current) if current.subjects != binding.subjects || current.role_ref != binding.role_ref => {
                    // roleRef cannot change in place: replace the whole binding.
                    delete_if_present(&bindings, &name).await?;
                    bindings.create(&PostParams::default(), &binding).await?;
                }
                Some(_) => {}
            }
        }
        let granted = Granted { namespace_uid: namespace_uid.to_owned(), secrets: secrets.clone(), at: Instant::now() };
        self.granted.lock().unwrap_or_else(|e| e.into_inner()).insert(namespace.to_owned(), granted);
        Ok(())
    }

    fn meta(&self, namespace: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.role_name()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())].into()),
            ..Default::default()
        }
    }

    /// The Role granting `get` on `secrets` by name. Never called with no Secrets.
    fn role(&self, namespace: &str, secrets: &BTreeSet<String>) -> Role {
        debug_assert!(!secrets.is_empty(), "an empty resourceNames grants every Secret");
        Role {
            metadata: self.meta(namespace),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["secrets".into()]),
                resource_names: Some(secrets.iter().cloned().collect()),
                verbs: vec!["get".into()],
                ..Default::default()
            }]),
        }
    }

    fn binding(&self, namespace: &str) -> RoleBinding {
        RoleBinding {
            metadata: self.meta(namespace),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: self.role_name(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: self.service_account.clone(),
                namespace: Some(self.service_account_namespace.clone()),
                ..Default::default()
            }]),
        }
    }
}

fn managed(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().and_then(|l| l.get(MANAGED_BY.0)).map(String::as_str) == Some(MANAGED_BY.1)
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> BrokerSecretAccess {
        // The client is never called by these tests; any URL will do.
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        BrokerSecretAccess::new(client, "cloudpass-system".into(), "cloudpass-broker".into())
    }

    #[tokio::test]
    async fn the_role_names_exactly_the_referenced_secrets_for_get_only() {
        let access = access();
        let role = access.role("app", &["api".to_owned(), "db".to_owned()].into());
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].verbs, ["get"]);
        assert_eq!(rules[0].resources.as_deref(), Some(&["secrets".to_owned()][..]));
        assert_eq!(rules[0].resource_names.as_deref(), Some(&["api".to_owned(), "db".to_owned()][..]));
        assert_eq!(role.metadata.name.as_deref(), Some("cloudpass-broker-secrets"));
        let binding = access.binding("app");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("cloudpass-broker", Some("cloudpass-system"))
        );
    }
}
