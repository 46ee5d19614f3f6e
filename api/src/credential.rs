//! `CredentialProvider`: how the broker obtains a credential for the target.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{GUID_PATTERN, HTTPS_URL_PATTERN, OBJECT_NAME_PATTERN, ProviderStatus, SECRET_KEY_PATTERN, SecretKeyRef},
    duration::Duration,
    secret_store::{AwsSecretsManagerSecret, AzureKeyVaultSecret, GcpSecretManagerSecret, Store},
};

/// How to obtain a credential for the target. Exactly one kind is set. Secret material
/// is only ever referenced (`secretRef`, same namespace), never written inline.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cloudpass.dev",
    version = "v1alpha1",
    kind = "CredentialProvider",
    namespaced,
    status = "ProviderStatus",
    shortname = "cp",
    category = "cloudpass",
    derive = "PartialEq",
    doc = "CredentialProvider tells the cloudpass broker how to obtain a short-lived credential for the target: AWS STS, Entra workload identity federation, Google workload identity federation, OAuth2 client credentials, a broker-signed OIDC token, an API key or username/password from a Secret, or a secret from AWS Secrets Manager, Azure Key Vault or Google Secret Manager read with a federated credential.",
    printcolumn = r#"{"name":"Kind","type":"string","description":"Which kind of credential this provider obtains","jsonPath":".status.providerKind"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Verified","type":"string","description":"Whether a real exchange with the cloud succeeded","jsonPath":".status.conditions[?(@.type==\"Verified\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.awsSts) ? 1 : 0) + (has(self.azureWorkloadIdentity) ? 1 : 0) + (has(self.gcpWorkloadIdentity) ? 1 : 0) + (has(self.oauth2ClientCredentials) ? 1 : 0) + (has(self.oidcToken) ? 1 : 0) + (has(self.apiKey) ? 1 : 0) + (has(self.usernamePassword) ? 1 : 0) + (has(self.awsSecretsManager) ? 1 : 0) + (has(self.azureKeyVault) ? 1 : 0) + (has(self.gcpSecretManager) ? 1 : 0) == 1",
    "message": "exactly one of awsSts, azureWorkloadIdentity, gcpWorkloadIdentity, oauth2ClientCredentials, oidcToken, apiKey, usernamePassword, awsSecretsManager, azureKeyVault or gcpSecretManager must be set"
}]))]
pub struct CredentialProviderSpec {
    /// AWS credentials from `sts:AssumeRoleWithWebIdentity`, presenting a JWT signed by
    /// the cloudpass issuer. The role's trust policy must trust that issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_sts: Option<AwsStsCredential>,
    /// An Entra ID access token from the `client_credentials` grant with a
    /// `client_assertion` signed by the cloudpass issuer (a federated identity credential
    /// on the app registration or user-assigned managed identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_workload_identity: Option<AzureWorkloadIdentityCredential>,
    /// A Google access token from the STS token exchange of a JWT signed by the cloudpass
    /// issuer, optionally impersonating a service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp_workload_identity: Option<GcpWorkloadIdentityCredential>,
    /// An access token from an OAuth2 token endpoint's `client_credentials` grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2_client_credentials: Option<OAuth2ClientCredentials>,
    /// A JWT signed by the cloudpass issuer, for targets that trust the issuer directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_token: Option<OidcTokenCredential>,
    /// A static API key from a Secret, for APIs that offer nothing better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyCredential>,
    /// A username and password from a Secret (e.g. of type `kubernetes.io/basic-auth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_password: Option<UsernamePasswordCredential>,
    /// A secret from AWS Secrets Manager, read with the credentials of an `awsSts`
    /// provider of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_secrets_manager: Option<AwsSecretsManagerSecret>,
    /// A secret from Azure Key Vault, read with the token of an `azureWorkloadIdentity`
    /// provider of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_key_vault: Option<AzureKeyVaultSecret>,
    /// A secret from Google Secret Manager, read with the token of a
    /// `gcpWorkloadIdentity` provider of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp_secret_manager: Option<GcpSecretManagerSecret>,
    /// Whether the operator checks the cloud-side trust of a federated kind with a real
    /// exchange (the `Verified` condition). Default: on.
    #[serde(default, skip_serializing_if = "Verification::is_default")]
    pub verification: Verification,
}

/// The `Verified` check of a federated CredentialProvider.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// `false` turns the check off for this provider (e.g. a cloud whose audit log must
    /// show only workload sign-ins). Default: `true`.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

fn enabled() -> bool {
    true
}

