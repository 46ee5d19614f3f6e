//! The decision: whether a pod gets the agent at all, and which policies select it; or
//! why not ([`Skip`]), with the warning `kubectl` shows.

use cloudpass_api::{
    INJECT_ANNOTATION,
    agent::{AGENT_CONTAINER, INJECTED_ANNOTATION},
    config::{CompiledPolicy, NamespaceConfig},
};
use k8s_openapi::api::core::v1::Pod;

use super::{Decision, InjectSettings, Skip};

/// The Ready policies of the namespace that select `pod`, in the config's order (by
/// name); or the decision to leave the pod without an agent, when the pod opted out, is
/// already injected, is selected by none, runs on the host network or Windows, or already
/// has a container of the agent's name.
pub(super) fn select<'c>(
    pod: &Pod,
    config: Option<&'c NamespaceConfig>,
    settings: &InjectSettings,
) -> Result<Vec<&'c CompiledPolicy>, Box<Decision>> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let forced = annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("true");
    if annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("false") {
        return Err(Box::new(Decision::skip(Skip::OptedOut, vec![])));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Err(Box::new(Decision::skip(Skip::NoPolicy, vec!["pod has no spec".into()])));
    };
    if annotations.contains_key(INJECTED_ANNOTATION) {
        return Err(Box::new(Decision::skip(Skip::AlreadyInjected, vec![])));
    }

    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let service_account = spec.service_account_name.as_deref().unwrap_or("default");
    let selected: Vec<&CompiledPolicy> = config
        .map(|c| {
            c.policies
                .iter()
                .filter(|p| p.client.selects(service_account, (!settings.remote_cluster).then_some(&labels)).is_ok())
                .collect()
        })
        .unwrap_or_default();
    if selected.is_empty() {
        let warnings = if forced {
            vec![format!(
                "cloudpass: {INJECT_ANNOTATION}=true but no Ready AccessPolicy of this namespace selects the pod; nothing injected"
            )]
        } else {
            vec![]
        };
        return Err(Box::new(Decision::skip(Skip::NoPolicy, warnings)));
    }
    if spec.host_network == Some(true) {
        return Err(Box::new(Decision::skip(
            Skip::HostNetwork,
            vec![format!(
                "cloudpass: not injected although AccessPolicy {} selects this pod: hostNetwork pods share the node's loopback, where the agent's endpoints would be reachable by other workloads",
                policy_names(&selected)
            )],
        )));
    }
    let windows = spec.node_selector.as_ref().and_then(|s| s.get("kubernetes.io/os")).map(String::as_str)
        == Some("windows")
        || spec.os.as_ref().is_some_and(|os| os.name == "windows");
    if windows {
        return Err(Box::new(Decision::skip(
            Skip::Windows,
            vec![format!(
                "cloudpass: not injected although AccessPolicy {} selects this pod: the agent runs on Linux nodes only",
                policy_names(&selected)
            )],
        )));
    }

    // Without the annotation, a container of the agent's name is the app's own (or an
    // agent copied from another pod's spec): a second one would make the apiserver
    // refuse the pod, renaming ours would break what finds the agent by name.
    if spec.init_containers.iter().flatten().chain(&spec.containers).any(|c| c.name == AGENT_CONTAINER) {
        return Err(Box::new(Decision::skip_annotated(
            Skip::NameConflict,
            vec![format!(
                "cloudpass: not injected although AccessPolicy {} selects this pod: a container is already named {AGENT_CONTAINER}, the name of the agent; rename it",
                policy_names(&selected)
            )],
        )));
    }
    Ok(selected)
}

/// The names of `policies`, for warnings.
pub(super) fn policy_names(policies: &[&CompiledPolicy]) -> String {
    policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
}
