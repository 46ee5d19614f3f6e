//! "This delivery fits this credential": the one home of the rule. The operator applies
//! it to a policy's CredentialProvider kind when it evaluates the policy, the agent to
//! the credential itself when the broker answers, so a policy the operator calls Ready
//! is one whose credential the agent can deliver, and both say why not in the same words.

use crate::agent::AgentEndpoint;
use crate::broker::Credential;
use crate::credential::CredentialProviderSpec;
use crate::policy::{AccessPolicySpec, ServerKind};

/// What a credential is, as the broker sends it ([`Credential`]'s variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialShape {
    /// AWS temporary credentials.
    Aws,
    /// An OAuth2 access token.
    AccessToken,
    /// A JWT signed by the cloudpass issuer.
    Jwt,
    /// An API key.
    ApiKey,
    /// A username and password.
    UsernamePassword,
}

impl CredentialShape {
    /// The name as the broker's answer tags it (`aws`, `accessToken`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aws => "aws",
            Self::AccessToken => "accessToken",
            Self::Jwt => "jwt",
            Self::ApiKey => "apiKey",
            Self::UsernamePassword => "usernamePassword",
        }
    }
}

impl Credential {
    /// What this credential is.
    pub fn shape(&self) -> CredentialShape {
        match self {
            Self::Aws { .. } => CredentialShape::Aws,
            Self::AccessToken { .. } => CredentialShape::AccessToken,
            Self::Jwt { .. } => CredentialShape::Jwt,
            Self::ApiKey { .. } => CredentialShape::ApiKey,
            Self::UsernamePassword { .. } => CredentialShape::UsernamePassword,
        }
    }
}

/// How a credential reaches the workload: one delivery of a policy, or the endpoint the
/// agent serves for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// `sdkEndpoint` of a policy whose server kind is `aws`: the container-credentials endpoint.
    AwsContainerCredentials,
    /// `sdkEndpoint` of a policy whose server kind is `azure`: the managed-identity endpoint.
    AzureManagedIdentity,
    /// `sdkEndpoint` of a policy whose server kind is `gcp`: the metadata server.
    GcpMetadata,
    /// `sdkEndpoint` of a policy whose server kind is `http`, which has no SDK endpoint.
    NoSdkEndpoint,
    /// `awsSigV4`: the proxy signing requests.
    AwsSigV4,
    /// `httpHeader`: the proxy setting a header with this format.
    HttpHeader {
        /// The header's format, with `{token}` or `{basic}`.
        format: &'a str,
    },
    /// `file`: a file in the pod's in-memory volume.
    File,
}

/// A delivery that cannot carry a credential: the reason, which names no value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Misfit(String);

