//! One AdmissionReview in, one out: parsing, the decision, the JSON patch and metrics.

use std::{sync::Arc, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use tracing::{info, warn};

use crate::{
    config::Configs,
    inject::{InjectSettings, decide},
    metrics::Metrics,
    random_proof,
};

/// Largest AdmissionReview body accepted (a pod is at most 1.5 MiB in etcd).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Why a request could not even be answered with an AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    /// Not JSON of the AdmissionReview shape.
    #[error("malformed AdmissionReview: {0}")]
    Malformed(#[from] serde_json::Error),
    /// An AdmissionReview without a request.
    #[error("AdmissionReview has no request")]
    NoRequest,
}

/// The admission handler's state.
pub struct Admission {
    /// Compiled configs by namespace.
    pub configs: Arc<Configs>,
    /// How to inject.
    pub settings: InjectSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Admission {
    /// Answers one AdmissionReview body.
    pub fn review(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, BadRequest> {
        let started = Instant::now();
        let result = self.review_inner(body);
        self.metrics.latency.observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.request("bad_request");
        }
        result
    }

    fn review_inner(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, BadRequest> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)?;
        let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| BadRequest::NoRequest)?;
        let response = AdmissionResponse::from(&request);
        let is_pod_create =
            request.kind.group.is_empty() && request.kind.kind == "Pod" && request.operation == Operation::Create;
        if !is_pod_create {
            self.metrics.request("allowed");
            return Ok(response.into_review());
        }
        let namespace = request.namespace.clone().unwrap_or_default();
        let Some(object) = request.object.as_ref() else {
            self.metrics.request("error");
            return Ok(response.deny("cloudpass: pod CREATE request without an object").into_review());
        };
        let original = serde_json::to_value(object).unwrap_or_default();
        let pod: k8s_openapi::api::core::v1::Pod = match serde_json::from_value(original) {
            Ok(pod) => pod,
            Err(e) => {
                self.metrics.request("error");
                return Ok(response.deny(format!("cloudpass: cannot read the pod: {e}")).into_review());
            }
        };
        let config = self.configs.get(&namespace);
        let decision = decide(&pod, config.as_deref(), &self.settings, &random_proof());
        let name = pod.metadata.name.clone().or(pod.metadata.generate_name.clone()).unwrap_or_default();
        let mut response = response;
        if !decision.warnings.is_empty() {
            warn!(namespace, pod = %name, warnings = ?decision.warnings, "injection warnings");
            response.warnings = Some(decision.warnings.clone());
        }
        match decision.mutated {
            Some(mutated) => {
                let before = serde_json::to_value(&pod).expect("a pod serializes");
                let after = serde_json::to_value(&mutated).expect("a pod serializes");
                let patch = json_patch::diff(&before, &after);
                match response.with_patch(patch) {
                    Ok(r) => {
                        self.metrics.request("injected");
                        self.metrics.injections.inc();
                        info!(namespace, pod = %name, policies = ?decision.policies, "agent injected");
                        Ok(r.into_review())
                    }
                    Err(e) => {
                        self.metrics.request("error");
                        Ok(AdmissionResponse::from(&request).deny(format!("cloudpass: {e}")).into_review())
                    }
                }
            }
            None => {
                let reason = decision.skipped.map(|s| s.label()).unwrap_or("none");
                self.metrics.request("skipped");
                self.metrics.skip(reason);
                Ok(response.into_review())
            }
        }
    }
}
