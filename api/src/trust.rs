//! `TrustProvider`: how the broker verifies who a calling workload is.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{GUID_PATTERN, HTTPS_URL_PATTERN, NAME_GLOB_PATTERN, ProviderStatus};

/// How to verify the identity of a workload that asks the broker for a credential.
/// Exactly one kind is set. An AccessPolicy lists one or more TrustProviders and
/// **all** of them must accept the caller.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cloudpass.dev",
    version = "v1alpha1",
    kind = "TrustProvider",
    namespaced,
    status = "ProviderStatus",
    shortname = "tp",
    category = "cloudpass",
    derive = "PartialEq",
    doc = "TrustProvider tells the cloudpass broker how to verify the identity of a calling workload: a projected Kubernetes service-account token (this or another cluster), an AWS role, an Azure managed identity, a Google identity token, or any OIDC issuer.",
    printcolumn = r#"{"name":"Kind","type":"string","description":"Which kind of trust this provider checks","jsonPath":".status.providerKind"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.kubernetesServiceAccount) ? 1 : 0) + (has(self.awsRole) ? 1 : 0) + (has(self.azureManagedIdentity) ? 1 : 0) + (has(self.gcpIdentityToken) ? 1 : 0) + (has(self.oidc) ? 1 : 0) == 1",
    "message": "exactly one of kubernetesServiceAccount, awsRole, azureManagedIdentity, gcpIdentityToken or oidc must be set"
}]))]
pub struct TrustProviderSpec {
    /// Trust a projected Kubernetes service-account token: of this cluster (checked with
    /// TokenReview, which also refuses tokens of deleted pods) or of another cluster
    /// (checked against that cluster's OIDC issuer and JWKS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_service_account: Option<KubernetesServiceAccountTrust>,
    /// Trust an AWS IAM role: the workload presents a pre-signed `sts:GetCallerIdentity`
    /// request, the broker sends it to AWS STS and matches the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_role: Option<AwsRoleTrust>,
    /// Trust an Azure managed identity: an Entra ID access token, verified against Entra's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_managed_identity: Option<AzureManagedIdentityTrust>,
    /// Trust a Google-signed identity token from a GCP metadata server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp_identity_token: Option<GcpIdentityTokenTrust>,
    /// Trust a JWT from any OIDC issuer (CI systems, other platforms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcTrust>,
}

