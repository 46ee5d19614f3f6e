//! The webhook container as the Helm chart renders it really runs: the real binary with
//! exactly the rendered arguments and environment (bind address moved to loopback), as
//! the chart's service account with only the chart's RBAC, becomes ready on the port the
//! Service and the webhook configuration point at once it has the broker's CA from its
//! (optional) ConfigMap volume, and takes over the caBundle.

use std::time::{Duration, Instant};

use cloudpass_e2e::{ControlPlane, certs::TestCa, chart};

const NS: &str = "cloudpass-system";

#[tokio::test]
async fn the_rendered_webhook_runs_with_its_own_rbac() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let docs = chart::install(cp, "cloudpass", NS).unwrap();
    let deployment = chart::find(&docs, "Deployment", "cloudpass-webhook").unwrap();
    let service = chart::find(&docs, "Service", "cloudpass-webhook").unwrap();
    let config = chart::find(&docs, "MutatingWebhookConfiguration", "cloudpass-webhook").unwrap();

    // The configuration calls the Service, whose target is the container's https port.
    let client_service = &config["webhooks"][0]["clientConfig"]["service"];
    assert_eq!(client_service["name"], "cloudpass-webhook");
    assert_eq!(client_service["port"], service["spec"]["ports"][0]["port"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "https");
    let port = chart::container_port(deployment, "webhook", "https").unwrap();
    let rendered = chart::container_command(deployment, "webhook", NS, "cloudpass-webhook-0").unwrap();
    assert!(rendered.args.contains(&format!("--listen-addr=0.0.0.0:{port}")), "{:?}", rendered.args);

    // The broker CA comes from the ConfigMap the operator publishes, mounted as a file.
    assert!(rendered.args.contains(&"--broker-ca-file=/etc/cloudpass/broker-ca/ca.crt".to_owned()));
    let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
    let broker_ca = volumes.as_sequence().unwrap().iter().find(|v| v["name"] == "broker-ca").unwrap();
    assert_eq!(broker_ca["configMap"]["name"], "cloudpass-broker-ca");
    assert_eq!(broker_ca["configMap"]["optional"], true, "the webhook starts before the operator published it");

    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-webhook"));
    let process = chart::run_container(cp, deployment, "webhook", "cloudpass-webhook", binary).await.unwrap();
    let port = process.port(port);

    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let readyz = || async {
        let response = http.get(format!("https://127.0.0.1:{port}/readyz")).send().await.ok()?;
        Some((response.status().as_u16(), response.text().await.unwrap_or_default()))
    };
    // Without the broker CA it would inject agents that cannot reach the broker: not ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = readyz().await;
        if answer.as_ref().is_some_and(|(_, body)| body.contains("broker CA")) {
            break;
        }
        assert!(Instant::now() < deadline, "{answer:?}:\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!chart::project_config_map(cp, deployment, "broker-ca").unwrap(), "nothing published yet");
    // What the operator publishes, and the kubelet then projects into the volume.
    let ca = TestCa::new("broker").unwrap().cert_pem();
    cp.kubectl_ok(&["create", "configmap", "cloudpass-broker-ca", "-n", NS, &format!("--from-literal=ca.crt={ca}")])
        .unwrap();
    assert!(chart::project_config_map(cp, deployment, "broker-ca").unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = readyz().await;
        if answer.as_ref().is_some_and(|(status, _)| *status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "not ready ({answer:?}):\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // With only its own RBAC it created its Secret and filled its caBundle.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = cp.kubectl_ok(&["get", "mutatingwebhookconfiguration", "cloudpass-webhook", "-o", "json"]).unwrap();
        let live: serde_json::Value = serde_json::from_str(&live).unwrap();
        if live["webhooks"][0]["clientConfig"]["caBundle"].as_str().is_some_and(|b| !b.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "caBundle never set:\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cp.kubectl_ok(&["get", "secret", "cloudpass-webhook-tls", "-n", NS]).unwrap();
    assert!(!process.log_tail(20_000).contains("forbidden"), "RBAC refused something:\n{}", process.log_tail(4000));
}
