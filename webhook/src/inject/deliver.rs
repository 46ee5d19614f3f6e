//! What each selected container receives: per policy, the delivery (AWS, Azure, GCP
//! endpoint or the proxy), the SDK variables appended to each container it names (unless
//! the container already has its own setup, which is kept with a warning), and the
//! agent's side of it: the endpoint and the cloud evidence to gather.

use std::collections::BTreeMap;

use cloudpass_api::{
    agent::{AWS_CREDENTIALS_PATH, AWS_TOKEN_FILE, AZURE_TOKEN_PATH, AgentDelivery, SHARED_DIR},
    config::{CompiledPolicy, NamespaceConfig},
    endpoint::{AgentPorts, DeliveryKind, agent_delivery},
    policy::ConfigMapKey,
};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, VolumeMount};

use super::{ContainerAdditions, ContainerList, InjectSettings};

/// What the selected policies deliver into one pod.
pub(super) struct Delivered {
    /// One per policy served, for the agent's config.
    pub deliveries: Vec<AgentDelivery>,
    /// The names of the policies served.
    pub served: Vec<String>,
    /// Containers or policies left out, and why.
    pub warnings: Vec<String>,
    /// What is appended to each container (empty ones included).
    pub containers: Vec<ContainerAdditions>,
    /// An AWS or file delivery needs the shared in-memory volume.
    pub needs_shared: bool,
    /// Policies whose proxied server has a private CA, and its ConfigMap.
    pub server_cas: Vec<(String, ConfigMapKey)>,
    /// An Azure delivery: the agent checks the per-pod `IDENTITY_HEADER`.
    pub uses_azure: bool,
}

/// Delivers each of `selected` into the containers of `spec` it names (all by default),
/// init containers included; `shared_volume` is the name of the volume AWS token files
/// are mounted from.
pub(super) fn deliver(
    spec: &PodSpec,
    selected: &[&CompiledPolicy],
    config: Option<&NamespaceConfig>,
    settings: &InjectSettings,
    identity_header: &str,
    shared_volume: &str,
) -> Delivered {
    let mut warnings = Vec::new();
    let mut deliveries: Vec<AgentDelivery> = Vec::new();
    let mut served: Vec<String> = Vec::new();
    let mut needs_shared = false;
    let mut server_cas: Vec<(String, ConfigMapKey)> = Vec::new();
    let mut uses_azure = false;
    // Per container: the delivery kinds already given, to give each single-valued endpoint once.
    let mut given: BTreeMap<String, Vec<DeliveryKind>> = BTreeMap::new();
    // Init containers too: the agent, a native sidecar inserted first, is running before
    // any of them starts, so a migration or a download step gets credentials like the app.
    let mut containers: Vec<Target> = (spec.init_containers.iter().flatten().enumerate())
        .map(|(i, c)| Target::new(ContainerList::Init, i, c))
        .chain(spec.containers.iter().enumerate().map(|(i, c)| Target::new(ContainerList::App, i, c)))
        .collect();

    for &policy in selected {
        let Some(kind) = DeliveryKind::of(&policy.server, &policy.delivery) else { continue };
        let targets: Vec<usize> = containers
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                policy.client.containers.is_empty() || policy.client.containers.contains(&t.container.name)
            })
            .map(|(i, _)| i)
            .collect();
        if targets.is_empty() {
            warnings.push(format!(
                "cloudpass: AccessPolicy {} names containers [{}], none of which is in this pod",
                policy.name,
                policy.client.containers.join(", ")
            ));
            continue;
        }
        let mut delivered = false;
        for i in targets {
            let target = &mut containers[i];
            let container = target.container;
            let existing = target.env();
            let kinds = given.entry(container.name.clone()).or_default();
            if kinds.contains(&kind) {
                // Azure (per resource) and the proxy (per host) share one endpoint; files
                // share the one volume.
                if matches!(kind, DeliveryKind::Azure | DeliveryKind::Proxy | DeliveryKind::File) {
                    delivered = true;
                } else {
                    warnings.push(format!(
                        "cloudpass: container {} already receives {kind:?} credentials from another policy; AccessPolicy {} skipped for it",
                        container.name, policy.name
                    ));
                }
                continue;
            }
            if let Some(var) = conflicting_vars(&kind).iter().find(|v| existing.iter().any(|e| &e.name == *v)) {
                warnings.push(format!(
                    "cloudpass: container {} sets {var}, which the SDK would use instead of (or which would override) the credentials of AccessPolicy {}; left unchanged",
                    container.name, policy.name
                ));
                continue;
            }
            let uses_shared = matches!(kind, DeliveryKind::Aws | DeliveryKind::File);
            let has_shared = target.added.volume_mounts.iter().any(|m| m.name == shared_volume);
            let mounts_shared_dir = target.mounts().any(|m| m.mount_path.trim_end_matches('/') == SHARED_DIR);
            if uses_shared && mounts_shared_dir && !has_shared {
                warnings.push(format!(
                    "cloudpass: container {} already mounts a volume at {SHARED_DIR}, where the credentials of AccessPolicy {} need their own; left unchanged",
                    container.name, policy.name
                ));
                continue;
            }
            target.added.env.extend(app_env(kind, &settings.ports, identity_header, &existing));
            if uses_shared && !has_shared {
                target.added.volume_mounts.push(VolumeMount {
                    name: shared_volume.to_owned(),
                    mount_path: SHARED_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                });
                needs_shared = true;
            }
            uses_azure |= kind == DeliveryKind::Azure;
            kinds.push(kind);
            delivered = true;
        }
        if delivered {
            if let (DeliveryKind::Proxy, Some(tls)) = (kind, &policy.server.tls) {
                server_cas.push((policy.name.clone(), tls.ca_config_map.clone()));
            }
            deliveries.extend(agent_delivery(policy, config, &settings.ports));
            served.push(policy.name.clone());
        }
    }
    Delivered {
        deliveries,
        served,
        warnings,
        containers: containers.into_iter().map(|t| t.added).collect(),
        needs_shared,
        server_cas,
        uses_azure,
    }
}

