//! Verification of a federated CredentialProvider's cloud-side trust: one real exchange
//! at the cloud's token service with a probe token that carries the issuer, subject and
//! audience a workload's token would, so that a wrong trust policy, federated
//! credential or pool provider shows up in status instead of inside an app.
//!
//! A probe is marked (`cloudpass.dev.check: true`, a claim clouds ignore) and lives
//! [`PROBE_LIFETIME`]; the broker refuses it as a caller's identity
//! ([`is_probe`]). What the exchange yields is never kept or handed out, and is made as
//! useless as each cloud allows: AWS credentials under a session policy that denies
//! every action, an Entra token for the application itself, a Google token with only
//! the `userinfo.email` scope (after impersonation) or the `iam` scope (before it).

use std::time::Duration;

use cloudpass_api::credential::{
    AwsStsCredential, AzureWorkloadIdentityCredential, CredentialProviderSpec, GcpWorkloadIdentityCredential,
};
use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use crate::{
    ErrorCode, Refusal, aws,
    credential::{answer_expiry, aws_sts_endpoint, entra_token, google_impersonate, google_sts, sign_token},
    egress::Egress,
    issuer::KeySet,
};

/// Lifetime of a probe token: long enough for one exchange, short enough that a copy is
/// worthless soon after.
pub const PROBE_LIFETIME: Duration = Duration::from_secs(120);
/// `RoleSessionName` of an AWS probe, so that CloudTrail tells probes from workloads.
pub const AWS_PROBE_SESSION: &str = "cloudpass-verify";
/// The session policy of an AWS probe: the credentials it yields may do nothing.
pub const AWS_DENY_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*"}]}"#;
/// Scope of a Google probe's impersonated token: identifies, grants no API.
pub const GOOGLE_PROBE_SCOPE: &str = "https://www.googleapis.com/auth/userinfo.email";
/// Scope of a Google probe's federated token when it only calls IAM Credentials.
pub const GOOGLE_IAM_SCOPE: &str = "https://www.googleapis.com/auth/iam";
/// The claim (inside `cloudpass.dev`) that marks a probe.
pub const PROBE_CLAIM: &str = "check";

/// Whether JWT claims are a verification probe's, which no caller may present.
pub fn is_probe(claims: &Value) -> bool {
    claims.get("cloudpass.dev").and_then(|c| c.get(PROBE_CLAIM)).and_then(Value::as_bool) == Some(true)
}

/// Whose trust a probe checks.
pub struct ProbeSubject<'a> {
    /// The CredentialProvider's namespace.
    pub namespace: &'a str,
    /// The CredentialProvider's name.
    pub provider: &'a str,
    /// The service account whose subject is checked, for per-service-account subjects.
    pub service_account: &'a str,
}

/// What a probe needs: the egress-checked HTTP client, the issuer's keys and URL.
pub struct Prober<'a> {
    /// HTTP client under the egress policy.
    pub http: &'a Egress,
    /// The issuer's signing keys.
    pub keys: &'a KeySet,
    /// The issuer URL (`iss`).
    pub issuer_url: &'a str,
}

/// The result of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The cloud accepted the token: what it granted, and until when.
    Verified {
        /// What was obtained, e.g. the assumed-role ARN.
        obtained: String,
        /// When it expires.
        expires_at: Option<Timestamp>,
    },
    /// The cloud refused: its own error code (or `Refused`) and its message.
    Refused {
        /// The cloud's error code, as a condition reason.
        reason: String,
        /// The cloud's message.
        message: String,
    },
    /// No answer that says anything about the trust (unreachable, a server error, an
    /// address the egress policy refuses).
    Unknown {
        /// Why, as a condition reason.
        reason: String,
        /// What happened.
        message: String,
    },
}

/// A condition reason from an upstream code: letters, digits and `_` only (the
/// Kubernetes condition reason format), at most 64 characters.
fn reason_of(code: &str) -> Option<String> {
    let clean: String = code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
    clean.chars().next().is_some_and(|c| c.is_ascii_alphabetic()).then_some(clean)
}