impl TrustProviderSpec {
    /// The name of the kind that is set (`kubernetesServiceAccount`, `awsRole`, ...), as
    /// shown in the `Kind` column. `None` only for a spec the schema would have refused.
    pub fn kind_name(&self) -> Option<&'static str> {
        [
            (self.kubernetes_service_account.is_some(), "kubernetesServiceAccount"),
            (self.aws_role.is_some(), "awsRole"),
            (self.azure_managed_identity.is_some(), "azureManagedIdentity"),
            (self.gcp_identity_token.is_some(), "gcpIdentityToken"),
            (self.oidc.is_some(), "oidc"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }

    /// The cloud evidence the agent gathers for the TrustProvider `name` of this spec, if
    /// it needs more than the pod's token: the one home of "this kind needs this
    /// evidence". The webhook configures the agent with it; the broker's check of each
    /// kind reads what it yields (`awsRole`: the pre-signed `GetCallerIdentity`;
    /// `azureManagedIdentity` and `gcpIdentityToken`: a token under `name`). `oidc`
    /// evidence comes from outside any pod, so it has none.
    pub fn evidence_source(&self, name: &str) -> Option<crate::agent::EvidenceSource> {
        use crate::agent::EvidenceSource;
        let trust_provider = name.to_owned();
        if self.aws_role.is_some() {
            Some(EvidenceSource::AwsGetCallerIdentity { trust_provider })
        } else if let Some(azure) = &self.azure_managed_identity {
            Some(EvidenceSource::AzureManagedIdentity {
                trust_provider,
                resource: azure.audiences.first()?.clone(),
                client_id: match azure.client_ids.as_slice() {
                    [one] => Some(one.clone()),
                    _ => None,
                },
            })
        } else if let Some(gcp) = &self.gcp_identity_token {
            Some(EvidenceSource::GcpIdentityToken { trust_provider, audience: gcp.audiences.first()?.clone() })
        } else {
            None
        }
    }
}

/// JWT signature algorithms a verifier may accept. `none` and HMAC algorithms are never
/// accepted: a public-key issuer must not be confused with a shared secret.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

fn default_jwt_algorithms() -> Vec<JwtAlgorithm> {
    vec![JwtAlgorithm::RS256, JwtAlgorithm::ES256]
}

fn default_broker_audiences() -> Vec<String> {
    vec![crate::BROKER_AUDIENCE.to_owned()]
}

/// Verification of a projected Kubernetes service-account token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.issuer) || (!has(self.jwksUri) && !has(self.jwks))", "message": "jwksUri and jwks apply only together with issuer (another cluster's tokens)"},
    {"rule": "!has(self.jwksUri) || !has(self.jwks)", "message": "set at most one of jwksUri and jwks"},
    {"rule": "!has(self.issuer) || (has(self.namespaces) && size(self.namespaces) > 0)", "message": "namespaces is required with issuer: name the namespaces of the other cluster whose workloads are trusted"},
    {"rule": "has(self.issuer) || !has(self.namespaces)", "message": "namespaces applies only to another cluster's tokens; pods of this cluster are always matched in the policy's own namespace"}
]))]
pub struct KubernetesServiceAccountTrust {
    /// OIDC issuer URL of **another** cluster whose tokens are trusted, e.g. an EKS
    /// (`https://oidc.eks.<region>.amazonaws.com/id/<id>`), AKS or GKE issuer. Omit it to
    /// trust this cluster: tokens are then checked with TokenReview, which also refuses
    /// the token of a pod that has been deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub issuer: Option<String>,
    /// JWKS URL of the other cluster. Default: the `jwks_uri` of the issuer's
    /// `/.well-known/openid-configuration`. Keys are cached and refetched when a token
    /// names an unknown key ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub jwks_uri: Option<String>,
    /// The other cluster's JWKS as inline JSON (`{"keys":[...]}`), for issuers the broker
    /// cannot reach. Public keys only; at most 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub jwks: Option<String>,
    /// Audiences the token must carry (any one of them). Default: `["cloudpass"]`, the
    /// audience of the token the webhook projects into the agent.
    #[serde(default = "default_broker_audiences")]
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub audiences: Vec<String>,
    /// Namespaces of the other cluster whose service accounts are trusted; `*` globs
    /// allowed. Required with `issuer`, refused without it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63), regex(pattern = NAME_GLOB_PATTERN)))]
    pub namespaces: Vec<String>,
    /// Service-account names that are trusted; `*` globs allowed. Default: every
    /// service account (narrow it further with the AccessPolicy's `client`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253), regex(pattern = NAME_GLOB_PATTERN)))]
    pub service_accounts: Vec<String>,
    /// Signature algorithms accepted for another cluster's tokens. Default: `RS256`, `ES256`.
    #[serde(default = "default_jwt_algorithms")]
    #[schemars(length(min = 1, max = 9))]
    pub algorithms: Vec<JwtAlgorithm>,
}

/// Verification of an AWS IAM role through a pre-signed `sts:GetCallerIdentity` request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.accountIds) && size(self.accountIds) > 0) || (has(self.roleArns) && size(self.roleArns) > 0)", "message": "set accountIds or roleArns: without them every AWS identity would be trusted"}
]))]
pub struct AwsRoleTrust {
    /// AWS account IDs (12 digits) whose identities are trusted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^[0-9]{12}$")))]
    pub account_ids: Vec<String>,
    /// IAM role ARNs that are trusted; `*` globs allowed in the account and role name
    /// (`arn:aws:iam::123456789012:role/app-*`). The broker compares the role behind the
    /// caller's assumed-role session, not the session name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(max = 2048), regex(pattern = r"^arn:aws[a-z-]*:iam::([0-9]{12}|\*):role/[A-Za-z0-9+=,.@_/*-]+$"))
    )]
    pub role_arns: Vec<String>,
    /// Further STS endpoints (e.g. a VPC endpoint) the evidence may be addressed to.
    /// AWS's public global and regional STS endpoints are always allowed; the broker
    /// refuses to send evidence anywhere else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN)))]
    pub sts_endpoints: Vec<String>,
}

