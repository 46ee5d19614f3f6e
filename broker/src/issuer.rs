//! The cloudpass OIDC issuer: the signing keys of broker-signed JWTs, kept in a Secret,
//! rotated with overlap, and published as a discovery document and JWKS.
//!
//! Rotation follows what clouds need: a new key is published `publish_ahead` before it
//! signs anything (clouds cache JWKS, so they must already know a key when they first see
//! a token signed with it), and a superseded key stays published until every token it
//! signed has expired (`max_token_lifetime` after it stopped signing).

use std::{collections::BTreeMap, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use cloudpass_api::secret::SecretString;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::info;

/// Key of the Secret's data holding the key set.
const KEYS_DATA: &str = "keys.json";
/// Path of the JWKS, relative to the issuer URL.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// Path of the discovery document, relative to the issuer URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// When keys rotate: how long one signs, how early a successor is published, and how
/// long a superseded key stays published.
#[derive(Clone, Debug)]
pub struct RotationPolicy {
    /// How long a key signs before a successor takes over.
    pub rotate_after: Duration,
    /// How long a new key is published before it signs.
    pub publish_ahead: Duration,
    /// The longest lifetime of a token the issuer signs.
    pub max_token_lifetime: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            rotate_after: Duration::from_secs(30 * 86400),
            publish_ahead: Duration::from_secs(86400),
            max_token_lifetime: Duration::from_secs(12 * 3600),
        }
    }
}

/// One signing key, as stored. `Debug` does not show the private key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    kid: String,
    /// PKCS#8 PEM of the ECDSA P-256 private key.
    private_pem: SecretString,
    /// Public point coordinates, base64url.
    x: String,
    y: String,
    /// Unix seconds from which it signs.
    sign_from: i64,
    /// Unix seconds after which it is no longer published (set once superseded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retire_at: Option<i64>,
}

/// The key set. Its `Debug` shows key IDs and public keys, never a private key.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: Vec<StoredKey>,
}

/// Why the issuer could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// Key generation or parsing failed.
    #[error("signing key: {0}")]
    Key(String),
    /// The key Secret exists but does not hold a key set.
    #[error("Secret {0} does not hold a cloudpass issuer key set ({1})")]
    Corrupt(String, String),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

fn new_key(sign_from: i64) -> Result<StoredKey, IssuerError> {
    let pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| IssuerError::Key(e.to_string()))?;
    let raw = pair.public_key_raw();
    // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
    if raw.len() != 65 || raw[0] != 4 {
        return Err(IssuerError::Key("unexpected public key encoding".into()));
    }
    let (x, y) = (B64URL.encode(&raw[1..33]), B64URL.encode(&raw[33..65]));
    // RFC 7638 thumbprint: members in lexicographic order, no white space.
    let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = B64URL.encode(Sha256::digest(thumbprint.as_bytes()));
    Ok(StoredKey { kid, private_pem: SecretString::new(pair.serialize_pem()), x, y, sign_from, retire_at: None })
}

impl KeySet {
    /// The key set after one rotation step at time `now` (unix seconds); `None` if
    /// nothing changes.
    pub fn rotated(&self, policy: &RotationPolicy, now: i64) -> Result<Option<KeySet>, IssuerError> {
        let mut next = self.clone();
        next.keys.retain(|k| k.retire_at.is_none_or(|t| t > now));
        if next.keys.is_empty() {
            // First key: nothing can have cached an older set, so it signs at once.
            next.keys.push(new_key(now)?);
        }
        let newest = next.keys.iter().map(|k| k.sign_from).max().unwrap_or(now);
        if newest <= now && now - newest >= policy.rotate_after.as_secs() as i64 {
            let successor = new_key(now + policy.publish_ahead.as_secs() as i64)?;
            info!(kid = %successor.kid, "new issuer key published; it signs after the publish-ahead period");
            next.keys.push(successor);
        }
        // Every key but the newest active one retires once its tokens have expired.
        next.keys.sort_by_key(|k| k.sign_from);
        let active = next.keys.iter().rposition(|k| k.sign_from <= now);
        let successors: Vec<i64> = next.keys.iter().map(|k| k.sign_from).collect();
        for (i, key) in next.keys.iter_mut().enumerate() {
            if Some(i) < active && key.retire_at.is_none() {
                let stopped = successors[i + 1];
                key.retire_at = Some(stopped + policy.max_token_lifetime.as_secs() as i64);
            }
        }
        Ok((next != *self).then_some(next))
    }

