//! Unit tests of the injection: the decision and the pod it leaves, table-driven.

use std::collections::{BTreeMap, BTreeSet};

use cloudpass_api::{
    agent::{
        AGENT_CONFIG_ENV, AGENT_CONTAINER, AWS_TOKEN_FILE, AgentConfig, AgentDelivery, AgentEndpoint, BROKER_CA_ENV,
        BROKER_CA_FILE, DEFAULT_BROKER_URL, EvidenceSource, INJECTED_ANNOTATION, POLICIES_ANNOTATION, SHARED_DIR,
        SKIPPED_ANNOTATION, TOKEN_DIR, annotated_policies,
    },
    config::{CompiledPolicy, NamespaceConfig},
    endpoint::agent_delivery,
};
use k8s_openapi::api::core::v1::{EnvVar, Pod};
use serde_json::json;

use super::{
    agent::{SERVER_CA_VOLUME, TOKEN_VOLUME},
    *,
};
use crate::files::WatchedText;

fn settings() -> InjectSettings {
    InjectSettings {
        image: "ghcr.io/cloudpass-dev/cloudpass-agent:test".into(),
        pull_policy: "IfNotPresent".into(),
        agent_path: "/usr/local/bin/cloudpass-agent".into(),
        broker_url: "https://broker".into(),
        broker_ca: BrokerCa::ConfigMap("cloudpass-broker-ca".into()),
        ports: AgentPorts::default(),
        token_seconds: 3600,
        version: "0.1.0".into(),
        remote_cluster: false,
    }
}

/// A config with the given policies (JSON specs of CompiledPolicy).
fn config(policies: serde_json::Value) -> NamespaceConfig {
    let policies: Vec<CompiledPolicy> = serde_json::from_value(policies).unwrap();
    let trust = [("k8s".to_owned(), serde_json::from_value(json!({"kubernetesServiceAccount": {}})).unwrap())].into();
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

/// What [`decide`] says of `pod`, with the pod its patch makes of it: the tests assert on
/// the pod the apiserver would store, so they cover the patch as well as the decision.
#[derive(Debug)]
struct Outcome {
    mutated: Option<Pod>,
    warnings: Vec<String>,
    policies: Vec<String>,
    skipped: Option<Skip>,
}

fn decide_and_patch(
    pod: &Pod,
    config: Option<&NamespaceConfig>,
    settings: &InjectSettings,
    identity_header: &str,
) -> Outcome {
    let d = decide(pod, config, settings, identity_header);
    let mutated = d.changes.as_ref().map(|changes| {
        let mut json = serde_json::to_value(pod).unwrap();
        let patch = changes.patch(&json).expect("a patch for the pod it was decided for");
        json_patch::patch(&mut json, &patch).expect("the patch applies to the pod it was made for");
        serde_json::from_value::<Pod>(json).unwrap()
    });
    Outcome { mutated, warnings: d.warnings, policies: d.policies, skipped: d.skipped }
}

fn aws() -> serde_json::Value {
    json!({"kind": "aws"})
}

/// The agent's configuration in `p` (the defaults where the webhook wrote none).
fn agent_config_of(p: &Pod) -> AgentConfig {
    let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == AGENT_CONFIG_ENV)
        .map_or_else(AgentConfig::default, |e| serde_json::from_str(e.value.as_deref().unwrap()).unwrap())
}

/// What the agent of `p` serves: the deliveries in its configuration, else those the
/// broker answers (the same rule, `agent_delivery`) for the policies the webhook listed
/// in the pod's annotation.
fn served_by_agent(p: &Pod, cfg: &NamespaceConfig) -> Vec<AgentDelivery> {
    let config = agent_config_of(p);
    if !config.deliveries.is_empty() {
        return config.deliveries;
    }
    let listed = annotated_policies(&p.metadata.annotations.as_ref().unwrap()[POLICIES_ANNOTATION]);
    listed.iter().filter_map(|n| agent_delivery(cfg.policy(n)?, Some(cfg), &AgentPorts::default())).collect()
}

