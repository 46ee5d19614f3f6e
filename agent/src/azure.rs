//! The Azure App Service managed-identity endpoint (`IDENTITY_ENDPOINT` +
//! `IDENTITY_HEADER`), which azure-identity, MSAL and the Go SDK use when both variables
//! are set.
//!
//! `GET /msi/token?api-version=2019-08-01&resource=<resource>` with
//! `X-IDENTITY-HEADER: <IDENTITY_HEADER>` answers
//! `{"access_token","expires_on","resource","token_type","client_id"}` (`expires_on` in
//! epoch seconds, as a string). Several policies may share the endpoint, one per
//! resource; the resource is matched without trailing slash and case.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use cloudpass_api::{agent::AZURE_TOKEN_PATH, broker::Credential, secret::SecretString};
use serde_json::json;

use crate::{
    common::{Proof, Shared, check_proof, forbidden, guarded, not_found, parse_query, unauthorized},
    endpoint::{EndpointKind, normalize_resource},
    store::CredentialStore,
};

/// The only API version of the App Service protocol the SDKs send.
pub const API_VERSION: &str = "2019-08-01";

/// One policy served by the Azure endpoint.
#[derive(Clone, Debug)]
pub struct AzureDelivery {
    /// The policy whose access token is served for `resource`.
    pub policy: String,
    /// Resource the token is for (`https://storage.azure.com/`).
    pub resource: String,
}

struct AzureState {
    /// (normalized resource, policy)
    deliveries: Vec<(String, String)>,
    identity_header: SecretString,
    store: Arc<CredentialStore>,
}

/// The endpoint serving `deliveries` to callers presenting `identity_header`.
pub fn router(deliveries: Vec<AzureDelivery>, identity_header: SecretString, shared: &Shared) -> Router {
    let deliveries = deliveries.into_iter().map(|d| (normalize_resource(&d.resource), d.policy)).collect();
    let state = Arc::new(AzureState { deliveries, identity_header, store: shared.store.clone() });
    let router = Router::new().route(AZURE_TOKEN_PATH, get(token)).fallback(|| async { not_found() }).with_state(state);
    guarded(router, EndpointKind::Azure, shared.metrics.clone())
}

/// An OAuth-style error body, which MSAL and azure-identity surface.
fn error(status: StatusCode, code: &str, description: String) -> Response {
    (status, Json(json!({"error": code, "error_description": description}))).into_response()
}