    fn active(&self, now: i64) -> Option<&StoredKey> {
        self.keys.iter().filter(|k| k.sign_from <= now).max_by_key(|k| k.sign_from)
    }

    /// The JWKS: every published key.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|k| json!({"kty": "EC", "crv": "P-256", "x": k.x, "y": k.y, "kid": k.kid, "alg": "ES256", "use": "sig"}))
            .collect();
        json!({ "keys": keys })
    }

    /// Signs `claims` with the active key (ES256, `kid` in the header).
    pub fn sign(&self, claims: &Value, now: i64) -> Result<String, IssuerError> {
        let key = self.active(now).ok_or_else(|| IssuerError::Key("no active signing key".into()))?;
        let encoding = EncodingKey::from_ec_pem(key.private_pem.expose().as_bytes())?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &encoding)?)
    }
}

/// The discovery document of an issuer URL.
pub fn discovery(issuer: &str) -> Value {
    let base = issuer.trim_end_matches('/');
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{base}{JWKS_PATH}"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"],
    })
}

fn parse(secret_name: &str, secret: &Secret) -> Result<KeySet, IssuerError> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEYS_DATA))
        .ok_or_else(|| IssuerError::Corrupt(secret_name.into(), format!("no {KEYS_DATA}")))?;
    serde_json::from_slice(&bytes.0).map_err(|e| IssuerError::Corrupt(secret_name.into(), e.to_string()))
}

fn data(set: &KeySet) -> BTreeMap<String, ByteString> {
    [(KEYS_DATA.to_owned(), ByteString(serde_json::to_vec(set).expect("key set serializes")))].into()
}

/// Reads the key set from its Secret without creating or rotating it (for a process that
/// signs but does not own the keys, as the controller's verification does); `None`
/// while the broker has not created it yet.
pub async fn load_keys(client: &Client, namespace: &str, secret_name: &str) -> Result<Option<KeySet>, IssuerError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    api.get_opt(secret_name).await?.map(|secret| parse(secret_name, &secret)).transpose()
}

