//! `make bench`: the broker's hot and cold paths, measured against the real operator
//! binary, the real apiserver (TokenReview, pods) and the AWS STS gate in front of moto.
//!
//! - Hot path: one agent's credential requests answered from the credential cache with
//!   the TokenReview cached, by 16 concurrent HTTPS clients for a few seconds. Baseline
//!   in the same run: `GET /openid/v1/jwks` on the same broker and connections (TLS,
//!   HTTP and JSON only, no decision).
//! - Cold path: the first request of each of 40 pods (TokenReview, pod read, policy,
//!   signing, AssumeRoleWithWebIdentity through the gate into moto). Baseline in the same
//!   run: the same AssumeRoleWithWebIdentity sent straight to the gate with a token
//!   signed by the broker's own key. The difference is the broker's overhead.
//! - Replicas: the upstream calls when each of those pods asks again, on the replica
//!   that served it (baseline) and on a second replica, which caches on its own.

use std::time::{Duration, Instant};

use cloudpass_e2e::{
    ControlPlane,
    bench::{BrokerBench, concurrent_load, percentile},
    broker::{BrokerOptions, RunningBroker, annotated_pod_token, pod_token},
};
use serde_json::{Value, json};

const CONCURRENCY: usize = 16;
const HOT_SECONDS: u64 = 5;
const COLD_PODS: usize = 40;
const NS: &str = "bench-broker";

/// Runs `request` from CONCURRENCY tasks for HOT_SECONDS; (requests/s, p50 ms, p99 ms).
async fn load<F, Fut>(request: F) -> (f64, f64, f64)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    concurrent_load(CONCURRENCY, Duration::from_secs(1), Duration::from_secs(HOT_SECONDS), request).await
}

