//! CredentialProvider kinds that read a secret from a cloud's secret store (AWS Secrets
//! Manager, Azure Key Vault, Google Secret Manager) with the federated credential of
//! another CredentialProvider of that cloud: no key to the store is kept in the cluster.
//! The broker hands the value out as an API key; it never logs, audits or shows it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{HTTPS_URL_PATTERN, LocalObjectReference},
    duration::Duration,
};

fn default_refresh_interval() -> Duration {
    Duration::from_secs(300)
}

/// What every secret-store kind shares: whose credential reads it, which part of it is
/// handed out, and how long the broker serves a value before reading it again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRead {
    /// The CredentialProvider in this namespace whose federated credential reads the
    /// secret: `awsSts` for Secrets Manager, `azureWorkloadIdentity` for Key Vault,
    /// `gcpWorkloadIdentity` for Secret Manager. Its subject is the workload's, so the
    /// store's access policy can tell workloads apart as the cloud's trust does.
    pub credential_provider_ref: LocalObjectReference,
    /// When the secret is a JSON object: the top-level key whose value is handed out
    /// (a string, or any other JSON value as its text). Default: the whole secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub json_key: Option<String>,
    /// How long a value is served before the broker reads the store again; a new version
    /// reaches workloads within it. From 10s to 24h. Default: `5m`.
    #[serde(default = "default_refresh_interval")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "duration(self) >= duration('10s') && duration(self) <= duration('24h')", "message": "refreshInterval must be between 10s and 24h"}]))]
    pub refresh_interval: Duration,
}

/// `secretsmanager:GetSecretValue`, signed with the credentials of an `awsSts` provider.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!(has(self.versionId) && has(self.versionStage))", "message": "set versionId or versionStage, not both"}]))]
pub struct AwsSecretsManagerSecret {
    /// Name or ARN of the secret.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^[A-Za-z0-9/_+=.@:-]+$"))]
    pub secret_id: String,
    /// Staging label of the version. Default: `AWSCURRENT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub version_stage: Option<String>,
    /// ID of one version (pinned: rotation does not change it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 32, max = 64))]
    pub version_id: Option<String>,
    /// Region of the secret. Default: the region of the `awsSts` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
    /// Endpoint, for private (VPC) or FIPS endpoints. Default:
    /// `https://secretsmanager.<region>.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub endpoint: Option<String>,
    /// Whose credential reads it, what is handed out, how often it is read.
    #[serde(flatten)]
    pub read: SecretRead,
}

/// `GET {vaultUrl}/secrets/{name}/{version}`, with an Entra token of an
/// `azureWorkloadIdentity` provider for `https://vault.azure.net`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureKeyVaultSecret {
    /// The vault, e.g. `https://orders.vault.azure.net`.
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub vault_url: String,
    /// Name of the secret.
    #[schemars(length(min = 1, max = 127), regex(pattern = r"^[0-9a-zA-Z-]+$"))]
    pub name: String,
    /// Version (32 hex digits), pinned. Default: the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{32}$"))]
    pub version: Option<String>,
    /// Whose credential reads it, what is handed out, how often it is read.
    #[serde(flatten)]
    pub read: SecretRead,
}

fn default_gcp_version() -> String {
    "latest".to_owned()
}

/// `versions/{version}:access`, with a Google token of a `gcpWorkloadIdentity` provider.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcpSecretManagerSecret {
    /// Resource name of the secret: `projects/<project>/secrets/<secret>`.
    #[schemars(length(max = 512), regex(pattern = r"^projects/[a-z0-9-]{1,63}/secrets/[A-Za-z0-9_-]{1,255}$"))]
    pub secret: String,
    /// Version number, or `latest`. Default: `latest`.
    #[serde(default = "default_gcp_version")]
    #[schemars(regex(pattern = r"^(latest|[1-9][0-9]{0,18})$"))]
    pub version: String,
    /// Base URL of the Secret Manager API. Default: `https://secretmanager.googleapis.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub endpoint: Option<String>,
    /// Whose credential reads it, what is handed out, how often it is read.
    #[serde(flatten)]
    pub read: SecretRead,
}

/// Which secret store a kind reads and the federated kind its credential must be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Store<'a> {
    /// AWS Secrets Manager.
    Aws(&'a AwsSecretsManagerSecret),
    /// Azure Key Vault.
    Azure(&'a AzureKeyVaultSecret),
    /// Google Secret Manager.
    Gcp(&'a GcpSecretManagerSecret),
}

impl<'a> Store<'a> {
    /// What the three kinds share.
    pub fn read(&self) -> &'a SecretRead {
        match self {
            Self::Aws(s) => &s.read,
            Self::Azure(s) => &s.read,
            Self::Gcp(s) => &s.read,
        }
    }

    /// The kind the referenced CredentialProvider must be.
    pub fn federated_kind(&self) -> &'static str {
        match self {
            Self::Aws(_) => "awsSts",
            Self::Azure(_) => "azureWorkloadIdentity",
            Self::Gcp(_) => "gcpWorkloadIdentity",
        }
    }

    /// The secret as the audit record names it (never its value).
    pub fn describe(&self) -> String {
        match self {
            Self::Aws(s) => format!("secretsmanager:{}", s.secret_id),
            Self::Azure(s) => format!("{}/secrets/{}", s.vault_url.trim_end_matches('/'), s.name),
            Self::Gcp(s) => s.secret.clone(),
        }
    }
}

/// The part of a secret handed out: the whole text, or the value of `json_key` when the
/// secret is a JSON object. The error names the key, never the value.
pub fn extract(value: &str, json_key: Option<&str>) -> Result<String, String> {
    let Some(key) = json_key else { return Ok(value.to_owned()) };
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(value)
        .map_err(|_| format!("jsonKey {key:?} is set but the secret is not a JSON object"))?;
    match object.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Null) | None => Err(format!("the secret has no key {key:?}")),
        Some(other) => Ok(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_key_extracts_one_value_and_errors_name_no_value() {
        assert_eq!(extract("s3cr3t", None).unwrap(), "s3cr3t");
        let json = r#"{"username":"app","password":"pw-1","port":5432}"#;
        assert_eq!(extract(json, Some("password")).unwrap(), "pw-1");
        assert_eq!(extract(json, Some("port")).unwrap(), "5432");
        let missing = extract(json, Some("token")).unwrap_err();
        assert!(missing.contains("token") && !missing.contains("pw-1"), "{missing}");
        let not_json = extract("pw-2", Some("password")).unwrap_err();
        assert!(!not_json.contains("pw-2"), "{not_json}");
    }
}
