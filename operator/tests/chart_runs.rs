//! The controller and broker containers as the Helm chart renders them really run: the
//! real binary with exactly the rendered arguments and environment (bind addresses moved
//! to loopback), each as its own service account with only the chart's RBAC. The
//! controller wins the Lease, reconciles examples to Ready and grants the broker exactly
//! the referenced Secrets; the broker serves HTTPS with the certificate it manages
//! itself, verifiable with the CA it publishes. With `certManager.enabled` the broker
//! serves the mounted certificate files instead and publishes their CA, following
//! renewals.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use cloudpass_e2e::{ControlPlane, certs::TestCa, chart, repo_root};

const NS: &str = "cloudpass-system";

/// Whether the service account `sa` of the release may do `args`.
fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let who = format!("--as=system:serviceaccount:{NS}:{sa}");
    let mut full = vec!["auth", "can-i", &who[..]];
    full.extend_from_slice(args);
    let out = cp.kubectl_output(&full, None).unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

async fn wait_ready(port: u16, process: &cloudpass_e2e::process::ManagedProcess, log_line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status =
            cloudpass_e2e::net::get(format!("http://127.0.0.1:{port}/readyz")).await.map(|r| r.status().as_u16()).ok();
        if status == Some(200) && process.log_tail(50_000).contains(log_line) {
            break;
        }
        assert!(Instant::now() < deadline, "not ready ({status:?}):\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_rendered_controller_and_broker_run_each_with_its_own_rbac() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let docs = chart::install(cp, "cloudpass", NS).unwrap();
    let broker = chart::find(&docs, "Deployment", "cloudpass-broker").unwrap();
    let port = chart::container_port(broker, "broker", "metrics").unwrap();
    assert_eq!(broker["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(broker["spec"]["template"]["spec"]["serviceAccountName"], "cloudpass-broker");

    // The broker Service reaches the broker container's port, where the broker listens.
    let service = chart::find(&docs, "Service", "cloudpass-broker").unwrap();
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "broker");
    assert_eq!(service["spec"]["selector"]["app.kubernetes.io/component"], "broker");
    let broker_port = chart::container_port(broker, "broker", "broker").unwrap();
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(u64::from(broker_port)));
    let rendered = chart::container_command(broker, "broker", NS, "cloudpass-broker-0").unwrap();
    assert!(rendered.args.contains(&format!("--broker-addr=0.0.0.0:{broker_port}")), "{:?}", rendered.args);
    assert!(rendered.args.contains(&"--components=broker".to_owned()), "{:?}", rendered.args);
    let issuer = rendered.args.iter().find_map(|a| a.strip_prefix("--issuer-url=")).expect("--issuer-url rendered");
    assert_eq!(issuer, format!("https://cloudpass-broker.{NS}.svc:{broker_port}"), "the default issuer is in-cluster");

    // The controller.
    let controller = chart::find(&docs, "Deployment", "cloudpass-operator").unwrap();
    let controller_port = chart::container_port(controller, "operator", "metrics").unwrap();
    let rendered = chart::container_command(controller, "operator", NS, "cloudpass-operator-0").unwrap();
    for arg in ["--components=controller", "--broker-service-account=cloudpass-broker"] {
        assert!(rendered.args.contains(&arg.to_owned()), "{arg}: {:?}", rendered.args);
    }

    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator"));
    let broker_process = chart::run_container(cp, broker, "broker", "cloudpass-broker", binary).await.unwrap();
    let process = chart::run_container(cp, controller, "operator", "cloudpass-operator", binary).await.unwrap();
    wait_ready(broker_process.port(port), &broker_process, "broker serving").await;
    wait_ready(process.port(controller_port), &process, "caches warm").await;

    cp.create_namespace("team", &[]).await.unwrap();
    cp.apply_path(Some("team"), &repo_root().join("examples/aks-to-s3.yaml")).unwrap();
    cp.wait_for_condition("accesspolicy", "team", "orders-to-s3", "Ready", "True", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", process.log_tail(4000)));
    cp.kubectl_ok(&["get", "configmap", "cloudpass-config-team", "-n", NS]).unwrap();
    cp.kubectl_ok(&["get", "lease", "cloudpass-operator", "-n", NS]).unwrap();

    // The broker may read a Secret of the namespace once, and as long as, a provider there
    // references it, and no other: the controller keeps its Role.
    let broker_sa = "cloudpass-broker";
    let referenced = ["get", "secrets/weather-api", "-n", "team"];
    assert!(!can_i(cp, broker_sa, &referenced), "before any provider references it");
    cp.kubectl_ok(&["create", "secret", "generic", "weather-api", "-n", "team", "--from-literal=api-key=k"]).unwrap();
    cp.apply_path(Some("team"), &repo_root().join("examples/http-api-key.yaml")).unwrap();
    cp.wait_for_condition("credentialprovider", "team", "weather-api-key", "Ready", "True", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", process.log_tail(4000)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !can_i(cp, broker_sa, &referenced) {
        assert!(
            Instant::now() < deadline,
            "the broker was not granted the referenced Secret:\n{}",
            process.log_tail(4000)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let role = cp.kubectl_ok(&["get", "role", "cloudpass-broker-secrets", "-n", "team", "-o", "json"]).unwrap();
    let role: serde_json::Value = serde_json::from_str(&role).unwrap();
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["weather-api"], "verbs": ["get"]}])
    );
    for (sa, case) in [
        (broker_sa, &["get", "secrets/other", "-n", "team"][..]),
        (broker_sa, &["list", "secrets", "-n", "team"]),
        (broker_sa, &["watch", "secrets", "--all-namespaces"]),
        (broker_sa, &["update", "secrets/weather-api", "-n", "team"]),
        (broker_sa, &["create", "roles", "-n", "team"]),
        // It watches which AccessPolicies are deleted, and nothing more of the API's objects.
        (broker_sa, &["update", "accesspolicies.cloudpass.dev", "-n", "team"]),
        (broker_sa, &["list", "credentialproviders.cloudpass.dev", "--all-namespaces"]),
        ("cloudpass-operator", &["list", "secrets", "-n", "team"]),
        ("cloudpass-operator", &["watch", "secrets", "--all-namespaces"]),
        ("cloudpass-operator", &["create", "tokenreviews.authentication.k8s.io"]),
    ] {
        assert!(!can_i(cp, sa, case), "{sa} may {}", case.join(" "));
    }
    // No provider references it any more: the Role goes.
    cp.kubectl_ok(&["delete", "credentialprovider", "weather-api-key", "-n", "team"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while can_i(cp, broker_sa, &referenced) {
        assert!(Instant::now() < deadline, "the grant outlived the reference:\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        cp.kubectl_output(&["get", "role", "cloudpass-broker-secrets", "-n", "team"], None).unwrap().status.code()
            != Some(0)
    );

    // Self-managed: the certificate Secret exists and the CA bundle is published.
    cp.kubectl_ok(&["get", "secret", "cloudpass-broker-tls", "-n", NS]).unwrap();
    let ca = cp
        .kubectl_ok(&["get", "configmap", "cloudpass-broker-ca", "-n", NS, "-o", "jsonpath={.data.ca\\.crt}"])
        .unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"), "published CA: {ca:?}");

    // Every opted-in namespace gets a copy of it, which injected agents mount: it follows
    // the original, comes back when deleted by hand, and goes when the namespace opts
    // out. A namespace not opted in gets none.
    cp.create_namespace("apps", &[("cloudpass.dev/injection", "enabled")]).await.unwrap();
    let copy = |ns: &str| {
        let out = cp
            .kubectl_output(
                &["get", "configmap", "cloudpass-broker-ca", "-n", ns, "-o", "jsonpath={.data.ca\\.crt}"],
                None,
            )
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}:\n{}", process.log_tail(4000));
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    wait_for("no copy of the broker CA in the opted-in namespace", &|| copy("apps").as_deref() == Some(ca.as_str()));
    assert_eq!(copy("team"), None, "a namespace not opted in gets no copy");
    cp.kubectl_ok(&["delete", "configmap", "cloudpass-broker-ca", "-n", "apps"]).unwrap();
    wait_for("the deleted copy was not restored", &|| copy("apps").as_deref() == Some(ca.as_str()));
    let rotated = format!("{ca}{}", TestCa::new("next").unwrap().cert_pem());
    let patch = serde_json::json!({"data": {"ca.crt": rotated}}).to_string();
    cp.kubectl_ok(&["patch", "configmap", "cloudpass-broker-ca", "-n", NS, "--type=merge", "-p", &patch]).unwrap();
    wait_for("the copy did not follow the original", &|| copy("apps").as_deref() == Some(rotated.as_str()));
    cp.kubectl_ok(&["label", "namespace", "apps", "cloudpass.dev/injection-"]).unwrap();
    wait_for("the copy outlived the opt-in", &|| copy("apps").is_none());

    // The issuer's discovery document over TLS, verified with only the published CA and
    // the Service's DNS name (the Service's port moved to where the container listens).
    let host = format!("cloudpass-broker.{NS}.svc");
    let http = client_for(&ca, &host, 0);
    let here =
        |url: &str| url.replacen(&format!(":{broker_port}/"), &format!(":{}/", broker_process.port(broker_port)), 1);
    let discovery: serde_json::Value = http
        .get(here(&format!("{issuer}/.well-known/openid-configuration")))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("discovery over TLS: {e}\n{}", broker_process.log_tail(4000)))
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], issuer);
    let jwks_uri = discovery["jwks_uri"].as_str().expect("jwks_uri");
    let jwks: serde_json::Value = http.get(here(jwks_uri)).send().await.unwrap().json().await.unwrap();
    assert!(jwks["keys"].as_array().is_some_and(|k| !k.is_empty()), "JWKS: {jwks}");

    for p in [&process, &broker_process] {
        assert!(!p.log_tail(50_000).contains("forbidden"), "RBAC refused something:\n{}", p.log_tail(4000));
    }
}

