//! The broker client and the refresh loop of each delivery.
//!
//! `POST {broker}/v1/credentials` with the projected service-account token as bearer
//! (re-read from its file on every request, so the kubelet's rotation is picked up) and
//! `{"policy": ...}`. The broker's CA is the only trust anchor unless system roots are
//! asked for; its file, too, is read again before each request. Each delivery fetches
//! at start, then again at the broker's `refreshAt`, a little later by random jitter so
//! that pods started together do not refresh together:
//! the broker serves the same cached credential until `refreshAt`, so asking sooner
//! would only get it back (one call per credential, see [`refresh_delay`]). Failures are
//! retried with capped exponential backoff and jitter; the store keeps serving a
//! still-valid credential meanwhile, never past its expiry or the broker's
//! `serveUntil`. Only the broker's `Denied` drops the credential at once.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use cloudpass_api::{
    agent::{AgentDelivery, AgentEndpoint, EvidenceSource},
    broker::{
        AGENT_CONFIG_PATH, AgentDeliveries, BrokerError, CREDENTIALS_PATH, Credential, CredentialRequest,
        CredentialResponse,
    },
    fit::Delivery,
    secret::SecretString,
};
use cloudpass_outbound::Retry;
use jiff::Timestamp;
use reqwest::{StatusCode, header::AUTHORIZATION, redirect::Policy};
use tokio::sync::watch;
use tracing::{error, info, warn};

use cloudpass_outbound::{BodyError, chain, read_limited};

use crate::{
    common::Shared,
    error::AgentError,
    evidence::{EvidenceGatherer, server_id_of},
    settings::{BrokerCa, BrokerClientSettings, RetrySettings},
    store::Fetched,
};

/// Largest broker answer read.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// How long a connection to the broker stays open unused: long enough for the requests
/// of one refresh (the deliveries, then every policy's credential), shorter than the
/// time until the next.
const IDLE_CONNECTION: Duration = Duration::from_secs(10);
/// Never refresh more often than this, whatever the broker says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// A client of the broker's credential endpoint.
pub struct BrokerClient {
    http: BrokerHttp,
    endpoint: String,
    config_endpoint: String,
    token_file: PathBuf,
    policy_namespace: Option<String>,
    evidence: EvidenceGatherer,
}

/// The HTTPS client of the broker, and, when its CA comes from a file, that file and
/// the bundle the client was built with: a changed file (the kubelet's copy of a rotated
/// CA) gets a new client before the next call.
struct BrokerHttp {
    settings: BrokerClientSettings,
    file: Option<PathBuf>,
    current: Mutex<(Vec<u8>, reqwest::Client)>,
}

impl BrokerHttp {
    fn new(settings: &BrokerClientSettings) -> Result<Self, AgentError> {
        let (file, pem) = match &settings.ca {
            Some(BrokerCa::Pem(pem)) => (None, pem.as_bytes().to_vec()),
            Some(BrokerCa::File(path)) => (Some(path.clone()), read_ca(path)?),
            None => (None, Vec::new()),
        };
        let client = Self::build(settings, &pem)?;
        Ok(Self { settings: settings.clone(), file, current: Mutex::new((pem, client)) })
    }

    /// A client trusting `pem` (and, if asked, the system roots).
    fn build(settings: &BrokerClientSettings, pem: &[u8]) -> Result<reqwest::Client, AgentError> {
        let certs = if settings.ca.is_some() {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| AgentError::Tls(format!("broker CA: {}", chain(&e))))?;
            if certs.is_empty() {
                return Err(AgentError::Tls("broker CA: no certificate in the PEM".into()));
            }
            certs
        } else {
            Vec::new()
        };
        let builder = reqwest::Client::builder()
            .no_proxy()
            .https_only(true)
            .redirect(Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // No connection kept open between the agent's requests (at most a minute
            // apart): the broker's connection slots are shared by every pod it serves.
            .pool_idle_timeout(IDLE_CONNECTION)
            .user_agent(concat!("cloudpass-agent/", env!("CARGO_PKG_VERSION")));
        let builder =
            if settings.trust_system_roots { builder.tls_certs_merge(certs) } else { builder.tls_certs_only(certs) };
        builder.build().map_err(|e| AgentError::Tls(format!("broker client: {}", chain(&e))))
    }