impl Default for Verification {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl Verification {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl CredentialProviderSpec {
    /// The name of the kind that is set (`awsSts`, `apiKey`, ...), as shown in the `Kind`
    /// column. `None` only for a spec the schema would have refused.
    pub fn kind_name(&self) -> Option<&'static str> {
        [
            (self.aws_sts.is_some(), "awsSts"),
            (self.azure_workload_identity.is_some(), "azureWorkloadIdentity"),
            (self.gcp_workload_identity.is_some(), "gcpWorkloadIdentity"),
            (self.oauth2_client_credentials.is_some(), "oauth2ClientCredentials"),
            (self.oidc_token.is_some(), "oidcToken"),
            (self.api_key.is_some(), "apiKey"),
            (self.username_password.is_some(), "usernamePassword"),
            (self.aws_secrets_manager.is_some(), "awsSecretsManager"),
            (self.azure_key_vault.is_some(), "azureKeyVault"),
            (self.gcp_secret_manager.is_some(), "gcpSecretManager"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }

    /// For the federated kinds, what the broker signs and the cloud must trust: the
    /// token's audience (the kind's default unless `audience` is set) and its subject
    /// format. `None` for the kinds that need nothing in a cloud.
    pub fn federation(&self) -> Option<Federation> {
        let (kind, audience, subject) = if let Some(c) = &self.aws_sts {
            ("awsSts", c.audience().to_owned(), c.subject)
        } else if let Some(c) = &self.azure_workload_identity {
            ("azureWorkloadIdentity", c.audience().to_owned(), c.subject)
        } else if let Some(c) = &self.gcp_workload_identity {
            ("gcpWorkloadIdentity", c.audience().into_owned(), c.subject)
        } else if let Some(c) = &self.oidc_token {
            ("oidcToken", c.audience.clone(), c.subject)
        } else {
            return None;
        };
        Some(Federation { kind, audience, subject })
    }

    /// The cloud secret store this provider reads, for the secret-store kinds.
    pub fn store(&self) -> Option<Store<'_>> {
        if let Some(s) = &self.aws_secrets_manager {
            Some(Store::Aws(s))
        } else if let Some(s) = &self.azure_key_vault {
            Some(Store::Azure(s))
        } else {
            self.gcp_secret_manager.as_ref().map(Store::Gcp)
        }
    }

    /// For the secret-store kinds: the name of the provider whose credential reads the
    /// secret.
    pub fn reads_with(&self) -> Option<&str> {
        self.store().map(|s| s.read().credential_provider_ref.name.as_str())
    }

    /// The Secrets this provider reads, so the operator can check them and watch them.
    pub fn secret_refs(&self) -> Vec<SecretKeyRef> {
        let mut refs = Vec::new();
        if let Some(c) = &self.oauth2_client_credentials {
            refs.push(c.client_secret_ref.clone());
        }
        if let Some(c) = &self.api_key {
            refs.push(c.secret_ref.clone());
        }
        if let Some(c) = &self.username_password {
            for key in [&c.secret_ref.username_key, &c.secret_ref.password_key] {
                refs.push(SecretKeyRef { name: c.secret_ref.name.clone(), key: key.clone() });
            }
        }
        refs
    }
}

/// `aud` of the broker's JWT for AWS STS unless `awsSts.audience` says otherwise: the
/// client ID an IAM OIDC provider lists by default.
const AWS_DEFAULT_AUDIENCE: &str = "sts.amazonaws.com";
/// `aud` of the broker's assertion for Entra unless `azureWorkloadIdentity.audience`
/// says otherwise: the audience of a federated identity credential by default.
const AZURE_DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";

/// What a cloud must trust for one federated CredentialProvider (besides the issuer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Federation {
    /// The provider's kind (`awsSts`, ...).
    pub kind: &'static str,
    /// `aud` of every token the broker signs for it.
    pub audience: String,
    /// How `sub` is formed.
    pub subject: SubjectFormat,
}

/// The `sub` claim of the JWT the broker signs for a federated exchange. A cloud's trust
/// policy matches on it, so its format is fixed and namespaced: no workload can make the
/// broker sign a subject of another namespace.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum SubjectFormat {
    /// `system:cloudpass:<namespace>:<credentialprovider>`: one trust entry in the cloud
    /// per CredentialProvider (fits Entra's limit of 20 federated credentials per identity).
    #[default]
    Provider,
    /// `system:cloudpass:<namespace>:<credentialprovider>:<serviceaccount>`: the cloud's
    /// trust policy can tell workloads apart by service account.
    ServiceAccount,
}

