//! The decision core of the operator, free of I/O: given everything cloudpass has in one
//! namespace, which objects are Ready, why the others are not, and what the compiled
//! config is. The reconciler feeds it from its caches and writes the result.

use std::collections::{BTreeMap, BTreeSet};

use cloudpass_api::{
    AccessPolicy, CredentialProvider, TrustProvider,
    common::reasons,
    config::{CompiledPolicy, NamespaceConfig},
    fit::{Delivery, Misfit},
    policy::{ClientSelector, ServerKind},
    selector::host_matches,
};
use kube::ResourceExt;

/// Everything of one namespace that readiness depends on.
#[derive(Default)]
pub struct Snapshot<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// Its TrustProviders.
    pub trust: Vec<&'a TrustProvider>,
    /// Its CredentialProviders.
    pub credential: Vec<&'a CredentialProvider>,
    /// Its AccessPolicies.
    pub policies: Vec<&'a AccessPolicy>,
    /// Its Secrets that providers reference: name to the keys of its data.
    pub secrets: BTreeMap<String, BTreeSet<String>>,
}

/// Verdict on one object: its `Ready` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the object is Ready.
    pub ready: bool,
    /// The condition's reason, one of [`reasons`].
    pub reason: &'static str,
    /// What a human needs to know (and do).
    pub message: String,
}

impl Outcome {
    fn ready(message: impl Into<String>) -> Self {
        Self { ready: true, reason: reasons::READY, message: message.into() }
    }

    fn not_ready(reason: &'static str, message: impl Into<String>) -> Self {
        Self { ready: false, reason, message: message.into() }
    }
}

/// The verdicts for a namespace, by object name, and its compiled config.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// The verdict on each TrustProvider of the namespace, by name.
    pub trust: BTreeMap<String, Outcome>,
    /// The verdict on each CredentialProvider of the namespace, by name.
    pub credential: BTreeMap<String, Outcome>,
    /// The verdict on each AccessPolicy of the namespace, by name.
    pub policies: BTreeMap<String, Outcome>,
    /// The compiled config, or `None` when no policy is Ready.
    pub config: Option<NamespaceConfig>,
}

/// Decides readiness for every object of the namespace and compiles its config.
pub fn evaluate(snapshot: &Snapshot<'_>) -> Evaluation {
    let trust: BTreeMap<String, Outcome> = snapshot.trust.iter().map(|t| (t.name_any(), evaluate_trust(t))).collect();
    let mut credential: BTreeMap<String, Outcome> =
        snapshot.credential.iter().map(|c| (c.name_any(), evaluate_credential(c, &snapshot.secrets))).collect();
    // The secret-store kinds depend on the provider that reads for them (which is never a
    // store kind itself, so one pass settles them).
    for provider in &snapshot.credential {
        if let Some(outcome) = evaluate_store_reader(provider, snapshot, &credential) {
            credential.insert(provider.name_any(), outcome);
        }
    }

    let mut policies: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut candidates = Vec::new();
    for policy in &snapshot.policies {
        let outcome = evaluate_policy(policy, snapshot, &trust, &credential);
        if outcome.ready {
            candidates.push(*policy);
        }
        policies.insert(policy.name_any(), outcome);
    }
    for (name, message) in conflicts(&candidates) {
        policies.insert(name, Outcome::not_ready(reasons::CONFLICT, message));
    }

    let compiled: Vec<CompiledPolicy> = snapshot
        .policies
        .iter()
        .filter(|p| policies.get(&p.name_any()).is_some_and(|o| o.ready))
        .map(|p| compile(p))
        .collect();
    // Only Ready providers are compiled: the broker verifies and mints with nothing else,
    // whatever refers to them.
    let is_ready = |outcomes: &BTreeMap<String, Outcome>, name: &str| outcomes.get(name).is_some_and(|o| o.ready);
    let config = (!compiled.is_empty()).then(|| {
        NamespaceConfig::new(
            snapshot.namespace,
            snapshot
                .trust
                .iter()
                .filter(|t| is_ready(&trust, &t.name_any()))
                .map(|t| (t.name_any(), t.spec.clone()))
                .collect(),
            snapshot
                .credential
                .iter()
                .filter(|c| is_ready(&credential, &c.name_any()))
                .map(|c| (c.name_any(), c.spec.clone()))
                .collect(),
            compiled,
        )
    });
    Evaluation { trust, credential, policies, config }
}

