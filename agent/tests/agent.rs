//! The whole agent: in process through `Agent::start`, and as the binary the webhook
//! injects (environment only, `probe` subcommand, SIGTERM), against the stand-in broker
//! of `tests/support`. The official SDKs judge these endpoints in the broker's test bed.

mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use cloudpass_agent::{Agent, EndpointKind};
use cloudpass_api::{
    agent::{AgentConfig, AgentDelivery, AgentEndpoint, EvidenceSource},
    broker::Credential,
    secret::SecretString,
};
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use support::{FakeBroker, Files, aws_keys, eventually, eventually_async, ok, ok_until, settings};

const BIN: &str = env!("CARGO_BIN_EXE_cloudpass-agent");

fn azure_token() -> Credential {
    Credential::AccessToken {
        access_token: SecretString::new("entra-access-token"),
        token_type: "Bearer".into(),
        resource: Some("https://storage.azure.com/".into()),
        client_id: Some("11111111-2222-3333-4444-555555555555".into()),
        service_account_email: None,
        project_id: None,
    }
}

fn google_token() -> Credential {
    Credential::AccessToken {
        access_token: SecretString::new("ya29.google-token"),
        token_type: "Bearer".into(),
        resource: None,
        client_id: None,
        service_account_email: Some("sa@proj.iam.gserviceaccount.com".into()),
        project_id: Some("proj".into()),
    }
}

fn deliveries(aws: u16, azure: u16, gcp: u16) -> Vec<AgentDelivery> {
    vec![
        AgentDelivery {
            policy: "s3".into(),
            endpoint: AgentEndpoint::AwsContainerCredentials { port: aws },
            evidence: vec![],
        },
        AgentDelivery {
            policy: "blob".into(),
            endpoint: AgentEndpoint::AzureManagedIdentity {
                port: azure,
                resource: "https://storage.azure.com/".into(),
            },
            evidence: vec![],
        },
        AgentDelivery {
            policy: "gcs".into(),
            endpoint: AgentEndpoint::GcpMetadata {
                port: gcp,
                scopes: vec!["https://www.googleapis.com/auth/cloud-platform".into()],
            },
            evidence: vec![],
        },
    ]
}