async fn token(State(state): State<Arc<AzureState>>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    match check_proof(&headers, "x-identity-header", state.identity_header.expose().as_bytes()) {
        Proof::Valid => {}
        Proof::Missing => return unauthorized(),
        Proof::Wrong => return forbidden(),
    }
    let params = match parse_query(query.as_deref()) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e),
    };
    match params.get("api-version").map(String::as_str) {
        Some(API_VERSION) => {}
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("api-version {other} is not supported; use {API_VERSION}"),
            );
        }
        None => return error(StatusCode::BAD_REQUEST, "invalid_request", "api-version is required".into()),
    }
    let Some(resource) = params.get("resource").filter(|r| !r.trim().is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "resource is required".into());
    };
    let wanted = normalize_resource(resource);
    let Some((_, policy)) = state.deliveries.iter().find(|(r, _)| *r == wanted) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            format!("no AccessPolicy of this pod grants a token for resource {resource}"),
        );
    };
    let fetched = match state.store.valid(policy) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", e.to_string()),
    };
    let Credential::AccessToken { access_token, token_type, client_id, .. } = &fetched.credential else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("policy {policy} has a {} credential, not an access token", fetched.credential.shape().as_str()),
        );
    };
    // A caller naming a user-assigned identity must get that one. Only the client ID is
    // known (from the broker); `mi_res_id`, `object_id` and `principal_id` cannot be
    // checked and select nothing: the pod's policy decides the identity.
    if let (Some(asked), Some(have)) = (params.get("client_id"), client_id)
        && !asked.eq_ignore_ascii_case(have)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("no identity with client_id {asked} is available for resource {resource}"),
        );
    }
    Json(json!({
        "access_token": access_token.expose(),
        "expires_on": fetched.serve_until.as_second().to_string(),
        "resource": resource,
        "token_type": token_type,
        "client_id": client_id.as_deref().unwrap_or_default(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use tower::ServiceExt;

    use super::*;
    use crate::{
        metrics::Metrics,
        store::tests::{api_key, fetched},
    };

    fn token(client_id: Option<&str>) -> Credential {
        Credential::AccessToken {
            access_token: SecretString::new("eyJ0eXAi.storage"),
            token_type: "Bearer".into(),
            resource: Some("https://storage.azure.com/".into()),
            client_id: client_id.map(Into::into),
            service_account_email: None,
            project_id: None,
        }
    }

    fn setup() -> (Router, Arc<CredentialStore>) {
        let shared = Shared { store: Arc::new(CredentialStore::new(["blob", "vault"])), metrics: Metrics::new() };
        let deliveries = vec![
            AzureDelivery { policy: "blob".into(), resource: "https://storage.azure.com/".into() },
            AzureDelivery { policy: "vault".into(), resource: "https://vault.azure.net".into() },
        ];
        (router(deliveries, SecretString::new("per-pod-proof"), &shared), shared.store)
    }

    async fn call(router: &Router, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, serde_json::Value) {
        let mut request = axum::http::Request::get(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = router.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body))))
    }

    const PROOF: (&str, &str) = ("X-IDENTITY-HEADER", "per-pod-proof");

    /// Request headers of a test case.
    type Headers<'a> = &'a [(&'a str, &'a str)];

    #[tokio::test]
    async fn answers_like_app_service() {
        let (router, store) = setup();
        let f = fetched(token(Some("11111111-2222-3333-4444-555555555555")), 3600);
        let expires_on = f.serve_until.as_second().to_string();
        store.put("blob", f);
        // azure-identity sends the scope minus "/.default": no trailing slash.
        for resource in ["https%3A%2F%2Fstorage.azure.com", "https://storage.azure.com/", "HTTPS://STORAGE.AZURE.COM"] {
            let (status, v) =
                call(&router, &format!("/msi/token?api-version=2019-08-01&resource={resource}"), &[PROOF]).await;
            assert_eq!(status, StatusCode::OK, "{resource}: {v}");
            assert_eq!(v["access_token"], "eyJ0eXAi.storage");
            assert_eq!(v["expires_on"], json!(expires_on), "a string of epoch seconds");
            assert_eq!(v["token_type"], "Bearer");
            assert_eq!(v["client_id"], "11111111-2222-3333-4444-555555555555");
            assert!(v["resource"].as_str().unwrap().to_ascii_lowercase().starts_with("https://storage.azure.com"));
            assert_eq!(v.as_object().unwrap().len(), 5);
        }
        // The identity may be named by client ID (any case); another one is refused.
        let ok = "/msi/token?api-version=2019-08-01&resource=https://storage.azure.com&client_id=11111111-2222-3333-4444-555555555555";
        assert_eq!(call(&router, ok, &[PROOF]).await.0, StatusCode::OK);
        let other = "/msi/token?api-version=2019-08-01&resource=https://storage.azure.com&client_id=99999999-2222-3333-4444-555555555555";
        let (status, v) = call(&router, other, &[PROOF]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(v["error_description"].as_str().unwrap().contains("99999999"), "{v}");
        let mi = "/msi/token?api-version=2019-08-01&resource=https://storage.azure.com&mi_res_id=/subscriptions/x";
        assert_eq!(call(&router, mi, &[PROOF]).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn refusals() {
        let (router, store) = setup();
        store.put("blob", fetched(token(None), 3600));
        store.put("vault", fetched(api_key("k"), 3600));
        let good = "/msi/token?api-version=2019-08-01&resource=https://storage.azure.com";
        let cases: &[(&str, Headers, StatusCode, &str)] = &[
            (good, &[], StatusCode::UNAUTHORIZED, ""),
            (good, &[("X-IDENTITY-HEADER", "guess")], StatusCode::FORBIDDEN, ""),
            (good, &[PROOF, ("X-Forwarded-For", "1.2.3.4")], StatusCode::FORBIDDEN, ""),
            (
                "/msi/token?resource=https://storage.azure.com",
                &[PROOF],
                StatusCode::BAD_REQUEST,
                "api-version is required",
            ),
            ("/msi/token?api-version=2017-09-01&resource=x", &[PROOF], StatusCode::BAD_REQUEST, "not supported"),
            ("/msi/token?api-version=2019-08-01", &[PROOF], StatusCode::BAD_REQUEST, "resource is required"),
            ("/msi/token?api-version=2019-08-01&resource=", &[PROOF], StatusCode::BAD_REQUEST, "resource is required"),
            (
                "/msi/token?api-version=2019-08-01&resource=a&resource=b",
                &[PROOF],
                StatusCode::BAD_REQUEST,
                "more than once",
            ),
            (
                "/msi/token?api-version=2019-08-01&resource=https://management.azure.com/",
                &[PROOF],
                StatusCode::BAD_REQUEST,
                "management.azure.com",
            ),
            (
                "/msi/token?api-version=2019-08-01&resource=https://vault.azure.net",
                &[PROOF],
                StatusCode::INTERNAL_SERVER_ERROR,
                "apiKey",
            ),
            ("/metadata/identity/oauth2/token", &[PROOF], StatusCode::NOT_FOUND, ""),
            ("/msi/token/", &[PROOF], StatusCode::NOT_FOUND, ""),
        ];
        for (uri, headers, want, text) in cases {
            let (status, v) = call(&router, uri, headers).await;
            assert_eq!(status, *want, "{uri}: {v}");
            assert!(v.to_string().contains(text), "{uri}: {v}");
            assert!(!v.to_string().contains("eyJ0"), "{v}");
        }
    }

    #[tokio::test]
    async fn expired_is_a_clear_error() {
        let (router, store) = setup();
        store.put("blob", fetched(token(None), -1));
        let (status, v) =
            call(&router, "/msi/token?api-version=2019-08-01&resource=https://storage.azure.com", &[PROOF]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(v["error_description"].as_str().unwrap().contains("policy blob: the last credential expired"), "{v}");
    }
}
