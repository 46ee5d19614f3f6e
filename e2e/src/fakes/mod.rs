//! Small, honest fakes of the cloud token services, for what the emulators (moto,
//! Azurite, fake-gcs-server) do not check: the federation trust decisions.
//!
//! Each fake verifies exactly what the real service verifies about a presented JWT
//! (through [`jwt::JwtVerifier`]: the issuer's discovery document and JWKS over HTTPS,
//! signature, issuer, audience, expiry) plus the service's own configuration (registered
//! providers, federated credentials, trust conditions), and answers in the service's own
//! success and error formats. They serve HTTPS with a certificate of a
//! [`crate::certs::TestCa`], run in-process on the caller's tokio runtime and stop when
//! dropped. Every fake counts its successful answers ([`Counters::calls`]) and can be told
//! to fail its next token requests like an upstream outage ([`Counters::fail_next`]).
//!
//! - [`aws_sts`]: a gate in front of moto's STS for `AssumeRoleWithWebIdentity`;
//! - [`entra`]: the Microsoft Entra token endpoint (client assertions, managed identities);
//! - [`google`]: Google STS token exchange, IAM Credentials impersonation, identity tokens;
//! - [`metadata`]: the link-local metadata services a pod's cloud evidence comes from
//!   (Azure IMDS, the GKE metadata server, AWS IMDSv2, the EKS Pod Identity agent), plain
//!   HTTP like the real ones;
//! - [`oauth2`]: a plain OAuth 2.0 client-credentials token endpoint;
//! - [`secret_stores`]: the Azure Key Vault and Google Secret Manager data planes;
//! - [`test_issuer`]: an OIDC issuer to test the fakes without the broker.
//!
//! Tokens are never logged.

pub mod aws_sts;
pub mod entra;
pub mod google;
pub mod jwt;
pub mod metadata;
pub mod oauth2;
pub mod secret_stores;
pub mod test_issuer;

use std::{
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::{certs::TestCa, tls::serve_https};

/// An HTTPS server task on a free port of the test bed's listen address; dropping it
/// stops the server and closes its connections.
pub(crate) struct Served {
    url: String,
    task: JoinHandle<()>,
}

impl Served {
    /// Serves `router` with a fresh serving certificate of `ca`.
    pub(crate) async fn start(router: axum::Router, ca: &TestCa) -> Result<Self> {
        let pair = ca.issue_server(&[])?;
        let (addr, task) = serve_https(router, &pair).await?;
        Ok(Self { url: crate::net::local_url("https", addr.port()), task })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The call counter and the failure switch every fake has.
#[derive(Debug, Default)]
pub struct Counters {
    calls: AtomicU64,
    failures: Mutex<(u32, u16)>,
    requests: Mutex<std::collections::VecDeque<Vec<(String, String)>>>,
}

/// How many token requests a fake remembers.
const REMEMBERED_REQUESTS: usize = 64;

impl Counters {
    /// How many successful answers (those the real service would give with a 2xx) the fake
    /// has given.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Makes the next `count` token requests fail with HTTP `status` (a 5xx), in the
    /// service's own error format, as during an outage of the real service.
    pub fn fail_next(&self, count: u32, status: u16) {
        *self.failures.lock().expect("counters lock") = (count, status);
    }

    /// Takes one planned failure, if any: the status to answer with.
    pub(crate) fn take_failure(&self) -> Option<u16> {
        let mut failures = self.failures.lock().expect("counters lock");
        if failures.0 == 0 {
            return None;
        }
        failures.0 -= 1;
        Some(failures.1)
    }

    /// The parameters of the last token requests, oldest first (form fields, or the JSON
    /// body's top-level fields as text), whatever the answers: what a test checks a caller
    /// sent.
    pub fn requests(&self) -> Vec<Vec<(String, String)>> {
        self.requests.lock().expect("counters lock").iter().cloned().collect()
    }

    pub(crate) fn record_request(&self, params: &[(String, String)]) {
        let mut requests = self.requests.lock().expect("counters lock");
        if requests.len() == REMEMBERED_REQUESTS {
            requests.pop_front();
        }
        requests.push_back(params.to_vec());
    }

    pub(crate) fn record_success(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

/// A private signing key with its JWK (public part, `kid`, `alg`, `use: sig`).
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No private material in debug output.
        f.debug_struct("SigningKey").field("kid", &self.kid).field("algorithm", &self.algorithm).finish()
    }
}

impl SigningKey {
    /// A new ECDSA P-256 key (ES256), as the cloudpass issuer uses.
    pub fn generate_es256() -> Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        Self::from_encoding_key(EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?, Algorithm::ES256)
    }

    /// A new RSA 2048 key (RS256), as Entra and Google use.
    pub fn generate_rs256() -> Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
        Self::from_encoding_key(EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes())?, Algorithm::RS256)
    }

    fn from_encoding_key(encoding: EncodingKey, algorithm: Algorithm) -> Result<Self> {
        let public = serde_json::to_value(Jwk::from_encoding_key(&encoding, algorithm)?)?;
        // The key ID is the RFC 7638 thumbprint of the public key, as many issuers do.
        let thumbprint_input = match public["kty"].as_str() {
            Some("EC") => format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                str_of(&public["crv"]),
                str_of(&public["x"]),
                str_of(&public["y"])
            ),
            _ => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, str_of(&public["e"]), str_of(&public["n"])),
        };
        let kid = B64URL.encode(Sha256::digest(thumbprint_input.as_bytes()));
        let mut jwk = public;
        jwk["kid"] = Value::String(kid.clone());
        jwk["use"] = Value::String("sig".into());
        jwk["alg"] = serde_json::to_value(algorithm)?;
        Ok(Self { kid, algorithm, encoding, jwk })
    }

    /// The key ID.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// Verifies a JWT this key signed: its claims, or why not (signature, expiry).
    pub fn verify(&self, token: &str) -> Result<Value, String> {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(self.jwk.clone()).map_err(|e| e.to_string())?;
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        let mut validation = jsonwebtoken::Validation::new(self.algorithm);
        validation.validate_aud = false;
        jsonwebtoken::decode::<Value>(token, &key, &validation).map(|d| d.claims).map_err(|e| e.to_string())
    }

    /// Signs `claims` (a JSON object) as a JWT with `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        // Signing serialisable JSON with a key we generated cannot fail.
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signing a JWT")
    }
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// Current Unix time in seconds.
pub(crate) fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// `n` random bytes, hex-encoded (aws-lc-rs randomness, through rustls's provider).
pub(crate) fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut bytes).expect("system randomness");
    bytes.iter().fold(String::with_capacity(2 * n), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A random UUID (version 4 layout), for request and trace IDs.
pub(crate) fn random_uuid() -> String {
    let hex = random_hex(16);
    format!("{}-{}-4{}-a{}-{}", &hex[0..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..32])
}

/// The parameters of an `application/x-www-form-urlencoded` body or query string, in order.
pub(crate) fn parse_form(input: &[u8]) -> Vec<(String, String)> {
    input
        .split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut parts = pair.splitn(2, |b| *b == b'=');
            let name = percent_decode(parts.next().unwrap_or_default());
            let value = percent_decode(parts.next().unwrap_or_default());
            (name, value)
        })
        .collect()
}

