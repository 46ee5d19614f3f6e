//! Who is calling: the agent's projected service-account token, checked with TokenReview
//! (tokens of this cluster) or against another cluster's keys (tokens of a cluster named
//! by a `kubernetesServiceAccount` TrustProvider with an `issuer`).
//!
//! TokenReview also refuses the token of a deleted pod (bound tokens). Before a token
//! costs the apiserver a TokenReview, cheap checks refuse what cannot pass: it must be a
//! JWT for audience `cloudpass`, not expired, and signed by one of the keys this cluster
//! publishes (`/openid/v1/jwks`, cached like every JWKS, see [`crate::jwt`]), which
//! only this cluster's issuer has. Answers, accepted or refused, are cached for a short
//! time, keyed by a hash of the token (never the token itself), with the pod's labels,
//! so that a busy agent costs one TokenReview and one pod read per cache period, a
//! refused token is not reviewed again within it, and a deleted pod is refused at most
//! one period later. Concurrent requests with one token share one review.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use cloudpass_api::{
    BROKER_AUDIENCE,
    agent::{POLICIES_ANNOTATION, annotated_policies},
    broker::ErrorCode,
    jwt::{unverified_claims, unverified_part},
    trust::JwtAlgorithm,
};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use moka::future::Cache;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    Error, Refusal,
    jwt::{Expectations, JwtVerifier, KeySource, LEEWAY_SECONDS, claim_strings},
};

/// Where the caller's token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This cluster: the token passed TokenReview and names a pod of this cluster.
    ThisCluster,
    /// Another cluster, by issuer; `namespace` is the caller's namespace there.
    OtherCluster {
        /// The other cluster's issuer URL.
        issuer: String,
        /// The caller's namespace in the other cluster.
        namespace: String,
    },
}

/// A verified caller: who the token says, once it is checked. Never holds the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Namespace (of the broker's cluster) whose policies apply.
    pub namespace: String,
    /// The name of the service account the caller runs as.
    pub service_account: String,
    /// Pod name, from the bound token.
    pub pod: Option<String>,
    /// Pod UID, from the bound token.
    pub pod_uid: Option<String>,
    /// Pod labels (this cluster only).
    pub labels: BTreeMap<String, String>,
    /// The policies the webhook lists in the pod's `cloudpass.dev/policies` annotation
    /// (this cluster only): what its agent serves.
    pub policies: Vec<String>,
    /// The token's audiences, which `kubernetesServiceAccount` trust providers match.
    pub audiences: Vec<String>,
    /// Where the token comes from.
    pub origin: Origin,
}

/// Largest number of cached answers; the least recently used go first beyond it.
const MAX_ENTRIES: u64 = 100_000;

/// Signature algorithms the apiserver may sign service-account tokens with.
const CLUSTER_ALGORITHMS: &[JwtAlgorithm] = &[
    JwtAlgorithm::RS256,
    JwtAlgorithm::RS384,
    JwtAlgorithm::RS512,
    JwtAlgorithm::PS256,
    JwtAlgorithm::PS384,
    JwtAlgorithm::PS512,
    JwtAlgorithm::ES256,
    JwtAlgorithm::ES384,
    JwtAlgorithm::EdDSA,
];

/// Reviews tokens of this cluster: the cheap checks first, then TokenReview and the pod,
/// with answers cached by token hash for the configured TTL.
pub struct TokenReviewer {
    client: Client,
    /// Answers by token hash: the caller, or why the token was refused. Failures to
    /// reach the apiserver are not remembered.
    answers: Cache<[u8; 32], Result<Arc<Caller>, Refusal>>,
}

/// How an answer was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cached {
    /// Served from the cache of earlier answers (accepted or refused).
    Hit,
    /// Not cached: a TokenReview was sent to the apiserver.
    Miss,
    /// Refused by the cheap checks, without asking the apiserver.
    Refused,
}

impl Cached {
    /// The label of the `token_review` cache metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Refused => "refused",
        }
    }
}

fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// The unverified header and payload of a compact JWS, if `token` is one.
fn unverified_parts(token: &str) -> Option<(Value, Value)> {
    let mut parts = token.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || signature.is_empty() {
        return None;
    }
    Some((unverified_part(header)?, unverified_part(payload)?))
}

/// The checks that cost the apiserver nothing: shape, audience, time, and a signature by
/// one of this cluster's published keys. `Err` is why the token cannot pass TokenReview.
async fn precheck(token: &str, verifier: &JwtVerifier) -> Result<(), Refusal> {
    let refuse = |why: &str| Err(Refusal::unauthenticated(format!("the service-account token was refused: {why}")));
    let Some((_, claims)) = unverified_parts(token) else {
        return refuse("not a JWT; send the projected service-account token");
    };
    let Some(issuer) = claims.get("iss").and_then(Value::as_str) else {
        return refuse("the token names no issuer");
    };
    if !claim_strings(&claims, "aud").iter().any(|a| a == BROKER_AUDIENCE) {
        return refuse(&format!("the token's audience is not {BROKER_AUDIENCE}"));
    }
    let now = jiff::Timestamp::now().as_second();
    let leeway = LEEWAY_SECONDS as i64;
    match claims.get("exp").and_then(Value::as_i64) {
        None => return refuse("the token has no exp claim"),
        Some(exp) if exp.saturating_add(leeway) < now => return refuse("the token has expired"),
        Some(_) => {}
    }
    if claims.get("nbf").and_then(Value::as_i64).is_some_and(|nbf| nbf.saturating_sub(leeway) > now) {
        return refuse("the token is not valid yet (nbf)");
    }
    let audiences = [BROKER_AUDIENCE.to_owned()];
    let expect = Expectations { issuer, audiences: &audiences, algorithms: CLUSTER_ALGORITHMS };
    match verifier.verify::<Value>(token, &KeySource::ThisCluster, &expect).await {
        Ok(_) => Ok(()),
        // Without the keys, TokenReview decides alone.
        Err(Error::KeysUnavailable(why)) => {
            tracing::debug!(error = %why, "this cluster's keys are unavailable; the token goes to TokenReview unchecked");
            Ok(())
        }
        Err(why) => refuse(&format!("not signed by this cluster's service-account keys ({why})")),
    }
}

impl TokenReviewer {
    /// A reviewer remembering answers for `ttl`.
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self { client, answers: Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(ttl).build() }
    }

    /// Reviews `token` (audience `cloudpass`) and reads the pod it is bound to; tokens
    /// that cannot pass are refused without asking the apiserver (`precheck`, with
    /// this cluster's keys from `verifier`). The answer and how it was reached; `Err`
    /// when the apiserver could not be asked (not remembered).
    pub async fn review(
        &self,
        token: &str,
        verifier: &JwtVerifier,
    ) -> Result<(Result<Arc<Caller>, Refusal>, Cached), Refusal> {
        let key = token_key(token);
        // The busy path: an agent asking again within the period.
        if let Some(answer) = self.answers.get(&key).await {
            return Ok((answer, Cached::Hit));
        }
        let reviewed = AtomicBool::new(false);
        let entry = self
            .answers
            .entry(key)
            .or_try_insert_with(async {
                if let Err(refusal) = precheck(token, verifier).await {
                    return Ok(Err(refusal));
                }
                reviewed.store(true, Ordering::Relaxed);
                match self.review_uncached(token).await {
                    Ok(caller) => Ok(Ok(Arc::new(caller))),
                    Err(refusal) if refusal.code == ErrorCode::Unauthenticated => Ok(Err(refusal)),
                    Err(unavailable) => Err(unavailable),
                }
            })
            .await
            .map_err(|e| (*e).clone())?;
        let how = match (entry.is_fresh(), reviewed.load(Ordering::Relaxed)) {
            (false, _) => Cached::Hit,
            (true, true) => Cached::Miss,
            (true, false) => Cached::Refused,
        };
        Ok((entry.into_value(), how))
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
        let (labels, policies) = match found {
            Some(p) if p.metadata.uid == pod_uid && p.metadata.deletion_timestamp.is_none() => {
                let policies = (p.metadata.annotations.as_ref())
                    .and_then(|a| a.get(POLICIES_ANNOTATION))
                    .map(|v| annotated_policies(v))
                    .unwrap_or_default();
                (p.metadata.labels.unwrap_or_default(), policies)
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
            policies,
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
    /// `aud`, a string or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// `kubernetes.io`: the namespace and the pod the token is bound to.
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: Option<KubernetesIo>,
}

/// The `kubernetes.io` claim of a bound service-account token.
#[derive(Deserialize, Debug, Default)]
pub struct KubernetesIo {
    /// The service account's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The pod the token is bound to (absent for tokens not bound to a pod).
    #[serde(default)]
    pub pod: Option<NameUid>,
}

/// An object the token is bound to, by name and UID (a deleted and recreated pod has
/// another UID).
#[derive(Deserialize, Debug)]
pub struct NameUid {
    /// The object's name.
    pub name: String,
    /// The object's UID.
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
        policies: Vec::new(),
        audiences: claims.aud,
        origin: Origin::OtherCluster { issuer: issuer.to_owned(), namespace: remote_ns.to_owned() },
    })
}

