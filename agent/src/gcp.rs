//! The GCP metadata server (`GCE_METADATA_HOST` and `GCE_METADATA_IP`), as far as the
//! Google auth libraries use it.
//!
//! Every request under `/computeMetadata/v1/` needs `Metadata-Flavor: Google`, and every
//! answer (errors included) carries it, as the Node library checks. Served paths:
//!
//! | path | answer |
//! |---|---|
//! | `/` | `200` (google-auth's detection ping) |
//! | `instance/service-accounts/{default,<email>}/token` | `{"access_token","expires_in":<int>,"token_type"}` |
//! | `instance/service-accounts/{acct}/identity?audience=A` | the JWT, when a policy issues one for `A` |
//! | `instance/service-accounts/{acct}/?recursive=true` | `{"aliases","email","scopes"}` |
//! | `instance/service-accounts/{acct}/{email,scopes,aliases}` | text |
//! | `instance/service-accounts/?recursive=true` | the accounts by alias and email |
//! | `project/project-id` | text, when the broker names the project |
//! | `universe/universe-domain` | `googleapis.com` |
//!
//! Anything else is `404`, which the libraries read as "not defined". The access token
//! comes from the first GCP delivery whose credential is an access token; identity
//! tokens from deliveries whose credential is a JWT (the broker's `oidcToken`
//! providers), matched by audience. A `scopes` parameter is accepted and ignored: the
//! policy decides the token's scopes.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header::CONTENT_TYPE},
    middleware::{Next, from_fn},
    response::{IntoResponse, Response},
    routing::get,
};
use cloudpass_api::broker::Credential;
use jiff::Timestamp;
use serde_json::{Value, json};

use crate::{
    common::{Shared, forbidden, guarded, not_found, parse_query},
    endpoint::EndpointKind,
    store::{CredentialStore, Fetched},
};

/// The universe of every token the agent serves.
pub const UNIVERSE_DOMAIN: &str = "googleapis.com";
const FLAVOR: &str = "metadata-flavor";
const PREFIX: &str = "/computeMetadata/v1";

/// One policy served by the metadata server.
#[derive(Clone, Debug)]
pub struct GcpDelivery {
    /// The policy whose credential the metadata server hands out.
    pub policy: String,
    /// OAuth scopes of its token (reported in the account listing).
    pub scopes: Vec<String>,
}

struct GcpState {
    deliveries: Vec<GcpDelivery>,
    store: Arc<CredentialStore>,
}

/// The metadata server for `deliveries`.
pub fn router(deliveries: Vec<GcpDelivery>, shared: &Shared) -> Router {
    let state = Arc::new(GcpState { deliveries, store: shared.store.clone() });
    let router = Router::new().route("/", get(root)).fallback(dispatch).with_state(state);
    guarded(router, EndpointKind::Gcp, shared.metrics.clone()).layer(from_fn(echo_flavor))
}

async fn echo_flavor(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response.headers_mut().insert(FLAVOR, HeaderValue::from_static("Google"));
    response
}

async fn root() -> Response {
    text("computeMetadata/\n".into())
}

/// A text value, typed as the real server types it.
fn text(body: String) -> Response {
    ([(CONTENT_TYPE, "application/text")], body).into_response()
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

fn unavailable(message: String) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{message}\n")).into_response()
}

/// Whether the deliveries hold a kind of credential, and which one does (the metadata
/// server answers 200, 503 or 404 accordingly).
enum Availability {
    /// A delivery holds one.
    Found(String, Arc<Fetched>),
    /// None known yet, but a delivery has no credential (not fetched, or refused).
    Pending(String),
    /// No delivery issues this kind.
    Absent,
}

impl GcpState {
    /// The first delivery whose credential is an access token.
    fn access_token(&self) -> Availability {
        let mut pending = None;
        for d in &self.deliveries {
            match self.store.latest(&d.policy) {
                Some(f) if matches!(f.credential, Credential::AccessToken { .. }) => {
                    return Availability::Found(d.policy.clone(), f);
                }
                Some(_) => {}
                None => {
                    pending.get_or_insert_with(|| d.policy.clone());
                }
            }
        }
        pending.map_or(Availability::Absent, Availability::Pending)
    }

    /// The service account's email, if the broker named it.
    fn email(&self) -> Option<String> {
        match self.access_token() {
            Availability::Found(_, f) => match &f.credential {
                Credential::AccessToken { service_account_email, .. } => service_account_email.clone(),
                _ => None,
            },
            _ => None,
        }
    }