/// Where the kubelet would mount the pod's Kubernetes API token.
const KUBE_API_TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[test]
fn injects_a_native_sidecar_first_with_env_volumes_and_annotations() {
    let cfg = config(json!([policy("s3", aws(), json!({}))]));
    let submitted = pod(json!({"initContainers": [{"name": "migrate", "image": "m:1"}], "containers": [app("web")]}));
    let d = decide_and_patch(&submitted, Some(&cfg), &settings(), "proof");
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
    assert_eq!((sc.run_as_user, sc.run_as_group), (None, None), "the image's 65532:65532 applies");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let hook = agent.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()).and_then(|h| h.exec.as_ref());
    assert_eq!(
        hook.and_then(|e| e.command.clone()).unwrap(),
        ["/usr/local/bin/cloudpass-agent", "probe"],
        "the app starts once the agent's first credential is there"
    );
    assert!(agent.startup_probe.is_none(), "a probe's period would delay the app");
    let agent_env: BTreeMap<_, _> =
        agent.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap())).collect();
    let agent_config: AgentConfig = serde_json::from_str(&agent_env[AGENT_CONFIG_ENV]).unwrap();
    assert_eq!(
        agent_config,
        AgentConfig { broker_url: "https://broker".into(), ..AgentConfig::default() },
        "only what differs from the defaults; the deliveries come from the broker"
    );
    let served = served_by_agent(&p, &cfg);
    assert_eq!(served[0].policy, "s3");
    assert_eq!(served[0].endpoint, AgentEndpoint::AwsContainerCredentials { port: 15021 });
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
    assert_eq!(shadowed.name, TOKEN_VOLUME, "the agent gets its own token where the Kubernetes API token would be");
    assert_eq!(agent.volume_mounts.iter().flatten().count(), 2, "its token and the shared volume, nothing else");
    let token = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
    let projection =
        token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone().unwrap();
    assert_eq!(projection.audience.as_deref(), Some("cloudpass"));
    // The broker's CA comes from the namespace's copy, beside the token: not in the spec.
    let ca = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[1].config_map.clone().unwrap();
    assert_eq!(ca.name, "cloudpass-broker-ca");
    let item = &ca.items.unwrap()[0];
    assert_eq!((item.key.as_str(), item.path.as_str()), (crate::certs::CA_CONFIG_MAP_KEY, BROKER_CA_FILE));
    assert_ne!(ca.optional, Some(true), "a pod without the CA waits for it, loudly");
    assert!(!agent_env.contains_key(BROKER_CA_ENV), "no PEM in the pod spec");
    let env = env_of(&p, "web");
    assert_eq!(env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], "http://127.0.0.1:15021/v1/aws/credentials");
    assert_eq!(env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"], format!("{SHARED_DIR}/{AWS_TOKEN_FILE}"));
    let ann = p.metadata.annotations.unwrap();
    assert_eq!(ann[INJECTED_ANNOTATION], "0.1.0");
    assert_eq!(ann[POLICIES_ANNOTATION], "s3");
}

#[test]
fn with_every_default_the_agent_has_no_configuration_in_the_pod() {
    let cfg = config(json!([policy("s3", aws(), json!({}))]));
    let defaults = InjectSettings { broker_url: DEFAULT_BROKER_URL.into(), ..settings() };
    let p = decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &defaults, "x").mutated.unwrap();
    let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert_eq!(agent.env, None, "nothing the agent does not know already");
    assert_eq!(served_by_agent(&p, &cfg)[0].endpoint, AgentEndpoint::AwsContainerCredentials { port: 15021 });
}

#[test]
fn a_pod_level_user_or_group_is_overridden_for_the_agent_only() {
    let cfg = config(json!([policy("s3", aws(), json!({}))]));
    for security in
        [json!({"runAsUser": 1000}), json!({"runAsGroup": 0}), json!({"runAsUser": 1000, "runAsGroup": 1000})]
    {
        let submitted = pod(json!({"securityContext": security, "containers": [app("web")]}));
        let p = decide_and_patch(&submitted, Some(&cfg), &settings(), "x").mutated.unwrap();
        let spec = p.spec.as_ref().unwrap();
        let sc = spec.init_containers.as_ref().unwrap()[0].security_context.clone().unwrap();
        assert_eq!((sc.run_as_user, sc.run_as_group), (Some(65532), Some(65532)), "{security}");
        assert_eq!(spec.containers[0].security_context, None, "the app keeps the pod's: {security}");
    }
}