fn script(broker: &FakeBroker) {
    broker.script("s3", vec![ok("s3", aws_keys(), 3600, 3000)]);
    broker.script("blob", vec![ok("blob", azure_token(), 3600, 3000)]);
    broker.script("gcs", vec![ok("gcs", google_token(), 3600, 3000)]);
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Asks every SDK endpoint as its SDK would and checks the answers.
async fn check_endpoints(aws: u16, azure: u16, gcp: u16, aws_token: &str) {
    let http = http();
    let (status, v) =
        get_json(http.get(format!("http://127.0.0.1:{aws}/v1/aws/credentials")).header("Authorization", aws_token))
            .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["AccessKeyId"], "ASIATESTKEY");
    assert_eq!(v["AccountId"], "123456789012");

    let (status, v) = get_json(
        http.get(format!(
            "http://127.0.0.1:{azure}/msi/token?api-version=2019-08-01&resource=https://storage.azure.com"
        ))
        .header("X-IDENTITY-HEADER", "identity-proof"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["access_token"], "entra-access-token");

    let (status, v) = get_json(
        http.get(format!(
            "http://127.0.0.1:{gcp}/computeMetadata/v1/instance/service-accounts/sa@proj.iam.gserviceaccount.com/token"
        ))
        .header("Metadata-Flavor", "Google"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["access_token"], "ya29.google-token");
    assert!(v["expires_in"].is_u64());
}

#[tokio::test]
async fn in_process_agent_serves_every_sdk_endpoint_and_stops() {
    let broker = FakeBroker::start().await;
    script(&broker);
    let files = Files::new("pod-token");
    let agent = Agent::start(settings(&broker, &files, deliveries(0, 0, 0))).await.unwrap();
    let port = |kind| agent.local_addr(kind).unwrap().port();
    let (health, aws, azure, gcp) =
        (port(EndpointKind::Health), port(EndpointKind::Aws), port(EndpointKind::Azure), port(EndpointKind::Gcp));
    for (_, addr) in agent.listeners() {
        assert!(addr.ip().is_loopback(), "{addr}");
    }

    let ready = || async move { http().get(format!("http://127.0.0.1:{health}/ready")).send().await.unwrap().status() };
    let mut status = ready().await;
    for _ in 0..100 {
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = ready().await;
    }
    assert_eq!(status, 200);

    let token = std::fs::read_to_string(files.shared_dir().join(cloudpass_api::agent::AWS_TOKEN_FILE)).unwrap();
    assert_eq!(token, agent.aws_token().unwrap().expose());
    assert!(!token.ends_with('\n'));
    check_endpoints(aws, azure, gcp, &token).await;
    assert!(broker.seen().iter().all(|s| s.authorization == "Bearer pod-token"));

    let metrics = http().get(format!("http://127.0.0.1:{health}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"cloudpass_agent_requests_total{endpoint="aws",result="ok"} 1"#), "{metrics}");
    for secret in ["test-secret-access-key", "entra-access-token", "ya29", "pod-token", &token] {
        assert!(!metrics.contains(secret), "{secret} in metrics");
    }

    agent.shutdown().await;
    let refused = http().get(format!("http://127.0.0.1:{aws}/v1/aws/credentials")).send().await;
    assert!(refused.is_err(), "stopped listening");
}

/// Asks the AWS endpoint of `agent` as the SDK would.
async fn aws_credentials(agent: &Agent) -> (u16, Value) {
    let port = agent.local_addr(EndpointKind::Aws).unwrap().port();
    let token = agent.aws_token().unwrap();
    get_json(http().get(format!("http://127.0.0.1:{port}/v1/aws/credentials")).header("Authorization", token.expose()))
        .await
}

/// Sleeps until `at` has passed.
async fn sleep_past(at: Timestamp) {
    let left = at.duration_since(Timestamp::now()).unsigned_abs();
    tokio::time::sleep(left + Duration::from_millis(50)).await;
    assert!(Timestamp::now() > at);
}

fn aws_only() -> Vec<AgentDelivery> {
    vec![AgentDelivery {
        policy: "s3".into(),
        endpoint: AgentEndpoint::AwsContainerCredentials { port: 0 },
        evidence: vec![],
    }]
}

#[tokio::test]
async fn the_end_of_the_time_window_stops_serving_even_without_the_broker() {
    // A credential valid for an hour, in a time window that closes in a few seconds; the
    // broker is gone by then.
    let broker = FakeBroker::start().await;
    let window_end = Timestamp::now() + SignedDuration::from_secs(4);
    broker.script("s3", vec![ok_until("s3", aws_keys(), 3600, 2700, window_end)]);
    let files = Files::new("t");
    let agent = Agent::start(settings(&broker, &files, aws_only())).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || agent.store().valid("s3").is_ok()).await);
    let (status, v) = aws_credentials(&agent).await;
    assert_eq!(status, 200, "{v}");
    let told = v["Expiration"].as_str().unwrap().parse::<Timestamp>().unwrap();
    assert!(
        told <= window_end && told > window_end - SignedDuration::from_secs(1),
        "SDKs are told the window's end: {v}"
    );
    broker.stop();

    sleep_past(window_end).await;
    let (status, v) = aws_credentials(&agent).await;
    assert_eq!(status, 503, "served after the window closed: {v}");
    assert_eq!(v["Code"], "CredentialsUnavailable");
    assert!(v["Message"].as_str().unwrap().contains("time window"), "{v}");
    assert!(agent.store().not_ready().contains(&"s3".to_owned()), "health reports it");
    agent.shutdown().await;
}

#[tokio::test]
async fn at_the_end_of_the_time_window_the_next_credential_is_fetched() {
    // The broker's refreshAt lies after the window's end: the agent asks again at the
    // window's end, not 45 minutes later (the broker answers with the next window's
    // credential, or refuses).
    let broker = FakeBroker::start().await;
    let window_end = Timestamp::now() + SignedDuration::from_secs(3);
    let next = Credential::Aws {
        access_key_id: "ASIANEXTWINDOW".into(),
        secret_access_key: SecretString::new("next-secret"),
        session_token: SecretString::new("next-session"),
        account_id: None,
    };
    broker.script("s3", vec![ok_until("s3", aws_keys(), 3600, 2700, window_end), ok("s3", next, 3600, 2700)]);
    let files = Files::new("t");
    let agent = Agent::start(settings(&broker, &files, aws_only())).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || agent.store().valid("s3").is_ok()).await);
    assert_eq!(aws_credentials(&agent).await.1["AccessKeyId"], "ASIATESTKEY");
    sleep_past(window_end).await;
    let fetched_again = eventually(Duration::from_secs(10), || broker.seen().len() >= 2).await;
    assert!(fetched_again, "no fetch at the window's end");
    assert!(eventually(Duration::from_secs(5), || agent.store().valid("s3").is_ok()).await);
    let (status, v) = aws_credentials(&agent).await;
    assert_eq!((status, &v["AccessKeyId"]), (200, &Value::from("ASIANEXTWINDOW")), "{v}");
    agent.shutdown().await;
}

