//! The cloud fakes refuse what the real services refuse and answer what the real SDKs
//! accept. The AWS side goes through real moto with authentication enforced; the Entra
//! and Google answers are fed to azure-identity and google-auth.

use std::{path::Path, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use cloudpass_e2e::{
    certs::TestCa,
    fakes::{
        aws_sts::{AwsOidcProvider, AwsRoleTrust, StsGate, StsGateConfig},
        entra::{EntraApp, EntraConfig, EntraFake, FederatedCredential, ManagedIdentityClaims},
        form_encode,
        google::{CLOUD_PLATFORM, GoogleConfig, GoogleFake, ServiceAccount, WorkloadIdentityProvider},
        jwt::{Expected, JwtError, JwtVerifier},
        oauth2::{OAuth2Client, OAuth2Config, OAuth2Fake},
        test_issuer::TestIssuer,
    },
    moto::{AwsKeys, MotoServer},
};
use jsonwebtoken::{DecodingKey, Validation, jwk::Jwk};
use serde_json::{Value, json};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const APP_CLIENT_ID: &str = "0b5d1f3e-2a4c-4e8f-9d7b-1c3a5e7f9b2d";
const APP_OBJECT_ID: &str = "9e8d7c6b-5a49-4382-9170-f6e5d4c3b2a1";
const SUBJECT: &str = "system:serviceaccount:demo:app";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An HTTPS client trusting only the test CA.
fn client(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap()])
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

async fn post_form(http: &reqwest::Client, url: &str, params: &[(&str, &str)]) -> Answer {
    send(http.post(url).header("content-type", "application/x-www-form-urlencoded").body(form_encode(params))).await
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    Answer { status, headers, body: response.text().await.unwrap() }
}

/// The text of the first `<tag>` in an XML document.
fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(&xml[start..end])
}

/// Runs a snippet with the venv's Python and the given environment; returns stdout.
async fn python(script: &str, env: &[(&str, &str)]) -> String {
    let interpreter = cloudpass_e2e::python::interpreter().unwrap();
    let output = tokio::process::Command::new(interpreter)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .arg("-c")
        .arg(script)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "python failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn write_ca(dir: &Path, ca: &TestCa) -> String {
    let path = dir.join("ca.pem");
    std::fs::write(&path, ca.cert_pem()).unwrap();
    path.display().to_string()
}

// ---------------------------------------------------------------------------------------
// The shared JWT verifier

#[tokio::test]
async fn verifier_accepts_good_tokens_caches_keys_and_refetches_on_rotation() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let verifier = JwtVerifier::new(&ca.cert_pem()).unwrap();
    let audiences = vec!["sts.amazonaws.com".to_owned()];
    let expected = Expected { issuer: issuer.url(), audiences: &audiences };

    let claims = issuer.claims(SUBJECT, "sts.amazonaws.com");
    let verified = verifier.verify(&issuer.sign(&claims), &expected).await.unwrap();
    assert_eq!(verified.claims.sub.as_deref(), Some(SUBJECT));
    assert_eq!(verified.kid, issuer.current_kid());
    verifier.verify(&issuer.sign(&claims), &expected).await.unwrap();
    assert_eq!(issuer.jwks_fetches(), 1, "the key set is cached");

    // aud as a list, one of them allowed.
    let mut listed = claims.clone();
    listed["aud"] = json!(["other", "sts.amazonaws.com"]);
    verifier.verify(&issuer.sign(&listed), &expected).await.unwrap();

    // A rotated key is unknown to the cache: fetched once more, then cached again.
    issuer.rotate().unwrap();
    verifier.verify(&issuer.sign(&claims), &expected).await.unwrap();
    verifier.verify(&issuer.sign(&claims), &expected).await.unwrap();
    assert_eq!(issuer.jwks_fetches(), 2);

    // Expired 30 s ago is within AWS's 60 s leeway.
    let mut recent = claims.clone();
    recent["exp"] = json!(now() - 30);
    verifier.verify(&issuer.sign(&recent), &expected).await.unwrap();
}