    /// The client for the next call: rebuilt first if the CA file changed. A file that
    /// cannot be read or holds no certificate keeps the last good client, loudly.
    async fn client(&self) -> reqwest::Client {
        let lock = || self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.file {
            match tokio::fs::read(path).await {
                Ok(pem) => {
                    let changed = lock().0 != pem;
                    if changed {
                        match Self::build(&self.settings, &pem) {
                            Ok(client) => {
                                info!(file = %path.display(), "broker CA changed; trusting the new bundle");
                                *lock() = (pem, client);
                            }
                            Err(e) => {
                                warn!(file = %path.display(), error = %e, "broker CA file changed but is unusable; keeping the last good one")
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot read the broker CA file; keeping the last good one")
                }
            }
        }
        lock().1.clone()
    }
}

fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|e| AgentError::Tls(format!("broker CA file {}: {e}", path.display())))
}

impl BrokerClient {
    /// A client trusting the configured broker CA (and, if asked, the system roots).
    pub fn new(settings: &BrokerClientSettings) -> Result<Self, AgentError> {
        let http = BrokerHttp::new(settings)?;
        let base = settings.url.trim_end_matches('/');
        let (endpoint, config_endpoint) = (format!("{base}{CREDENTIALS_PATH}"), format!("{base}{AGENT_CONFIG_PATH}"));
        let mut evidence = settings.evidence.clone();
        if evidence.server_id.is_none() {
            evidence.server_id = server_id_of(&settings.url);
        }
        let evidence = EvidenceGatherer::new(evidence, settings.timeout);
        Ok(Self {
            http,
            endpoint,
            config_endpoint,
            token_file: settings.token_file.clone(),
            policy_namespace: None,
            evidence,
        })
    }

    /// Names `namespace` in every request: for an agent in another cluster than the
    /// broker's (see `AgentConfig::policy_namespace`).
    pub fn with_policy_namespace(mut self, namespace: Option<String>) -> Self {
        self.policy_namespace = namespace;
        self
    }

