//! The namespace reconciler: one pass evaluates every cloudpass object of a namespace
//! together (readiness of a policy depends on its providers, conflicts and the compiled
//! config on all policies), then writes only what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use cloudpass_api::{
    AccessPolicy, CONFIG_DATA_KEY, CONFIG_HASH_ANNOTATION, CONFIG_NAMESPACE_LABEL, CredentialProvider,
    INJECTION_ENABLED, INJECTION_LABEL, Status, TrustProvider,
    common::{CONDITION_READY, CONDITION_VERIFIED, LastVerification, ProviderStatus, reasons},
    policy::AccessPolicyStatus,
};
use cloudpass_outbound::Retry;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::{info, warn};

use crate::{
    Error,
    broker_ca::NamespaceBrokerCa,
    evaluate::{Evaluation, Outcome, Snapshot, evaluate},
    metrics::{Metrics, ObjectLabels},
    secret_access::BrokerSecretAccess,
    verify::{VerifiedState, Verifier, VerifySettings},
};

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "cloudpass-operator";
/// How often every namespace is re-evaluated without a change (Secrets are read, not
/// watched, so this bounds how long a deleted Secret key goes unnoticed in status; the
/// broker reads the Secret when it needs it and refuses at once).
pub const RESYNC: Duration = Duration::from_secs(300);
/// The reconcile debounce unless `--reconcile-debounce` says otherwise: long enough that
/// an `apply` of many objects costs one reconcile per namespace.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);
/// How soon a namespace handed to the controller before its caches were full comes back.
pub const WARMING_RECHECK: Duration = Duration::from_millis(500);
/// How often a namespace waiting for a referenced Secret (or one of its keys) looks again.
pub const SECRET_RECHECK: Duration = Duration::from_secs(10);

/// Shared state of the reconciler.
pub struct Context {
    client: Client,
    trust: Store<TrustProvider>,
    credential: Store<CredentialProvider>,
    policies: Store<AccessPolicy>,
    configs: Store<ConfigMap>,
    recorder: Recorder,
    /// Namespace the operator runs in; compiled configs are stored there.
    pub operator_namespace: String,
    metrics: Arc<Metrics>,
    /// The retry delays of each namespace whose last reconcile failed.
    retries: std::sync::Mutex<BTreeMap<String, Retry>>,
    /// The broker's access to referenced Secrets, when it has its own service account.
    broker_secret_access: Option<Arc<BrokerSecretAccess>>,
    /// The copies of the broker's CA bundle in opted-in namespaces, when kept.
    broker_ca: Option<NamespaceBrokerCa>,
    /// The `Verified` checks, when on.
    verifier: Option<Arc<Verifier>>,
    /// Whether every cache holds its full initial list. Until then a namespace looks
    /// empty (or half-listed) and reconciling it would delete its compiled config, so the
    /// broker would deny and the webhook skip its pods.
    warm: std::sync::atomic::AtomicBool,
}

/// Name of the ConfigMap holding a namespace's compiled config.
pub fn config_map_name(namespace: &str) -> String {
    format!("cloudpass-config-{namespace}")
}

fn in_namespace<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, namespace: &str) -> Vec<Arc<K>> {
    let mut objects: Vec<_> =
        store.state().into_iter().filter(|o| o.namespace().as_deref() == Some(namespace)).collect();
    objects.sort_by_key(|o| o.name_any());
    objects
}

/// Reconciles one namespace, recording its duration and outcome.
pub async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    // The caches fill while the controller runs (it polls their watches), so it cannot
    // wait to start; the namespaces it is handed meanwhile come back once they are full.
    if !ctx.warm.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(Action::requeue(WARMING_RECHECK));
    }
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let name = ns.name_any();
    let opted_in = ns.labels().get(INJECTION_LABEL).map(String::as_str) == Some(INJECTION_ENABLED);
    let result = reconcile_namespace(&name, &ns.uid().unwrap_or_default(), opted_in, &ctx).await;
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.retries.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
    }
    result
}