#[tokio::test]
async fn verifier_refuses_what_clouds_refuse() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let verifier = JwtVerifier::new(&ca.cert_pem()).unwrap();
    let audiences = vec!["sts.amazonaws.com".to_owned()];
    let expected = Expected { issuer: issuer.url(), audiences: &audiences };
    let good = issuer.claims(SUBJECT, "sts.amazonaws.com");
    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        claims
    };
    let verify = |token: String| {
        let verifier = &verifier;
        let expected = expected.clone();
        async move { verifier.verify(&token, &expected).await.unwrap_err() }
    };

    assert!(matches!(
        verify(issuer.sign(&with("iss", json!("https://elsewhere.example")))).await,
        JwtError::IssuerMismatch { .. }
    ));
    assert!(matches!(
        verify(issuer.sign(&with("aud", json!("api://AzureADTokenExchange")))).await,
        JwtError::AudienceMismatch { .. }
    ));
    assert!(matches!(verify(issuer.sign(&with("aud", json!([])))).await, JwtError::AudienceMismatch { .. }));
    assert!(matches!(verify(issuer.sign(&with("exp", json!(now() - 120)))).await, JwtError::Expired { .. }));
    assert!(matches!(verify(issuer.sign(&with("nbf", json!(now() + 600)))).await, JwtError::NotYetValid { .. }));
    assert!(matches!(verify(issuer.sign(&with("iat", json!(now() + 600)))).await, JwtError::IssuedInFuture { .. }));
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(verify(issuer.sign(&no_exp)).await, JwtError::MissingClaim("exp"));
    assert!(matches!(verify(issuer.sign_with_unpublished_key(&good)).await, JwtError::UnknownKey { .. }));
    assert_eq!(verify(issuer.sign_alg_none(&good)).await, JwtError::UnsupportedAlgorithm("none".into()));
    assert_eq!(verify(issuer.sign_hs256_with_public_key(&good)).await, JwtError::UnsupportedAlgorithm("HS256".into()));
    assert!(matches!(verify("not-a-jwt".into()).await, JwtError::Malformed(_)));

    // A valid signature over other claims does not verify once the payload is swapped.
    let token = issuer.sign(&good);
    let parts: Vec<&str> = token.split('.').collect();
    let forged_payload = B64URL.encode(with("sub", json!("system:serviceaccount:demo:admin")).to_string());
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert_eq!(verify(forged).await, JwtError::InvalidSignature);

    // No kid in the header.
    let header = B64URL.encode(json!({"alg": "ES256", "typ": "JWT"}).to_string());
    assert_eq!(verify(format!("{header}.{}.{}", parts[1], parts[2])).await, JwtError::MissingKeyId);

    // An issuer whose certificate is not from the trusted CA: keys cannot be retrieved.
    let other_ca = TestCa::new("other").unwrap();
    let stranger = JwtVerifier::new(&other_ca.cert_pem()).unwrap();
    let error = stranger.verify(&issuer.sign(&good), &expected).await.unwrap_err();
    assert!(matches!(error, JwtError::KeyRetrieval { .. }), "{error:?}");
}

// ---------------------------------------------------------------------------------------
// AWS: the STS gate in front of real moto

const ROLE_POLICY_BUCKET: &str = "cloudpass-fakes";

#[tokio::test]
async fn sts_gate_hands_out_moto_credentials_that_moto_accepts_with_auth_enforced() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let moto = MotoServer::start().await.unwrap();

    // Set up IAM and S3 while moto still accepts anything, then enforce authentication.
    let role_arn = moto
        .create_role(
            "app",
            &json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                "Resource": [format!("arn:aws:s3:::{ROLE_POLICY_BUCKET}"), format!("arn:aws:s3:::{ROLE_POLICY_BUCKET}/*")]}]}),
        )
        .await
        .unwrap();
    moto.create_bucket(ROLE_POLICY_BUCKET).await.unwrap();
    moto.create_bucket("not-for-app").await.unwrap();
    let gate_keys = moto
        .create_user_keys(
            "sts-gate",
            &json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                "Action": "sts:AssumeRoleWithWebIdentity", "Resource": "*"}]}),
        )
        .await
        .unwrap();
    moto.enforce_auth(0).await.unwrap();

    // Keys moto never issued are refused, by STS and by S3.
    let refused = r#"
