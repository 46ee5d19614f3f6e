//! Who can obtain a CredentialProvider's credential: through which AccessPolicies, as
//! which service accounts, verified by which TrustProviders, under which conditions, and
//! which running workloads that means now. The selection rule is the webhook's and the
//! broker's own ([`ClientSelector::selects`]); service-account globs are matched with the
//! broker's [`glob_matches`].

use std::collections::BTreeMap;

use cloudpass_api::{AccessPolicy, TrustProvider, selector::glob_matches};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde::Serialize;

/// One AccessPolicy through which the credential can be obtained.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Access {
    /// The AccessPolicy.
    pub policy: String,
    /// Its `Ready` condition: `True`, or `False`/`Unknown` with the reason (a policy that
    /// is not Ready gives nothing).
    pub ready: String,
    /// Service accounts it admits (`*`: any), after its own `client.serviceAccountName`.
    pub service_accounts: Vec<String>,
    /// Its pod selector, as `key=value,...` (`<all pods>` when empty).
    pub pod_selector: String,
    /// Each TrustProvider that must accept the caller, with what it requires.
    pub trust_providers: Vec<String>,
    /// Further conditions (time windows, lifetime cap).
    pub conditions: Vec<String>,
    /// Running workloads it selects now, with their pod counts.
    pub workloads: Vec<Workload>,
}

/// Pods of one owner (a Deployment, Job, StatefulSet...) that a policy selects.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// `Deployment/orders`, or `Pod/name` for a pod without a controller.
    pub owner: String,
    /// Service account its pods run as.
    pub service_account: String,
    /// How many of its pods are selected.
    pub pods: usize,
}

/// Everyone who can obtain `provider`'s credential through `policies`, given the
/// namespace's `trust` providers and `pods`.
pub fn of(provider: &str, policies: &[AccessPolicy], trust: &[TrustProvider], pods: &[Pod]) -> Vec<Access> {
    policies.iter().filter(|p| p.spec.credential_provider.name == provider).map(|p| access(p, trust, pods)).collect()
}

fn access(policy: &AccessPolicy, trust: &[TrustProvider], pods: &[Pod]) -> Access {
    let trust_of: BTreeMap<String, &TrustProvider> = trust.iter().map(|t| (t.name_any(), t)).collect();
    let named: Vec<(&str, Option<&&TrustProvider>)> =
        policy.spec.trust_providers.iter().map(|r| (r.name.as_str(), trust_of.get(&r.name))).collect();
    // This cluster's service-account globs, from every local kubernetesServiceAccount
    // provider (all must accept).
    let local_globs: Vec<&Vec<String>> = named
        .iter()
        .filter_map(|(_, t)| t.and_then(|t| t.spec.kubernetes_service_account.as_ref()))
        .filter(|k| k.issuer.is_none())
        .map(|k| &k.service_accounts)
        .collect();
    let account_admitted =
        |sa: &str| local_globs.iter().all(|globs| globs.is_empty() || globs.iter().any(|g| glob_matches(g, sa)));
    let service_accounts = match &policy.spec.client.service_account_name {
        Some(sa) if account_admitted(sa) => vec![sa.clone()],
        Some(_) => Vec::new(),
        None => {
            let globs: Vec<String> = local_globs.iter().find(|g| !g.is_empty()).map(|g| g.to_vec()).unwrap_or_default();
            if globs.is_empty() { vec!["*".into()] } else { globs }
        }
    };
    let trust_providers = named
        .iter()
        .map(|(name, t)| match t {
            None => format!("{name} (not found: the policy is not Ready)"),
            Some(t) => format!("{name} ({})", requirement(t)),
        })
        .collect();
    let mut workloads: BTreeMap<(String, String), usize> = BTreeMap::new();
    for pod in pods {
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        let running =
            pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_none_or(|p| p == "Running" || p == "Pending");
        if running && policy.spec.client.selects(&sa, Some(pod.labels())).is_ok() && account_admitted(&sa) {
            *workloads.entry((owner(pod), sa)).or_default() += 1;
        }
    }
    Access {
        policy: policy.name_any(),
        ready: crate::policy_ready(policy),
        service_accounts,
        pod_selector: selector_text(policy),
        trust_providers,
        conditions: conditions(policy),
        workloads: workloads
            .into_iter()
            .map(|((owner, service_account), pods)| Workload { owner, service_account, pods })
            .collect(),
    }
}

/// What a TrustProvider requires of the caller, in a few words.
fn requirement(t: &TrustProvider) -> String {
    let spec = &t.spec;
    if let Some(k) = &spec.kubernetes_service_account {
        let accounts = if k.service_accounts.is_empty() { "any".into() } else { k.service_accounts.join(",") };
        return match &k.issuer {
            None => format!("this cluster's service accounts: {accounts}"),
            Some(issuer) => format!("service accounts {accounts} of namespaces {} of {issuer}", k.namespaces.join(",")),
        };
    }
    spec.kind_name()
        .map_or_else(|| "unknown kind".into(), |kind| format!("{kind}: the pod proves it with its cloud identity"))
}