    fn scopes(&self) -> Vec<String> {
        match self.access_token() {
            Availability::Found(policy, _) => {
                self.deliveries.iter().find(|d| d.policy == policy).map(|d| d.scopes.clone()).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// Whether `account` names the pod's service account (`default` or its email).
    fn is_account(&self, account: &str) -> bool {
        account == "default" || self.email().is_some_and(|e| e.eq_ignore_ascii_case(account))
    }

    fn info(&self) -> Value {
        json!({
            "aliases": ["default"],
            "email": self.email().unwrap_or_else(|| "default".into()),
            "scopes": self.scopes(),
        })
    }
}

async fn dispatch(State(state): State<Arc<GcpState>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let Some(rest) = uri.path().strip_prefix(PREFIX).filter(|r| r.is_empty() || r.starts_with('/')) else {
        return not_found();
    };
    if headers.get(FLAVOR).is_none_or(|v| v != "Google") {
        return forbidden();
    }
    if method != Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let params = match parse_query(uri.query()) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let recursive = params.get("recursive").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let rest = rest.trim_start_matches('/');
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    match segments.as_slice() {
        [""] => text("instance/\nproject/\nuniverse/\n".into()),
        ["instance"] => text("service-accounts/\n".into()),
        ["instance", "service-accounts"] => {
            let email = state.email();
            if recursive {
                let mut accounts = serde_json::Map::new();
                accounts.insert("default".into(), state.info());
                if let Some(email) = email {
                    accounts.insert(email, state.info());
                }
                Json(Value::Object(accounts)).into_response()
            } else {
                text(format!("default/\n{}", email.map(|e| format!("{e}/\n")).unwrap_or_default()))
            }
        }
        ["instance", "service-accounts", account, tail @ ..] if state.is_account(account) => match tail {
            [] if recursive => Json(state.info()).into_response(),
            [] => text("aliases\nemail\nidentity\nscopes\ntoken\n".into()),
            ["token"] => token(&state),
            ["identity"] => identity(&state, params.get("audience").map(String::as_str)),
            ["email"] => match state.access_token() {
                Availability::Pending(policy) => unavailable(no_credential(&state.store, &policy)),
                _ => text(state.email().unwrap_or_else(|| "default".into())),
            },
            ["scopes"] => text(state.scopes().iter().map(|s| format!("{s}\n")).collect()),
            ["aliases"] => text("default\n".into()),
            _ => not_found(),
        },
        ["project"] => text("project-id\n".into()),
        ["project", "project-id"] => match state.access_token() {
            Availability::Found(_, f) => match &f.credential {
                Credential::AccessToken { project_id: Some(project), .. } => text(project.clone()),
                _ => not_found(),
            },
            Availability::Pending(policy) => unavailable(no_credential(&state.store, &policy)),
            Availability::Absent => not_found(),
        },
        ["universe"] => text("universe-domain\n".into()),
        ["universe", "universe-domain"] => text(UNIVERSE_DOMAIN.into()),
        _ => not_found(),
    }
}

fn no_credential(store: &CredentialStore, policy: &str) -> String {
    match store.valid(policy) {
        Err(e) => e.to_string(),
        Ok(_) => format!("no valid credential for policy {policy}"),
    }
}

fn token(state: &GcpState) -> Response {
    match state.access_token() {
        Availability::Found(policy, _) => match state.store.valid(&policy) {
            Ok(f) => match &f.credential {
                Credential::AccessToken { access_token, token_type, .. } => Json(json!({
                    "access_token": access_token.expose(),
                    "expires_in": f.seconds_left(Timestamp::now()),
                    "token_type": token_type,
                }))
                .into_response(),
                _ => unavailable(format!("policy {policy} holds no access token")),
            },
            Err(e) => unavailable(e.to_string()),
        },
        Availability::Pending(policy) => unavailable(no_credential(&state.store, &policy)),
        Availability::Absent => not_found(),
    }
}

/// The audiences of a JWT (its `aud`, string or array), read without verifying: the
/// broker signed it, the agent only picks the right one.
pub fn jwt_audiences(jwt: &str) -> Vec<String> {
    let claims = cloudpass_api::jwt::unverified_claims(jwt).unwrap_or_default();
    match &claims["aud"] {
        Value::String(aud) => vec![aud.clone()],
        Value::Array(auds) => auds.iter().filter_map(|a| a.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

fn identity(state: &GcpState, audience: Option<&str>) -> Response {
    let Some(audience) = audience.filter(|a| !a.is_empty()) else {
        return bad_request("non-empty audience parameter required".into());
    };
    let mut offered = Vec::new();
    let mut pending = None;
    for d in &state.deliveries {
        match state.store.latest(&d.policy).as_deref().map(|f| &f.credential) {
            Some(Credential::Jwt { token }) => {
                let audiences = jwt_audiences(token.expose());
                if audiences.iter().any(|a| a == audience) {
                    return match state.store.valid(&d.policy) {
                        Ok(f) => match &f.credential {
                            Credential::Jwt { token } => text(token.expose().to_owned()),
                            _ => unavailable(format!("policy {} holds no identity token", d.policy)),
                        },
                        Err(e) => unavailable(e.to_string()),
                    };
                }
                offered.extend(audiences);
            }
            Some(_) => {}
            None => {
                pending.get_or_insert(d.policy.as_str());
            }
        }
    }
    if !offered.is_empty() {
        return bad_request(format!(
            "no identity token for audience {audience}; this pod's policies issue tokens for: {}",
            offered.join(", ")
        ));
    }
    match pending {
        Some(policy) => unavailable(no_credential(&state.store, policy)),
        None => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use cloudpass_api::secret::SecretString;
    use tower::ServiceExt;

    use base64::Engine;

    use super::*;
    use crate::{metrics::Metrics, store::tests::fetched};

    const SA: &str = "reader@proj.iam.gserviceaccount.com";

    fn access(email: Option<&str>, project: Option<&str>) -> Credential {
        Credential::AccessToken {
            access_token: SecretString::new("ya29.token"),
            token_type: "Bearer".into(),
            resource: None,
            client_id: None,
            service_account_email: email.map(Into::into),
            project_id: project.map(Into::into),
        }
    }

    fn jwt(aud: Value) -> Credential {
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!("{}.{}.c2ln", b64(json!({"alg": "ES256"})), b64(json!({"aud": aud, "sub": "x"})));
        Credential::Jwt { token: SecretString::new(token) }
    }

    fn setup(policies: &[&str]) -> (Router, Arc<CredentialStore>) {
        let shared = Shared { store: Arc::new(CredentialStore::new(policies.to_vec())), metrics: Metrics::new() };
        let deliveries = policies
            .iter()
            .map(|p| GcpDelivery {
                policy: p.to_string(),
                scopes: vec!["https://www.googleapis.com/auth/cloud-platform".into()],
            })
            .collect();
        (router(deliveries, &shared), shared.store)
    }

    async fn call(router: &Router, uri: &str, flavor: bool) -> (StatusCode, HeaderMap, String) {
        let mut request = axum::http::Request::get(uri);
        if flavor {
            request = request.header("Metadata-Flavor", "Google");
        }
        let response = router.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, String::from_utf8(to_bytes(body, 1 << 20).await.unwrap().to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serves_what_google_auth_asks_for() {
        let (router, store) = setup(&["gcs"]);
        store.put("gcs", fetched(access(Some(SA), Some("proj")), 3600));
        let (status, headers, _) = call(&router, "/", true).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["metadata-flavor"], "Google");

        let info = "/computeMetadata/v1/instance/service-accounts/default/?recursive=true";
        let (status, headers, body) = call(&router, info, true).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"aliases": ["default"], "email": SA, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]})
        );

        // google-auth asks for the token by the email it just learnt.
        for account in ["default", SA] {
            let uri = format!(
                "/computeMetadata/v1/instance/service-accounts/{account}/token?scopes=https://www.googleapis.com/auth/devstorage.read_write"
            );
            let (status, headers, body) = call(&router, &uri, true).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(headers["content-type"], "application/json");
            assert_eq!(headers["metadata-flavor"], "Google");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["access_token"], "ya29.token");
            assert_eq!(v["token_type"], "Bearer");
            let expires_in = v["expires_in"].as_u64().expect("an integer");
            assert!((3590..=3600).contains(&expires_in), "{expires_in}");
        }
        for (uri, want) in [
            ("/computeMetadata/v1/instance/service-accounts/default/email", SA),
            ("/computeMetadata/v1/project/project-id", "proj"),
            ("/computeMetadata/v1/universe/universe-domain", "googleapis.com"),
            (
                "/computeMetadata/v1/instance/service-accounts/default/scopes",
                "https://www.googleapis.com/auth/cloud-platform\n",
            ),
            ("/computeMetadata/v1/instance/service-accounts/", &format!("default/\n{SA}/\n")),
        ] {
            let (status, headers, body) = call(&router, uri, true).await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, want), "{uri}");
            assert_eq!(headers["content-type"], "application/text");
        }
        let (_, _, body) = call(&router, "/computeMetadata/v1/instance/service-accounts/?recursive=true", true).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["default"]["email"], SA);
        assert_eq!(v[SA]["aliases"], json!(["default"]));
    }