import boto3, botocore
for call in (lambda: boto3.client("sts").get_caller_identity(),
             lambda: boto3.client("s3").put_object(Bucket="cloudpass-fakes", Key="k", Body=b"x")):
    try:
        call(); print("accepted")
    except botocore.exceptions.ClientError as e:
        print(e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
"#;
    let out = moto.python(refused).await.unwrap();
    assert_eq!(out.lines().collect::<Vec<_>>(), ["InvalidClientTokenId 403", "InvalidAccessKeyId 403"], "{out}");

    let gate = StsGate::start(
        StsGateConfig {
            moto_url: moto.url().to_owned(),
            providers: vec![AwsOidcProvider {
                url: issuer.url().to_owned(),
                client_ids: vec!["sts.amazonaws.com".into()],
            }],
            roles: vec![AwsRoleTrust::new(&role_arn, issuer.url(), "system:serviceaccount:demo:*")],
            issuer_ca_pem: ca.cert_pem(),
            forward_credentials: Some(gate_keys),
        },
        &ca,
    )
    .await
    .unwrap();
    let http = client(&ca);
    let token = issuer.sign(&issuer.claims(SUBJECT, "sts.amazonaws.com"));
    let answer = post_form(
        &http,
        gate.url(),
        &[
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", &role_arn),
            ("RoleSessionName", "cloudpass-test"),
            ("WebIdentityToken", &token),
            ("DurationSeconds", "900"),
            // A session policy, as the Verified check sends: its `*` is encoded one way by
            // HTTP clients and another by moto when it checks the gate's signature.
            ("Policy", r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{}\nmoto log:\n{}", answer.body, moto.log_tail());
    assert!(answer.body.contains("<AssumeRoleWithWebIdentityResponse"), "{}", answer.body);
    let keys = AwsKeys {
        access_key_id: xml_text(&answer.body, "AccessKeyId").unwrap().to_owned(),
        secret_access_key: xml_text(&answer.body, "SecretAccessKey").unwrap().to_owned(),
        session_token: Some(xml_text(&answer.body, "SessionToken").unwrap().to_owned()),
    };
    assert!(keys.access_key_id.starts_with("ASIA"), "{}", keys.access_key_id);
    assert_eq!(gate.calls(), 1);

    // Those credentials sign S3 calls that moto checks and allows by the role's policy,
    // and nothing outside it.
    let s3 = r#"
import boto3, botocore
s3 = boto3.client("s3")
s3.put_object(Bucket="cloudpass-fakes", Key="hello.txt", Body=b"hello from cloudpass")
print(s3.get_object(Bucket="cloudpass-fakes", Key="hello.txt")["Body"].read().decode())
try:
    s3.put_object(Bucket="not-for-app", Key="k", Body=b"x"); print("accepted")
except botocore.exceptions.ClientError as e:
    print(e.response["Error"]["Code"])
"#;
    let env: Vec<(&str, String)> = keys.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = moto.python_with_env(s3, &env).await.unwrap();
    assert_eq!(out.lines().collect::<Vec<_>>(), ["hello from cloudpass", "AccessDenied"], "{out}");

    // A signed GetCallerIdentity (what the awsRole trust provider relays) passes the gate
    // unchanged and still verifies at moto.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_ca(dir.path(), &ca);
    let identity = r#"
import boto3, os
print(boto3.client("sts", endpoint_url=os.environ["GATE"]).get_caller_identity()["Arn"])
"#;
    let mut env = env.clone();
    env.extend([("GATE", gate.url()), ("AWS_CA_BUNDLE", ca_file.as_str())]);
    let out = moto.python_with_env(identity, &env).await.unwrap();
    assert_eq!(out.trim(), "arn:aws:sts::123456789012:assumed-role/app/cloudpass-test");
    assert_eq!(gate.calls(), 2);

    // An unsigned request with the no-auth budget used up is refused by moto through the gate.
    let answer = send(http.get(format!("{}/?Action=GetCallerIdentity&Version=2011-06-15", gate.url()))).await;
    assert!(answer.status >= 400, "{} {}", answer.status, answer.body);
}

#[tokio::test]
async fn sts_gate_refuses_like_aws() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let unregistered = TestIssuer::start(&ca).await.unwrap();
    let role_arn = "arn:aws:iam::123456789012:role/app";
    let mut strict_role = AwsRoleTrust::new("arn:aws:iam::123456789012:role/strict", issuer.url(), SUBJECT);
    strict_role.audiences = vec!["other-client".into()];
    let gate = StsGate::start(
        StsGateConfig {
            // Never reached: every request here is refused before forwarding.
            moto_url: "http://127.0.0.1:9".into(),
            providers: vec![AwsOidcProvider {
                url: issuer.url().trim_start_matches("https://").to_owned(),
                client_ids: vec!["sts.amazonaws.com".into(), "other-client".into()],
            }],
            roles: vec![AwsRoleTrust::new(role_arn, issuer.url(), "system:serviceaccount:demo:*"), strict_role],
            issuer_ca_pem: ca.cert_pem(),
            forward_credentials: None,
        },
        &ca,
    )
    .await
    .unwrap();
    let http = client(&ca);
    let assume = |token: String, role: &'static str, duration: &'static str| {
        let http = http.clone();
        let url = gate.url().to_owned();
        async move {
            post_form(
                &http,
                &url,
                &[
                    ("Action", "AssumeRoleWithWebIdentity"),
                    ("Version", "2011-06-15"),
                    ("RoleArn", role),
                    ("RoleSessionName", "s1"),
                    ("WebIdentityToken", &token),
                    ("DurationSeconds", duration),
                ],
            )
            .await
        }
    };
    let good = issuer.claims(SUBJECT, "sts.amazonaws.com");
    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        claims
    };
    let expect = |answer: Answer, status: u16, code: &str, message: &str| {
        assert_eq!(answer.status, status, "{}", answer.body);
        assert!(
            answer.body.starts_with("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">"),
            "{}",
            answer.body
        );
        assert_eq!(xml_text(&answer.body, "Code"), Some(code), "{}", answer.body);
        assert!(xml_text(&answer.body, "Message").unwrap().contains(message), "{}", answer.body);
        assert!(xml_text(&answer.body, "RequestId").is_some());
        assert_eq!(answer.headers["content-type"], "text/xml");
    };

    let stranger = unregistered.sign(&unregistered.claims(SUBJECT, "sts.amazonaws.com"));
    expect(assume(stranger, role_arn, "3600").await, 400, "InvalidIdentityToken", "No OpenIDConnect provider found");
    expect(
        assume(issuer.sign(&with("aud", json!("api://AzureADTokenExchange"))), role_arn, "3600").await,
        400,
        "InvalidIdentityToken",
        "Incorrect token audience",
    );
    expect(
        assume(issuer.sign(&with("exp", json!(now() - 120))), role_arn, "3600").await,
        400,
        "ExpiredTokenException",
        "Token expired",
    );
    expect(assume(issuer.sign(&with("iat", json!(now() + 600))), role_arn, "3600").await, 403, "IDPRejectedClaim", "");
    expect(
        assume(issuer.sign_with_unpublished_key(&good), role_arn, "3600").await,
        400,
        "InvalidIdentityToken",
        "verification key",
    );
    expect(
        assume(issuer.sign_alg_none(&good), role_arn, "3600").await,
        400,
        "InvalidIdentityToken",
        "could not be validated",
    );
    expect(
        assume(issuer.sign_hs256_with_public_key(&good), role_arn, "3600").await,
        400,
        "InvalidIdentityToken",
        "could not be validated",
    );
    expect(assume("garbage".into(), role_arn, "3600").await, 400, "InvalidIdentityToken", "not a valid JWT");
    let other_ns = issuer.sign(&with("sub", json!("system:serviceaccount:other:app")));
    expect(
        assume(other_ns, role_arn, "3600").await,
        403,
        "AccessDenied",
        "Not authorized to perform sts:AssumeRoleWithWebIdentity",
    );
    expect(assume(issuer.sign(&good), "arn:aws:iam::123456789012:role/unknown", "3600").await, 403, "AccessDenied", "");
    // The provider accepts the audience, the role's aud condition does not.
    expect(assume(issuer.sign(&good), "arn:aws:iam::123456789012:role/strict", "3600").await, 403, "AccessDenied", "");
    expect(assume(issuer.sign(&good), role_arn, "600").await, 400, "ValidationError", "greater than or equal to 900");
    expect(assume(issuer.sign(&good), role_arn, "43201").await, 400, "ValidationError", "less than or equal to 43200");
    expect(assume(issuer.sign(&good), role_arn, "7200").await, 400, "ValidationError", "MaxSessionDuration");

    gate.fail_next(1, 503);
    let answer = assume(issuer.sign(&good), role_arn, "3600").await;
    assert_eq!(answer.status, 503);
    assert_eq!(xml_text(&answer.body, "Type"), Some("Receiver"));
    assert_eq!(xml_text(&answer.body, "Code"), Some("ServiceUnavailable"));
    assert_eq!(gate.calls(), 0);
}

// ---------------------------------------------------------------------------------------
// Entra

async fn entra(ca: &TestCa, issuer: &TestIssuer) -> EntraFake {
    EntraFake::start(
        EntraConfig {
            tenant_id: TENANT.into(),
            apps: vec![EntraApp {
                client_id: APP_CLIENT_ID.into(),
                object_id: APP_OBJECT_ID.into(),
                federated_credentials: vec![FederatedCredential::new(issuer.url(), SUBJECT)],
            }],
            issuer_ca_pem: ca.cert_pem(),
        },
        ca,
    )
    .await
    .unwrap()
}

async fn entra_token(http: &reqwest::Client, url: &str, client_id: &str, assertion: &str, scope: &str) -> Answer {
    post_form(
        http,
        url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
    )
    .await
}

/// Verifies an Entra access token with the keys the fake's tenant discovery points to.
async fn entra_claims(http: &reqwest::Client, fake: &EntraFake, token: &str) -> Value {
    let discovery: Value = http
        .get(format!("{}/{TENANT}/v2.0/.well-known/openid-configuration", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["token_endpoint"], fake.token_url());
    let jwks: Value = http.get(discovery["jwks_uri"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let jwk: Jwk =
        serde_json::from_value(jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid).unwrap().clone())
            .unwrap();
    let mut validation = Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.validate_aud = false;
    validation.set_issuer(&[fake.access_token_issuer()]);
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(&jwk).unwrap(), &validation).unwrap().claims
}

#[tokio::test]
async fn entra_issues_v1_access_tokens_for_a_matching_federated_credential() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let fake = entra(&ca, &issuer).await;
    let http = client(&ca);

    let assertion = issuer.sign(&issuer.claims(SUBJECT, "api://AzureADTokenExchange"));
    let answer =
        entra_token(&http, &fake.token_url(), APP_CLIENT_ID, &assertion, "https://storage.azure.com/.default").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    let claims = entra_claims(&http, &fake, body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["iss"], format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(claims["aud"], "https://storage.azure.com");
    assert_eq!(claims["tid"], TENANT);
    assert_eq!(claims["oid"], APP_OBJECT_ID);
    assert_eq!(claims["appid"], APP_CLIENT_ID);
    for time in ["nbf", "iat", "exp"] {
        assert!(claims[time].is_i64(), "{claims}");
    }
    assert_eq!(fake.calls(), 1);

    // The managed-identity token for the azureManagedIdentity trust provider.
    let mi = fake.mint_managed_identity_token(&ManagedIdentityClaims {
        subscription_id: "1f2e3d4c-0000-4000-8000-000000000001".into(),
        resource_group: "rg-apps".into(),
        name: "id-app".into(),
        object_id: "5d6c7b8a-0000-4000-8000-000000000002".into(),
        client_id: "3a4b5c6d-0000-4000-8000-000000000003".into(),
        audience: "api://cloudpass".into(),
    });
    let claims = entra_claims(&http, &fake, &mi).await;
    assert_eq!(
        claims["xms_mirid"],
        "/subscriptions/1f2e3d4c-0000-4000-8000-000000000001/resourcegroups/rg-apps/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-app"
    );
    assert_eq!(claims["oid"], "5d6c7b8a-0000-4000-8000-000000000002");
    assert_eq!(claims["appid"], "3a4b5c6d-0000-4000-8000-000000000003");
    assert_eq!(claims["aud"], "api://cloudpass");
    assert_eq!(claims["tid"], TENANT);
}

#[tokio::test]
async fn entra_refuses_like_entra() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let stranger = TestIssuer::start(&ca).await.unwrap();
    let fake = entra(&ca, &issuer).await;
    let http = client(&ca);
    let good = issuer.claims(SUBJECT, "api://AzureADTokenExchange");
    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        claims
    };
    let storage = "https://storage.azure.com/.default";
    let expect = |answer: Answer, status: u16, error: &str, code: u64| {
        assert_eq!(answer.status, status, "{}", answer.body);
        let body = answer.json();
        assert_eq!(body["error"], error, "{body}");
        assert_eq!(body["error_codes"], json!([code]), "{body}");
        assert!(body["error_description"].as_str().unwrap().starts_with(&format!("AADSTS{code}: ")), "{body}");
        assert!(body["timestamp"].is_string() && body["trace_id"].is_string() && body["correlation_id"].is_string());
    };
    let token_url = fake.token_url();
    let request = |client_id: &'static str, assertion: String, scope: &'static str| {
        let (http, url) = (http.clone(), token_url.clone());
        async move { entra_token(&http, &url, client_id, &assertion, scope).await }
    };

    expect(
        request("00000000-0000-0000-0000-000000000000", issuer.sign(&good), storage).await,
        400,
        "unauthorized_client",
        700016,
    );
    let foreign = stranger.sign(&stranger.claims(SUBJECT, "api://AzureADTokenExchange"));
    // No federated credential for the issuer, the audience, the subject: each named.
    expect(request(APP_CLIENT_ID, foreign, storage).await, 401, "invalid_client", 700211);
    expect(
        request(APP_CLIENT_ID, issuer.sign(&with("sub", json!("system:serviceaccount:demo:other"))), storage).await,
        401,
        "invalid_client",
        700213,
    );
    // Entra matches exactly: no wildcards, case-sensitive.
    expect(
        request(APP_CLIENT_ID, issuer.sign(&with("sub", json!("System:ServiceAccount:demo:app"))), storage).await,
        401,
        "invalid_client",
        700213,
    );
    expect(
        request(APP_CLIENT_ID, issuer.sign(&with("aud", json!("sts.amazonaws.com"))), storage).await,
        401,
        "invalid_client",
        700212,
    );
    expect(
        request(APP_CLIENT_ID, issuer.sign(&with("exp", json!(now() - 120))), storage).await,
        401,
        "invalid_client",
        700024,
    );
    expect(
        request(APP_CLIENT_ID, issuer.sign_with_unpublished_key(&good), storage).await,
        401,
        "invalid_client",
        700027,
    );
    expect(request(APP_CLIENT_ID, issuer.sign_alg_none(&good), storage).await, 401, "invalid_client", 50027);
    expect(
        request(APP_CLIENT_ID, issuer.sign(&good), "https://storage.azure.com/user_impersonation").await,
        400,
        "invalid_scope",
        1002012,
    );
    let answer = post_form(
        &http,
        &format!("{}/other-tenant/oauth2/v2.0/token", fake.url()),
        &[("grant_type", "client_credentials")],
    )
    .await;
    expect(answer, 400, "invalid_request", 90002);
    let answer = post_form(&http, &token_url, &[("grant_type", "password"), ("client_id", APP_CLIENT_ID)]).await;
    expect(answer, 400, "unsupported_grant_type", 70003);
    let answer = post_form(
        &http,
        &token_url,
        &[("grant_type", "client_credentials"), ("client_id", APP_CLIENT_ID), ("scope", storage)],
    )
    .await;
    expect(answer, 401, "invalid_client", 7000218);
    assert_eq!(fake.calls(), 0);

    fake.fail_next(2, 503);
    expect(request(APP_CLIENT_ID, issuer.sign(&good), storage).await, 503, "temporarily_unavailable", 90033);
    expect(request(APP_CLIENT_ID, issuer.sign(&good), storage).await, 503, "temporarily_unavailable", 90033);
    fake.fail_next(1, 500);
    expect(request(APP_CLIENT_ID, issuer.sign(&good), storage).await, 500, "server_error", 50000);
    assert_eq!(request(APP_CLIENT_ID, issuer.sign(&good), storage).await.status, 200);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn entra_answers_satisfy_azure_identity() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let fake = entra(&ca, &issuer).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_ca(dir.path(), &ca);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, issuer.sign(&issuer.claims(SUBJECT, "api://AzureADTokenExchange"))).unwrap();
    // What AKS workload identity sets up, pointed at the fake authority.
    let script = r#"
from azure.identity import WorkloadIdentityCredential
token = WorkloadIdentityCredential().get_token("https://storage.azure.com/.default")
import time
print(token.token.count("."), 3000 < token.expires_on - time.time() <= 3600)
"#;
    let out = python(
        script,
        &[
            ("AZURE_AUTHORITY_HOST", fake.url()),
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_ID", APP_CLIENT_ID),
            ("AZURE_FEDERATED_TOKEN_FILE", &token_file.display().to_string()),
            ("REQUESTS_CA_BUNDLE", &ca_file),
        ],
    )
    .await;
    assert_eq!(out.trim(), "2 True");
    assert_eq!(fake.calls(), 1);
}

