//! What the benchmarks share: latency percentiles and a concurrent load runner.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

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
