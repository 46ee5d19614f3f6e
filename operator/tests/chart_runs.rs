//! The operator container as the Helm chart renders it really runs: the real binary with
//! exactly the rendered arguments and environment (bind address moved to loopback), as
//! the chart's service account with only the chart's RBAC, becomes ready on its probe
//! port, wins the Lease and reconciles an example to Ready.

use std::time::{Duration, Instant};

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
    assert!(!process.log_tail(50_000).contains("forbidden"), "RBAC refused something:\n{}", process.log_tail(4000));
}
