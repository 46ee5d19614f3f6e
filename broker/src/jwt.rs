//! JWT verification against an issuer's published keys: algorithm pinned per trust
//! provider, `kid` required, issuer, audience, expiry (small leeway) and not-before
//! checked. Keys are fetched over HTTPS from the issuer's discovery document or a JWKS
//! URL (through [`Egress`]), or from this cluster's apiserver, and cached per source:
//!
//! - one fetch at a time per source: concurrent requests that need keys wait for the one
//!   fetch under way (a per-key lock of the cache) instead of each fetching;
//! - a token naming a key the cache does not hold refetches at most once per
//!   [`JwksTimings::refetch_interval`], so made-up key IDs cannot cause a fetch storm;
//! - a failed fetch is remembered: the next attempt waits an exponential backoff
//!   (from the refetch interval up to [`JwksTimings::max_backoff`]);
//! - when a refetch fails, the last good keys keep verifying for up to
//!   [`JwksTimings::max_stale`] after they were fetched.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cloudpass_api::trust::JwtAlgorithm;
use cloudpass_outbound::Retry;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use moka::{future::Cache, ops::compute::Op};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    Error,
    egress::{Egress, error_reason, sanitize},
};

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 60;
/// Minimum time between two fetches of one source.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Largest JWKS or discovery document read.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Sources kept in the cache; the least recently used is dropped beyond this.
const MAX_SOURCES: u64 = 512;
/// Where this cluster's apiserver publishes its service-account keys.
const CLUSTER_JWKS_PATH: &str = "/openid/v1/jwks";

/// When keys are fetched again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwksTimings {
    /// How long fetched keys are used before they are fetched again.
    pub keys_ttl: Duration,
    /// Minimum time between two fetches of one source for an unknown `kid`, and the
    /// first delay after a failed fetch.
    pub refetch_interval: Duration,
    /// Longest delay between attempts while fetches keep failing.
    pub max_backoff: Duration,
    /// How long after their fetch the last good keys keep verifying while refetches fail.
    pub max_stale: Duration,
}

impl Default for JwksTimings {
    fn default() -> Self {
        Self {
            keys_ttl: Duration::from_secs(3600),
            refetch_interval: REFETCH_INTERVAL,
            max_backoff: Duration::from_secs(300),
            max_stale: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where the verification keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// `jwks_uri` of `<issuer>/.well-known/openid-configuration`.
    Discovery(String),
    /// A JWKS fetched from this URL (`jwksUri`).
    Url(String),
    /// A JWKS given inline (JSON).
    Inline(String),
    /// This cluster's service-account keys, read from the apiserver.
    ThisCluster,
}

impl KeySource {
    /// The source for an issuer with an optional explicit JWKS URL or inline JWKS.
    pub fn for_issuer(issuer: &str, jwks_uri: Option<&str>, inline: Option<&str>) -> Self {
        match (inline, jwks_uri) {
            (Some(json), _) => Self::Inline(json.to_owned()),
            (None, Some(url)) => Self::Url(url.to_owned()),
            (None, None) => Self::Discovery(issuer.to_owned()),
        }
    }
}

fn invalid(why: impl Into<String>) -> Error {
    Error::InvalidToken(why.into())
}

/// What a token must satisfy.
#[derive(Clone, Debug)]
pub struct Expectations<'a> {
    /// Exact `iss`.
    pub issuer: &'a str,
    /// Accepted audiences (any one).
    pub audiences: &'a [String],
    /// Accepted signature algorithms.
    pub algorithms: &'a [JwtAlgorithm],
}

fn algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// The last failed fetch of a source.
struct Failure {
    error: String,
    /// No attempt before this.
    retry_at: Instant,
    /// Delays of the attempts to come.
    backoff: Arc<Mutex<Retry>>,
}

/// What is known of one source.
struct Slot {
    /// The last keys fetched, and when.
    good: Option<(Arc<JwkSet>, Instant)>,
    /// The last attempt, successful or not.
    attempted: Instant,
    /// Set while the last attempt failed.
    failure: Option<Failure>,
}

impl Slot {
    /// Whether a fetch is due: no keys, stale keys, or an unknown `kid` (`refetch`) at
    /// least one refetch interval after the last attempt; never while backing off.
    fn fetch_due(&self, now: Instant, refetch: bool, t: &JwksTimings) -> bool {
        if self.failure.as_ref().is_some_and(|f| now < f.retry_at) {
            return false;
        }
        match &self.good {
            None => true,
            Some((_, at)) => {
                now.duration_since(*at) >= t.keys_ttl
                    || (refetch && now.duration_since(self.attempted) >= t.refetch_interval)
            }
        }
    }

