//! The broker's Prometheus metrics. The broker only counts; the process that runs it
//! registers them ([`BrokerMetrics::register`]) into the registry it serves on
//! `/metrics` (the operator's, prefix `cloudpass_operator`).

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Labels of a broker decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allowed`, `denied` or `error`.
    pub outcome: String,
    /// `OK`, or the refusal's code ([`cloudpass_api::broker::ErrorCode::as_str`]).
    pub code: String,
}

/// Labels of an upstream call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Credential provider kind (`awsSts`, ...).
    pub provider: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of a cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `credential` or `token_review`.
    pub cache: String,
    /// `hit`, `miss` or `coalesced` (`credential`); `hit`, `miss` or `refused`
    /// (`token_review`).
    pub result: String,
}

/// The broker's counters and latency histogram. Cheap to clone: clones count into the
/// same metrics.
#[derive(Clone, Debug)]
pub struct BrokerMetrics {
    /// Broker decisions by outcome and code.
    requests: Family<DecisionLabels, Counter>,
    /// Broker decision latency, in seconds.
    latency: Histogram,
    /// Upstream credential calls by provider kind and result.
    upstream_calls: Family<UpstreamLabels, Counter>,
    /// Cache lookups by cache and result.
    cache_lookups: Family<CacheLabels, Counter>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            upstream_calls: Family::default(),
            cache_lookups: Family::default(),
        }
    }
}

impl BrokerMetrics {
    /// Registers the metrics into `registry` as `broker_requests`,
    /// `broker_request_duration_seconds`, `broker_upstream_calls` and
    /// `broker_cache_lookups` (under the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("broker_requests", "Broker credential decisions by outcome and code", self.requests.clone());
        registry.register(
            "broker_request_duration_seconds",
            "Time to decide a credential request",
            self.latency.clone(),
        );
        registry.register(
            "broker_upstream_calls",
            "Upstream credential calls by provider kind and result",
            self.upstream_calls.clone(),
        );
        registry.register(
            "broker_cache_lookups",
            "Broker cache lookups by cache and result",
            self.cache_lookups.clone(),
        );
    }

    /// Counts one broker decision and its latency.
    pub fn request(&self, outcome: &str, code: &str, elapsed: Duration) {
        self.requests.get_or_create(&DecisionLabels { outcome: outcome.into(), code: code.into() }).inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// Counts one upstream credential call.
    pub fn upstream_call(&self, provider: &str, result: &str) {
        self.upstream_calls.get_or_create(&UpstreamLabels { provider: provider.into(), result: result.into() }).inc();
    }

    /// Counts one cache lookup.
    pub fn cache_lookup(&self, cache: &str, result: &str) {
        self.cache_lookups.get_or_create(&CacheLabels { cache: cache.into(), result: result.into() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn registered_under_the_registry_prefix() {
        let metrics = BrokerMetrics::default();
        let mut registry = Registry::with_prefix("cloudpass_operator");
        metrics.register(&mut registry);
        metrics.request("denied", "Denied", Duration::from_millis(3));
        metrics.cache_lookup("credential", "hit");
        metrics.upstream_call("awsSts", "ok");
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            r#"cloudpass_operator_broker_requests_total{outcome="denied",code="Denied"} 1"#,
            r#"cloudpass_operator_broker_cache_lookups_total{cache="credential",result="hit"} 1"#,
            r#"cloudpass_operator_broker_upstream_calls_total{provider="awsSts",result="ok"} 1"#,
            "cloudpass_operator_broker_request_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