#[test]
fn an_inline_broker_ca_goes_into_the_agents_environment_and_nothing_is_projected() {
    let cfg = config(json!([policy("s3", aws(), json!({}))]));
    let pem = "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
    let settings = InjectSettings { broker_ca: BrokerCa::Inline(WatchedText::fixed(pem)), ..settings() };
    let d = decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings, "proof");
    let p = d.mutated.unwrap();
    let spec = p.spec.as_ref().unwrap();
    let agent = &spec.init_containers.as_ref().unwrap()[0];
    let ca = agent.env.iter().flatten().find(|e| e.name == BROKER_CA_ENV).unwrap();
    assert_eq!(ca.value.as_deref(), Some(pem));
    let token = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
    assert_eq!(token.projected.as_ref().unwrap().sources.as_ref().unwrap().len(), 1, "the token alone");
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
        (
            "ci".to_owned(),
            trust(json!({"oidc": {"issuer": "https://ci.example", "audiences": ["c"], "subjects": ["s"]}})),
        ),
    ]
    .into();
    let cred = [(
        "cred".to_owned(),
        serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap(),
    )]
    .into();
    let all = json!({"trustProviders": ["k8s", "aws-role", "azure-mi", "gcp-id", "ci"]});
    let policies =
        serde_json::from_value(json!([policy("s3", aws(), all), policy("plain", json!({"kind": "gcp"}), json!({}))]))
            .unwrap();
    let cfg = NamespaceConfig::new("team", trust, cred, policies);
    let d = decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "proof");
    let p = d.mutated.unwrap();
    let served = served_by_agent(&p, &cfg);
    let evidence = |policy: &str| served.iter().find(|d| d.policy == policy).unwrap().evidence.clone();
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
    let d = decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "per-pod-proof");
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
        agent.env.iter().flatten().any(|e| e.name == "IDENTITY_HEADER" && e.value.as_deref() == Some("per-pod-proof"))
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
        let d = decide_and_patch(&p, c, &settings(), "x");
        assert_eq!(d.skipped, Some(skip), "{d:?}");
        assert!(d.mutated.is_none());
        if !text.is_empty() {
            assert!(d.warnings.iter().any(|w| w.contains(text)), "{text}: {:?}", d.warnings);
        }
    }
    // Service account must match when the policy names one.
    let cfg =
        config(json!([policy("s3", aws(), json!({"client": {"podSelector": {}, "serviceAccountName": "reader"}}))]));
    assert_eq!(
        decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x").skipped,
        Some(Skip::NoPolicy)
    );
    let d = decide_and_patch(
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
    let own = ["cloudpass-token", "cloudpass-shared", "cloudpass-shared-2", "cloudpass-other"];
    let submitted = pod(json!({
        "volumes": own.iter().map(|name| json!({"name": name, "emptyDir": {}})).collect::<Vec<_>>(),
        "containers": [{"name": "web", "image": "w", "volumeMounts": [{"name": "cloudpass-token", "mountPath": "/data"}]}],
    }));
    let d = decide_and_patch(&submitted, Some(&cfg), &settings(), "x");
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
    let shared = agent_mount(SHARED_DIR);
    assert_eq!(shared.name, "cloudpass-shared-3");
    assert_eq!(by_name(&shared.name).empty_dir.as_ref().unwrap().medium.as_deref(), Some("Memory"));
    let web: Vec<_> =
        spec.containers[0].volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m.mount_path.as_str())).collect();
    assert_eq!(web, [("cloudpass-token", "/data"), ("cloudpass-shared-3", SHARED_DIR)]);
}

