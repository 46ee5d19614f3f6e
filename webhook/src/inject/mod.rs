//! The injection decision and mutation: a pure function from a pod as submitted and its
//! namespace's compiled config to the mutated pod, warnings and an outcome. No I/O, so it
//! is tested table-driven and benchmarked in process.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use cloudpass_api::{
    INJECT_ANNOTATION,
    agent::{
        AGENT_CONFIG_ENV, AGENT_CONTAINER, AWS_CREDENTIALS_PATH, AWS_TOKEN_FILE, AZURE_TOKEN_PATH, AgentConfig,
        AgentDelivery, AgentEndpoint, BROKER_CA_ENV, EvidenceSource, INJECTED_ANNOTATION, POLICIES_ANNOTATION,
        SHARED_DIR, SKIPPED_ANNOTATION, TOKEN_DIR, TOKEN_FILE,
    },
    config::{CompiledPolicy, NamespaceConfig},
    policy::{ConfigMapKey, ServerKind},
    selector::selector_matches,
};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, ExecAction, KeyToPath, Lifecycle,
        LifecycleHandler, Pod, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
        ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::api::resource::Quantity,
};

pub use self::patch::{Changes, ContainerAdditions, ContainerList, PatchError};
use crate::files::WatchedText;

mod patch;

/// Names of the volumes the webhook adds (or, when the pod already has a volume of that
/// name, the first free one of `<name>-2`, `<name>-3`, ...: see [`VolumeNames`]).
const TOKEN_VOLUME: &str = "cloudpass-token";
const SHARED_VOLUME: &str = "cloudpass-shared";
const NO_API_TOKEN_VOLUME: &str = "cloudpass-no-kube-api-token";
/// Prefix of the volumes holding the CA bundles of policies' `server.tls`.
const SERVER_CA_VOLUME: &str = "cloudpass-server-ca";
/// How long the agent's postStart hook waits for the first credential.
const FIRST_CREDENTIAL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Mode of the agent's projected token file (see where the volume is built).
const TOKEN_FILE_MODE: i32 = 0o444;
/// Where the kubelet would mount the pod's Kubernetes API token.
const KUBE_API_TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Loopback ports of the agent's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ports {
    /// `/ready`, `/healthz`, `/metrics`.
    pub health: u16,
    /// AWS container credentials.
    pub aws: u16,
    /// Azure managed identity.
    pub azure: u16,
    /// GCP metadata server.
    pub gcp: u16,
    /// HTTP proxy (header and SigV4 deliveries).
    pub proxy: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self { health: 15020, aws: 15021, azure: 15022, gcp: 15023, proxy: 15024 }
    }
}

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
    /// Broker CA certificates (PEM), handed to every agent. Watched: a pod gets the
    /// bundle current at its admission.
    pub broker_ca: Arc<WatchedText>,
    /// Agent ports.
    pub ports: Ports,
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

    /// The pod these changes make of `pod`, which went through k8s-openapi (fields it
    /// does not know are gone): for tests and tools that hold a typed pod. Admission
    /// patches the JSON it was sent instead.
    pub fn mutated(&self, pod: &Pod) -> Result<Option<Pod>, PatchError> {
        let Some(changes) = &self.changes else { return Ok(None) };
        let mut json = serde_json::to_value(pod).map_err(|e| PatchError(e.to_string()))?;
        let patch = changes.patch(&json)?;
        json_patch::patch(&mut json, &patch).map_err(|e| PatchError(e.to_string()))?;
        serde_json::from_value(json).map(Some).map_err(|e| PatchError(e.to_string()))
    }
}

/// The volume names of a pod, for naming the webhook's volumes so that they never clash
/// with the pod's own (the apiserver refuses a pod with two volumes of one name).
struct VolumeNames(BTreeSet<String>);

