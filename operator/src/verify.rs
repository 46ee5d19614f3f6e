//! The `Verified` condition: the leader checks each federated CredentialProvider's
//! cloud-side trust with a real exchange ([`cloudpass_broker::verify`]) when its spec,
//! subject or verification request changes, and again every `--verify-interval`
//! (jittered; sooner while it fails), at most [`CONCURRENT_CHECKS`] at a time and never
//! twice within [`MIN_SPACING`] for one provider. The reconciler turns the latest result
//! into the condition; a finished check reconciles the provider's namespace again.
//!
//! The probe is signed with the issuer's keys, read (never created or rotated) from the
//! broker's key Secret, so this works in the controller of a split deployment too.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cloudpass_api::{
    AccessPolicy, CredentialProvider, VERIFY_REQUESTED_ANNOTATION, cloud_trust,
    common::{CONDITION_VERIFIED, verify_reasons},
    credential::CredentialProviderSpec,
};
use cloudpass_broker::{
    egress::Egress,
    issuer,
    verify::{ProbeSubject, Prober, Verdict},
};
use futures::channel::mpsc;
use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{Client, ResourceExt, runtime::reflector::ObjectRef};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::metrics::{Metrics, ProviderLabels, VerifyLabels};

/// Checks running at once, cluster-wide.
pub const CONCURRENT_CHECKS: usize = 2;
/// The shortest time between two checks of one provider, however often it changes.
pub const MIN_SPACING: Duration = Duration::from_secs(10);
/// How soon a refused check runs again (a fix in the cloud shows up), unless the interval
/// is shorter.
pub const REFUSED_RECHECK: Duration = Duration::from_secs(300);
/// How soon a check that learnt nothing (cloud unreachable) runs again.
pub const UNKNOWN_RECHECK: Duration = Duration::from_secs(60);
/// The longest condition message.
const MAX_MESSAGE: usize = 4000;

/// Where and how often to verify.
pub struct VerifySettings {
    /// The periodic interval (jittered by up to 10 % either way).
    pub interval: Duration,
    /// The issuer URL (`iss` of the probes).
    pub issuer_url: String,
    /// Namespace of the issuer's key Secret.
    pub keys_namespace: String,
    /// Name of the issuer's key Secret.
    pub keys_secret: String,
    /// HTTP client under the broker's egress policy.
    pub http: Egress,
}

/// The content of a `Verified` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedState {
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// The condition's reason: `Verified`, the cloud's error code, `Pending`, ...
    pub reason: String,
    /// What was obtained, or what to configure.
    pub message: String,
    /// When the check finished and which request it answered; `None` until a check of
    /// this spec has finished in this process.
    pub checked: Option<(jiff::Timestamp, Option<String>)>,
}

impl VerifiedState {
    fn pending() -> Self {
        Self {
            status: "Unknown",
            reason: verify_reasons::PENDING.into(),
            message: "the first check of this spec has not finished yet".into(),
            checked: None,
        }
    }

    fn from_condition(c: &Condition) -> Option<Self> {
        let status = match c.status.as_str() {
            "True" => "True",
            "False" => "False",
            _ => "Unknown",
        };
        Some(Self { status, reason: c.reason.clone(), message: c.message.clone(), checked: None })
    }

    /// The state an AccessPolicy using the provider `name` shows: the same status and
    /// reason, with a message that stays the same from check to check.
    pub fn for_policy(&self, name: &str) -> Self {
        let message = match self.status {
            "True" => format!("CredentialProvider {name}: the cloud accepted its tokens"),
            "False" => format!(
                "CredentialProvider {name}: the cloud refused its tokens ({}); the policy stays Ready, but workloads will be refused too: see kubectl cloudpass verify {name}",
                self.reason
            ),
            _ => format!("CredentialProvider {name}: not verified yet ({})", self.reason),
        };
        Self { status: self.status, reason: self.reason.clone(), message, checked: None }
    }
}