#[test]
fn a_container_named_like_the_agent_is_admitted_with_the_reason() {
    let cfg = config(json!([policy("s3", aws(), json!({}))]));
    let submitted = pod(json!({"containers": [app("web"), app(AGENT_CONTAINER)]}));
    let d = decide_and_patch(&submitted, Some(&cfg), &settings(), "x");
    assert_eq!(d.skipped, Some(Skip::NameConflict));
    assert!(d.warnings.iter().any(|w| w.contains("already named cloudpass-agent")), "{:?}", d.warnings);
    let p = d.mutated.expect("annotated");
    assert_eq!(p.spec, submitted.spec, "nothing injected");
    let annotations = p.metadata.annotations.clone().unwrap();
    assert!(annotations[SKIPPED_ANNOTATION].contains("already named cloudpass-agent"), "{annotations:?}");
    assert!(!annotations.contains_key(INJECTED_ANNOTATION));
    // Reinvoked: the same answer, still admitted.
    assert_eq!(decide_and_patch(&p, Some(&cfg), &settings(), "y").mutated.unwrap().metadata, p.metadata);
    // In an init container too; and no policy selecting the pod: left alone, silently.
    let init = pod(json!({"initContainers": [app(AGENT_CONTAINER)], "containers": [app("web")]}));
    assert_eq!(decide_and_patch(&init, Some(&cfg), &settings(), "x").skipped, Some(Skip::NameConflict));
    let d = decide_and_patch(&init, None, &settings(), "x");
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
    let d = decide_and_patch(&submitted, Some(&cfg), &settings(), "x");
    assert!(d.warnings.iter().any(|w| w.contains("legacy") && w.contains("already mounts")), "{:?}", d.warnings);
    let p = d.mutated.unwrap();
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(spec.containers[0], submitted.spec.as_ref().unwrap().containers[0], "left unchanged");
    assert!(env_of(&p, "web").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    assert!(p.metadata.annotations.unwrap()[SKIPPED_ANNOTATION].contains("legacy"));
}

#[test]
fn a_file_delivery_mounts_the_shared_volume_read_only_once_and_adds_no_variable() {
    let file = |name: &str, file: &str| {
        policy(name, json!({"kind": "http"}), json!({"delivery": {"file": {"name": file, "format": "Dotenv"}}}))
    };
    let cfg = config(json!([file("db", "db.env"), file("api", "api-key"), policy("s3", aws(), json!({}))]));
    let d = decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x");
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    let p = d.mutated.unwrap();
    let spec = p.spec.as_ref().unwrap();
    let web = &spec.containers[0];
    let shared: Vec<_> = web.volume_mounts.iter().flatten().filter(|m| m.mount_path == SHARED_DIR).collect();
    assert_eq!(shared.len(), 1, "one mount for both files and the AWS token: {shared:?}");
    assert_eq!(shared[0].read_only, Some(true));
    let env = env_of(&p, "web");
    assert!(env.keys().all(|k| k.starts_with("AWS_")), "files add no variable: {env:?}");
    let config = serde_json::to_value(served_by_agent(&p, &cfg)).unwrap();
    let endpoints: Vec<&serde_json::Value> = config.as_array().unwrap().iter().map(|d| &d["endpoint"]).collect();
    assert!(endpoints.contains(&&json!({"type": "file", "name": "db.env", "format": "Dotenv"})), "{config}");
    assert!(endpoints.contains(&&json!({"type": "file", "name": "api-key", "format": "Dotenv"})), "{config}");
}

#[test]
fn reinjection_is_a_no_op() {
    let cfg = config(json!([policy("s3", aws(), json!({}))]));
    let once =
        decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x").mutated.unwrap();
    let twice = decide_and_patch(&once, Some(&cfg), &settings(), "y");
    assert_eq!(twice.skipped, Some(Skip::AlreadyInjected));
    assert!(twice.mutated.is_none());
}

#[test]
fn a_private_server_ca_is_mounted_into_the_agent_and_named_in_its_config() {
    let header = json!({"delivery": {"httpHeader": {"name": "X-Key", "format": "{token}"}}});
    let private = json!({"kind": "http", "hosts": ["api.internal"], "tls": {"caConfigMap": {"name": "partner-ca", "key": "bundle.pem"}}});
    let public = json!({"kind": "http", "hosts": ["api.example.com"]});
    let cfg = config(json!([policy("internal", private, header.clone()), policy("public", public, header)]));
    let p = decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x").mutated.unwrap();
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
    let served = served_by_agent(&p, &cfg);
    let ca_files: Vec<_> = served
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
    let p = decide_and_patch(&submitted, Some(&all), &settings(), "x").mutated.unwrap();
    let names: Vec<_> = p.spec.as_ref().unwrap().init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [AGENT_CONTAINER, "migrate", "shipper"], "the agent runs before any of them");
    for container in ["migrate", "shipper", "web"] {
        assert!(env_of(&p, container).contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"), "{container}");
    }
    // Named by the policy: only that init container.
    let named = config(json!([policy("s3", aws(), json!({"client": {"podSelector": {}, "containers": ["migrate"]}}))]));
    let p = decide_and_patch(&submitted, Some(&named), &settings(), "x").mutated.unwrap();
    assert!(env_of(&p, "migrate").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    assert!(!env_of(&p, "web").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    assert!(!env_of(&p, "shipper").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
}

#[test]
fn only_named_containers_receive_credentials_and_existing_settings_win() {
    let cfg = config(json!([policy("s3", aws(), json!({"client": {"podSelector": {}, "containers": ["worker"]}}))]));
    let submitted = pod(json!({"containers": [
        {"name": "web", "image": "w", "env": [{"name": "LOG", "value": "1"}]},
        {"name": "worker", "image": "w", "env": [{"name": "LOG", "value": "2"}]},
    ]}));
    let d = decide_and_patch(&submitted, Some(&cfg), &settings(), "x");
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
    let d = decide_and_patch(&submitted, Some(&cfg), &settings(), "x");
    assert!(d.warnings.iter().any(|w| w.contains("legacy") && w.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI")));
    let p = d.mutated.unwrap();
    assert_eq!(env_of(&p, "legacy")["AWS_CONTAINER_CREDENTIALS_FULL_URI"], "http://169.254.170.2/x");
    assert!(env_of(&p, "web").contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    assert!(p.metadata.annotations.unwrap()[SKIPPED_ANNOTATION].contains("legacy"));

    let cfg = config(json!([policy("s3", aws(), json!({"client": {"podSelector": {}, "containers": ["missing"]}}))]));
    let d = decide_and_patch(&pod(json!({"containers": [app("web")]})), Some(&cfg), &settings(), "x");
    assert_eq!(d.skipped, Some(Skip::NothingToDeliver));
    assert!(d.warnings.iter().any(|w| w.contains("names containers [missing]")));
}

#[test]
fn remote_cluster_agents_name_their_namespace_and_only_unlabelled_policies_apply() {
    let remote = InjectSettings { remote_cluster: true, ..settings() };
    let labelled = policy("labelled", json!({"kind": "aws"}), json!({}));
    let any_pod =
        policy("any-pod", json!({"kind": "aws"}), json!({"client": {"podSelector": {}, "serviceAccountName": "web"}}));
    let cfg = config(json!([labelled.clone()]));
    let d = decide_and_patch(
        &pod(json!({"serviceAccountName": "web", "containers": [app("web")]})),
        Some(&cfg),
        &remote,
        "p",
    );
    assert_eq!(d.skipped, Some(Skip::NoPolicy), "the broker could not check these labels: {d:?}");

    let cfg = config(json!([any_pod]));
    let d = decide_and_patch(
        &pod(json!({"serviceAccountName": "web", "containers": [app("web")]})),
        Some(&cfg),
        &remote,
        "p",
    );
    let p = d.mutated.expect("injected");
    let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    let config_json = agent.env.iter().flatten().find(|e| e.name == AGENT_CONFIG_ENV).unwrap().value.clone().unwrap();
    let agent_config: AgentConfig = serde_json::from_str(&config_json).unwrap();
    assert_eq!(agent_config.policy_namespace.as_deref(), Some("team"));
    // Another cluster's broker cannot read this pod: the deliveries are written here.
    assert_eq!(agent_config.deliveries.len(), 1);
    assert_eq!(agent_config.deliveries[0].policy, "any-pod");

    // In the broker's own cluster the namespace comes from the token, not the config.
    let d = decide_and_patch(
        &pod(json!({"serviceAccountName": "web", "containers": [app("web")]})),
        Some(&cfg),
        &settings(),
        "p",
    );
    let p = d.mutated.expect("injected");
    let agent = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    let config_json = agent.env.iter().flatten().find(|e| e.name == AGENT_CONFIG_ENV).unwrap().value.clone().unwrap();
    assert!(!config_json.contains("policyNamespace"), "{config_json}");
}

/// The operations of `changes` on `pod`, as `(op, path)`, and the patched pod.
fn patched(changes: &Changes, pod: &serde_json::Value) -> (Vec<(String, String)>, serde_json::Value) {
    let patch = changes.patch(pod).unwrap();
    let ops = serde_json::to_value(&patch).unwrap();
    let ops = ops
        .as_array()
        .unwrap()
        .iter()
        .map(|op| (op["op"].as_str().unwrap().to_owned(), op["path"].as_str().unwrap().to_owned()))
        .collect();
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    (ops, pod)
}

#[test]
fn the_patch_adds_whole_what_the_pod_lacks_and_appends_to_what_it_has() {
    let cfg = config(json!([policy("s3", aws(), json!({}))]));
    // No init containers, volumes or annotations; `env` sent as null on one container.
    let bare = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "w", "env": null}]}});
    let d = decide(&serde_json::from_value(bare.clone()).unwrap(), Some(&cfg), &settings(), "x");
    let (ops, pod) = patched(d.changes.as_ref().unwrap(), &bare);
    let add = |path: &str| ("add".to_owned(), path.to_owned());
    assert_eq!(
        ops,
        [
            add("/spec/containers/0/env"),
            add("/spec/containers/0/volumeMounts"),
            add("/spec/initContainers"),
            add("/spec/volumes"),
            add("/metadata/annotations"),
        ]
    );
    assert_eq!(pod["spec"]["containers"][0]["env"].as_array().unwrap().len(), 2);
    assert_eq!(pod["metadata"]["annotations"][POLICIES_ANNOTATION], "s3");

    // Everything present: members added one by one, the agent inserted first, the
    // init container's own additions addressed before it shifts.
    let full = json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"labels": {"app": "web"}, "annotations": {"team": "a"}},
    "spec": {
        "initContainers": [{"name": "migrate", "image": "m", "env": [], "volumeMounts": []}],
        "containers": [{"name": "web", "image": "w", "env": [{"name": "A", "value": "1"}]}],
        "volumes": [{"name": "data", "emptyDir": {}}],
    }});
    let d = decide(&serde_json::from_value(full.clone()).unwrap(), Some(&cfg), &settings(), "x");
    let (ops, pod) = patched(d.changes.as_ref().unwrap(), &full);
    let paths: Vec<_> = ops.iter().map(|(op, path)| format!("{op} {path}")).collect();
    assert_eq!(
        paths,
        [
            "add /spec/initContainers/0/env/-",
            "add /spec/initContainers/0/env/-",
            "add /spec/initContainers/0/volumeMounts/-",
            "add /spec/containers/0/env/-",
            "add /spec/containers/0/env/-",
            "add /spec/containers/0/volumeMounts",
            "add /spec/initContainers/0",
            // The agent's token and the shared volume of the AWS delivery.
            "add /spec/volumes/-",
            "add /spec/volumes/-",
            "add /metadata/annotations/cloudpass.dev~1injected",
            "add /metadata/annotations/cloudpass.dev~1policies",
        ]
    );
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!((init[0]["name"].as_str(), init[1]["name"].as_str()), (Some(AGENT_CONTAINER), Some("migrate")));
    assert_eq!(init[1]["env"].as_array().unwrap().len(), 2, "migrate's variables went to migrate");
    assert!(init[0]["env"].as_array().unwrap().iter().any(|e| e["name"] == AGENT_CONFIG_ENV));
    assert_eq!(pod["spec"]["volumes"][0]["name"], "data");
    assert_eq!(pod["metadata"]["annotations"]["team"], "a");
}