// ---------------------------------------------------------------------------------------
// Google

const PROJECT_NUMBER: &str = "123456789012";
const SA_EMAIL: &str = "reader@demo-project.iam.gserviceaccount.com";

fn google_provider(issuer: &TestIssuer) -> WorkloadIdentityProvider {
    WorkloadIdentityProvider::new(PROJECT_NUMBER, "cloudpass", "broker", issuer.url())
}

async fn google(ca: &TestCa, issuer: &TestIssuer) -> GoogleFake {
    let mut conditioned = WorkloadIdentityProvider::new(PROJECT_NUMBER, "cloudpass", "conditioned", issuer.url());
    conditioned.subject_condition = Some(vec!["system:serviceaccount:prod:*".into()]);
    let provider = google_provider(issuer);
    GoogleFake::start(
        GoogleConfig {
            providers: vec![provider.clone(), conditioned],
            service_accounts: vec![
                ServiceAccount { email: SA_EMAIL.into(), allowed_members: vec![provider.principal(SUBJECT)] },
                ServiceAccount {
                    email: "pool-wide@demo-project.iam.gserviceaccount.com".into(),
                    allowed_members: vec![provider.pool_principal_set()],
                },
                ServiceAccount {
                    email: "admin@demo-project.iam.gserviceaccount.com".into(),
                    allowed_members: vec![provider.principal("system:serviceaccount:ops:admin")],
                },
            ],
            issuer_ca_pem: ca.cert_pem(),
        },
        ca,
    )
    .await
    .unwrap()
}