fn evaluate_trust(provider: &TrustProvider) -> Outcome {
    let spec = &provider.spec;
    if let Some(k8s) = &spec.kubernetes_service_account {
        if let Some(jwks) = &k8s.jwks
            && let Err(why) = check_public_jwks(jwks)
        {
            return Outcome::not_ready(reasons::INVALID_SPEC, format!("kubernetesServiceAccount.jwks: {why}"));
        }
        return Outcome::ready(match &k8s.issuer {
            None => "verifies service-account tokens of this cluster with TokenReview".to_owned(),
            Some(issuer) => format!("verifies service-account tokens of the cluster with issuer {issuer}"),
        });
    }
    match spec.kind_name() {
        Some(kind) => Outcome::ready(format!("verifies callers with {kind}")),
        None => Outcome::not_ready(reasons::INVALID_SPEC, "no trust kind is set"),
    }
}

/// An inline JWKS must be a JSON object with public keys only.
fn check_public_jwks(text: &str) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let keys = value["keys"].as_array().ok_or("expected an object with a \"keys\" array")?;
    if keys.is_empty() {
        return Err("the key set is empty".to_owned());
    }
    for (i, key) in keys.iter().enumerate() {
        let Some(kty) = key["kty"].as_str() else {
            return Err(format!("key {i} has no \"kty\""));
        };
        // Private members of RSA, EC and OKP keys, and symmetric keys (a shared secret
        // verifies what anyone who reads it signs): a JWKS here must never hold them.
        if kty == "oct" || ["d", "p", "q", "dp", "dq", "qi", "oth", "k"].iter().any(|m| key.get(*m).is_some()) {
            return Err(format!("key {i} contains private key material; publish public keys only"));
        }
    }
    Ok(())
}

fn evaluate_credential(provider: &CredentialProvider, secrets: &BTreeMap<String, BTreeSet<String>>) -> Outcome {
    let namespace = provider.namespace().unwrap_or_default();
    for secret in provider.spec.secret_refs() {
        match secrets.get(&secret.name) {
            None => {
                return Outcome::not_ready(
                    reasons::SECRET_NOT_FOUND,
                    format!("Secret {} not found in namespace {namespace}", secret.name),
                );
            }
            Some(keys) if !keys.contains(&secret.key) => {
                return Outcome::not_ready(
                    reasons::SECRET_NOT_FOUND,
                    format!("Secret {} has no key {:?}", secret.name, secret.key),
                );
            }
            Some(_) => {}
        }
    }
    match provider.spec.kind_name() {
        Some(kind) => Outcome::ready(format!("obtains credentials with {kind}")),
        None => Outcome::not_ready(reasons::INVALID_SPEC, "no credential kind is set"),
    }
}

/// For a secret-store kind that is otherwise Ready: whether the provider that reads the
/// secret exists, is of the cloud's federated kind and is Ready.
fn evaluate_store_reader(
    provider: &CredentialProvider,
    snapshot: &Snapshot<'_>,
    credential: &BTreeMap<String, Outcome>,
) -> Option<Outcome> {
    let store = provider.spec.store()?;
    if !credential.get(&provider.name_any()).is_some_and(|o| o.ready) {
        return None;
    }
    let name = &store.read().credential_provider_ref.name;
    let kind = provider.spec.kind_name().unwrap_or_default();
    let wanted = store.federated_kind();
    let Some(reader) = snapshot.credential.iter().find(|c| &c.name_any() == name) else {
        return Some(Outcome::not_ready(
            reasons::PROVIDER_NOT_FOUND,
            format!("CredentialProvider {name} ({wanted}, to read {}) not found in this namespace", store.describe()),
        ));
    };
    if reader.spec.kind_name() != Some(wanted) {
        return Some(Outcome::not_ready(
            reasons::INVALID_SPEC,
            format!(
                "{kind} reads with a CredentialProvider of kind {wanted}; {name} is of kind {}",
                reader.spec.kind_name().unwrap_or("of no kind")
            ),
        ));
    }
    if let Some(not_ready) = reference_outcome("CredentialProvider", name, credential) {
        return Some(not_ready);
    }
    Some(Outcome::ready(format!("reads {} with the credentials of {name}", store.describe())))
}

