//! The agent container and the volumes it needs: its projected service-account token
//! (mounted where the Kubernetes API token would be), the shared in-memory volume of AWS
//! deliveries and the private CA bundles of proxied servers, named so that they never
//! clash with the pod's own volumes.

use std::collections::BTreeSet;

use cloudpass_api::{
    agent::{
        AGENT_CONFIG_ENV, AGENT_CONTAINER, AgentConfig, BROKER_CA_ENV, BROKER_CA_FILE, SHARED_DIR, TOKEN_DIR,
        TOKEN_FILE,
    },
    config::NamespaceConfig,
};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapProjection, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, ExecAction,
        KeyToPath, Lifecycle, LifecycleHandler, Pod, PodSecurityContext, ProjectedVolumeSource, ResourceRequirements,
        SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::api::resource::Quantity,
};

use super::{
    BrokerCa, InjectSettings,
    deliver::{Delivered, env},
};

/// Names of the volumes the webhook adds (or, when the pod already has a volume of that
/// name, the first free one of `<name>-2`, `<name>-3`, ...: see [`VolumeNames`]).
pub(super) const TOKEN_VOLUME: &str = "cloudpass-token";
pub(super) const SHARED_VOLUME: &str = "cloudpass-shared";
/// Prefix of the volumes holding the CA bundles of policies' `server.tls`.
pub(super) const SERVER_CA_VOLUME: &str = "cloudpass-server-ca";
/// The UID and GID the agent image runs as (`USER 65532:65532` in the Dockerfile).
const AGENT_UID_GID: i64 = 65532;
/// Mode of the agent's projected token file (see where the volume is built).
const TOKEN_FILE_MODE: i32 = 0o444;

/// The volume names of a pod, for naming the webhook's volumes so that they never clash
/// with the pod's own (the apiserver refuses a pod with two volumes of one name).
pub(super) struct VolumeNames(BTreeSet<String>);