/// The first value of parameter `name`.
pub(crate) fn param<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn percent_decode(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < input.len() => {
                match u8::from_str_radix(std::str::from_utf8(&input[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes parameters as an `application/x-www-form-urlencoded` body (for tests and for
/// clients of the fakes).
pub fn form_encode(params: &[(&str, &str)]) -> String {
    fn encode(s: &str, out: &mut String) {
        for byte in s.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(byte as char),
                b' ' => out.push('+'),
                _ => {
                    let _ = write!(out, "%{byte:02X}");
                }
            }
        }
    }
    let mut out = String::new();
    for (i, (name, value)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode(name, &mut out);
        out.push('=');
        encode(value, &mut out);
    }
    out
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters and `?` one
/// character (IAM's `StringLike`).
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Classic two-pointer wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_round_trip() {
        let body = form_encode(&[("a b", "x=y&z"), ("tok", "é%+/")]);
        assert_eq!(body, "a+b=x%3Dy%26z&tok=%C3%A9%25%2B%2F");
        let parsed = parse_form(body.as_bytes());
        assert_eq!(parsed, vec![("a b".into(), "x=y&z".into()), ("tok".into(), "é%+/".into())]);
        assert_eq!(parse_form(b"a=%zz&b=%4"), vec![("a".into(), "%zz".into()), ("b".into(), "%4".into())]);
    }

    #[test]
    fn globs_match_like_iam() {
        assert!(glob_match("system:serviceaccount:ns:*", "system:serviceaccount:ns:app"));
        assert!(glob_match("a*c?e", "abbbcde"));
        assert!(!glob_match("system:serviceaccount:ns:*", "system:serviceaccount:other:app"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("abc", "abcd"));
    }

    #[test]
    fn keys_sign_and_publish() {
        for key in [SigningKey::generate_es256().unwrap(), SigningKey::generate_rs256().unwrap()] {
            let token = key.sign(&serde_json::json!({"sub": "x"}));
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some(key.kid()));
            let jwk: Jwk = serde_json::from_value(key.jwk().clone()).unwrap();
            let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut validation = jsonwebtoken::Validation::new(header.alg);
            validation.required_spec_claims.clear();
            validation.validate_exp = false;
            jsonwebtoken::decode::<Value>(&token, &decoding, &validation).unwrap();
        }
    }
}