    /// The keys to verify with now.
    fn keys(&self, now: Instant, t: &JwksTimings) -> Result<Arc<JwkSet>, Error> {
        match (&self.good, &self.failure) {
            (Some((keys, at)), _) if now.duration_since(*at) < t.max_stale => Ok(keys.clone()),
            (_, Some(f)) => Err(Error::KeysUnavailable(f.error.clone())),
            (Some(_), None) => Err(Error::KeysUnavailable("the cached keys are too old".into())),
            (None, None) => Err(Error::KeysUnavailable("not fetched yet".into())),
        }
    }
}

/// Verifies JWTs with pinned algorithms, issuer, audience and time claims; caches keys
/// per source, refetching on an unknown `kid` at most once per interval.
pub struct JwtVerifier {
    http: Egress,
    cluster: Option<kube::Client>,
    timings: JwksTimings,
    cache: Cache<KeySource, Arc<Slot>>,
}

/// Reads a response body of at most `limit` bytes.
pub async fn read_limited(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Error> {
    cloudpass_outbound::read_limited(response, limit).await.map_err(|e| match e {
        cloudpass_outbound::BodyError::Read(why) => Error::Fetch(format!("reading the answer: {}", sanitize(&why))),
        cloudpass_outbound::BodyError::TooLarge(limit) => Error::Fetch(format!("answer larger than {limit} bytes")),
    })
}

impl JwtVerifier {
    /// A verifier fetching keys with `http`.
    pub fn new(http: Egress) -> Self {
        Self::with_timings(http, JwksTimings::default())
    }

    /// A verifier fetching keys with `http` on the given schedule.
    pub fn with_timings(http: Egress, timings: JwksTimings) -> Self {
        let cache = Cache::builder().max_capacity(MAX_SOURCES).time_to_idle(timings.max_stale).build();
        Self { http, cluster: None, timings, cache }
    }

    /// Reads [`KeySource::ThisCluster`] from the apiserver through `client`.
    pub fn with_cluster(mut self, client: kube::Client) -> Self {
        self.cluster = Some(client);
        self
    }

    async fn get_json(&self, url: &str) -> Result<Value, Error> {
        let shown = sanitize(url);
        let request = self.http.get(url)?;
        let response =
            request.send().await.map_err(|e| Error::Fetch(format!("fetching {shown}: {}", error_reason(&e))))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Error::Fetch(format!("fetching {shown}: HTTP {}", status.as_u16())));
        }
        let body = read_limited(response, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| Error::Fetch(format!("fetching {shown}: {e}")))?;
        serde_json::from_slice(&body).map_err(|e| Error::Fetch(format!("{shown} is not JSON: {e}")))
    }

    async fn cluster_jwks(&self) -> Result<Value, Error> {
        let client =
            self.cluster.as_ref().ok_or_else(|| Error::Fetch("this cluster's keys are not available here".into()))?;
        let request =
            http::Request::get(CLUSTER_JWKS_PATH).body(Vec::new()).map_err(|e| Error::Fetch(e.to_string()))?;
        let text = client
            .request_text(request)
            .await
            .map_err(|e| Error::Fetch(format!("reading {CLUSTER_JWKS_PATH} from the apiserver: {e}")))?;
        serde_json::from_str(&text).map_err(|e| Error::Fetch(format!("{CLUSTER_JWKS_PATH} is not JSON: {e}")))
    }

