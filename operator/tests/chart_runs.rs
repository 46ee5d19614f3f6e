//! The operator container as the Helm chart renders it really runs: the real binary with
//! exactly the rendered arguments and environment (bind addresses moved to loopback), as
//! the chart's service account with only the chart's RBAC, becomes ready on its probe
//! port, wins the Lease, reconciles an example to Ready, and serves the broker over
//! HTTPS with the certificate it manages itself, verifiable with the CA it publishes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use cloudpass_e2e::{ControlPlane, chart, repo_root};

const NS: &str = "cloudpass-system";

#[tokio::test]
async fn the_rendered_operator_runs_with_its_own_rbac() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let docs = chart::install(cp, "cloudpass", NS).unwrap();
    let deployment = chart::find(&docs, "Deployment", "cloudpass-operator").unwrap();
    let port = chart::container_port(deployment, "operator", "metrics").unwrap();
    assert_eq!(deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"], "metrics");

    // The broker Service reaches the container's broker port, where the broker listens.
    let service = chart::find(&docs, "Service", "cloudpass-broker").unwrap();
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "broker");
    let broker_port = chart::container_port(deployment, "operator", "broker").unwrap();
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(u64::from(broker_port)));
    let rendered = chart::container_command(deployment, "operator", NS, "cloudpass-operator-0").unwrap();
    assert!(rendered.args.contains(&format!("--broker-addr=0.0.0.0:{broker_port}")), "{:?}", rendered.args);
    let issuer = rendered.args.iter().find_map(|a| a.strip_prefix("--issuer-url=")).expect("--issuer-url rendered");
    assert_eq!(issuer, format!("https://cloudpass-broker.{NS}.svc:{broker_port}"), "the default issuer is in-cluster");

    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator"));
    let process = chart::run_container(cp, deployment, "operator", "cloudpass-operator", binary).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.map(|r| r.status().as_u16()).ok();
        if status == Some(200) && process.log_tail(50_000).contains("caches warm") {
            break;
        }
        assert!(Instant::now() < deadline, "not ready ({status:?}):\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    cp.create_namespace("team", &[]).await.unwrap();
    cp.apply_path(Some("team"), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    cp.wait_for_condition("accesspolicy", "team", "orders-to-s3", "Ready", "True", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", process.log_tail(4000)));
    cp.kubectl_ok(&["get", "configmap", "cloudpass-config-team", "-n", NS]).unwrap();
    cp.kubectl_ok(&["get", "lease", "cloudpass-operator", "-n", NS]).unwrap();

    // Self-managed: the certificate Secret exists and the CA bundle is published.
    cp.kubectl_ok(&["get", "secret", "cloudpass-broker-tls", "-n", NS]).unwrap();
    let ca = cp
        .kubectl_ok(&["get", "configmap", "cloudpass-broker-ca", "-n", NS, "-o", "jsonpath={.data.ca\\.crt}"])
        .unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"), "published CA: {ca:?}");

    // The issuer's discovery document over TLS, verified with only the published CA and
    // the Service's DNS name (resolved to where the container listens).
    let host = format!("cloudpass-broker.{NS}.svc");
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca.as_bytes()).unwrap())
        .resolve(&host, SocketAddr::from(([127, 0, 0, 1], broker_port)))
        .build()
        .unwrap();
    let discovery: serde_json::Value = http
        .get(format!("{issuer}/.well-known/openid-configuration"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("discovery over TLS: {e}\n{}", process.log_tail(4000)))
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], issuer);
    let jwks_uri = discovery["jwks_uri"].as_str().expect("jwks_uri");
    let jwks: serde_json::Value = http.get(jwks_uri).send().await.unwrap().json().await.unwrap();
    assert!(jwks["keys"].as_array().is_some_and(|k| !k.is_empty()), "JWKS: {jwks}");

    assert!(!process.log_tail(50_000).contains("forbidden"), "RBAC refused something:\n{}", process.log_tail(4000));
}
