//! One AdmissionReview in, one out: parsing, the decision, the JSON patch and metrics.

use std::{sync::Arc, time::Instant};

use base64::Engine;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::{
    configs::Configs,
    inject::{InjectSettings, decide},
    metrics::Metrics,
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

/// The AdmissionReview sent back to the apiserver: kube's [`AdmissionResponse`], except
/// that its JSON Patch goes out as base64 text, the standard form of Go's `[]byte` in
/// JSON. (kube serializes the patch bytes as a JSON array of numbers, which the
/// apiserver accepts too, but at ~3.7 characters per byte where base64 takes 1.33.)
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    api_version: String,
    kind: String,
    response: AnswerResponse,
}

#[derive(Serialize, Debug)]
struct AnswerResponse {
    /// Every field but the patch, which is taken out of it.
    #[serde(flatten)]
    response: AdmissionResponse,
    /// The JSON Patch, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
}

impl From<AdmissionResponse> for Answer {
    fn from(mut response: AdmissionResponse) -> Self {
        let patch = response.patch.take().map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes));
        Self {
            api_version: response.types.api_version.clone(),
            kind: response.types.kind.clone(),
            response: AnswerResponse { response, patch },
        }
    }
}

impl Answer {
    /// The response part, as kube's type (its patch taken out; see [`Answer::patch`]).
    pub fn response(&self) -> &AdmissionResponse {
        &self.response.response
    }

    /// The JSON Patch as sent: base64.
    pub fn patch(&self) -> Option<&str> {
        self.response.patch.as_deref()
    }
}

/// The admission handler's state.
pub struct Admission {
    /// Compiled configs by namespace.
    pub configs: Arc<Configs>,
    /// How to inject.
    pub settings: InjectSettings,
    /// The webhook's counters and latency histogram, served on `/metrics`.
    pub metrics: Arc<Metrics>,
}

impl Admission {
    /// Answers one AdmissionReview body.
    pub fn review(&self, body: &[u8]) -> Result<Answer, BadRequest> {
        let started = Instant::now();
        let result = self.review_inner(body).map(Answer::from);
        self.metrics.latency.observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.request("bad_request");
        }
        result
    }

    fn review_inner(&self, body: &[u8]) -> Result<AdmissionResponse, BadRequest> {
        let mut review: Value = serde_json::from_slice(body)?;
        let sent = take_object(&mut review);
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(review)?;
        let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| BadRequest::NoRequest)?;
        let response = AdmissionResponse::from(&request);
        let is_pod_create =
            request.kind.group.is_empty() && request.kind.kind == "Pod" && request.operation == Operation::Create;
        if !is_pod_create {
            self.metrics.request("allowed");
            return Ok(response);
        }
        let namespace = request.namespace.clone().unwrap_or_default();
        let (Some(_), Some(sent)) = (request.object.as_ref(), sent) else {
            self.metrics.request("error");
            return Ok(response.deny("cloudpass: pod CREATE request without an object"));
        };
        let pod = match k8s_openapi::api::core::v1::Pod::deserialize(&sent) {
            Ok(pod) => pod,
            Err(e) => {
                self.metrics.request("error");
                return Ok(response.deny(format!("cloudpass: cannot read the pod: {e}")));
            }
        };
        let config = self.configs.get(&namespace);
        let decision = decide(&pod, config.as_deref(), &self.settings, &cloudpass_rand::hex(32));
        let name = pod.metadata.name.clone().or(pod.metadata.generate_name.clone()).unwrap_or_default();
        let mut response = response;
        if !decision.warnings.is_empty() {
            warn!(namespace, pod = %name, warnings = ?decision.warnings, "injection warnings");
            response.warnings = Some(decision.warnings.clone());
        }
        // Skipped pods may still be patched: one that only gets the annotation saying why.
        // The patch is computed against the pod as sent, not its k8s-openapi form: fields
        // k8s-openapi does not know stay where they are (see `inject::patch`).
        let response = match decision.changes.as_ref() {
            Some(changes) => {
                let patched = changes.patch(&sent).map_err(|e| e.to_string());
                match patched.and_then(|patch| response.with_patch(patch).map_err(|e| e.to_string())) {
                    Ok(r) => r,
                    Err(e) => {
                        self.metrics.request("error");
                        return Ok(AdmissionResponse::from(&request).deny(format!("cloudpass: {e}")));
                    }
                }
            }
            None => response,
        };
        match decision.skipped {
            None => {
                self.metrics.request("injected");
                self.metrics.injections.inc();
                info!(namespace, pod = %name, policies = ?decision.policies, "agent injected");
            }
            Some(skip) => {
                self.metrics.request("skipped");
                self.metrics.skip(skip.label());
            }
        }
        Ok(response)
    }
}

