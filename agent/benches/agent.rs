//! `make bench`: the agent binary (release build, its single-threaded runtime) serving a
//! pod, with its credentials from the real broker (operator binary, real apiserver, STS
//! gate in front of moto, an API key from a Secret).
//!
//! - Cached credential endpoint: the AWS container-credentials endpoint under 16
//!   concurrent keep-alive clients for a few seconds. Baseline in the same run: the
//!   agent's own `/healthz` (the same server with nothing to look up).
//! - Memory: RSS idle (ready, holding two credentials) and peak under that load.
//! - Proxy: sequential GETs to a local HTTPS API through the agent's header proxy
//!   (plain HTTP to the agent, TLS to the API) against the same GETs sent straight to the
//!   API over HTTPS on loopback.

use std::{
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use cloudpass_api::agent::{AgentConfig, AgentDelivery, AgentEndpoint};
use cloudpass_e2e::{
    ControlPlane,
    bench::{BrokerBench, concurrent_load, percentile},
    broker::pod_token,
    process::free_port,
    repo_root,
};
use serde_json::json;

const NS: &str = "bench-agent";
const CONCURRENCY: usize = 16;
const LOAD_SECONDS: u64 = 5;
const PROXY_REQUESTS: usize = 2000;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CONCURRENCY clients for LOAD_SECONDS; (requests/s, p50 ms, p99 ms).
async fn load(request: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static) -> (f64, f64, f64) {
    let request = Arc::new(request);
    concurrent_load(CONCURRENCY, Duration::from_millis(500), Duration::from_secs(LOAD_SECONDS), move || {
        let request = request.clone();
        async move {
            let Ok(response) = request().send().await else { return false };
            let ok = response.status().is_success();
            ok && response.bytes().await.is_ok()
        }
    })
    .await
}

async fn sequential(request: impl Fn() -> reqwest::RequestBuilder) -> (f64, f64) {
    for _ in 0..100 {
        request().send().await.unwrap();
    }
    let mut latencies = Vec::with_capacity(PROXY_REQUESTS);
    for _ in 0..PROXY_REQUESTS {
        let t = Instant::now();
        let response = request().send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let _ = response.bytes().await;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

async fn run() {
    let cp = ControlPlane::shared();
    let operator = cloudpass_e2e::workspace_binary("cloudpass-operator").unwrap();
    let BrokerBench { broker, moto: _moto, role, gate } =
        BrokerBench::start(cp, &operator, "cloudpass-bench-agent", NS).await.unwrap();
    // The API the proxy reaches: HTTPS on loopback with a certificate of the broker's CA.
    let api = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let (api_addr, _api) = cloudpass_e2e::tls::serve_https(api, &broker.ca.issue_server(&[]).unwrap()).await.unwrap();

    cp.kubectl_ok(&["create", "secret", "generic", "api", "-n", NS, "--from-literal=key=bench-key"]).unwrap();
    let objects = json!([
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "TrustProvider", "metadata": {"name": "this-cluster"},
         "spec": {"kubernetesServiceAccount": {}}},
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "CredentialProvider", "metadata": {"name": "s3"},
         "spec": {"awsSts": {"roleArn": role, "stsEndpoint": gate.url()}}},
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "CredentialProvider", "metadata": {"name": "api"},
         "spec": {"apiKey": {"secretRef": {"name": "api", "key": "key"}}}},
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "to-s3"},
         "spec": {"client": {"podSelector": {}}, "trustProviders": [{"name": "this-cluster"}], "server": {"kind": "aws"},
                  "credentialProvider": {"name": "s3"}}},
        {"apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "to-api"},
         "spec": {"client": {"podSelector": {}}, "trustProviders": [{"name": "this-cluster"}],
                  "server": {"kind": "http", "hosts": ["localhost"]}, "credentialProvider": {"name": "api"},
                  "delivery": {"httpHeader": {"name": "X-Api-Key", "format": "{token}"}}}},
    ]);
    for o in objects.as_array().unwrap() {
        cp.apply_yaml(Some(NS), &o.to_string()).unwrap();
    }
    for p in ["to-s3", "to-api"] {
        cp.wait_for_condition("accesspolicy", NS, p, "Ready", "True", Duration::from_secs(30)).await.unwrap();
    }
    let token = pod_token(cp, NS, "bench", "orders", json!({"app": "bench"})).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (token_file, shared) = (dir.path().join("token"), dir.path().join("shared"));
    std::fs::write(&token_file, &token).unwrap();
    std::fs::create_dir(&shared).unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, broker.ca.cert_pem()).unwrap();
    let (health, aws_port, proxy_port) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    let config = AgentConfig {
        broker_url: broker.url.clone(),
        health_port: health,
        policy_namespace: None,
        deliveries: vec![
            AgentDelivery {
                policy: "to-s3".into(),
                endpoint: AgentEndpoint::AwsContainerCredentials { port: aws_port },
                evidence: vec![],
            },
            AgentDelivery {
                policy: "to-api".into(),
                endpoint: AgentEndpoint::HttpHeader {
                    port: proxy_port,
                    hosts: vec!["localhost".into()],
                    upstream_port: api_addr.port(),
                    name: "X-Api-Key".into(),
                    format: "{token}".into(),
                    ca_file: None,
                },
                evidence: vec![],
            },
        ],
    };
    let spawn = |binary: &std::path::Path, log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).unwrap();
        Killed(
            std::process::Command::new(binary)
                .env_clear()
                .env("CLOUDPASS_AGENT_CONFIG", serde_json::to_string(&config).unwrap())
                .env("CLOUDPASS_BROKER_CA", broker.ca.cert_pem())
                .env("CLOUDPASS_TOKEN_FILE", &token_file)
                .env("CLOUDPASS_SHARED_DIR", &shared)
                .env("CLOUDPASS_UPSTREAM_CA_FILE", &upstream_ca)
                .env("CLOUDPASS_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let agent = spawn(std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-agent")), "agent.log");
    let pid = agent.0.id();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let ready = || async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http.get(format!("http://127.0.0.1:{health}/ready")).send().await.is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "agent not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Settled: the first credentials fetched, nothing in flight.
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    ready().await;
    let idle = Memory::of(pid);

    let auth = std::fs::read_to_string(shared.join(cloudpass_api::agent::AWS_TOKEN_FILE)).unwrap();
    let client = http.clone();
    let healthz = format!("http://127.0.0.1:{health}/healthz");
    let (base_rate, b50, b99) = load(move || client.get(&healthz)).await;
    let client = http.clone();
    let creds = format!("http://127.0.0.1:{aws_port}{}", cloudpass_api::agent::AWS_CREDENTIALS_PATH);
    let (rate, c50, c99) = load(move || client.get(&creds).header("authorization", &auth)).await;
    let peak = rss_kib(pid, "VmHWM:");

    let direct = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(broker.ca.cert_pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let direct_url = format!("https://localhost:{}/", api_addr.port());
    let (d50, d99) = sequential(|| direct.get(&direct_url)).await;
    let proxied = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://127.0.0.1:{proxy_port}")).unwrap())
        .build()
        .unwrap();
    let proxied_url = format!("http://localhost:{}/", api_addr.port());
    let (p50, p99) = sequential(|| proxied.get(&proxied_url)).await;
    let size = std::fs::metadata(env!("CARGO_BIN_EXE_cloudpass-agent")).map(|m| m.len()).unwrap_or(0);

    println!("agent (release binary, {} bytes; single-threaded runtime):", size);
    println!("cached credential endpoint ({CONCURRENCY} concurrent keep-alive clients, {LOAD_SECONDS} s):");
    println!("  GET /healthz (baseline):           {base_rate:>8.0} req/s   p50 {b50:>6.3} ms   p99 {b99:>6.3} ms");
    println!("  GET AWS container credentials:     {rate:>8.0} req/s   p50 {c50:>6.3} ms   p99 {c99:>6.3} ms");
    println!("  ratio to baseline:                 {:>8.2}x throughput", rate / base_rate);
    println!("memory: RSS idle {:.1} MB, peak under load {:.1} MB", idle.rss as f64 / 1024.0, peak as f64 / 1024.0);
    idle.print("this build");
    println!("header proxy ({PROXY_REQUESTS} sequential GETs to a local HTTPS API):");
    println!("  direct HTTPS (baseline):           p50 {d50:>6.3} ms   p99 {d99:>6.3} ms");
    println!("  through the agent's proxy:         p50 {p50:>6.3} ms   p99 {p99:>6.3} ms");
    println!("  added by the proxy:                p50 {:>6.3} ms   p99 {:>6.3} ms", p50 - d50, p99 - d99);
    drop(agent);

    // The binary the image ships (static musl, built for size; `make images` builds it,
    // `make bench` first): its idle memory, which is what a pod's agent holds.
    let image = repo_root().join("target").join(cloudpass_e2e::images::built_binary("cloudpass-agent"));
    if image.exists() {
        let agent = spawn(&image, "agent-image.log");
        ready().await;
        Memory::of(agent.0.id()).print("image's binary (static musl, built for size)");
        // Its hot path, against the release build's above (same run, same load).
        let auth = std::fs::read_to_string(shared.join(cloudpass_api::agent::AWS_TOKEN_FILE)).unwrap();
        let client = http.clone();
        let creds = format!("http://127.0.0.1:{aws_port}{}", cloudpass_api::agent::AWS_CREDENTIALS_PATH);
        let (image_rate, i50, i99) = load(move || client.get(&creds).header("authorization", &auth)).await;
        println!(
            "  GET AWS container credentials, image's binary: {image_rate:>8.0} req/s   p50 {i50:>6.3} ms   p99 {i99:>6.3} ms   ({:.2}x the release build's throughput)",
            image_rate / rate
        );
        drop(agent);
    } else {
        println!("  (no image binary at {}: run make images to measure it)", image.display());
    }
    // Another build to compare in the same run (another profile, allocator or TLS
    // provider): CLOUDPASS_BENCH_AGENT_BINARY=path.
    if let Some(other) = std::env::var_os("CLOUDPASS_BENCH_AGENT_BINARY").map(std::path::PathBuf::from) {
        let size = std::fs::metadata(&other).map(|m| m.len()).unwrap_or(0);
        let agent = spawn(&other, "agent-other.log");
        ready().await;
        Memory::of(agent.0.id()).print(&format!("{} ({size} bytes)", other.display()));
    }
}

/// A process's resident memory, from `/proc/PID/status` (KiB).
struct Memory {
    rss: u64,
    anonymous: u64,
    file: u64,
    threads: u64,
}

impl Memory {
    fn of(pid: u32) -> Self {
        Self {
            rss: rss_kib(pid, "VmRSS:"),
            anonymous: rss_kib(pid, "RssAnon:"),
            file: rss_kib(pid, "RssFile:"),
            threads: rss_kib(pid, "Threads:"),
        }
    }

    fn print(&self, what: &str) {
        println!(
            "  idle, {what}: RSS {:.1} MB = {:.1} MB anonymous (heap, stacks) + {:.1} MB file-backed (binary and libraries), {} threads",
            self.rss as f64 / 1024.0,
            self.anonymous as f64 / 1024.0,
            self.file as f64 / 1024.0,
            self.threads
        );
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(run());
}