/// Loads the key set from its Secret, creating or rotating it as due (optimistic
/// concurrency: replicas racing cannot both write).
pub async fn sync_keys(
    client: &Client,
    namespace: &str,
    secret_name: &str,
    policy: &RotationPolicy,
) -> Result<KeySet, IssuerError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    loop {
        let now = jiff::Timestamp::now().as_second();
        match api.get_opt(secret_name).await? {
            None => {
                let set = KeySet::default().rotated(policy, now)?.expect("an empty set always gets a key");
                let secret = Secret {
                    metadata: ObjectMeta { name: Some(secret_name.into()), ..Default::default() },
                    type_: Some("Opaque".into()),
                    data: Some(data(&set)),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => {
                        info!(secret = secret_name, "issuer signing key created");
                        return Ok(set);
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Some(mut secret) => {
                let set = parse(secret_name, &secret)?;
                let Some(next) = set.rotated(policy, now)? else { return Ok(set) };
                secret.data = Some(data(&next));
                match api.replace(secret_name, &PostParams::default(), &secret).await {
                    Ok(_) => return Ok(next),
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};

    use super::*;

    fn policy() -> RotationPolicy {
        RotationPolicy {
            rotate_after: Duration::from_secs(100),
            publish_ahead: Duration::from_secs(10),
            max_token_lifetime: Duration::from_secs(20),
        }
    }

    fn verify(set: &KeySet, token: &str) -> bool {
        let jwks: JwkSet = serde_json::from_value(set.jwks()).unwrap();
        let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
        let Some(jwk) = jwks.find(&kid) else { return false };
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["sts.amazonaws.com"]);
        v.validate_exp = false;
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v).is_ok()
    }

    #[test]
    fn rotation_publishes_ahead_and_retires_after_the_last_token_expires() {
        let p = policy();
        let t0 = 1_000_000;
        let set = KeySet::default().rotated(&p, t0).unwrap().unwrap();
        assert_eq!(set.keys.len(), 1);
        assert!(set.rotated(&p, t0 + 50).unwrap().is_none(), "nothing due before rotate_after");
        let claims = json!({"iss": "https://issuer", "sub": "system:cloudpass:a:b", "aud": "sts.amazonaws.com", "exp": 4_000_000_000u64});
        let old_token = set.sign(&claims, t0 + 90).unwrap();

        // Rotation due: the successor is published but does not sign yet.
        let set = set.rotated(&p, t0 + 100).unwrap().unwrap();
        assert_eq!(set.keys.len(), 2);
        assert_eq!(set.jwks()["keys"].as_array().unwrap().len(), 2, "published ahead of signing");
        let still_old = set.sign(&claims, t0 + 105).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&still_old).unwrap().kid,
            jsonwebtoken::decode_header(&old_token).unwrap().kid
        );

        // After publish_ahead the successor signs; the old key stays for max_token_lifetime.
        let set = set.rotated(&p, t0 + 111).unwrap().unwrap_or(set);
        let new_token = set.sign(&claims, t0 + 111).unwrap();
        assert_ne!(
            jsonwebtoken::decode_header(&new_token).unwrap().kid,
            jsonwebtoken::decode_header(&old_token).unwrap().kid
        );
        assert!(verify(&set, &old_token) && verify(&set, &new_token), "both verify during the overlap");
        let set = set.rotated(&p, t0 + 125).unwrap().unwrap_or(set);
        assert!(verify(&set, &old_token), "old tokens verify until they can have expired");
        let set = set.rotated(&p, t0 + 131).unwrap().unwrap_or(set);
        assert_eq!(set.keys.len(), 1, "the old key is gone once its tokens expired");
        assert!(!verify(&set, &old_token) && verify(&set, &new_token));
    }

    /// Finding: the key set derived `Debug` with the private key's PEM in it.
    #[test]
    fn debug_shows_no_private_key() {
        let set = KeySet::default().rotated(&policy(), 0).unwrap().unwrap();
        let pem = set.keys[0].private_pem.expose().to_owned();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(pem.contains("PRIVATE KEY") && body.len() > 40);
        let shown = format!("{set:?} {set:#?} {:?}", set.keys[0]);
        assert!(!shown.contains("PRIVATE") && !shown.contains(&body[..40]), "{shown}");
        assert!(shown.contains(&set.keys[0].kid), "still useful: {shown}");
        // Stored as before: the Secret's JSON holds the PEM itself.
        let stored = serde_json::to_string(&set).unwrap();
        assert!(stored.contains("PRIVATE KEY"));
        assert_eq!(serde_json::from_str::<KeySet>(&stored).unwrap(), set);
    }

    #[test]
    fn jwks_holds_public_keys_only() {
        let set = KeySet::default().rotated(&policy(), 0).unwrap().unwrap();
        let text = set.jwks().to_string();
        assert!(!text.contains("\"d\"") && !text.contains("PRIVATE"), "{text}");
        let doc = discovery("https://issuer.example.com/cloudpass");
        assert_eq!(doc["jwks_uri"], "https://issuer.example.com/cloudpass/openid/v1/jwks");
    }
}