async fn exchange(
    http: &reqwest::Client,
    fake: &GoogleFake,
    audience: &str,
    subject_token: &str,
    scope: &str,
) -> Answer {
    post_form(
        http,
        &fake.sts_token_url(),
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("audience", audience),
            ("scope", scope),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("subject_token", subject_token),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ],
    )
    .await
}

async fn impersonate(http: &reqwest::Client, fake: &GoogleFake, email: &str, bearer: &str, lifetime: &str) -> Answer {
    send(
        http.post(fake.impersonation_url(email))
            .bearer_auth(bearer)
            .json(&json!({"scope": ["https://www.googleapis.com/auth/devstorage.read_only"], "lifetime": lifetime})),
    )
    .await
}

#[tokio::test]
async fn google_exchanges_federated_tokens_and_impersonates() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let fake = google(&ca, &issuer).await;
    let http = client(&ca);
    let provider = google_provider(&issuer);

    let subject_token = issuer.sign(&issuer.claims(SUBJECT, &provider.default_token_audience()));
    let answer = exchange(&http, &fake, &provider.sts_audience(), &subject_token, CLOUD_PLATFORM).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    let federated = body["access_token"].as_str().unwrap().to_owned();
    let info = fake.check_access_token(&federated).unwrap();
    assert_eq!(
        info.identity,
        format!(
            "principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/cloudpass/subject/{SUBJECT}"
        )
    );
    assert_eq!(info.scopes, [CLOUD_PLATFORM]);

    let answer = impersonate(&http, &fake, SA_EMAIL, &federated, "3600s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    let expire_time = body["expireTime"].as_str().unwrap();
    // google-auth parses "%Y-%m-%dT%H:%M:%SZ": no fractional seconds.
    assert_eq!(expire_time.len(), "2030-01-01T00:00:00Z".len(), "{expire_time}");
    let expires: jiff::Timestamp = expire_time.parse().unwrap();
    assert!((expires.as_second() - now() - 3600).abs() <= 5);
    let sa_token = fake.check_access_token(body["accessToken"].as_str().unwrap()).unwrap();
    assert_eq!(sa_token.identity, format!("serviceAccount:{SA_EMAIL}"));
    assert_eq!(sa_token.scopes, ["https://www.googleapis.com/auth/devstorage.read_only"]);

    // principalSet of the pool.
    let answer = impersonate(&http, &fake, "pool-wide@demo-project.iam.gserviceaccount.com", &federated, "600s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(fake.calls(), 3);
    assert!(fake.check_access_token("ya29.unknown").is_none());

    // Identity tokens for the gcpIdentityToken trust provider, verifiable via discovery.
    let id_token = fake.mint_identity_token("https://cloudpass.example/broker", SA_EMAIL, "demo-project");
    let verifier = JwtVerifier::new(&ca.cert_pem()).unwrap();
    let audiences = vec!["https://cloudpass.example/broker".to_owned()];
    let verified = verifier.verify(&id_token, &Expected { issuer: fake.url(), audiences: &audiences }).await.unwrap();
    assert_eq!(verified.algorithm, jsonwebtoken::Algorithm::RS256);
    assert_eq!(verified.claims.str("email"), Some(SA_EMAIL));
    assert_eq!(verified.claims.all["email_verified"], true);
    assert_eq!(verified.claims.all["google"]["compute_engine"]["project_id"], "demo-project");
}

#[tokio::test]
async fn google_refuses_like_google() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let stranger = TestIssuer::start(&ca).await.unwrap();
    let fake = google(&ca, &issuer).await;
    let http = client(&ca);
    let provider = google_provider(&issuer);
    let audience = provider.sts_audience();
    let good = issuer.claims(SUBJECT, &provider.default_token_audience());
    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        claims
    };
    let expect_sts = |answer: Answer, error: &str, description: &str| {
        assert_eq!(answer.status, 400, "{}", answer.body);
        let body = answer.json();
        assert_eq!(body["error"], error, "{body}");
        assert!(body["error_description"].as_str().unwrap().contains(description), "{body}");
    };

    let unknown_provider = audience.replace("/providers/broker", "/providers/missing");
    expect_sts(
        exchange(&http, &fake, &unknown_provider, &issuer.sign(&good), CLOUD_PLATFORM).await,
        "invalid_target",
        "audience",
    );
    let foreign = stranger.sign(&stranger.claims(SUBJECT, &provider.default_token_audience()));
    expect_sts(exchange(&http, &fake, &audience, &foreign, CLOUD_PLATFORM).await, "invalid_grant", "issuer");
    expect_sts(
        exchange(&http, &fake, &audience, &issuer.sign(&with("aud", json!(audience))), CLOUD_PLATFORM).await,
        "invalid_grant",
        "audience",
    );
    expect_sts(
        exchange(&http, &fake, &audience, &issuer.sign(&with("exp", json!(now() - 120))), CLOUD_PLATFORM).await,
        "invalid_grant",
        "expired",
    );
    expect_sts(
        exchange(&http, &fake, &audience, &issuer.sign_with_unpublished_key(&good), CLOUD_PLATFORM).await,
        "invalid_grant",
        "signature",
    );
    expect_sts(
        exchange(&http, &fake, &audience, &issuer.sign_alg_none(&good), CLOUD_PLATFORM).await,
        "invalid_grant",
        "algorithm",
    );
    let long = with("exp", json!(now() + 2 * 86400));
    expect_sts(
        exchange(&http, &fake, &audience, &issuer.sign(&long), CLOUD_PLATFORM).await,
        "invalid_grant",
        "24 hours",
    );
    let conditioned = audience.replace("/providers/broker", "/providers/conditioned");
    let mut claims = good.clone();
    claims["aud"] = json!(conditioned.replacen("//", "https://", 1));
    expect_sts(
        exchange(&http, &fake, &conditioned, &issuer.sign(&claims), CLOUD_PLATFORM).await,
        "invalid_grant",
        "attribute condition",
    );
    let answer = post_form(&http, &fake.sts_token_url(), &[("grant_type", "client_credentials")]).await;
    expect_sts(answer, "invalid_request", "grant_type");

    // Impersonation.
    let federated = exchange(&http, &fake, &audience, &issuer.sign(&good), CLOUD_PLATFORM).await.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let expect_api = |answer: Answer, code: u16, status: &str, message: &str| {
        assert_eq!(answer.status, code, "{}", answer.body);
        let body = answer.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["status"], status, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(message), "{body}");
    };
    let denied = "Permission 'iam.serviceAccounts.getAccessToken' denied";
    expect_api(
        impersonate(&http, &fake, "admin@demo-project.iam.gserviceaccount.com", &federated, "3600s").await,
        403,
        "PERMISSION_DENIED",
        denied,
    );
    expect_api(
        impersonate(&http, &fake, "nobody@demo-project.iam.gserviceaccount.com", &federated, "3600s").await,
        403,
        "PERMISSION_DENIED",
        denied,
    );
    expect_api(
        impersonate(&http, &fake, SA_EMAIL, "ya29.made-up", "3600s").await,
        401,
        "UNAUTHENTICATED",
        "invalid authentication credentials",
    );
    expect_api(impersonate(&http, &fake, SA_EMAIL, &federated, "7200s").await, 400, "INVALID_ARGUMENT", "lifetime");
    let narrow =
        exchange(&http, &fake, &audience, &issuer.sign(&good), "https://www.googleapis.com/auth/devstorage.read_only")
            .await;
    let narrow = narrow.json()["access_token"].as_str().unwrap().to_owned();
    expect_api(
        impersonate(&http, &fake, SA_EMAIL, &narrow, "3600s").await,
        403,
        "PERMISSION_DENIED",
        "insufficient authentication scopes",
    );
    assert_eq!(fake.calls(), 2);

    fake.fail_next(1, 503);
    expect_api(
        exchange(&http, &fake, &audience, &issuer.sign(&good), CLOUD_PLATFORM).await,
        503,
        "UNAVAILABLE",
        "unavailable",
    );
    fake.fail_next(1, 500);
    expect_api(impersonate(&http, &fake, SA_EMAIL, &federated, "3600s").await, 500, "INTERNAL", "Internal error");
    assert_eq!(impersonate(&http, &fake, SA_EMAIL, &federated, "3600s").await.status, 200);
}

