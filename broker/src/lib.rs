//! The broker: turns a verified Kubernetes workload identity into a credential for
//! another cloud, under a policy, with an audit record for every decision.
//!
//! One request (`POST /v1/credentials`) goes: authenticate the agent's token
//! (TokenReview, or another cluster's keys) → find the named policy in the caller's
//! namespace and check it selects the caller → run every trust provider → check the
//! policy's conditions → obtain the credential through the cache (one upstream call per
//! key at a time) → answer with the credential, its expiry and when to refresh.
//!
//! The crate also holds the OIDC issuer whose keys sign the broker's tokens
//! ([`issuer`]), the broker's HTTPS routes ([`server`]) and its metrics ([`metrics`]),
//! which the process running it registers; the `cloudpass-operator` binary wires it
//! (`--components broker` or `all`). Internal failures are typed ([`Error`]); what the
//! caller gets is a [`Refusal`].

#![deny(missing_docs)]

pub mod audit;
pub mod authn;
pub mod aws;
pub mod cache;
pub mod conditions;
pub mod credential;
pub mod egress;
pub mod error;
pub mod issuer;
pub mod jwt;
pub mod metrics;
pub mod server;
pub mod trust;
pub mod verify;

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use cloudpass_api::{
    broker::{AgentDeliveries, BrokerError, CredentialRequest, CredentialResponse, ErrorCode, UnavailablePolicy},
    config::{CompiledPolicy, NamespaceConfig},
    endpoint::{AgentPorts, agent_delivery},
    policy::NotSelected,
};
use cloudpass_runtime::configs::Configs;
pub use error::Error;

use audit::{Audit, AuditRecord};
use authn::{Caller, Origin, TokenReviewer};
use cache::{CredentialCache, Lookup};
use egress::{Egress, sanitize};
use issuer::KeySet;
use jwt::{Expectations, JwtVerifier, KeySource};
use metrics::BrokerMetrics;

/// Why a request was not answered with a credential. Never holds a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The category, which decides the HTTP status ([`ErrorCode::http_status`]).
    pub code: ErrorCode,
    /// What went wrong, for a human; also the audit record's `reason`.
    pub message: String,
    /// The upstream service's own error code (sanitized), for upstream failures.
    pub upstream_code: Option<String>,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), upstream_code: None }
    }
    /// `Unauthenticated` (401): no token, or one that does not verify.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }
    /// `Denied` (403): the caller is known but not allowed (policy, trust provider,
    /// conditions, a refused upstream address).
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Denied, message)
    }
    /// `BadRequest` (400): the body is not a credential request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    /// `Unavailable` (503): the broker cannot answer now (starting, apiserver
    /// unreachable, a referenced Secret missing); worth retrying.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    /// `UpstreamFailure` (502): the upstream service refused or failed, with its own
    /// error code when it gave one. Only these are remembered by the credential cache.
    pub fn upstream(message: impl Into<String>, upstream_code: Option<String>) -> Self {
        Self { code: ErrorCode::UpstreamFailure, message: message.into(), upstream_code }
    }
    /// Whether an upstream service failed.
    pub fn is_upstream(&self) -> bool {
        self.code == ErrorCode::UpstreamFailure
    }
    /// The stable label of the refusal's code (`Unauthenticated`, `Denied`, ...): the
    /// `code` of its audit record and of the `broker_requests` metric.
    pub fn metric_label(&self) -> &'static str {
        self.code.as_str()
    }
    /// The error body sent to the caller.
    pub fn to_wire(&self) -> BrokerError {
        BrokerError { code: self.code, message: self.message.clone(), upstream_code: self.upstream_code.clone() }
    }
}

/// Settings of the broker.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// The issuer URL, `iss` of every broker-signed token.
    pub issuer_url: String,
    /// How long a positive TokenReview (with the pod's labels) is reused.
    pub token_cache_ttl: Duration,
    /// How long an upstream failure is remembered.
    pub error_cache_ttl: Duration,
    /// This broker's server IDs: `awsRole` evidence must carry one of them in its signed
    /// [`cloudpass_api::broker::SERVER_ID_HEADER`].
    pub server_ids: Vec<String>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            issuer_url: String::new(),
            token_cache_ttl: Duration::from_secs(10),
            error_cache_ttl: Duration::from_secs(5),
            server_ids: Vec::new(),
        }
    }
}

/// The broker's state, shared by every request.
pub struct Broker {
    settings: BrokerSettings,
    client: kube::Client,
    http: Egress,
    configs: Arc<Configs>,
    reviewer: TokenReviewer,
    verifier: JwtVerifier,
    cache: CredentialCache,
    keys: Arc<RwLock<Option<KeySet>>>,
    audit: Audit,
    metrics: BrokerMetrics,
}

