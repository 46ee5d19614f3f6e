//! What each cloud must be told to trust for one federated CredentialProvider: the
//! issuer, the audience and the subjects of the tokens the broker signs for it, and the
//! exact cloud-side configuration (AWS trust policy, Entra federated credential, Google
//! workload identity pool provider and binding). The audience and subject rules are the
//! broker's own ([`CredentialProviderSpec::federation`], [`SubjectFormat::subject`]).
//! `kubectl cloudpass trust` prints it; the operator's `Verified` condition names it.

use std::collections::BTreeSet;

use crate::{
    AccessPolicy, CredentialProvider,
    credential::{CredentialProviderSpec, SubjectFormat},
};
use kube::ResourceExt;
use serde::Serialize;
use serde_json::json;

/// Stands for any service account in a subject when the provider's subjects name the
/// service account and a policy does not restrict it.
pub const ANY_SERVICE_ACCOUNT: &str = "*";

/// The trust one CredentialProvider needs, and how to configure it.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Trust {
    /// Namespace of the CredentialProvider.
    pub namespace: String,
    /// Name of the CredentialProvider.
    pub name: String,
    /// Its kind (`awsSts`, ...).
    pub kind: String,
    /// `iss` of every token the broker signs.
    pub issuer: String,
    /// `aud` of every token the broker signs for it.
    pub audience: String,
    /// Every `sub` the broker may sign for it. With per-service-account subjects, one per
    /// service account its policies name, and `...:*` when one of them names none.
    pub subjects: Vec<String>,
    /// The cloud-side configuration, step by step: commands and documents to create.
    pub configure: Vec<Step>,
}

/// One step of the cloud-side configuration.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// What the step does.
    pub what: String,
    /// A command to run, or a document to create, as text.
    pub text: String,
}

/// The trust `provider` needs for tokens of `issuer`, given the `policies` of its
/// namespace; `None` for a kind that needs nothing in a cloud.
pub fn of(provider: &CredentialProvider, policies: &[AccessPolicy], issuer: &str) -> Option<Trust> {
    let federation = provider.spec.federation()?;
    let namespace = provider.namespace().unwrap_or_default();
    let name = provider.name_any();
    let subjects = subjects(&namespace, &name, federation.subject, policies);
    let configure = configure(&provider.spec, &namespace, &name, issuer, &federation.audience, &subjects);
    Some(Trust {
        namespace,
        name,
        kind: federation.kind.to_owned(),
        issuer: issuer.to_owned(),
        audience: federation.audience,
        subjects,
        configure,
    })
}

/// Every `sub` the broker may sign for `provider`: one per service account its
/// `policies` name (`*` for one that names none), or the provider's one subject.
pub fn subjects(namespace: &str, provider: &str, format: SubjectFormat, policies: &[AccessPolicy]) -> Vec<String> {
    if format == SubjectFormat::Provider {
        return vec![format.subject(namespace, provider, "")];
    }
    let accounts: BTreeSet<&str> = policies
        .iter()
        .filter(|p| p.spec.credential_provider.name == provider)
        .map(|p| p.spec.client.service_account_name.as_deref().unwrap_or(ANY_SERVICE_ACCOUNT))
        .collect();
    let accounts = if accounts.is_empty() { BTreeSet::from([ANY_SERVICE_ACCOUNT]) } else { accounts };
    accounts.into_iter().map(|account| format.subject(namespace, provider, account)).collect()
}

fn step(what: impl Into<String>, text: impl Into<String>) -> Step {
    Step { what: what.into(), text: text.into() }
}

/// The issuer's host and path, as IAM names an OIDC provider and its condition keys.
fn issuer_host(issuer: &str) -> &str {
    issuer.trim_start_matches("https://").trim_end_matches('/')
}

