//! The webhook container as the Helm chart renders it really runs: the real binary with
//! exactly the rendered arguments and environment (bind address moved to loopback), as
//! the chart's service account with only the chart's RBAC, becomes ready on the port the
//! Service and the webhook configuration point at, and takes over the caBundle.

use std::time::{Duration, Instant};

use cloudpass_e2e::{ControlPlane, chart};

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

    // Agents mount the operator's copy of the broker CA in their own namespace: the
    // webhook itself needs no CA, and no volume for it.
    assert!(rendered.args.contains(&"--broker-ca-configmap=cloudpass-broker-ca".to_owned()), "{:?}", rendered.args);
    assert!(!rendered.args.iter().any(|a| a.starts_with("--broker-ca-file")));
    assert!(deployment["spec"]["template"]["spec"]["volumes"].is_null(), "no volume without cert-manager");

    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-webhook"));
    let process = chart::run_container(cp, deployment, "webhook", "cloudpass-webhook", binary).await.unwrap();
    let port = process.port(port);

    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let readyz = || async {
        let response = http.get(format!("https://127.0.0.1:{port}/readyz")).send().await.ok()?;
        Some((response.status().as_u16(), response.text().await.unwrap_or_default()))
    };
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