fn reference_outcome(kind: &str, name: &str, outcomes: &BTreeMap<String, Outcome>) -> Option<Outcome> {
    match outcomes.get(name) {
        None => {
            Some(Outcome::not_ready(reasons::PROVIDER_NOT_FOUND, format!("{kind} {name} not found in this namespace")))
        }
        Some(o) if !o.ready => Some(Outcome::not_ready(
            reasons::PROVIDER_NOT_READY,
            format!("{kind} {name} is not Ready ({}): {}", o.reason, o.message),
        )),
        Some(_) => None,
    }
}

fn evaluate_policy(
    policy: &AccessPolicy,
    snapshot: &Snapshot<'_>,
    trust: &BTreeMap<String, Outcome>,
    credential: &BTreeMap<String, Outcome>,
) -> Outcome {
    let spec = &policy.spec;
    for reference in &spec.trust_providers {
        if let Some(o) = reference_outcome("TrustProvider", &reference.name, trust) {
            return o;
        }
    }
    let cred_name = &spec.credential_provider.name;
    if let Some(o) = reference_outcome("CredentialProvider", cred_name, credential) {
        return o;
    }
    for window in spec.conditions.iter().flat_map(|c| &c.time_windows) {
        if jiff::tz::TimeZone::get(&window.time_zone).is_err() {
            return Outcome::not_ready(
                reasons::INVALID_SPEC,
                format!("time zone {:?} is not a known IANA time zone (e.g. Europe/Berlin)", window.time_zone),
            );
        }
    }
    let cred = snapshot.credential.iter().find(|c| &c.name_any() == cred_name).expect("checked above");
    if let Err(why) = check_delivery(policy, cred) {
        return Outcome::not_ready(reasons::INVALID_SPEC, why.to_string());
    }
    Outcome::ready(format!(
        "{} server reachable with credentials from {cred_name}, verified by {}",
        spec.server.kind.as_str(),
        spec.trust_providers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
    ))
}

/// Whether every delivery of the policy can carry what the credential provider obtains
/// (the rule the agent applies again to each credential: [`Delivery`]).
fn check_delivery(policy: &AccessPolicy, cred: &CredentialProvider) -> Result<(), Misfit> {
    let name = cred.name_any();
    Delivery::of_policy(&policy.spec).into_iter().try_for_each(|delivery| delivery.fits_provider(&name, &cred.spec))
}

/// The single-valued endpoint a policy occupies in a container, if any.
fn endpoints(policy: &AccessPolicy) -> Vec<(String, String)> {
    let spec = &policy.spec;
    if spec.delivery.sdk_endpoint.is_some() {
        return match spec.server.kind {
            ServerKind::Aws => {
                vec![("AWS credentials through the one container-credentials endpoint".into(), String::new())]
            }
            ServerKind::Gcp => vec![("GCP tokens through the one metadata server".into(), String::new())],
            ServerKind::Azure => vec![(
                "Azure tokens through the managed-identity endpoint".into(),
                spec.server.resource.clone().unwrap_or_default(),
            )],
            ServerKind::Http => vec![],
        };
    }
    spec.server.hosts.iter().map(|h| ("credentials through the proxy".into(), h.clone())).collect()
}