#[tokio::test]
async fn a_port_in_use_fails_the_start() {
    let broker = FakeBroker::start().await;
    let files = Files::new("t");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = Agent::start(settings(&broker, &files, deliveries(port, 0, 0))).await.err().unwrap();
    assert_eq!(e.metric_label(), "bind", "{e}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_from_the_webhooks_environment() {
    let broker = FakeBroker::start().await;
    script(&broker);
    let files = Files::new("pod-token");
    let (health, aws, azure, gcp) = (free_port(), free_port(), free_port(), free_port());
    let config = AgentConfig {
        broker_url: broker.url.clone(),
        health_port: health,
        deliveries: deliveries(aws, azure, gcp),
        policy_namespace: None,
    };
    let config = serde_json::to_string(&config).unwrap();

    // The probe fails (exit 1) while nothing listens; without configuration it asks the
    // default health port.
    let probe = |config: Option<&str>| {
        let mut command = Command::new(BIN);
        command.args(["probe", "--wait=0s"]).env_clear();
        if let Some(c) = config {
            command.env("CLOUDPASS_AGENT_CONFIG", c);
        }
        command.output().unwrap()
    };
    assert_eq!(probe(Some(&config)).status.code(), Some(1));
    let missing = probe(None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not ready"), "{missing:?}");

    let mut child = Command::new(BIN)
        .env_clear()
        .env("CLOUDPASS_AGENT_CONFIG", &config)
        .env("CLOUDPASS_BROKER_CA", &broker.ca_pem)
        .env("IDENTITY_HEADER", "identity-proof")
        .env("CLOUDPASS_TOKEN_FILE", files.token_file())
        .env("CLOUDPASS_SHARED_DIR", files.shared_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = eventually(Duration::from_secs(10), || probe(Some(&config)).status.success()).await;
    assert!(ready, "probe never passed");

    let token = std::fs::read_to_string(files.shared_dir().join(cloudpass_api::agent::AWS_TOKEN_FILE)).unwrap();
    check_endpoints(aws, azure, gcp, &token).await;

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let exited = eventually(Duration::from_secs(10), || child.try_wait().unwrap().is_some()).await;
    assert!(exited, "the agent did not stop on SIGTERM");
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let logs = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(logs.contains("credential fetched") && logs.contains("SIGTERM"), "{logs}");
    for secret in [
        "test-secret-access-key",
        "test-session-token",
        "entra-access-token",
        "ya29",
        "pod-token",
        "identity-proof",
        &token,
    ] {
        assert!(!logs.contains(secret), "{secret} appears in the logs:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deliveries_the_agent_serves_what_the_broker_names_once_it_names_every_policy() {
    let broker = FakeBroker::start().await;
    script(&broker);
    let files = Files::new("pod-token");
    let aws = free_port();
    let served = serde_json::to_value(&deliveries(aws, 0, 0)[..1]).unwrap();
    // First the policy has not reached the replica asked, then it has.
    broker.script_agent_config(vec![
        serde_json::json!({"deliveries": [], "unavailable": [{"policy": "s3", "message": "no Ready AccessPolicy s3"}]}),
        serde_json::json!({"deliveries": served}),
    ]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(cloudpass_agent::run(settings(&broker, &files, vec![]), async {
        stopped.await.ok();
    }));
    let token_file = files.shared_dir().join(cloudpass_api::agent::AWS_TOKEN_FILE);
    assert!(eventually(Duration::from_secs(10), || token_file.exists()).await, "the AWS endpoint never started");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let http = http();
    let mut answer = (0, Value::Null);
    for _ in 0..100 {
        answer =
            get_json(http.get(format!("http://127.0.0.1:{aws}/v1/aws/credentials")).header("Authorization", &token))
                .await;
        if answer.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer.0, 200, "{answer:?}");
    assert_eq!(answer.1["AccessKeyId"], "ASIATESTKEY");
    assert_eq!(broker.agent_config_asked(), 2, "asked again while a policy was missing, then no more");

    // A broker that never names the pod's policies keeps the agent asking, serving
    // nothing, until it is stopped.
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    let idle = FakeBroker::start().await;
    idle.script_agent_config(vec![serde_json::json!({"deliveries": []})]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(cloudpass_agent::run(settings(&idle, &files, vec![]), async {
        stopped.await.ok();
    }));
    assert!(eventually(Duration::from_secs(10), || idle.agent_config_asked() >= 3).await);
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let output = Command::new(BIN).arg("--help").env_clear().env("IDENTITY_HEADER", "do-not-print").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--config",
        "--broker-ca",
        "--token-file",
        "--shared-dir",
        "--identity-header",
        "--upstream-ca-file",
        "[env: IDENTITY_HEADER]",
    ] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
    assert!(!help.contains("do-not-print"), "secret environment values are not shown");
}

/// The agent's metric `name` (the sum over its label sets), from its health port.
async fn metric(health: u16, name: &str) -> f64 {
    let text = http().get(format!("http://127.0.0.1:{health}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// The status of an Azure SDK's token request; 0 before the agent listens.
async fn azure_status(port: u16, resource: &str) -> u16 {
    http()
        .get(format!("http://127.0.0.1:{port}/msi/token?api-version=2019-08-01&resource={resource}"))
        .header("X-IDENTITY-HEADER", "identity-proof")
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_reaches_the_running_agent_without_a_restart() {
    let broker = FakeBroker::start().await;
    script(&broker);
    let files = Files::new("pod-token");
    let (health, aws, azure, gcp) = (free_port(), free_port(), free_port(), free_port());
    let first = deliveries(aws, azure, gcp);
    broker.script_agent_config(vec![serde_json::json!({"deliveries": first})]);
    let mut s = settings(&broker, &files, vec![]);
    s.config.health_port = health;
    s.config_refresh = Duration::from_millis(100);
    // Static keys sign the `GetCallerIdentity` evidence without any network.
    s.broker.evidence.aws.static_keys =
        Some(("AKIAPODKEY".into(), SecretString::new("pod-secret"), None::<SecretString>));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(cloudpass_agent::run(s, async {
        stopped.await.ok();
    }));
    let storage = "https://storage.azure.com";
    let vault = "https://vault.azure.net";
    assert!(
        eventually_async(Duration::from_secs(10), || async { azure_status(azure, storage).await == 200 }).await,
        "the first configuration is never served"
    );
    let requests = |policy: &str| broker.seen().into_iter().filter(|s| s.request.policy == policy).collect::<Vec<_>>();
    let before = (requests("s3").len(), requests("gcs").len());

    // The blob policy now names another resource; the s3 policy's provider now also
    // needs the pod's AWS identity. The gcs policy is unchanged.
    let mut second = first.clone();
    second[1].endpoint = AgentEndpoint::AzureManagedIdentity { port: azure, resource: format!("{vault}/") };
    second[0].evidence = vec![EvidenceSource::AwsGetCallerIdentity { trust_provider: "aws-nodes".into() }];
    broker.script("blob", vec![ok("blob", azure_token(), 3600, 3000)]);
    broker.script_agent_config(vec![serde_json::json!({"deliveries": second})]);
    assert!(
        eventually_async(Duration::from_secs(10), || async { azure_status(azure, vault).await == 200 }).await,
        "the new resource is never served"
    );
    assert_ne!(azure_status(azure, storage).await, 200, "the old resource is no longer served");
    assert!(
        eventually(Duration::from_secs(10), || requests("s3").last().is_some_and(|s| s
            .request
            .evidence
            .aws_get_caller_identity
            .is_some()))
        .await,
        "the s3 credential is fetched again with the new evidence"
    );
    assert_eq!(requests("s3").len(), before.0 + 1, "once");
    assert_eq!(requests("gcs").len(), before.1, "the unchanged delivery keeps its credential");
    assert!(metric(health, "cloudpass_agent_config_updates_total{result=\"applied\"}").await >= 1.0);

    // A change the app could not follow (s3 on another port than its variable names) is
    // not applied: the old endpoint keeps serving, and the metric says a restart is due.
    let mut moved = second.clone();
    moved[0].endpoint = AgentEndpoint::AwsContainerCredentials { port: free_port() };
    broker.script_agent_config(vec![serde_json::json!({"deliveries": moved})]);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            metric(health, "cloudpass_agent_config_restart_required").await == 1.0
        })
        .await
    );
    let token = std::fs::read_to_string(files.shared_dir().join(cloudpass_api::agent::AWS_TOKEN_FILE)).unwrap();
    let (status, v) =
        get_json(http().get(format!("http://127.0.0.1:{aws}/v1/aws/credentials")).header("Authorization", &token))
            .await;
    assert_eq!((status, &v["AccessKeyId"]), (200, &Value::from("ASIATESTKEY")), "{v}");

    // A configuration that cannot be served is refused whole; the last one stays.
    let mut broken = second.clone();
    broken[1].endpoint = AgentEndpoint::AzureManagedIdentity { port: azure, resource: "/".into() };
    broker.script_agent_config(vec![serde_json::json!({"deliveries": broken})]);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            metric(health, "cloudpass_agent_config_updates_total{result=\"invalid\"}").await >= 1.0
        })
        .await
    );
    assert_eq!(azure_status(azure, vault).await, 200);

    // An unreachable broker changes nothing either.
    broker.stop();
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            metric(health, "cloudpass_agent_config_updates_total{result=\"error\"}").await >= 1.0
        })
        .await
    );
    assert_eq!(azure_status(azure, vault).await, 200);
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_agent_cannot_follow_is_logged_once_not_every_period() {
    let broker = FakeBroker::start().await;
    script(&broker);
    let files = Files::new("pod-token");
    let (health, aws) = (free_port(), free_port());
    let first = deliveries(aws, 0, 0)[..1].to_vec();
    let mut moved = first.clone();
    moved[0].endpoint = AgentEndpoint::AwsContainerCredentials { port: free_port() };
    broker
        .script_agent_config(vec![serde_json::json!({"deliveries": first}), serde_json::json!({"deliveries": moved})]);
    // No deliveries in the configuration: the binary asks the broker, every second here.
    let config = serde_json::json!({"brokerUrl": broker.url, "healthPort": health}).to_string();
    let child = Command::new(BIN)
        .env_clear()
        .env("CLOUDPASS_AGENT_CONFIG", &config)
        .env("CLOUDPASS_BROKER_CA", &broker.ca_pem)
        .env("CLOUDPASS_TOKEN_FILE", files.token_file())
        .env("CLOUDPASS_SHARED_DIR", files.shared_dir())
        .env("CLOUDPASS_CONFIG_REFRESH", "1s")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let asked = eventually(Duration::from_secs(15), || broker.agent_config_asked() >= 4).await;
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let logs = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(asked, "the agent stopped asking:\n{logs}");
    assert!(output.status.success(), "{output:?}");
    let warned = logs.matches("its new delivery moves the endpoint or file the app was given").count();
    assert_eq!(warned, 1, "one warning while the change waits for a restart, not one per period:\n{logs}");
    assert!(logs.contains("policy s3"), "{logs}");
}