/// What a check depends on: a change of any part checks again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CheckKey {
    spec: String,
    /// The probe's `sub`.
    subject: String,
    requested: Option<String>,
}

impl CheckKey {
    /// Whether a result for `other` still describes this key (only the request differs).
    fn same_trust(&self, other: &CheckKey) -> bool {
        self.spec == other.spec && self.subject == other.subject
    }
}

struct Entry {
    key: CheckKey,
    state: Option<VerifiedState>,
    started: Option<Instant>,
    due: Instant,
    running: bool,
    /// When a sleeping task reconciles the namespace for the next check, if one does.
    wake_at: Option<Instant>,
}

/// The leader's verifications.
pub struct Verifier {
    settings: VerifySettings,
    client: Client,
    entries: Mutex<HashMap<(String, String), Entry>>,
    slots: Semaphore,
    trigger: mpsc::UnboundedSender<ObjectRef<Namespace>>,
    metrics: Arc<Metrics>,
}

/// The service account whose subject a provider's probe carries: the first that a policy
/// using it names, else `default` (the provider's subject does not name one unless its
/// format is `ServiceAccount`).
fn probe_service_account(provider: &CredentialProvider, policies: &[AccessPolicy]) -> String {
    let name = provider.name_any();
    policies
        .iter()
        .filter(|p| p.spec.credential_provider.name == name)
        .filter_map(|p| p.spec.client.service_account_name.clone())
        .min()
        .unwrap_or_else(|| "default".into())
}

/// Whether `spec` is verified at all: a federated kind that exchanges at a cloud, with
/// verification on.
fn verifiable(spec: &CredentialProviderSpec) -> bool {
    spec.verification.enabled
        && (spec.aws_sts.is_some() || spec.azure_workload_identity.is_some() || spec.gcp_workload_identity.is_some())
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + 0.2 * cloudpass_rand::fraction())
}

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

impl Verifier {
    /// A verifier, and the stream of namespaces to reconcile when a check finishes.
    pub fn new(
        settings: VerifySettings,
        client: Client,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<ObjectRef<Namespace>>) {
        let (trigger, finished) = mpsc::unbounded();
        let verifier = Self {
            settings,
            client,
            entries: Mutex::default(),
            slots: Semaphore::new(CONCURRENT_CHECKS),
            trigger,
            metrics,
        };
        (Arc::new(verifier), finished)
    }

    /// The `Verified` condition `provider` should carry now, starting a check when one is
    /// due; `None` when it is not verified (a kind with nothing in a cloud, or turned off).
    pub fn state(self: &Arc<Self>, provider: &CredentialProvider, policies: &[AccessPolicy]) -> Option<VerifiedState> {
        let id = (provider.namespace().unwrap_or_default(), provider.name_any());
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if !verifiable(&provider.spec) {
            entries.remove(&id);
            return None;
        }
        let service_account = probe_service_account(provider, policies);
        let subject = provider.spec.federation().map(|f| f.subject.subject(&id.0, &id.1, &service_account));
        let key = CheckKey {
            spec: serde_json::to_string(&provider.spec).unwrap_or_default(),
            subject: subject.unwrap_or_default(),
            requested: provider.annotations().get(VERIFY_REQUESTED_ANNOTATION).cloned(),
        };
        let now = Instant::now();
        let entry = entries.entry(id.clone()).or_insert_with(|| {
            // After a restart or a change of leader, the condition of the current spec
            // stands until its check comes round: no flood of checks and Events.
            let current = provider
                .status
                .as_ref()
                .and_then(|s| s.status.condition(CONDITION_VERIFIED))
                .filter(|c| c.observed_generation == provider.metadata.generation)
                .and_then(VerifiedState::from_condition);
            let due = match &current {
                Some(_) => now + self.settings.interval.min(REFUSED_RECHECK).mul_f64(cloudpass_rand::fraction()),
                None => now,
            };
            Entry { key: key.clone(), state: current, started: None, due, running: false, wake_at: None }
        });
        if entry.key != key {
            if !entry.key.same_trust(&key) {
                entry.state = None;
            }
            entry.key = key.clone();
            entry.due = entry.started.map_or(now, |s| (s + MIN_SPACING).max(now));
        }
        if !entry.running && entry.due <= now {
            entry.running = true;
            entry.started = Some(now);
            let (verifier, spec) = (self.clone(), provider.spec.clone());
            tokio::spawn(async move { verifier.check(id, key, service_account, spec).await });
        } else if !entry.running && entry.wake_at.is_none_or(|at| at > entry.due) {
            // One sleeper per due time; an earlier due time (a change) gets its own.
            entry.wake_at = Some(entry.due);
            let (verifier, due) = (self.clone(), entry.due);
            tokio::spawn(async move { verifier.wake(id, due).await });
        }
        Some(entry.state.clone().unwrap_or_else(VerifiedState::pending))
    }

