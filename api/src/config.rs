//! The compiled config document: every Ready AccessPolicy of one namespace with its
//! providers resolved, as the operator publishes it (in a ConfigMap in its own namespace)
//! for the webhook and the broker.
//!
//! The document is deterministic: policies are sorted by name, providers are keyed by
//! name, and the hash covers the exact bytes of the content, so an operator restart or a
//! resync of unchanged objects produces the same hash and no write. Each provider is
//! stored once, however many policies use it (1,000 policies fit in about a third of the
//! 1 MiB object limit). It holds no secret values, only references.

use std::collections::BTreeMap;

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
    /// `sha256:<hex>` over the canonical JSON of namespace, providers and policies.
    pub hash: String,
    /// Specs of the TrustProviders the policies use, by name.
    pub trust_providers: BTreeMap<String, TrustProviderSpec>,
    /// Specs of the CredentialProviders the policies use, by name.
    pub credential_providers: BTreeMap<String, CredentialProviderSpec>,
    /// Ready policies, sorted by name.
    pub policies: Vec<CompiledPolicy>,
}

/// One Ready AccessPolicy; its providers are in the document's provider maps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPolicy {
    /// Name of the AccessPolicy.
    pub name: String,
    /// Which pods the policy selects.
    pub client: ClientSelector,
    /// Names of the trust providers, in the order the policy lists them; all must pass.
    pub trust_providers: Vec<String>,
    /// What is reached.
    pub server: Server,
    /// Name of the credential provider.
    pub credential_provider: String,
    /// How the workload receives the credential.
    pub delivery: Delivery,
    /// Conditions checked on every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<AccessConditions>,
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
    /// A policy names a provider the document does not hold.
    #[error("config for namespace {namespace}: policy {policy} uses {provider}, which the document does not hold")]
    DanglingReference {
        /// Namespace of the document.
        namespace: String,
        /// The policy.
        policy: String,
        /// The missing provider.
        provider: String,
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
            Self::DanglingReference { .. } => "dangling_reference",
        }
    }
}

#[derive(Serialize)]
struct HashedContent<'a> {
    namespace: &'a str,
    trust_providers: &'a BTreeMap<String, TrustProviderSpec>,
    credential_providers: &'a BTreeMap<String, CredentialProviderSpec>,
    policies: &'a [CompiledPolicy],
}

/// What one policy's hash covers: the policy as compiled and the providers it uses.
#[derive(Serialize)]
struct HashedPolicy<'a> {
    namespace: &'a str,
    policy: &'a CompiledPolicy,
    trust_providers: BTreeMap<&'a str, &'a TrustProviderSpec>,
    credential_provider: Option<&'a CredentialProviderSpec>,
    /// The provider a secret-store kind reads with (absent otherwise, so that the hashes
    /// of other policies are what they were before the secret-store kinds).
    #[serde(skip_serializing_if = "Option::is_none")]
    reads_with: Option<&'a CredentialProviderSpec>,
}

fn content_hash(config: &NamespaceConfig) -> String {
    sha256_of(&HashedContent {
        namespace: &config.namespace,
        trust_providers: &config.trust_providers,
        credential_providers: &config.credential_providers,
        policies: &config.policies,
    })
}

