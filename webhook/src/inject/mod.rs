//! The injection: a pure function from a pod as submitted and its namespace's compiled
//! config to what the webhook adds to it, warnings and an outcome. No I/O, so it is tested
//! table-driven and benchmarked in process. One concept per module:
//!
//! - `select`: whether the pod gets the agent at all and which policies select it, or
//!   why not ([`Skip`]);
//! - `deliver`: per policy, the SDK variables and mounts each selected container
//!   receives, and the agent's endpoint and evidence for it;
//! - `agent`: the agent container and the volumes it needs, named clear of the pod's;
//! - `patch`: [`Changes`], the additions, and the RFC 6902 operations that apply them to
//!   the pod's JSON as sent.

use std::{collections::BTreeMap, sync::Arc};

use cloudpass_api::{
    agent::{INJECTED_ANNOTATION, POLICIES_ANNOTATION, SKIPPED_ANNOTATION},
    config::NamespaceConfig,
};
use k8s_openapi::api::core::v1::Pod;

use self::agent::{AgentVolumes, VolumeNames};
pub use self::patch::{Changes, ContainerAdditions, ContainerList, PatchError};
use crate::files::WatchedText;

mod agent;
mod deliver;
mod patch;
mod select;

pub use cloudpass_api::endpoint::AgentPorts;

/// How the agent is injected; set by the webhook's flags.
#[derive(Clone, Debug)]
pub struct InjectSettings {
    /// Agent image.
    pub image: String,
    /// Agent image pull policy.
    pub pull_policy: String,
    /// Path of the agent binary in its image (for the exec postStart hook).
    pub agent_path: String,
    /// Broker base URL.
    pub broker_url: String,
    /// Where agents find the broker's CA bundle.
    pub broker_ca: BrokerCa,
    /// Agent ports.
    pub ports: AgentPorts,
    /// Lifetime of the projected token, seconds (the kubelet rotates it at 80%).
    pub token_seconds: i64,
    /// Version recorded in the `cloudpass.dev/injected` annotation.
    pub version: String,
    /// This cluster is not the broker's: agents name their namespace to the broker (the
    /// policies of the same namespace in the broker's cluster apply), and only policies
    /// with an empty pod selector apply, because the broker cannot see this cluster's
    /// pod labels.
    pub remote_cluster: bool,
}

/// Where injected agents find the broker's CA bundle.
#[derive(Clone, Debug)]
pub enum BrokerCa {
    /// In the ConfigMap of this name that the operator keeps in every opted-in namespace
    /// (see `cloudpass_operator::broker_ca`), projected beside the agent's token: a few
    /// bytes in the pod rather than the PEM, and the kubelet brings a rotated CA to
    /// running agents.
    ConfigMap(String),
    /// The PEM itself, in the agent's environment: for clusters where no operator keeps
    /// those copies (`--remote-cluster`). Watched: a pod gets the bundle current at its
    /// admission.
    Inline(Arc<WatchedText>),
}

impl BrokerCa {
    /// Whether agents can be given the CA (an inline bundle must have been read once).
    pub fn is_loaded(&self) -> bool {
        match self {
            Self::ConfigMap(_) => true,
            Self::Inline(pem) => pem.is_loaded(),
        }
    }
}

/// Why a pod was left without an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The pod says `cloudpass.dev/inject: "false"`.
    OptedOut,
    /// The pod already has the agent (reinvocation or re-admission).
    AlreadyInjected,
    /// No Ready policy of the namespace selects the pod.
    NoPolicy,
    /// `hostNetwork: true`: loopback would be the node's, shared with other pods.
    HostNetwork,
    /// A Windows pod: the agent is a Linux container.
    Windows,
    /// Policies select the pod but none of their containers exist, or every delivery
    /// conflicted with variables the containers already set.
    NothingToDeliver,
    /// A container of the pod (without the `cloudpass.dev/injected` annotation) is
    /// already named `cloudpass-agent`, the agent's name: the pod is admitted unchanged
    /// but for the `cloudpass.dev/injection-skipped` annotation.
    NameConflict,
}