fn keys_collide(a: &str, b: &str) -> bool {
    if a.is_empty() || b.is_empty() {
        return a == b;
    }
    a == b || host_matches(a, b.trim_start_matches("*.")) || host_matches(b, a.trim_start_matches("*."))
}

/// Whether two client selectors could select the same pod. Errs on the side of "yes":
/// only provable disjointness says no. Containers do not separate policies: the agent's
/// endpoints are per pod, and a pod's containers share its loopback.
fn may_overlap(a: &ClientSelector, b: &ClientSelector) -> bool {
    if let (Some(x), Some(y)) = (&a.service_account_name, &b.service_account_name)
        && x != y
    {
        return false;
    }
    let (la, lb) = (a.pod_selector.match_labels.as_ref(), b.pod_selector.match_labels.as_ref());
    if let (Some(la), Some(lb)) = (la, lb)
        && la.iter().any(|(k, v)| lb.get(k).is_some_and(|w| w != v))
    {
        return false;
    }
    true
}

/// Pairs of policies that would give one container the same single-valued endpoint.
/// Returns, per policy in conflict, a message naming the other.
fn conflicts(policies: &[&AccessPolicy]) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for (i, a) in policies.iter().enumerate() {
        for b in &policies[i + 1..] {
            if !may_overlap(&a.spec.client, &b.spec.client) {
                continue;
            }
            let clash = endpoints(a).into_iter().find_map(|(what, key_a)| {
                endpoints(b).into_iter().find(|(w, key_b)| *w == what && keys_collide(&key_a, key_b)).map(|_| what)
            });
            if let Some(what) = clash {
                for (me, other) in [(a, b), (b, a)] {
                    found.entry(me.name_any()).or_insert_with(|| {
                        format!(
                            "conflicts with AccessPolicy {}: both would deliver {what} to the same pods; \
                             narrow client.podSelector or serviceAccountName so they select different pods",
                            other.name_any()
                        )
                    });
                }
            }
        }
    }
    found
}