impl VolumeNames {
    pub(super) fn of(pod: &Pod) -> Self {
        Self(pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()).map(|v| v.name.clone()).collect())
    }

    /// `base` if free, else the first free `base-2`, `base-3`, ...; taken from now on.
    pub(super) fn claim(&mut self, base: &str) -> String {
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

/// The names of the agent's fixed volumes in one pod.
pub(super) struct AgentVolumes {
    token: String,
    /// The shared in-memory volume, also mounted into AWS-served containers.
    pub shared: String,
}

impl AgentVolumes {
    /// Claims the names of the token and shared volumes, in that order.
    pub(super) fn claim(names: &mut VolumeNames) -> Self {
        let token = names.claim(TOKEN_VOLUME);
        let shared = names.claim(SHARED_VOLUME);
        Self { token, shared }
    }
}

/// The agent container for what was `delivered`, and the volumes to append to the pod.
/// `pod_security` is the pod's own security context, whose user and group would
/// otherwise apply to the agent.
pub(super) fn build(
    settings: &InjectSettings,
    config: Option<&NamespaceConfig>,
    delivered: Delivered,
    names: AgentVolumes,
    volume_names: &mut VolumeNames,
    identity_header: &str,
    pod_security: Option<&PodSecurityContext>,
) -> (Container, Vec<Volume>) {
    let Delivered { deliveries, needs_shared, server_cas, uses_azure, .. } = delivered;
    let AgentVolumes { token: token_volume, shared: shared_volume } = names;
    let agent_config = AgentConfig {
        broker_url: settings.broker_url.clone(),
        health_port: settings.ports.health,
        // In the broker's cluster the broker reads the pod's policies annotation and
        // answers the same deliveries (`cloudpass_api::endpoint`) when the agent starts:
        // about 100 bytes per policy fewer in every stored pod. Another cluster's broker
        // cannot read this cluster's pods.
        deliveries: if settings.remote_cluster { deliveries } else { Vec::new() },
        policy_namespace: config.filter(|_| settings.remote_cluster).map(|c| c.namespace.clone()),
    };
    let mut agent_env = Vec::new();
    if agent_config != AgentConfig::default() {
        agent_env.push(env(AGENT_CONFIG_ENV, serde_json::to_string(&agent_config).expect("agent config serializes")));
    }
    if let BrokerCa::Inline(pem) = &settings.broker_ca {
        agent_env.push(env(BROKER_CA_ENV, pem.get().to_string()));
    }
    if uses_azure {
        agent_env.push(env("IDENTITY_HEADER", identity_header));
    }
    // The agent's own token, at the Kubernetes API token's usual place: the agent needs
    // no API token (least privilege), and with something mounted there the
    // ServiceAccount admission plugin leaves the agent alone, so the apiserver does not
    // call the webhook twice.
    let mut agent_mounts = vec![VolumeMount {
        name: token_volume.clone(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
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
    let agent = agent_container(settings, agent_env, agent_mounts, pod_security);

    let mut volumes = Vec::new();
    let mut sources = vec![VolumeProjection {
        service_account_token: Some(ServiceAccountTokenProjection {
            audience: Some(cloudpass_api::BROKER_AUDIENCE.into()),
            expiration_seconds: Some(settings.token_seconds),
            path: TOKEN_FILE.into(),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let BrokerCa::ConfigMap(name) = &settings.broker_ca {
        sources.push(VolumeProjection {
            config_map: Some(ConfigMapProjection {
                name: name.clone(),
                items: Some(vec![KeyToPath {
                    key: crate::certs::CA_CONFIG_MAP_KEY.into(),
                    path: BROKER_CA_FILE.into(),
                    ..Default::default()
                }]),
                // Required: without it the kubelet holds the pod with a FailedMount Event
                // naming the ConfigMap, rather than start an agent that trusts nothing.
                optional: None,
            }),
            ..Default::default()
        });
    }
    volumes.push(Volume {
        name: token_volume,
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            // The kubelet writes the token as root and hands its ownership to the pod's
            // user only when every container runs as the same UID, which an app seldom
            // does with the agent's 65532; 0440 then left the agent unable to read it.
            // Only the agent mounts this volume, so readable-by-all means by the agent.
            default_mode: Some(TOKEN_FILE_MODE),
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
    (agent, volumes)
}

fn agent_container(
    settings: &InjectSettings,
    env: Vec<EnvVar>,
    volume_mounts: Vec<VolumeMount>,
    pod_security: Option<&PodSecurityContext>,
) -> Container {
    let quantity = |q: &str| Quantity(q.into());
    // The image runs as 65532:65532; only a pod-level user or group would override that
    // for the agent (running it as the app, or as GID 0), so only then is it repeated
    // here. `runAsNonRoot` makes the kubelet refuse an image that runs as root.
    let pod_sets_identity = pod_security.is_some_and(|p| p.run_as_user.is_some() || p.run_as_group.is_some());
    let agent_identity = pod_sets_identity.then_some(AGENT_UID_GID);
    Container {
        name: AGENT_CONTAINER.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        // A native sidecar: started before the app containers, stopped after them, and
        // it does not keep a Job from completing.
        restart_policy: Some("Always".into()),
        env: (!env.is_empty()).then_some(env),
        volume_mounts: Some(volume_mounts),
        // The kubelet starts the next container once this hook returns, which it does the
        // moment the first credential is there (a startup probe would pass only at its
        // next period, a second later at best). It runs inside the container: the agent's
        // endpoints listen on loopback only. Without a credential by then it fails, with
        // the reason in the FailedPostStartHook Event, and the kubelet restarts the agent.
        lifecycle: Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    // `probe` waits 60 s by default.
                    command: Some(vec![settings.agent_path.clone(), "probe".into()]),
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
            run_as_user: agent_identity,
            run_as_group: agent_identity,
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