    async fn token(&self) -> Result<SecretString, AgentError> {
        let wrap = |source| AgentError::Token { path: self.token_file.clone(), source };
        let text = tokio::fs::read_to_string(&self.token_file).await.map_err(wrap)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(wrap(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty")));
        }
        Ok(SecretString::new(token))
    }

    /// Fetches the credential of `policy`, presenting the evidence of `sources`.
    pub async fn fetch(&self, policy: &str, sources: &[EvidenceSource]) -> Result<CredentialResponse, AgentError> {
        let token = self.token().await?;
        let evidence = self.evidence.gather(sources).await?;
        let body = CredentialRequest { policy: policy.to_owned(), namespace: self.policy_namespace.clone(), evidence };
        let response = self
            .http
            .client()
            .await
            .post(&self.endpoint)
            .header(AUTHORIZATION, format!("Bearer {}", token.expose()))
            .json(&body)
            .send()
            .await;
        let answer: CredentialResponse = answer(response, "credential answer").await?;
        if answer.policy != policy {
            return Err(AgentError::BrokerResponse(format!("asked for policy {policy}, got policy {}", answer.policy)));
        }
        Ok(answer)
    }

    /// Asks the broker what this pod's agent serves (the policies of its
    /// `cloudpass.dev/policies` annotation).
    pub async fn deliveries(&self) -> Result<AgentDeliveries, AgentError> {
        let token = self.token().await?;
        let response = self
            .http
            .client()
            .await
            .get(&self.config_endpoint)
            .header(AUTHORIZATION, format!("Bearer {}", token.expose()))
            .send()
            .await;
        answer(response, "deliveries answer").await
    }
}

/// The broker's `200` answer as `T`, or its error as an [`AgentError`].
async fn answer<T: serde::de::DeserializeOwned>(
    response: reqwest::Result<reqwest::Response>,
    what: &str,
) -> Result<T, AgentError> {
    let response = response.map_err(|e| AgentError::BrokerUnreachable(chain(&e)))?;
    let status = response.status();
    let bytes = read_limited(response, MAX_RESPONSE_BYTES).await.map_err(|e| match e {
        BodyError::Read(why) => AgentError::BrokerUnreachable(why),
        BodyError::TooLarge(limit) => AgentError::BrokerResponse(format!("answer larger than {limit} bytes")),
    })?;
    if status != StatusCode::OK {
        return Err(match serde_json::from_slice::<BrokerError>(&bytes) {
            Ok(e) => AgentError::Broker {
                status: status.as_u16(),
                code: e.code,
                message: e.message,
                upstream_code: e.upstream_code,
            },
            Err(_) => AgentError::BrokerResponse(format!("HTTP {status} without a broker error body")),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| AgentError::BrokerResponse(format!("{what}: {e}")))
}

/// Asks the broker for this pod's deliveries until it names every policy of the pod:
/// a policy the webhook saw Ready may not have reached the replica asked yet. Each
/// failure and each policy still missing is logged with the broker's reason.
pub async fn deliveries_until_complete(client: &BrokerClient, retry: RetrySettings) -> Vec<AgentDelivery> {
    let mut retry = Retry::new(retry.initial, retry.max);
    loop {
        let why = match client.deliveries().await {
            Ok(answer) if answer.unavailable.is_empty() && !answer.deliveries.is_empty() => {
                let policies: Vec<&str> = answer.deliveries.iter().map(|d| d.policy.as_str()).collect();
                info!(policies = %policies.join(","), "deliveries from the broker");
                return answer.deliveries;
            }
            Ok(answer) => {
                for missing in &answer.unavailable {
                    warn!(policy = %missing.policy, reason = %missing.message, "the broker cannot serve this policy yet");
                }
                if answer.unavailable.is_empty() {
                    "the broker names no policy for this pod".to_owned()
                } else {
                    "policies missing".to_owned()
                }
            }
            Err(e) => e.to_string(),
        };
        let delay = retry.failed(cloudpass_rand::fraction());
        warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "no deliveries from the broker yet");
        tokio::time::sleep(delay).await;
    }
}

/// Whether a delivery can serve this credential: the shape by the rule the operator
/// also checks ([`Delivery`]), then for a header the value itself (a header cannot carry
/// a line break), so the agent never reports ready with a credential every request
/// would fail on.
pub fn check_credential(policy: &str, endpoint: &AgentEndpoint, credential: &Credential) -> Result<(), AgentError> {
    Delivery::of_endpoint(endpoint)
        .fits_credential(credential)
        .map_err(|misfit| AgentError::WrongCredential { policy: policy.into(), reason: misfit.to_string() })?;
    if let AgentEndpoint::HttpHeader { format, .. } = endpoint {
        crate::proxy::header_value(format, credential)
            .map_err(|reason| AgentError::UnusableCredential { policy: policy.into(), reason })?;
    }
    Ok(())
}

/// How long to wait before the next fetch, after `fetched` arrived at `now`; `jitter` is
/// in `[0, 1)`. Never less than a second (`MIN_REFRESH`).
///
/// - `refresh_at` between now and the end of serving (`serve_until`): at `refresh_at`,
///   later by up to a tenth of the time until `refresh_at` or, when shorter, of the time
///   from `refresh_at` to that end. Never earlier: the broker answers with the same
///   cached credential until `refresh_at`, so an earlier call is wasted, and calls made
///   earlier and earlier converge on a call per second.
/// - a credential that ends with the policy's time window before `refresh_at`: at the
///   window's end (up to a second later), when the broker may have a credential of the
///   next window, or says the window is closed;
/// - otherwise (a `refresh_at` in the past or after expiry): at 80% of the time left.
pub fn refresh_delay(fetched: &Fetched, now: Timestamp, jitter: f64) -> Duration {
    let secs = |t: Timestamp| t.duration_since(now).as_secs_f64();
    let end = fetched.serve_until;
    let refresh = secs(fetched.refresh_at);
    let delay = if refresh > 0.0 && fetched.refresh_at < end {
        refresh + jitter * 0.1 * refresh.min(secs(end) - refresh)
    } else if fetched.ends_with_window() && secs(end) > 0.0 {
        secs(end) + jitter * MIN_REFRESH.as_secs_f64()
    } else {
        secs(end) * 0.8
    };
    Duration::from_secs_f64(delay.max(0.0)).max(MIN_REFRESH)
}

/// One fetch of `policy`, with its effects on the store, metrics and logs. Returns the
/// delay until the next one.
pub async fn refresh_once(
    client: &BrokerClient,
    delivery: &AgentDelivery,
    shared: &Shared,
    retry: &mut Retry,
    shared_dir: &Path,
) -> Duration {
    let policy = delivery.policy.as_str();
    let file = match &delivery.endpoint {
        AgentEndpoint::File { name, format } => Some((name.as_str(), *format)),
        _ => None,
    };
    let result = client.fetch(policy, &delivery.evidence).await.and_then(|answer| {
        check_credential(policy, &delivery.endpoint, &answer.credential)?;
        let now = Timestamp::now();
        if answer.expires_at <= now {
            return Err(AgentError::BrokerResponse(format!("credential expired at {}", answer.expires_at)));
        }
        if let Some(until) = answer.serve_until.filter(|until| *until <= now) {
            return Err(AgentError::BrokerResponse(format!("credential to be served only until {until}")));
        }
        let fetched = Fetched::from_response(answer);
        // The file before the store: the policy counts as served (readiness) once its
        // file is there.
        if let Some((name, format)) = file {
            let content = crate::file::render(&fetched.credential, format, fetched.serve_until)?;
            crate::file::write(shared_dir, name, &content)?;
        }
        Ok(fetched)
    });
    match result {
        Ok(fetched) => {
            retry.succeeded();
            let delay = refresh_delay(&fetched, fetched.fetched_at, cloudpass_rand::fraction());
            info!(
                policy,
                expires_at = %fetched.expires_at,
                serve_until = %fetched.serve_until,
                next_refresh_seconds = delay.as_secs(),
                "credential fetched"
            );
            shared.metrics.refreshed(policy, fetched.serve_until);
            shared.store.put(policy, fetched);
            delay
        }
        Err(e) => {
            let delay = retry.failed(cloudpass_rand::fraction());
            shared.metrics.refresh_failed(policy, e.metric_label());
            if e.is_denial() {
                shared.store.revoke(policy, &e);
                if let Some((name, _)) = file
                    && let Err(removal) = crate::file::remove(shared_dir, name)
                {
                    warn!(policy, error = %removal, "cannot remove the file of a refused credential");
                }
            } else {
                shared.store.record_error(policy, &e);
            }
            let serving = shared.store.valid(policy).ok().map(|f| f.serve_until.to_string());
            let retry_seconds = delay.as_secs_f64();
            match (&e, serving) {
                (AgentError::Broker { status: 401 | 403, .. }, _) => {
                    error!(policy, error = %e, retry_seconds, "the broker refused this pod")
                }
                (_, Some(until)) => warn!(
                    policy,
                    error = %e,
                    retry_seconds,
                    serving_until = %until,
                    "credential refresh failed; still serving the current credential"
                ),
                (_, None) => {
                    error!(policy, error = %e, retry_seconds, "credential fetch failed; no valid credential to serve")
                }
            }
            delay
        }
    }
}

/// Keeps `policy`'s credential fresh until `shutdown` turns true (or its sender goes).
pub async fn refresh_loop(
    client: Arc<BrokerClient>,
    delivery: AgentDelivery,
    shared: Shared,
    retry: RetrySettings,
    shared_dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = Retry::new(retry.initial, retry.max);
    loop {
        let delay = tokio::select! {
            delay = refresh_once(&client, &delivery, &shared, &mut retry, &shared_dir) => delay,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;

    use super::*;

    fn at(now: Timestamp, secs: i64) -> Timestamp {
        now + SignedDuration::from_secs(secs)
    }

    fn fetched(now: Timestamp, expires: i64, refresh: i64, serve_until: Option<i64>) -> Fetched {
        Fetched::from_response(CredentialResponse {
            policy: "p".into(),
            credential: Credential::ApiKey { key: SecretString::new("k") },
            expires_at: at(now, expires),
            refresh_at: at(now, refresh),
            serve_until: serve_until.map(|s| at(now, s)),
        })
    }

    #[test]
    fn refresh_at_the_brokers_time_never_before_it() {
        let now = Timestamp::now();
        let d = |expires, refresh, until, jitter| refresh_delay(&fetched(now, expires, refresh, until), now, jitter);
        assert_eq!(d(3600, 2700, None, 0.0), Duration::from_secs(2700));
        // Jitter only delays, by up to 10% of the margin the broker left before expiry...
        let jittered = d(3600, 2700, None, 0.999);
        assert!(jittered > Duration::from_secs(2700) && jittered < Duration::from_secs(2790), "{jittered:?}");
        // ... or of the time until refresh_at, when shorter.
        let jittered = d(3600, 10, None, 0.999);
        assert!(jittered > Duration::from_secs(10) && jittered < Duration::from_secs(11), "{jittered:?}");
        // A credential fetched again just before refresh_at (the broker's cached one):
        // the next call is at refresh_at, not a shrinking fraction of the time left.
        assert_eq!(d(100, 1, None, 0.0), Duration::from_secs(1));
        assert_eq!(d(100, 3, None, 0.0), Duration::from_secs(3));
        // Unusable refresh times: in the past, or after expiry.
        assert_eq!(d(1000, -5, None, 0.0), Duration::from_secs(800));
        assert_eq!(d(1000, 2000, None, 0.0), Duration::from_secs(800));
        // Never a hot loop.
        assert_eq!(d(1, 0, None, 0.0), Duration::from_secs(1));
    }

    #[test]
    fn a_time_window_ending_first_moves_the_refresh_to_its_end() {
        let now = Timestamp::now();
        let d = |expires, refresh, until, jitter| refresh_delay(&fetched(now, expires, refresh, until), now, jitter);
        // The window ends before the broker's refresh time: refresh at its end.
        assert_eq!(d(3600, 2700, Some(60), 0.0), Duration::from_secs(60));
        let jittered = d(3600, 2700, Some(60), 0.999);
        assert!(jittered > Duration::from_secs(60) && jittered < Duration::from_secs(61), "{jittered:?}");
        // The window ends after refresh_at: the broker's time, jitter bounded by the window.
        assert_eq!(d(3600, 30, Some(60), 0.0), Duration::from_secs(30));
        assert!(d(3600, 30, Some(60), 0.999) < Duration::from_secs(33));
        // A serveUntil after expiry changes nothing.
        assert_eq!(d(3600, 2700, Some(7200), 0.0), Duration::from_secs(2700));
    }

    #[test]
    fn credential_types_per_delivery() {
        let aws = Credential::Aws {
            access_key_id: "A".into(),
            secret_access_key: SecretString::new("s"),
            session_token: SecretString::new("t"),
            account_id: None,
        };
        let key = Credential::ApiKey { key: SecretString::new("k") };
        let basic = Credential::UsernamePassword { username: "u".into(), password: SecretString::new("p") };
        let aws_ep = AgentEndpoint::AwsContainerCredentials { port: 1 };
        let header = |format: &str| AgentEndpoint::HttpHeader {
            port: 1,
            hosts: vec!["h".into()],
            upstream_port: 443,
            name: "Authorization".into(),
            format: format.into(),
            ca_file: None,
        };
        assert!(check_credential("p", &aws_ep, &aws).is_ok());
        let err = check_credential("p", &aws_ep, &key).unwrap_err().to_string();
        assert_eq!(
            err,
            "credential of policy p does not fit its delivery: the broker sent an apiKey credential, which the delivery sdkEndpoint for server kind aws cannot carry"
        );
        assert!(check_credential("p", &header("Bearer {token}"), &key).is_ok());
        assert!(check_credential("p", &header("Basic {basic}"), &basic).is_ok());
        assert!(check_credential("p", &header("Basic {basic}"), &key).is_err());
        assert!(check_credential("p", &header("{token}"), &basic).is_err());
        assert!(check_credential("p", &AgentEndpoint::GcpMetadata { port: 1, scopes: vec![] }, &key).is_err());
    }
}