    #[tokio::test]
    async fn refusals_and_undefined_paths_keep_the_flavor_header() {
        let (router, store) = setup(&["gcs"]);
        store.put("gcs", fetched(access(None, None), 3600));
        let cases: &[(&str, bool, StatusCode)] = &[
            ("/computeMetadata/v1/instance/service-accounts/default/token", false, StatusCode::FORBIDDEN),
            (
                "/computeMetadata/v1/instance/service-accounts/other@x.iam.gserviceaccount.com/token",
                true,
                StatusCode::NOT_FOUND,
            ),
            ("/computeMetadata/v1/instance/service-accounts/default/identity?audience=x", true, StatusCode::NOT_FOUND),
            ("/computeMetadata/v1/instance/service-accounts/default/identity", true, StatusCode::BAD_REQUEST),
            ("/computeMetadata/v1/instance/attributes/", true, StatusCode::NOT_FOUND),
            ("/computeMetadata/v1/project/project-id", true, StatusCode::NOT_FOUND),
            ("/computeMetadata/v1/project/numeric-project-id", true, StatusCode::NOT_FOUND),
            (
                "/computeMetadata/v1/instance/service-accounts/default/token?scopes=a&scopes=b",
                true,
                StatusCode::BAD_REQUEST,
            ),
            ("/computeMetadata/v1x/instance", true, StatusCode::NOT_FOUND),
            ("/computeMetadata/v2/", true, StatusCode::NOT_FOUND),
            ("/metadata/identity/oauth2/token", true, StatusCode::NOT_FOUND),
        ];
        for (uri, flavor, want) in cases {
            let (status, headers, body) = call(&router, uri, *flavor).await;
            assert_eq!(status, *want, "{uri}: {body}");
            assert_eq!(headers["metadata-flavor"], "Google", "{uri}");
            assert!(!body.contains("ya29"));
        }
        // Without an email from the broker, the account is "default" and listing still works.
        let (_, _, body) =
            call(&router, "/computeMetadata/v1/instance/service-accounts/default/?recursive=true", true).await;
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["email"], "default");