fn object_counts(evaluation: &Evaluation) -> BTreeMap<ObjectLabels, i64> {
    let mut counts = BTreeMap::new();
    for (kind, outcomes) in [
        ("TrustProvider", &evaluation.trust),
        ("CredentialProvider", &evaluation.credential),
        ("AccessPolicy", &evaluation.policies),
    ] {
        for o in outcomes.values() {
            let labels =
                ObjectLabels { kind: kind.to_owned(), ready: o.ready.to_string(), reason: o.reason.to_owned() };
            *counts.entry(labels).or_default() += 1;
        }
    }
    counts
}

async fn reconcile_namespace(
    namespace: &str,
    namespace_uid: &str,
    opted_in: bool,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = namespace.to_owned();
    let trust = in_namespace(&ctx.trust, &namespace);
    let credential = in_namespace(&ctx.credential, &namespace);
    let policies = in_namespace(&ctx.policies, &namespace);

    // Only the Secrets that providers reference are read, and only their key names kept.
    let wanted: BTreeSet<String> = credential.iter().flat_map(|c| c.spec.secret_refs()).map(|r| r.name).collect();
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut secrets = BTreeMap::new();
    for name in &wanted {
        if let Some(secret) = secrets_api.get_opt(name).await? {
            secrets.insert(name.clone(), secret.data.unwrap_or_default().into_keys().collect());
        }
    }
    if let Some(access) = &ctx.broker_secret_access {
        access.sync(&namespace, namespace_uid, &wanted).await?;
    }

    let snapshot = Snapshot {
        namespace: &namespace,
        trust: trust.iter().map(AsRef::as_ref).collect(),
        credential: credential.iter().map(AsRef::as_ref).collect(),
        policies: policies.iter().map(AsRef::as_ref).collect(),
        secrets,
    };
    let evaluation = evaluate(&snapshot);
    ctx.metrics.record_namespace(&namespace, object_counts(&evaluation));
    let policy_hashes: BTreeMap<String, String> = (evaluation.config.iter())
        .flat_map(|c| c.policies.iter().filter_map(|p| Some((p.name.clone(), c.policy_hash(&p.name)?))))
        .collect();
    // The CA copy first: a pod injected by the new config mounts it.
    if let Some(ca) = &ctx.broker_ca {
        ca.sync(&ctx.operator_namespace, &namespace, opted_in).await?;
    }
    ctx.write_config(&namespace, evaluation.config).await?;

    // The cloud-side check of each federated provider that is Ready (a spec the operator
    // refuses is not worth a call to a cloud).
    let policy_objects: Vec<AccessPolicy> = policies.iter().map(|p| p.as_ref().clone()).collect();
    let verified: BTreeMap<String, VerifiedState> = match &ctx.verifier {
        Some(verifier) => {
            verifier.retain(&namespace, &credential.iter().map(|c| c.name_any()).collect());
            credential
                .iter()
                .filter(|c| evaluation.credential[&c.name_any()].ready)
                .filter_map(|c| Some((c.name_any(), verifier.state(c, &policy_objects)?)))
                .collect()
        }
        None => BTreeMap::new(),
    };

    let trust_kinds = trust.iter().map(|o| (o.as_ref(), o.status.clone(), o.spec.kind_name()));
    let credential_kinds = credential.iter().map(|o| (o.as_ref(), o.status.clone(), o.spec.kind_name()));
    for (object, status, kind) in trust_kinds {
        ctx.write_provider_status(object, status, kind, &evaluation.trust[&object.name_any()], None).await?;
    }
    for (object, status, kind) in credential_kinds {
        let name = object.name_any();
        ctx.write_provider_status(object, status, kind, &evaluation.credential[&name], verified.get(&name)).await?;
    }
    for object in &policies {
        let outcome = &evaluation.policies[&object.name_any()];
        let provider = &object.spec.credential_provider.name;
        let verified = verified.get(provider).filter(|_| outcome.ready).map(|v| v.for_policy(provider));
        let status = object.status.clone().unwrap_or_default();
        let desired = AccessPolicyStatus {
            status: desired_status(&status.status, object.meta().generation, outcome, verified.as_ref()),
            config_hash: if outcome.ready { policy_hashes.get(&object.name_any()).cloned() } else { None },
        };
        ctx.write_status(object.as_ref(), &status.status, &status, desired, outcome).await?;
    }
    // Secrets are not watched (the controller may not list them): while one a provider
    // needs is missing, look again soon.
    let waiting_for_secret = evaluation.credential.values().any(|o| o.reason == reasons::SECRET_NOT_FOUND);
    Ok(Action::requeue(if waiting_for_secret { SECRET_RECHECK } else { RESYNC }))
}

