//! The real `BrokerClient` and refresh loop against a small local HTTPS server speaking
//! the broker's wire types (`tests/support`): token presentation and rotation, CA
//! pinning, typed errors (401, 403, 503), retry until success, serving a cached
//! credential while the broker is down, and the clear error once it expired; one broker
//! call per credential.
//!
//! These tests do not replace tests against the real broker: those (agent and broker
//! together, with the real apiserver's tokens, and the official Python SDKs as clients)
//! come with the broker's test bed.

mod support;

use std::{sync::Arc, time::Duration};

use cloudpass_agent::{
    AgentError,
    broker_client::{BrokerClient, refresh_loop},
    common::Shared,
    metrics::Metrics,
    settings::{BrokerCa, RetrySettings},
    store::CredentialStore,
};
use cloudpass_api::{
    agent::{AgentDelivery, AgentEndpoint},
    broker::{Credential, ErrorCode},
};
use reqwest::StatusCode;
use support::{FakeBroker, Files, Tls, api_key, aws_keys, err, eventually, ok, settings};
use tokio::sync::watch;

fn client(broker: &FakeBroker, files: &Files) -> BrokerClient {
    BrokerClient::new(&settings(broker, files, vec![]).broker).unwrap()
}

#[tokio::test]
async fn presents_the_current_token_and_reads_the_credential() {
    let broker = FakeBroker::start().await;
    broker.script("s3", vec![ok("s3", aws_keys(), 3600, 3000)]);
    let files = Files::new("token-one\n");
    let client = client(&broker, &files);

    let answer = client.fetch("s3", &[]).await.unwrap();
    assert_eq!(answer.policy, "s3");
    assert!(matches!(answer.credential, Credential::Aws { ref access_key_id, .. } if access_key_id == "ASIATESTKEY"));

    // The kubelet rotates the token: the next request carries the new one.
    files.set_token("token-two");
    client.fetch("s3", &[]).await.unwrap();
    let seen = broker.seen();
    assert_eq!(seen[0].authorization, "Bearer token-one", "read from the file, trailing newline trimmed");
    assert_eq!(seen[1].authorization, "Bearer token-two");
    assert_eq!(seen[0].request.policy, "s3");
    assert_eq!(seen[0].request.namespace, None);
}

#[tokio::test]
async fn broker_errors_are_typed_with_the_brokers_message() {
    let broker = FakeBroker::start().await;
    let files = Files::new("t");
    let client = client(&broker, &files);
    broker.script("a", vec![err(401, ErrorCode::Unauthenticated, "token audience is not cloudpass")]);
    broker.script("b", vec![err(403, ErrorCode::Denied, "trust provider eks refused: namespace")]);
    broker.script("c", vec![(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!("not json of a broker error"))]);

    let e = client.fetch("a", &[]).await.unwrap_err();
    assert!(
        matches!(&e, AgentError::Broker { status: 401, code: ErrorCode::Unauthenticated, message, .. } if message.contains("audience")),
        "{e}"
    );
    let e = client.fetch("b", &[]).await.unwrap_err();
    assert!(e.is_denial() && e.to_string().contains("trust provider eks refused"), "{e}");
    let e = client.fetch("c", &[]).await.unwrap_err();
    assert_eq!(e.metric_label(), "invalid_response", "{e}");

    // Missing or empty token file: a local error, the broker is not called.
    let calls = broker.seen().len();
    files.set_token("  \n");
    assert_eq!(client.fetch("a", &[]).await.unwrap_err().metric_label(), "token");
    assert_eq!(broker.seen().len(), calls);
}

#[tokio::test]
async fn only_the_configured_ca_is_trusted() {
    let broker = FakeBroker::start().await;
    broker.script("s3", vec![ok("s3", aws_keys(), 3600, 3000)]);
    let files = Files::new("t");
    let mut s = settings(&broker, &files, vec![]);
    s.broker.ca = Some(BrokerCa::Pem(Tls::new().ca_pem));
    let e = BrokerClient::new(&s.broker).unwrap().fetch("s3", &[]).await.unwrap_err();
    assert_eq!(e.metric_label(), "unreachable", "{e}");
    assert!(broker.seen().is_empty(), "the token never reached an untrusted server");
    s.broker.ca = Some(BrokerCa::Pem("not a pem".into()));
    assert_eq!(BrokerClient::new(&s.broker).err().unwrap().metric_label(), "tls");
}