async fn run() {
    let cp = ControlPlane::shared();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator"));
    let BrokerBench { broker, moto: _moto, role, gate } =
        BrokerBench::start(cp, binary, "cloudpass-bench", NS).await.unwrap();
    let objects = json!([
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "TrustProvider", "metadata": {"name": "this-cluster"},
         "spec": {"kubernetesServiceAccount": {}}},
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "CredentialProvider", "metadata": {"name": "s3"},
         "spec": {"awsSts": {"roleArn": role, "stsEndpoint": gate.url(), "sessionName": "bench-{pod}"}}},
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "to-s3"},
         "spec": {"client": {"podSelector": {"matchLabels": {"app": "orders"}}},
                  "trustProviders": [{"name": "this-cluster"}], "server": {"kind": "aws"},
                  "credentialProvider": {"name": "s3"}}},
    ]);
    for o in objects.as_array().unwrap() {
        cp.apply_yaml(Some(NS), &o.to_string()).unwrap();
    }
    cp.wait_for_condition("accesspolicy", NS, "to-s3", "Ready", "True", Duration::from_secs(30)).await.unwrap();
    let body = json!({"policy": "to-s3"});
    let hot_token = pod_token(cp, NS, "hot", "orders", json!({"app": "orders"})).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.ask(Some(&hot_token), &body).await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "the broker never served the policy:\n{}", broker.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Hot path and its baseline, on the same client (shared connections).
    let http = broker.http();
    let jwks_url = format!("{}/openid/v1/jwks", broker.url);
    let (base_rate, base50, base99) = load(move || {
        let (http, url) = (http.clone(), jwks_url.clone());
        async move { http.get(url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    let http = broker.http();
    let url = format!("{}/v1/credentials", broker.url);
    let token = hot_token.clone();
    let calls_before = gate.calls();
    let (rate, p50, p99) = load(move || {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        async move {
            let r = http.post(url).bearer_auth(token).json(&json!({"policy": "to-s3"})).send().await;
            r.is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    assert_eq!(gate.calls(), calls_before, "the hot path made upstream calls");

    // What an agent asks every `--config-refresh` (1 min): its deliveries, answered from
    // the cached TokenReview and pod annotation and the compiled policies.
    let annotated = json!({(cloudpass_api::agent::POLICIES_ANNOTATION): "to-s3"});
    let config_token =
        annotated_pod_token(cp, NS, "hot-config", "orders", json!({"app": "orders"}), annotated).await.unwrap();
    let (status, answer) = broker.agent_config(Some(&config_token)).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["deliveries"][0]["policy"], "to-s3", "{answer}");
    let http = broker.http();
    let url = format!("{}{}", broker.url, cloudpass_api::broker::AGENT_CONFIG_PATH);
    let token = config_token.clone();
    let (config_rate, config50, config99) = load(move || {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        async move { http.get(url).bearer_auth(token).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    // The agent keeps no idle connection between its requests (the broker's connection
    // slots are shared by every pod), so each ask is a new TLS connection.
    let pem = reqwest::Certificate::from_pem(broker.ca.cert_pem().as_bytes()).unwrap();
    let fresh = reqwest::Client::builder().tls_certs_only([pem]).pool_max_idle_per_host(0).build().unwrap();
    let url = format!("{}{}", broker.url, cloudpass_api::broker::AGENT_CONFIG_PATH);
    let (fresh_rate, fresh50, fresh99) = load(move || {
        let (http, url, token) = (fresh.clone(), url.clone(), config_token.clone());
        async move { http.get(url).bearer_auth(token).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;

    // Cold path: a fresh pod per request, against direct calls to the gate.
    let mut tokens = Vec::new();
    for i in 0..COLD_PODS {
        tokens.push(pod_token(cp, NS, &format!("cold-{i}"), "orders", json!({"app": "orders"})).await.unwrap());
    }
    let mut cold = Vec::new();
    for t in &tokens {
        let started = Instant::now();
        let (status, answer) = broker.ask(Some(t), &body).await.unwrap();
        cold.push(started.elapsed());
        assert_eq!(status, 200, "{answer}");
    }
    let keys = signing_keys(cp).await;
    let sts = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(broker.ca.cert_pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let mut direct = Vec::new();
    for i in 0..COLD_PODS {
        let now = jiff::Timestamp::now().as_second();
        let claims = json!({"iss": broker.url, "sub": format!("system:cloudpass:{NS}:s3"), "aud": "sts.amazonaws.com",
                            "iat": now, "nbf": now, "exp": now + 300});
        let token = keys.sign(&claims, now).unwrap();
        let form = [
            ("Action", "AssumeRoleWithWebIdentity".to_owned()),
            ("Version", "2011-06-15".to_owned()),
            ("RoleArn", role.clone()),
            ("RoleSessionName", format!("direct-{i}")),
            ("DurationSeconds", "3600".to_owned()),
            ("WebIdentityToken", token),
        ];
        let started = Instant::now();
        let resp = sts.post(gate.url()).form(&form).send().await.unwrap();
        let ok = resp.status().is_success();
        let _ = resp.bytes().await;
        direct.push(started.elapsed());
        assert!(ok, "direct AssumeRoleWithWebIdentity failed");
    }
    cold.sort();
    direct.sort();

    // A second replica, as `--components all` or a broker Deployment runs several: it
    // serves the same configs and keys but caches on its own. Each pod served above asks
    // it once (an agent whose connection lands on another replica, e.g. after a restart),
    // then the first replica again.
    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.000000Z").to_string();
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "cloudpass-bench-standby", "namespace": "cloudpass-bench"},
        "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 86400, "acquireTime": now, "renewTime": now}});
    cp.apply_yaml(Some("cloudpass-bench"), &lease.to_string()).unwrap();
    let replica_options = BrokerOptions {
        namespace: "cloudpass-bench".into(),
        log_level: "warn".into(),
        instance: "replica".into(),
        lease_name: Some("cloudpass-bench-standby".into()),
        extra_upstream_ca_pem: Some(broker.ca.cert_pem()),
        issuer_url: Some(broker.url.clone()),
        ..Default::default()
    };
    let replica = RunningBroker::start(cp, binary, &replica_options).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while replica.ask(Some(&hot_token), &body).await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "the replica never served the policy:\n{}", replica.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_replica = gate.calls();
    for t in &tokens {
        let (status, answer) = replica.ask(Some(t), &body).await.unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    let on_replica = gate.calls() - before_replica;
    let before_first = gate.calls();
    for t in &tokens {
        let (status, answer) = broker.ask(Some(t), &body).await.unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    let back_on_first = gate.calls() - before_first;
    let (c50, c99, d50, d99) =
        (percentile(&cold, 0.5), percentile(&cold, 0.99), percentile(&direct, 0.5), percentile(&direct, 0.99));

    println!("broker hot path ({CONCURRENCY} concurrent clients, {HOT_SECONDS} s, credential and TokenReview cached):");
    println!("  GET JWKS (baseline):        {base_rate:>8.0} req/s   p50 {base50:>6.2} ms   p99 {base99:>6.2} ms");
    println!("  POST /v1/credentials:       {rate:>8.0} req/s   p50 {p50:>6.2} ms   p99 {p99:>6.2} ms");
    println!("  ratio to baseline:          {:>8.2}x throughput", rate / base_rate);
    println!(
        "  GET /v1/agent-config:       {config_rate:>8.0} req/s   p50 {config50:>6.2} ms   p99 {config99:>6.2} ms"
    );
    println!("  ratio to baseline:          {:>8.2}x throughput", config_rate / base_rate);
    println!(
        "  same, new TLS connection each: {fresh_rate:>5.0} req/s   p50 {fresh50:>6.2} ms   p99 {fresh99:>6.2} ms"
    );
    println!(
        "  10,000 pods asking every minute (167 req/s, a new connection each): {:.1}% of this broker's capacity",
        10_000.0 / 60.0 / fresh_rate * 100.0
    );
    println!("broker cold path ({COLD_PODS} pods, sequential; STS gate + moto upstream):");
    println!("  direct STS call (baseline): p50 {d50:>6.2} ms   p99 {d99:>6.2} ms");
    println!("  first request of a pod:     p50 {c50:>6.2} ms   p99 {c99:>6.2} ms");
    println!("  broker overhead:            p50 {:>6.2} ms   p99 {:>6.2} ms", c50 - d50, c99 - d99);
    println!("two broker replicas, each pod above asking again within its credential's lifetime:");
    println!("  on the replica that served it (baseline): {back_on_first:>4} upstream calls for {COLD_PODS} pods");
    println!("  on another replica:                       {on_replica:>4} upstream calls for {COLD_PODS} pods");
}

/// The issuer's signing keys, read from their Secret as the broker does.
async fn signing_keys(cp: &ControlPlane) -> cloudpass_broker::issuer::KeySet {
    let secret =
        cp.kubectl_ok(&["get", "secret", "cloudpass-issuer-keys", "-n", "cloudpass-bench", "-o", "json"]).unwrap();
    let secret: Value = serde_json::from_str(&secret).unwrap();
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(secret["data"]["keys.json"].as_str().unwrap()).unwrap();
    serde_json::from_slice(&raw).unwrap()
}

fn main() {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(run());
}
