//! `AccessPolicy`: one client workload to one server, verified one way, credentialed another.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{HOST_PATTERN, LocalObjectReference, OBJECT_NAME_PATTERN, Status},
    duration::Duration,
};

/// Lets the pods selected by `client` reach `server` with credentials from
/// `credentialProvider`, after every one of `trustProviders` has verified the caller.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cloudpass.dev",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    status = "AccessPolicyStatus",
    shortname = "ap",
    category = "cloudpass",
    derive = "PartialEq",
    doc = "AccessPolicy lets the pods it selects reach a server (AWS, Azure, GCP or any HTTP API) with short-lived credentials from a CredentialProvider, after every listed TrustProvider has verified the calling workload.",
    printcolumn = r#"{"name":"Server","type":"string","description":"Kind of server reached","jsonPath":".spec.server.kind"}"#,
    printcolumn = r#"{"name":"Hosts","type":"string","description":"Host patterns of the server","jsonPath":".spec.server.hosts"}"#,
    printcolumn = r#"{"name":"Credential","type":"string","description":"CredentialProvider used","jsonPath":".spec.credentialProvider.name"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.delivery.sdkEndpoint) || self.server.kind != 'http'", "message": "delivery sdkEndpoint serves cloud SDKs and needs server kind aws, azure or gcp; use httpHeader for an http server"},
    {"rule": "!has(self.delivery.awsSigV4) || self.server.kind == 'aws'", "message": "delivery awsSigV4 needs server kind aws"},
    {"rule": "has(self.delivery.sdkEndpoint) || has(self.delivery.file) || (has(self.server.hosts) && size(self.server.hosts) > 0)", "message": "server.hosts is required for the httpHeader and awsSigV4 deliveries: the agent's proxy serves only those hosts"},
    {"rule": "!has(self.server.tls) || (!has(self.delivery.sdkEndpoint) && !has(self.delivery.file))", "message": "server.tls is for the httpHeader and awsSigV4 deliveries, whose proxy connects to the server; with sdkEndpoint or file the app connects itself"}
]))]
pub struct AccessPolicySpec {
    /// Which pods of this namespace receive the credential.
    pub client: ClientSelector,
    /// TrustProviders (in this namespace) that verify the caller; **all** must accept it.
    #[schemars(length(min = 1, max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub trust_providers: Vec<LocalObjectReference>,
    /// What the workload reaches.
    pub server: Server,
    /// CredentialProvider (in this namespace) that obtains the credential.
    pub credential_provider: LocalObjectReference,
    /// How the workload receives the credential. Default: `sdkEndpoint`.
    #[serde(default)]
    pub delivery: Delivery,
    /// Further conditions checked on every credential request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<AccessConditions>,
}

/// The pods a policy applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSelector {
    /// Label selector over the pods of this namespace; `{}` selects every pod.
    pub pod_selector: LabelSelector,
    /// Only pods running as this service account. Default: any service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub service_account_name: Option<String>,
    /// Containers that receive the credential settings (environment variables), init
    /// containers included (they start after the agent). Default: every container and
    /// init container of the pod. This decides where the settings go, not who
    /// can reach the agent: a pod's containers share its loopback, so the pod is the
    /// unit of access, and two policies needing the same single-valued endpoint conflict
    /// even when they name different containers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub containers: Vec<String>,
}

/// Why a policy does not select a workload ([`ClientSelector::selects`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotSelected {
    /// The policy is for another service account (the one it names).
    ServiceAccount(String),
    /// The pod's labels do not satisfy the pod selector.
    Labels,
    /// A workload of another cluster has no labels here: only a policy whose pod
    /// selector is empty can select it.
    RemoteNeedsEmptySelector,
}

impl ClientSelector {
    /// Whether the policy selects a workload running as `service_account` with the pod
    /// `labels`; `None` for a workload of another cluster, whose labels are not known
    /// here. The one rule the webhook (whom to inject) and the broker (whom to answer)
    /// both apply.
    pub fn selects(
        &self,
        service_account: &str,
        labels: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<(), NotSelected> {
        if let Some(sa) = &self.service_account_name
            && sa != service_account
        {
            return Err(NotSelected::ServiceAccount(sa.clone()));
        }
        match labels {
            Some(labels) if crate::selector::selector_matches(&self.pod_selector, labels) => Ok(()),
            Some(_) => Err(NotSelected::Labels),
            None if crate::selector::selector_is_empty(&self.pod_selector) => Ok(()),
            None => Err(NotSelected::RemoteNeedsEmptySelector),
        }
    }
}

/// Kind of server a policy reaches; it decides which SDK endpoint the agent serves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    /// An AWS service (S3, DynamoDB, ...).
    Aws,
    /// An Azure service (Blob Storage, Key Vault, ...).
    Azure,
    /// A Google Cloud service (GCS, BigQuery, ...).
    Gcp,
    /// Any HTTP API.
    Http,
}

