//! Cross-cloud scenarios end to end: the real operator (controller + broker) and webhook
//! on the local control plane, examples applied with kubectl, pods created through the
//! apiserver and "run" with the real agent and the official SDKs against the local
//! emulators (see `cloudpass_e2e::scenario`).
//!
//! One stack per test binary; scenarios run one at a time (the agent's ports are fixed)
//! and each works in its own namespace.

use std::{sync::OnceLock, time::Duration};

use cloudpass_e2e::{
    cloudpass_object,
    scenario::{
        Deployed, Stack,
        aws::{AksToS3, AwsCloud, S3_APP},
        exclusive,
    },
};
use serde_json::json;

/// moto, shared by the AWS scenarios (started once, on its own thread).
fn aws() -> &'static AwsCloud {
    static AWS: OnceLock<AwsCloud> = OnceLock::new();
    AWS.get_or_init(|| {
        std::thread::spawn(|| tokio::runtime::Runtime::new().unwrap().block_on(AwsCloud::start()).unwrap())
            .join()
            .expect("moto start panicked")
    })
}

/// Asserts that no token or credential of `secrets` appears in `text`.
fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for s in secrets.iter().filter(|s| s.len() > 8) {
        assert!(!text.contains(s), "a secret appears in {what}");
    }
}

/// An opted-in namespace with the AKS to S3 example applied and its policy Ready.
async fn aks_to_s3_applied(stack: &Stack<'static>, ns: &str) -> AksToS3 {
    stack.opted_in_namespace(ns).await.unwrap();
    let setup = AksToS3::prepare(stack, aws(), ns).await.unwrap();
    setup.apply(stack).await.unwrap();
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aks_to_s3_with_boto3() {
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-aks-s3";
    let setup = aks_to_s3_applied(stack, ns).await;

    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    assert!(pod.is_injected(), "{}", pod.stored);
    let injected = pod.injection_summary();
    assert_eq!(injected.init_containers, ["cloudpass-agent"]);
    assert_eq!(injected.policies.as_deref(), Some("orders-to-s3"));
    assert_eq!(
        injected.env_added["api"],
        ["AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]
    );

    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    let started = running.wait_started(Duration::from_secs(30)).await.unwrap();
    let run = running.run_app("api", S3_APP).await.unwrap();
    let result = run.ok_json().unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["credentialSource"], "container-role");
    assert_eq!(result["accessKeyPrefix"], "ASIA", "STS session credentials");
    let identity = result["identity"].as_str().unwrap();
    let session = format!("aks-{ns}-{}", running.pod.name);
    assert_eq!(identity, format!("arn:aws:sts::123456789012:assumed-role/aks-orders-s3/{session}"));
    assert!(setup.gate.calls() >= 1, "credentials came through the STS gate");
    eprintln!("aks_to_s3: agent ready {:.2}s after start; boto3 read back {:?}", started.as_secs_f64(), result["read"]);

    let records = stack.audit_records(ns, &running.pod.name);
    let allowed = records.iter().find(|r| r["outcome"] == "allowed").expect("an allowed audit record");
    assert_eq!(allowed["policy"], "orders-to-s3");
    assert_eq!(allowed["credentialKind"], "awsSts");
    let expires: jiff::Timestamp = allowed["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = expires.as_second() - jiff::Timestamp::now().as_second();
    assert!((800..=900).contains(&left), "maxCredentialLifetime 15m bounds the credential: {left}s left");

    let token = std::fs::read_to_string(running.volume_dir("cloudpass-token").unwrap().join("token")).unwrap();
    let agent_log = running.agent_log_text();
    assert_no_secret(&agent_log, &[token.trim()], "the agent's log");
    assert_no_secret(&stack.broker.log_text(), &[token.trim()], "the operator's log");
    assert_no_secret(&run.stdout, &[token.trim()], "the app's output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_no_policy_selects_gets_nothing() {
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-unselected";
    let setup = aks_to_s3_applied(stack, ns).await;
    // The webhook has loaded the namespace's policy: an orders pod would be injected.
    cloudpass_e2e::scenario::AdmittedPod::wait_until_injectable(stack.cp, ns, &setup.pod, Duration::from_secs(30))
        .await
        .unwrap();

    let mut other = setup.pod.clone();
    other["metadata"]["labels"] = json!({"app": "billing"});
    other["metadata"]["generateName"] = json!("billing-");
    let pod = stack.create_pod(ns, &other, false).await.unwrap();
    assert!(!pod.is_injected(), "{}", pod.stored);
    assert!(pod.annotation("cloudpass.dev/injected").is_none());
    let running = stack.node.run(stack.cp, pod).await.unwrap();
    let run = running.run_app("api", S3_APP).await.unwrap();
    assert!(!run.success, "the app got access without a policy: {}", run.stdout);
    assert_eq!(run.json().unwrap()["error"], "NoCredentialsError", "{}", run.stdout);
    assert!(stack.audit_records(ns, &running.pod.name).is_empty(), "the broker was never asked");
}

/// Azurite, shared by the Azure scenarios (its certificate from the stack's test CA).
fn azurite() -> &'static cloudpass_e2e::scenario::azure::Azurite {
    static AZURITE: OnceLock<cloudpass_e2e::scenario::azure::Azurite> = OnceLock::new();
    AZURITE.get_or_init(|| {
        let ca = &Stack::shared().broker.ca;
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(cloudpass_e2e::scenario::azure::Azurite::start(ca))
                    .unwrap()
            })
            .join()
            .expect("azurite start panicked")
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eks_to_azure_blob_with_azure_identity() {
    use cloudpass_e2e::scenario::azure::{BLOB_APP, EksToAzureBlob};
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let azurite = azurite();
    let ns = "scenario-eks-blob";
    stack.opted_in_namespace(ns).await.unwrap();
    let setup = EksToAzureBlob::prepare(stack, azurite, ns).await.unwrap();
    setup.apply(stack).await.unwrap();

    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    let injected = pod.injection_summary();
    assert_eq!(injected.env_added["app"], ["IDENTITY_ENDPOINT", "IDENTITY_HEADER"]);
    assert!(injected.agent_env.contains(&"IDENTITY_HEADER".to_owned()), "{injected:?}");
    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    let run = running.run_app("app", BLOB_APP).await.unwrap();
    let result = run.ok_json().unwrap_or_else(|e| panic!("{e:#}\nazurite:\n{}", azurite.log_tail()));
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(setup.entra.calls(), 1, "one token from Entra, through the federated credential");
    assert_eq!(result["credential"], "AppServiceCredential", "{result}");
    // Azurite checks bearer tokens: a made-up one is refused.
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(stack.broker.ca.cert_pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let forged = http
        .get(format!("{}/reports?restype=container&comp=list", azurite.account_url()))
        .bearer_auth("eyJhbGciOiJub25lIn0.eyJhdWQiOiJodHRwczovL3N0b3JhZ2UuYXp1cmUuY29tIn0.")
        .header("x-ms-version", "2021-08-06")
        .send()
        .await
        .unwrap();
    assert!(matches!(forged.status().as_u16(), 401 | 403), "Azurite accepted a forged token: {}", forged.status());

    let records = stack.audit_records(ns, &running.pod.name);
    let allowed = records.iter().find(|r| r["outcome"] == "allowed").expect("an allowed audit record");
    assert_eq!(allowed["credentialKind"], "azureWorkloadIdentity");
    assert_eq!(allowed["policy"], "report-uploader-to-blob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_cluster_to_gcs_with_google_cloud_storage() {
    use cloudpass_e2e::scenario::gcs::{AnyToGcs, GCS_APP, OBJECT_CONTENT};
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    // The example as it is (read-only scope), then with the read-write scope.
    let read_write = "https://www.googleapis.com/auth/devstorage.read_write";
    for (ns, scope) in [("scenario-gcs", None), ("scenario-gcs-write", Some(read_write))] {
        stack.opted_in_namespace(ns).await.unwrap();
        let mut setup = AnyToGcs::prepare(stack, ns).await.unwrap();
        if let Some(scope) = scope {
            setup.example.set("AccessPolicy", "dashboards-to-gcs", "/spec/server/scopes", json!([scope])).unwrap();
        }
        setup.apply(stack).await.unwrap();

        let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
        assert_eq!(pod.injection_summary().env_added["web"], ["GCE_METADATA_HOST", "GCE_METADATA_IP"]);
        let mut running = stack.node.run(stack.cp, pod).await.unwrap();
        running.wait_started(Duration::from_secs(30)).await.unwrap();
        let run = running.run_app("web", GCS_APP).await.unwrap();
        let result = run.ok_json().unwrap_or_else(|e| panic!("{e:#}\nfake-gcs-server:\n{}", setup.gcs.log_tail()));
        assert_eq!(result["read"], OBJECT_CONTENT, "{result}");
        assert_eq!(result["credential"], "google.auth.compute_engine.credentials.Credentials", "{result}");
        assert_eq!(result["serviceAccount"], setup.service_account.as_str(), "{result}");
        if scope.is_none() {
            // devstorage.read_only: GCS refuses the write for its scope.
            assert_eq!(result["write"], "refused (403): Provided scope(s) are not authorized", "{result}");
        } else {
            assert_eq!(result["write"], "allowed", "{result}");
            assert_eq!(result["writtenAndReadBack"], "written by an unchanged google-cloud-storage app", "{result}");
        }
        let records = stack.audit_records(ns, &running.pod.name);
        let allowed = records.iter().find(|r| r["outcome"] == "allowed").expect("an allowed audit record");
        assert_eq!(allowed["credentialKind"], "gcpWorkloadIdentity");
        running.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_apis_with_an_api_key_and_oauth2_through_the_header_proxy() {
    use cloudpass_e2e::scenario::http_api::{HTTP_APP, HttpApiScenario};
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-http";
    stack.opted_in_namespace(ns).await.unwrap();
    for (setup, container, caller) in [
        (HttpApiScenario::api_key(stack, ns).await.unwrap(), "app", "api-key"),
        (HttpApiScenario::oauth2(stack, ns).await.unwrap(), "billing", "cloudpass-billing"),
    ] {
        setup.apply(stack).await.unwrap();
        let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
        let added = &pod.injection_summary().env_added[container];
        assert!(added.contains(&"HTTP_PROXY".to_owned()) && added.contains(&"NO_PROXY".to_owned()), "{added:?}");
        let mut running = stack.node.run(stack.cp, pod).await.unwrap();
        running.wait_started(Duration::from_secs(30)).await.unwrap();
        let run = running.run_app(container, HTTP_APP).await.unwrap();
        let result = run.ok_json().unwrap_or_else(|e| panic!("{e:#}\nagent:\n{}", running.agent_log_text()));
        assert_eq!(result["body"]["caller"], caller, "{result}");
        assert_eq!(setup.api.callers(), [caller]);
        if let Some(oauth2) = &setup.oauth2 {
            assert_eq!(oauth2.calls(), 1, "one client-credentials grant");
        }
        running.stop();
    }
}

/// Runs the app of `setup` (a key kept in a cloud's secret store) in `ns`: the webhook
/// injects the agent, the app calls the API through its proxy, the broker reads the key
/// with the pod's federated credential, and the API sees the key's caller. The key
/// (`key`) is in no log of the agent or the broker. The running pod, and the broker's
/// audit record of the allowed request.
async fn a_stored_key_through_the_header_proxy(
    stack: &Stack<'_>,
    ns: &str,
    setup: &cloudpass_e2e::scenario::http_api::HttpApiScenario,
    key: &str,
) -> (cloudpass_e2e::scenario::RunningPod, serde_json::Value) {
    setup.apply(stack).await.unwrap();
    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    let run = running.run_app("app", cloudpass_e2e::scenario::http_api::HTTP_APP).await.unwrap();
    let result = run.ok_json().unwrap_or_else(|e| panic!("{e:#}\nagent:\n{}", running.agent_log_text()));
    assert_eq!(result["body"]["caller"], "api-key", "{result}");
    let allowed = audited(stack, ns, &running.pod.name, "allowed").await;
    for text in [running.agent_log_text(), stack.broker.log_text()] {
        assert!(!text.contains(key));
    }
    (running, allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_from_google_secret_manager_through_the_header_proxy() {
    use cloudpass_e2e::scenario::http_api::HttpApiScenario;
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-secret-manager";
    stack.opted_in_namespace(ns).await.unwrap();
    let setup = HttpApiScenario::secret_manager(stack, ns).await.unwrap();
    let (mut running, allowed) = a_stored_key_through_the_header_proxy(stack, ns, &setup, "whsec-3f8a0c27d1").await;
    let (_, manager) = setup.secret_manager.as_ref().unwrap();
    assert_eq!(manager.calls(), 1, "one access of the secret");
    assert_eq!(allowed["secret"], "projects/my-project/secrets/webhook-signing-key version 1", "{allowed}");
    running.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_from_azure_key_vault_through_the_header_proxy() {
    use cloudpass_e2e::scenario::http_api::HttpApiScenario;
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-key-vault";
    stack.opted_in_namespace(ns).await.unwrap();
    let setup = HttpApiScenario::key_vault(stack, ns).await.unwrap();
    let (mut running, allowed) = a_stored_key_through_the_header_proxy(stack, ns, &setup, "pk-live-2c9e71b4").await;
    let (_, vault) = setup.key_vault.as_ref().unwrap();
    assert_eq!(vault.calls(), 1, "one read of the vault");
    assert!(allowed["secret"].as_str().unwrap().contains("/secrets/partner-api-key version "), "{allowed}");
    running.stop();
}

/// Runs `script` in the pod's app container every half second until it prints `want`,
/// for at most `limit` (else fails saying `never`); until then it must print `before`.
async fn until_app_prints(
    running: &cloudpass_e2e::scenario::RunningPod,
    script: &str,
    want: &str,
    before: &str,
    limit: Duration,
    never: &str,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let now = running.run_app("app", script).await.unwrap();
        if now.stdout.trim() == want {
            return;
        }
        assert_eq!(now.stdout.trim(), before, "{}", now.stderr);
        assert!(std::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_password_from_secrets_manager_as_a_file_follows_rotation() {
    use cloudpass_e2e::{
        fakes::aws_sts::AwsRoleTrust,
        scenario::{Deployed, Example, aws::STS_AUDIENCE, example::App},
    };
    use serde_json::json;
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-db-file";
    stack.opted_in_namespace(ns).await.unwrap();
    let aws = aws();
    let secret = "prod/orders-db-scenario";
    let (v1, v2) = ("Db-v1-4c2e71", "Db-v2-9a05d3");
    aws.secret(secret, &json!({"username": "orders", "password": v1}).to_string()).await.unwrap();
    let read = json!({"Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "*"}]});
    let role = aws.role("orders-db-reader", &read).await.unwrap();
    let mut trust = AwsRoleTrust::new(&role, stack.issuer_url(), &format!("system:cloudpass:{ns}:orders-db-reader"));
    trust.audiences = vec![STS_AUDIENCE.into()];
    let gate = aws.gate(stack.issuer_url(), &stack.issuer_ca_pem(), stack.cloud_ca(), vec![trust]).await.unwrap();
    let front = aws.moto.https_front(stack.cloud_ca()).await.unwrap();

    let mut example = Example::load("aks-db-password-file").unwrap();
    example
        .set("CredentialProvider", "orders-db-reader", "/spec/awsSts/roleArn", json!(role))
        .unwrap()
        .set("CredentialProvider", "orders-db-reader", "/spec/awsSts/stsEndpoint", json!(gate.url()))
        .unwrap()
        // moto keeps its secrets in the region the admin wrote them to.
        .set("CredentialProvider", "orders-db-reader", "/spec/awsSts/region", json!("us-east-1"))
        .unwrap();
    let store = "/spec/awsSecretsManager";
    example
        .set("CredentialProvider", "orders-db-password", &format!("{store}/endpoint"), json!(front.url()))
        .unwrap()
        .set("CredentialProvider", "orders-db-password", &format!("{store}/secretId"), json!(secret))
        .unwrap()
        .set("CredentialProvider", "orders-db-password", &format!("{store}/refreshInterval"), json!("10s"))
        .unwrap();
    stack.apply_example(ns, &example, "orders-db-password-file").await.unwrap();
    let pod = example.app_pod(&App::new("orders-db-client", "app", "file", &[])).unwrap();
    let pod = stack.create_pod(ns, &pod, true).await.unwrap();
    let added = pod.injection_summary();
    assert!(added.env_added.get("app").is_none_or(|vars| vars.is_empty()), "a file needs no variable: {added:?}");
    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();

    // The app reads the password where its own variable says; it is there before the app
    // starts (the agent is ready once the file is written).
    let script = "import os; print(open(os.environ['DB_PASSWORD_FILE']).read())";
    let first = running.run_app("app", script).await.unwrap();
    assert_eq!(first.stdout.trim(), v1, "{}", first.stderr);
    // A new version in Secrets Manager reaches the running app's file within
    // refreshInterval, without a restart.
    aws.secret(secret, &json!({"username": "orders", "password": v2}).to_string()).await.unwrap();
    let never = "the rotated password never reached the file";
    until_app_prints(&running, script, v2, v1, Duration::from_secs(40), never).await;
    // An edit of the policy's delivery reaches the running agent too (it asks the broker
    // again, here every second): the same file, now in the dotenv format.
    let patch = r#"{"spec":{"delivery":{"file":{"format":"Dotenv"}}}}"#;
    let policy = "accesspolicy/orders-db-password-file";
    stack.cp.kubectl_ok(&["patch", "-n", ns, policy, "--type=merge", "-p", patch]).unwrap();
    // (the store's secret names one field of the JSON: a key)
    let dotenv = format!("API_KEY='{v2}'");
    let never = "the new format never reached the running pod's file";
    until_app_prints(&running, script, &dotenv, v2, Duration::from_secs(30), never).await;
    assert!(running.agent_log_text().contains("new configuration from the broker applied"));
    // No log, Event, status, metric or audit record holds it (the audit records are
    // in the broker's log).
    let events = stack.cp.kubectl_ok(&["get", "events", "-n", ns, "-o", "json"]).unwrap();
    let status = stack.cp.kubectl_ok(&["get", "credentialproviders,accesspolicies", "-n", ns, "-o", "json"]).unwrap();
    let metrics = stack.broker.metrics().await.unwrap();
    for text in [running.agent_log_text(), stack.broker.log_text(), events, status, metrics] {
        assert!(!text.contains(v1) && !text.contains(v2));
    }
    running.stop();

    // A pod the policy does not select gets no agent, no volume, no file.
    let mut other = example.app_pod(&App::new("orders-db-client", "app", "file", &[])).unwrap();
    other["metadata"]["name"] = json!("not-selected");
    other["metadata"]["labels"] = json!({"app": "reporting"});
    let other = stack.create_pod(ns, &other, false).await.unwrap();
    assert!(!other.is_injected(), "{}", other.stored);
    assert!(
        other.stored["spec"]["volumes"].as_array().is_none_or(|v| v.iter().all(|v| v["name"] != "cloudpass-shared"))
    );
}

/// Tools that read AWS credentials from files get them in the SDKs' own formats: the real
/// boto3 through `credential_process` (the JSON file, which it runs again before
/// `Expiration`) and through the shared credentials file, both written by the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_credentials_as_files_in_the_sdks_own_formats() {
    use cloudpass_e2e::scenario::{AdmittedPod, aws::S3Direction};
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-aws-files";
    stack.opted_in_namespace(ns).await.unwrap();
    let setup = S3Direction::credentials_file(stack, aws(), ns).await.unwrap();
    setup.apply(stack).await.unwrap();
    let profile = "accesspolicy/reports-s3-profile";
    stack.cp.kubectl_ok(&["wait", "-n", ns, "--for=condition=Ready", profile, "--timeout=30s"]).unwrap();
    // Both policies have reached the webhook.
    let both = ["reports-s3-process", "reports-s3-profile"];
    let timeout = Duration::from_secs(30);
    AdmittedPod::wait_until_serving(stack.cp, ns, &setup.pod, &both, timeout).await.unwrap();
    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    let added = pod.injection_summary();
    assert!(added.env_added.values().all(Vec::is_empty), "files need no variable: {added:?}");
    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    let shared = running.volume_dir("cloudpass-shared").unwrap().display().to_string();
    let assumed = "arn:aws:sts::123456789012:assumed-role/aks-reports-s3/";

    // The app's AWS config file (the example's ConfigMap) names the JSON file at its
    // place in the pod; this node keeps the volume elsewhere, so the app moves the path.
    let moved_config = format!(
        "import os\nconfig = os.path.join(os.environ['HOME'], 'aws-config')\n\
         text = open(os.environ['AWS_CONFIG_FILE']).read().replace('/var/run/cloudpass', {shared:?})\n\
         open(config, 'w').write(text)\nos.environ['AWS_CONFIG_FILE'] = config\n"
    );
    let report = running.run_app("report", &format!("{moved_config}{S3_APP}")).await.unwrap();
    let result = report.ok_json().unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["credentialSource"], "custom-process", "boto3 ran credential_process");
    assert!(result["identity"].as_str().unwrap().starts_with(assumed), "{result}");
    let sync = running.run_app("sync", S3_APP).await.unwrap();
    let result = sync.ok_json().unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["credentialSource"], "shared-credentials-file");
    assert!(result["identity"].as_str().unwrap().starts_with(assumed), "{result}");

    // The JSON file carries the expiry the agent serves until; no secret of it is in a
    // log or in the apps' output.
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{shared}/aws-credentials.json")).unwrap()).unwrap();
    let expiration: jiff::Timestamp = written["Expiration"].as_str().unwrap().parse().unwrap();
    assert!(expiration > jiff::Timestamp::now(), "{}", written["Expiration"]);
    let secrets = [written["SecretAccessKey"].as_str().unwrap(), written["SessionToken"].as_str().unwrap()];
    for (text, what) in [
        (running.agent_log_text(), "the agent's log"),
        (stack.broker.log_text(), "the operator's log"),
        (report.stdout.clone(), "the app's output"),
        (sync.stdout.clone(), "the tool's output"),
    ] {
        assert_no_secret(&text, &secrets, what);
    }
    running.stop();
}

/// Waits until the broker has audited a decision about `pod` matching `outcome`.
async fn audited(stack: &Stack<'_>, ns: &str, pod: &str, outcome: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = stack.audit_records(ns, pod).into_iter().find(|r| r["outcome"] == outcome) {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "no {outcome} audit record for {ns}/{pod}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_policy_denies_the_next_refresh() {
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-revoke";
    let setup = aks_to_s3_applied(stack, ns).await;
    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    assert_eq!(running.run_app("api", S3_APP).await.unwrap().ok_json().unwrap()["ok"], true);

    // What the agent's next refresh gets, asked the way the agent asks.
    let (status, _) = stack.ask_as_agent(&running, "orders-to-s3").await.unwrap();
    assert_eq!(status, 200);
    stack.cp.kubectl_ok(&["delete", "accesspolicy", "orders-to-s3", "-n", ns]).unwrap();
    let (latency, denial) = stack.wait_denied(&running, "orders-to-s3", Duration::from_secs(30)).await.unwrap();
    assert_eq!(denial["code"], "Denied", "{denial}");
    // The broker's own watch of deletions refuses first; once the controller compiles
    // the namespace again the policy is simply not there.
    let deleted = |m: &str| {
        m.contains("AccessPolicy orders-to-s3 in namespace scenario-revoke is deleted or being deleted")
            || m.contains("no Ready AccessPolicy orders-to-s3")
    };
    assert!(deleted(denial["message"].as_str().unwrap()), "{denial}");
    eprintln!(
        "revocation: the broker denied the next refresh {:.3}s after kubectl delete returned",
        latency.as_secs_f64()
    );
    assert!(latency < Duration::from_secs(10), "revocation took {latency:?}");
    let denied = audited(stack, ns, &running.pod.name, "denied").await;
    assert!(deleted(denied["reason"].as_str().unwrap()), "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_time_window_is_denied_with_its_reason() {
    use cloudpass_e2e::scenario::http_api::{HTTP_APP, HttpApiScenario};
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-window";
    stack.opted_in_namespace(ns).await.unwrap();
    let mut setup = HttpApiScenario::api_key(stack, ns).await.unwrap();
    // Open from two to three hours from now (UTC): closed now, whatever the hour. After
    // 21:00 the window crosses midnight (e.g. 23:00-00:00), which a window may do.
    let this_hour = jiff::Timestamp::now().as_second() / 3600;
    let hour = |h: i64| format!("{:02}:00", (this_hour + h).rem_euclid(24));
    let (start, end) = (hour(2), hour(3));
    let window = json!({"timeWindows": [{"timeZone": "UTC", "start": start, "end": end}]});
    setup.example.set("AccessPolicy", &setup.policy.clone(), "/spec/conditions", window).unwrap();
    setup.apply(stack).await.unwrap();

    // The policy is Ready and selects the pod, so the webhook injects the agent...
    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    // ...but the broker refuses, saying why, and the agent does not become ready.
    let denied = audited(stack, ns, &running.pod.name, "denied").await;
    let reason = denied["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("outside the policy's time windows: {start}-{end} UTC")), "{reason}");
    assert!(!running.probe().await.unwrap(), "the agent must not report ready without a credential");
    assert!(
        running.agent_log_text().contains("outside the policy's time windows"),
        "the agent logs the broker's reason"
    );
    let run = running.run_app("app", HTTP_APP).await.unwrap();
    assert!(!run.success);
    assert_eq!(run.json().unwrap()["status"], 503, "{}", run.stdout);
    assert_eq!(setup.api.served(), 0, "the API was never called");
    assert!(running.wait_started(Duration::from_secs(2)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_the_trust_provider_does_not_name_is_denied() {
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-mismatch";
    stack.opted_in_namespace(ns).await.unwrap();
    let mut setup = AksToS3::prepare(stack, aws(), ns).await.unwrap();
    // The policy selects by labels only; its trust provider still names only `orders`.
    let mut client = setup.example.get("AccessPolicy", "orders-to-s3").unwrap()["spec"]["client"].clone();
    client.as_object_mut().unwrap().remove("serviceAccountName");
    setup.example.set("AccessPolicy", "orders-to-s3", "/spec/client", client).unwrap();
    setup.apply(stack).await.unwrap();
    stack.cp.create_service_account(ns, "intruder").await.unwrap();
    let mut manifest = setup.pod.clone();
    manifest["spec"]["serviceAccountName"] = json!("intruder");

    let pod = stack.create_pod(ns, &manifest, true).await.unwrap();
    assert!(pod.is_injected());
    let running = stack.node.run(stack.cp, pod).await.unwrap();
    let denied = audited(stack, ns, &running.pod.name, "denied").await;
    assert_eq!(
        denied["reason"], "trust provider this-cluster refused the caller: service account intruder is not trusted",
        "{denied}"
    );
    assert!(!running.probe().await.unwrap());
    let run = running.run_app("api", S3_APP).await.unwrap();
    assert!(!run.success, "the app reached S3: {}", run.stdout);
    assert_eq!(setup.gate.calls(), 0, "STS was never asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_webhook_down_opted_in_pods_are_refused_loudly() {
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-webhook-down";
    let setup = aks_to_s3_applied(stack, ns).await;
    cloudpass_e2e::scenario::AdmittedPod::wait_until_injectable(stack.cp, ns, &setup.pod, Duration::from_secs(30))
        .await
        .unwrap();

    stack.webhook.stop();
    let refused = stack.create_pod(ns, &setup.pod, false).await;
    // Bring it back before asserting, so that a failure here does not break other scenarios.
    stack.webhook.restart().await.unwrap();
    let message = format!("{:#}", refused.expect_err("a pod was admitted without the webhook"));
    assert!(message.contains("failed calling webhook") && message.contains("cloudpass-webhook"), "{message}");
    // A namespace that did not opt in is unaffected, even with the webhook down.
    stack.webhook.stop();
    stack.cp.create_namespace("scenario-not-opted-in", &[]).await.unwrap();
    stack.cp.create_service_account("scenario-not-opted-in", "orders").await.unwrap();
    let plain = stack.create_pod("scenario-not-opted-in", &setup.pod, false).await;
    stack.webhook.restart().await.unwrap();
    assert!(!plain.unwrap().is_injected());
    // And with the webhook back, pods are injected again.
    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    assert!(pod.is_injected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gke_to_s3_only_the_named_container_gets_credentials() {
    use cloudpass_e2e::scenario::aws::S3Direction;
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-gke-s3";
    stack.opted_in_namespace(ns).await.unwrap();
    let setup = S3Direction::gke(stack, aws(), ns).await.unwrap();
    setup.apply(stack).await.unwrap();
    // The log shipper has the same app settings, but the policy names only `exporter`.
    let mut manifest = setup.pod.clone();
    let exporter_env = manifest["spec"]["containers"][0]["env"].clone();
    manifest["spec"]["containers"][1]["env"] = exporter_env;

    let pod = stack.create_pod(ns, &manifest, true).await.unwrap();
    let added = pod.injection_summary().env_added;
    assert_eq!(added["exporter"], ["AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]);
    assert!(added["log-shipper"].is_empty(), "{added:?}");
    let mut running = stack.node.run(stack.cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    let result = running.run_app("exporter", S3_APP).await.unwrap().ok_json().unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["identity"].as_str().unwrap().contains(":assumed-role/gke-exporter/"), "{result}");
    let shipper = running.run_app("log-shipper", S3_APP).await.unwrap();
    assert!(!shipper.success);
    assert_eq!(shipper.json().unwrap()["error"], "NoCredentialsError", "{}", shipper.stdout);
    // The session is bounded by the example's sessionDuration (2h), not the 15 min of AKS.
    let allowed = audited(stack, ns, &running.pod.name, "allowed").await;
    let expires: jiff::Timestamp = allowed["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = expires.as_second() - jiff::Timestamp::now().as_second();
    assert!((7000..=7200).contains(&left), "{left}s left");
}

/// GKE → S3 where the policy also trusts the pod's Google service account
/// (`gcpIdentityToken`): the webhook tells the agent to bring an identity token, the
/// agent asks the node's metadata server for one, and the broker verifies it against
/// Google's keys besides the pod's own token. A pod on a node that speaks for another
/// service account is refused, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gke_to_s3_also_proven_by_the_pods_google_identity_from_the_metadata_server() {
    use std::sync::Arc;

    use cloudpass_e2e::{
        fakes::{
            google::{GoogleConfig, GoogleFake},
            metadata::{GoogleIdentity, MetadataFake, MetadataIdentities},
        },
        scenario::{Node, aws::S3Direction},
    };
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let ns = "scenario-gke-evidence";
    stack.opted_in_namespace(ns).await.unwrap();
    let ca = &stack.broker.ca;
    let google = GoogleConfig { providers: vec![], service_accounts: vec![], issuer_ca_pem: ca.cert_pem() };
    let google = Arc::new(GoogleFake::start(google, ca).await.unwrap());
    let trusted = "exporter@orders-project.iam.gserviceaccount.com";
    let trust = cloudpass_object(
        "TrustProvider",
        "gke-workload-identity",
        json!({"gcpIdentityToken": {"audiences": ["https://cloudpass.example.com"], "serviceAccountEmails": [trusted],
               "issuer": google.url(), "jwksUri": format!("{}/oauth2/v3/certs", google.url())}}),
    );
    stack.cp.apply_yaml(Some(ns), &trust.to_string()).unwrap();
    let mut setup = S3Direction::gke(stack, aws(), ns).await.unwrap();
    let policy = setup.policy.clone();
    let mut trusts = setup.example.get("AccessPolicy", &policy).unwrap()["spec"]["trustProviders"].clone();
    trusts.as_array_mut().unwrap().push(json!({"name": "gke-workload-identity"}));
    setup.example.set("AccessPolicy", &policy, "/spec/trustProviders", trusts).unwrap();
    setup.apply(stack).await.unwrap();
    let node_speaking_for = |email: &str| {
        let identity =
            GoogleIdentity { google: google.clone(), email: email.into(), project_id: "orders-project".into() };
        MetadataFake::start(MetadataIdentities { google: Some(identity), ..Default::default() })
    };

    let metadata = node_speaking_for(trusted).await.unwrap();
    let node = Node { metadata_url: Some(metadata.url().into()), ..stack.node.clone() };
    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    // The evidence to gather comes with the deliveries from the broker, not the pod.
    assert!(pod.agent_config().unwrap().unwrap().deliveries.is_empty());
    let mut running = node.run(stack.cp, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    let result = running.run_app("exporter", S3_APP).await.unwrap().ok_json().unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert!(metadata.requests("google") >= 1, "the agent asked the node's metadata server");
    let allowed = audited(stack, ns, &running.pod.name, "allowed").await;
    let google_result = allowed["trustProviders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "gke-workload-identity")
        .cloned()
        .unwrap_or_else(|| panic!("{allowed}"));
    assert_eq!(google_result["passed"], true, "{allowed}");
    assert!(google_result["detail"].as_str().unwrap().contains(trusted), "{allowed}");
    drop(running);

    let stranger = node_speaking_for("intruder@orders-project.iam.gserviceaccount.com").await.unwrap();
    let node = Node { metadata_url: Some(stranger.url().into()), ..stack.node.clone() };
    let pod = stack.create_pod(ns, &setup.pod, true).await.unwrap();
    let mut running = node.run(stack.cp, pod).await.unwrap();
    let denied = audited(stack, ns, &running.pod.name, "denied").await;
    let reason = denied["reason"].as_str().unwrap();
    assert!(reason.contains("trust provider gke-workload-identity refused the caller: service account"), "{reason}");
    assert!(running.wait_started(Duration::from_secs(2)).await.is_err(), "no credential, not started");
}

/// A pod of a second cluster, injected by that cluster's webhook (which reads this
/// cluster's compiled configs), verified by this cluster's broker against the second
/// cluster's keys (a `kubernetesServiceAccount` TrustProvider with its issuer and inline
/// JWKS), reaches S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_another_cluster_reaches_s3_through_this_brokers_policies() {
    use cloudpass_e2e::{
        ControlPlane,
        fakes::aws_sts::AwsRoleTrust,
        scenario::{AdmittedPod, RunningWebhook, SYSTEM_NAMESPACE, aws::STS_AUDIENCE},
    };
    let _one = exclusive().await;
    let stack = Stack::shared();
    let _logs = stack.cp.logs_on_panic();
    let remote = ControlPlane::start().await.unwrap();
    let _remote_logs = remote.logs_on_panic();
    let webhook =
        RunningWebhook::start_remote(&remote, &stack.binaries.webhook, &stack.broker, stack.cp, SYSTEM_NAMESPACE)
            .await
            .unwrap();
    let ns = "shop";
    remote.create_namespace(ns, &[(cloudpass_api::INJECTION_LABEL, cloudpass_api::INJECTION_ENABLED)]).await.unwrap();
    remote.create_service_account(ns, "orders").await.unwrap();
    stack.cp.create_namespace(ns, &[]).await.unwrap();

    let aws = aws();
    let s3 = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
    let role = aws.role("remote-orders-s3", &s3).await.unwrap();
    aws.bucket("orders").await.unwrap();
    let broker = &stack.broker;
    let mut trust = AwsRoleTrust::new(&role, &broker.url, "system:cloudpass:shop:orders-s3");
    trust.audiences = vec![STS_AUDIENCE.into()];
    let gate = aws.gate(&broker.url, &broker.ca.cert_pem(), &broker.ca, vec![trust]).await.unwrap();
    let (_, jwks) = remote.issuer_documents().await.unwrap();
    let objects = [
        cloudpass_object(
            "TrustProvider",
            "shop-cluster",
            json!({"kubernetesServiceAccount": {"issuer": remote.issuer, "jwks": jwks.to_string(),
                   "namespaces": [ns], "serviceAccounts": ["orders"]}}),
        ),
        cloudpass_object(
            "CredentialProvider",
            "orders-s3",
            json!({"awsSts": {"roleArn": role, "region": "us-east-1", "stsEndpoint": gate.url(),
                   "sessionName": "remote-{pod}"}}),
        ),
        // The broker cannot see the other cluster's pod labels: the policy selects by
        // service account only.
        cloudpass_object(
            "AccessPolicy",
            "orders-to-s3",
            json!({"client": {"podSelector": {}, "serviceAccountName": "orders"},
                   "trustProviders": [{"name": "shop-cluster"}], "server": {"kind": "aws"},
                   "credentialProvider": {"name": "orders-s3"}}),
        ),
    ];
    for o in &objects {
        stack.cp.apply_yaml(Some(ns), &o.to_string()).unwrap();
    }
    stack.wait_policy_ready(ns, "orders-to-s3").await.unwrap();

    let manifest = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "orders-", "labels": {"app": "orders"}},
        "spec": {"serviceAccountName": "orders", "containers": [{"name": "api", "image": "ghcr.io/example/orders:3.0.1",
            "env": [{"name": "AWS_ENDPOINT_URL", "value": aws.moto.url()},
                    {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}, {"name": "BUCKET", "value": "orders"}]}]}});
    AdmittedPod::wait_until_injectable(&remote, ns, &manifest, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nremote webhook:\n{}", webhook.log_tail()));
    let pod = AdmittedPod::create(&remote, ns, &manifest).unwrap();
    let env = pod.agent().unwrap()["env"].as_array().unwrap().clone();
    let config = env.iter().find(|e| e["name"] == cloudpass_api::agent::AGENT_CONFIG_ENV).unwrap();
    let config: serde_json::Value = serde_json::from_str(config["value"].as_str().unwrap()).unwrap();
    assert_eq!(config["policyNamespace"], ns, "{config}");

    // The token is the other cluster's (TokenRequest there, bound to its pod).
    let mut running = stack.node.run(&remote, pod).await.unwrap();
    running.wait_started(Duration::from_secs(30)).await.unwrap();
    let result = running.run_app("api", S3_APP).await.unwrap().ok_json().unwrap();
    assert_eq!(result["ok"], true, "{result}");
    let session = format!("remote-{}", running.pod.name);
    assert_eq!(result["identity"], format!("arn:aws:sts::123456789012:assumed-role/remote-orders-s3/{session}"));
    let record = stack
        .broker
        .audit_records()
        .into_iter()
        .find(|r| r["remoteIssuer"] == remote.issuer.as_str() && r["outcome"] == "allowed")
        .expect("an allowed audit record for the remote pod");
    assert_eq!(record["remoteNamespace"], ns);
    assert_eq!(record["namespace"], ns);
    running.stop();
}