impl SubjectFormat {
    /// The subject for a workload, following this format.
    pub fn subject(self, namespace: &str, provider: &str, service_account: &str) -> String {
        match self {
            Self::Provider => format!("system:cloudpass:{namespace}:{provider}"),
            Self::ServiceAccount => format!("system:cloudpass:{namespace}:{provider}:{service_account}"),
        }
    }
}

fn default_aws_region() -> String {
    "us-east-1".to_owned()
}

fn default_aws_session_duration() -> Duration {
    Duration::from_secs(3600)
}

fn default_aws_session_name() -> String {
    "cloudpass-{namespace}-{pod}".to_owned()
}

/// `sts:AssumeRoleWithWebIdentity` with a broker-signed JWT.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsStsCredential {
    /// ARN of the role to assume, e.g. `arn:aws:iam::123456789012:role/reader`.
    #[schemars(length(max = 2048), regex(pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]+$"))]
    pub role_arn: String,
    /// AWS region of the STS endpoint. Default: `us-east-1`.
    #[serde(default = "default_aws_region")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: String,
    /// STS endpoint, for private (VPC) or FIPS endpoints. Default:
    /// `https://sts.<region>.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub sts_endpoint: Option<String>,
    /// Lifetime of the session (`DurationSeconds`), from 15m to 12h; the role's maximum
    /// session duration must allow it. Default: `1h`.
    #[serde(default = "default_aws_session_duration")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "duration(self) >= duration('15m') && duration(self) <= duration('12h')", "message": "sessionDuration must be between 15m and 12h"}]))]
    pub session_duration: Duration,
    /// `RoleSessionName`, shown in CloudTrail. Placeholders: `{namespace}`,
    /// `{serviceAccount}`, `{pod}`, `{policy}`; other characters from `[A-Za-z0-9+=,.@_-]`.
    /// The result is cut to 64 characters. Default: `cloudpass-{namespace}-{pod}`.
    #[serde(default = "default_aws_session_name")]
    #[schemars(
        length(min = 2, max = 128),
        regex(pattern = r"^([A-Za-z0-9+=,.@_-]|\{(namespace|serviceAccount|pod|policy)\})+$")
    )]
    pub session_name: String,
    /// `aud` of the broker-signed JWT; it must be in the IAM OIDC provider's client ID
    /// list. Default: `sts.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub audience: Option<String>,
    /// `sub` of the broker-signed JWT. Default: `Provider`.
    #[serde(default)]
    pub subject: SubjectFormat,
}

/// Entra ID `client_credentials` with a broker-signed `client_assertion`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureWorkloadIdentityCredential {
    /// Entra tenant ID (GUID) of the app registration or managed identity.
    #[schemars(regex(pattern = GUID_PATTERN))]
    pub tenant_id: String,
    /// Client (application) ID (GUID) that carries the federated identity credential.
    #[schemars(regex(pattern = GUID_PATTERN))]
    pub client_id: String,
    /// Entra authority host. Default: `https://login.microsoftonline.com`; set it for
    /// sovereign clouds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub authority_host: Option<String>,
    /// `aud` of the broker-signed assertion; must equal the federated credential's
    /// audience. Default: `api://AzureADTokenExchange`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub audience: Option<String>,
    /// `sub` of the broker-signed assertion. Default: `Provider`.
    #[serde(default)]
    pub subject: SubjectFormat,
}

impl AwsStsCredential {
    /// `aud` of the broker's JWT: `audience`, else `sts.amazonaws.com`.
    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(AWS_DEFAULT_AUDIENCE)
    }
}

impl AzureWorkloadIdentityCredential {
    /// `aud` of the broker's assertion: `audience`, else `api://AzureADTokenExchange`.
    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(AZURE_DEFAULT_AUDIENCE)
    }
}

impl GcpWorkloadIdentityCredential {
    /// `aud` of the broker's JWT: `audience`, else the provider's full resource URL.
    pub fn audience(&self) -> std::borrow::Cow<'_, str> {
        match &self.audience {
            Some(a) => a.into(),
            None => format!("https://iam.googleapis.com/{}", self.workload_identity_provider).into(),
        }
    }
}

fn default_gcp_token_lifetime() -> Duration {
    Duration::from_secs(3600)
}