impl ServerKind {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aws => "aws",
            Self::Azure => "azure",
            Self::Gcp => "gcp",
            Self::Http => "http",
        }
    }
}

/// The server side of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.kind != 'azure' || has(self.resource)", "message": "resource is required for kind azure (e.g. https://storage.azure.com/)"},
    {"rule": "self.kind == 'azure' || !has(self.resource)", "message": "resource applies only to kind azure"},
    {"rule": "self.kind == 'gcp' || !has(self.scopes) || size(self.scopes) == 0", "message": "scopes apply only to kind gcp"}
]))]
pub struct Server {
    /// `aws`, `azure`, `gcp` or `http`.
    pub kind: ServerKind,
    /// Host names the workload calls; a leading `*.` matches any subdomain
    /// (`*.blob.core.windows.net`). Required for the proxy deliveries, which serve only
    /// these hosts; informational for `sdkEndpoint` and `file`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253), regex(pattern = HOST_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub hosts: Vec<String>,
    /// TCP port of the server. Default: 443.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Azure resource (audience) the token is for, e.g. `https://storage.azure.com/`;
    /// the agent answers the SDK's managed-identity request for this resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub resource: Option<String>,
    /// Google OAuth scopes the token is for. Default:
    /// `https://www.googleapis.com/auth/cloud-platform`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 256), regex(pattern = r"^https://www\.googleapis\.com/auth/[a-z0-9._/-]+$"))
    )]
    pub scopes: Vec<String>,
    /// How the agent's proxy (the `httpHeader` and `awsSigV4` deliveries) verifies the
    /// server's TLS certificate. Default: the system roots of the agent's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
}

/// The Google scope of a token when the policy names none.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

impl Server {
    /// The scopes its Google tokens carry: `scopes`, else [`CLOUD_PLATFORM_SCOPE`].
    pub fn google_scopes(&self) -> Vec<String> {
        if self.scopes.is_empty() { vec![CLOUD_PLATFORM_SCOPE.into()] } else { self.scopes.clone() }
    }
}

/// TLS settings of the agent's connections to the server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    /// CA certificates (PEM) the server's certificate chains to, trusted in addition to
    /// the system roots: for an API with a private CA. A ConfigMap in this namespace,
    /// mounted into the agent; a pod does not start while it is missing.
    pub ca_config_map: ConfigMapKey,
}

/// A key of a ConfigMap in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// The key holding the PEM bundle. Default: `ca.crt`.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// How the workload receives its credential. Exactly one is set; default `sdkEndpoint`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.sdkEndpoint) ? 1 : 0) + (has(self.httpHeader) ? 1 : 0) + (has(self.awsSigV4) ? 1 : 0) + (has(self.file) ? 1 : 0) == 1",
    "message": "exactly one of sdkEndpoint, httpHeader, awsSigV4 or file must be set"
}]))]
pub struct Delivery {
    /// The cloud SDK's own credential endpoint, served by the agent on loopback: the AWS
    /// container-credentials endpoint, the Azure managed-identity endpoint or the GCP
    /// metadata server. No code change in the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk_endpoint: Option<SdkEndpointDelivery>,
    /// An HTTP proxy on loopback that adds a header to requests for the server's hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header: Option<HttpHeaderDelivery>,
    /// An HTTP proxy on loopback that signs requests for the server's hosts with AWS SigV4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_sig_v4: Option<AwsSigV4Delivery>,
    /// A file the agent writes into an in-memory volume mounted read-only into the
    /// selected containers, at `/var/run/cloudpass/<name>`, replaced atomically when the
    /// credential changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileDelivery>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self { sdk_endpoint: Some(SdkEndpointDelivery {}), http_header: None, aws_sig_v4: None, file: None }
    }
}

/// How a file delivery writes the credential.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum FileFormat {
    /// The secret alone, no newline: an API key, a token, or a password (of a username
    /// and password). AWS credentials: the SDKs' shared credentials file, one
    /// `[default]` profile (for `AWS_SHARED_CREDENTIALS_FILE`).
    #[default]
    Raw,
    /// A JSON object: `{"apiKey": ...}`, `{"username": ..., "password": ...}`,
    /// `{"accessToken": ..., "tokenType": ..., "expiresAt": ...}`, `{"token": ...}`. AWS
    /// credentials: a `credential_process` output (`Version`, `AccessKeyId`,
    /// `SecretAccessKey`, `SessionToken`, `Expiration`), which the SDKs read again
    /// before it expires.
    Json,
    /// `KEY='value'` lines, for `source` or a dotenv loader: `API_KEY`, `USERNAME` and
    /// `PASSWORD`, `ACCESS_TOKEN`, `TOKEN`; AWS credentials as `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` and `AWS_CREDENTIAL_EXPIRATION`.
    Dotenv,
}

