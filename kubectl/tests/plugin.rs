//! `kubectl cloudpass trust` as users run it: the real binary, against the real
//! apiserver with the examples applied, through a kubeconfig.

use std::process::{Command, Output};

use cloudpass_e2e::{ControlPlane, repo_root};

fn plugin(cp: &ControlPlane, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-cloudpass"))
        .args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .env_remove("CLOUDPASS_ISSUER_URL")
        .output()
        .unwrap()
}

fn ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = plugin(cp, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn failure(cp: &ControlPlane, args: &[&str]) -> String {
    let out = plugin(cp, args);
    assert!(!out.status.success(), "{args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

#[tokio::test]
async fn trust_prints_each_clouds_configuration_for_the_federated_providers() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    cp.install_crds().await.unwrap();
    cp.create_namespace("trust-team", &[]).await.unwrap();
    for example in ["aks-to-s3.yaml", "eks-to-azure-blob.yaml", "any-to-gcs.yaml", "http-api-key.yaml"] {
        cp.apply_path(Some("trust-team"), &repo_root().join("examples").join(example)).unwrap();
    }
    let issuer = "https://oidc.example.com";

    // JSON: one entry per federated provider, the API key's left out.
    let json: serde_json::Value =
        serde_json::from_str(&ok(cp, &["trust", "-n", "trust-team", "--issuer-url", issuer, "-o", "json"])).unwrap();
    let names: Vec<&str> = json.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["azure-blob-writer", "gcs-reader", "orders-s3"], "{json}");
    let aws = &json[2];
    assert_eq!(aws["audience"], "sts.amazonaws.com");
    assert_eq!(aws["subjects"], serde_json::json!(["system:cloudpass:trust-team:orders-s3"]));
    let policy: serde_json::Value = serde_json::from_str(aws["configure"][1]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        policy["Statement"][0]["Principal"]["Federated"],
        "arn:aws:iam::123456789012:oidc-provider/oidc.example.com"
    );
    assert_eq!(json[0]["audience"], "api://AzureADTokenExchange");

    // The table, then the steps.
    let table = ok(cp, &["trust", "-n", "trust-team", "--issuer-url", issuer]);
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(table.contains("aws iam create-open-id-connect-provider --url https://oidc.example.com"), "{table}");
    assert!(table.contains("gcloud iam service-accounts add-iam-policy-binding reader@analytics-prod"), "{table}");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&ok(
        cp,
        &["trust", "orders-s3", "-n", "trust-team", "--issuer-url", issuer, "-o", "yaml"],
    ))
    .unwrap();
    assert_eq!(yaml[0]["kind"], "awsSts");

    // Errors name what is missing.
    let e = failure(cp, &["trust", "absent", "-n", "trust-team", "--issuer-url", issuer]);
    assert!(e.contains("CredentialProvider trust-team/absent not found"), "{e}");
    let e = failure(cp, &["trust", "weather-api-key", "-n", "trust-team", "--issuer-url", issuer]);
    assert!(e.contains("is not federated"), "{e}");
    let e = failure(cp, &["trust", "-n", "trust-team", "--cloudpass-namespace", "trust-nowhere"]);
    assert!(e.contains("Deployment trust-nowhere/cloudpass-broker not found") && e.contains("--issuer-url"), "{e}");

    // Without --issuer-url: the issuer the release's broker runs with.
    cp.create_namespace("trust-system", &[]).await.unwrap();
    let deployment = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "cp-broker"},
        "spec": {"selector": {"matchLabels": {"app": "b"}}, "template": {"metadata": {"labels": {"app": "b"}},
            "spec": {"containers": [{"name": "broker", "image": "broker:1",
                "args": ["--components=broker", "--issuer-url=https://issuer.from.release"]}]}}}});
    cp.apply_yaml(Some("trust-system"), &deployment.to_string()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&ok(
        cp,
        &[
            "trust",
            "orders-s3",
            "-n",
            "trust-team",
            "--cloudpass-namespace",
            "trust-system",
            "--release",
            "cp",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(json[0]["issuer"], "https://issuer.from.release");
}

#[tokio::test]
async fn who_can_names_the_policies_service_accounts_and_running_workloads() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    cp.install_crds().await.unwrap();
    let ns = "whocan-team";
    cp.create_namespace(ns, &[]).await.unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    for sa in ["orders", "default"] {
        cp.create_service_account(ns, sa).await.unwrap();
    }
    // Two pods of the workload's service account and labels, one of another account.
    for (name, sa) in [("orders-1", "orders"), ("orders-2", "orders"), ("impostor", "default")] {
        let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "orders"}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "api", "image": "orders:1"}]}});
        cp.apply_yaml(Some(ns), &pod.to_string()).unwrap();
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(cp, &["who-can", "orders-s3", "-n", ns, "-o", "json"])).unwrap();
    let access = &json[0];
    assert_eq!(access["policy"], "orders-to-s3");
    assert_eq!(access["serviceAccounts"], serde_json::json!(["orders"]));
    assert_eq!(access["podSelector"], "app=orders");
    let workloads: Vec<(&str, u64)> = access["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["owner"].as_str().unwrap(), w["pods"].as_u64().unwrap()))
        .collect();
    assert_eq!(workloads, [("Pod/orders-1", 1), ("Pod/orders-2", 1)], "{json}");

    let table = ok(cp, &["who-can", "orders-s3", "-n", ns]);
    assert!(table.starts_with("POLICY") && table.contains("orders-to-s3"), "{table}");
    let e = failure(cp, &["who-can", "absent", "-n", ns]);
    assert!(e.contains("CredentialProvider whocan-team/absent not found"), "{e}");
}

