//! `cloudpass-operator export-issuer` against the real apiserver: keys are created once in
//! a Secret, the documents are written for static hosting, and a token signed with the
//! stored key verifies against the exported JWKS.

use std::process::Command;

use cloudpass_e2e::ControlPlane;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::Value;

fn export(cp: &ControlPlane, out: &std::path::Path, issuer: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloudpass-operator"))
        .env("KUBECONFIG", &cp.kubeconfig)
        .args(["--namespace", "cloudpass-issuer", "--log-format", "text", "export-issuer", "--issuer-url", issuer])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[tokio::test]
async fn export_writes_discovery_and_a_stable_jwks() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    cp.create_namespace("cloudpass-issuer", &[]).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let issuer = "https://issuer.example.com/cloudpass";
    let first = export(cp, out.path(), issuer);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));

    let read =
        |p: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(out.path().join(p)).unwrap()).unwrap() };
    let discovery = read(".well-known/openid-configuration");
    assert_eq!(discovery["issuer"], issuer);
    assert_eq!(discovery["jwks_uri"], "https://issuer.example.com/cloudpass/openid/v1/jwks");
    assert_eq!(discovery["id_token_signing_alg_values_supported"][0], "ES256");
    let jwks = read("openid/v1/jwks");
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert!(!jwks.to_string().contains("\"d\""), "public keys only");

    // A second export reuses the stored key: no churn for clouds caching the JWKS.
    let second = export(cp, out.path(), issuer);
    assert!(second.status.success());
    assert_eq!(read("openid/v1/jwks"), jwks);

    // The key in the Secret signs tokens the exported JWKS verifies.
    let secret =
        cp.kubectl_ok(&["get", "secret", "cloudpass-issuer-keys", "-n", "cloudpass-issuer", "-o", "json"]).unwrap();
    let secret: Value = serde_json::from_str(&secret).unwrap();
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(secret["data"]["keys.json"].as_str().unwrap()).unwrap();
    let keys: cloudpass_broker::issuer::KeySet = serde_json::from_slice(&raw).unwrap();
    let claims = serde_json::json!({"iss": issuer, "sub": "system:cloudpass:team:s3", "aud": "sts.amazonaws.com", "exp": 4_000_000_000u64});
    let token = keys.sign(&claims, jiff::Timestamp::now().as_second()).unwrap();
    let set: JwkSet = serde_json::from_value(jwks).unwrap();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&["sts.amazonaws.com"]);
    let verified =
        jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(set.find(&kid).unwrap()).unwrap(), &validation);
    assert_eq!(verified.unwrap().claims["sub"], "system:cloudpass:team:s3");

    let refused = export(cp, out.path(), "http://plain.example.com");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).contains("must be an https URL"));
}
