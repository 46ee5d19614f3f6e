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

use crate::files::WatchedText;

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
    /// The pod to store (`None`: unchanged). Set for a skip too when the pod only gets
    /// the `cloudpass.dev/injection-skipped` annotation ([`Skip::NameConflict`]).
    pub mutated: Option<Pod>,
    /// Warnings for the admission response (shown by `kubectl`).
    pub warnings: Vec<String>,
    /// Policies served when injected.
    pub policies: Vec<String>,
    /// Why nothing was injected, if so.
    pub skipped: Option<Skip>,
}

impl Decision {
    fn skip(reason: Skip, warnings: Vec<String>) -> Self {
        Self { mutated: None, warnings, policies: Vec::new(), skipped: Some(reason) }
    }

    /// Skips `pod`, recording the warnings in its `cloudpass.dev/injection-skipped`
    /// annotation, where `kubectl describe` shows them after `kubectl` printed them.
    fn skip_annotated(pod: &Pod, reason: Skip, warnings: Vec<String>) -> Self {
        let mut annotated = pod.clone();
        annotated
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(SKIPPED_ANNOTATION.into(), warnings.join("; "));
        Self { mutated: Some(annotated), warnings, policies: Vec::new(), skipped: Some(reason) }
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
            pod,
            Skip::NameConflict,
            vec![format!(
                "cloudpass: not injected although AccessPolicy {} selects this pod: a container is already named {AGENT_CONTAINER}, the name of the agent; rename it",
                policy_names()
            )],
        );
    }

    let mut warnings = Vec::new();
    let mut mutated = pod.clone();
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
    let spec = mutated.spec.as_mut().expect("checked");
    let mut containers: Vec<&mut Container> =
        spec.init_containers.iter_mut().flatten().chain(spec.containers.iter_mut()).collect();

    for policy in &selected {
        let Some(kind) = delivery_kind(policy) else { continue };
        let targets: Vec<usize> = containers
            .iter()
            .enumerate()
            .filter(|(_, c)| policy.client.containers.is_empty() || policy.client.containers.contains(&c.name))
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
            let container = &mut *containers[i];
            let existing = container.env.clone().unwrap_or_default();
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
            let mounts_shared_dir =
                container.volume_mounts.iter().flatten().any(|m| m.mount_path.trim_end_matches('/') == SHARED_DIR);
            if kind == DeliveryKind::Aws && mounts_shared_dir {
                warnings.push(format!(
                    "cloudpass: container {} already mounts a volume at {SHARED_DIR}, where the credentials of AccessPolicy {} need their own; left unchanged",
                    container.name, policy.name
                ));
                continue;
            }
            let mut new_env = existing.clone();
            new_env.extend(app_env(kind, &settings.ports, identity_header, &existing));
            container.env = Some(new_env);
            if kind == DeliveryKind::Aws {
                container.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
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

    drop(containers);
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

    let spec = mutated.spec.as_mut().expect("checked");
    spec.init_containers.get_or_insert_with(Vec::new).insert(0, agent);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
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
    let annotations = mutated.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(INJECTED_ANNOTATION.into(), settings.version.clone());
    annotations.insert(POLICIES_ANNOTATION.into(), served.join(","));
    if !warnings.is_empty() {
        annotations.insert(SKIPPED_ANNOTATION.into(), warnings.join("; "));
    }
    Decision { mutated: Some(mutated), warnings, policies: served, skipped: None }
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
mod tests {
    use cloudpass_api::config::NamespaceConfig;
    use serde_json::json;

    use super::*;

    fn settings() -> InjectSettings {
        InjectSettings {
            image: "ghcr.io/cloudpass-dev/cloudpass-agent:test".into(),
            pull_policy: "IfNotPresent".into(),
            agent_path: "/usr/local/bin/cloudpass-agent".into(),
            broker_url: "https://broker".into(),
            broker_ca: WatchedText::fixed("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"),
            ports: Ports::default(),
            token_seconds: 3600,
            version: "0.1.0".into(),
            remote_cluster: false,
        }
    }

    /// A config with the given policies (JSON specs of CompiledPolicy).
    fn config(policies: serde_json::Value) -> NamespaceConfig {
        let policies: Vec<CompiledPolicy> = serde_json::from_value(policies).unwrap();
        let trust =
            [("k8s".to_owned(), serde_json::from_value(json!({"kubernetesServiceAccount": {}})).unwrap())].into();
        let cred = [(
            "cred".to_owned(),
            serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap(),
        )]
        .into();
        NamespaceConfig::new("team", trust, cred, policies)
    }

    fn policy(name: &str, server: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
        let mut p = json!({
            "name": name,
            "client": {"podSelector": {"matchLabels": {"app": "web"}}},
            "trustProviders": ["k8s"],
            "server": server,
            "credentialProvider": "cred",
            "delivery": {"sdkEndpoint": {}},
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "labels": {"app": "web"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn app(name: &str) -> serde_json::Value {
        json!({"name": name, "image": "app:1"})
    }

    fn env_of(pod: &Pod, container: &str) -> BTreeMap<String, String> {
        let spec = pod.spec.as_ref().unwrap();
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .find(|c| c.name == container)
            .unwrap()
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    fn aws() -> serde_json::Value {
        json!({"kind": "aws"})
    }

    #[test]
    fn injects_a_native_sidecar_first_with_env_volumes_and_annotations() {
        let cfg = config(json!([policy("s3", aws(), json!({}))]));
        let submitted =
            pod(json!({"initContainers": [{"name": "migrate", "image": "m:1"}], "containers": [app("web")]}));
        let d = decide(&submitted, Some(&cfg), &settings(), "proof");
        assert!(d.skipped.is_none() && d.warnings.is_empty(), "{d:?}");
        let p = d.mutated.unwrap();
        let spec = p.spec.as_ref().unwrap();
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init[0].name, AGENT_CONTAINER, "the agent starts before other init containers");
        assert_eq!(init[1].name, "migrate");
        let agent = &init[0];
        assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
        let sc = agent.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let hook = agent.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()).and_then(|h| h.exec.as_ref());
        assert_eq!(
            hook.and_then(|e| e.command.clone()).unwrap(),
            ["/usr/local/bin/cloudpass-agent", "probe", "--wait=60s"],
            "the app starts once the agent's first credential is there"
        );
        assert!(agent.startup_probe.is_none(), "a probe's period would delay the app");
        let agent_env: BTreeMap<_, _> =
            agent.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap())).collect();
        let agent_config: AgentConfig = serde_json::from_str(&agent_env[AGENT_CONFIG_ENV]).unwrap();
        assert_eq!(agent_config.deliveries[0].policy, "s3");
        assert_eq!(agent_config.deliveries[0].endpoint, AgentEndpoint::AwsContainerCredentials { port: 15021 });
        // The token volume is the agent's alone.
        let token_mounts: Vec<_> = spec
            .containers
            .iter()
            .chain(init.iter())
            .filter(|c| c.volume_mounts.iter().flatten().any(|m| m.name == TOKEN_VOLUME))
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(token_mounts, [AGENT_CONTAINER]);
        let shadowed = agent.volume_mounts.iter().flatten().find(|m| m.mount_path == KUBE_API_TOKEN_DIR).unwrap();
        assert_eq!(shadowed.name, NO_API_TOKEN_VOLUME, "the agent gets no Kubernetes API token");
        let token = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let projection =
            token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone().unwrap();
        assert_eq!(projection.audience.as_deref(), Some("cloudpass"));
        let env = env_of(&p, "web");
        assert_eq!(env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], "http://127.0.0.1:15021/v1/aws/credentials");
        assert_eq!(env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"], format!("{SHARED_DIR}/{AWS_TOKEN_FILE}"));
        let ann = p.metadata.annotations.unwrap();
        assert_eq!(ann[INJECTED_ANNOTATION], "0.1.0");
        assert_eq!(ann[POLICIES_ANNOTATION], "s3");
    }

    #[test]
    fn the_agent_is_told_which_cloud_evidence_each_policy_needs() {
        let trust = |spec: serde_json::Value| serde_json::from_value(spec).unwrap();
        let trust = [
            ("k8s".to_owned(), trust(json!({"kubernetesServiceAccount": {}}))),
            ("aws-role".to_owned(), trust(json!({"awsRole": {"accountIds": ["123456789012"]}}))),
            (
                "azure-mi".to_owned(),
                trust(json!({"azureManagedIdentity": {"tenantId": "8c1d3f0e-7b6a-4e55-9f21-0a3b5c7d9e11",
                    "audiences": ["api://cloudpass", "api://other"], "objectIds": ["0b7e6d5c-4a39-4e28-8f17-2d3c4b5a6978"],
                    "clientIds": ["4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55"]}})),
            ),
            (
                "gcp-id".to_owned(),
                trust(json!({"gcpIdentityToken": {"audiences": ["https://cloudpass.example"], "projectIds": ["p"]}})),
            ),
            ("ci".to_owned(), trust(json!({"oidc": {"issuer": "https://ci.example", "audiences": ["c"], "subjects": ["s"]}}))),
        ]
        .into();
        let cred = [(
            "cred".to_owned(),
            serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap(),
        )]
        .into();
        let all = json!({"trustProviders": ["k8s", "aws-role", "azure-mi", "gcp-id", "ci"]});
        let policies = serde_json::from_value(json!([
            policy("s3", aws(), all),
            policy("plain", json!({"kind": "gcp"}), json!({}))
        ]))
        .unwrap();
        let cfg = NamespaceConfig::new("team", trust, cred, policies);
        let d = decide(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "proof");
        let p = d.mutated.unwrap();
        let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let json = agent.env.iter().flatten().find(|e| e.name == AGENT_CONFIG_ENV).unwrap().value.clone().unwrap();
        let agent_config: AgentConfig = serde_json::from_str(&json).unwrap();
        let evidence =
            |policy: &str| agent_config.deliveries.iter().find(|d| d.policy == policy).unwrap().evidence.clone();
        assert_eq!(
            evidence("s3"),
            [
                EvidenceSource::AwsGetCallerIdentity { trust_provider: "aws-role".into() },
                EvidenceSource::AzureManagedIdentity {
                    trust_provider: "azure-mi".into(),
                    resource: "api://cloudpass".into(),
                    client_id: Some("4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55".into())
                },
                EvidenceSource::GcpIdentityToken {
                    trust_provider: "gcp-id".into(),
                    audience: "https://cloudpass.example".into()
                },
            ],
            "the pod's token and OIDC tokens from elsewhere need nothing gathered"
        );
        assert_eq!(evidence("plain"), []);
    }

    #[test]
    fn each_cloud_gets_its_sdk_variables() {
        let cfg = config(json!([
            policy("blob", json!({"kind": "azure", "resource": "https://storage.azure.com/"}), json!({})),
            policy("gcs", json!({"kind": "gcp"}), json!({})),
            policy(
                "api",
                json!({"kind": "http", "hosts": ["api.example.com"]}),
                json!({"delivery": {"httpHeader": {"name": "X-Key", "format": "{token}"}}})
            ),
        ]));
        let d = decide(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "per-pod-proof");
        let p = d.mutated.unwrap();
        let env = env_of(&p, "web");
        assert_eq!(env["IDENTITY_ENDPOINT"], "http://127.0.0.1:15022/msi/token");
        assert_eq!(env["IDENTITY_HEADER"], "per-pod-proof");
        assert_eq!(env["GCE_METADATA_HOST"], "127.0.0.1:15023");
        assert_eq!(env["GCE_METADATA_IP"], "127.0.0.1:15023");
        assert_eq!(env["HTTP_PROXY"], "http://127.0.0.1:15024");
        assert!(env["NO_PROXY"].contains(".svc"));
        assert!(!env.contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
        let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        assert!(
            agent
                .env
                .iter()
                .flatten()
                .any(|e| e.name == "IDENTITY_HEADER" && e.value.as_deref() == Some("per-pod-proof"))
        );
        assert_eq!(d.policies, ["api", "blob", "gcs"], "in the config's order: by name");
    }

    #[test]
    fn pods_left_alone_say_why() {
        let cfg = config(json!([policy("s3", aws(), json!({}))]));
        let cases: Vec<(Pod, Option<&NamespaceConfig>, Skip, &str)> = vec![
            (pod(json!({"containers": [app("web")]})), None, Skip::NoPolicy, ""),
            (
                serde_json::from_value(json!({"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [app("db")]}})).unwrap(),
                Some(&cfg),
                Skip::NoPolicy,
                "",
            ),
            (
                serde_json::from_value(json!({"metadata": {"labels": {"app": "db"}, "annotations": {"cloudpass.dev/inject": "true"}}, "spec": {"containers": [app("db")]}})).unwrap(),
                Some(&cfg),
                Skip::NoPolicy,
                "no Ready AccessPolicy",
            ),
            (
                serde_json::from_value(json!({"metadata": {"labels": {"app": "web"}, "annotations": {"cloudpass.dev/inject": "false"}}, "spec": {"containers": [app("web")]}})).unwrap(),
                Some(&cfg),
                Skip::OptedOut,
                "",
            ),
            (pod(json!({"hostNetwork": true, "containers": [app("web")]})), Some(&cfg), Skip::HostNetwork, "hostNetwork"),
            (pod(json!({"nodeSelector": {"kubernetes.io/os": "windows"}, "containers": [app("web")]})), Some(&cfg), Skip::Windows, "Linux"),
            (pod(json!({"os": {"name": "windows"}, "containers": [app("web")]})), Some(&cfg), Skip::Windows, "Linux"),
            (
                pod(json!({"containers": [{"name": "web", "image": "a", "env": [{"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": "/irsa"}]}]})),
                Some(&cfg),
                Skip::NothingToDeliver,
                "sets AWS_WEB_IDENTITY_TOKEN_FILE",
            ),
        ];
        for (p, c, skip, text) in cases {
            let d = decide(&p, c, &settings(), "x");
            assert_eq!(d.skipped, Some(skip), "{d:?}");
            assert!(d.mutated.is_none());
            if !text.is_empty() {
                assert!(d.warnings.iter().any(|w| w.contains(text)), "{text}: {:?}", d.warnings);
            }
        }
        // Service account must match when the policy names one.
        let cfg = config(json!([policy(
            "s3",
            aws(),
            json!({"client": {"podSelector": {}, "serviceAccountName": "reader"}})
        )]));
        assert_eq!(
            decide(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x").skipped,
            Some(Skip::NoPolicy)
        );
        let d = decide(
            &pod(json!({"serviceAccountName": "reader", "containers": [app("web")]})),
            Some(&cfg),
            &settings(),
            "x",
        );
        assert!(d.mutated.is_some());
    }

    #[test]
    fn the_pods_own_volume_names_never_clash_with_the_webhooks() {
        let cfg = config(json!([policy("s3", aws(), json!({}))]));
        let own = ["cloudpass-token", "cloudpass-shared", "cloudpass-shared-2", "cloudpass-no-kube-api-token"];
        let submitted = pod(json!({
            "volumes": own.iter().map(|name| json!({"name": name, "emptyDir": {}})).collect::<Vec<_>>(),
            "containers": [{"name": "web", "image": "w", "volumeMounts": [{"name": "cloudpass-token", "mountPath": "/data"}]}],
        }));
        let d = decide(&submitted, Some(&cfg), &settings(), "x");
        assert!(d.skipped.is_none() && d.warnings.is_empty(), "{d:?}");
        let p = d.mutated.unwrap();
        let spec = p.spec.as_ref().unwrap();
        let names: Vec<_> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), names.len(), "unique: {names:?}");
        assert_eq!(names[..4], own, "the pod's volumes are kept as they were");
        let by_name = |name: &str| spec.volumes.iter().flatten().find(|v| v.name == name).unwrap();
        let agent = &spec.init_containers.as_ref().unwrap()[0];
        let agent_mount = |path: &str| agent.volume_mounts.iter().flatten().find(|m| m.mount_path == path).unwrap();
        let token = agent_mount(TOKEN_DIR);
        assert_eq!(token.name, "cloudpass-token-2");
        assert!(by_name(&token.name).projected.is_some());
        assert_eq!(agent_mount(KUBE_API_TOKEN_DIR).name, "cloudpass-no-kube-api-token-2");
        let shared = agent_mount(SHARED_DIR);
        assert_eq!(shared.name, "cloudpass-shared-3");
        assert_eq!(by_name(&shared.name).empty_dir.as_ref().unwrap().medium.as_deref(), Some("Memory"));
        let web: Vec<_> = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(web, [("cloudpass-token", "/data"), ("cloudpass-shared-3", SHARED_DIR)]);
    }

    #[test]
    fn a_container_named_like_the_agent_is_admitted_with_the_reason() {
        let cfg = config(json!([policy("s3", aws(), json!({}))]));
        let submitted = pod(json!({"containers": [app("web"), app(AGENT_CONTAINER)]}));
        let d = decide(&submitted, Some(&cfg), &settings(), "x");
        assert_eq!(d.skipped, Some(Skip::NameConflict));
        assert!(d.warnings.iter().any(|w| w.contains("already named cloudpass-agent")), "{:?}", d.warnings);
        let p = d.mutated.expect("annotated");
        assert_eq!(p.spec, submitted.spec, "nothing injected");
        let annotations = p.metadata.annotations.clone().unwrap();
        assert!(annotations[SKIPPED_ANNOTATION].contains("already named cloudpass-agent"), "{annotations:?}");
        assert!(!annotations.contains_key(INJECTED_ANNOTATION));
        // Reinvoked: the same answer, still admitted.
        assert_eq!(decide(&p, Some(&cfg), &settings(), "y").mutated.unwrap().metadata, p.metadata);
        // In an init container too; and no policy selecting the pod: left alone, silently.
        let init = pod(json!({"initContainers": [app(AGENT_CONTAINER)], "containers": [app("web")]}));
        assert_eq!(decide(&init, Some(&cfg), &settings(), "x").skipped, Some(Skip::NameConflict));
        let d = decide(&init, None, &settings(), "x");
        assert_eq!((d.skipped, d.mutated.is_none(), d.warnings.len()), (Some(Skip::NoPolicy), true, 0));
    }

    #[test]
    fn a_container_with_its_own_mount_at_the_shared_directory_keeps_it() {
        let cfg = config(json!([policy("s3", aws(), json!({}))]));
        let submitted = pod(json!({
            "volumes": [{"name": "mine", "emptyDir": {}}],
            "containers": [
                {"name": "legacy", "image": "l", "volumeMounts": [{"name": "mine", "mountPath": format!("{SHARED_DIR}/")}]},
                app("web"),
            ],
        }));
        let d = decide(&submitted, Some(&cfg), &settings(), "x");
        assert!(d.warnings.iter().any(|w| w.contains("legacy") && w.contains("already mounts")), "{:?}", d.warnings);
        let p = d.mutated.unwrap();
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.containers[0], submitted.spec.as_ref().unwrap().containers[0], "left unchanged");
        assert!(env_of(&p, "web").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
        assert!(p.metadata.annotations.unwrap()[SKIPPED_ANNOTATION].contains("legacy"));
    }

    #[test]
    fn reinjection_is_a_no_op() {
        let cfg = config(json!([policy("s3", aws(), json!({}))]));
        let once = decide(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x").mutated.unwrap();
        let twice = decide(&once, Some(&cfg), &settings(), "y");
        assert_eq!(twice.skipped, Some(Skip::AlreadyInjected));
        assert!(twice.mutated.is_none());
    }

    #[test]
    fn a_private_server_ca_is_mounted_into_the_agent_and_named_in_its_config() {
        let header = json!({"delivery": {"httpHeader": {"name": "X-Key", "format": "{token}"}}});
        let private = json!({"kind": "http", "hosts": ["api.internal"], "tls": {"caConfigMap": {"name": "partner-ca", "key": "bundle.pem"}}});
        let public = json!({"kind": "http", "hosts": ["api.example.com"]});
        let cfg = config(json!([policy("internal", private, header.clone()), policy("public", public, header)]));
        let p = decide(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x").mutated.unwrap();
        let spec = p.spec.as_ref().unwrap();
        let agent = &spec.init_containers.as_ref().unwrap()[0];
        let mount = agent.volume_mounts.iter().flatten().find(|m| m.name.starts_with(SERVER_CA_VOLUME)).unwrap();
        assert_eq!(mount.mount_path, "/var/run/cloudpass.dev/server-ca/internal");
        assert_eq!(mount.read_only, Some(true));
        let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
        let source = volume.config_map.as_ref().unwrap();
        assert_eq!(source.name, "partner-ca");
        assert_eq!(source.optional, Some(false), "a missing CA stops the pod with an Event, not silently");
        let items = source.items.as_ref().unwrap();
        assert_eq!((items[0].key.as_str(), items[0].path.as_str()), ("bundle.pem", "ca.crt"));
        let env: BTreeMap<_, _> =
            agent.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap())).collect();
        let config: AgentConfig = serde_json::from_str(&env[AGENT_CONFIG_ENV]).unwrap();
        let ca_files: Vec<_> = config
            .deliveries
            .iter()
            .map(|d| match &d.endpoint {
                AgentEndpoint::HttpHeader { ca_file, .. } => (d.policy.as_str(), ca_file.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            ca_files,
            [("internal", Some("/var/run/cloudpass.dev/server-ca/internal/ca.crt".to_owned())), ("public", None)]
        );
        assert!(
            spec.containers[0].volume_mounts.iter().flatten().all(|m| !m.name.starts_with(SERVER_CA_VOLUME)),
            "the app does not get it"
        );
    }

    #[test]
    fn init_containers_receive_credentials_too_and_start_after_the_agent() {
        let submitted = pod(json!({
            "initContainers": [{"name": "migrate", "image": "m:1"}, {"name": "shipper", "image": "s:1", "restartPolicy": "Always"}],
            "containers": [app("web")],
        }));
        let all = config(json!([policy("s3", aws(), json!({}))]));
        let p = decide(&submitted, Some(&all), &settings(), "x").mutated.unwrap();
        let names: Vec<_> =
            p.spec.as_ref().unwrap().init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [AGENT_CONTAINER, "migrate", "shipper"], "the agent runs before any of them");
        for container in ["migrate", "shipper", "web"] {
            assert!(env_of(&p, container).contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"), "{container}");
        }
        // Named by the policy: only that init container.
        let named =
            config(json!([policy("s3", aws(), json!({"client": {"podSelector": {}, "containers": ["migrate"]}}))]));
        let p = decide(&submitted, Some(&named), &settings(), "x").mutated.unwrap();
        assert!(env_of(&p, "migrate").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
        assert!(!env_of(&p, "web").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
        assert!(!env_of(&p, "shipper").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    }

    #[test]
    fn only_named_containers_receive_credentials_and_existing_settings_win() {
        let cfg =
            config(json!([policy("s3", aws(), json!({"client": {"podSelector": {}, "containers": ["worker"]}}))]));
        let submitted = pod(json!({"containers": [
            {"name": "web", "image": "w", "env": [{"name": "LOG", "value": "1"}]},
            {"name": "worker", "image": "w", "env": [{"name": "LOG", "value": "2"}]},
        ]}));
        let d = decide(&submitted, Some(&cfg), &settings(), "x");
        let p = d.mutated.unwrap();
        assert!(!env_of(&p, "web").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
        let worker = env_of(&p, "worker");
        assert_eq!(worker["LOG"], "2", "existing variables are kept");
        assert!(worker.contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));

        // A conflicting variable in one container: that container is skipped with a
        // warning and an annotation, the others are served.
        let cfg = config(json!([policy("s3", aws(), json!({}))]));
        let submitted = pod(json!({"containers": [
            {"name": "web", "image": "w"},
            {"name": "legacy", "image": "l", "env": [{"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://169.254.170.2/x"}]},
        ]}));
        let d = decide(&submitted, Some(&cfg), &settings(), "x");
        assert!(d.warnings.iter().any(|w| w.contains("legacy") && w.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI")));
        let p = d.mutated.unwrap();
        assert_eq!(env_of(&p, "legacy")["AWS_CONTAINER_CREDENTIALS_FULL_URI"], "http://169.254.170.2/x");
        assert!(env_of(&p, "web").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
        assert!(p.metadata.annotations.unwrap()[SKIPPED_ANNOTATION].contains("legacy"));

        let cfg =
            config(json!([policy("s3", aws(), json!({"client": {"podSelector": {}, "containers": ["missing"]}}))]));
        let d = decide(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x");
        assert_eq!(d.skipped, Some(Skip::NothingToDeliver));
        assert!(d.warnings.iter().any(|w| w.contains("names containers [missing]")));
    }

    #[test]
    fn remote_cluster_agents_name_their_namespace_and_only_unlabelled_policies_apply() {
        let remote = InjectSettings { remote_cluster: true, ..settings() };
        let labelled = policy("labelled", json!({"kind": "aws"}), json!({}));
        let any_pod = policy(
            "any-pod",
            json!({"kind": "aws"}),
            json!({"client": {"podSelector": {}, "serviceAccountName": "web"}}),
        );
        let cfg = config(json!([labelled.clone()]));
        let d =
            decide(&pod(json!({"serviceAccountName": "web", "containers": [app("web")]})), Some(&cfg), &remote, "p");
        assert_eq!(d.skipped, Some(Skip::NoPolicy), "the broker could not check these labels: {d:?}");

        let cfg = config(json!([any_pod]));
        let d =
            decide(&pod(json!({"serviceAccountName": "web", "containers": [app("web")]})), Some(&cfg), &remote, "p");
        let p = d.mutated.expect("injected");
        let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let config_json =
            agent.env.iter().flatten().find(|e| e.name == AGENT_CONFIG_ENV).unwrap().value.clone().unwrap();
        let agent_config: AgentConfig = serde_json::from_str(&config_json).unwrap();
        assert_eq!(agent_config.policy_namespace.as_deref(), Some("team"));

        // In the broker's own cluster the namespace comes from the token, not the config.
        let d = decide(
            &pod(json!({"serviceAccountName": "web", "containers": [app("web")]})),
            Some(&cfg),
            &settings(),
            "p",
        );
        let p = d.mutated.expect("injected");
        let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let config_json =
            agent.env.iter().flatten().find(|e| e.name == AGENT_CONFIG_ENV).unwrap().value.clone().unwrap();
        assert!(!config_json.contains("policyNamespace"), "{config_json}");
    }
}