/// One condition, keeping its transition time while its status stays the same.
fn condition(
    current: &Status,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let last_transition_time = match current.condition(type_) {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(jiff::Timestamp::now()),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status an object should have: its `Ready` condition from the outcome, and its
/// `Verified` condition when it has one (none removes it).
fn desired_status(
    current: &Status,
    generation: Option<i64>,
    outcome: &Outcome,
    verified: Option<&VerifiedState>,
) -> Status {
    let status = if outcome.ready { "True" } else { "False" };
    let mut conditions: Vec<Condition> = current
        .conditions
        .iter()
        .filter(|c| c.type_ != CONDITION_READY && c.type_ != CONDITION_VERIFIED)
        .cloned()
        .collect();
    conditions.push(condition(current, CONDITION_READY, status, outcome.reason, &outcome.message, generation));
    if let Some(v) = verified {
        conditions.push(condition(current, CONDITION_VERIFIED, v.status, &v.reason, &v.message, generation));
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    Status { conditions, observed_generation: generation }
}

/// A namespaced cloudpass object whose status the reconciler writes.
trait NamespacedObject:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug
{
}

impl<K> NamespacedObject for K where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
{
}

impl Context {
    /// Writes a TrustProvider's or CredentialProvider's status when it changed.
    async fn write_provider_status<K: NamespacedObject>(
        &self,
        object: &K,
        current: Option<ProviderStatus>,
        kind: Option<&str>,
        outcome: &Outcome,
        verified: Option<&VerifiedState>,
    ) -> Result<(), Error> {
        let current = current.unwrap_or_default();
        // The last check's time and request, kept while a new spec's check is pending.
        let last_verification = verified.and_then(|v| match &v.checked {
            Some((time, request)) => Some(LastVerification { time: Time(*time), request: request.clone() }),
            None => current.last_verification.clone(),
        });
        let desired = ProviderStatus {
            status: desired_status(&current.status, object.meta().generation, outcome, verified),
            provider_kind: kind.map(str::to_owned),
            last_verification,
        };
        self.write_status(object, &current.status, &current, desired, outcome).await
    }

    /// Patches the status subresource when it differs, and records an Event when the
    /// `Ready` condition changed.
    async fn write_status<K: NamespacedObject, S>(
        &self,
        object: &K,
        current: &Status,
        full_current: &S,
        desired: S,
        outcome: &Outcome,
    ) -> Result<(), Error>
    where
        S: Serialize + PartialEq,
    {
        if *full_current == desired {
            return Ok(());
        }
        let verified_after = serde_json::to_value(&desired)
            .ok()
            .and_then(|v| serde_json::from_value::<Status>(v).ok())
            .and_then(|s| s.condition(CONDITION_VERIFIED).cloned());
        let namespace = object.namespace().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), &namespace);
        let patch = serde_json::json!({ "status": merge_patch(full_current, &desired) });
        api.patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        self.metrics.write("status");

        let before = current.condition(CONDITION_READY);
        let changed = before.is_none_or(|c| c.reason != outcome.reason || (c.status == "True") != outcome.ready);
        if changed {
            let event = Event {
                type_: if outcome.ready { EventType::Normal } else { EventType::Warning },
                reason: outcome.reason.into(),
                note: Some(outcome.message.chars().take(1000).collect()),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
                warn!(error = %e, object = %object.name_any(), "could not record an Event");
            }
            info!(kind = %K::kind(&()), namespace, name = %object.name_any(), ready = outcome.ready, reason = outcome.reason, message = %outcome.message, "Ready changed");
        }
        // An Event on each transition of a provider's check (policies follow it).
        let verified_before = current.condition(CONDITION_VERIFIED);
        if K::kind(&()) == "CredentialProvider"
            && let Some(after) = verified_after
            && verified_before.is_none_or(|b| b.status != after.status || b.reason != after.reason)
            && after.reason != cloudpass_api::common::verify_reasons::PENDING
        {
            let event = Event {
                type_: if after.status == "True" { EventType::Normal } else { EventType::Warning },
                reason: after.reason.clone(),
                note: Some(after.message.chars().take(1000).collect()),
                action: "Verify".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
                warn!(error = %e, object = %object.name_any(), "could not record an Event");
            }
        }
        Ok(())
    }

    /// Creates, updates or deletes the namespace's compiled-config ConfigMap, writing only
    /// when the content hash changed.
    async fn write_config(
        &self,
        namespace: &str,
        config: Option<cloudpass_api::config::NamespaceConfig>,
    ) -> Result<(), Error> {
        let name = config_map_name(namespace);
        let existing = self.configs.get(&ObjectRef::new(&name).within(&self.operator_namespace));
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.operator_namespace);
        match config {
            Some(config) => {
                let current_hash =
                    existing.as_ref().and_then(|cm| cm.annotations().get(CONFIG_HASH_ANNOTATION).cloned());
                if current_hash.as_deref() == Some(config.hash.as_str()) {
                    return Ok(());
                }
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.operator_namespace.clone()),
                        labels: Some(
                            [
                                (CONFIG_NAMESPACE_LABEL.to_owned(), namespace.to_owned()),
                                ("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned()),
                            ]
                            .into(),
                        ),
                        annotations: Some([(CONFIG_HASH_ANNOTATION.to_owned(), config.hash.clone())].into()),
                        ..Default::default()
                    },
                    data: Some([(CONFIG_DATA_KEY.to_owned(), config.to_json())].into()),
                    ..Default::default()
                };
                api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm)).await?;
                self.metrics.write("configmap_apply");
                info!(namespace, hash = %config.hash, policies = config.policies.len(), "compiled config written");
            }
            None if existing.is_some() => {
                api.delete(&name, &DeleteParams::default()).await?;
                self.metrics.write("configmap_delete");
                info!(namespace, "no Ready policy left; compiled config deleted");
            }
            None => {}
        }
        Ok(())
    }
}