#[tokio::test]
async fn explain_pod_says_which_policies_select_it_and_why_the_others_do_not() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    cp.install_crds().await.unwrap();
    let ns = "explain-team";
    cp.create_namespace(ns, &[("cloudpass.dev/injection", "enabled")]).await.unwrap();
    cp.apply_path(Some(ns), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    for sa in ["orders", "billing"] {
        cp.create_service_account(ns, sa).await.unwrap();
    }
    for (name, sa) in [("orders-1", "orders"), ("billing-1", "billing")] {
        let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "orders"}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "api", "image": "orders:1"}]}});
        cp.apply_yaml(Some(ns), &pod.to_string()).unwrap();
    }
    let explain = |pod: &str| -> serde_json::Value {
        serde_json::from_str(&ok(
            cp,
            &["explain", "pod", pod, "-n", ns, "--cloudpass-namespace", "explain-none", "-o", "json"],
        ))
        .unwrap()
    };
    let selected = explain("orders-1");
    assert_eq!(selected["namespaceOptedIn"], true);
    assert_eq!(selected["policies"][0]["selects"], true, "{selected}");
    assert_eq!(selected["injected"], serde_json::Value::Null, "no webhook runs here");
    assert!(selected["decisionsUnavailable"].as_str().unwrap().contains("no broker pod in explain-none"), "{selected}");
    let other = explain("billing-1");
    assert_eq!(other["policies"][0]["selects"], false);
    assert_eq!(other["policies"][0]["why"], "it is for service account orders, the pod runs as billing");

    let text = ok(cp, &["explain", "pod", "billing-1", "-n", ns, "--cloudpass-namespace", "explain-none"]);
    assert!(text.contains("Namespace opted in: yes") && text.contains("it is for service account orders"), "{text}");
    let e = failure(cp, &["explain", "pod", "absent", "-n", ns]);
    assert!(e.contains("pod explain-team/absent not found"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_runs_a_check_now_and_prints_the_clouds_answer() {
    use cloudpass_e2e::{
        broker::{BrokerOptions, RunningBroker},
        cloudpass_object,
        fakes::entra::{EntraApp, EntraConfig, EntraFake, FederatedCredential},
        scenario::Binaries,
    };
    use serde_json::json;
    const TENANT: &str = "8c1d3f0e-7b6a-4e55-9f21-0a3b5c7d9e11";
    const CLIENT_ID: &str = "4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55";
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let ns = "verify-team";
    let options =
        BrokerOptions { namespace: "cloudpass-plugin".into(), verify_interval: "1h".into(), ..Default::default() };
    let b = RunningBroker::start(cp, &Binaries::locate().unwrap().operator, &options).await.unwrap();
    cp.create_namespace(ns, &[]).await.unwrap();
    let entra = EntraFake::start(
        EntraConfig {
            tenant_id: TENANT.into(),
            apps: vec![EntraApp {
                client_id: CLIENT_ID.into(),
                object_id: "6b1f2e3d-4c5b-4a69-8877-665544332211".into(),
                federated_credentials: vec![FederatedCredential::new(&b.url, &format!("system:cloudpass:{ns}:blob"))],
            }],
            issuer_ca_pem: b.ca.cert_pem(),
        },
        &b.ca,
    )
    .await
    .unwrap();
    let azure =
        json!({"azureWorkloadIdentity": {"tenantId": TENANT, "clientId": CLIENT_ID, "authorityHost": entra.url()}});
    let mut off = azure.clone();
    off["verification"] = json!({"enabled": false});
    for (name, spec) in [
        ("blob", azure.clone()),
        ("blob-elsewhere", azure),
        ("blob-unchecked", off),
        ("weather", json!({"apiKey": {"secretRef": {"name": "weather", "key": "key"}}})),
    ] {
        cp.apply_yaml(Some(ns), &cloudpass_object("CredentialProvider", name, spec).to_string()).unwrap();
    }
    // The operator's own first check, so that the plugin's is another.
    cp.wait_for_condition("credentialprovider", ns, "blob", "Verified", "True", std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let asked = entra.requests().len();

    let table = ok(cp, &["verify", "blob", "-n", ns]);
    assert!(table.lines().next().unwrap().starts_with("NAMESPACE"), "{table}");
    assert!(table.contains("True") && table.contains(&format!("application {CLIENT_ID}")), "{table}");
    assert!(entra.requests().len() > asked, "the plugin's request ran a new check");

    // A refusal is printed with what to configure, and the exit status says so.
    let out = plugin(cp, &["verify", "blob-elsewhere", "-n", ns, "-o", "json"]);
    assert!(!out.status.success());
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (answer["verified"]["status"].as_str(), answer["verified"]["reason"].as_str()),
        (Some("False"), Some("AADSTS700213"))
    );
    let message = answer["verified"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("az ad app federated-credential create --id {CLIENT_ID}")), "{message}");
    assert!(answer["lastVerification"]["request"].is_string(), "{answer}");

    // Errors name what is missing or why there is nothing to check.
    let e = failure(cp, &["verify", "absent", "-n", ns]);
    assert!(e.contains("CredentialProvider verify-team/absent not found"), "{e}");
    let e = failure(cp, &["verify", "weather", "-n", ns]);
    assert!(e.contains("of kind apiKey") && e.contains("nothing to verify"), "{e}");
    let e = failure(cp, &["verify", "blob-unchecked", "-n", ns]);
    assert!(e.contains("spec.verification.enabled: false"), "{e}");
}