#[test]
fn annotation_keys_are_escaped_as_json_pointer_tokens() {
    let changes = Changes {
        annotations: [("example.com/a~b".to_owned(), "v".to_owned()), ("plain".to_owned(), "w".to_owned())].into(),
        ..Changes::default()
    };
    let pod = json!({"metadata": {"annotations": {"example.com/a~b": "old"}}, "spec": {"containers": []}});
    let (ops, patched_pod) = patched(&changes, &pod);
    let paths: Vec<_> = ops.iter().map(|(_, path)| path.as_str()).collect();
    assert_eq!(paths, ["/metadata/annotations/example.com~1a~0b", "/metadata/annotations/plain"]);
    assert_eq!(patched_pod["metadata"]["annotations"], json!({"example.com/a~b": "v", "plain": "w"}));
    // No metadata at all: added whole, keys as they are.
    let (ops, patched_pod) = patched(&changes, &json!({"spec": {}}));
    assert_eq!(ops, [("add".to_owned(), "/metadata".to_owned())]);
    assert_eq!(patched_pod["metadata"]["annotations"]["example.com/a~b"], "v");
}

#[test]
fn json_that_does_not_match_the_decision_gets_no_patch() {
    let mut changes = Changes::default();
    let mut web = ContainerAdditions::new(ContainerList::App, 1, "web");
    web.env.push(EnvVar { name: "A".into(), value: Some("1".into()), value_from: None });
    changes.containers.push(web);
    let one_container = json!({"spec": {"containers": [{"name": "web"}]}});
    let err = changes.patch(&one_container).unwrap_err().to_string();
    assert_eq!(err, "cannot patch the pod: expected container web at /spec/containers/1, found none");
    let renamed = json!({"spec": {"containers": [{"name": "web"}, {"name": "other"}]}});
    assert!(changes.patch(&renamed).unwrap_err().to_string().contains("found other"));
    let env_not_a_list = json!({"spec": {"containers": [{"name": "db"}, {"name": "web", "env": "x"}]}});
    let err = changes.patch(&env_not_a_list).unwrap_err().to_string();
    assert!(err.contains("/spec/containers/1/env is neither a list nor an object"), "{err}");
}