/// A JSON merge patch from `current` to `desired`: fields that `desired` drops are set
/// to `null`, which is how a merge patch removes them.
fn merge_patch<S: Serialize>(current: &S, desired: &S) -> serde_json::Value {
    let mut patch = serde_json::to_value(desired).unwrap_or_default();
    if let (Some(old), Some(new)) = (serde_json::to_value(current).ok(), patch.as_object_mut()) {
        for key in old.as_object().into_iter().flat_map(|o| o.keys()) {
            new.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    patch
}

/// The first delay before retrying a failed namespace; it doubles per failure up to
/// [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// The longest delay before retrying a namespace, however many failures.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(256);

fn error_policy(ns: Arc<Namespace>, error: &Error, ctx: Arc<Context>) -> Action {
    let reason = error.metric_label();
    ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::ReasonLabels { reason: reason.into() }).inc();
    // Jittered, so that the namespaces an apiserver outage failed together are not
    // retried together.
    let (delay, failures) = {
        let mut all = ctx.retries.lock().unwrap_or_else(|e| e.into_inner());
        let retry = all.entry(ns.name_any()).or_insert_with(|| Retry::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY));
        (retry.failed(cloudpass_rand::fraction()), retry.failures())
    };
    warn!(namespace = %ns.name_any(), error = %error, reason, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Settings of the controller.
pub struct Settings {
    /// Namespace the operator runs in.
    pub operator_namespace: String,
    /// Name reported on Events (the pod name in a cluster).
    pub instance: Option<String>,
    /// Namespaces reconciled at once.
    pub concurrency: u16,
    /// How long a namespace's objects must stay unchanged before it is reconciled.
    pub debounce: Duration,
    /// When the broker runs under its own service account: its per-namespace access to
    /// the referenced Secrets, kept by the controller.
    pub broker_secret_access: Option<Arc<BrokerSecretAccess>>,
    /// Name of the ConfigMap in the operator's namespace where the broker publishes its
    /// CA bundle: when set, the controller keeps a copy of it in every opted-in
    /// namespace (see [`crate::broker_ca`]).
    pub broker_ca_configmap: Option<String>,
    /// The `Verified` checks of federated CredentialProviders, when on.
    pub verify: Option<VerifySettings>,
}

/// Drops what the controller never reads from a cached object: its managed fields and
/// `kubectl apply`'s copy of the last applied object, which together are often larger
/// than the rest (the caches hold every object of the cluster).
fn slim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    if let Some(annotations) = object.meta_mut().annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

fn namespace_of<K: Resource>(object: K) -> Option<ObjectRef<Namespace>> {
    object.meta().namespace.as_deref().map(ObjectRef::new)
}

/// Runs the controller until `shutdown` completes; calls `on_warm` once every cache is
/// filled and reconciling starts.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    on_warm: impl FnOnce(),
) {
    let cfg = watcher::Config::default();
    let (trust, trust_w) = reflector::store();
    let (credential, credential_w) = reflector::store();
    let (policies, policies_w) = reflector::store();
    let (configs, configs_w) = reflector::store();
    let trust_stream = reflector::reflector(
        trust_w,
        watcher(Api::<TrustProvider>::all(client.clone()), cfg.clone()).modify(slim::<TrustProvider>),
    )
    .default_backoff()
    .touched_objects();
    let credential_stream = reflector::reflector(
        credential_w,
        watcher(Api::<CredentialProvider>::all(client.clone()), cfg.clone()).modify(slim::<CredentialProvider>),
    )
    .default_backoff()
    .touched_objects();
    let policy_stream = reflector::reflector(
        policies_w,
        watcher(Api::<AccessPolicy>::all(client.clone()), cfg.clone()).modify(slim::<AccessPolicy>),
    )
    .default_backoff()
    .touched_objects();
    let config_cfg = watcher::Config::default().labels(CONFIG_NAMESPACE_LABEL);
    let config_stream = reflector::reflector(
        configs_w,
        watcher(Api::<ConfigMap>::namespaced(client.clone(), &settings.operator_namespace), config_cfg)
            .modify(slim::<ConfigMap>),
    )
    .default_backoff()
    .touched_objects();

    // Every ConfigMap named like the published broker CA: the original, whose change
    // reconciles every namespace again (each copy follows a rotation), and the copies,
    // whose change reconciles their own namespace (one deleted by hand comes back). Not
    // part of the warm gate: until this cache is filled a namespace writes and deletes no
    // copy (no original, no copy seen), and a watch refused for lack of RBAC must not
    // stop every namespace from being reconciled (it logs, and retries).
    let (broker_ca, broker_ca_w) = reflector::store();
    let broker_ca_stream = settings.broker_ca_configmap.as_ref().map(|name| {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        reflector::reflector(broker_ca_w, watcher(Api::<ConfigMap>::all(client.clone()), cfg).modify(slim::<ConfigMap>))
            .default_backoff()
            .touched_objects()
    });

    let verifier = settings.verify.map(|v| Verifier::new(v, client.clone(), metrics.clone()));
    let ctx = Arc::new(Context {
        client: client.clone(),
        trust: trust.clone(),
        credential: credential.clone(),
        policies: policies.clone(),
        configs: configs.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: FIELD_MANAGER.into(), instance: settings.instance.clone() },
        ),
        operator_namespace: settings.operator_namespace.clone(),
        metrics,
        retries: Default::default(),
        broker_secret_access: settings.broker_secret_access.clone(),
        broker_ca: (settings.broker_ca_configmap.clone())
            .map(|name| NamespaceBrokerCa::new(client.clone(), name, broker_ca.clone())),
        verifier: verifier.as_ref().map(|(v, _)| v.clone()),
        warm: Default::default(),
    });

    let controller = Controller::new(Api::<Namespace>::all(client.clone()), cfg);
    let namespaces = controller.store();
    let mut controller = controller
        .with_config(
            kube::runtime::controller::Config::default().concurrency(settings.concurrency).debounce(settings.debounce),
        )
        .watches_stream(trust_stream, namespace_of)
        .watches_stream(credential_stream, namespace_of)
        .watches_stream(policy_stream, namespace_of)
        .watches_stream(config_stream, |cm: ConfigMap| {
            cm.labels().get(CONFIG_NAMESPACE_LABEL).map(|ns| ObjectRef::new(ns))
        })
        .graceful_shutdown_on(shutdown);
    if let Some((_, finished)) = verifier {
        // A finished check reconciles its provider's namespace, which writes the condition.
        controller = controller.reconcile_on(finished);
    }
    if let Some(stream) = broker_ca_stream {
        let operator_namespace = settings.operator_namespace.clone();
        controller = controller.watches_stream(stream, move |cm: ConfigMap| {
            if cm.namespace().as_deref() == Some(operator_namespace.as_str()) {
                namespaces.state().iter().map(|ns| ObjectRef::from_obj(ns.as_ref())).collect()
            } else {
                namespace_of(cm).into_iter().collect::<Vec<_>>()
            }
        });
    }

    // Reconciling before the caches are complete would, for example, delete the config of
    // a namespace whose policies have not been listed yet: wait for every cache first.
    let warm = {
        let (trust, credential, policies, configs) =
            (trust.clone(), credential.clone(), policies.clone(), configs.clone());
        let ctx = ctx.clone();
        async move {
            let _ = futures::join!(
                trust.wait_until_ready(),
                credential.wait_until_ready(),
                policies.wait_until_ready(),
                configs.wait_until_ready()
            );
            ctx.warm.store(true, std::sync::atomic::Ordering::Release);
            info!("caches warm; reconciling");
            on_warm();
        }
    };
    let run = controller.run(reconcile, error_policy, ctx).for_each(|result| async move {
        if let Err(e) = result {
            warn!(error = %e, "controller stream error");
        }
    });
    futures::join!(warm, run);
}