fn selector_text(policy: &AccessPolicy) -> String {
    let selector = &policy.spec.client.pod_selector;
    let mut parts: Vec<String> = selector.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for e in selector.match_expressions.iter().flatten() {
        parts.push(format!(
            "{} {} ({})",
            e.key,
            e.operator,
            e.values.iter().flatten().cloned().collect::<Vec<_>>().join(",")
        ));
    }
    if parts.is_empty() { "<all pods>".into() } else { parts.join(",") }
}

fn conditions(policy: &AccessPolicy) -> Vec<String> {
    let Some(c) = &policy.spec.conditions else { return Vec::new() };
    let mut out: Vec<String> = c
        .time_windows
        .iter()
        .map(|w| format!("time window {}", serde_json::to_string(w).unwrap_or_default()))
        .collect();
    if let Some(max) = &c.max_credential_lifetime {
        out.push(format!("credentials live at most {max}"));
    }
    out
}

/// `Deployment/x` for a pod of a Deployment's ReplicaSet, else the controller's kind and
/// name, else the pod itself.
fn owner(pod: &Pod) -> String {
    let Some(controller) = pod.owner_references().iter().find(|o| o.controller == Some(true)) else {
        return format!("Pod/{}", pod.name_any());
    };
    if controller.kind == "ReplicaSet"
        && let Some(hash) = pod.labels().get("pod-template-hash")
        && let Some(deployment) = controller.name.strip_suffix(&format!("-{hash}"))
    {
        return format!("Deployment/{deployment}");
    }
    format!("{}/{}", controller.kind, controller.name)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn policy(name: &str, client: serde_json::Value, trust: &[&str]) -> AccessPolicy {
        let trust: Vec<_> = trust.iter().map(|t| json!({"name": t})).collect();
        serde_json::from_value(json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"client": client, "trustProviders": trust, "server": {"kind": "aws"},
                     "credentialProvider": {"name": "s3"},
                     "conditions": {"maxCredentialLifetime": "15m"}}}))
        .unwrap()
    }

    fn trust(name: &str, accounts: &[&str]) -> TrustProvider {
        serde_json::from_value(json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": "TrustProvider",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"kubernetesServiceAccount": {"serviceAccounts": accounts}}}))
        .unwrap()
    }

    fn pod(name: &str, sa: &str, labels: serde_json::Value, owner: Option<(&str, &str)>) -> Pod {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "c", "image": "i"}]}});
        if let Some((kind, owner)) = owner {
            pod["metadata"]["ownerReferences"] =
                json!([{"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "u", "controller": true}]);
        }
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn the_selected_pods_of_admitted_service_accounts_grouped_by_workload() {
        let policies = [
            policy("orders-s3", json!({"podSelector": {"matchLabels": {"app": "orders"}}}), &["k8s"]),
            policy("unrelated", json!({"podSelector": {}}), &["k8s"]),
        ];
        let mut other = policies[1].clone();
        other.spec.credential_provider.name = "other".into();
        let pods = [
            pod(
                "orders-7d9f-a",
                "orders",
                json!({"app": "orders", "pod-template-hash": "7d9f"}),
                Some(("ReplicaSet", "orders-7d9f")),
            ),
            pod(
                "orders-7d9f-b",
                "orders",
                json!({"app": "orders", "pod-template-hash": "7d9f"}),
                Some(("ReplicaSet", "orders-7d9f")),
            ),
            pod("intruder", "default", json!({"app": "orders"}), None),
            pod("billing", "orders", json!({"app": "billing"}), None),
        ];
        let access = of("s3", &[policies[0].clone(), other], &[trust("k8s", &["orders", "jobs-*"])], &pods);
        assert_eq!(access.len(), 1, "only the policies of this provider");
        let a = &access[0];
        assert_eq!(a.service_accounts, ["orders", "jobs-*"]);
        assert_eq!(a.pod_selector, "app=orders");
        assert_eq!(a.trust_providers, ["k8s (this cluster's service accounts: orders,jobs-*)"]);
        assert_eq!(a.conditions, ["credentials live at most 15m"]);
        assert_eq!(
            a.workloads,
            [Workload { owner: "Deployment/orders".into(), service_account: "orders".into(), pods: 2 }]
        );
        assert_eq!(a.ready, "Unknown (not reconciled yet)");
    }

    #[test]
    fn a_service_account_the_trust_provider_refuses_gets_nothing_and_a_missing_provider_is_named() {
        let p = policy("p", json!({"podSelector": {}, "serviceAccountName": "batch"}), &["k8s", "gone"]);
        let pods = [pod("batch-1", "batch", json!({}), Some(("Job", "nightly")))];
        let a = &of("s3", &[p], &[trust("k8s", &["orders"])], &pods)[0];
        assert!(a.service_accounts.is_empty() && a.workloads.is_empty(), "{a:?}");
        assert_eq!(a.trust_providers[1], "gone (not found: the policy is not Ready)");
    }
}