/// The answer to one request, with its audit record already written.
pub struct Answer {
    /// The credential handed out, or why not.
    pub result: Result<CredentialResponse, Refusal>,
    /// Decision ID, also in the audit record.
    pub decision_id: String,
}

fn random_id() -> String {
    cloudpass_rand::hex(12)
}

impl Broker {
    /// A broker over the given configs and signing keys.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: BrokerSettings,
        client: kube::Client,
        http: Egress,
        configs: Arc<Configs>,
        keys: Arc<RwLock<Option<KeySet>>>,
        audit: Audit,
        metrics: BrokerMetrics,
    ) -> Self {
        Self {
            reviewer: TokenReviewer::new(client.clone(), settings.token_cache_ttl),
            verifier: JwtVerifier::new(http.clone()).with_cluster(client.clone()),
            cache: CredentialCache::new(settings.error_cache_ttl),
            settings,
            client,
            http,
            configs,
            keys,
            audit,
            metrics,
        }
    }

    /// Whether the broker can answer: configs listed and signing keys loaded.
    pub fn is_ready(&self) -> bool {
        self.configs.loaded() && self.keys.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The issuer's current JWKS (every published key), `None` until the keys are loaded.
    pub fn jwks(&self) -> Option<serde_json::Value> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(KeySet::jwks)
    }

    /// The issuer URL: `iss` of every broker-signed token, and the base of the discovery
    /// document.
    pub fn issuer_url(&self) -> &str {
        &self.settings.issuer_url
    }

    /// Drops cache entries that can no longer be served.
    pub fn sweep(&self) {
        self.cache.sweep();
    }

    /// Answers one credential request: `token` from the `Authorization` header, `body`
    /// the raw request body.
    pub async fn handle(&self, token: Option<&str>, body: &[u8]) -> Answer {
        let started = Instant::now();
        let mut record = AuditRecord {
            kind: "cloudpass.dev/audit",
            time: jiff::Timestamp::now().to_string(),
            decision_id: random_id(),
            ..Default::default()
        };
        let result = self.decide(token, body, &mut record).await;
        let elapsed = started.elapsed();
        record.latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
        match &result {
            Ok(response) => {
                record.outcome = "allowed";
                record.expires_at = Some(response.expires_at.to_string());
            }
            Err(refusal) => {
                record.outcome = if refusal.code == ErrorCode::Denied { "denied" } else { "error" };
                record.code = Some(refusal.metric_label());
                record.reason = Some(refusal.message.clone());
                record.upstream_code = refusal.upstream_code.clone();
            }
        }
        let code = result.as_ref().err().map_or("OK", Refusal::metric_label);
        self.metrics.request(record.outcome, code, elapsed);
        self.audit.record(&record);
        Answer { result, decision_id: record.decision_id }
    }

    /// What the agent of the calling pod serves: for each policy of its
    /// `cloudpass.dev/policies` annotation, the delivery the webhook's variables point
    /// at (the same rule, [`agent_delivery`]), or why it cannot be served now. Pods of
    /// this cluster only: another cluster's webhook writes the deliveries into its pods.
    pub async fn agent_deliveries(&self, token: Option<&str>) -> Result<AgentDeliveries, Refusal> {
        let token = self.usable_token(token)?;
        refuse_probe(token)?;
        let (answer, cached) = self.reviewer.review(token, &self.verifier).await?;
        self.metrics.cache_lookup("token_review", cached.as_str());
        let caller = answer?;
        let config = self.configs.get(&caller.namespace);
        let ports = AgentPorts::default();
        let mut answer = AgentDeliveries { deliveries: Vec::new(), unavailable: Vec::new() };
        for name in &caller.policies {
            let name = sanitize(name);
            let delivery = self
                .servable(config.as_deref(), &caller.namespace, &name)
                .and_then(|(config, policy)| {
                    selects(policy, &caller)?;
                    agent_delivery(policy, Some(config), &ports)
                        .ok_or_else(|| Refusal::denied(format!("AccessPolicy {name} has no delivery the agent serves")))
                })
                .map_err(|refusal| refusal.message);
            match delivery {
                Ok(delivery) => answer.deliveries.push(delivery),
                Err(message) => answer.unavailable.push(UnavailablePolicy { policy: name, message }),
            }
        }
        tracing::debug!(
            namespace = %caller.namespace,
            pod = caller.pod.as_deref().unwrap_or_default(),
            served = answer.deliveries.len(),
            unavailable = answer.unavailable.len(),
            "agent deliveries"
        );
        Ok(answer)
    }

    /// The bearer token, if there is one and the broker can answer at all.
    fn usable_token<'t>(&self, token: Option<&'t str>) -> Result<&'t str, Refusal> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::unauthenticated("no bearer token: send the projected service-account token"))?;
        if !self.is_ready() {
            return Err(Refusal::unavailable("the broker is starting: configs or signing keys not loaded yet"));
        }
        Ok(token)
    }

    /// Policy `name` of `namespace` from its compiled `config`, if it is Ready there and
    /// not being deleted (the broker's own watch knows that before the config does).
    fn servable<'c>(
        &self,
        config: Option<&'c NamespaceConfig>,
        namespace: &str,
        name: &str,
    ) -> Result<(&'c NamespaceConfig, &'c CompiledPolicy), Refusal> {
        let Some((config, policy)) = config.and_then(|c| c.policy(name).map(|p| (c, p))) else {
            return Err(Refusal::denied(format!("no Ready AccessPolicy {name} in namespace {namespace}")));
        };
        if self.configs.is_withdrawn(namespace, name) {
            return Err(Refusal::denied(format!(
                "AccessPolicy {name} in namespace {namespace} is deleted or being deleted"
            )));
        }
        Ok((config, policy))
    }

    async fn authenticate(
        &self,
        token: &str,
        request: &CredentialRequest,
        record: &mut AuditRecord,
    ) -> Result<Arc<Caller>, Refusal> {
        refuse_probe(token)?;
        // Another cluster's token is recognised by an issuer that a TrustProvider in the
        // named namespace trusts; everything else goes to TokenReview.
        if let Some(namespace) = &request.namespace
            && let Some(issuer) = authn::unverified_issuer(token)
            && let Some(config) = self.configs.get(namespace)
            && config
                .trust_providers
                .values()
                .filter_map(|t| t.kubernetes_service_account.as_ref())
                .any(|k| k.issuer.as_deref() == Some(issuer.as_str()))
        {
            // Only a TrustProvider that the named policy lists (and so a Ready one: the
            // compiled config holds nothing else) may verify the token.
            let spec = config
                .policy(&request.policy)
                .into_iter()
                .flat_map(|p| p.trust_providers.iter())
                .filter_map(|name| config.trust_providers.get(name))
                .filter_map(|t| t.kubernetes_service_account.as_ref())
                .find(|k| k.issuer.as_deref() == Some(issuer.as_str()))
                .ok_or_else(|| {
                    Refusal::unauthenticated(format!(
                        "no Ready TrustProvider of AccessPolicy {} in namespace {namespace} verifies tokens of {}",
                        sanitize(&request.policy),
                        sanitize(&issuer)
                    ))
                })?;
            let source = KeySource::for_issuer(&issuer, spec.jwks_uri.as_deref(), spec.jwks.as_deref());
            let expect = Expectations { issuer: &issuer, audiences: &spec.audiences, algorithms: &spec.algorithms };
            let claims = self
                .verifier
                .verify(token, &source, &expect)
                .await
                .map_err(|e| Refusal::unauthenticated(format!("token of {} refused: {e}", sanitize(&issuer))))?;
            return authn::remote_caller(&issuer, claims, namespace).map(Arc::new);
        }
        let (answer, cached) = self.reviewer.review(token, &self.verifier).await?;
        self.metrics.cache_lookup("token_review", cached.as_str());
        let caller = answer?;
        if let Some(namespace) = &request.namespace
            && namespace != &caller.namespace
        {
            record.namespace = Some(caller.namespace.clone());
            return Err(Refusal::denied(format!(
                "a pod of namespace {} cannot use policies of namespace {namespace}",
                caller.namespace
            )));
        }
        Ok(caller)
    }

    async fn decide(
        &self,
        token: Option<&str>,
        body: &[u8],
        record: &mut AuditRecord,
    ) -> Result<CredentialResponse, Refusal> {
        let request: CredentialRequest = serde_json::from_slice(body)
            .map_err(|e| Refusal::bad_request(format!("request body is not a credential request: {e}")))?;
        record.policy = Some(request.policy.clone());
        let token = self.usable_token(token)?;
        let caller = self.authenticate(token, &request, record).await?;
        record.namespace = Some(caller.namespace.clone());
        record.pod = caller.pod.clone();
        record.pod_uid = caller.pod_uid.clone();
        record.service_account = Some(caller.service_account.clone());
        if let Origin::OtherCluster { issuer, namespace } = &caller.origin {
            record.remote_issuer = Some(issuer.clone());
            record.remote_namespace = Some(namespace.clone());
        }

        let config = self.configs.get(&caller.namespace);
        let (config, policy) = self.servable(config.as_deref(), &caller.namespace, &request.policy)?;
        selects(policy, &caller)?;

        let ctx =
            trust::TrustContext { verifier: &self.verifier, http: &self.http, server_ids: &self.settings.server_ids };
        for name in &policy.trust_providers {
            let spec = config
                .trust_providers
                .get(name)
                .ok_or_else(|| Refusal::denied(format!("TrustProvider {name} is not Ready")))?;
            let result = trust::evaluate(name, spec, &caller, &request.evidence, &ctx).await;
            let failed =
                (!result.passed).then(|| format!("trust provider {name} refused the caller: {}", result.detail));
            record.trust_providers.push(result);
            if let Some(message) = failed {
                return Err(Refusal::denied(message));
            }
        }
        let now = jiff::Timestamp::now();
        conditions::check(policy.conditions.as_ref(), now).map_err(Refusal::denied)?;

        let provider = &policy.credential_provider;
        let spec = config
            .credential_providers
            .get(provider)
            .ok_or_else(|| Refusal::denied(format!("credential provider {provider} is missing")))?;
        record.credential_provider = Some(provider.clone());
        record.credential_kind = spec.kind_name();
        let max_lifetime =
            policy.conditions.as_ref().and_then(|c| c.max_credential_lifetime.as_ref()).map(|d| d.as_std());
        let access_ends = conditions::access_ends(policy.conditions.as_ref(), now);
        // A secret-store kind reads with another provider of the namespace (Ready ones only).
        let reads_with = (spec.reads_with())
            .and_then(|name| config.credential_providers.get_key_value(name))
            .map(|(name, spec)| (name.as_str(), spec));
        let req =
            credential::MintRequest { provider, spec, policy, caller: &caller, max_lifetime, access_ends, reads_with };
        let key = cache_key(config, &req);
        let (issued, lookup) = self
            .cache
            .get(&key, || async {
                // Read only on a miss: a cache hit needs no key.
                let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
                let keys = keys.ok_or_else(|| Refusal::unavailable("signing keys not loaded"))?;
                let mint = credential::MintContext {
                    http: &self.http,
                    client: &self.client,
                    keys: &keys,
                    issuer_url: &self.settings.issuer_url,
                };
                let result = credential::obtain(&mint, &req).await;
                self.metrics
                    .upstream_call(spec.kind_name().unwrap_or("unknown"), if result.is_ok() { "ok" } else { "error" });
                result
            })
            .await;
        record.cache = Some(lookup.as_str());
        record.secret = issued.as_ref().ok().and_then(|i| i.source.clone());
        self.metrics.cache_lookup("credential", lookup.as_str());
        if lookup == Lookup::Miss && issued.is_ok() {
            tracing::info!(namespace = %caller.namespace, policy = %policy.name, provider = %provider, "credential obtained");
        }
        let issued = issued?;
        Ok(CredentialResponse {
            policy: policy.name.clone(),
            credential: issued.credential.clone(),
            expires_at: issued.expires_at,
            refresh_at: issued.refresh_at(),
            serve_until: issued.serve_until,
        })
    }
}

