//! Prometheus metrics of the webhook.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Label of `cloudpass_webhook_requests_total`: what became of one admission request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// `injected`, `skipped`, `allowed` (not a pod CREATE), `error` (denied: the pod could
    /// not be read or patched) or `bad_request` (not an AdmissionReview).
    pub result: String,
}

/// Label of `cloudpass_webhook_skips_total`: why a pod got no agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabel {
    /// A [`Skip`](crate::inject::Skip) label: `opted_out`, `already_injected`, `no_policy`,
    /// `host_network`, `windows`, `nothing_to_deliver` or `name_conflict`.
    pub reason: String,
}

/// The webhook's metrics.
pub struct Metrics {
    registry: Registry,
    /// Admission requests by result (`injected`, `skipped`, `allowed`, `error`,
    /// `bad_request`).
    pub requests: Family<RequestLabel, Counter>,
    /// Admission latency in seconds (in process, from body to answer).
    pub latency: Histogram,
    /// Pods injected.
    pub injections: Counter,
    /// Pods not injected, by reason.
    pub skips: Family<SkipLabel, Counter>,
    /// Serving certificate reloads.
    pub cert_reloads: Counter,
    /// TLS connections accepted (the apiserver keeps them open; a count close to the
    /// request count means connections are not reused).
    pub connections: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cloudpass_webhook");
        let requests = Family::<RequestLabel, Counter>::default();
        let latency = Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1]);
        let injections = Counter::default();
        let skips = Family::<SkipLabel, Counter>::default();
        let cert_reloads = Counter::default();
        let connections = Counter::default();
        registry.register("requests", "Admission requests by result", requests.clone());
        registry.register("latency_seconds", "Time to answer an admission request", latency.clone());
        registry.register("injections", "Pods injected with the agent", injections.clone());
        registry.register("skips", "Pods not injected, by reason", skips.clone());
        registry.register("certificate_reloads", "Serving certificate reloads", cert_reloads.clone());
        registry.register("connections", "TLS connections accepted", connections.clone());
        Self { registry, requests, latency, injections, skips, cert_reloads, connections }
    }
}

impl Metrics {
    /// New metrics, shared.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a request result.
    pub fn request(&self, result: &str) {
        self.requests.get_or_create(&RequestLabel { result: result.into() }).inc();
    }

    /// Counts a skip reason.
    pub fn skip(&self, reason: &str) {
        self.skips.get_or_create(&SkipLabel { reason: reason.into() }).inc();
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding into a String cannot fail");
        out
    }
}
