//! The agent's configuration, as the webhook writes it into the pod (and as anyone able
//! to edit the pod spec could): parsing and validation must refuse, never panic.
#![no_main]

use std::time::Duration;

use cloudpass_agent::{
    Settings,
    settings::{BrokerCa, BrokerClientSettings, RetrySettings},
};
use cloudpass_api::agent::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = serde_json::from_slice::<AgentConfig>(data) else { return };
    let settings = Settings {
        broker: BrokerClientSettings {
            url: config.broker_url.clone(),
            ca: Some(BrokerCa::Pem("pem".into())),
            trust_system_roots: false,
            token_file: "/token".into(),
            timeout: Duration::from_secs(1),
            evidence: Default::default(),
        },
        config,
        shared_dir: "/shared".into(),
        identity_header: None,
        upstream_ca_pem: None,
        retry: RetrySettings { initial: Duration::from_secs(1), max: Duration::from_secs(2) },
        sigv4_max_body_bytes: 1024,
        shutdown_grace: Duration::from_secs(1),
        server_ca_dir: cloudpass_api::agent::SERVER_CA_DIR.into(),
        config_refresh: Duration::from_secs(60),
    };
    let _ = settings.validate();
});
