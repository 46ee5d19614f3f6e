//! The webhook container as the Helm chart renders it really runs: the real binary with
//! exactly the rendered arguments and environment (bind address moved to loopback), as
//! the chart's service account with only the chart's RBAC, becomes ready on the port the
//! Service and the webhook configuration point at, and takes over the caBundle.

use std::time::{Duration, Instant};

use cloudpass_e2e::{ControlPlane, chart, process::ManagedProcess, repo_root};

const NS: &str = "cloudpass-system";

#[tokio::test]
async fn the_rendered_webhook_runs_with_its_own_rbac() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let install = cp
        .helm()
        .args(["install", "cloudpass"])
        .arg(repo_root().join("charts/cloudpass"))
        .args(["-n", NS, "--create-namespace"])
        .output()
        .unwrap();
    assert!(install.status.success(), "{}", String::from_utf8_lossy(&install.stderr));
    let docs = chart::render(cp, "cloudpass", NS, &[]).unwrap();
    let deployment = chart::find(&docs, "Deployment", "cloudpass-webhook").unwrap();
    let service = chart::find(&docs, "Service", "cloudpass-webhook").unwrap();
    let config = chart::find(&docs, "MutatingWebhookConfiguration", "cloudpass-webhook").unwrap();

    // The configuration calls the Service, whose target is the container's https port.
    let client_service = &config["webhooks"][0]["clientConfig"]["service"];
    assert_eq!(client_service["name"], "cloudpass-webhook");
    assert_eq!(client_service["port"], service["spec"]["ports"][0]["port"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "https");
    let port = chart::container_port(deployment, "webhook", "https").unwrap();

    let chart::ContainerCommand { args, env } =
        chart::container_command(deployment, "webhook", NS, "cloudpass-webhook-0").unwrap();
    let args: Vec<String> = args.into_iter().map(|a| a.replace("=0.0.0.0:", "=127.0.0.1:")).collect();
    assert!(args.contains(&format!("--listen-addr=127.0.0.1:{port}")), "{args:?}");
    let kubeconfig = cp.kubeconfig_for(NS, "cloudpass-webhook").await.unwrap();
    let mut vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let kubeconfig = kubeconfig.to_string_lossy().to_string();
    vars.push(("KUBECONFIG", &kubeconfig));
    let process = ManagedProcess::spawn(
        "chart-webhook",
        std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-webhook")),
        &args,
        &cp.dir().join("chart-webhook.log"),
        &vars,
    )
    .unwrap();

    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status =
            http.get(format!("https://127.0.0.1:{port}/readyz")).send().await.map(|r| r.status().as_u16()).ok();
        if status == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "not ready ({status:?}):\n{}", process.log_tail(4000));
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