    async fn fetch(&self, source: &KeySource) -> Result<JwkSet, Error> {
        let value = match source {
            KeySource::Inline(json) => {
                serde_json::from_str(json).map_err(|e| Error::Fetch(format!("inline JWKS: {e}")))?
            }
            KeySource::Url(url) => self.get_json(url).await?,
            KeySource::ThisCluster => self.cluster_jwks().await?,
            KeySource::Discovery(issuer) => {
                let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
                let doc = self.get_json(&url).await?;
                if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
                    return Err(Error::Fetch(format!(
                        "the discovery document at {} names another issuer",
                        sanitize(&url)
                    )));
                }
                let jwks_uri = doc
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::Fetch(format!("{} has no jwks_uri", sanitize(&url))))?;
                self.get_json(jwks_uri).await?
            }
        };
        // Keys of unknown types are skipped rather than failing the whole set.
        let keys =
            value.get("keys").and_then(Value::as_array).ok_or_else(|| Error::Fetch("JWKS has no keys array".into()))?;
        let keys = keys.iter().filter_map(|k| serde_json::from_value(k.clone()).ok()).collect();
        Ok(JwkSet { keys })
    }

    /// The keys of `source`: cached, or fetched when a fetch is due (absent or stale
    /// keys, or `refetch` for an unknown `kid`), one fetch at a time per source.
    async fn keys(&self, source: &KeySource, refetch: bool) -> Result<Arc<JwkSet>, Error> {
        let t = self.timings;
        if let Some(slot) = self.cache.get(source).await
            && !slot.fetch_due(Instant::now(), refetch, &t)
        {
            return slot.keys(Instant::now(), &t);
        }
        // Callers for one source queue here; each finds what the one before fetched.
        let result = self
            .cache
            .entry_by_ref(source)
            .and_compute_with(|entry| async move {
                let old = entry.map(|e| e.into_value());
                if old.as_ref().is_some_and(|slot| !slot.fetch_due(Instant::now(), refetch, &t)) {
                    return Op::Nop;
                }
                let fetched = self.fetch(source).await;
                Op::Put(Arc::new(self.after_fetch(source, old.as_deref(), fetched)))
            })
            .await;
        match result.into_entry() {
            Some(entry) => entry.into_value().keys(Instant::now(), &t),
            None => Err(Error::KeysUnavailable("not fetched".into())),
        }
    }

    /// The slot after a fetch: new keys, or the old keys and the failure remembered.
    fn after_fetch(&self, source: &KeySource, old: Option<&Slot>, fetched: Result<JwkSet, Error>) -> Slot {
        let now = Instant::now();
        let good = old.and_then(|o| o.good.clone());
        match fetched {
            Ok(keys) => Slot { good: Some((Arc::new(keys), now)), attempted: now, failure: None },
            Err(error) => {
                let backoff = old.and_then(|o| o.failure.as_ref()).map(|f| f.backoff.clone()).unwrap_or_else(|| {
                    Arc::new(Mutex::new(Retry::new(self.timings.refetch_interval, self.timings.max_backoff)))
                });
                let delay = backoff
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .failed(cloudpass_rand::fraction())
                    .max(self.timings.refetch_interval);
                let what = match source {
                    KeySource::Discovery(issuer) => sanitize(issuer),
                    KeySource::Url(url) => sanitize(url),
                    KeySource::Inline(_) => "inline JWKS".into(),
                    KeySource::ThisCluster => "this cluster's keys".into(),
                };
                match &good {
                    Some((_, at)) => tracing::warn!(
                        source = %what, error = %error, reason = error.metric_label(), retry_in_s = delay.as_secs(), keys_age_s = now.duration_since(*at).as_secs(),
                        "fetching keys failed; the last keys fetched stay in use"
                    ),
                    None => {
                        tracing::warn!(
                            source = %what, error = %error, reason = error.metric_label(), retry_in_s = delay.as_secs(),
                            "fetching keys failed"
                        )
                    }
                }
                let error = error.to_string();
                Slot { good, attempted: now, failure: Some(Failure { error, retry_at: now + delay, backoff }) }
            }
        }
    }

    /// Verifies `token` and returns its claims. The error says what failed, never the token.
    pub async fn verify<C: DeserializeOwned>(
        &self,
        token: &str,
        source: &KeySource,
        expect: &Expectations<'_>,
    ) -> Result<C, Error> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("not a JWT: {e}")))?;
        let pinned: Vec<Algorithm> = expect.algorithms.iter().copied().map(algorithm).collect();
        if !pinned.contains(&header.alg) {
            return Err(invalid(format!(
                "signature algorithm {:?} is not accepted (accepted: {:?})",
                header.alg, pinned
            )));
        }
        let kid = header.kid.as_deref().ok_or_else(|| invalid("the token names no key (kid)"))?;
        let shown = sanitize(kid);
        let mut keys = self.keys(source, false).await?;
        if keys.find(kid).is_none() {
            keys = self.keys(source, true).await?;
        }
        let jwk = keys.find(kid).ok_or_else(|| invalid(format!("key {shown:?} is not in the issuer's JWKS")))?;
        if let Some(key_alg) = jwk.common.key_algorithm
            && key_alg.to_string() != format!("{:?}", header.alg)
        {
            return Err(invalid(format!("key {shown:?} is for {key_alg}, the token claims {:?}", header.alg)));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(format!("key {shown:?} is unusable: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[expect.issuer]);
        validation.set_audience(expect.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| invalid(describe(&e, expect)))?;
        if let Some(iat) = data.claims.get("iat").and_then(Value::as_i64)
            && iat > jiff::Timestamp::now().as_second() + LEEWAY_SECONDS as i64
        {
            return Err(invalid("the token was issued in the future (iat)"));
        }
        serde_json::from_value(data.claims).map_err(|e| invalid(format!("unexpected claims: {e}")))
    }
}

fn describe(e: &jsonwebtoken::errors::Error, expect: &Expectations<'_>) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => format!("issuer is not {}", expect.issuer),
        ErrorKind::InvalidAudience => format!("audience is none of {:?}", expect.audiences),
        ErrorKind::InvalidSignature => "signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
        _ => format!("invalid token: {e}"),
    }
}