/// Which CredentialProvider kinds, giving which credential, each delivery accepts: the
/// table both checks read.
fn accepted(delivery: Delivery<'_>) -> &'static [(&'static str, CredentialShape)] {
    use CredentialShape as S;
    match delivery {
        Delivery::AwsContainerCredentials | Delivery::AwsSigV4 => &[("awsSts", S::Aws)],
        Delivery::AzureManagedIdentity => &[("azureWorkloadIdentity", S::AccessToken)],
        Delivery::GcpMetadata => &[("gcpWorkloadIdentity", S::AccessToken), ("oidcToken", S::Jwt)],
        Delivery::NoSdkEndpoint => &[],
        Delivery::HttpHeader { format } if uses_basic(format) => &[("usernamePassword", S::UsernamePassword)],
        // The cloud credentials too: AWS in the SDKs' own file formats, access tokens for
        // tools that read one from a file (`gcloud --access-token-file`, `curl -H @file`).
        Delivery::File => &[
            ("apiKey", S::ApiKey),
            ("usernamePassword", S::UsernamePassword),
            ("oauth2ClientCredentials", S::AccessToken),
            ("oidcToken", S::Jwt),
            ("awsSecretsManager", S::ApiKey),
            ("azureKeyVault", S::ApiKey),
            ("gcpSecretManager", S::ApiKey),
            ("awsSts", S::Aws),
            ("azureWorkloadIdentity", S::AccessToken),
            ("gcpWorkloadIdentity", S::AccessToken),
        ],
        Delivery::HttpHeader { .. } => &[
            ("azureWorkloadIdentity", S::AccessToken),
            ("gcpWorkloadIdentity", S::AccessToken),
            ("oauth2ClientCredentials", S::AccessToken),
            ("oidcToken", S::Jwt),
            ("apiKey", S::ApiKey),
            ("awsSecretsManager", S::ApiKey),
            ("azureKeyVault", S::ApiKey),
            ("gcpSecretManager", S::ApiKey),
        ],
    }
}

/// The article of a kind's name as it is said: "an awsSts", "a usernamePassword".
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o']) { "an" } else { "a" }
}

fn uses_basic(format: &str) -> bool {
    format.contains("{basic}")
}

impl<'a> Delivery<'a> {
    /// The deliveries a policy asks for.
    pub fn of_policy(spec: &'a AccessPolicySpec) -> Vec<Self> {
        let mut out = Vec::new();
        if spec.delivery.sdk_endpoint.is_some() {
            out.push(match spec.server.kind {
                ServerKind::Aws => Self::AwsContainerCredentials,
                ServerKind::Azure => Self::AzureManagedIdentity,
                ServerKind::Gcp => Self::GcpMetadata,
                ServerKind::Http => Self::NoSdkEndpoint,
            });
        }
        if spec.delivery.aws_sig_v4.is_some() {
            out.push(Self::AwsSigV4);
        }
        if let Some(header) = &spec.delivery.http_header {
            out.push(Self::HttpHeader { format: &header.format });
        }
        if spec.delivery.file.is_some() {
            out.push(Self::File);
        }
        out
    }

    /// The delivery an agent endpoint serves.
    pub fn of_endpoint(endpoint: &'a AgentEndpoint) -> Self {
        match endpoint {
            AgentEndpoint::AwsContainerCredentials { .. } => Self::AwsContainerCredentials,
            AgentEndpoint::AzureManagedIdentity { .. } => Self::AzureManagedIdentity,
            AgentEndpoint::GcpMetadata { .. } => Self::GcpMetadata,
            AgentEndpoint::AwsSigV4 { .. } => Self::AwsSigV4,
            AgentEndpoint::HttpHeader { format, .. } => Self::HttpHeader { format },
            AgentEndpoint::File { .. } => Self::File,
        }
    }

    /// The delivery as a user reads it in a message.
    fn describe(self) -> String {
        match self {
            Self::AwsContainerCredentials => "delivery sdkEndpoint for server kind aws".into(),
            Self::AzureManagedIdentity => "delivery sdkEndpoint for server kind azure".into(),
            Self::GcpMetadata => "delivery sdkEndpoint for server kind gcp".into(),
            Self::NoSdkEndpoint => "delivery sdkEndpoint for server kind http".into(),
            Self::AwsSigV4 => "delivery awsSigV4, which signs with AWS credentials,".into(),
            Self::HttpHeader { format } if uses_basic(format) => "httpHeader format with {basic}".into(),
            Self::HttpHeader { .. } => "httpHeader format with {token}".into(),
            Self::File => "delivery file".into(),
        }
    }

    /// What would fit, for a message: `an awsSts`, `a usernamePassword`, ...
    fn wanted(self) -> String {
        let kinds: Vec<&str> = accepted(self).iter().map(|(kind, _)| *kind).collect();
        match kinds.as_slice() {
            [] => "a cloud server kind (aws, azure or gcp)".into(),
            [one] => format!("{} {one}", article(one)),
            [rest @ .., last] => format!("one of {} or {last}", rest.join(", ")),
        }
    }

    /// Whether this delivery can carry what a CredentialProvider of this spec obtains,
    /// checked when a policy is evaluated. `name` is the provider's name, for the message.
    pub fn fits_provider(self, name: &str, spec: &CredentialProviderSpec) -> Result<(), Misfit> {
        let kind = spec.kind_name().unwrap_or("none");
        if accepted(self).iter().any(|(k, _)| *k == kind) {
            return Ok(());
        }
        Err(Misfit(match self {
            Self::HttpHeader { .. } if kind == "awsSts" => {
                format!("delivery httpHeader cannot carry AWS credentials from {name}; use awsSigV4 or sdkEndpoint")
            }
            Self::HttpHeader { .. } if kind == "usernamePassword" => {
                format!("{name} is usernamePassword; its httpHeader format must use {{basic}}, not {{token}}")
            }
            _ => format!("{} needs {} CredentialProvider, but {name} is {kind}", self.describe(), self.wanted()),
        }))
    }

    /// Whether this delivery can carry this credential, checked when the broker answers,
    /// so that the agent never reports ready with a credential every request would fail on.
    pub fn fits_credential(self, credential: &Credential) -> Result<(), Misfit> {
        let shape = credential.shape();
        if accepted(self).iter().any(|(_, s)| *s == shape) {
            return Ok(());
        }
        Err(Misfit(format!(
            "the broker sent {} {} credential, which the {} cannot carry",
            article(shape.as_str()),
            shape.as_str(),
            self.describe().trim_end_matches(','),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;

    fn provider(kind: &str) -> CredentialProviderSpec {
        let body = match kind {
            "awsSts" => serde_json::json!({"roleArn": "arn:aws:iam::123456789012:role/r", "region": "eu-west-1"}),
            "apiKey" => serde_json::json!({"secretRef": {"name": "s", "key": "k"}}),
            "usernamePassword" => serde_json::json!({"secretRef": {"name": "s"}}),
            "oidcToken" => serde_json::json!({"audience": "a"}),
            _ => unreachable!("{kind}"),
        };
        serde_json::from_value(serde_json::json!({ kind: body })).expect(kind)
    }

    #[test]
    fn every_provider_kind_fits_the_deliveries_whose_credential_it_gives() {
        let header = Delivery::HttpHeader { format: "Bearer {token}" };
        let basic = Delivery::HttpHeader { format: "Basic {basic}" };
        for (delivery, kind, fits) in [
            (Delivery::AwsContainerCredentials, "awsSts", true),
            (Delivery::AwsSigV4, "awsSts", true),
            (Delivery::AwsSigV4, "apiKey", false),
            (Delivery::AzureManagedIdentity, "awsSts", false),
            (Delivery::GcpMetadata, "oidcToken", true),
            (Delivery::NoSdkEndpoint, "apiKey", false),
            (header, "apiKey", true),
            (header, "oidcToken", true),
            (header, "awsSts", false),
            (header, "usernamePassword", false),
            (basic, "usernamePassword", true),
            (basic, "apiKey", false),
            (Delivery::File, "apiKey", true),
            (Delivery::File, "usernamePassword", true),
            (Delivery::File, "oidcToken", true),
            (Delivery::File, "awsSts", true),
        ] {
            let got = delivery.fits_provider("p", &provider(kind));
            assert_eq!(got.is_ok(), fits, "{delivery:?} {kind}: {got:?}");
        }
    }

    #[test]
    fn misfits_say_what_would_fit() {
        let said = |d: Delivery<'_>, kind| d.fits_provider("p", &provider(kind)).unwrap_err().to_string();
        assert_eq!(
            said(Delivery::AwsContainerCredentials, "apiKey"),
            "delivery sdkEndpoint for server kind aws needs an awsSts CredentialProvider, but p is apiKey"
        );
        assert_eq!(
            said(Delivery::HttpHeader { format: "{token}" }, "awsSts"),
            "delivery httpHeader cannot carry AWS credentials from p; use awsSigV4 or sdkEndpoint"
        );
        assert_eq!(
            said(Delivery::HttpHeader { format: "Basic {basic}" }, "apiKey"),
            "httpHeader format with {basic} needs a usernamePassword CredentialProvider, but p is apiKey"
        );
        assert!(said(Delivery::GcpMetadata, "apiKey").contains("one of gcpWorkloadIdentity or oidcToken"));
        assert!(said(Delivery::NoSdkEndpoint, "apiKey").contains("needs a cloud server kind"));
    }

    #[test]
    fn the_agents_check_reads_the_same_table_as_the_operators() {
        let aws = Credential::Aws {
            access_key_id: "A".into(),
            secret_access_key: SecretString::new("secret-value"),
            session_token: SecretString::new("t"),
            account_id: None,
        };
        let key = Credential::ApiKey { key: SecretString::new("k") };
        assert!(Delivery::AwsSigV4.fits_credential(&aws).is_ok());
        assert!(Delivery::HttpHeader { format: "{token}" }.fits_credential(&key).is_ok());
        let why = Delivery::HttpHeader { format: "{token}" }.fits_credential(&aws).unwrap_err().to_string();
        assert_eq!(why, "the broker sent an aws credential, which the httpHeader format with {token} cannot carry");
        assert!(!why.contains("secret-value"));
        assert!(Delivery::AwsSigV4.fits_credential(&key).unwrap_err().to_string().contains("awsSigV4"));
    }
}