/// The cloud-side configuration for these `subjects`, step by step.
pub fn configure(
    spec: &CredentialProviderSpec,
    namespace: &str,
    name: &str,
    issuer: &str,
    audience: &str,
    subjects: &[String],
) -> Vec<Step> {
    let any = subjects.iter().any(|s| s.ends_with(&format!(":{ANY_SERVICE_ACCOUNT}")));
    if let Some(aws) = &spec.aws_sts {
        let account = aws.role_arn.split(':').nth(4).unwrap_or_default();
        let role = aws.role_arn.rsplit('/').next().unwrap_or_default();
        let host = issuer_host(issuer);
        let subject = if subjects.len() == 1 { json!(subjects[0]) } else { json!(subjects) };
        let operator = if any { "StringLike" } else { "StringEquals" };
        let policy = json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Federated": format!("arn:aws:iam::{account}:oidc-provider/{host}")},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {operator: {format!("{host}:aud"): audience, format!("{host}:sub"): subject}},
            }],
        });
        return vec![
            step(
                format!("register the issuer in account {account} (once per account)"),
                format!("aws iam create-open-id-connect-provider --url {issuer} --client-id-list {audience}"),
            ),
            step(format!("the trust policy of role {role}"), serde_json::to_string_pretty(&policy).unwrap_or_default()),
            step(
                "apply it",
                format!(
                    "aws iam update-assume-role-policy --role-name {role} --policy-document file://trust-{name}.json"
                ),
            ),
        ];
    }
    if let Some(azure) = &spec.azure_workload_identity {
        let mut steps = Vec::new();
        if any {
            steps.push(step(
                "note",
                "Entra matches subjects exactly: name the service account on each AccessPolicy (client.serviceAccountName), one federated credential each",
            ));
        }
        for (i, subject) in subjects.iter().enumerate() {
            let credential = if subjects.len() == 1 {
                format!("cloudpass-{namespace}-{name}")
            } else {
                format!("cloudpass-{namespace}-{name}-{i}")
            };
            let parameters = json!({"name": credential, "issuer": issuer, "subject": subject, "audiences": [audience]});
            steps.push(step(
                format!("a federated credential on the app registration {}", azure.client_id),
                format!("az ad app federated-credential create --id {} --parameters '{parameters}'", azure.client_id),
            ));
            steps.push(step(
                "or, for a user-assigned managed identity of that client ID",
                format!(
                    "az identity federated-credential create --resource-group <resource-group> --identity-name <identity-name> --name {credential} --issuer {issuer} --subject {subject} --audiences {audience}"
                ),
            ));
        }
        return steps;
    }
    if let Some(gcp) = &spec.gcp_workload_identity {
        let provider = &gcp.workload_identity_provider;
        let parts: Vec<&str> = provider.split('/').collect();
        let (number, pool, pool_provider) = (parts.get(1), parts.get(5), parts.get(7));
        let (number, pool, pool_provider) = (
            number.copied().unwrap_or_default(),
            pool.copied().unwrap_or_default(),
            pool_provider.copied().unwrap_or_default(),
        );
        let mut create = format!(
            "gcloud iam workload-identity-pools providers create-oidc {pool_provider} --project={number} --location=global --workload-identity-pool={pool} --issuer-uri={issuer} --attribute-mapping=google.subject=assertion.sub"
        );
        if gcp.audience.is_some() {
            create.push_str(&format!(" --allowed-audiences={audience}"));
        }
        let mut steps = vec![
            step(
                format!("the pool {pool} (once)"),
                format!("gcloud iam workload-identity-pools create {pool} --project={number} --location=global"),
            ),
            step(format!("its OIDC provider {pool_provider} for the issuer"), create),
        ];
        let pool_path = format!("projects/{number}/locations/global/workloadIdentityPools/{pool}");
        for subject in subjects {
            let member = if subject.ends_with(&format!(":{ANY_SERVICE_ACCOUNT}")) {
                format!("principalSet://iam.googleapis.com/{pool_path}/*")
            } else {
                format!("principal://iam.googleapis.com/{pool_path}/subject/{subject}")
            };
            match &gcp.service_account_email {
                Some(email) => steps.push(step(
                    format!("let {subject} impersonate {email}"),
                    format!(
                        "gcloud iam service-accounts add-iam-policy-binding {email} --role=roles/iam.workloadIdentityUser --member={member}"
                    ),
                )),
                None => steps.push(step(
                    format!("grant {subject} its roles on the resources it uses, as the member"),
                    member,
                )),
            }
        }
        return steps;
    }
    subjects
        .iter()
        .map(|subject| {
            step(
                "trust tokens with these claims in the target service",
                format!("iss={issuer} aud={audience} sub={subject}"),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(spec: serde_json::Value) -> CredentialProvider {
        serde_json::from_value(json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": "CredentialProvider",
            "metadata": {"name": "orders", "namespace": "team"}, "spec": spec}))
        .unwrap()
    }

    fn policy(provider: &str, service_account: Option<&str>) -> AccessPolicy {
        let mut client = json!({"podSelector": {}});
        if let Some(sa) = service_account {
            client["serviceAccountName"] = json!(sa);
        }
        serde_json::from_value(json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "p", "namespace": "team"},
            "spec": {"client": client, "trustProviders": [{"name": "k8s"}], "server": {"kind": "aws"},
                     "credentialProvider": {"name": provider}}}))
        .unwrap()
    }

    const ISSUER: &str = "https://oidc.example.com";

    #[test]
    fn aws_gets_the_oidc_provider_and_a_trust_policy_on_the_exact_audience_and_subject() {
        let p = provider(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/orders-s3"}}));
        let trust = of(&p, &[], ISSUER).unwrap();
        assert_eq!(
            (trust.audience.as_str(), &trust.subjects[..]),
            ("sts.amazonaws.com", &["system:cloudpass:team:orders".to_owned()][..])
        );
        assert_eq!(
            trust.configure[0].text,
            "aws iam create-open-id-connect-provider --url https://oidc.example.com --client-id-list sts.amazonaws.com"
        );
        let policy: serde_json::Value = serde_json::from_str(&trust.configure[1].text).unwrap();
        let statement = &policy["Statement"][0];
        assert_eq!(statement["Principal"]["Federated"], "arn:aws:iam::123456789012:oidc-provider/oidc.example.com");
        assert_eq!(statement["Condition"]["StringEquals"]["oidc.example.com:sub"], "system:cloudpass:team:orders");
        assert_eq!(statement["Condition"]["StringEquals"]["oidc.example.com:aud"], "sts.amazonaws.com");
    }

    #[test]
    fn per_service_account_subjects_follow_the_policies_and_a_wildcard_needs_string_like() {
        let p =
            provider(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r", "subject": "ServiceAccount"}}));
        let trust = of(&p, &[policy("orders", Some("api")), policy("other", Some("x"))], ISSUER).unwrap();
        assert_eq!(trust.subjects, ["system:cloudpass:team:orders:api"]);
        let trust = of(&p, &[policy("orders", Some("api")), policy("orders", None)], ISSUER).unwrap();
        assert_eq!(trust.subjects, ["system:cloudpass:team:orders:*", "system:cloudpass:team:orders:api"]);
        let policy: serde_json::Value = serde_json::from_str(&trust.configure[1].text).unwrap();
        assert!(policy["Statement"][0]["Condition"]["StringLike"].is_object(), "{policy}");
    }

    #[test]
    fn azure_and_google_name_their_own_resources_and_an_api_key_needs_nothing() {
        let p = provider(json!({"azureWorkloadIdentity": {"tenantId": "8c1d3f0e-7b6a-4e55-9f21-0a3b5c7d9e11",
            "clientId": "4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55"}}));
        let trust = of(&p, &[], ISSUER).unwrap();
        assert_eq!(trust.audience, "api://AzureADTokenExchange");
        assert!(
            trust.configure[0]
                .text
                .starts_with("az ad app federated-credential create --id 4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55")
        );
        assert!(
            trust.configure[0].text.contains(r#""subject":"system:cloudpass:team:orders""#),
            "{}",
            trust.configure[0].text
        );

        let p = provider(json!({"gcpWorkloadIdentity": {
            "workloadIdentityProvider": "projects/123456789/locations/global/workloadIdentityPools/cloudpass/providers/oidc-1",
            "serviceAccountEmail": "reader@my-project.iam.gserviceaccount.com"}}));
        let trust = of(&p, &[], ISSUER).unwrap();
        assert_eq!(
            trust.audience,
            "https://iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/cloudpass/providers/oidc-1"
        );
        let all: Vec<&str> = trust.configure.iter().map(|s| s.text.as_str()).collect();
        assert!(
            all[1].contains("create-oidc oidc-1 --project=123456789")
                && all[1].contains("--workload-identity-pool=cloudpass")
        );
        assert!(all[2].ends_with("--member=principal://iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/cloudpass/subject/system:cloudpass:team:orders"), "{}", all[2]);

        let p = provider(json!({"apiKey": {"secretRef": {"name": "s", "key": "k"}}}));
        assert!(of(&p, &[], ISSUER).is_none());
    }
}
