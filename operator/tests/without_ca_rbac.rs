//! A controller that may not watch the broker CA's copies (RBAC of an older chart, or a
//! hand-made role without that rule) still reconciles every namespace: the copies are a
//! convenience of injected pods, and a refused watch must not hold up the policies. It
//! says so in its log.

use std::time::{Duration, Instant};

use cloudpass_e2e::{ControlPlane, process::ManagedProcess, repo_root};

const NS: &str = "cloudpass-system";
const USER: &str = "controller-without-ca-rights";

/// The controller's rights without the rule on the broker CA's copies.
fn rbac() -> String {
    format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {USER}}}
rules:
  - apiGroups: ["cloudpass.dev"]
    resources: ["trustproviders", "credentialproviders", "accesspolicies"]
    verbs: ["get", "list", "watch"]
  - apiGroups: ["cloudpass.dev"]
    resources: ["trustproviders/status", "credentialproviders/status", "accesspolicies/status"]
    verbs: ["get", "patch"]
  - apiGroups: [""]
    resources: ["namespaces"]
    verbs: ["list", "watch"]
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["get"]
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {USER}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {USER}}}
subjects: [{{kind: User, name: {USER}, apiGroup: rbac.authorization.k8s.io}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {USER}, namespace: {NS}}}
rules:
  - apiGroups: [""]
    resources: ["configmaps"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    verbs: ["get", "list", "watch", "create", "update", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {USER}, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {USER}}}
subjects: [{{kind: User, name: {USER}, apiGroup: rbac.authorization.k8s.io}}]
"#
    )
}

#[tokio::test]
async fn a_refused_watch_of_the_ca_copies_holds_up_no_policy() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    cp.install_crds().await.unwrap();
    cp.create_namespace(NS, &[]).await.unwrap();
    cp.apply_yaml(None, &rbac()).unwrap();
    let kubeconfig = cp.kubeconfig_for_user(USER, USER, &[]).unwrap();
    let log = cp.dir().join("operator-without-ca-rights.log");
    let metrics_port = cloudpass_e2e::process::free_port().unwrap();
    let args: Vec<String> = [
        "--namespace",
        NS,
        "--components",
        "controller",
        "--log-format",
        "text",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
    ]
    .map(String::from)
    .to_vec();
    let kubeconfig = kubeconfig.to_string_lossy().to_string();
    let operator = ManagedProcess::spawn(
        "cloudpass-operator",
        std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator")),
        &args,
        &log,
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .unwrap();

    let ns = "team-opted-in";
    cp.create_namespace(ns, &[("cloudpass.dev/injection", "enabled")]).await.unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    cp.wait_for_condition("accesspolicy", ns, "orders-to-s3", "Ready", "True", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail(4000)));
    // Loud: the refused watch is in the log.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !operator.log_tail(100_000).contains("forbidden") {
        assert!(Instant::now() < deadline, "the refused watch was not logged:\n{}", operator.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