impl Skip {
    /// Stable label for metrics and annotations.
    pub fn label(self) -> &'static str {
        match self {
            Self::OptedOut => "opted_out",
            Self::AlreadyInjected => "already_injected",
            Self::NoPolicy => "no_policy",
            Self::HostNetwork => "host_network",
            Self::Windows => "windows",
            Self::NothingToDeliver => "nothing_to_deliver",
            Self::NameConflict => "name_conflict",
        }
    }
}

/// The result of looking at one pod.
#[derive(Debug)]
pub struct Decision {
    /// What to add to the pod (`None`: unchanged); [`Changes::patch`] makes the JSON
    /// Patch of it. Set for a skip too when the pod only gets the
    /// `cloudpass.dev/injection-skipped` annotation ([`Skip::NameConflict`]).
    pub changes: Option<Changes>,
    /// Warnings for the admission response (shown by `kubectl`).
    pub warnings: Vec<String>,
    /// Policies served when injected.
    pub policies: Vec<String>,
    /// Why nothing was injected, if so.
    pub skipped: Option<Skip>,
}

impl Decision {
    fn skip(reason: Skip, warnings: Vec<String>) -> Self {
        Self { changes: None, warnings, policies: Vec::new(), skipped: Some(reason) }
    }

    /// Skips the pod, recording the warnings in its `cloudpass.dev/injection-skipped`
    /// annotation, where `kubectl describe` shows them after `kubectl` printed them.
    fn skip_annotated(reason: Skip, warnings: Vec<String>) -> Self {
        let changes = Changes {
            annotations: [(SKIPPED_ANNOTATION.to_owned(), warnings.join("; "))].into(),
            ..Changes::default()
        };
        Self { changes: Some(changes), warnings, policies: Vec::new(), skipped: Some(reason) }
    }
}

/// Decides whether and how to inject the agent into `pod`.
///
/// `identity_header` is a fresh random value for this pod (the Azure endpoint's proof);
/// the caller generates it so that this function stays deterministic.
pub fn decide(
    pod: &Pod,
    config: Option<&NamespaceConfig>,
    settings: &InjectSettings,
    identity_header: &str,
) -> Decision {
    let selected = match select::select(pod, config, settings) {
        Ok(selected) => selected,
        Err(skipped) => return *skipped,
    };
    let spec = pod.spec.as_ref().expect("select checked the spec");
    let mut volume_names = VolumeNames::of(pod);
    let names = AgentVolumes::claim(&mut volume_names);
    let mut delivered = deliver::deliver(spec, &selected, config, settings, identity_header, &names.shared);
    if delivered.deliveries.is_empty() {
        let mut warnings = delivered.warnings;
        warnings.push(format!(
            "cloudpass: AccessPolicy {} selects this pod but no container could receive its credentials; agent not injected",
            select::policy_names(&selected)
        ));
        return Decision::skip(Skip::NothingToDeliver, warnings);
    }
    let warnings = std::mem::take(&mut delivered.warnings);
    let served = std::mem::take(&mut delivered.served);
    let containers = std::mem::take(&mut delivered.containers);
    let (agent, volumes) = agent::build(
        settings,
        config,
        delivered,
        names,
        &mut volume_names,
        identity_header,
        spec.security_context.as_ref(),
    );

    let mut annotations = BTreeMap::new();
    annotations.insert(INJECTED_ANNOTATION.into(), settings.version.clone());
    annotations.insert(POLICIES_ANNOTATION.into(), served.join(","));
    if !warnings.is_empty() {
        annotations.insert(SKIPPED_ANNOTATION.into(), warnings.join("; "));
    }
    let changes = Changes {
        containers: containers.into_iter().filter(|a| !a.is_empty()).collect(),
        agent: Some(agent),
        volumes,
        annotations,
    };
    Decision { changes: Some(changes), warnings, policies: served, skipped: None }
}

#[cfg(test)]
mod tests;
