//! Trust providers: each decides whether the caller is who the policy trusts. A policy
//! lists one or more and all must pass; every result is recorded for the audit.

use cloudpass_api::{
    broker::Evidence,
    selector::glob_matches,
    trust::{
        AwsRoleTrust, AzureManagedIdentityTrust, GcpIdentityTokenTrust, JwtAlgorithm, KubernetesServiceAccountTrust,
        OidcTrust, TrustProviderSpec,
    },
};
use serde::Serialize;
use serde_json::Value;

use crate::{
    Error,
    authn::{Caller, Origin},
    aws,
    egress::Egress,
    jwt::{Expectations, JwtVerifier, KeySource, claim_strings},
};

/// The outcome of one trust provider, as audited.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrustResult {
    /// TrustProvider name.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Whether it accepted the caller.
    pub passed: bool,
    /// Why not, or what it matched.
    pub detail: String,
}

/// What the trust providers need.
pub struct TrustContext<'a> {
    /// JWT verification.
    pub verifier: &'a JwtVerifier,
    /// HTTP client for STS, under the egress policy.
    pub http: &'a Egress,
    /// This broker's server IDs, which `awsRole` evidence must be signed for.
    pub server_ids: &'a [String],
}

fn not_trusted(why: impl Into<String>) -> Error {
    Error::NotTrusted(why.into())
}

/// A verification probe of the cloudpass issuer is never a caller's evidence, even where
/// a TrustProvider trusts that issuer.
fn not_a_probe(claims: &Value) -> Result<(), Error> {
    if crate::verify::is_probe(claims) {
        return Err(not_trusted("the token is a cloudpass verification probe, which identifies no workload"));
    }
    Ok(())
}

fn any_glob(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| glob_matches(p, value))
}

fn check_kubernetes(spec: &KubernetesServiceAccountTrust, caller: &Caller) -> Result<String, Error> {
    match (&spec.issuer, &caller.origin) {
        (None, Origin::ThisCluster) => {}
        (Some(issuer), Origin::OtherCluster { issuer: from, namespace }) if issuer == from => {
            if !any_glob(&spec.namespaces, namespace) {
                return Err(not_trusted(format!("namespace {namespace} of {issuer} is not trusted")));
            }
        }
        (None, Origin::OtherCluster { issuer, .. }) => {
            return Err(not_trusted(format!("trusts only this cluster's tokens, the caller's token is from {issuer}")));
        }
        (Some(issuer), _) => return Err(not_trusted(format!("trusts only tokens of {issuer}"))),
    }
    if !spec.service_accounts.is_empty() && !any_glob(&spec.service_accounts, &caller.service_account) {
        return Err(not_trusted(format!("service account {} is not trusted", caller.service_account)));
    }
    if !caller.audiences.iter().any(|a| spec.audiences.contains(a)) {
        return Err(not_trusted(format!("token audiences {:?} are none of {:?}", caller.audiences, spec.audiences)));
    }
    Ok(format!("service account {}", caller.service_account))
}

async fn check_aws(spec: &AwsRoleTrust, evidence: &Evidence, ctx: &TrustContext<'_>) -> Result<String, Error> {
    let request = evidence
        .aws_get_caller_identity
        .as_ref()
        .ok_or_else(|| Error::Evidence("no pre-signed sts:GetCallerIdentity request in the evidence".into()))?;
    let identity = aws::get_caller_identity(ctx.http, request, &spec.sts_endpoints, ctx.server_ids).await?;
    if !spec.account_ids.is_empty() && !spec.account_ids.contains(&identity.account) {
        return Err(not_trusted(format!("account {} is not trusted", identity.account)));
    }
    if !spec.role_arns.is_empty() {
        let Some(role) = identity.assumed_role() else {
            return Err(not_trusted(format!("{} is not an assumed-role session", identity.arn)));
        };
        let results: Vec<_> = spec.role_arns.iter().map(|p| role.matches(p)).collect();
        if !results.iter().any(|r| r == &Ok(true)) {
            return Err(match results.into_iter().find_map(Result::err) {
                Some(invalid) => Error::InvalidSpec(format!("{} is not a trusted role ({invalid})", role.arn())),
                None => not_trusted(format!("{} is not a trusted role", role.arn())),
            });
        }
    }
    Ok(identity.arn)
}

