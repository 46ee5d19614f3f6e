//! JWT verification against an issuer's published keys: algorithm pinned per trust
//! provider, `kid` required, issuer, audience, expiry (small leeway) and not-before
//! checked. Keys are fetched over HTTPS from the issuer's discovery document or a JWKS
//! URL, cached, and refetched when a token names a key the cache does not hold (at most
//! once per [`REFETCH_INTERVAL`] per source, so a flood of made-up key IDs cannot turn
//! into a flood of fetches).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cloudpass_api::trust::JwtAlgorithm;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 60;
/// How long fetched keys are trusted before they are fetched again.
const KEYS_TTL: Duration = Duration::from_secs(3600);
/// Minimum time between two fetches of one source.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Largest JWKS or discovery document read.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Sources kept in the cache; the least recently fetched is dropped beyond this.
const MAX_SOURCES: usize = 512;

/// Where the verification keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// `jwks_uri` of `<issuer>/.well-known/openid-configuration`.
    Discovery(String),
    /// A JWKS URL.
    Url(String),
    /// A JWKS given inline (JSON).
    Inline(String),
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

struct Cached {
    keys: Arc<JwkSet>,
    fetched: Instant,
}

/// Verifies JWTs; caches keys per source.
pub struct JwtVerifier {
    http: reqwest::Client,
    cache: Mutex<HashMap<KeySource, Cached>>,
}

/// Reads a response body of at most `limit` bytes.
pub async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("reading the answer: {e}"))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("answer larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl JwtVerifier {
    /// A verifier fetching keys with `http`.
    pub fn new(http: reqwest::Client) -> Self {
        Self { http, cache: Mutex::default() }
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        if !url.starts_with("https://") {
            return Err(format!("{url} is not an https URL"));
        }
        let response = self.http.get(url).send().await.map_err(|e| format!("fetching {url}: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("fetching {url}: HTTP {status}"));
        }
        let body = read_limited(response, MAX_DOCUMENT_BYTES).await.map_err(|e| format!("fetching {url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("{url} is not JSON: {e}"))
    }

    async fn fetch(&self, source: &KeySource) -> Result<JwkSet, String> {
        let value = match source {
            KeySource::Inline(json) => serde_json::from_str(json).map_err(|e| format!("inline JWKS: {e}"))?,
            KeySource::Url(url) => self.get_json(url).await?,
            KeySource::Discovery(issuer) => {
                let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
                let doc = self.get_json(&url).await?;
                if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
                    return Err(format!("the discovery document at {url} names another issuer"));
                }
                let jwks_uri =
                    doc.get("jwks_uri").and_then(Value::as_str).ok_or_else(|| format!("{url} has no jwks_uri"))?;
                self.get_json(jwks_uri).await?
            }
        };
        // Keys of unknown types are skipped rather than failing the whole set.
        let keys = value.get("keys").and_then(Value::as_array).ok_or("JWKS has no keys array")?;
        let keys = keys.iter().filter_map(|k| serde_json::from_value(k.clone()).ok()).collect();
        Ok(JwkSet { keys })
    }

    /// The keys of `source`: cached, fetched when absent or stale, or when `refetch` and
    /// the last fetch is older than [`REFETCH_INTERVAL`].
    async fn keys(&self, source: &KeySource, refetch: bool) -> Result<Arc<JwkSet>, String> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.get(source) {
                let age = c.fetched.elapsed();
                if age < KEYS_TTL && (!refetch || age < REFETCH_INTERVAL) {
                    return Ok(c.keys.clone());
                }
            }
        }
        let keys = Arc::new(self.fetch(source).await?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_SOURCES
            && let Some(oldest) = cache.iter().min_by_key(|(_, c)| c.fetched).map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        cache.insert(source.clone(), Cached { keys: keys.clone(), fetched: Instant::now() });
        Ok(keys)
    }

    /// Verifies `token` and returns its claims. The error says what failed, never the token.
    pub async fn verify<C: DeserializeOwned>(
        &self,
        token: &str,
        source: &KeySource,
        expect: &Expectations<'_>,
    ) -> Result<C, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        let pinned: Vec<Algorithm> = expect.algorithms.iter().copied().map(algorithm).collect();
        if !pinned.contains(&header.alg) {
            return Err(format!("signature algorithm {:?} is not accepted (accepted: {:?})", header.alg, pinned));
        }
        let kid = header.kid.as_deref().ok_or("the token names no key (kid)")?;
        let mut keys = self.keys(source, false).await?;
        if keys.find(kid).is_none() {
            keys = self.keys(source, true).await?;
        }
        let jwk = keys.find(kid).ok_or_else(|| format!("key {kid:?} is not in the issuer's JWKS"))?;
        if let Some(key_alg) = jwk.common.key_algorithm
            && key_alg.to_string() != format!("{:?}", header.alg)
        {
            return Err(format!("key {kid:?} is for {key_alg}, the token claims {:?}", header.alg));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?} is unusable: {e}"))?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[expect.issuer]);
        validation.set_audience(expect.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| describe(&e, expect))?;
        if let Some(iat) = data.claims.get("iat").and_then(Value::as_i64)
            && iat > jiff::Timestamp::now().as_second() + LEEWAY_SECONDS as i64
        {
            return Err("the token was issued in the future (iat)".into());
        }
        serde_json::from_value(data.claims).map_err(|e| format!("unexpected claims: {e}"))
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
        let verifier = JwtVerifier::new(reqwest::Client::new());
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
            let err = verifier.verify::<Value>(&token, &source, &expect).await.unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        // alg none and HMAC are refused before any key is looked at.
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B};
        let body = B.encode(claims("cloudpass", 600).to_string());
        let none = format!("{}.{body}.", B.encode(r#"{"alg":"none","kid":"k1"}"#));
        assert!(verifier.verify::<Value>(&none, &source, &expect).await.unwrap_err().contains("not a JWT"));
        let hs = jsonwebtoken::encode(
            &Header { kid: Some("k1".into()), ..Header::new(Algorithm::HS256) },
            &claims("cloudpass", 600),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(verifier.verify::<Value>(&hs, &source, &expect).await.unwrap_err().contains("not accepted"));
        let rs_only = Expectations { algorithms: &[JwtAlgorithm::RS256], ..expect.clone() };
        assert!(verifier.verify::<Value>(&good, &source, &rs_only).await.unwrap_err().contains("not accepted"));
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