/// Verification of an Entra ID token issued to an Azure managed identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.objectIds) && size(self.objectIds) > 0) || (has(self.clientIds) && size(self.clientIds) > 0) || (has(self.subscriptionIds) && size(self.subscriptionIds) > 0)", "message": "set objectIds, clientIds or subscriptionIds: without them every identity of the tenant would be trusted"}
]))]
pub struct AzureManagedIdentityTrust {
    /// Entra tenant ID (GUID) that issued the token.
    #[schemars(regex(pattern = GUID_PATTERN))]
    pub tenant_id: String,
    /// Audiences the token must carry (any one of them): the application ID URI or
    /// client ID the managed identity requested its token for.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub audiences: Vec<String>,
    /// Object (principal) IDs of trusted managed identities (`oid` claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = GUID_PATTERN)))]
    pub object_ids: Vec<String>,
    /// Client (application) IDs of trusted managed identities (`appid`/`azp` claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = GUID_PATTERN)))]
    pub client_ids: Vec<String>,
    /// Subscriptions whose managed identities are trusted (from the `xms_mirid` claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = GUID_PATTERN)))]
    pub subscription_ids: Vec<String>,
    /// Entra authority host. Default: `https://login.microsoftonline.com`; set it for
    /// sovereign clouds (e.g. `https://login.microsoftonline.us`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub authority_host: Option<String>,
}

/// Verification of a Google-signed identity token from a GCP metadata server
/// (requested with `format=full`, so that it names its project).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.serviceAccountEmails) && size(self.serviceAccountEmails) > 0) || (has(self.projectIds) && size(self.projectIds) > 0)", "message": "set serviceAccountEmails or projectIds: without them every Google identity would be trusted"}
]))]
pub struct GcpIdentityTokenTrust {
    /// Audiences the token must carry (any one of them): the `audience` the workload
    /// asked its metadata server for.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub audiences: Vec<String>,
    /// Trusted service-account emails (`email` claim); `*` globs allowed
    /// (`*@my-project.iam.gserviceaccount.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 254), regex(pattern = r"^[A-Za-z0-9*._%+-]+@[A-Za-z0-9*.-]+$")))]
    pub service_account_emails: Vec<String>,
    /// Trusted GCP project IDs (`google.compute_engine.project_id` claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$")))]
    pub project_ids: Vec<String>,
    /// Token issuer. Default: `https://accounts.google.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub issuer: Option<String>,
    /// Google's signing keys. Default: `https://www.googleapis.com/oauth2/v3/certs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub jwks_uri: Option<String>,
}

/// Verification of a JWT from any OIDC issuer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.subjects) && size(self.subjects) > 0) || (has(self.claims) && size(self.claims) > 0)", "message": "set subjects or claims: an issuer is usually shared by many tenants (e.g. every repository of a CI system)"}
]))]
pub struct OidcTrust {
    /// Issuer URL; must equal the token's `iss` claim exactly.
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub issuer: String,
    /// JWKS URL. Default: the `jwks_uri` of the issuer's discovery document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL_PATTERN))]
    pub jwks_uri: Option<String>,
    /// Audiences the token must carry (any one of them).
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub audiences: Vec<String>,
    /// Trusted subjects (`sub` claim); `*` globs allowed (`repo:my-org/*:ref:refs/heads/main`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub subjects: Vec<String>,
    /// Further claims that must match; all of them must.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub claims: Vec<ClaimMatcher>,
    /// Signature algorithms accepted. Default: `RS256`, `ES256`.
    #[serde(default = "default_jwt_algorithms")]
    #[schemars(length(min = 1, max = 9))]
    pub algorithms: Vec<JwtAlgorithm>,
}

/// A claim that must have one of the given values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimMatcher {
    /// Claim name; a dot reaches into nested objects (`google.compute_engine.project_id`).
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_:.-]+$"))]
    pub claim: String,
    /// Accepted values (any one of them); `*` globs allowed. A string claim matches
    /// directly; a list claim matches when any element does.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 512)))]
    pub values: Vec<String>,
}