/// A file in the pod's in-memory credential volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileDelivery {
    /// File name under `/var/run/cloudpass/` in the selected containers.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self != 'aws-token'", "message": "aws-token is the name of the AWS endpoint's token file"}]))]
    pub name: String,
    /// How the credential is written. Default: `Raw`.
    #[serde(default)]
    pub format: FileFormat,
}

/// Settings of the SDK-endpoint delivery (none yet).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SdkEndpointDelivery {}

fn default_header_name() -> String {
    "Authorization".to_owned()
}

fn default_header_format() -> String {
    "Bearer {token}".to_owned()
}

/// A header the agent's proxy sets (replacing any the workload sent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeaderDelivery {
    /// Header name. Default: `Authorization`.
    #[serde(default = "default_header_name")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))]
    pub name: String,
    /// Header value with placeholders: `{token}` (access token or API key) or `{basic}`
    /// (base64 of `username:password`). Default: `Bearer {token}`.
    #[serde(default = "default_header_format")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^\r\n]+$"))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.contains('{token}') || self.contains('{basic}')", "message": "format must contain {token} or {basic}"}]))]
    pub format: String,
}

/// AWS SigV4 signing by the agent's proxy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsSigV4Delivery {
    /// Signing name of the service (`s3`, `execute-api`, ...). Default: derived from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub service: Option<String>,
    /// Signing region. Default: derived from the host, else the CredentialProvider's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
}

/// Conditions checked by the broker on every credential request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessConditions {
    /// Access is allowed only inside one of these windows. Default: always.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub time_windows: Vec<TimeWindow>,
    /// Upper bound on the lifetime of a credential handed out, from 5m to 12h; shorter
    /// lifetimes make revocation faster. Default: what the provider issues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "duration(self) >= duration('5m') && duration(self) <= duration('12h')", "message": "maxCredentialLifetime must be between 5m and 12h"}]))]
    pub max_credential_lifetime: Option<Duration>,
}

/// Day of the week.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
pub enum Weekday {
    /// Monday.
    Monday,
    /// Tuesday.
    Tuesday,
    /// Wednesday.
    Wednesday,
    /// Thursday.
    Thursday,
    /// Friday.
    Friday,
    /// Saturday.
    Saturday,
    /// Sunday.
    Sunday,
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

/// A daily window of local time on some days of the week, e.g. office hours
/// (`09:00`–`17:00`) or a night shift (`22:00`–`06:00`). A window whose end is not after
/// its start crosses midnight: it opens on each listed day at `start` and closes the next
/// day at `end`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "self.start != self.end", "message": "start and end must differ; use 00:00-24:00 for a whole day"}]))]
pub struct TimeWindow {
    /// IANA time zone the times are in (`Europe/Berlin`). Default: `UTC`. The operator
    /// checks that the zone exists.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}$"))]
    pub time_zone: String,
    /// Days on which the window opens (for a window crossing midnight, the day it starts).
    /// Default: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub days: Vec<Weekday>,
    /// Start, inclusive, as `HH:MM` (24-hour clock).
    #[schemars(length(min = 5, max = 5), regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// End, exclusive, as `HH:MM`; `24:00` is the end of the day.
    #[schemars(length(min = 5, max = 5), regex(pattern = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"))]
    pub end: String,
}

/// Observed state of an AccessPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyStatus {
    /// Conditions and observed generation.
    #[serde(flatten)]
    pub status: Status,
    /// Content hash of this policy as compiled into its namespace's config, with the
    /// providers it uses, once Ready: it changes when what is enforced for this policy
    /// changes (its spec, its providers), and an edit of another policy leaves it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn client(labels: &[(&str, &str)], service_account: Option<&str>) -> ClientSelector {
        let match_labels: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        ClientSelector {
            pod_selector: LabelSelector { match_labels: Some(match_labels), match_expressions: None },
            service_account_name: service_account.map(str::to_owned),
            containers: vec![],
        }
    }

    #[test]
    fn a_policy_selects_by_service_account_then_labels_and_remote_workloads_only_when_empty() {
        let orders = BTreeMap::from([("app".to_owned(), "orders".to_owned())]);
        let by_label = client(&[("app", "orders")], None);
        assert_eq!(by_label.selects("any", Some(&orders)), Ok(()));
        assert_eq!(by_label.selects("any", Some(&BTreeMap::new())), Err(NotSelected::Labels));
        assert_eq!(by_label.selects("any", None), Err(NotSelected::RemoteNeedsEmptySelector));

        let by_account = client(&[], Some("orders"));
        assert_eq!(by_account.selects("orders", Some(&BTreeMap::new())), Ok(()));
        assert_eq!(by_account.selects("orders", None), Ok(()));
        assert_eq!(by_account.selects("billing", Some(&orders)), Err(NotSelected::ServiceAccount("orders".into())));
    }
}