/// Deletes compiled configs whose namespace no longer exists (the controller does not
/// reconcile a namespace that is gone).
pub async fn collect_orphaned_configs(client: &Client, operator_namespace: &str) -> Result<usize, Error> {
    let namespaces: BTreeSet<String> = Api::<Namespace>::all(client.clone())
        .list_metadata(&Default::default())
        .await?
        .items
        .into_iter()
        .map(|n| n.name_any())
        .collect();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), operator_namespace);
    let stale: Vec<String> = api
        .list_metadata(&kube::api::ListParams::default().labels(CONFIG_NAMESPACE_LABEL))
        .await?
        .items
        .into_iter()
        .filter(|cm| cm.labels().get(CONFIG_NAMESPACE_LABEL).is_some_and(|ns| !namespaces.contains(ns)))
        .map(|cm| cm.name_any())
        .collect();
    let params = DeleteParams::default();
    futures::stream::iter(stale.iter())
        .map(|name| api.delete(name, &params))
        .buffer_unordered(4)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_retry_delay_is_shorter_than_the_resync() {
        let mut retry = Retry::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let delays: Vec<u64> = (0..12).map(|_| retry.failed(1.0).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256, 256, 256]);
        assert!(MAX_RETRY_DELAY <= RESYNC);
    }

    #[test]
    fn merge_patch_removes_dropped_fields() {
        let current = AccessPolicyStatus { config_hash: Some("sha256:x".into()), ..Default::default() };
        let patch = merge_patch(&current, &AccessPolicyStatus::default());
        assert_eq!(patch["configHash"], serde_json::Value::Null);
    }
}
