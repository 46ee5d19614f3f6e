//! cloudpass on a real node: the Helm chart and every example running as real pods.
//!
//! One cluster for the whole suite ([`Cluster::shared`]): etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, containerd with runc, a kubelet, kube-proxy
//! and CoreDNS on this machine, with the images of `make images`. cloudpass is installed
//! with `helm install` and the chart's default images; the examples are applied with
//! `kubectl` as Deployments (or a Job of the CronJob), whose pods the ReplicaSet and Job
//! controllers create, the scheduler places and the kubelet runs, the webhook injecting
//! the agent as a native sidecar. Nothing here sets `nodeName` or creates a pod a
//! controller would create. The apps are the unchanged SDK programs of the scenarios;
//! their output is read with `kubectl logs`.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use cloudpass_e2e::{
    cluster::Cluster,
    scenario::{
        Deployed,
        installed::{Installed, NAMESPACE},
    },
};
use serde_json::Value;

/// The suite's cluster with cloudpass installed, set up on first use.
fn installed() -> &'static Installed {
    static INSTALLED: OnceLock<Result<Installed, String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            runtime.block_on(Installed::install(Cluster::shared())).map_err(|e| format!("{e:#}"))
        })
        .join()
        .unwrap_or_else(|_| Err("install panicked".to_owned()))
    });
    match result {
        Ok(installed) => installed,
        Err(e) => panic!("cloudpass did not install on the node: {e}\n{}", Cluster::shared().log_tails()),
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_runs_as_pods_on_the_node() {
    let installed = installed();
    let cp = installed.cp();
    eprintln!("helm install --wait took {:.1}s", installed.install_time.as_secs_f64());

    // Both Deployments available through their real probes, two replicas each.
    for deployment in ["cloudpass-operator", "cloudpass-webhook"] {
        let d = json(&cp.kubectl_ok(&["get", "deployment", deployment, "-n", NAMESPACE, "-o", "json"]).unwrap());
        assert_eq!(d["status"]["readyReplicas"], 2, "{deployment}: {}", d["status"]);
    }
    let pods = installed.pods(NAMESPACE, "app.kubernetes.io/name=cloudpass").unwrap();
    assert_eq!(pods.len(), 4, "two operators and two webhooks");
    for pod in &pods {
        assert_eq!(pod["spec"]["nodeName"], cloudpass_e2e::cluster::NODE_NAME, "placed by the scheduler");
        assert_eq!(pod["status"]["phase"], "Running");
        let container = &pod["status"]["containerStatuses"][0];
        assert_eq!(container["ready"], true, "{}", pod["metadata"]["name"]);
        assert_eq!(container["restartCount"], 0, "{}: {}", pod["metadata"]["name"], container);
        assert!(
            container["image"].as_str().unwrap().starts_with("ghcr.io/cloudpass-dev/cloudpass-"),
            "the chart's default image: {}",
            container["image"]
        );
    }

    // One operator holds the Lease, and it is one of the running pods.
    let lease = json(&cp.kubectl_ok(&["get", "lease", "cloudpass-operator", "-n", NAMESPACE, "-o", "json"]).unwrap());
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap();
    assert!(pods.iter().any(|p| p["metadata"]["name"] == holder), "lease holder {holder} is a running pod");

    // The webhook filled its configuration's caBundle; the operator published the broker CA.
    let config =
        json(&cp.kubectl_ok(&["get", "mutatingwebhookconfiguration", "cloudpass-webhook", "-o", "json"]).unwrap());
    let bundle = config["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap_or_default();
    assert!(!bundle.is_empty(), "caBundle filled");
    assert!(installed.issuer_ca_pem().contains("BEGIN CERTIFICATE"));

    // The broker answers through its Service (kube-proxy) and cluster DNS name: its issuer
    // discovery document, fetched as a cloud would.
    let http = cloudpass_e2e::net::client_builder()
        .tls_certs_only([reqwest::Certificate::from_pem(installed.issuer_ca_pem().as_bytes()).unwrap()])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    let discovery: Value = http
        .get(format!("{}/.well-known/openid-configuration", installed.issuer_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], installed.issuer_url(), "in {:?}", started.elapsed());
}