/// Takes the object out of an AdmissionReview's request, leaving in its place only what
/// kube's [`DynamicObject`] reads of it (type and metadata), so that the review parses
/// as before while the pod's JSON stays exactly as the apiserver sent it. `None` when
/// there is no object, or one that is not a JSON object (left for the parser to refuse).
fn take_object(review: &mut Value) -> Option<Value> {
    let object = review.get_mut("request")?.get_mut("object")?;
    let Value::Object(sent) = object else { return None };
    let stub: Map<String, Value> =
        ["apiVersion", "kind", "metadata"].iter().filter_map(|&k| Some((k.to_owned(), sent.get(k)?.clone()))).collect();
    Some(std::mem::replace(object, Value::Object(stub)))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::inject::AgentPorts;

    fn admission() -> Admission {
        let configs = Arc::new(Configs::default());
        let policy = json!({
            "name": "s3", "client": {"podSelector": {}}, "trustProviders": ["k8s"],
            "server": {"kind": "aws"}, "credentialProvider": "cred", "delivery": {"sdkEndpoint": {}},
        });
        configs.insert(cloudpass_api::config::NamespaceConfig::new(
            "team",
            [("k8s".into(), serde_json::from_value(json!({"kubernetesServiceAccount": {}})).unwrap())].into(),
            [(
                "cred".into(),
                serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap(),
            )]
            .into(),
            vec![serde_json::from_value(policy).unwrap()],
        ));
        Admission {
            configs,
            settings: InjectSettings {
                image: "agent:1".into(),
                pull_policy: "IfNotPresent".into(),
                agent_path: "/agent".into(),
                broker_url: "https://broker".into(),
                broker_ca: crate::inject::BrokerCa::ConfigMap("cloudpass-broker-ca".into()),
                ports: AgentPorts::default(),
                token_seconds: 3600,
                version: "test".into(),
                remote_cluster: false,
            },
            metrics: Metrics::new(),
        }
    }

    fn review(kind: &str, group: &str, operation: &str, object: Option<Value>) -> Vec<u8> {
        let mut request = json!({
            "uid": "7f0b2b1c-0000-4000-8000-000000000001",
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": format!("{}s", kind.to_lowercase())},
            "requestKind": {"group": group, "version": "v1", "kind": kind},
            "requestResource": {"group": group, "version": "v1", "resource": format!("{}s", kind.to_lowercase())},
            "namespace": "team", "operation": operation,
            "userInfo": {"username": "alice"}, "dryRun": false,
        });
        if let Some(o) = object {
            request["object"] = o;
        }
        serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}))
            .unwrap()
    }

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "team"},
               "spec": {"containers": [{"name": "web", "image": "web:1"}]}})
    }

    #[test]
    fn a_selected_pod_gets_a_patch_that_applies_to_what_was_sent() {
        let a = admission();
        let answer = serde_json::to_value(a.review(&review("Pod", "", "CREATE", Some(pod()))).unwrap()).unwrap();
        let response = &answer["response"];
        assert_eq!(response["uid"], "7f0b2b1c-0000-4000-8000-000000000001");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        // The standard form of Go's []byte: base64 text, not an array of numbers.
        let Value::String(b64) = &response["patch"] else { panic!("patch is not base64 text: {}", response["patch"]) };
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        // An array of numbers takes ~3.7 characters per byte of the patch, base64 1.33.
        let as_numbers = serde_json::to_string(&bytes).unwrap();
        let per_byte = as_numbers.len() as f64 / bytes.len() as f64;
        let ratio = as_numbers.len() as f64 / b64.len() as f64;
        assert!(per_byte > 3.5 && ratio > 2.5, "{per_byte:.2} characters per byte as numbers, {ratio:.2} times base64");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut sent = pod();
        json_patch::patch(&mut sent, &patch).unwrap();
        assert_eq!(sent["spec"]["initContainers"][0]["name"], "cloudpass-agent");
        assert_eq!(sent["spec"]["containers"][0]["name"], "web");
        assert!(a.metrics.encode().contains(r#"cloudpass_webhook_requests_total{result="injected"} 1"#));
    }

    /// The patch of an answer, decoded, applied to `sent`.
    fn apply(answer: &Answer, sent: &Value) -> Value {
        let bytes = base64::engine::general_purpose::STANDARD.decode(answer.patch().expect("a patch")).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = sent.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        patched
    }

    /// Fields a newer apiserver knows and k8s-openapi does not (on the pod, its spec, a
    /// container, an env entry) come through the patch as they were sent, in the
    /// container they were sent in. A patch diffed from two k8s-openapi round trips of
    /// the pod compared the init containers by index: the agent inserted first took the
    /// place of `migrate`, kept `migrate`'s unknown field, and `migrate` lost it.
    #[test]
    fn fields_unknown_to_k8s_openapi_stay_where_they_were_sent() {
        use cloudpass_api::agent::{AWS_TOKEN_FILE, SHARED_DIR};
        let a = admission();
        let sent = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "team", "futureMeta": "m"},
        "spec": {
            "futureField": {"level": "pod"},
            "initContainers": [{"name": "migrate", "image": "m:1", "futureField": {"level": "migrate"}}],
            "containers": [{"name": "web", "image": "web:1", "futureField": {"level": "web"},
                            "env": [{"name": "A", "value": "1", "futureField": true}]}],
        }});
        let answer = a.review(&review("Pod", "", "CREATE", Some(sent.clone()))).unwrap();
        let mut patched = apply(&answer, &sent);
        // Reinvoked with the pod it made: nothing more to add.
        let again = a.review(&review("Pod", "", "CREATE", Some(patched.clone()))).unwrap();
        assert!(again.patch().is_none() && again.response().allowed, "{again:?}");

        let agent = patched["spec"]["initContainers"].as_array_mut().unwrap().remove(0);
        assert_eq!(agent["name"], "cloudpass-agent");
        assert!(agent.get("futureField").is_none(), "the agent took no other container's fields: {agent}");
        // Everything else the webhook adds is its own: volumes and annotations.
        let volumes = patched["spec"].as_object_mut().unwrap().remove("volumes").unwrap();
        assert!(volumes.as_array().unwrap().iter().all(|v| v["name"].as_str().unwrap().starts_with("cloudpass-")));
        let annotations = patched["metadata"].as_object_mut().unwrap().remove("annotations").unwrap();
        assert_eq!(annotations["cloudpass.dev/policies"], "s3");

        // What is left is the pod as sent, with the AWS variables and the shared mount
        // appended to each app container.
        let aws_env = [
            json!({"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:15021/v1/aws/credentials"}),
            json!({"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "value": format!("{SHARED_DIR}/{AWS_TOKEN_FILE}")}),
        ];
        let mount = json!({"name": "cloudpass-shared", "mountPath": SHARED_DIR, "readOnly": true});
        let mut expected = sent.clone();
        let migrate = &mut expected["spec"]["initContainers"][0];
        migrate["env"] = json!(aws_env);
        migrate["volumeMounts"] = json!([mount]);
        let web = &mut expected["spec"]["containers"][0];
        web["env"].as_array_mut().unwrap().extend(aws_env);
        web["volumeMounts"] = json!([mount]);
        assert_eq!(patched, expected);
    }

    #[test]
    fn other_objects_and_operations_pass_unchanged() {
        let a = admission();
        for body in [
            review(
                "ConfigMap",
                "",
                "CREATE",
                Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})),
            ),
            review("Pod", "", "UPDATE", Some(pod())),
            review(
                "Deployment",
                "apps",
                "CREATE",
                Some(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})),
            ),
        ] {
            let answer = serde_json::to_value(a.review(&body).unwrap()).unwrap();
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none(), "{answer}");
        }
    }

    #[test]
    fn bad_input_gets_a_precise_error() {
        let a = admission();
        let err = a.review(b"{not json").unwrap_err().to_string();
        assert!(err.starts_with("malformed AdmissionReview"), "{err}");
        let err =
            a.review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#).unwrap_err().to_string();
        assert_eq!(err, "AdmissionReview has no request");
        let answer = serde_json::to_value(a.review(&review("Pod", "", "CREATE", None)).unwrap()).unwrap();
        assert_eq!(answer["response"]["allowed"], false);
        assert!(answer["response"]["status"]["message"].as_str().unwrap().contains("without an object"));
        let broken =
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": "not a list"}});
        let answer = serde_json::to_value(a.review(&review("Pod", "", "CREATE", Some(broken))).unwrap()).unwrap();
        assert_eq!(answer["response"]["allowed"], false);
        assert!(answer["response"]["status"]["message"].as_str().unwrap().contains("cannot read the pod"));
        assert!(a.metrics.encode().contains(r#"cloudpass_webhook_requests_total{result="bad_request"} 2"#));
    }
}
