//! Why a pod has (or lacks) credentials: whether its namespace is opted in, which
//! AccessPolicies select it and why the others do not, what the webhook injected, which
//! deliveries each container has, and the broker's last decisions for it. The selection
//! rule is the webhook's and the broker's own ([`ClientSelector::selects`]).

use std::collections::BTreeMap;

use cloudpass_api::{
    AccessPolicy, INJECTION_ENABLED, INJECTION_LABEL,
    agent::{
        AGENT_CONFIG_ENV, AGENT_CONTAINER, AgentConfig, AgentDelivery, AgentEndpoint, INJECTED_ANNOTATION,
        POLICIES_ANNOTATION, SHARED_DIR, SKIPPED_ANNOTATION, annotated_policies,
    },
    endpoint::{AgentPorts, agent_endpoint},
    policy::NotSelected,
};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use kube::ResourceExt;
use serde::Serialize;
use serde_json::Value;

/// Everything `explain pod` says about one pod.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// `namespace/name`.
    pub pod: String,
    /// Whether the namespace is labelled `cloudpass.dev/injection=enabled`.
    pub namespace_opted_in: bool,
    /// Service account the pod runs as.
    pub service_account: String,
    /// The agent version the webhook injected, if it did.
    pub injected: Option<String>,
    /// What the webhook left out, and why (its annotation).
    pub skipped: Option<String>,
    /// Each AccessPolicy of the namespace: does it select the pod, and why (not).
    pub policies: Vec<PolicyVerdict>,
    /// What the agent serves, per policy (its configuration).
    pub deliveries: Vec<Delivery>,
    /// The broker's last decisions for this pod, newest last (from its audit records).
    pub decisions: Vec<Value>,
    /// Why decisions could not be read, if they could not.
    pub decisions_unavailable: Option<String>,
}

/// One AccessPolicy and whether it selects the pod.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVerdict {
    /// The AccessPolicy.
    pub policy: String,
    /// Whether it selects the pod (its client matches).
    pub selects: bool,
    /// Why (not), in words.
    pub why: String,
    /// Its `Ready` condition status and reason.
    pub ready: String,
    /// Its CredentialProvider.
    pub credential_provider: String,
}

/// One policy the agent serves and the containers that receive its settings.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The AccessPolicy.
    pub policy: String,
    /// The endpoint kind and port (`awsContainerCredentials :15021`, ...).
    pub endpoint: String,
    /// Containers whose environment points at that endpoint.
    pub containers: Vec<String>,
}

/// Explains `pod` of `namespace` given the namespace's `policies` and the broker's audit
/// `records` (any JSON lines; only this pod's audit records are kept, the last `keep`).
pub fn of(
    pod: &Pod,
    namespace: &Namespace,
    policies: &[AccessPolicy],
    records: Result<Vec<Value>, String>,
    keep: usize,
) -> Explanation {
    let spec = pod.spec.clone().unwrap_or_default();
    let service_account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let annotations = pod.annotations();
    let verdicts = policies
        .iter()
        .map(|p| {
            let (selects, why) = match p.spec.client.selects(&service_account, Some(pod.labels())) {
                Ok(()) => (true, "its pod selector and service account match".to_owned()),
                Err(NotSelected::ServiceAccount(sa)) => {
                    (false, format!("it is for service account {sa}, the pod runs as {service_account}"))
                }
                Err(NotSelected::Labels) => (false, "the pod's labels do not match its pod selector".to_owned()),
                Err(NotSelected::RemoteNeedsEmptySelector) => {
                    (false, "a pod of another cluster needs an empty pod selector".to_owned())
                }
            };
            PolicyVerdict {
                policy: p.name_any(),
                selects,
                why,
                ready: crate::policy_ready(p),
                credential_provider: p.spec.credential_provider.name.clone(),
            }
        })
        .collect();
    let containers: Vec<&Container> = spec.init_containers.iter().flatten().chain(spec.containers.iter()).collect();
    let deliveries = agent_deliveries(&containers, annotations, policies)
        .map(|deliveries| {
            deliveries
                .iter()
                .map(|d| {
                    // The kind as the configuration spells it (its serde tag).
                    let kind = serde_json::to_value(&d.endpoint).unwrap_or_default()["type"]
                        .as_str()
                        .unwrap_or("?")
                        .to_owned();
                    let others = containers.iter().filter(|c| c.name != AGENT_CONTAINER);
                    // A loopback endpoint reaches the containers whose variables name its
                    // port; a file, those that mount the shared volume.
                    let (endpoint, receiving) = match (d.endpoint.port(), &d.endpoint) {
                        (Some(port), _) => {
                            let needle = format!("127.0.0.1:{port}");
                            let receiving = others
                                .filter(|c| {
                                    c.env
                                        .iter()
                                        .flatten()
                                        .any(|e| e.value.as_deref().is_some_and(|v| v.contains(&needle)))
                                })
                                .map(|c| c.name.clone())
                                .collect();
                            (format!("{kind} :{port}"), receiving)
                        }
                        (None, AgentEndpoint::File { name, .. }) => {
                            let receiving = others
                                .filter(|c| c.volume_mounts.iter().flatten().any(|m| m.mount_path == SHARED_DIR))
                                .map(|c| c.name.clone())
                                .collect();
                            (format!("{kind} {SHARED_DIR}/{name}"), receiving)
                        }
                        (None, _) => (kind, vec![]),
                    };
                    Delivery { policy: d.policy.clone(), endpoint, containers: receiving }
                })
                .collect()
        })
        .unwrap_or_default();
    let uid = pod.uid().unwrap_or_default();
    let (decisions, decisions_unavailable) = match records {
        Ok(records) => {
            let mine: Vec<Value> = records
                .into_iter()
                .filter(|r| r["kind"] == "cloudpass.dev/audit" && r["podUid"].as_str() == Some(uid.as_str()))
                .collect();
            let skip = mine.len().saturating_sub(keep);
            (mine.into_iter().skip(skip).collect(), None)
        }
        Err(why) => (Vec::new(), Some(why)),
    };
    Explanation {
        pod: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
        namespace_opted_in: namespace.labels().get(INJECTION_LABEL).map(String::as_str) == Some(INJECTION_ENABLED),
        service_account,
        injected: annotations.get(INJECTED_ANNOTATION).cloned(),
        skipped: annotations.get(SKIPPED_ANNOTATION).cloned(),
        policies: verdicts,
        deliveries,
        decisions,
        decisions_unavailable,
    }
}