#[tokio::test]
async fn google_answers_satisfy_google_auth() {
    let ca = TestCa::new("fakes").unwrap();
    let issuer = TestIssuer::start(&ca).await.unwrap();
    let fake = google(&ca, &issuer).await;
    let provider = google_provider(&issuer);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_ca(dir.path(), &ca);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, issuer.sign(&issuer.claims(SUBJECT, &provider.default_token_audience()))).unwrap();
    // The external_account configuration GKE-less workload identity federation uses.
    let config = json!({
        "type": "external_account",
        "audience": provider.sts_audience(),
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": fake.sts_token_url(),
        "service_account_impersonation_url": fake.impersonation_url(SA_EMAIL),
        "service_account_impersonation": {"token_lifetime_seconds": 3600},
        "credential_source": {"file": token_file.display().to_string(), "format": {"type": "text"}},
    });
    let config_file = dir.path().join("credentials.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let script = r#"
import os, google.auth.transport.requests
from google.auth import identity_pool
# The class google.auth.default() picks for this file. default() itself would also ask
# Cloud Resource Manager (a fixed googleapis.com URL) for the project ID, unreachable here.
credentials = identity_pool.Credentials.from_file(
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"], scopes=["https://www.googleapis.com/auth/devstorage.read_only"])
credentials.refresh(google.auth.transport.requests.Request())
print(credentials.token)
print(credentials.expiry.isoformat())
"#;
    let out = python(
        script,
        &[("GOOGLE_APPLICATION_CREDENTIALS", &config_file.display().to_string()), ("REQUESTS_CA_BUNDLE", &ca_file)],
    )
    .await;
    let token = out.lines().next().unwrap();
    let info = fake.check_access_token(token).expect("google-auth holds a token the fake issued");
    assert_eq!(info.identity, format!("serviceAccount:{SA_EMAIL}"));
    assert_eq!(info.scopes, ["https://www.googleapis.com/auth/devstorage.read_only"]);
    assert_eq!(fake.calls(), 2, "one exchange, one impersonation");
}

// ---------------------------------------------------------------------------------------
// OAuth 2.0 client credentials

async fn oauth2(ca: &TestCa) -> OAuth2Fake {
    OAuth2Fake::start(
        OAuth2Config {
            clients: vec![OAuth2Client {
                client_id: "billing-app".into(),
                client_secret: "s3cr3t:with+specials".into(),
                allowed_scopes: vec!["invoices.read".into(), "invoices.write".into()],
            }],
            ..OAuth2Config::default()
        },
        ca,
    )
    .await
    .unwrap()
}

fn basic(id: &str, secret: &str) -> String {
    // RFC 6749 section 2.3.1: each part form-encoded, then base64.
    let encode = |s: &str| form_encode(&[("x", s)])[2..].to_owned();
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", encode(id), encode(secret))))
}

#[tokio::test]
async fn oauth2_issues_tokens_to_authenticated_clients() {
    let ca = TestCa::new("fakes").unwrap();
    let fake = oauth2(&ca).await;
    let http = client(&ca);

    let answer = send(
        http.post(fake.token_url())
            .header("authorization", basic("billing-app", "s3cr3t:with+specials"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_encode(&[("grant_type", "client_credentials"), ("scope", "invoices.read")])),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["cache-control"], "no-store");
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "invoices.read");
    let token = body["access_token"].as_str().unwrap();
    assert!(fake.is_valid(token));
    assert_eq!(fake.token_info(token).unwrap().client_id, "billing-app");
    assert!(!fake.is_valid("made-up"));

    // client_secret_post, no scope: every allowed scope.
    let answer = post_form(
        &http,
        &fake.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "billing-app"),
            ("client_secret", "s3cr3t:with+specials"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["scope"], "invoices.read invoices.write");
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn oauth2_refuses_per_rfc_6749() {
    let ca = TestCa::new("fakes").unwrap();
    let fake = oauth2(&ca).await;
    let http = client(&ca);
    let url = fake.token_url();
    let expect = |answer: Answer, status: u16, error: &str| {
        assert_eq!(answer.status, status, "{}", answer.body);
        assert_eq!(answer.json()["error"], error, "{}", answer.body);
        if status == 401 {
            assert!(answer.headers["www-authenticate"].to_str().unwrap().starts_with("Basic"));
        }
    };
    let post = |params: &'static [(&'static str, &'static str)]| {
        let (http, url) = (http.clone(), url.clone());
        async move { post_form(&http, &url, params).await }
    };

    expect(
        post(&[("grant_type", "client_credentials"), ("client_id", "nobody"), ("client_secret", "x")]).await,
        401,
        "invalid_client",
    );
    expect(
        post(&[("grant_type", "client_credentials"), ("client_id", "billing-app"), ("client_secret", "wrong")]).await,
        401,
        "invalid_client",
    );
    expect(post(&[("grant_type", "client_credentials")]).await, 401, "invalid_client");
    let wrong_basic = send(
        http.post(&url)
            .header("authorization", basic("billing-app", "wrong"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials"),
    )
    .await;
    expect(wrong_basic, 401, "invalid_client");
    let both = send(
        http.post(&url)
            .header("authorization", basic("billing-app", "s3cr3t:with+specials"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_encode(&[
                ("grant_type", "client_credentials"),
                ("client_id", "billing-app"),
                ("client_secret", "s3cr3t:with+specials"),
            ])),
    )
    .await;
    expect(both, 400, "invalid_request");
    let secret = &[("client_id", "billing-app"), ("client_secret", "s3cr3t:with+specials")];
    let params = |extra: &[(&'static str, &'static str)]| -> &'static [(&'static str, &'static str)] {
        Box::leak([secret.as_slice(), extra].concat().into_boxed_slice())
    };
    expect(
        post(params(&[("grant_type", "client_credentials"), ("scope", "invoices.delete")])).await,
        400,
        "invalid_scope",
    );
    expect(post(params(&[("grant_type", "password")])).await, 400, "unsupported_grant_type");
    expect(post(params(&[])).await, 400, "invalid_request");
    assert_eq!(fake.calls(), 0);

    fake.fail_next(1, 503);
    expect(post(params(&[("grant_type", "client_credentials")])).await, 503, "temporarily_unavailable");
    fake.fail_next(1, 500);
    expect(post(params(&[("grant_type", "client_credentials")])).await, 500, "server_error");
    assert_eq!(post(params(&[("grant_type", "client_credentials")])).await.status, 200);
    assert_eq!(fake.calls(), 1);
}