/// `sha256:<hex>` of the JSON of `content`.
fn sha256_of(content: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(content).expect("config content serializes");
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl NamespaceConfig {
    /// Builds the document for a namespace: keeps the providers the policies use, sorts
    /// the policies by name and hashes everything.
    pub fn new(
        namespace: impl Into<String>,
        mut trust_providers: BTreeMap<String, TrustProviderSpec>,
        mut credential_providers: BTreeMap<String, CredentialProviderSpec>,
        mut policies: Vec<CompiledPolicy>,
    ) -> Self {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        trust_providers.retain(|name, _| policies.iter().any(|p| p.trust_providers.contains(name)));
        // The providers the policies use, and those their secret-store kinds read with.
        let used: Vec<String> = policies
            .iter()
            .flat_map(|p| {
                let spec = credential_providers.get(&p.credential_provider);
                [Some(p.credential_provider.clone()), spec.and_then(|s| s.reads_with()).map(str::to_owned)]
            })
            .flatten()
            .collect();
        credential_providers.retain(|name, _| used.contains(name));
        let mut config = Self {
            format_version: CONFIG_FORMAT_VERSION,
            namespace: namespace.into(),
            hash: String::new(),
            trust_providers,
            credential_providers,
            policies,
        };
        config.hash = content_hash(&config);
        config
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
        let actual = content_hash(&config);
        if actual != config.hash {
            return Err(ConfigError::HashMismatch { namespace: config.namespace, stated: config.hash, actual });
        }
        for policy in &config.policies {
            let missing = policy
                .trust_providers
                .iter()
                .find(|t| !config.trust_providers.contains_key(*t))
                .map(|t| format!("TrustProvider {t}"))
                .or_else(|| {
                    (!config.credential_providers.contains_key(&policy.credential_provider))
                        .then(|| format!("CredentialProvider {}", policy.credential_provider))
                });
            if let Some(provider) = missing {
                return Err(ConfigError::DanglingReference {
                    namespace: config.namespace.clone(),
                    policy: policy.name.clone(),
                    provider,
                });
            }
        }
        Ok(config)
    }

    /// The content hash of one policy as compiled, with the providers it uses: it changes
    /// when what the webhook and the broker do for this policy changes, and only then
    /// (the policy's `status.configHash`), so an edit of one policy rewrites no other
    /// policy's status.
    pub fn policy_hash(&self, name: &str) -> Option<String> {
        let policy = self.policy(name)?;
        let trust_providers = (policy.trust_providers.iter())
            .filter_map(|t| self.trust_providers.get_key_value(t))
            .map(|(name, spec)| (name.as_str(), spec))
            .collect();
        Some(sha256_of(&HashedPolicy {
            namespace: &self.namespace,
            policy,
            trust_providers,
            credential_provider: self.credential_providers.get(&policy.credential_provider),
            reads_with: (self.credential_providers.get(&policy.credential_provider))
                .and_then(|spec| spec.reads_with())
                .and_then(|name| self.credential_providers.get(name)),
        }))
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
        CompiledPolicy {
            name: name.into(),
            client: serde_json::from_value(serde_json::json!({"podSelector": {"matchLabels": {"app": name}}})).unwrap(),
            trust_providers: vec!["k8s".into()],
            server: serde_json::from_value(serde_json::json!({"kind": "aws"})).unwrap(),
            credential_provider: "s3".into(),
            delivery: Delivery::default(),
            conditions: None,
        }
    }

    fn config(namespace: &str, policies: Vec<CompiledPolicy>) -> NamespaceConfig {
        let trust: TrustProviderSpec =
            serde_json::from_value(serde_json::json!({"kubernetesServiceAccount": {}})).unwrap();
        let cred: CredentialProviderSpec = serde_json::from_value(serde_json::json!({
            "awsSts": {"roleArn": "arn:aws:iam::123456789012:role/reader"}
        }))
        .unwrap();
        let unused = trust.clone();
        NamespaceConfig::new(
            namespace,
            [("k8s".to_owned(), trust), ("unused".to_owned(), unused)].into(),
            [("s3".to_owned(), cred)].into(),
            policies,
        )
    }

    #[test]
    fn round_trip_and_hash_are_stable() {
        let a = config("team-a", vec![policy("b"), policy("a")]);
        let b = config("team-a", vec![policy("a"), policy("b")]);
        assert_eq!(a.trust_providers.keys().collect::<Vec<_>>(), ["k8s"], "unused providers are dropped");
        assert_eq!(a.hash, b.hash, "input order does not matter");
        assert_eq!(a.policies[0].name, "a");
        assert!(a.hash.starts_with("sha256:") && a.hash.len() == 7 + 64);
        let parsed = NamespaceConfig::from_json(&a.to_json()).unwrap();
        assert_eq!(parsed, a);
        assert_eq!(parsed.policy("b").map(|p| p.name.as_str()), Some("b"));
        assert!(parsed.policy("c").is_none());
        let other_ns = config("team-b", vec![policy("a"), policy("b")]);
        assert_ne!(a.hash, other_ns.hash, "the namespace is part of the hash");
    }

    #[test]
    fn a_policys_hash_changes_with_it_and_its_providers_only() {
        let before = config("team-a", vec![policy("a"), policy("b")]);
        let mut edited_b = policy("b");
        edited_b.client =
            serde_json::from_value(serde_json::json!({"podSelector": {"matchLabels": {"app": "b2"}}})).unwrap();
        let after = config("team-a", vec![policy("a"), edited_b]);
        assert_ne!(before.hash, after.hash);
        assert_eq!(before.policy_hash("a"), after.policy_hash("a"), "another policy's edit leaves it alone");
        assert_ne!(before.policy_hash("b"), after.policy_hash("b"));
        let mut new_role = after.clone();
        let s3 = new_role.credential_providers.get_mut("s3").unwrap();
        s3.aws_sts.as_mut().unwrap().role_arn = "arn:aws:iam::123456789012:role/writer".into();
        assert_ne!(after.policy_hash("a"), new_role.policy_hash("a"), "its provider is part of it");
        assert!(before.policy_hash("c").is_none());
    }

    #[test]
    fn tampered_or_foreign_documents_are_refused() {
        let doc = config("team-a", vec![policy("a")]).to_json();
        let tampered = doc.replace("reader", "admin");
        assert_eq!(NamespaceConfig::from_json(&tampered).unwrap_err().metric_label(), "hash_mismatch");
        let newer = doc.replace("\"formatVersion\":1", "\"formatVersion\":2");
        let err = NamespaceConfig::from_json(&newer).unwrap_err();
        assert_eq!(err.metric_label(), "unsupported_version", "{err}");
        assert_eq!(NamespaceConfig::from_json("{not json").unwrap_err().metric_label(), "malformed");
        assert_eq!(NamespaceConfig::from_json("").unwrap_err().metric_label(), "malformed");
        let mut dangling = config("team-a", vec![policy("a")]);
        dangling.credential_providers.clear();
        dangling.hash = content_hash(&dangling);
        let err = NamespaceConfig::from_json(&dangling.to_json()).unwrap_err();
        assert_eq!(err.metric_label(), "dangling_reference", "{err}");
    }
}
