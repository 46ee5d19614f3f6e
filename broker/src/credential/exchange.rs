//! The token exchanges at each cloud, the one home of their URLs and request forms: the
//! credential requests ([`super`]) and the `Verified` checks ([`crate::verify`]) both
//! make them, with their own scopes and lifetimes.

use cloudpass_api::{
    credential::{AwsStsCredential, AzureWorkloadIdentityCredential, GcpWorkloadIdentityCredential},
    secret::SecretString,
};
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::answers::{
    TokenAnswer, answer_expiry, parse_entra_answer, parse_google_iam_answer, parse_google_sts_answer, post_form,
    send_json,
};
use crate::{Refusal, egress::Egress};

/// Entra's authority when a spec names none.
pub(crate) const ENTRA_AUTHORITY: &str = "https://login.microsoftonline.com";

/// The STS endpoint of an `awsSts` provider: its own, else the regional one.
pub(crate) fn aws_sts_endpoint(spec: &AwsStsCredential) -> String {
    spec.sts_endpoint.clone().unwrap_or_else(|| format!("https://sts.{}.amazonaws.com/", spec.region))
}

/// Entra's `client_credentials` grant for `scope`, with the broker-signed `assertion`:
/// the token, and when it expires counted from `issued_at`.
pub(crate) async fn entra_token(
    http: &Egress,
    spec: &AzureWorkloadIdentityCredential,
    assertion: &str,
    scope: &str,
    issued_at: Timestamp,
) -> Result<(TokenAnswer, Timestamp), Refusal> {
    let authority = spec.authority_host.as_deref().unwrap_or(ENTRA_AUTHORITY).trim_end_matches('/');
    let url = format!("{authority}/{}/oauth2/v2.0/token", spec.tenant_id);
    let answer = post_form(
        http,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &spec.client_id),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
        None,
        "Entra ID",
    )
    .await?;
    let answer = parse_entra_answer(&answer)?;
    let expires_at = answer_expiry(&answer, issued_at, SignedDuration::ZERO, "Entra ID")?;
    Ok((answer, expires_at))
}

/// Google STS's token exchange of the broker-signed `subject_token` for a federated
/// token with `scope`.
pub(crate) async fn google_sts(
    http: &Egress,
    spec: &GcpWorkloadIdentityCredential,
    subject_token: &str,
    scope: &str,
) -> Result<TokenAnswer, Refusal> {
    let sts = spec.sts_endpoint.as_deref().unwrap_or("https://sts.googleapis.com").trim_end_matches('/');
    let answer = post_form(
        http,
        &format!("{sts}/v1/token"),
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("audience", &format!("//iam.googleapis.com/{}", spec.workload_identity_provider)),
            ("scope", scope),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("subject_token", subject_token),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ],
        None,
        "Google STS",
    )
    .await?;
    parse_google_sts_answer(&answer)
}

/// IAM Credentials' `generateAccessToken` of service account `email` with the
/// `federated` token: a token with `scopes` for `lifetime_seconds`, and its expiry.
pub(crate) async fn google_impersonate(
    http: &Egress,
    spec: &GcpWorkloadIdentityCredential,
    email: &str,
    federated: &SecretString,
    scopes: &[String],
    lifetime_seconds: u64,
    issued_at: Timestamp,
) -> Result<(SecretString, Timestamp), Refusal> {
    let iam = spec
        .iam_credentials_endpoint
        .as_deref()
        .unwrap_or("https://iamcredentials.googleapis.com")
        .trim_end_matches('/');
    let url = format!("{iam}/v1/projects/-/serviceAccounts/{email}:generateAccessToken");
    let builder = http
        .post(&url)
        .map_err(|e| Refusal::denied(e.to_string()))?
        .bearer_auth(federated.expose())
        .json(&json!({"scope": scopes, "lifetime": format!("{lifetime_seconds}s")}));
    let answer = send_json(builder, &url, "Google IAM Credentials").await?;
    parse_google_iam_answer(&answer, issued_at)
}