#[tokio::test]
async fn a_ca_file_is_read_again_before_each_call_so_a_rotated_ca_is_trusted_without_a_restart() {
    let broker = FakeBroker::start().await;
    broker.script("s3", vec![ok("s3", aws_keys(), 3600, 3000), ok("s3", aws_keys(), 3600, 3000)]);
    let files = Files::new("t");
    let mut s = settings(&broker, &files, vec![]);
    // The kubelet's copy still holds another CA: the broker is not trusted yet.
    let ca_file = files.write("broker-ca.crt", &Tls::new().ca_pem);
    s.broker.ca = Some(BrokerCa::File(ca_file.clone()));
    let client = BrokerClient::new(&s.broker).unwrap();
    let e = client.fetch("s3", &[]).await.unwrap_err();
    assert_eq!(e.metric_label(), "unreachable", "{e}");
    assert!(broker.seen().is_empty(), "the token never reached an untrusted server");
    // The kubelet replaces the file: the same client trusts the new bundle at once.
    files.write("broker-ca.crt", &broker.ca_pem);
    client.fetch("s3", &[]).await.unwrap();
    // A broken file keeps the last good bundle rather than trusting nothing.
    files.write("broker-ca.crt", "not a pem");
    client.fetch("s3", &[]).await.unwrap();
    assert_eq!(broker.seen().len(), 2);
    // A missing file at start is an error that names it.
    s.broker.ca = Some(BrokerCa::File(ca_file.with_file_name("absent.crt")));
    let e = BrokerClient::new(&s.broker).err().unwrap();
    assert!(e.to_string().contains("absent.crt"), "{e}");
}

struct Loop {
    shared: Shared,
    stop: watch::Sender<bool>,
}

fn start_loop(broker: &FakeBroker, files: &Files, policy: &str, endpoint: AgentEndpoint) -> Loop {
    let shared = Shared { store: Arc::new(CredentialStore::new([policy])), metrics: Metrics::new() };
    let (stop, stopped) = watch::channel(false);
    let retry = RetrySettings { initial: Duration::from_millis(50), max: Duration::from_millis(200) };
    tokio::spawn(refresh_loop(
        Arc::new(client(broker, files)),
        AgentDelivery { policy: policy.into(), endpoint, evidence: vec![] },
        shared.clone(),
        retry,
        files.shared_dir(),
        stopped,
    ));
    Loop { shared, stop }
}

