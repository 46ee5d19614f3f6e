use std::collections::BTreeMap;

use super::*;
use crate::authn::Origin;

fn caller(pod: Option<&str>) -> Caller {
    Caller {
        namespace: "team-a".into(),
        service_account: "orders".into(),
        pod: pod.map(str::to_owned),
        pod_uid: None,
        labels: BTreeMap::new(),
        policies: vec![],
        audiences: vec![],
        origin: Origin::ThisCluster,
    }
}

fn policy() -> CompiledPolicy {
    serde_json::from_value(json!({
        "name": "to-s3", "client": {"podSelector": {}}, "trustProviders": ["k8s"],
        "server": {"kind": "aws"}, "credentialProvider": "s3", "delivery": {}
    }))
    .unwrap()
}

fn request<'a>(spec: &'a CredentialProviderSpec, policy: &'a CompiledPolicy, caller: &'a Caller) -> MintRequest<'a> {
    MintRequest { provider: "p", spec, policy, caller, max_lifetime: None, access_ends: None, reads_with: None }
}

#[test]
fn session_names_are_rendered_and_sanitised() {
    let spec: CredentialProviderSpec =
        serde_json::from_value(json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r"}})).unwrap();
    let p = policy();
    let c = caller(Some("orders-7d9f/x"));
    let req = request(&spec, &p, &c);
    assert_eq!(session_name("cloudpass-{namespace}-{pod}", &req), "cloudpass-team-a-orders-7d9f-x");
    assert_eq!(session_name(&"{policy}".repeat(20), &req).len(), 64);
    assert!(cache_discriminator(&req).ends_with("\u{0}cloudpass-team-a-orders-7d9f-x"));
    let other_pod = caller(Some("orders-2"));
    assert_ne!(cache_discriminator(&req), cache_discriminator(&request(&spec, &p, &other_pod)));
}

/// Finding: with `subject: Provider` every caller got the token (or the cloud's
/// exchange of it) minted for the first one. The key covers every signed caller claim.
#[test]
fn the_cache_key_covers_every_signed_caller_claim() {
    let p = policy();
    let orders = caller(Some("orders-1"));
    let mut billing = caller(Some("billing-1"));
    billing.service_account = "billing".into();
    let mut other_pod = caller(Some("orders-2"));
    other_pod.pod_uid = Some("u".into());
    for spec in [
        json!({"oidcToken": {"audience": "https://partner.example.com"}}),
        json!({"gcpWorkloadIdentity": {"workloadIdentityProvider": "projects/1/locations/global/workloadIdentityPools/pool/providers/prov"}}),
        json!({"azureWorkloadIdentity": {"tenantId": "8c1d3f0e-7b6a-4e55-9f21-0a3b5c7d9e11", "clientId": "4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55"}}),
        json!({"awsSts": {"roleArn": "arn:aws:iam::123456789012:role/r", "sessionName": "fixed"}}),
    ] {
        let spec: CredentialProviderSpec = serde_json::from_value(spec).unwrap();
        let key = |c: &Caller| cache_discriminator(&request(&spec, &p, c));
        assert_ne!(key(&orders), key(&billing), "{spec:?}: service accounts share");
        assert_ne!(key(&orders), key(&other_pod), "{spec:?}: pods share");
        assert_eq!(key(&orders), key(&orders.clone()));
        // Exactly what is signed: every caller claim is in the key.
        let req = request(&spec, &p, &billing);
        let claims = Value::Object(CallerClaims::of(&req, "s".into()).to_claims()).to_string();
        for part in ["billing-1", "billing", "team-a", "to-s3", "p"] {
            assert!(claims.contains(&format!("\"{part}\"")), "{part} in {claims}");
            assert!(key(&billing).contains(&format!("{part}\u{0}")), "{part} in {:?}", key(&billing));
        }
    }
    // Nothing of the caller reaches an OAuth2 server or a Secret: one credential.
    let secret: CredentialProviderSpec =
        serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap();
    assert_eq!(
        cache_discriminator(&request(&secret, &p, &orders)),
        cache_discriminator(&request(&secret, &p, &billing))
    );
}

#[test]
fn max_lifetime_bounds_expiry() {
    let spec: CredentialProviderSpec =
        serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap();
    let (p, c) = (policy(), caller(None));
    let req = MintRequest { max_lifetime: Some(Duration::from_secs(300)), ..request(&spec, &p, &c) };
    let now = Timestamp::now();
    let bound = bounded(&req, now, now + SignedDuration::from_secs(3600));
    assert_eq!(bound.as_second() - now.as_second(), 300);
}

#[test]
fn lifetimes_end_with_the_window() {
    let spec: CredentialProviderSpec =
        serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap();
    let (p, c) = (policy(), caller(None));
    let now: Timestamp = "2026-11-23T16:59:30.250Z".parse().unwrap();
    let end: Timestamp = "2026-11-23T17:00:00Z".parse().unwrap();
    let req = MintRequest { access_ends: Some(end), ..request(&spec, &p, &c) };
    let hour = Duration::from_secs(3600);
    // What may be asked for: up to the window's end (rounded up to whole seconds),
    // not below what the upstream issues.
    assert_eq!(lifetime_for(&req, hour, now, Duration::from_secs(1)), Duration::from_secs(30));
    assert_eq!(lifetime_for(&req, hour, now, Duration::from_secs(900)), Duration::from_secs(900));
    let late = MintRequest { max_lifetime: Some(Duration::from_secs(10)), ..request(&spec, &p, &c) };
    assert_eq!(lifetime_for(&late, hour, now, Duration::from_secs(1)), Duration::from_secs(10));
    assert_eq!(lifetime_for(&request(&spec, &p, &c), hour, now, Duration::ZERO), hour);
    // A credential that outlives the window is served until its end; one that does
    // not needs no serve_until.
    let cred = || Credential::ApiKey { key: SecretString::new("k") };
    let outlives = finish(&req, cred(), now, now + SignedDuration::from_secs(900));
    assert_eq!(outlives.serve_until, Some(end));
    assert_eq!(outlives.refresh_at(), end);
    let within = finish(&req, cred(), now, end);
    assert_eq!((within.serve_until, within.expires_at), (None, end));
}

#[test]
fn expires_in_number_or_string() {
    let secs = |s: i64| Ok(Some(SignedDuration::from_secs(s)));
    assert_eq!(expires_in(&json!({"expires_in": 3599})), secs(3599));
    assert_eq!(expires_in(&json!({"expires_in": "3599"})), secs(3599));
    assert_eq!(expires_in(&json!({"expires_in": 3599.0})), secs(3599));
    assert_eq!(expires_in(&json!({})), Ok(None));
    assert_eq!(expires_in(&json!({"expires_in": null})), Ok(None));
    assert!(expires_in(&json!({"expires_in": "soon"})).unwrap_err().contains("not a whole number"));
}

/// Finding: `expires_in: 1e15` overflowed the expiry and panicked the request, with
/// no audit record. Every hostile number is a precise upstream error now.
#[test]
fn hostile_lifetimes_are_upstream_errors_not_panics() {
    let hostile = [
        json!(1e15),
        json!(1_000_000_000_000_000_i64),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(-1),
        json!(0),
        json!(-0.0),
        json!(1e308),
        json!(3599.5),
        json!("1e15"),
        json!("99999999999999999999999999999"),
        json!("-5"),
        json!(" "),
        json!("9".repeat(100_000)),
        json!([3600]),
        json!({"seconds": 3600}),
        json!(true),
    ];
    let now = Timestamp::now();
    for value in hostile {
        let answer = json!({"access_token": "at", "token_type": "Bearer", "expires_in": value});
        let err = expires_in(&answer).unwrap_err();
        assert!(err.starts_with("expires_in ") && err.len() < 120, "{value}: {err}");
        for parse in [parse_oauth2_answer, parse_entra_answer, parse_google_sts_answer] {
            let refusal = parse(&answer).unwrap_err();
            assert!(refusal.is_upstream() && refusal.message.contains("expires_in"), "{refusal:?}");
            assert!(!refusal.message.contains("\"at\""), "no token in the message");
        }
    }
    // Entra and Google STS need a lifetime; OAuth2 does not.
    let bare = json!({"access_token": "at"});
    assert!(parse_entra_answer(&bare).unwrap_err().message.contains("no expires_in"));
    assert!(parse_google_sts_answer(&bare).is_err());
    assert_eq!(parse_oauth2_answer(&bare).unwrap().token_type, "Bearer");
    let bad_type = json!({"access_token": "at", "token_type": "x".repeat(100), "expires_in": 60});
    assert!(parse_oauth2_answer(&bad_type).is_err());

    // Absolute expiries: Google's expireTime, AWS's Expiration.
    let iam = |expire: &str| parse_google_iam_answer(&json!({"accessToken": "t", "expireTime": expire}), now);
    let in_an_hour = (now + SignedDuration::from_hours(1)).to_string();
    assert_eq!(iam(&in_an_hour).unwrap().1.to_string(), in_an_hour);
    for expire in ["9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z", "-009999-01-02T01:59:59Z", "yesterday"] {
        let refusal = iam(expire).unwrap_err();
        assert!(refusal.is_upstream(), "{expire}: {refusal:?}");
    }
    assert!(check_expiry(now, now, "AWS STS").is_err());
    assert!(check_expiry(now, Timestamp::MAX, "AWS STS").unwrap_err().message.contains("AWS STS"));
    // The broker's own arithmetic saturates instead of overflowing.
    assert!(expiry(Timestamp::MAX, SignedDuration::from_secs(1), "x").is_err());
    assert!(
        bounded(
            &MintRequest { max_lifetime: Some(Duration::MAX), ..request(&bare_spec(), &policy(), &caller(None)) },
            now,
            now
        ) == now
    );
}

fn bare_spec() -> CredentialProviderSpec {
    serde_json::from_value(json!({"apiKey": {"secretRef": {"name": "k", "key": "v"}}})).unwrap()
}
