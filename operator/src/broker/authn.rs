//! Who is calling: the agent's projected service-account token, checked with TokenReview
//! (tokens of this cluster) or against another cluster's keys (tokens of a cluster named
//! by a `kubernetesServiceAccount` TrustProvider with an `issuer`).
//!
//! TokenReview also refuses the token of a deleted pod (bound tokens). Positive answers
//! are cached for a short time, keyed by a hash of the token (never the token itself),
//! together with the pod's labels, so that a busy agent costs one TokenReview and one pod
//! read per cache period; a deleted pod is refused at most one period later.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use cloudpass_api::BROKER_AUDIENCE;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Refusal;

/// Where the caller's token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This cluster (TokenReview).
    ThisCluster,
    /// Another cluster, by issuer; `namespace` is the caller's namespace there.
    OtherCluster {
        /// The other cluster's issuer URL.
        issuer: String,
        /// The caller's namespace in the other cluster.
        namespace: String,
    },
}

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Namespace (of the broker's cluster) whose policies apply.
    pub namespace: String,
    /// Service-account name.
    pub service_account: String,
    /// Pod name, from the bound token.
    pub pod: Option<String>,
    /// Pod UID, from the bound token.
    pub pod_uid: Option<String>,
    /// Pod labels (this cluster only).
    pub labels: BTreeMap<String, String>,
    /// Audiences of the token.
    pub audiences: Vec<String>,
    /// Where the token comes from.
    pub origin: Origin,
}

struct Entry {
    caller: Caller,
    until: Instant,
}

/// Largest number of cached callers; beyond it expired entries are dropped, then all.
const MAX_ENTRIES: usize = 100_000;

/// Reviews tokens of this cluster.
pub struct TokenReviewer {
    client: Client,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], Entry>>,
}

/// Whether an answer came from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cached {
    /// Served from the cache.
    Hit,
    /// Asked the apiserver.
    Miss,
}

fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

impl TokenReviewer {
    /// A reviewer caching positive answers for `ttl`.
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self { client, ttl, cache: Mutex::default() }
    }

    /// Reviews `token` (audience `cloudpass`) and reads the pod it is bound to.
    pub async fn review(&self, token: &str) -> Result<(Caller, Cached), Refusal> {
        let key = token_key(token);
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = cache.get(&key)
                && entry.until > Instant::now()
            {
                return Ok((entry.caller.clone(), Cached::Hit));
            }
        }
        let caller = self.review_uncached(token).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, e| e.until > now);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, Entry { caller: caller.clone(), until: Instant::now() + self.ttl });
        Ok((caller, Cached::Miss))
    }

    async fn review_uncached(&self, token: &str) -> Result<Caller, Refusal> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(vec![BROKER_AUDIENCE.to_owned()]) },
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::unauthenticated(format!("the service-account token was refused: {why}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
        else {
            return Err(Refusal::unauthenticated(format!("{username} is not a service account")));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (pod, pod_uid) = (first(POD_NAME_EXTRA), first(POD_UID_EXTRA));
        let Some(pod_name) = pod.clone() else {
            return Err(Refusal::unauthenticated(
                "the token is not bound to a pod: use the projected token the webhook mounts into the agent",
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let found = pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| Refusal::unavailable(format!("reading pod {namespace}/{pod_name} failed: {e}")))?;
        let labels = match found {
            Some(p) if p.metadata.uid == pod_uid && p.metadata.deletion_timestamp.is_none() => {
                p.metadata.labels.unwrap_or_default()
            }
            _ => {
                return Err(Refusal::unauthenticated(format!(
                    "pod {namespace}/{pod_name} the token is bound to no longer exists"
                )));
            }
        };
        Ok(Caller {
            namespace,
            service_account,
            pod,
            pod_uid,
            labels,
            audiences: status.audiences.unwrap_or_default(),
            origin: Origin::ThisCluster,
        })
    }
}

/// The `kubernetes.io` claims of a service-account token.
#[derive(Deserialize, Debug)]
pub struct KubernetesClaims {
    /// `sub`: `system:serviceaccount:<namespace>:<name>`.
    pub sub: String,
    /// Audiences.
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// The bound objects.
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: Option<KubernetesIo>,
}

/// `kubernetes.io` claim.
#[derive(Deserialize, Debug, Default)]
pub struct KubernetesIo {
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Bound pod.
    #[serde(default)]
    pub pod: Option<NameUid>,
}

/// A name and UID.
#[derive(Deserialize, Debug)]
pub struct NameUid {
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The caller described by another cluster's verified token, for policies of `namespace`.
pub fn remote_caller(issuer: &str, claims: KubernetesClaims, namespace: &str) -> Result<Caller, Refusal> {
    let (remote_ns, sa) = claims
        .sub
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| Refusal::unauthenticated("the token's subject is not a service account"))?;
    let pod = claims.kubernetes.and_then(|k| k.pod);
    Ok(Caller {
        namespace: namespace.to_owned(),
        service_account: sa.to_owned(),
        pod: pod.as_ref().map(|p| p.name.clone()),
        pod_uid: pod.map(|p| p.uid),
        labels: BTreeMap::new(),
        audiences: claims.aud,
        origin: Origin::OtherCluster { issuer: issuer.to_owned(), namespace: remote_ns.to_owned() },
    })
}

/// The unverified `iss` of a JWT, to choose how to verify it (never trusted as such).
pub fn unverified_issuer(token: &str) -> Option<String> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("iss")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_subjects_are_parsed() {
        let claims: KubernetesClaims = serde_json::from_value(serde_json::json!({
            "sub": "system:serviceaccount:shop:orders", "aud": "cloudpass",
            "kubernetes.io": {"namespace": "shop", "pod": {"name": "orders-1", "uid": "u1"}}
        }))
        .unwrap();
        let caller = remote_caller("https://other", claims, "team-a").unwrap();
        assert_eq!(caller.namespace, "team-a");
        assert_eq!(caller.service_account, "orders");
        assert_eq!(caller.pod.as_deref(), Some("orders-1"));
        assert_eq!(caller.audiences, ["cloudpass"]);
        assert_eq!(caller.origin, Origin::OtherCluster { issuer: "https://other".into(), namespace: "shop".into() });
        let bad: KubernetesClaims = serde_json::from_value(serde_json::json!({"sub": "user:x"})).unwrap();
        assert!(remote_caller("https://other", bad, "team-a").is_err());
    }

    #[test]
    fn unverified_issuer_is_tolerant() {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let token = format!("x.{}.y", URL_SAFE_NO_PAD.encode(r#"{"iss":"https://i"}"#));
        assert_eq!(unverified_issuer(&token).as_deref(), Some("https://i"));
        for junk in ["", "a", "a.b.c", "a.!!!.c"] {
            assert_eq!(unverified_issuer(junk), None);
        }
    }
}
