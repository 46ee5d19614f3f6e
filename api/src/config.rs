//! The compiled config document: every Ready AccessPolicy of one namespace with its
//! providers resolved, as the operator publishes it (in a ConfigMap in its own namespace)
//! for the webhook and the broker.
//!
//! The document is deterministic: policies are sorted by name and the hash covers the
//! exact bytes of the content, so an operator restart or a resync of unchanged objects
//! produces the same hash and no write. It holds no secret values, only references.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    credential::CredentialProviderSpec,
    policy::{AccessConditions, ClientSelector, Delivery, Server},
    trust::TrustProviderSpec,
};

/// Version of the document format. Readers refuse versions they do not know.
pub const CONFIG_FORMAT_VERSION: u32 = 1;

/// The compiled config of one namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceConfig {
    /// Format version, [`CONFIG_FORMAT_VERSION`].
    pub format_version: u32,
    /// Namespace the policies live in.
    pub namespace: String,
    /// `sha256:<hex>` over the canonical JSON of `namespace` and `policies`.
    pub hash: String,
    /// Ready policies, sorted by name.
    pub policies: Vec<CompiledPolicy>,
}

/// One Ready AccessPolicy with its providers resolved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPolicy {
    /// Name of the AccessPolicy.
    pub name: String,
    /// Which pods the policy selects.
    pub client: ClientSelector,
    /// The trust providers, in the order the policy lists them; all must pass.
    pub trust_providers: Vec<NamedTrustProvider>,
    /// What is reached.
    pub server: Server,
    /// The credential provider.
    pub credential_provider: NamedCredentialProvider,
    /// How the workload receives the credential.
    pub delivery: Delivery,
    /// Conditions checked on every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<AccessConditions>,
}

/// A TrustProvider's name and spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct NamedTrustProvider {
    /// Name of the TrustProvider.
    pub name: String,
    /// Its spec at compile time.
    pub spec: TrustProviderSpec,
}

/// A CredentialProvider's name and spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct NamedCredentialProvider {
    /// Name of the CredentialProvider.
    pub name: String,
    /// Its spec at compile time.
    pub spec: CredentialProviderSpec,
}

/// Why a config document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON of the expected shape.
    #[error("config document is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Written by a newer operator.
    #[error("config format version {found} is not supported (this build reads version {CONFIG_FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version in the document.
        found: u32,
    },
    /// The content does not match its hash: truncated or edited by hand.
    #[error("config hash mismatch for namespace {namespace}: document says {stated}, content hashes to {actual}")]
    HashMismatch {
        /// Namespace of the document.
        namespace: String,
        /// Hash written in the document.
        stated: String,
        /// Hash of the content.
        actual: String,
    },
}

impl ConfigError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::HashMismatch { .. } => "hash_mismatch",
        }
    }
}

#[derive(Serialize)]
struct HashedContent<'a> {
    namespace: &'a str,
    policies: &'a [CompiledPolicy],
}

fn content_hash(namespace: &str, policies: &[CompiledPolicy]) -> String {
    let bytes = serde_json::to_vec(&HashedContent { namespace, policies }).expect("config content serializes");
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl NamespaceConfig {
    /// Builds the document for a namespace: sorts the policies by name and hashes them.
    pub fn new(namespace: impl Into<String>, mut policies: Vec<CompiledPolicy>) -> Self {
        let namespace = namespace.into();
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let hash = content_hash(&namespace, &policies);
        Self { format_version: CONFIG_FORMAT_VERSION, namespace, hash, policies }
    }

    /// The document as JSON, as stored in the ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }

    /// Parses a stored document, refusing unknown versions and content that does not
    /// match its hash.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct VersionOnly {
            format_version: u32,
        }
        let version: VersionOnly = serde_json::from_str(text)?;
        if version.format_version != CONFIG_FORMAT_VERSION {
            return Err(ConfigError::UnsupportedVersion { found: version.format_version });
        }
        let config: Self = serde_json::from_str(text)?;
        let actual = content_hash(&config.namespace, &config.policies);
        if actual != config.hash {
            return Err(ConfigError::HashMismatch { namespace: config.namespace, stated: config.hash, actual });
        }
        Ok(config)
    }

    /// The policy of that name.
    pub fn policy(&self, name: &str) -> Option<&CompiledPolicy> {
        self.policies.binary_search_by(|p| p.name.as_str().cmp(name)).ok().map(|i| &self.policies[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{credential::CredentialProviderSpec, trust::TrustProviderSpec};

    fn policy(name: &str) -> CompiledPolicy {
        let trust: TrustProviderSpec =
            serde_json::from_value(serde_json::json!({"kubernetesServiceAccount": {}})).unwrap();
        let cred: CredentialProviderSpec = serde_json::from_value(serde_json::json!({
            "awsSts": {"roleArn": "arn:aws:iam::123456789012:role/reader"}
        }))
        .unwrap();
        CompiledPolicy {
            name: name.into(),
            client: serde_json::from_value(serde_json::json!({"podSelector": {"matchLabels": {"app": name}}})).unwrap(),
            trust_providers: vec![NamedTrustProvider { name: "k8s".into(), spec: trust }],
            server: serde_json::from_value(serde_json::json!({"kind": "aws"})).unwrap(),
            credential_provider: NamedCredentialProvider { name: "s3".into(), spec: cred },
            delivery: Delivery::default(),
            conditions: None,
        }
    }

    #[test]
    fn round_trip_and_hash_are_stable() {
        let a = NamespaceConfig::new("team-a", vec![policy("b"), policy("a")]);
        let b = NamespaceConfig::new("team-a", vec![policy("a"), policy("b")]);
        assert_eq!(a.hash, b.hash, "input order does not matter");
        assert_eq!(a.policies[0].name, "a");
        assert!(a.hash.starts_with("sha256:") && a.hash.len() == 7 + 64);
        let parsed = NamespaceConfig::from_json(&a.to_json()).unwrap();
        assert_eq!(parsed, a);
        assert_eq!(parsed.policy("b").map(|p| p.name.as_str()), Some("b"));
        assert!(parsed.policy("c").is_none());
        let other_ns = NamespaceConfig::new("team-b", vec![policy("a"), policy("b")]);
        assert_ne!(a.hash, other_ns.hash, "the namespace is part of the hash");
    }

    #[test]
    fn tampered_or_foreign_documents_are_refused() {
        let doc = NamespaceConfig::new("team-a", vec![policy("a")]).to_json();
        let tampered = doc.replace("reader", "admin");
        assert_eq!(NamespaceConfig::from_json(&tampered).unwrap_err().metric_label(), "hash_mismatch");
        let newer = doc.replace("\"formatVersion\":1", "\"formatVersion\":2");
        let err = NamespaceConfig::from_json(&newer).unwrap_err();
        assert_eq!(err.metric_label(), "unsupported_version", "{err}");
        assert_eq!(NamespaceConfig::from_json("{not json").unwrap_err().metric_label(), "malformed");
        assert_eq!(NamespaceConfig::from_json("").unwrap_err().metric_label(), "malformed");
    }
}