impl VolumeNames {
    fn of(pod: &Pod) -> Self {
        Self(pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()).map(|v| v.name.clone()).collect())
    }

    /// `base` if free, else the first free `base-2`, `base-3`, ...; taken from now on.
    fn claim(&mut self, base: &str) -> String {
        let mut name = base.to_owned();
        let mut n = 1;
        while self.0.contains(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        self.0.insert(name.clone());
        name
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
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DeliveryKind {
    Aws,
    Azure,
    Gcp,
    Proxy,
}

fn delivery_kind(policy: &CompiledPolicy) -> Option<DeliveryKind> {
    if policy.delivery.sdk_endpoint.is_some() {
        return match policy.server.kind {
            ServerKind::Aws => Some(DeliveryKind::Aws),
            ServerKind::Azure => Some(DeliveryKind::Azure),
            ServerKind::Gcp => Some(DeliveryKind::Gcp),
            ServerKind::Http => None,
        };
    }
    Some(DeliveryKind::Proxy)
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn app_env(kind: DeliveryKind, ports: &Ports, identity_header: &str, existing: &[EnvVar]) -> Vec<EnvVar> {
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
    }
}

/// The cloud evidence the agent gathers for `policy`: one source per trust provider that
/// needs more than the pod's token. `oidc` evidence comes from outside any pod.
fn evidence(policy: &CompiledPolicy, config: Option<&NamespaceConfig>) -> Vec<EvidenceSource> {
    let Some(config) = config else { return vec![] };
    policy
        .trust_providers
        .iter()
        .filter_map(|name| {
            let spec = config.trust_providers.get(name)?;
            let trust_provider = name.clone();
            if spec.aws_role.is_some() {
                Some(EvidenceSource::AwsGetCallerIdentity { trust_provider })
            } else if let Some(azure) = &spec.azure_managed_identity {
                Some(EvidenceSource::AzureManagedIdentity {
                    trust_provider,
                    resource: azure.audiences.first()?.clone(),
                    client_id: match azure.client_ids.as_slice() {
                        [one] => Some(one.clone()),
                        _ => None,
                    },
                })
            } else if let Some(gcp) = &spec.gcp_identity_token {
                Some(EvidenceSource::GcpIdentityToken { trust_provider, audience: gcp.audiences.first()?.clone() })
            } else {
                None
            }
        })
        .collect()
}

fn endpoint(policy: &CompiledPolicy, kind: DeliveryKind, ports: &Ports) -> AgentEndpoint {
    let upstream_port = policy.server.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(443);
    let ca_file = policy.server.tls.as_ref().map(|_| cloudpass_api::agent::server_ca_file(&policy.name));
    match kind {
        DeliveryKind::Aws => AgentEndpoint::AwsContainerCredentials { port: ports.aws },
        DeliveryKind::Azure => AgentEndpoint::AzureManagedIdentity {
            port: ports.azure,
            resource: policy.server.resource.clone().unwrap_or_default(),
        },
        DeliveryKind::Gcp => AgentEndpoint::GcpMetadata {
            port: ports.gcp,
            scopes: if policy.server.scopes.is_empty() {
                vec!["https://www.googleapis.com/auth/cloud-platform".into()]
            } else {
                policy.server.scopes.clone()
            },
        },
        DeliveryKind::Proxy => match (&policy.delivery.http_header, &policy.delivery.aws_sig_v4) {
            (Some(h), _) => AgentEndpoint::HttpHeader {
                port: ports.proxy,
                hosts: policy.server.hosts.clone(),
                upstream_port,
                name: h.name.clone(),
                format: h.format.clone(),
                ca_file,
            },
            (None, sig) => AgentEndpoint::AwsSigV4 {
                port: ports.proxy,
                hosts: policy.server.hosts.clone(),
                upstream_port,
                service: sig.as_ref().and_then(|s| s.service.clone()),
                region: sig.as_ref().and_then(|s| s.region.clone()),
                ca_file,
            },
        },
    }
}

fn selector_is_empty(selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> bool {
    selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector.match_expressions.as_ref().is_none_or(|m| m.is_empty())
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
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let forced = annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("true");
    if annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("false") {
        return Decision::skip(Skip::OptedOut, vec![]);
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Decision::skip(Skip::NoPolicy, vec!["pod has no spec".into()]);
    };
    if annotations.contains_key(INJECTED_ANNOTATION) {
        return Decision::skip(Skip::AlreadyInjected, vec![]);
    }

    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let service_account = spec.service_account_name.as_deref().unwrap_or("default");
    let selected: Vec<&CompiledPolicy> = config
        .map(|c| {
            c.policies
                .iter()
                .filter(|p| selector_matches(&p.client.pod_selector, &labels))
                .filter(|p| !settings.remote_cluster || selector_is_empty(&p.client.pod_selector))
                .filter(|p| p.client.service_account_name.as_deref().is_none_or(|sa| sa == service_account))
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
        return Decision::skip(Skip::NoPolicy, warnings);
    }
    let policy_names = || selected.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
    if spec.host_network == Some(true) {
        return Decision::skip(
            Skip::HostNetwork,
            vec![format!(
                "cloudpass: not injected although AccessPolicy {} selects this pod: hostNetwork pods share the node's loopback, where the agent's endpoints would be reachable by other workloads",
                policy_names()
            )],
        );
    }
    let windows = spec.node_selector.as_ref().and_then(|s| s.get("kubernetes.io/os")).map(String::as_str)
        == Some("windows")
        || spec.os.as_ref().is_some_and(|os| os.name == "windows");
    if windows {
        return Decision::skip(
            Skip::Windows,
            vec![format!(
                "cloudpass: not injected although AccessPolicy {} selects this pod: the agent runs on Linux nodes only",
                policy_names()
            )],
        );
    }

    // Without the annotation, a container of the agent's name is the app's own (or an
    // agent copied from another pod's spec): a second one would make the apiserver
    // refuse the pod, renaming ours would break what finds the agent by name.
    if spec.init_containers.iter().flatten().chain(&spec.containers).any(|c| c.name == AGENT_CONTAINER) {
        return Decision::skip_annotated(
            Skip::NameConflict,
            vec![format!(
                "cloudpass: not injected although AccessPolicy {} selects this pod: a container is already named {AGENT_CONTAINER}, the name of the agent; rename it",
                policy_names()
            )],
        );
    }

    let mut warnings = Vec::new();
    let mut volume_names = VolumeNames::of(pod);
    let token_volume = volume_names.claim(TOKEN_VOLUME);
    let no_api_token_volume = volume_names.claim(NO_API_TOKEN_VOLUME);
    let shared_volume = volume_names.claim(SHARED_VOLUME);
    let mut deliveries: Vec<AgentDelivery> = Vec::new();
    let mut served: Vec<String> = Vec::new();
    let mut needs_shared = false;
    // Policies whose proxied server has a private CA, and its ConfigMap.
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

    for policy in &selected {
        let Some(kind) = delivery_kind(policy) else { continue };
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
                // Azure (per resource) and the proxy (per host) share one endpoint.
                if matches!(kind, DeliveryKind::Azure | DeliveryKind::Proxy) {
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
            let mounts_shared_dir = target.mounts().any(|m| m.mount_path.trim_end_matches('/') == SHARED_DIR);
            if kind == DeliveryKind::Aws && mounts_shared_dir {
                warnings.push(format!(
                    "cloudpass: container {} already mounts a volume at {SHARED_DIR}, where the credentials of AccessPolicy {} need their own; left unchanged",
                    container.name, policy.name
                ));
                continue;
            }
            target.added.env.extend(app_env(kind, &settings.ports, identity_header, &existing));
            if kind == DeliveryKind::Aws {
                target.added.volume_mounts.push(VolumeMount {
                    name: shared_volume.clone(),
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
            deliveries.push(AgentDelivery {
                policy: policy.name.clone(),
                endpoint: endpoint(policy, kind, &settings.ports),
                evidence: evidence(policy, config),
            });
            served.push(policy.name.clone());
        }
    }

    if deliveries.is_empty() {
        warnings.push(format!(
            "cloudpass: AccessPolicy {} selects this pod but no container could receive its credentials; agent not injected",
            policy_names()
        ));
        return Decision::skip(Skip::NothingToDeliver, warnings);
    }

    let agent_config = AgentConfig {
        broker_url: settings.broker_url.clone(),
        health_port: settings.ports.health,
        deliveries,
        policy_namespace: config.filter(|_| settings.remote_cluster).map(|c| c.namespace.clone()),
    };
    let mut agent_env = vec![
        env(AGENT_CONFIG_ENV, serde_json::to_string(&agent_config).expect("agent config serializes")),
        env(BROKER_CA_ENV, settings.broker_ca.get().to_string()),
    ];
    if uses_azure {
        agent_env.push(env("IDENTITY_HEADER", identity_header));
    }
    let mut agent_mounts = vec![
        VolumeMount {
            name: token_volume.clone(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        // An empty directory over the default service-account mount: the agent needs no
        // Kubernetes API token (least privilege), and the ServiceAccount admission plugin
        // then leaves the agent alone, so the apiserver does not call the webhook twice.
        VolumeMount {
            name: no_api_token_volume.clone(),
            mount_path: KUBE_API_TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    if needs_shared {
        agent_mounts.push(VolumeMount {
            name: shared_volume.clone(),
            mount_path: SHARED_DIR.into(),
            ..Default::default()
        });
    }
    let server_ca_volumes: Vec<String> =
        (0..server_cas.len()).map(|i| volume_names.claim(&format!("{SERVER_CA_VOLUME}-{i}"))).collect();
    for ((policy, _), volume) in server_cas.iter().zip(&server_ca_volumes) {
        let file = cloudpass_api::agent::server_ca_file(policy);
        agent_mounts.push(VolumeMount {
            name: volume.clone(),
            mount_path: file.trim_end_matches("/ca.crt").to_owned(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let agent = agent_container(settings, agent_env, agent_mounts);

    let mut volumes = Vec::new();
    volumes.push(Volume {
        name: token_volume,
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(cloudpass_api::BROKER_AUDIENCE.into()),
                    expiration_seconds: Some(settings.token_seconds),
                    path: TOKEN_FILE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            // The kubelet writes the token as root and hands its ownership to the pod's
            // user only when every container runs as the same UID, which an app seldom
            // does with the agent's 65532; 0440 then left the agent unable to read it.
            // Only the agent mounts this volume, so readable-by-all means by the agent.
            default_mode: Some(TOKEN_FILE_MODE),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: no_api_token_volume,
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("1Ki".into())),
            ..Default::default()
        }),
        ..Default::default()
    });
    for ((_, config_map), volume) in server_cas.iter().zip(server_ca_volumes) {
        volumes.push(Volume {
            name: volume,
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.name.clone(),
                items: Some(vec![KeyToPath {
                    key: config_map.key.clone(),
                    path: "ca.crt".into(),
                    ..Default::default()
                }]),
                // Required: a pod whose server CA is missing stays pending with an Event
                // naming it, rather than starting an agent that cannot reach the server.
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if needs_shared {
        volumes.push(Volume {
            name: shared_volume,
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut annotations = BTreeMap::new();
    annotations.insert(INJECTED_ANNOTATION.into(), settings.version.clone());
    annotations.insert(POLICIES_ANNOTATION.into(), served.join(","));
    if !warnings.is_empty() {
        annotations.insert(SKIPPED_ANNOTATION.into(), warnings.join("; "));
    }
    let changes = Changes {
        containers: containers.into_iter().map(|t| t.added).filter(|a| !a.is_empty()).collect(),
        agent: Some(agent),
        volumes,
        annotations,
    };
    Decision { changes: Some(changes), warnings, policies: served, skipped: None }
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

fn agent_container(settings: &InjectSettings, env: Vec<EnvVar>, volume_mounts: Vec<VolumeMount>) -> Container {
    let quantity = |q: &str| Quantity(q.into());
    Container {
        name: AGENT_CONTAINER.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        // A native sidecar: started before the app containers, stopped after them, and
        // it does not keep a Job from completing.
        restart_policy: Some("Always".into()),
        env: Some(env),
        volume_mounts: Some(volume_mounts),
        // The kubelet starts the next container once this hook returns, which it does the
        // moment the first credential is there (a startup probe would pass only at its
        // next period, a second later at best). It runs inside the container: the agent's
        // endpoints listen on loopback only. Without a credential by then it fails, with
        // the reason in the FailedPostStartHook Event, and the kubelet restarts the agent.
        lifecycle: Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        settings.agent_path.clone(),
                        "probe".into(),
                        format!("--wait={}s", FIRST_CREDENTIAL_WAIT.as_secs()),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some([("cpu".to_owned(), quantity("10m")), ("memory".to_owned(), quantity("16Mi"))].into()),
            limits: Some([("memory".to_owned(), quantity("64Mi"))].into()),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