/// The token the agent gathered for the TrustProvider `name` (what each kind needs is
/// [`cloudpass_api::trust::TrustProviderSpec::evidence_source`]).
fn token<'e>(evidence: &'e Evidence, name: &str) -> Result<&'e str, Error> {
    evidence
        .tokens
        .get(name)
        .map(|t| t.expose())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::Evidence(format!("no token for trust provider {name} in the evidence")))
}

fn require(patterns: &[String], values: &[String], what: &str) -> Result<(), Error> {
    if patterns.is_empty() || values.iter().any(|v| any_glob(patterns, v)) {
        Ok(())
    } else {
        Err(not_trusted(format!("{what} {:?} is not trusted", values.first().map(String::as_str).unwrap_or("(none)"))))
    }
}

async fn check_azure(
    name: &str,
    spec: &AzureManagedIdentityTrust,
    evidence: &Evidence,
    ctx: &TrustContext<'_>,
) -> Result<String, Error> {
    let token = token(evidence, name)?;
    let authority = spec.authority_host.as_deref().unwrap_or(crate::credential::ENTRA_AUTHORITY).trim_end_matches('/');
    let tenant = &spec.tenant_id;
    // Managed-identity tokens are v1 tokens (iss sts.windows.net) unless the resource
    // asked for v2; both are signed by the tenant's keys.
    let v2 = format!("{authority}/{tenant}/v2.0");
    let issuer = match crate::authn::unverified_issuer(token) {
        Some(iss) if iss == v2 => v2,
        _ => format!("https://sts.windows.net/{tenant}/"),
    };
    let source = KeySource::Url(format!("{authority}/{tenant}/discovery/v2.0/keys"));
    let expect = Expectations { issuer: &issuer, audiences: &spec.audiences, algorithms: &[JwtAlgorithm::RS256] };
    let claims: Value = ctx.verifier.verify(token, &source, &expect).await?;
    not_a_probe(&claims)?;
    if claim_strings(&claims, "tid") != [tenant.clone()] {
        return Err(not_trusted("tenant does not match"));
    }
    let oid = claim_strings(&claims, "oid");
    let mut app = claim_strings(&claims, "appid");
    app.extend(claim_strings(&claims, "azp"));
    let subscription: Vec<String> = claim_strings(&claims, "xms_mirid")
        .iter()
        .filter_map(|m| m.split('/').nth(2).map(str::to_ascii_lowercase))
        .collect();
    let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect::<Vec<_>>();
    require(&lower(&spec.object_ids), &lower(&oid), "object ID")?;
    require(&lower(&spec.client_ids), &lower(&app), "client ID")?;
    require(&lower(&spec.subscription_ids), &subscription, "subscription")?;
    Ok(format!("managed identity {}", oid.first().map(String::as_str).unwrap_or("?")))
}

async fn check_gcp(
    name: &str,
    spec: &GcpIdentityTokenTrust,
    evidence: &Evidence,
    ctx: &TrustContext<'_>,
) -> Result<String, Error> {
    let token = token(evidence, name)?;
    let issuer = spec.issuer.as_deref().unwrap_or("https://accounts.google.com");
    let source =
        KeySource::Url(spec.jwks_uri.clone().unwrap_or_else(|| "https://www.googleapis.com/oauth2/v3/certs".into()));
    let expect = Expectations { issuer, audiences: &spec.audiences, algorithms: &[JwtAlgorithm::RS256] };
    let claims: Value = ctx.verifier.verify(token, &source, &expect).await?;
    not_a_probe(&claims)?;
    let email = claim_strings(&claims, "email");
    if !spec.service_account_emails.is_empty() && claim_strings(&claims, "email_verified") != ["true"] {
        return Err(not_trusted("the token's email is not verified"));
    }
    require(&spec.service_account_emails, &email, "service account")?;
    require(&spec.project_ids, &claim_strings(&claims, "google.compute_engine.project_id"), "project")?;
    Ok(format!("Google identity {}", email.first().map(String::as_str).unwrap_or("?")))
}