/// Google STS token exchange of a broker-signed JWT, optionally followed by
/// `generateAccessToken` for a service account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcpWorkloadIdentityCredential {
    /// Resource name of the workload identity pool provider:
    /// `projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>`.
    /// The STS `audience` is `//iam.googleapis.com/` followed by it.
    #[schemars(
        length(max = 512),
        regex(
            pattern = r"^projects/[0-9]+/locations/global/workloadIdentityPools/[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32}$"
        )
    )]
    pub workload_identity_provider: String,
    /// `aud` of the broker-signed JWT; must be an allowed audience of the provider.
    /// Default: `https://iam.googleapis.com/` followed by `workloadIdentityProvider`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub audience: Option<String>,
    /// Service account to impersonate with the federated token (`generateAccessToken`);
    /// the pool principal needs `roles/iam.workloadIdentityUser` on it. Omit it to use the
    /// federated token directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254), regex(pattern = r"^[a-z0-9-]+@[a-z0-9.-]+\.iam\.gserviceaccount\.com$"))]
    pub service_account_email: Option<String>,
    /// Project ID the workload sees as its own (metadata `project/project-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$"))]
    pub project_id: Option<String>,
    /// Lifetime of an impersonated token, from 10m to 12h (over 1h needs the
    /// `iam.allowServiceAccountCredentialLifetimeExtension` org policy). Default: `1h`.
    #[serde(default = "default_gcp_token_lifetime")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "duration(self) >= duration('10m') && duration(self) <= duration('12h')", "message": "tokenLifetime must be between 10m and 12h"}]))]
    pub token_lifetime: Duration,
    /// Token endpoint of Google STS. Default: `https://sts.googleapis.com/v1/token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub sts_endpoint: Option<String>,
    /// Base URL of the IAM credentials API. Default: `https://iamcredentials.googleapis.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub iam_credentials_endpoint: Option<String>,
    /// `sub` of the broker-signed JWT. Default: `Provider`.
    #[serde(default)]
    pub subject: SubjectFormat,
}

/// How an OAuth2 client authenticates at the token endpoint (RFC 6749 section 2.3.1).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ClientAuthentication {
    /// HTTP Basic authentication (`client_secret_basic`).
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    ClientSecretPost,
}

/// OAuth2 `client_credentials` grant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2ClientCredentials {
    /// Token endpoint URL.
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub token_url: String,
    /// Client ID.
    #[schemars(length(min = 1, max = 256))]
    pub client_id: String,
    /// Secret key holding the client secret.
    pub client_secret_ref: SecretKeyRef,
    /// Scopes to request; none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256), regex(pattern = r"^[!#-\[\]-~]+$")))]
    pub scopes: Vec<String>,
    /// `audience` form parameter, for servers that require one (e.g. Auth0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub audience: Option<String>,
    /// How the client authenticates. Default: `ClientSecretBasic`.
    #[serde(default)]
    pub client_authentication: ClientAuthentication,
}

fn default_oidc_token_lifetime() -> Duration {
    Duration::from_secs(900)
}

/// A JWT signed by the cloudpass issuer and handed to the workload as is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OidcTokenCredential {
    /// `aud` of the token.
    #[schemars(length(min = 1, max = 512))]
    pub audience: String,
    /// Lifetime of the token, from 5m to 1h. Default: `15m`.
    #[serde(default = "default_oidc_token_lifetime")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "duration(self) >= duration('5m') && duration(self) <= duration('1h')", "message": "lifetime must be between 5m and 1h"}]))]
    pub lifetime: Duration,
    /// `sub` of the token. Default: `Provider`.
    #[serde(default)]
    pub subject: SubjectFormat,
}

/// An API key from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyCredential {
    /// Secret key holding the API key.
    pub secret_ref: SecretKeyRef,
}

/// A username and password from one Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsernamePasswordCredential {
    /// The Secret and its keys.
    pub secret_ref: BasicAuthSecretRef,
}

fn default_username_key() -> String {
    "username".to_owned()
}

fn default_password_key() -> String {
    "password".to_owned()
}

/// A Secret holding a username and a password; the default keys are those of the
/// `kubernetes.io/basic-auth` Secret type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuthSecretRef {
    /// Name of the Secret in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// Key of the username. Default: `username`.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub username_key: String,
    /// Key of the password. Default: `password`.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub password_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_namespaced() {
        assert_eq!(SubjectFormat::Provider.subject("team-a", "s3", "app"), "system:cloudpass:team-a:s3");
        assert_eq!(SubjectFormat::ServiceAccount.subject("team-a", "s3", "app"), "system:cloudpass:team-a:s3:app");
    }

    #[test]
    fn secret_refs_cover_basic_auth_keys() {
        let spec: CredentialProviderSpec =
            serde_json::from_value(serde_json::json!({"usernamePassword": {"secretRef": {"name": "db"}}})).unwrap();
        let keys: Vec<_> = spec.secret_refs().into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["username", "password"]);
        assert_eq!(spec.kind_name(), Some("usernamePassword"));
    }
}