/// The unverified `iss` of a JWT, to choose how to verify it (never trusted as such).
pub fn unverified_issuer(token: &str) -> Option<String> {
    unverified_claims(token)?.get("iss")?.as_str().map(str::to_owned)
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

    /// A verifier without this cluster's keys: the signature check is skipped.
    fn verifier() -> JwtVerifier {
        let egress = crate::egress::Egress::new(reqwest::Client::builder(), Default::default()).unwrap();
        JwtVerifier::new(egress)
    }

    fn jwt(header: serde_json::Value, claims: serde_json::Value) -> String {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B};
        format!("{}.{}.c2ln", B.encode(header.to_string()), B.encode(claims.to_string()))
    }

    #[tokio::test]
    async fn tokens_that_cannot_pass_are_refused_before_token_review() {
        let now = jiff::Timestamp::now().as_second();
        let header = serde_json::json!({"alg": "RS256", "kid": "k"});
        let claims = |aud: serde_json::Value, exp: i64| serde_json::json!({"iss": "https://kubernetes.default.svc", "aud": aud, "exp": exp, "sub": "system:serviceaccount:a:b"});
        let verifier = verifier();
        let cases = [
            ("".to_owned(), "not a JWT"),
            ("garbage".to_owned(), "not a JWT"),
            ("a.b.c".to_owned(), "not a JWT"),
            (format!("{}.", jwt(header.clone(), claims("cloudpass".into(), now + 600))), "not a JWT"),
            (jwt(header.clone(), serde_json::json!({"aud": "cloudpass", "exp": now + 600})), "no issuer"),
            (jwt(header.clone(), claims("sts.amazonaws.com".into(), now + 600)), "audience is not cloudpass"),
            (jwt(header.clone(), claims(serde_json::json!(["a", "b"]), now + 600)), "audience is not cloudpass"),
            (jwt(header.clone(), claims("cloudpass".into(), now - 3600)), "expired"),
            (
                jwt(
                    header.clone(),
                    serde_json::json!({"iss": "i", "aud": "cloudpass", "exp": now + 600, "nbf": now + 600}),
                ),
                "not valid yet",
            ),
        ];
        for (token, want) in cases {
            let refusal = precheck(&token, &verifier).await.unwrap_err();
            assert_eq!(refusal.code, ErrorCode::Unauthenticated);
            assert!(refusal.message.contains(want), "{want}: {}", refusal.message);
        }
        // Well-formed, for cloudpass, in time: only the signature is left, and without
        // this cluster's keys TokenReview decides.
        let plausible = jwt(header, claims(serde_json::json!(["x", "cloudpass"]), now + 600));
        assert!(precheck(&plausible, &verifier).await.is_ok());
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