/// Error codes that say the service failed, not that it refused the trust.
const SERVER_FAILURES: &[&str] =
    &["temporarily_unavailable", "server_error", "UNAVAILABLE", "INTERNAL", "ServiceUnavailable", "InternalFailure"];

/// Entra's numbered code (`AADSTS70021`) from its description, which is more precise
/// than its OAuth error (`invalid_client`).
fn entra_code(message: &str) -> Option<String> {
    let start = message.find("AADSTS")?;
    let digits: String = message[start + 6..].chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

fn verdict_of(refusal: Refusal) -> Verdict {
    let message = refusal.message;
    let code = refusal.upstream_code.unwrap_or_default();
    let unknown = |reason: &str, message: String| Verdict::Unknown { reason: reason.into(), message };
    if refusal.code != ErrorCode::UpstreamFailure {
        return unknown(cloudpass_api::common::verify_reasons::REFUSED, message);
    }
    if code.is_empty() || code.starts_with("HTTP5") || SERVER_FAILURES.contains(&code.as_str()) {
        return unknown(cloudpass_api::common::verify_reasons::UNREACHABLE, message);
    }
    let reason = entra_code(&message)
        .or_else(|| reason_of(&code))
        .unwrap_or_else(|| cloudpass_api::common::verify_reasons::REFUSED.into());
    Verdict::Refused { reason, message }
}

impl Prober<'_> {
    /// Signs a probe for `subject` with audience `audience`.
    fn sign(&self, subject: &ProbeSubject<'_>, sub: &str, audience: &str) -> Result<String, Refusal> {
        let marked = json!({
            "namespace": subject.namespace,
            "credentialProvider": subject.provider,
            "serviceAccount": subject.service_account,
            PROBE_CLAIM: true,
        });
        let claims = serde_json::Map::from_iter([("sub".into(), json!(sub)), ("cloudpass.dev".into(), marked)]);
        sign_token(self.keys, self.issuer_url, claims, audience, Timestamp::now(), PROBE_LIFETIME)
            .map_err(|e| Refusal::unavailable(format!("cannot sign a probe: {e}")))
    }

    /// Checks `spec`'s trust for `subject`; `None` for kinds with nothing to check in a
    /// cloud. Never returns or logs what the cloud granted.
    pub async fn verify(&self, spec: &CredentialProviderSpec, subject: &ProbeSubject<'_>) -> Option<Verdict> {
        let federation = spec.federation()?;
        let sub = federation.subject.subject(subject.namespace, subject.provider, subject.service_account);
        let result = if let Some(aws) = &spec.aws_sts {
            self.aws(aws, subject, &sub).await
        } else if let Some(azure) = &spec.azure_workload_identity {
            self.azure(azure, subject, &sub).await
        } else if let Some(gcp) = &spec.gcp_workload_identity {
            self.gcp(gcp, subject, &sub).await
        } else {
            return None;
        };
        Some(result.unwrap_or_else(verdict_of))
    }

    async fn aws(&self, spec: &AwsStsCredential, subject: &ProbeSubject<'_>, sub: &str) -> Result<Verdict, Refusal> {
        let token = self.sign(subject, sub, spec.audience())?;
        let creds = aws::assume_role_with_web_identity(
            self.http,
            &aws_sts_endpoint(spec),
            &spec.role_arn,
            AWS_PROBE_SESSION,
            900,
            &token,
            Some(AWS_DENY_ALL),
        )
        .await?;
        let obtained = creds.assumed_role_arn.unwrap_or_else(|| format!("a session of {}", spec.role_arn));
        Ok(Verdict::Verified { obtained, expires_at: Some(creds.expiration) })
    }

    async fn azure(
        &self,
        spec: &AzureWorkloadIdentityCredential,
        subject: &ProbeSubject<'_>,
        sub: &str,
    ) -> Result<Verdict, Refusal> {
        let assertion = self.sign(subject, sub, spec.audience())?;
        // A token for the application itself: it opens no other resource.
        let scope = format!("{}/.default", spec.client_id);
        let (_, expires_at) = entra_token(self.http, spec, &assertion, &scope, Timestamp::now()).await?;
        let obtained = format!("an Entra token of application {} in tenant {}", spec.client_id, spec.tenant_id);
        Ok(Verdict::Verified { obtained, expires_at: Some(expires_at) })
    }

    async fn gcp(
        &self,
        spec: &GcpWorkloadIdentityCredential,
        subject: &ProbeSubject<'_>,
        sub: &str,
    ) -> Result<Verdict, Refusal> {
        let provider = &spec.workload_identity_provider;
        let token = self.sign(subject, sub, &spec.audience())?;
        let scope = if spec.service_account_email.is_some() { GOOGLE_IAM_SCOPE } else { GOOGLE_PROBE_SCOPE };
        let issued_at = Timestamp::now();
        let federated = google_sts(self.http, spec, &token, scope).await?;
        let pool = provider.split("/providers/").next().unwrap_or(provider);
        let principal = format!("principal://iam.googleapis.com/{pool}/subject/{sub}");
        let Some(email) = &spec.service_account_email else {
            let expires_at = answer_expiry(&federated, issued_at, SignedDuration::ZERO, "Google STS")?;
            return Ok(Verdict::Verified {
                obtained: format!("a federated token of {principal}"),
                expires_at: Some(expires_at),
            });
        };
        let scopes = [GOOGLE_PROBE_SCOPE.to_owned()];
        let (_, expires_at) =
            google_impersonate(self.http, spec, email, &federated.access_token, &scopes, 300, issued_at).await?;
        Ok(Verdict::Verified {
            obtained: format!("an access token of {email} for {principal}"),
            expires_at: Some(expires_at),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: Option<&str>, message: &str) -> Refusal {
        Refusal::upstream(message, code.map(str::to_owned))
    }

    #[test]
    fn a_refusal_keeps_the_clouds_code_and_a_failure_of_the_service_is_unknown() {
        let entra = verdict_of(refusal(
            Some("invalid_client"),
            "Entra ID refused the request (HTTP 400): AADSTS70021: No matching federated identity record found",
        ));
        assert!(matches!(&entra, Verdict::Refused { reason, .. } if reason == "AADSTS70021"), "{entra:?}");
        let sts = verdict_of(refusal(Some("AccessDenied"), "AWS STS refused"));
        assert!(matches!(&sts, Verdict::Refused { reason, .. } if reason == "AccessDenied"), "{sts:?}");
        let google = verdict_of(refusal(Some("invalid_grant"), "Google STS refused"));
        assert!(matches!(&google, Verdict::Refused { reason, .. } if reason == "invalid_grant"), "{google:?}");
        for down in [None, Some("HTTP503"), Some("temporarily_unavailable"), Some("UNAVAILABLE")] {
            let v = verdict_of(refusal(down, "down"));
            assert!(matches!(&v, Verdict::Unknown { reason, .. } if reason == "Unreachable"), "{down:?}: {v:?}");
        }
        let egress = verdict_of(Refusal::denied("refused: a loopback address"));
        assert!(matches!(&egress, Verdict::Unknown { reason, .. } if reason == "Refused"), "{egress:?}");
        assert_eq!(reason_of("a b-c"), Some("abc".into()));
        assert_eq!(reason_of("9x"), None);
    }

    #[test]
    fn probes_are_told_from_callers_by_their_claim() {
        assert!(is_probe(&json!({"cloudpass.dev": {"check": true}})));
        assert!(!is_probe(&json!({"cloudpass.dev": {"check": "true"}})));
        assert!(!is_probe(&json!({"cloudpass.dev": {"namespace": "a"}})));
        assert!(!is_probe(&json!({"sub": "x"})));
    }
}
