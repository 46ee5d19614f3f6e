//! Prometheus metrics of the agent, served on the health port at `/metrics`.
//!
//! Labels are endpoint kinds, results, policy names and broker error codes: never a
//! token, a key or a header value.

use std::sync::Arc;

use jiff::Timestamp;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::store::CredentialStore;

/// Labels of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `aws`, `azure`, `gcp`, `proxy`, `health`.
    pub endpoint: &'static str,
    /// `ok`, `bad_request`, `unauthorized`, `forbidden`, `not_found`, ...
    pub result: &'static str,
}

/// Labels of a credential fetch from the broker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// The policy fetched.
    pub policy: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of a failed fetch: its error code (see `AgentError::metric_label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// `unauthenticated`, `denied`, `unreachable`, `evidence`, ...
    pub code: &'static str,
}

/// Labels of a request for this pod's deliveries, after the start.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// `applied`, `unchanged`, `invalid` or `error` (the broker did not answer).
    pub result: &'static str,
}

/// Labels of a per-policy credential gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// The policy whose credential is measured.
    pub policy: String,
}

/// The agent's metrics (prefix `cloudpass_agent_`), served at `/metrics`.
pub struct Metrics {
    registry: Registry,
    /// Requests served, by endpoint and result.
    pub requests: Family<RequestLabels, Counter>,
    /// Credential fetches, by policy and result.
    pub refreshes: Family<RefreshLabels, Counter>,
    /// Failed fetches, by error code.
    pub broker_errors: Family<CodeLabels, Counter>,
    /// Expiry of the held credential, Unix seconds.
    pub expiry: Family<PolicyLabels, Gauge>,
    /// Age of the held credential in seconds (updated when scraped).
    pub age: Family<PolicyLabels, Gauge>,
    /// 1 when the held credential may be handed out (updated when scraped).
    pub valid: Family<PolicyLabels, Gauge>,
    /// Requests for this pod's deliveries after the start, by result.
    pub config_updates: Family<ConfigLabels, Counter>,
    /// Policies whose new configuration from the broker only a pod restart can apply
    /// (it moves the endpoint the app's variables name).
    pub config_restart_required: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cloudpass_agent");
        let requests = Family::default();
        let refreshes = Family::default();
        let broker_errors = Family::default();
        let expiry = Family::default();
        let age = Family::default();
        let valid = Family::default();
        let config_updates = Family::default();
        let config_restart_required = Gauge::default();
        registry.register("requests", "Requests served, by endpoint and result", requests.clone());
        registry.register("refreshes", "Credential fetches from the broker, by policy and result", refreshes.clone());
        registry.register("broker_errors", "Failed credential fetches, by error code", broker_errors.clone());
        registry.register(
            "credential_expiry_timestamp_seconds",
            "Expiry of the credential held per policy",
            expiry.clone(),
        );
        registry.register("credential_age_seconds", "Age of the credential held per policy", age.clone());
        registry.register("credential_valid", "1 when the credential held per policy may be served", valid.clone());
        registry.register(
            "config_updates",
            "Requests for this pod's deliveries after the start, by result",
            config_updates.clone(),
        );
        registry.register(
            "config_restart_required",
            "Policies whose new configuration only a pod restart can apply",
            config_restart_required.clone(),
        );
        Self {
            registry,
            requests,
            refreshes,
            broker_errors,
            expiry,
            age,
            valid,
            config_updates,
            config_restart_required,
        }
    }
}

impl Metrics {
    /// Empty metrics, registered and shared, for one agent.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a served request.
    pub fn request(&self, endpoint: &'static str, result: &'static str) {
        self.requests.get_or_create(&RequestLabels { endpoint, result }).inc();
    }

    /// Counts a successful fetch and records the credential's expiry.
    pub fn refreshed(&self, policy: &str, expires_at: Timestamp) {
        self.refreshes.get_or_create(&RefreshLabels { policy: policy.into(), result: "ok" }).inc();
        self.expiry.get_or_create(&PolicyLabels { policy: policy.into() }).set(expires_at.as_second());
    }

    /// Counts a request for this pod's deliveries.
    pub fn config_update(&self, result: &'static str) {
        self.config_updates.get_or_create(&ConfigLabels { result }).inc();
    }

    /// Counts a failed fetch.
    pub fn refresh_failed(&self, policy: &str, code: &'static str) {
        self.refreshes.get_or_create(&RefreshLabels { policy: policy.into(), result: "error" }).inc();
        self.broker_errors.get_or_create(&CodeLabels { code }).inc();
    }

    /// The metrics in the OpenMetrics text format, with credential ages as of now.
    pub fn encode(&self, store: &CredentialStore) -> String {
        let now = Timestamp::now();
        for (policy, fetched) in store.snapshot() {
            let labels = PolicyLabels { policy };
            let (age, valid) = match fetched {
                Some(f) => (now.duration_since(f.fetched_at).as_secs(), f.is_valid_at(now)),
                None => (0, false),
            };
            self.age.get_or_create(&labels).set(age);
            self.valid.get_or_create(&labels).set(valid.into());
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding into a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{api_key, fetched};

    #[test]
    fn exposes_requests_refreshes_errors_and_credential_age() {
        let metrics = Metrics::default();
        let store = CredentialStore::new(["p", "q"]);
        let f = fetched(api_key("secret-key"), 3600);
        metrics.refreshed("p", f.expires_at);
        store.put("p", f);
        metrics.refresh_failed("q", "unreachable");
        metrics.request("aws", "ok");
        let text = metrics.encode(&store);
        for line in [
            r#"cloudpass_agent_requests_total{endpoint="aws",result="ok"} 1"#,
            r#"cloudpass_agent_refreshes_total{policy="p",result="ok"} 1"#,
            r#"cloudpass_agent_refreshes_total{policy="q",result="error"} 1"#,
            r#"cloudpass_agent_broker_errors_total{code="unreachable"} 1"#,
            r#"cloudpass_agent_credential_valid{policy="p"} 1"#,
            r#"cloudpass_agent_credential_valid{policy="q"} 0"#,
            r#"cloudpass_agent_credential_age_seconds{policy="p"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(text.contains("cloudpass_agent_credential_expiry_timestamp_seconds{policy=\"p\"}"));
        assert!(!text.contains("secret-key"));
    }
}