/// A verification probe identifies no workload: it gets nothing.
fn refuse_probe(token: &str) -> Result<(), Refusal> {
    if cloudpass_api::jwt::unverified_claims(token).is_some_and(|claims| verify::is_probe(&claims)) {
        return Err(Refusal::unauthenticated(
            "the token is a cloudpass verification probe, which identifies no workload",
        ));
    }
    Ok(())
}

/// Whether the policy selects the caller; remote callers have no pod labels here, so
/// only policies whose pod selector is empty can select them.
fn selects(policy: &CompiledPolicy, caller: &Caller) -> Result<(), Refusal> {
    let labels = match caller.origin {
        Origin::ThisCluster => Some(&caller.labels),
        Origin::OtherCluster { .. } => None,
    };
    policy.client.selects(&caller.service_account, labels).map_err(|why| match why {
        NotSelected::ServiceAccount(sa) => Refusal::denied(format!(
            "policy {} is for service account {sa}, the caller runs as {}",
            policy.name, caller.service_account
        )),
        NotSelected::Labels | NotSelected::RemoteNeedsEmptySelector => Refusal::denied(format!(
            "policy {} does not select pod {}",
            policy.name,
            caller.pod.as_deref().unwrap_or("(unknown)")
        )),
    })
}

/// The cache key: what the upstream request depends on. The config hash makes any
/// change of the namespace's policies or providers start from fresh credentials. A time
/// window needs no part here: a credential is not served from the cache past the end of
/// the window it was obtained in ([`cache::Issued::refresh_at`]).
fn cache_key(config: &NamespaceConfig, req: &credential::MintRequest<'_>) -> String {
    format!(
        "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}",
        config.namespace,
        config.hash,
        req.policy.name,
        req.policy.credential_provider,
        credential::cache_discriminator(req),
        req.max_lifetime
    )
}