/// A claim by dotted path (`google.compute_engine.project_id`).
pub fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

/// The string values of a claim: a string, or the strings of a list.
pub fn claim_strings(claims: &Value, path: &str) -> Vec<String> {
    match claim(claims, path) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
        Some(Value::Bool(b)) => vec![b.to_string()],
        Some(Value::Number(n)) => vec![n.to_string()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn keypair() -> (String, Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B};
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": B.encode(&raw[1..33]), "y": B.encode(&raw[33..65]), "kid": "k1", "alg": "ES256"});
        (pair.serialize_pem(), jwk)
    }

    /// A client allowed to reach loopback, trusting `ca` (the test servers' CA).
    fn lenient_egress(ca: Option<&cloudpass_e2e::certs::TestCa>) -> Egress {
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = ca {
            builder = builder.tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap()]);
        }
        Egress::new(builder, crate::egress::EgressPolicy { allow_private: true, ..Default::default() }).unwrap()
    }

    /// A JWKS server over HTTPS that counts the requests it gets, answers each after
    /// `delay`, and fails with 503 while `failing` is set.
    struct JwksServer {
        url: String,
        requests: Arc<std::sync::atomic::AtomicUsize>,
        failing: Arc<std::sync::atomic::AtomicBool>,
        ca: cloudpass_e2e::certs::TestCa,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(jwks: Value, delay: Duration) -> Self {
            use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
            let requests = Arc::new(AtomicUsize::new(0));
            let failing = Arc::new(AtomicBool::new(false));
            let (count, fail) = (requests.clone(), failing.clone());
            let router = axum::Router::new().route(
                "/jwks",
                axum::routing::get(move || {
                    let (count, fail, jwks) = (count.clone(), fail.clone(), jwks.clone());
                    async move {
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        if fail.load(Ordering::SeqCst) {
                            (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down".to_owned())
                        } else {
                            (axum::http::StatusCode::OK, jwks.to_string())
                        }
                    }
                }),
            );
            let ca = cloudpass_e2e::certs::TestCa::new("jwks-test-ca").unwrap();
            let pair = ca.issue_server(&[]).unwrap();
            let (addr, task) = cloudpass_e2e::tls::serve_https(router, &pair).await.unwrap();
            Self { url: format!("https://127.0.0.1:{}/jwks", addr.port()), requests, failing, ca, task }
        }

        fn requests(&self) -> usize {
            self.requests.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn fail(&self, failing: bool) {
            self.failing.store(failing, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn expectations(audiences: &[String]) -> Expectations<'_> {
        Expectations { issuer: "https://issuer.example", audiences, algorithms: &[JwtAlgorithm::ES256] }
    }

    /// Verifies `n` tokens at once; how many verified.
    async fn flood(verifier: &JwtVerifier, source: &KeySource, tokens: &[String]) -> usize {
        let audiences = vec!["cloudpass".to_owned()];
        let expect = expectations(&audiences);
        let results =
            futures::future::join_all(tokens.iter().map(|t| verifier.verify::<Value>(t, source, &expect))).await;
        results.iter().filter(|r| r.is_ok()).count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_unknown_key_ids_fetches_once_per_interval() {
        let (pem, jwk) = keypair();
        let server = JwksServer::start(json!({"keys": [jwk]}), Duration::from_millis(300)).await;
        let verifier = JwtVerifier::new(lenient_egress(Some(&server.ca)));
        let source = KeySource::Url(server.url.clone());
        let good = sign(&pem, Some("k1"), &claims("cloudpass", 600));
        let unknown: Vec<String> =
            (0..200).map(|i| sign(&pem, Some(&format!("made-up-{i}")), &claims("cloudpass", 600))).collect();

        // 200 concurrent tokens with unknown key IDs while nothing is cached: one fetch.
        assert_eq!(flood(&verifier, &source, &unknown).await, 0);
        assert_eq!(server.requests(), 1, "concurrent misses share one fetch");
        // Within the refetch interval, further unknown key IDs fetch nothing; known keys verify.
        assert_eq!(flood(&verifier, &source, &unknown).await, 0);
        assert_eq!(flood(&verifier, &source, std::slice::from_ref(&good)).await, 1);
        assert_eq!(server.requests(), 1, "at most one fetch per refetch interval");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_fetches_are_remembered_and_the_last_good_keys_stay_in_use() {
        let (pem, jwk) = keypair();
        let server = JwksServer::start(json!({"keys": [jwk]}), Duration::from_millis(50)).await;
        // A short refetch interval, so that the test can let it pass.
        let interval = Duration::from_millis(200);
        let timings =
            JwksTimings { refetch_interval: interval, max_backoff: Duration::from_secs(600), ..Default::default() };
        let verifier = JwtVerifier::with_timings(lenient_egress(Some(&server.ca)), timings);
        let source = KeySource::Url(server.url.clone());
        let good = sign(&pem, Some("k1"), &claims("cloudpass", 600));
        let unknown: Vec<String> =
            (0..50).map(|i| sign(&pem, Some(&format!("rotated-{i}")), &claims("cloudpass", 600))).collect();
        assert_eq!(flood(&verifier, &source, std::slice::from_ref(&good)).await, 1);
        assert_eq!(server.requests(), 1);

        // The JWKS server fails; an unknown key ID after the interval refetches once, the
        // refetch fails, and the keys fetched before keep verifying.
        server.fail(true);
        tokio::time::sleep(interval * 2).await;
        assert_eq!(flood(&verifier, &source, &unknown).await, 0);
        assert_eq!(server.requests(), 2, "one refetch for the whole flood");
        assert_eq!(flood(&verifier, &source, std::slice::from_ref(&good)).await, 1, "the last good keys stay in use");
        // The failure is remembered: after the refetch interval, the backoff (at least
        // the interval, growing) still holds further attempts back.
        tokio::time::sleep(interval + interval / 2).await;
        let before = server.requests();
        assert_eq!(flood(&verifier, &source, &unknown).await, 0);
        assert!(server.requests() <= before + 1, "at most one attempt");
        let after_one = server.requests();
        assert_eq!(flood(&verifier, &source, &unknown).await, 0);
        assert_eq!(server.requests(), after_one, "no attempt while backing off");
        assert_eq!(flood(&verifier, &source, std::slice::from_ref(&good)).await, 1);

        // Without any good keys, a failing source is not asked again for every token.
        let fresh = JwtVerifier::with_timings(lenient_egress(Some(&server.ca)), timings);
        let before = server.requests();
        for _ in 0..3 {
            let audiences = vec!["cloudpass".to_owned()];
            let err = fresh.verify::<Value>(&good, &source, &expectations(&audiences)).await.unwrap_err();
            assert!(matches!(&err, Error::KeysUnavailable(why) if why.contains("HTTP 503")), "{err:?}");
        }
        assert_eq!(server.requests(), before + 1, "the failure is remembered");
    }

    #[test]
    fn stale_keys_expire_and_failures_back_off() {
        let t = JwksTimings::default();
        let now = Instant::now();
        let keys = Arc::new(JwkSet { keys: vec![] });
        let fresh = Slot { good: Some((keys.clone(), now)), attempted: now, failure: None };
        assert!(!fresh.fetch_due(now, false, &t));
        assert!(!fresh.fetch_due(now + t.refetch_interval / 2, true, &t));
        assert!(fresh.fetch_due(now + t.refetch_interval, true, &t));
        assert!(fresh.fetch_due(now + t.keys_ttl, false, &t));
        // A day-old key set whose refreshes fail is no longer used.
        let old = Slot {
            good: Some((keys, now)),
            attempted: now + t.max_stale,
            failure: Some(Failure {
                error: "HTTP 503".into(),
                retry_at: now + t.max_stale + t.max_backoff,
                backoff: Arc::new(Mutex::new(Retry::new(t.refetch_interval, t.max_backoff))),
            }),
        };
        assert!(old.keys(now + t.max_stale - Duration::from_secs(1), &t).is_ok());
        let err = old.keys(now + t.max_stale, &t).unwrap_err();
        assert_eq!(err, Error::KeysUnavailable("HTTP 503".into()));
        assert!(!old.fetch_due(now + t.max_stale + Duration::from_secs(1), true, &t), "backing off");
    }

    fn sign(pem: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap()
    }

    fn claims(aud: &str, exp_offset: i64) -> Value {
        let now = jiff::Timestamp::now().as_second();
        json!({"iss": "https://issuer.example", "aud": aud, "sub": "s", "exp": now + exp_offset, "iat": now})
    }

    #[tokio::test]
    async fn verifies_and_names_each_failure() {
        let (pem, jwk) = keypair();
        let source = KeySource::Inline(json!({"keys": [jwk]}).to_string());
        let verifier = JwtVerifier::new(lenient_egress(None));
        let audiences = vec!["cloudpass".to_owned()];
        let expect = Expectations {
            issuer: "https://issuer.example",
            audiences: &audiences,
            algorithms: &[JwtAlgorithm::ES256],
        };
        let good = sign(&pem, Some("k1"), &claims("cloudpass", 600));
        let got: Value = verifier.verify(&good, &source, &expect).await.unwrap();
        assert_eq!(got["sub"], "s");

        let cases = [
            (sign(&pem, Some("k1"), &claims("other", 600)), "audience"),
            (sign(&pem, Some("k1"), &claims("cloudpass", -600)), "expired"),
            (sign(&pem, None, &claims("cloudpass", 600)), "names no key"),
            (sign(&pem, Some("k2"), &claims("cloudpass", 600)), "not in the issuer's JWKS"),
            (sign(&keypair().0, Some("k1"), &claims("cloudpass", 600)), "signature"),
            ("not-a-jwt".to_owned(), "not a JWT"),
        ];
        for (token, want) in cases {
            let err = verifier.verify::<Value>(&token, &source, &expect).await.unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        // alg none and HMAC are refused before any key is looked at.
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B};
        let body = B.encode(claims("cloudpass", 600).to_string());
        let none = format!("{}.{body}.", B.encode(r#"{"alg":"none","kid":"k1"}"#));
        assert!(verifier.verify::<Value>(&none, &source, &expect).await.unwrap_err().to_string().contains("not a JWT"));
        let hs = jsonwebtoken::encode(
            &Header { kid: Some("k1".into()), ..Header::new(Algorithm::HS256) },
            &claims("cloudpass", 600),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(
            verifier.verify::<Value>(&hs, &source, &expect).await.unwrap_err().to_string().contains("not accepted")
        );
        let rs_only = Expectations { algorithms: &[JwtAlgorithm::RS256], ..expect.clone() };
        assert!(
            verifier.verify::<Value>(&good, &source, &rs_only).await.unwrap_err().to_string().contains("not accepted")
        );
    }

    #[test]
    fn claim_paths() {
        let c = json!({"google": {"compute_engine": {"project_id": "p"}}, "groups": ["a", "b"], "n": 3});
        assert_eq!(claim_strings(&c, "google.compute_engine.project_id"), ["p"]);
        assert_eq!(claim_strings(&c, "groups"), ["a", "b"]);
        assert_eq!(claim_strings(&c, "n"), ["3"]);
        assert!(claim_strings(&c, "missing.path").is_empty());
    }
}