/// What the pod's agent serves: the deliveries in its configuration (a remote cluster's
/// webhook writes them there), else those the broker gives it, by the same rule, for the
/// policies of the `cloudpass.dev/policies` annotation. `None` without an agent.
fn agent_deliveries(
    containers: &[&Container],
    annotations: &BTreeMap<String, String>,
    policies: &[AccessPolicy],
) -> Option<Vec<AgentDelivery>> {
    let agent = containers.iter().find(|c| c.name == AGENT_CONTAINER)?;
    let config = match agent.env.iter().flatten().find(|e| e.name == AGENT_CONFIG_ENV) {
        Some(e) => serde_json::from_str(e.value.as_deref().unwrap_or_default()).ok()?,
        None => AgentConfig::default(),
    };
    if !config.deliveries_from_broker() {
        return Some(config.deliveries);
    }
    let listed = annotations.get(POLICIES_ANNOTATION).map(|v| annotated_policies(v)).unwrap_or_default();
    let ports = AgentPorts::default();
    Some(
        listed
            .iter()
            .filter_map(|name| {
                let policy = policies.iter().find(|p| &p.name_any() == name)?;
                let endpoint = agent_endpoint(name, &policy.spec.server, &policy.spec.delivery, &ports)?;
                Some(AgentDelivery { policy: name.clone(), endpoint, evidence: Vec::new() })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_injected_pod_shows_its_deliveries_per_container_and_only_its_own_decisions() {
        let config = json!({"brokerUrl": "https://b", "deliveries": [
            {"policy": "to-s3", "endpoint": {"type": "awsContainerCredentials", "port": 15021}}]});
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orders-1", "namespace": "team", "uid": "u-1", "labels": {"app": "orders"},
                         "annotations": {"cloudpass.dev/injected": "0.1.0", "cloudpass.dev/policies": "to-s3"}},
            "spec": {"serviceAccountName": "orders",
                "initContainers": [{"name": "cloudpass-agent", "env": [{"name": "CLOUDPASS_AGENT_CONFIG", "value": config.to_string()}]}],
                "containers": [
                    {"name": "api", "env": [{"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:15021/v1/aws/credentials"}]},
                    {"name": "sidecar"}]}}))
        .unwrap();
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap();
        let records = vec![
            json!({"kind": "cloudpass.dev/audit", "podUid": "u-1", "policy": "to-s3", "outcome": "allowed", "time": "1"}),
            json!({"kind": "cloudpass.dev/audit", "podUid": "u-2", "policy": "to-s3", "outcome": "denied", "time": "2"}),
            json!({"level": "info", "podUid": "u-1", "message": "a log line, not a decision"}),
            json!({"kind": "cloudpass.dev/audit", "podUid": "u-1", "policy": "to-s3", "outcome": "denied", "time": "3"}),
        ];
        let e = of(&pod, &namespace, &[], Ok(records), 1);
        assert!(!e.namespace_opted_in);
        assert_eq!(e.injected.as_deref(), Some("0.1.0"));
        assert_eq!(
            e.deliveries,
            [Delivery {
                policy: "to-s3".into(),
                endpoint: "awsContainerCredentials :15021".into(),
                containers: vec!["api".into()]
            }]
        );
        assert_eq!(
            e.decisions,
            [
                json!({"kind": "cloudpass.dev/audit", "podUid": "u-1", "policy": "to-s3", "outcome": "denied", "time": "3"})
            ]
        );
    }

    #[test]
    fn without_deliveries_in_the_pod_they_are_its_listed_policies_by_the_brokers_rule() {
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orders-1", "namespace": "team", "uid": "u-1",
                         "annotations": {"cloudpass.dev/policies": "to-blob,gone"}},
            "spec": {"serviceAccountName": "orders",
                "initContainers": [{"name": "cloudpass-agent"}],
                "containers": [
                    {"name": "api", "env": [{"name": "IDENTITY_ENDPOINT", "value": "http://127.0.0.1:15022/msi/token"}]},
                    {"name": "sidecar"}]}}))
        .unwrap();
        let policy: AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "to-blob", "namespace": "team"},
            "spec": {"client": {"podSelector": {}}, "trustProviders": [{"name": "this-cluster"}],
                     "server": {"kind": "azure", "resource": "https://storage.azure.com/"},
                     "credentialProvider": {"name": "blob"}, "delivery": {"sdkEndpoint": {}}}}))
        .unwrap();
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap();
        let e = of(&pod, &namespace, &[policy], Ok(vec![]), 1);
        assert_eq!(
            e.deliveries,
            [Delivery {
                policy: "to-blob".into(),
                endpoint: "azureManagedIdentity :15022".into(),
                containers: vec!["api".into()]
            }],
            "a listed policy that no longer exists has no endpoint to show"
        );
    }
}