async fn check_oidc(
    name: &str,
    spec: &OidcTrust,
    evidence: &Evidence,
    ctx: &TrustContext<'_>,
) -> Result<String, Error> {
    let token = token(evidence, name)?;
    let source = KeySource::for_issuer(&spec.issuer, spec.jwks_uri.as_deref(), None);
    let expect = Expectations { issuer: &spec.issuer, audiences: &spec.audiences, algorithms: &spec.algorithms };
    let claims: Value = ctx.verifier.verify(token, &source, &expect).await?;
    not_a_probe(&claims)?;
    let sub = claim_strings(&claims, "sub");
    require(&spec.subjects, &sub, "subject")?;
    for matcher in &spec.claims {
        let values = claim_strings(&claims, &matcher.claim);
        if !values.iter().any(|v| any_glob(&matcher.values, v)) {
            return Err(not_trusted(format!("claim {} does not match", matcher.claim)));
        }
    }
    Ok(format!("subject {}", sub.first().map(String::as_str).unwrap_or("?")))
}

/// Runs one trust provider against the caller and the request's evidence; the result,
/// passed or not, with what matched or why not, goes into the audit record.
pub async fn evaluate(
    name: &str,
    spec: &TrustProviderSpec,
    caller: &Caller,
    evidence: &Evidence,
    ctx: &TrustContext<'_>,
) -> TrustResult {
    let kind = spec.kind_name().unwrap_or("unknown");
    let outcome = if let Some(k) = &spec.kubernetes_service_account {
        check_kubernetes(k, caller)
    } else if let Some(a) = &spec.aws_role {
        check_aws(a, evidence, ctx).await
    } else if let Some(a) = &spec.azure_managed_identity {
        check_azure(name, a, evidence, ctx).await
    } else if let Some(g) = &spec.gcp_identity_token {
        check_gcp(name, g, evidence, ctx).await
    } else if let Some(o) = &spec.oidc {
        check_oidc(name, o, evidence, ctx).await
    } else {
        Err(Error::InvalidSpec("the provider sets no kind".into()))
    };
    match outcome {
        Ok(detail) => TrustResult { name: name.to_owned(), kind, passed: true, detail },
        Err(e) => {
            tracing::debug!(trust_provider = name, reason = e.metric_label(), error = %e, "trust provider refused the caller");
            TrustResult { name: name.to_owned(), kind, passed: false, detail: e.to_string() }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn caller(origin: Origin, sa: &str) -> Caller {
        Caller {
            namespace: "team-a".into(),
            service_account: sa.into(),
            pod: None,
            pod_uid: None,
            labels: BTreeMap::new(),
            policies: vec![],
            audiences: vec!["cloudpass".into()],
            origin,
        }
    }

    fn k8s(value: serde_json::Value) -> KubernetesServiceAccountTrust {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn kubernetes_trust_matches_cluster_namespace_and_account() {
        let local = k8s(serde_json::json!({"serviceAccounts": ["orders-*"]}));
        assert!(check_kubernetes(&local, &caller(Origin::ThisCluster, "orders-api")).is_ok());
        let err = check_kubernetes(&local, &caller(Origin::ThisCluster, "billing")).unwrap_err().to_string();
        assert!(err.contains("service account billing is not trusted"), "{err}");
        let remote_origin = Origin::OtherCluster { issuer: "https://eks".into(), namespace: "shop".into() };
        let err = check_kubernetes(&local, &caller(remote_origin.clone(), "orders-api")).unwrap_err().to_string();
        assert!(err.contains("only this cluster"), "{err}");

        let remote = k8s(serde_json::json!({"issuer": "https://eks", "namespaces": ["sh*"]}));
        assert!(check_kubernetes(&remote, &caller(remote_origin, "x")).is_ok());
        let other_ns = Origin::OtherCluster { issuer: "https://eks".into(), namespace: "billing".into() };
        assert!(
            check_kubernetes(&remote, &caller(other_ns, "x")).unwrap_err().to_string().contains("namespace billing")
        );
        let other_issuer = Origin::OtherCluster { issuer: "https://gke".into(), namespace: "shop".into() };
        assert!(check_kubernetes(&remote, &caller(other_issuer, "x")).is_err());
        assert!(check_kubernetes(&remote, &caller(Origin::ThisCluster, "x")).is_err());

        let mut wrong_aud = caller(Origin::ThisCluster, "orders-api");
        wrong_aud.audiences = vec!["sts.amazonaws.com".into()];
        assert!(check_kubernetes(&local, &wrong_aud).unwrap_err().to_string().contains("audiences"));
    }
}