/// A client trusting only `ca_pem` that reaches `host` at 127.0.0.1:`port`.
fn client_for(ca_pem: &str, host: &str, port: u16) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .resolve(host, SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .unwrap()
}

/// Writes a serving certificate for `host` and its CA where the kubelet would mount the
/// cert-manager Secret, each file replaced atomically as the kubelet does.
fn write_tls_files(dir: &std::path::Path, ca: &TestCa, host: &str) {
    let pair = ca.issue_server(&[host]).unwrap();
    for (name, content) in [("tls.key", pair.key_pem), ("tls.crt", pair.cert_pem), ("ca.crt", ca.cert_pem())] {
        std::fs::write(dir.join(format!(".{name}")), content).unwrap();
        std::fs::rename(dir.join(format!(".{name}")), dir.join(name)).unwrap();
    }
}

#[tokio::test]
async fn with_cert_manager_the_rendered_operator_serves_and_publishes_the_mounted_certificate() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let (release, ns) = ("cm", "cloudpass-cm");
    // No cert-manager here: apply the chart's identity and RBAC, and play cert-manager
    // and the kubelet by writing the Secret's files into the mounted folder.
    let docs = chart::render(cp, release, ns, &["--set", "certManager.enabled=true"]).unwrap();
    cp.create_namespace(ns, &[]).await.unwrap();
    let rbac: String = docs
        .iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| k == "ServiceAccount" || k.contains("Role")))
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
        .collect();
    cp.apply_yaml(Some(ns), &rbac).unwrap();
    let deployment = chart::find(&docs, "Deployment", "cm-broker").unwrap();
    let host = format!("{release}-broker.{ns}.svc");
    let files = chart::volume_dir(cp, deployment, "broker-tls").unwrap();
    std::fs::create_dir_all(&files).unwrap();
    let first = TestCa::new("cert-manager CA").unwrap();
    write_tls_files(&files, &first, &host);

    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator"));
    let process = chart::run_container(cp, deployment, "broker", "cm-broker", binary).await.unwrap();
    // Where the rendered ports listen here (the other test in this binary runs the
    // default release at the same time).
    let metrics_port = process.port(chart::container_port(deployment, "broker", "metrics").unwrap());
    let broker_port = process.port(chart::container_port(deployment, "broker", "broker").unwrap());
    let published = || {
        cp.kubectl_ok(&["get", "configmap", "cm-broker-ca", "-n", ns, "-o", "jsonpath={.data.ca\\.crt}"])
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = cloudpass_e2e::net::get(format!("http://127.0.0.1:{metrics_port}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .ok();
        if status == Some(200) && published() == first.cert_pem() {
            break;
        }
        assert!(Instant::now() < deadline, "not ready or CA not published ({status:?}):\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = format!("https://{host}:{broker_port}/.well-known/openid-configuration");
    let status = client_for(&first.cert_pem(), &host, broker_port).get(&url).send().await.unwrap().status();
    assert_eq!(status, 200);

    // cert-manager renews (here with a new CA): the operator serves and publishes the new one.
    let second = TestCa::new("renewed CA").unwrap();
    write_tls_files(&files, &second, &host);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let served = client_for(&second.cert_pem(), &host, broker_port).get(&url).send().await.is_ok();
        if served && published() == second.cert_pem() {
            break;
        }
        assert!(Instant::now() < deadline, "renewal not followed:\n{}", process.log_tail(4000));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!process.log_tail(50_000).contains("forbidden"), "RBAC refused something:\n{}", process.log_tail(4000));
}
