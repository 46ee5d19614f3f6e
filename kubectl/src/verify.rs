//! `kubectl cloudpass verify`: asks the operator to check a federated CredentialProvider's
//! cloud-side trust now (the `cloudpass.dev/verify-requested-at` annotation, as Flux's
//! `reconcile.fluxcd.io/requestedAt`), waits until `status.lastVerification` answers that
//! request, and prints the `Verified` condition.

use std::time::{Duration, Instant};

use cloudpass_api::{
    CredentialProvider, VERIFY_REQUESTED_ANNOTATION,
    common::{CONDITION_VERIFIED, LastVerification},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde::Serialize;

use crate::{Error, Output, VerifyArgs, client, columns};

/// How often the status is read while waiting.
const POLL: Duration = Duration::from_millis(500);

/// The answer to one request.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Answer {
    namespace: String,
    name: String,
    /// The `Verified` condition.
    verified: Condition,
    /// When the check ran and which request it answered.
    last_verification: LastVerification,
}

/// Why `provider` cannot be verified, if it cannot.
fn not_verifiable(provider: &CredentialProvider, namespace: &str) -> Option<String> {
    let name = &provider.metadata.name.as_deref().unwrap_or_default();
    let spec = &provider.spec;
    let kind = spec.kind_name().unwrap_or("no kind");
    if spec.aws_sts.is_none() && spec.azure_workload_identity.is_none() && spec.gcp_workload_identity.is_none() {
        return Some(format!(
            "CredentialProvider {namespace}/{name} is of kind {kind}, which exchanges nothing at a cloud: nothing to verify"
        ));
    }
    (!spec.verification.enabled).then(|| {
        format!("verification is off for CredentialProvider {namespace}/{name} (spec.verification.enabled: false)")
    })
}

/// Runs the check; the text to print and whether the cloud accepted.
pub async fn run(args: VerifyArgs) -> Result<(String, bool), Error> {
    let (client, default_namespace) = client().await?;
    let namespace = args.namespace.unwrap_or(default_namespace);
    let name = &args.name;
    let api: Api<CredentialProvider> = Api::namespaced(client, &namespace);
    let missing = || Error::NotFound(format!("CredentialProvider {namespace}/{name} not found"));
    let provider = api.get_opt(name).await?.ok_or_else(missing)?;
    if let Some(why) = not_verifiable(&provider, &namespace) {
        return Err(Error::NotFound(why));
    }
    // Unique per call: the time to the nanosecond.
    let request = jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {VERIFY_REQUESTED_ANNOTATION: request}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let deadline = Instant::now() + args.timeout;
    let answer = loop {
        let provider = api.get_opt(name).await?.ok_or_else(missing)?;
        let status = provider.status.unwrap_or_default();
        let answered = status.last_verification.filter(|l| l.request.as_deref() == Some(request.as_str()));
        if let (Some(last_verification), Some(verified)) = (answered, status.status.condition(CONDITION_VERIFIED)) {
            break Answer { namespace, name: name.clone(), verified: verified.clone(), last_verification };
        }
        if Instant::now() > deadline {
            return Err(Error::NotFound(format!(
                "no check of CredentialProvider {namespace}/{name} answered within {:?}: is the cloudpass controller running, with --verify-interval other than 0s?",
                args.timeout
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    let accepted = answer.verified.status == "True";
    let text = match args.output {
        Output::Json => {
            serde_json::to_string_pretty(&answer).map(|s| s + "\n").map_err(|e| Error::Format(e.to_string()))?
        }
        Output::Yaml => serde_yaml::to_string(&answer).map_err(|e| Error::Format(e.to_string()))?,
        Output::Table => {
            let c = &answer.verified;
            let mut out = columns(
                ["NAMESPACE", "NAME", "VERIFIED", "REASON", "CHECKED"],
                std::iter::once([
                    answer.namespace.clone(),
                    answer.name.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    answer.last_verification.time.0.to_string(),
                ]),
            );
            out.push('\n');
            // The configuration steps read better one per line.
            out.push_str(&c.message.replace(" | ", "\n  "));
            out.push('\n');
            out
        }
    };
    Ok((text, accepted))
}