        let xff = axum::http::Request::get("/computeMetadata/v1/instance/service-accounts/default/token")
            .header("Metadata-Flavor", "Google")
            .header("X-Forwarded-For", "10.1.1.1")
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(xff).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["metadata-flavor"], "Google");
        let post = axum::http::Request::post("/computeMetadata/v1/instance/service-accounts/default/token")
            .header("Metadata-Flavor", "Google")
            .body(Body::empty())
            .unwrap();
        assert_eq!(router.clone().oneshot(post).await.unwrap().status(), StatusCode::METHOD_NOT_ALLOWED);
        let wrong = axum::http::Request::get("/computeMetadata/v1/")
            .header("Metadata-Flavor", "google-ish")
            .body(Body::empty())
            .unwrap();
        assert_eq!(router.clone().oneshot(wrong).await.unwrap().status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn identity_tokens_by_audience() {
        let (router, store) = setup(&["gcs", "oidc"]);
        store.put("gcs", fetched(access(Some(SA), None), 3600));
        store.put("oidc", fetched(jwt(json!(["https://api.example.com", "other"])), 3600));
        let (status, _, body) = call(
            &router,
            "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://api.example.com&format=full",
            true,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(jwt_audiences(&body), ["https://api.example.com", "other"]);
        let (status, _, body) =
            call(&router, "/computeMetadata/v1/instance/service-accounts/default/identity?audience=nope", true).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("https://api.example.com"), "{body}");
        // The access token still comes from the access-token delivery.
        let (status, _, body) =
            call(&router, "/computeMetadata/v1/instance/service-accounts/default/token", true).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("ya29.token"));
        assert_eq!(jwt_audiences("not-a-jwt"), Vec::<String>::new());
        assert_eq!(
            jwt_audiences(&format!(
                "a.{}.c",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"aud":"x"}"#)
            )),
            ["x"]
        );
    }

    #[tokio::test]
    async fn nothing_valid_is_503_and_jwt_only_has_no_token() {
        let (router, store) = setup(&["gcs"]);
        let token = "/computeMetadata/v1/instance/service-accounts/default/token";
        let (status, _, body) = call(&router, token, true).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not fetched"), "{body}");
        store.put("gcs", fetched(access(None, None), -5));
        let (status, _, body) = call(&router, token, true).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("expired"), "{body}");
        store.put("gcs", fetched(jwt(json!("aud")), 3600));
        assert_eq!(call(&router, token, true).await.0, StatusCode::NOT_FOUND);
    }
}