/// Environment variables an SDK prefers over (or that would be overwritten by) each
/// delivery; a container setting one of them keeps its own setup and gets a warning.
fn conflicting_vars(kind: &DeliveryKind) -> &'static [&'static str] {
    match kind {
        DeliveryKind::Aws => &[
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ACCESS_KEY_ID",
        ],
        DeliveryKind::Azure => &[
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "MSI_ENDPOINT",
            "MSI_SECRET",
            "AZURE_FEDERATED_TOKEN_FILE",
            "AZURE_CLIENT_SECRET",
            "AZURE_CLIENT_CERTIFICATE_PATH",
        ],
        DeliveryKind::Gcp => &["GCE_METADATA_HOST", "GCE_METADATA_IP", "GOOGLE_APPLICATION_CREDENTIALS"],
        DeliveryKind::Proxy => &["HTTP_PROXY", "http_proxy"],
        DeliveryKind::File => &[],
    }
}

pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn app_env(kind: DeliveryKind, ports: &AgentPorts, identity_header: &str, existing: &[EnvVar]) -> Vec<EnvVar> {
    let local = |port: u16| format!("127.0.0.1:{port}");
    match kind {
        DeliveryKind::Aws => vec![
            env("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("http://{}{AWS_CREDENTIALS_PATH}", local(ports.aws))),
            env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", format!("{SHARED_DIR}/{AWS_TOKEN_FILE}")),
        ],
        DeliveryKind::Azure => vec![
            env("IDENTITY_ENDPOINT", format!("http://{}{AZURE_TOKEN_PATH}", local(ports.azure))),
            env("IDENTITY_HEADER", identity_header),
        ],
        DeliveryKind::Gcp => vec![env("GCE_METADATA_HOST", local(ports.gcp)), env("GCE_METADATA_IP", local(ports.gcp))],
        DeliveryKind::Proxy => {
            let proxy = format!("http://{}", local(ports.proxy));
            let mut vars = vec![env("HTTP_PROXY", proxy.clone()), env("http_proxy", proxy)];
            // Keep in-cluster and loopback traffic off the proxy, unless the app decided.
            if !existing.iter().any(|e| e.name == "NO_PROXY" || e.name == "no_proxy") {
                let no_proxy = "localhost,127.0.0.1,::1,.svc,.cluster.local";
                vars.push(env("NO_PROXY", no_proxy));
                vars.push(env("no_proxy", no_proxy));
            }
            vars
        }
        // The file's place is the volume; the app reads it at SHARED_DIR/<name>.
        DeliveryKind::File => vec![],
    }
}

/// One of the pod's containers as submitted, and what the webhook appends to it.
struct Target<'a> {
    container: &'a Container,
    added: ContainerAdditions,
}

impl<'a> Target<'a> {
    fn new(list: ContainerList, index: usize, container: &'a Container) -> Self {
        Self { container, added: ContainerAdditions::new(list, index, &container.name) }
    }

    /// Its variables: the pod's, then those appended so far.
    fn env(&self) -> Vec<EnvVar> {
        self.container.env.iter().flatten().chain(&self.added.env).cloned().collect()
    }

    /// Its mounts: the pod's, then those appended so far.
    fn mounts(&self) -> impl Iterator<Item = &VolumeMount> {
        self.container.volume_mounts.iter().flatten().chain(&self.added.volume_mounts)
    }
}