fn compile(policy: &AccessPolicy) -> CompiledPolicy {
    let spec = &policy.spec;
    CompiledPolicy {
        name: policy.name_any(),
        client: spec.client.clone(),
        trust_providers: spec.trust_providers.iter().map(|r| r.name.clone()).collect(),
        server: spec.server.clone(),
        credential_provider: spec.credential_provider.name.clone(),
        delivery: spec.delivery.clone(),
        conditions: spec.conditions.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object<K: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: serde_json::Value) -> K {
        serde_json::from_value(json!({
            "apiVersion": "cloudpass.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "team"}, "spec": spec,
        }))
        .unwrap()
    }

    fn trust(name: &str) -> TrustProvider {
        object("TrustProvider", name, json!({"kubernetesServiceAccount": {}}))
    }

    #[test]
    fn a_secret_store_kind_is_ready_only_with_a_ready_provider_of_its_clouds_kind() {
        let store = |reader: &str| -> CredentialProvider {
            object(
                "CredentialProvider",
                "db",
                json!({"awsSecretsManager": {"secretId": "prod/db", "credentialProviderRef": {"name": reader}}}),
            )
        };
        let api_key: CredentialProvider =
            object("CredentialProvider", "key", json!({"apiKey": {"secretRef": {"name": "s", "key": "k"}}}));
        let aws = sts("aws");
        let outcome = |providers: Vec<&CredentialProvider>| {
            let snapshot = Snapshot { namespace: "team", credential: providers, ..Default::default() };
            evaluate(&snapshot).credential["db"].clone()
        };
        let (missing, wrong, good) = (store("absent"), store("key"), store("aws"));
        assert_eq!(outcome(vec![&missing, &aws]).reason, reasons::PROVIDER_NOT_FOUND);
        let o = outcome(vec![&wrong, &api_key]);
        assert_eq!(o.reason, reasons::INVALID_SPEC);
        assert!(o.message.contains("of kind awsSts; key is of kind apiKey"), "{}", o.message);
        let o = outcome(vec![&good, &aws]);
        assert!(o.ready, "{o:?}");
        assert_eq!(o.message, "reads secretsmanager:prod/db with the credentials of aws");
    }

    fn sts(name: &str) -> CredentialProvider {
        object("CredentialProvider", name, json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}}))
    }

    fn policy(name: &str, spec: serde_json::Value) -> AccessPolicy {
        let mut base = json!({
            "client": {"podSelector": {"matchLabels": {"app": name}}},
            "trustProviders": [{"name": "k8s"}],
            "server": {"kind": "aws"},
            "credentialProvider": {"name": "s3"},
        });
        for (k, v) in spec.as_object().unwrap() {
            base[k] = v.clone();
        }
        object("AccessPolicy", name, base)
    }

    fn run(trust: &[TrustProvider], cred: &[CredentialProvider], policies: &[AccessPolicy]) -> Evaluation {
        let snapshot = Snapshot {
            namespace: "team",
            trust: trust.iter().collect(),
            credential: cred.iter().collect(),
            policies: policies.iter().collect(),
            secrets: [("api".to_owned(), ["key".to_owned()].into())].into(),
        };
        evaluate(&snapshot)
    }

    #[test]
    fn happy_path_compiles_sorted_config() {
        let e = run(&[trust("k8s")], &[sts("s3")], &[policy("b", json!({})), policy("a", json!({}))]);
        assert!(e.policies.values().all(|o| o.ready), "{:?}", e.policies);
        let config = e.config.unwrap();
        assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(config.credential_providers[&config.policies[0].credential_provider].kind_name(), Some("awsSts"));
    }

    #[test]
    fn a_gcp_sdk_endpoint_serves_identity_tokens_from_an_oidc_token_provider() {
        // The agent's metadata server answers `identity?audience=` from an oidcToken
        // credential; the operator once refused the policy that configures it.
        let oidc = object("CredentialProvider", "s3", json!({"oidcToken": {"audience": "https://api.example.com"}}));
        let gcp = policy("id", json!({"server": {"kind": "gcp"}}));
        let e = run(&[trust("k8s")], &[oidc], &[gcp]);
        assert!(e.policies["id"].ready, "{:?}", e.policies["id"]);
    }

    #[test]
    fn each_failure_has_its_reason_and_message() {
        let api_key = |secret: &str, key: &str| -> CredentialProvider {
            object("CredentialProvider", "s3", json!({"apiKey": {"secretRef": {"name": secret, "key": key}}}))
        };
        let http = json!({"server": {"kind": "http", "hosts": ["api.example.com"]}, "delivery": {"httpHeader": {"name": "X", "format": "{token}"}}});
        // (trust providers, credential providers, policy, expected reason, expected text)
        type Case = (Vec<TrustProvider>, Vec<CredentialProvider>, AccessPolicy, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (
                vec![],
                vec![sts("s3")],
                policy("p", json!({})),
                reasons::PROVIDER_NOT_FOUND,
                "TrustProvider k8s not found",
            ),
            (
                vec![trust("k8s")],
                vec![],
                policy("p", json!({})),
                reasons::PROVIDER_NOT_FOUND,
                "CredentialProvider s3 not found",
            ),
            (
                vec![trust("k8s")],
                vec![api_key("nope", "key")],
                policy("p", http.clone()),
                reasons::PROVIDER_NOT_READY,
                "Secret nope not found",
            ),
            (
                vec![trust("k8s")],
                vec![api_key("api", "other")],
                policy("p", http.clone()),
                reasons::PROVIDER_NOT_READY,
                "has no key \"other\"",
            ),
            (
                vec![trust("k8s")],
                vec![sts("s3")],
                policy(
                    "p",
                    json!({"conditions": {"timeWindows": [{"timeZone": "Mars/Olympus", "start": "01:00", "end": "02:00"}]}}),
                ),
                reasons::INVALID_SPEC,
                "Mars/Olympus",
            ),
            (
                vec![trust("k8s")],
                vec![api_key("api", "key")],
                policy("p", json!({})),
                reasons::INVALID_SPEC,
                "needs an awsSts CredentialProvider",
            ),
            (
                vec![trust("k8s")],
                vec![sts("s3")],
                policy("p", http),
                reasons::INVALID_SPEC,
                "cannot carry AWS credentials",
            ),
            (
                vec![object(
                    "TrustProvider",
                    "k8s",
                    json!({"kubernetesServiceAccount": {"issuer": "https://x", "namespaces": ["a"], "jwks": "{\"keys\":[{\"kty\":\"RSA\",\"d\":\"secret\"}]}"}}),
                )],
                vec![sts("s3")],
                policy("p", json!({})),
                reasons::PROVIDER_NOT_READY,
                "private key material",
            ),
        ];
        for (t, c, p, reason, text) in cases {
            let e = run(&t, &c, &[p]);
            let o = &e.policies["p"];
            assert!(!o.ready && o.reason == reason && o.message.contains(text), "want {reason} / {text:?}, got {o:?}");
            assert!(e.config.is_none());
        }
    }

    #[test]
    fn only_ready_providers_are_compiled() {
        let leaked = |name: &str, key: serde_json::Value| -> TrustProvider {
            object(
                "TrustProvider",
                name,
                json!({"kubernetesServiceAccount": {"issuer": "https://x", "namespaces": ["a"], "jwks": json!({"keys": [key]}).to_string()}}),
            )
        };
        let private = json!({"kty": "EC", "crv": "P-256", "x": "x", "y": "y", "d": "secret"});
        let symmetric = json!({"kty": "oct", "k": "c2VjcmV0"});
        let e = run(
            &[trust("k8s"), leaked("leaked", private), leaked("shared-secret", symmetric)],
            &[
                sts("s3"),
                object("CredentialProvider", "broken", json!({"apiKey": {"secretRef": {"name": "nope", "key": "k"}}})),
            ],
            &[policy("p", json!({}))],
        );
        for name in ["leaked", "shared-secret"] {
            assert!(!e.trust[name].ready && e.trust[name].message.contains("private key material"), "{:?}", e.trust);
        }
        let config = e.config.unwrap();
        assert_eq!(config.trust_providers.keys().collect::<Vec<_>>(), ["k8s"]);
        assert_eq!(config.credential_providers.keys().collect::<Vec<_>>(), ["s3"]);
    }

    #[test]
    fn overlapping_single_valued_endpoints_conflict_both_ways() {
        let shared = json!({"client": {"podSelector": {}}});
        let e = run(&[trust("k8s")], &[sts("s3")], &[policy("one", shared.clone()), policy("two", shared)]);
        assert_eq!(e.policies["one"].reason, reasons::CONFLICT);
        assert!(e.policies["one"].message.contains("AccessPolicy two"), "{:?}", e.policies["one"]);
        assert!(e.policies["two"].message.contains("AccessPolicy one"));
        assert!(e.config.is_none());

        // Different containers of one pod share the agent's endpoints: still a conflict.
        let e = run(
            &[trust("k8s")],
            &[sts("s3")],
            &[
                policy("one", json!({"client": {"podSelector": {}, "containers": ["a"]}})),
                policy("two", json!({"client": {"podSelector": {}, "containers": ["b"]}})),
            ],
        );
        assert_eq!(e.policies["one"].reason, reasons::CONFLICT);

        // Different labels or service accounts make them disjoint.
        for (a, b) in [
            (json!({}), json!({})),
            (
                json!({"client": {"podSelector": {}, "serviceAccountName": "x"}}),
                json!({"client": {"podSelector": {}, "serviceAccountName": "y"}}),
            ),
        ] {
            let e = run(&[trust("k8s")], &[sts("s3")], &[policy("one", a), policy("two", b)]);
            assert!(e.policies.values().all(|o| o.ready), "{:?}", e.policies);
        }
    }
}