#[tokio::test]
async fn retries_after_503_until_the_credential_arrives() {
    let broker = FakeBroker::start().await;
    broker.script(
        "s3",
        vec![
            err(503, ErrorCode::Unavailable, "config not loaded"),
            err(503, ErrorCode::Unavailable, "config not loaded"),
            ok("s3", aws_keys(), 3600, 3000),
        ],
    );
    let files = Files::new("t");
    let l = start_loop(&broker, &files, "s3", AgentEndpoint::AwsContainerCredentials { port: 0 });
    assert!(eventually(Duration::from_secs(5), || l.shared.store.valid("s3").is_ok()).await);
    assert_eq!(broker.seen().len(), 3);
    let text = l.shared.metrics.encode(&l.shared.store);
    assert!(text.contains(r#"cloudpass_agent_broker_errors_total{code="unavailable"} 2"#), "{text}");
    assert!(text.contains(r#"cloudpass_agent_refreshes_total{policy="s3",result="ok"} 1"#), "{text}");
    assert!(!text.contains("test-secret"), "{text}");
    l.stop.send(true).unwrap();
}

#[tokio::test]
async fn serves_while_the_broker_is_down_then_says_it_expired() {
    let broker = FakeBroker::start().await;
    // Valid for 8 s, which the store serves for 3 s (it keeps a 5 s margin); the refresh
    // after 1 s finds the broker gone.
    broker.script("s3", vec![ok("s3", aws_keys(), 8, 1)]);
    let files = Files::new("t");
    let l = start_loop(&broker, &files, "s3", AgentEndpoint::AwsContainerCredentials { port: 0 });
    assert!(eventually(Duration::from_secs(5), || l.shared.store.valid("s3").is_ok()).await);
    broker.stop();
    // Still served right after the broker went away.
    assert!(l.shared.store.valid("s3").is_ok());
    assert!(eventually(Duration::from_secs(5), || l.shared.store.valid("s3").is_err()).await);
    let e = l.shared.store.valid("s3").unwrap_err().to_string();
    assert!(e.contains("expired at") && e.contains("broker unreachable"), "{e}");
    l.stop.send(true).unwrap();
}

#[tokio::test]
async fn a_denial_stops_serving_at_once_and_wrong_types_are_refused() {
    let broker = FakeBroker::start().await;
    broker
        .script("s3", vec![ok("s3", aws_keys(), 3600, 1), err(403, ErrorCode::Denied, "AccessPolicy s3 was deleted")]);
    broker.script("gcs", vec![ok("gcs", aws_keys(), 3600, 3000)]);
    let files = Files::new("t");
    let l = start_loop(&broker, &files, "s3", AgentEndpoint::AwsContainerCredentials { port: 0 });
    assert!(
        eventually(Duration::from_secs(5), || {
            l.shared.store.valid("s3").is_err_and(|e| e.to_string().contains("was deleted"))
        })
        .await
    );
    assert!(l.shared.store.latest("s3").is_none());
    l.stop.send(true).unwrap();

    let l = start_loop(&broker, &files, "gcs", AgentEndpoint::GcpMetadata { port: 0, scopes: vec![] });
    assert!(
        eventually(Duration::from_secs(5), || {
            l.shared.store.valid("gcs").is_err_and(|e| {
                let e = e.to_string();
                e.contains("credential of policy gcs does not fit") && e.contains("sent an aws credential")
            })
        })
        .await
    );
    l.stop.send(true).unwrap();
}

#[tokio::test]
async fn a_file_delivery_is_written_replaced_on_rotation_and_removed_on_denial() {
    use cloudpass_api::policy::FileFormat;
    let broker = FakeBroker::start().await;
    broker.script(
        "db",
        vec![
            // Refresh times count from now: the second answer is due at 3 s.
            ok("db", api_key("pw-1"), 3600, 1),
            ok("db", api_key("pw-2"), 3600, 3),
            err(403, ErrorCode::Denied, "AccessPolicy db was deleted"),
        ],
    );
    let files = Files::new("t");
    let endpoint = AgentEndpoint::File { name: "db.env".into(), format: FileFormat::Dotenv };
    let l = start_loop(&broker, &files, "db", endpoint);
    let path = files.shared_dir().join("db.env");
    let holds = |text: &str| std::fs::read_to_string(&path).is_ok_and(|t| t == text);
    assert!(eventually(Duration::from_secs(5), || holds("API_KEY='pw-1'\n")).await);
    assert!(l.shared.store.valid("db").is_ok(), "served once written");
    // Refreshes come at least MIN_REFRESH apart.
    let refresh = cloudpass_agent::broker_client::MIN_REFRESH * 5;
    assert!(eventually(refresh, || holds("API_KEY='pw-2'\n")).await, "rotated in place");
    assert!(
        eventually(refresh, || !path.exists()).await,
        "removed when refused: {:?}, {} calls",
        l.shared.store.valid("db").map(|_| ()),
        broker.seen().len()
    );
    l.stop.send(true).unwrap();
}

#[tokio::test]
async fn one_broker_call_per_credential() {
    // The broker hands out the same credential until its refreshAt: a call before that
    // gets it back and is wasted. Short lifetimes make several cycles quick.
    let broker = FakeBroker::start().await;
    broker.mint("s3", aws_keys(), Duration::from_secs(3));
    let files = Files::new("t");
    let l = start_loop(&broker, &files, "s3", AgentEndpoint::AwsContainerCredentials { port: 0 });
    assert!(eventually(Duration::from_secs(60), || broker.minted("s3").new >= 4).await, "{:?}", broker.minted("s3"));
    l.stop.send(true).unwrap();
    let minted = broker.minted("s3");
    assert_eq!(minted.cached, 0, "calls made before the broker's refreshAt: {minted:?}");
    assert_eq!(broker.seen().len(), minted.new, "no other calls");
}
