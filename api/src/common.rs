//! Building blocks shared by the three resources: references, status and the
//! patterns the schema uses to validate names, hosts and URLs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A DNS-1123 subdomain: the name of a Kubernetes object.
pub const OBJECT_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key inside a Secret's `data`.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// A host name, optionally with one leading `*.` wildcard label (`*.s3.amazonaws.com`).
pub const HOST_PATTERN: &str = r"^(\*\.)?([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// An `https://` URL with a host and no fragment, user info or white space.
pub const HTTPS_URL_PATTERN: &str = r"^https://[^\s/?#@]+(/[^\s#]*)?$";
/// A GUID as Entra ID uses for tenants, clients and objects.
pub const GUID_PATTERN: &str = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
/// A Kubernetes namespace or service-account name (DNS-1123 label), or a glob over them.
pub const NAME_GLOB_PATTERN: &str = r"^[a-z0-9*]([-a-z0-9*]*[a-z0-9*])?$";

/// A reference to another cloudpass object **in the same namespace**. Cross-namespace
/// references are impossible by construction: the namespace is the tenancy boundary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the object in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
}

impl LocalObjectReference {
    /// A reference to the object called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// One key of a Secret **in the same namespace**. cloudpass never accepts secret material
/// inline; the operator checks that the Secret and key exist, and the broker reads the
/// value only when it is needed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// Key within the Secret's `data`.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

/// Observed state common to every cloudpass resource, shaped like every other
/// Kubernetes status so that `kubectl wait --for=condition=Ready`, Argo CD and Flux work.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Latest observations. `Ready` is present once the operator has seen the object;
    /// its reason is one of `Ready`, `InvalidSpec`, `ProviderNotFound`,
    /// `ProviderNotReady`, `SecretNotFound` or `Conflict`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe. Lower than the object's
    /// generation while the operator has not yet looked at the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Status {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether `Ready` is `True` for the given generation.
    pub fn is_ready_for(&self, generation: Option<i64>) -> bool {
        self.observed_generation == generation && self.condition(CONDITION_READY).is_some_and(|c| c.status == "True")
    }
}

/// Status of a TrustProvider or CredentialProvider.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderStatus {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub status: Status,
    /// Which kind of provider the spec sets (e.g. `awsSts`), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_kind: Option<String>,
    /// The last `Verified` check of a federated CredentialProvider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<LastVerification>,
}

/// When the `Verified` check last ran, and which request it answered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastVerification {
    /// When the check finished.
    pub time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// The `cloudpass.dev/verify-requested-at` value the check started after, if any:
    /// how `kubectl cloudpass verify` knows its request was answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// Type of the condition every cloudpass resource carries.
pub const CONDITION_READY: &str = "Ready";

/// Type of the condition a federated CredentialProvider (and each AccessPolicy using
/// one) carries: whether a real exchange with the cloud's token service, with a token
/// like a workload's, succeeded. It never changes `Ready`: a cloud can be briefly
/// unreachable.
pub const CONDITION_VERIFIED: &str = "Verified";

/// Reasons of the `Verified` condition besides the cloud's own error code, which is the
/// reason when the cloud refused (e.g. `AccessDenied`, `AADSTS700213`, `invalid_grant`).
pub mod verify_reasons {
    /// The exchange succeeded.
    pub const VERIFIED: &str = "Verified";
    /// No check has finished yet for the current spec.
    pub const PENDING: &str = "Pending";
    /// The token service could not be reached or answered a server error: unknown.
    pub const UNREACHABLE: &str = "Unreachable";
    /// The cloud refused without an error code.
    pub const REFUSED: &str = "Refused";
    /// The operator could not sign a probe (no issuer key yet).
    pub const NOT_SIGNED: &str = "IssuerNotReady";
    /// On a policy: its CredentialProvider is not Ready or has no check.
    pub const NOT_CHECKED: &str = "NotChecked";
}

/// Reasons of the `Ready` condition. They are part of the API: alerts and GitOps health
/// checks match on them.
pub mod reasons {
    /// Everything checked out; the object is in use.
    pub const READY: &str = "Ready";
    /// The spec breaks a rule the schema cannot express (e.g. an unknown time zone).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A referenced TrustProvider or CredentialProvider does not exist in the namespace.
    pub const PROVIDER_NOT_FOUND: &str = "ProviderNotFound";
    /// A referenced provider exists but is not Ready itself.
    pub const PROVIDER_NOT_READY: &str = "ProviderNotReady";
    /// A referenced Secret, or a key in it, does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// Another Ready policy would give the same container the same single-valued endpoint.
    pub const CONFLICT: &str = "Conflict";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_requires_current_generation() {
        let status = Status {
            conditions: vec![Condition {
                type_: CONDITION_READY.into(),
                status: "True".into(),
                reason: reasons::READY.into(),
                message: String::new(),
                observed_generation: Some(2),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            }],
            observed_generation: Some(2),
        };
        assert!(status.is_ready_for(Some(2)));
        assert!(!status.is_ready_for(Some(3)), "a newer spec is not Ready yet");
    }
}
