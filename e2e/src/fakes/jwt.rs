//! JWT verification as the clouds do it for federated tokens, shared by the fakes.
//!
//! Keys come from the issuer itself: `GET <iss>/.well-known/openid-configuration`, then
//! its `jwks_uri`, both over HTTPS trusting only the test CA. Key sets are cached per
//! issuer and fetched again once when a token names an unknown `kid` (issuers rotate).
//! Only RS256 and ES256 are accepted; `alg: none`, HMAC (key confusion with a public key)
//! and tokens without `kid` are refused. Claims: `iss` exactly, `aud` (string or list) one
//! of the allowed audiences, `exp` required and checked with a leeway (AWS allows 60 s),
//! `nbf` and `iat` not in the future (same leeway).
//!
//! Errors are typed so that each fake answers with its own service's error code.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use anyhow::Result;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::Jwk};
use serde_json::{Map, Value};

use super::now;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON, or a claim of the wrong type.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` other than RS256/ES256 (including `none` and HMAC).
    #[error("signing algorithm {0:?} is not accepted")]
    UnsupportedAlgorithm(String),
    /// No `kid` in the header.
    #[error("the token header has no key ID (kid)")]
    MissingKeyId,
    /// The issuer's discovery document or JWKS could not be fetched or read.
    #[error("could not retrieve the verification keys of {issuer}: {reason}")]
    KeyRetrieval {
        /// The issuer URL.
        issuer: String,
        /// What went wrong.
        reason: String,
    },
    /// The issuer's JWKS has no usable key with this `kid`, even after fetching it again.
    #[error("the issuer publishes no key {kid:?}")]
    UnknownKey {
        /// The key ID of the token.
        kid: String,
    },
    /// The published key does not fit the algorithm, or the signature does not verify.
    #[error("the signature does not verify")]
    InvalidSignature,
    /// `iss` is not the expected issuer.
    #[error("issuer {actual:?} is not {expected:?}")]
    IssuerMismatch {
        /// The issuer the verifier was told to expect.
        expected: String,
        /// The token's `iss`.
        actual: String,
    },
    /// No `aud` of the token is an allowed audience.
    #[error("audience {actual:?} is not allowed")]
    AudienceMismatch {
        /// The token's audiences.
        actual: Vec<String>,
    },
    /// A required claim is missing.
    #[error("the token has no {0:?} claim")]
    MissingClaim(&'static str),
    /// `exp` (plus leeway) has passed.
    #[error("token expired at {exp}, now is {now}")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// `nbf` (minus leeway) is in the future.
    #[error("token not valid before {nbf}, now is {now}")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// `iat` (minus leeway) is in the future.
    #[error("token issued at {iat}, in the future (now is {now})")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: i64,
        /// The verifier's clock.
        now: i64,
    },
}

/// The registered claims of a token, plus every other claim in `extra`.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `iss`.
    pub iss: String,
    /// `sub`, if present.
    pub sub: Option<String>,
    /// `aud`, as a list (a single string becomes one element).
    pub aud: Vec<String>,
    /// `exp`, if present (verification requires it).
    pub exp: Option<i64>,
    /// `nbf`, if present.
    pub nbf: Option<i64>,
    /// `iat`, if present.
    pub iat: Option<i64>,
    /// Every claim, including the ones above.
    pub all: Map<String, Value>,
}

impl Claims {
    fn from_json(all: Map<String, Value>) -> Result<Self, JwtError> {
        let string = |name: &str| match all.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(JwtError::Malformed(format!("claim {name:?} is not a string"))),
        };
        let number = |name: &str| match all.get(name) {
            None | Some(Value::Null) => Ok(None),
            // NumericDate may be fractional; whole seconds are enough here.
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| JwtError::Malformed(format!("claim {name:?} is not a number"))),
            Some(_) => Err(JwtError::Malformed(format!("claim {name:?} is not a number"))),
        };
        let aud = match all.get("aud") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| JwtError::Malformed("claim \"aud\" holds a non-string".into()))?,
            Some(_) => return Err(JwtError::Malformed("claim \"aud\" is neither a string nor a list".into())),
        };
        Ok(Self {
            iss: string("iss")?.ok_or(JwtError::MissingClaim("iss"))?,
            sub: string("sub")?,
            aud,
            exp: number("exp")?,
            nbf: number("nbf")?,
            iat: number("iat")?,
            all,
        })
    }

    /// A string claim other than the registered ones (e.g. `oid`, `email`).
    pub fn str(&self, name: &str) -> Option<&str> {
        self.all.get(name).and_then(Value::as_str)
    }
}

/// A token whose signature and claims passed verification.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwt {
    /// Its `alg`.
    pub algorithm: Algorithm,
    /// Its `kid`.
    pub kid: String,
    /// Its claims.
    pub claims: Claims,
}

/// What a token must satisfy.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// The exact `iss`; its keys are fetched from there.
    pub issuer: &'a str,
    /// Allowed audiences: at least one `aud` of the token must be one of them.
    pub audiences: &'a [String],
}

/// Verifies JWTs against their issuers' published keys, with a per-issuer key cache.
pub struct JwtVerifier {
    http: reqwest::Client,
    leeway_seconds: i64,
    keys: Mutex<HashMap<String, Vec<Jwk>>>,
}

impl JwtVerifier {
    /// A verifier that trusts only `ca_pem` for HTTPS to issuers, with a 60 s clock leeway.
    pub fn new(ca_pem: &str) -> Result<Self> {
        // Names the test bed stands in for public DNS with (crate::net) resolve here too.
        let http = crate::net::client_builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self { http, leeway_seconds: 60, keys: Mutex::new(HashMap::new()) })
    }

    /// The same verifier with another clock leeway (at most 60 s, as AWS allows).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway_seconds = leeway.as_secs().min(60) as i64;
        self
    }

    /// Verifies `token`: header, issuer, signature with the issuer's key, audience and times.
    pub async fn verify(&self, token: &str, expected: &Expected<'_>) -> Result<VerifiedJwt, JwtError> {
        let (algorithm, kid) = checked_header(token)?;
        let claims = unverified_claims(token)?;
        // The issuer is checked before anything is fetched, so a token cannot make the
        // verifier fetch keys from a URL of its choosing.
        if claims.iss != expected.issuer {
            return Err(JwtError::IssuerMismatch { expected: expected.issuer.to_owned(), actual: claims.iss });
        }
        let jwk = self.key(expected.issuer, &kid).await?;
        check_signature(token, algorithm, &jwk)?;
        if !claims.aud.iter().any(|aud| expected.audiences.contains(aud)) {
            return Err(JwtError::AudienceMismatch { actual: claims.aud });
        }
        let now = now();
        let exp = claims.exp.ok_or(JwtError::MissingClaim("exp"))?;
        if now > exp + self.leeway_seconds {
            return Err(JwtError::Expired { exp, now });
        }
        if let Some(nbf) = claims.nbf
            && nbf > now + self.leeway_seconds
        {
            return Err(JwtError::NotYetValid { nbf, now });
        }
        if let Some(iat) = claims.iat
            && iat > now + self.leeway_seconds
        {
            return Err(JwtError::IssuedInFuture { iat, now });
        }
        Ok(VerifiedJwt { algorithm, kid, claims })
    }

    /// The issuer's key `kid`, from the cache or, once, from a fresh fetch.
    async fn key(&self, issuer: &str, kid: &str) -> Result<Jwk, JwtError> {
        let cached = self.keys.lock().expect("key cache lock").get(issuer).and_then(|keys| find(keys, kid));
        if let Some(jwk) = cached {
            return Ok(jwk);
        }
        let keys = self.fetch_keys(issuer).await?;
        let found = find(&keys, kid);
        self.keys.lock().expect("key cache lock").insert(issuer.to_owned(), keys);
        found.ok_or_else(|| JwtError::UnknownKey { kid: kid.to_owned() })
    }

    async fn fetch_keys(&self, issuer: &str) -> Result<Vec<Jwk>, JwtError> {
        let failed = |reason: String| JwtError::KeyRetrieval { issuer: issuer.to_owned(), reason };
        if !issuer.starts_with("https://") {
            return Err(failed("the issuer is not an https URL".into()));
        }
        let discovery_url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let discovery = self.get_json(&discovery_url).await.map_err(failed)?;
        let jwks_uri = discovery["jwks_uri"]
            .as_str()
            .ok_or_else(|| failed("the discovery document has no jwks_uri".into()))?
            .to_owned();
        if !jwks_uri.starts_with("https://") {
            return Err(failed(format!("jwks_uri {jwks_uri} is not https")));
        }
        let jwks = self.get_json(&jwks_uri).await.map_err(failed)?;
        let keys = jwks["keys"].as_array().ok_or_else(|| failed("the JWKS has no keys array".into()))?;
        // Keys of kinds this library cannot read are skipped, as clouds ignore them.
        Ok(keys.iter().filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok()).collect())
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let response = self.http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status()));
        }
        response.json().await.map_err(|e| format!("GET {url}: {e}"))
    }
}

fn find(keys: &[Jwk], kid: &str) -> Option<Jwk> {
    keys.iter().find(|k| k.common.key_id.as_deref() == Some(kid)).cloned()
}

/// The algorithm and key ID of a token, refusing everything but RS256 and ES256.
fn checked_header(token: &str) -> Result<(Algorithm, String), JwtError> {
    let header_b64 = token.split('.').next().unwrap_or_default();
    let header: Value = B64URL
        .decode(header_b64)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| JwtError::Malformed("the header is not base64url JSON".into()))?;
    // Read `alg` as a string, so that `none` (which the library cannot even parse) gets
    // its own clear error.
    let algorithm = match header["alg"].as_str() {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some(other) => return Err(JwtError::UnsupportedAlgorithm(other.to_owned())),
        None => return Err(JwtError::Malformed("the header has no alg".into())),
    };
    let kid = header["kid"].as_str().filter(|k| !k.is_empty()).ok_or(JwtError::MissingKeyId)?;
    Ok((algorithm, kid.to_owned()))
}

/// The claims of a token without verifying anything: to find out which issuer, app or
/// provider it is for before verifying it against that one.
pub fn unverified_claims(token: &str) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("a JWT has three dot-separated parts".into()));
    };
    let claims: Map<String, Value> = B64URL
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| JwtError::Malformed("the payload is not a base64url JSON object".into()))?;
    Claims::from_json(claims)
}

fn check_signature(token: &str, algorithm: Algorithm, jwk: &Jwk) -> Result<(), JwtError> {
    // The published key must be of the token's kind (no RSA key used as an EC key or as an
    // HMAC secret) and, where it says so, meant for this algorithm.
    let jwk_json = serde_json::to_value(jwk).map_err(|_| JwtError::InvalidSignature)?;
    let fits = match algorithm {
        Algorithm::ES256 => jwk_json["kty"] == "EC" && jwk_json["crv"] == "P-256",
        Algorithm::RS256 => jwk_json["kty"] == "RSA",
        _ => false,
    };
    let alg_ok = jwk_json
        .get("alg")
        .and_then(Value::as_str)
        .is_none_or(|a| serde_json::to_value(algorithm).is_ok_and(|v| v == a));
    let use_ok = jwk_json.get("use").and_then(Value::as_str).is_none_or(|u| u == "sig");
    if !(fits && alg_ok && use_ok) {
        return Err(JwtError::InvalidSignature);
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| JwtError::InvalidSignature)?;
    let mut validation = Validation::new(algorithm);
    // Claims are checked by the caller, with typed errors; here only the signature.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &key, &validation).map(drop).map_err(|_| JwtError::InvalidSignature)
}
