//! Any pod a user can submit, through the webhook's injection decision for a namespace
//! with policies of every delivery kind: a decision (or a skip), never a panic.
#![no_main]

use std::sync::OnceLock;

use cloudpass_api::config::NamespaceConfig;
use cloudpass_webhook::inject::{AgentPorts, BrokerCa, InjectSettings, decide};
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fn config() -> &'static NamespaceConfig {
    static CONFIG: OnceLock<NamespaceConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let trust = [
            ("k8s".to_owned(), serde_json::from_value(json!({"kubernetesServiceAccount": {}})).unwrap()),
            (
                "aws-role".to_owned(),
                serde_json::from_value(json!({"awsRole": {"accountIds": ["123456789012"]}})).unwrap(),
            ),
        ]
        .into();
        let credential = [(
            "cred".to_owned(),
            serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap(),
        )]
        .into();
        let policy = |name: &str, server: serde_json::Value, delivery: serde_json::Value| {
            json!({"name": name, "client": {"podSelector": {"matchLabels": {"app": "web"}}},
                   "trustProviders": ["k8s", "aws-role"], "server": server, "credentialProvider": "cred",
                   "delivery": delivery})
        };
        let policies = serde_json::from_value(json!([
            policy("s3", json!({"kind": "aws"}), json!({"sdkEndpoint": {}})),
            policy(
                "blob",
                json!({"kind": "azure", "resource": "https://storage.azure.com/"}),
                json!({"sdkEndpoint": {}})
            ),
            policy("gcs", json!({"kind": "gcp"}), json!({"sdkEndpoint": {}})),
            policy(
                "api",
                json!({"kind": "http", "hosts": ["api.example.com"]}),
                json!({"httpHeader": {"name": "X-Key", "format": "{token}"}})
            ),
        ]))
        .unwrap();
        NamespaceConfig::new("team", trust, credential, policies)
    })
}

fn settings() -> &'static InjectSettings {
    static SETTINGS: OnceLock<InjectSettings> = OnceLock::new();
    SETTINGS.get_or_init(|| InjectSettings {
        image: "cloudpass-agent:fuzz".into(),
        pull_policy: "IfNotPresent".into(),
        agent_path: "/usr/local/bin/cloudpass-agent".into(),
        broker_url: "https://broker".into(),
        broker_ca: BrokerCa::ConfigMap("cloudpass-broker-ca".into()),
        ports: AgentPorts::default(),
        token_seconds: 3600,
        version: "0.0.0".into(),
        remote_cluster: false,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(pod) = serde_json::from_slice::<Pod>(data) else { return };
    let _ = decide(&pod, Some(config()), settings(), "proof");
});
