//! The AWS container-credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI` +
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`), the protocol of ECS task roles and EKS Pod
//! Identity that every AWS SDK speaks.
//!
//! `GET /v1/aws/credentials` with `Authorization: <contents of the token file>` answers
//! `{"AccessKeyId","SecretAccessKey","Token","Expiration","AccountId"}`. The token is
//! random per agent start, written into the in-memory volume shared read-only with the
//! app containers; SDKs re-read the file on every fetch.

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine;
use cloudpass_api::{
    agent::{AWS_CREDENTIALS_PATH, AWS_TOKEN_FILE},
    broker::Credential,
    secret::SecretString,
};
use jiff::Timestamp;
use serde_json::json;

use crate::{
    common::{Proof, Shared, check_proof, forbidden, guarded, not_found, unauthorized},
    endpoint::EndpointKind,
    error::AgentError,
    store::CredentialStore,
};

/// A fresh random authorization token: 256 bits, URL-safe base64, so a legal header
/// value with no line break.
pub fn new_authorization_token() -> SecretString {
    SecretString::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(cloudpass_rand::bytes::<32>()))
}

/// The pod's authorization token: the one a previous run of the agent in this pod wrote
/// to `dir` (a restarted sidecar keeps it, so an SDK that read the file just before the
/// restart is not refused), or a new one written there.
pub fn pod_authorization_token(dir: &Path) -> Result<(SecretString, PathBuf), AgentError> {
    let path = dir.join(AWS_TOKEN_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path)
        && is_authorization_token(&existing)
    {
        return Ok((SecretString::new(existing), path));
    }
    let token = new_authorization_token();
    let path = write_token_file(dir, &token)?;
    Ok((token, path))
}

/// Whether `text` is a token [`new_authorization_token`] makes: 43 URL-safe base64
/// characters (32 random bytes), nothing else.
fn is_authorization_token(text: &str) -> bool {
    text.len() == 43 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes the token to `<dir>/aws-token`: no trailing newline
/// (botocore and Go refuse header values with line breaks), mode 0644 (the app may run
/// as another user), replaced atomically so an SDK never reads half a token.
pub fn write_token_file(dir: &Path, token: &SecretString) -> Result<PathBuf, AgentError> {
    let path = dir.join(AWS_TOKEN_FILE);
    let tmp = dir.join(format!(".{AWS_TOKEN_FILE}.tmp"));
    let wrap = |source| AgentError::TokenFile { path: path.clone(), source };
    let mut file = std::fs::File::create(&tmp).map_err(wrap)?;
    file.write_all(token.expose().as_bytes()).map_err(wrap)?;
    file.sync_all().map_err(wrap)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(wrap)?;
    std::fs::rename(&tmp, &path).map_err(wrap)?;
    Ok(path)
}

struct AwsState {
    policy: String,
    token: SecretString,
    store: Arc<CredentialStore>,
}

/// The endpoint serving `policy`'s AWS credential to callers presenting `token`.
pub fn router(policy: String, token: SecretString, shared: &Shared) -> Router {
    let state = Arc::new(AwsState { policy, token, store: shared.store.clone() });
    let router = Router::new()
        .route(AWS_CREDENTIALS_PATH, get(credentials))
        .fallback(|| async { not_found() })
        .with_state(state);
    guarded(router, EndpointKind::Aws, shared.metrics.clone())
}

/// An error in the shape the SDKs surface (`Code`/`Message`; Go matches keys
/// case-insensitively).
fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"Code": code, "Message": message}))).into_response()
}

/// RFC 3339 in whole seconds, UTC (`2030-01-01T00:00:00Z`), which every SDK parses.
pub fn rfc3339_seconds(at: Timestamp) -> String {
    Timestamp::from_second(at.as_second()).unwrap_or(at).to_string()
}

async fn credentials(State(state): State<Arc<AwsState>>, headers: HeaderMap) -> Response {
    match check_proof(&headers, "authorization", state.token.expose().as_bytes()) {
        Proof::Valid => {}
        Proof::Missing => return unauthorized(),
        Proof::Wrong => return forbidden(),
    }
    let fetched = match state.store.valid(&state.policy) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "CredentialsUnavailable", e.to_string()),
    };
    match &fetched.credential {
        Credential::Aws { access_key_id, secret_access_key, session_token, account_id } => {
            let mut body = json!({
                "AccessKeyId": access_key_id,
                "SecretAccessKey": secret_access_key.expose(),
                "Token": session_token.expose(),
                "Expiration": rfc3339_seconds(fetched.serve_until),
            });
            if let Some(account) = account_id {
                body["AccountId"] = json!(account);
            }
            Json(body).into_response()
        }
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "CredentialsUnavailable",
            format!("policy {} has a {} credential, not AWS keys", state.policy, other.shape().as_str()),
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use axum::{
        body::{Body, to_bytes},
        http::Request,
    };
    use tower::ServiceExt;

    use super::*;
    use crate::{
        metrics::Metrics,
        store::tests::{api_key, fetched},
    };

    pub(crate) fn aws_keys(account: Option<&str>) -> Credential {
        Credential::Aws {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: SecretString::new("wJalrXUtnFEMI/K7MDENG"),
            session_token: SecretString::new("FwoGZXIvYXdzE"),
            account_id: account.map(Into::into),
        }
    }

    fn setup() -> (Router, Arc<CredentialStore>, Arc<Metrics>) {
        let shared = Shared { store: Arc::new(CredentialStore::new(["s3"])), metrics: Metrics::new() };
        (router("s3".into(), SecretString::new("proof"), &shared), shared.store, shared.metrics)
    }

    async fn call(router: &Router, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
        let mut request = Request::get(path);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = router.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = String::from_utf8(to_bytes(body, 1 << 20).await.unwrap().to_vec()).unwrap();
        (parts.status, parts.headers, body)
    }

    /// Request headers of a test case.
    type Headers<'a> = &'a [(&'a str, &'a str)];

    #[tokio::test]
    async fn serves_the_container_credentials_json() {
        let (router, store, metrics) = setup();
        let f = fetched(aws_keys(Some("123456789012")), 3600);
        let expiry = rfc3339_seconds(f.serve_until);
        store.put("s3", f);
        let (status, headers, body) =
            call(&router, "/v1/aws/credentials", &[("authorization", "proof"), ("accept", "application/json")]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["AccessKeyId"], "ASIAEXAMPLE");
        assert_eq!(v["SecretAccessKey"], "wJalrXUtnFEMI/K7MDENG");
        assert_eq!(v["Token"], "FwoGZXIvYXdzE");
        assert_eq!(v["AccountId"], "123456789012");
        let expiration = v["Expiration"].as_str().unwrap();
        assert_eq!(expiration, expiry);
        assert!(expiration.ends_with('Z') && !expiration.contains('.'), "{expiration}");
        expiration.parse::<Timestamp>().unwrap();
        assert_eq!(v.as_object().unwrap().len(), 5);

        store.put("s3", fetched(aws_keys(None), 3600));
        let (_, _, body) = call(&router, "/v1/aws/credentials", &[("authorization", "proof")]).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v.get("AccountId").is_none(), "absent account is omitted, not null");
        assert!(metrics.encode(&store).contains(r#"requests_total{endpoint="aws",result="ok"} 2"#));
    }

    #[tokio::test]
    async fn proof_xff_paths_and_methods() {
        let (router, store, _) = setup();
        store.put("s3", fetched(aws_keys(None), 3600));
        let cases: &[(&str, Headers, StatusCode)] = &[
            ("/v1/aws/credentials", &[], StatusCode::UNAUTHORIZED),
            ("/v1/aws/credentials", &[("authorization", "nope")], StatusCode::FORBIDDEN),
            ("/v1/aws/credentials", &[("authorization", "proof ")], StatusCode::FORBIDDEN),
            (
                "/v1/aws/credentials",
                &[("authorization", "proof"), ("x-forwarded-for", "10.0.0.1")],
                StatusCode::FORBIDDEN,
            ),
            ("/unknown", &[("x-forwarded-for", "10.0.0.1")], StatusCode::FORBIDDEN),
            ("/v1/aws/credentials/", &[("authorization", "proof")], StatusCode::NOT_FOUND),
            ("/", &[("authorization", "proof")], StatusCode::NOT_FOUND),
            ("/v1/aws/credentials?x=1", &[("authorization", "proof")], StatusCode::OK),
        ];
        for (path, headers, want) in cases {
            let (status, _, body) = call(&router, path, headers).await;
            assert_eq!(status, *want, "{path} {headers:?}: {body}");
            if !status.is_success() {
                assert!(!body.contains("proof") && !body.contains("ASIA"), "no detail: {body}");
            }
        }
        let post = Request::post("/v1/aws/credentials").header("authorization", "proof").body(Body::empty()).unwrap();
        assert_eq!(router.clone().oneshot(post).await.unwrap().status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn no_valid_credential_is_a_clear_503() {
        let (router, store, _) = setup();
        let (status, _, body) = call(&router, "/v1/aws/credentials", &[("authorization", "proof")]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["Code"], "CredentialsUnavailable");
        assert!(v["Message"].as_str().unwrap().contains("policy s3: not fetched"), "{body}");

        store.put("s3", fetched(aws_keys(None), -60));
        let (status, _, body) = call(&router, "/v1/aws/credentials", &[("authorization", "proof")]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("expired at") && !body.contains("wJalr"), "{body}");

        store.put("s3", fetched(api_key("k"), 3600));
        let (status, _, body) = call(&router, "/v1/aws/credentials", &[("authorization", "proof")]).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("apiKey credential"), "{body}");
    }

    #[test]
    fn a_restarted_agent_keeps_the_pods_token_and_replaces_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let (first, path) = pod_authorization_token(dir.path()).unwrap();
        let (again, _) = pod_authorization_token(dir.path()).unwrap();
        assert_eq!(first.expose(), again.expose(), "the restart keeps what SDKs may just have read");
        for damaged in ["", "short", &format!("{}\n", first.expose()), &"é".repeat(43)] {
            std::fs::write(&path, damaged).unwrap();
            let (fresh, _) = pod_authorization_token(dir.path()).unwrap();
            assert!(is_authorization_token(fresh.expose()), "{damaged:?}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), fresh.expose());
        }
    }

    #[test]
    fn token_file_has_no_newline_and_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let token = new_authorization_token();
        assert_eq!(token.expose().len(), 43);
        assert!(token.expose().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(token.expose(), new_authorization_token().expose());
        let path = write_token_file(dir.path(), &token).unwrap();
        assert_eq!(path, dir.path().join(AWS_TOKEN_FILE));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), token.expose());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Rewriting (agent restart) replaces the file.
        let again = new_authorization_token();
        write_token_file(dir.path(), &again).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), again.expose());
        let missing = write_token_file(&dir.path().join("missing"), &again).unwrap_err();
        assert_eq!(missing.metric_label(), "token_file");
    }
}
