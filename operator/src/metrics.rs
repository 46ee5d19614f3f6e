//! Prometheus metrics of the operator, served on `/metrics` in the OpenMetrics format.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use cloudpass_broker::metrics::BrokerMetrics;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of one CredentialProvider's verification.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Labels of a finished verification.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    /// `verified`, `refused` or `unknown`.
    pub result: String,
}

/// Labels of an object count: its kind and its `Ready` condition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ObjectLabels {
    /// `TrustProvider`, `CredentialProvider` or `AccessPolicy`.
    pub kind: String,
    /// `true` or `false`.
    pub ready: String,
    /// The `Ready` reason.
    pub reason: String,
}

/// Labels naming an error's cause.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Stable error label ([`crate::Error::metric_label`]).
    pub reason: String,
}

/// Labels naming a kind of write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// What was written: `status`, `configmap_apply`, `configmap_delete`.
    pub target: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Namespace reconciles run.
    pub reconciles: Counter,
    /// Reconciles that failed, by cause.
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    /// Duration of a namespace reconcile, in seconds.
    pub reconcile_duration: Histogram,
    /// API writes issued, by target.
    pub writes: Family<WriteLabels, Counter>,
    /// Objects by kind and Ready state.
    objects: Family<ObjectLabels, Gauge>,
    /// 1 while this instance holds the leader lease.
    pub leader: Gauge,
    /// The broker's metrics, registered here: hand a clone to the broker.
    pub broker: BrokerMetrics,
    /// Broker serving certificate reloads (self-managed rotation or changed files).
    pub broker_cert_reloads: Counter,
    /// Per federated CredentialProvider: 1 Verified, 0 refused, -1 unknown.
    pub verified: Family<ProviderLabels, Gauge>,
    /// Verifications finished, by result.
    pub verifications: Family<VerifyLabels, Counter>,
    per_namespace: Mutex<BTreeMap<String, BTreeMap<ObjectLabels, i64>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cloudpass_operator");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        let reconcile_duration = Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        let writes = Family::<WriteLabels, Counter>::default();
        let objects = Family::<ObjectLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Namespace reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Namespace reconciles that failed, by cause", reconcile_errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a namespace reconcile",
            reconcile_duration.clone(),
        );
        registry.register("api_writes", "Kubernetes API writes issued, by target", writes.clone());
        registry.register("objects", "cloudpass objects by kind and Ready state", objects.clone());
        registry.register("leader", "1 while this instance holds the leader lease", leader.clone());
        let broker = BrokerMetrics::default();
        broker.register(&mut registry);
        let broker_cert_reloads = Counter::default();
        registry.register(
            "broker_certificate_reloads",
            "Broker serving certificate reloads",
            broker_cert_reloads.clone(),
        );
        let verified = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "credential_provider_verified",
            "Whether the cloud accepted the last verification of a CredentialProvider: 1 yes, 0 refused, -1 unknown",
            verified.clone(),
        );
        let verifications = Family::<VerifyLabels, Counter>::default();
        registry.register(
            "verifications",
            "Verifications of CredentialProviders finished, by result",
            verifications.clone(),
        );
        Self {
            broker,
            broker_cert_reloads,
            verified,
            verifications,
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            writes,
            objects,
            leader,
            per_namespace: Mutex::default(),
        }
    }
}

impl Metrics {
    /// New metrics, shared.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one API write.
    pub fn write(&self, target: &str) {
        self.writes.get_or_create(&WriteLabels { target: target.to_owned() }).inc();
    }

    /// Replaces the object counts of one namespace and refreshes the totals.
    pub fn record_namespace(&self, namespace: &str, counts: BTreeMap<ObjectLabels, i64>) {
        let mut all = self.per_namespace.lock().unwrap_or_else(|e| e.into_inner());
        if counts.is_empty() {
            all.remove(namespace);
        } else {
            all.insert(namespace.to_owned(), counts);
        }
        let mut totals: BTreeMap<ObjectLabels, i64> = BTreeMap::new();
        for counts in all.values() {
            for (labels, n) in counts {
                *totals.entry(labels.clone()).or_default() += n;
            }
        }
        // Label sets that dropped to zero must read 0, not keep their last value.
        self.objects.clear();
        for (labels, n) in totals {
            self.objects.get_or_create(&labels).set(n);
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding metrics into a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kind: &str, ready: bool, reason: &str) -> ObjectLabels {
        ObjectLabels { kind: kind.into(), ready: ready.to_string(), reason: reason.into() }
    }

    #[test]
    fn namespace_counts_add_up_and_drop_out() {
        let m = Metrics::default();
        m.record_namespace("a", [(labels("AccessPolicy", true, "Ready"), 2)].into());
        m.record_namespace("b", [(labels("AccessPolicy", true, "Ready"), 3)].into());
        assert!(
            m.encode().contains(r#"cloudpass_operator_objects{kind="AccessPolicy",ready="true",reason="Ready"} 5"#)
        );
        m.record_namespace("a", [(labels("AccessPolicy", false, "Conflict"), 2)].into());
        m.record_namespace("b", BTreeMap::new());
        let text = m.encode();
        assert!(text.contains(r#"reason="Conflict"} 2"#), "{text}");
        assert!(!text.contains(r#"ready="true""#), "{text}");
    }
}
