//! A minimal OIDC issuer to test the fakes without the broker: ES256 keys, a discovery
//! document at `/.well-known/openid-configuration` and a JWKS at `/jwks`, over HTTPS.
//! It can also make the tokens the clouds must refuse: signed by an unpublished key,
//! `alg: none`, HMAC keyed with the public key (key confusion).

use std::sync::{
    Arc, Mutex, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use anyhow::Result;
use axum::{Json, Router, extract::State, routing::get};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::{Served, SigningKey, now};
use crate::certs::TestCa;

struct IssuerState {
    url: OnceLock<String>,
    /// Published keys; the last one signs.
    keys: Mutex<Vec<SigningKey>>,
    jwks_fetches: AtomicU64,
}

/// A running test issuer; stops on drop.
pub struct TestIssuer {
    served: Served,
    state: Arc<IssuerState>,
    unpublished: SigningKey,
}

impl TestIssuer {
    /// Starts an issuer with one ES256 key, serving HTTPS with a certificate of `ca`.
    pub async fn start(ca: &TestCa) -> Result<Self> {
        let state = Arc::new(IssuerState {
            url: OnceLock::new(),
            keys: Mutex::new(vec![SigningKey::generate_es256()?]),
            jwks_fetches: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(state.clone());
        let served = Served::start(router, ca).await?;
        let _ = state.url.set(served.url().to_owned());
        Ok(Self { served, state, unpublished: SigningKey::generate_es256()? })
    }

    /// The issuer URL (`iss`), `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        self.served.url()
    }

    /// Typical claims: this issuer, `sub`, `aud`, issued now, valid for 10 minutes.
    pub fn claims(&self, sub: &str, aud: &str) -> Value {
        let now = now();
        json!({"iss": self.url(), "sub": sub, "aud": aud, "iat": now, "nbf": now, "exp": now + 600})
    }

    /// Signs `claims` with the current published key (ES256, `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        self.state.keys.lock().expect("keys lock").last().expect("one key at least").sign(claims)
    }

    /// Signs `claims` with a key this issuer never publishes.
    pub fn sign_with_unpublished_key(&self, claims: &Value) -> String {
        self.unpublished.sign(claims)
    }

    /// An unsigned token: header `{"alg":"none"}` with the current `kid`, empty signature.
    pub fn sign_alg_none(&self, claims: &Value) -> String {
        let kid = self.current_kid();
        let header = json!({"alg": "none", "typ": "JWT", "kid": kid});
        format!("{}.{}.", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()))
    }

    /// A key-confusion attempt: HS256 with the current public key's JWK as the HMAC secret,
    /// under the current `kid`.
    pub fn sign_hs256_with_public_key(&self, claims: &Value) -> String {
        let (kid, public) = {
            let keys = self.state.keys.lock().expect("keys lock");
            let key = keys.last().expect("one key at least");
            (key.kid().to_owned(), key.jwk().to_string())
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(public.as_bytes())).expect("HMAC signing")
    }

    /// Publishes a new key and signs with it from now on (the old one stays published).
    pub fn rotate(&self) -> Result<()> {
        let key = SigningKey::generate_es256()?;
        self.state.keys.lock().expect("keys lock").push(key);
        Ok(())
    }

    /// The `kid` of the key that signs.
    pub fn current_kid(&self) -> String {
        self.state.keys.lock().expect("keys lock").last().expect("one key at least").kid().to_owned()
    }

    /// How often the JWKS was fetched (to see verifier caching).
    pub fn jwks_fetches(&self) -> u64 {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }
}

async fn discovery(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    let url = state.url.get().cloned().unwrap_or_default();
    Json(json!({
        "issuer": url,
        "jwks_uri": format!("{url}/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    }))
}

async fn jwks(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let keys: Vec<Value> = state.keys.lock().expect("keys lock").iter().map(|k| k.jwk().clone()).collect();
    Json(json!({ "keys": keys }))
}