    /// Forgets the providers of `namespace` that are gone.
    pub fn retain(&self, namespace: &str, names: &BTreeSet<String>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(ns, name), _| {
            let keep = ns != namespace || names.contains(name);
            if !keep {
                self.metrics.verified.remove(&ProviderLabels { namespace: ns.clone(), name: name.clone() });
            }
            keep
        });
    }

    async fn wake(self: Arc<Self>, id: (String, String), due: Instant) {
        tokio::time::sleep_until(due.into()).await;
        if let Some(entry) = self.entries.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&id)
            && entry.wake_at == Some(due)
        {
            entry.wake_at = None;
        }
        let _ = self.trigger.unbounded_send(ObjectRef::new(&id.0));
    }

    async fn check(
        self: Arc<Self>,
        id: (String, String),
        key: CheckKey,
        service_account: String,
        spec: CredentialProviderSpec,
    ) {
        let verdict = {
            let _slot = self.slots.acquire().await;
            self.probe(&id, &service_account, &spec).await
        };
        let (result, gauge, recheck) = match &verdict {
            Verdict::Verified { .. } => ("verified", 1, self.settings.interval),
            Verdict::Refused { .. } => ("refused", 0, self.settings.interval.min(REFUSED_RECHECK)),
            Verdict::Unknown { .. } => ("unknown", -1, self.settings.interval.min(UNKNOWN_RECHECK)),
        };
        self.metrics.verifications.get_or_create(&VerifyLabels { result: result.into() }).inc();
        self.metrics.verified.get_or_create(&ProviderLabels { namespace: id.0.clone(), name: id.1.clone() }).set(gauge);
        let state = VerifiedState {
            checked: Some((jiff::Timestamp::now(), key.requested.clone())),
            ..self.render(&id, &key.subject, &spec, verdict)
        };
        info!(namespace = %id.0, name = %id.1, status = state.status, reason = %state.reason, "CredentialProvider verified");
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = entries.get_mut(&id) else { return };
            entry.running = false;
            if entry.key.same_trust(&key) {
                entry.state = Some(state);
                if entry.key == key {
                    entry.due = Instant::now() + jittered(recheck);
                }
            }
        }
        let _ = self.trigger.unbounded_send(ObjectRef::new(&id.0));
    }

    async fn probe(&self, id: &(String, String), service_account: &str, spec: &CredentialProviderSpec) -> Verdict {
        let s = &self.settings;
        let keys = match issuer::load_keys(&self.client, &s.keys_namespace, &s.keys_secret).await {
            Ok(Some(keys)) => keys,
            Ok(None) => {
                return Verdict::Unknown {
                    reason: verify_reasons::NOT_SIGNED.into(),
                    message: format!(
                        "the issuer's key Secret {}/{} does not exist yet",
                        s.keys_namespace, s.keys_secret
                    ),
                };
            }
            Err(e) => {
                warn!(error = %e, "cannot read the issuer's keys to sign a verification probe");
                return Verdict::Unknown { reason: verify_reasons::NOT_SIGNED.into(), message: e.to_string() };
            }
        };
        let prober = Prober { http: &s.http, keys: &keys, issuer_url: &s.issuer_url };
        let subject = ProbeSubject { namespace: &id.0, provider: &id.1, service_account };
        prober.verify(spec, &subject).await.unwrap_or_else(|| Verdict::Unknown {
            reason: verify_reasons::NOT_CHECKED.into(),
            message: "nothing to check in a cloud".into(),
        })
    }

    /// The condition for a verdict: what was obtained, or the cloud's refusal and exactly
    /// what it must trust.
    fn render(
        &self,
        id: &(String, String),
        sub: &str,
        spec: &CredentialProviderSpec,
        verdict: Verdict,
    ) -> VerifiedState {
        let Some(federation) = spec.federation() else { return VerifiedState::pending() };
        let issuer = &self.settings.issuer_url;
        let claims = format!("iss={issuer} sub={sub} aud={}", federation.audience);
        match verdict {
            Verdict::Verified { obtained, expires_at } => VerifiedState {
                checked: None,
                status: "True",
                reason: verify_reasons::VERIFIED.into(),
                message: match expires_at {
                    Some(t) => {
                        format!("the cloud accepted a token with {claims}: obtained {obtained}, valid until {t}")
                    }
                    None => format!("the cloud accepted a token with {claims}: obtained {obtained}"),
                },
            },
            Verdict::Refused { reason, message } => {
                let steps = cloud_trust::configure(spec, &id.0, &id.1, issuer, &federation.audience, &[sub.to_owned()]);
                let steps: Vec<String> = steps
                    .iter()
                    .map(|step| {
                        let text = serde_json::from_str::<serde_json::Value>(&step.text)
                            .map(|v| v.to_string())
                            .unwrap_or_else(|_| step.text.clone());
                        format!("{}: {text}", step.what)
                    })
                    .collect();
                VerifiedState {
                    checked: None,
                    status: "False",
                    reason,
                    message: bounded(format!(
                        "{message}. The cloud must trust tokens with {claims}. To configure it: {}",
                        steps.join(" | ")
                    )),
                }
            }
            Verdict::Unknown { reason, message } => VerifiedState {
                checked: None,
                status: "Unknown",
                reason,
                message: bounded(format!("{message}; checked again in about a minute")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_federated_kinds_that_exchange_at_a_cloud_are_verified_and_the_field_turns_it_off() {
        let spec = |v: serde_json::Value| serde_json::from_value::<CredentialProviderSpec>(v).unwrap();
        let aws = serde_json::json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}});
        assert!(verifiable(&spec(aws.clone())));
        let mut off = aws;
        off["verification"] = serde_json::json!({"enabled": false});
        assert!(!verifiable(&spec(off)));
        assert!(!verifiable(&spec(serde_json::json!({"oidcToken": {"audience": "a"}}))));
        assert!(!verifiable(&spec(serde_json::json!({"apiKey": {"secretRef": {"name": "s", "key": "k"}}}))));
    }

    #[test]
    fn a_policys_message_stays_the_same_from_check_to_check() {
        let a = VerifiedState {
            status: "True",
            reason: "Verified".into(),
            message: "valid until 1".into(),
            checked: Some((jiff::Timestamp::UNIX_EPOCH, None)),
        };
        let b = VerifiedState { message: "valid until 2".into(), ..a.clone() };
        assert_eq!(a.for_policy("p"), b.for_policy("p"));
        let refused = VerifiedState { status: "False", reason: "AccessDenied".into(), ..a };
        assert!(refused.for_policy("p").message.contains("AccessDenied"));
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = bounded(long);
        assert!(cut.len() <= MAX_MESSAGE + 3 && cut.ends_with("..."));
    }
}
