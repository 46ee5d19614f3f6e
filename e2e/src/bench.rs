//! What the benchmarks share: latency percentiles, a concurrent load runner, and the
//! broker with an S3 role behind it.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::json;

use crate::{
    ControlPlane,
    broker::{BrokerOptions, RunningBroker},
    fakes::aws_sts::{AwsRoleTrust, StsGate},
    moto::MotoServer,
};

/// What the broker benchmarks run against: the `operator` binary's broker (quiet logs,
/// its own namespace), the namespace `ns` with service account `orders`, and an S3 role in
/// moto that the STS gate lets the broker assume for any cloudpass subject.
pub struct BrokerBench {
    /// The broker.
    pub broker: RunningBroker,
    /// moto; keep it for as long as the role is used.
    pub moto: MotoServer,
    /// The role's ARN.
    pub role: String,
    /// The STS gate in front of moto.
    pub gate: StsGate,
}

impl BrokerBench {
    /// Starts it all; `broker_namespace` is where the broker keeps its own objects.
    pub async fn start(cp: &ControlPlane, operator: &Path, broker_namespace: &str, ns: &str) -> Result<Self> {
        let options =
            BrokerOptions { namespace: broker_namespace.into(), log_level: "warn".into(), ..Default::default() };
        let broker = RunningBroker::start(cp, operator, &options).await?;
        cp.create_namespace(ns, &[]).await?;
        cp.create_service_account(ns, "orders").await?;
        let moto = MotoServer::start().await?;
        let s3 =
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
        let role = moto.create_role("bench", &s3).await?;
        let gate = broker.sts_gate(&moto, vec![AwsRoleTrust::new(&role, &broker.url, "system:cloudpass:*")]).await?;
        Ok(Self { broker, moto, role, gate })
    }
}

/// The `p` quantile (0.0 to 1.0) of sorted latencies, in milliseconds.
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Runs `request` from `concurrency` tasks for `duration`, after `warmup` of sequential
/// requests (to open the connections); each request must return `true`. Returns the
/// requests per second and the p50 and p99 latency in milliseconds.
pub async fn concurrent_load<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    request: F,
) -> (f64, f64, f64)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let request = Arc::new(request);
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        assert!(request().await, "a request failed during warm-up");
    }
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    assert!(request().await, "a request failed under load");
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("a load task panicked"));
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (rate, percentile(&all, 0.5), percentile(&all, 0.99))
}
