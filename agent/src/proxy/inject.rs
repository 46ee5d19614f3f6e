//! The credential the proxy adds, per kind of delivery: for `httpHeader`, the configured
//! header (any the app sent of that name removed) with the credential in its format; for
//! `awsSigV4`, a SigV4 signature over the request (S3 bodies streamed unsigned, other
//! services' bodies buffered up to a limit and signed).

use std::time::SystemTime;

use aws_sigv4::http_request::SignableBody;
use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header::CONTENT_LENGTH},
    response::Response,
};
use base64::Engine;
use cloudpass_api::{broker::Credential, secret::SecretString};
use cloudpass_outbound::sigv4::{SigningError, sign_v4, sigv4_scope_from_host};

use super::{
    relay::refuse,
    route::{Action, ProxyRoute},
};
use crate::error::AgentError;

/// The header value for `format` with the credential substituted in one pass (so a
/// credential containing `{basic}` is never expanded again): `{token}` is an access
/// token, JWT or API key; `{basic}` is base64 of `username:password`.
pub fn header_value(format: &str, credential: &Credential) -> Result<SecretString, String> {
    let token = match credential {
        Credential::AccessToken { access_token, .. } => Some(access_token.expose()),
        Credential::Jwt { token } => Some(token.expose()),
        Credential::ApiKey { key } => Some(key.expose()),
        _ => None,
    };
    let basic = match credential {
        Credential::UsernamePassword { username, password } => {
            Some(base64::engine::general_purpose::STANDARD.encode(format!("{username}:{}", password.expose())))
        }
        _ => None,
    };
    let mut out = String::with_capacity(format.len() + 64);
    let mut rest = format;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{token}") {
            out.push_str(token.ok_or_else(|| format!("{{token}} needs a token, not {}", credential.shape().as_str()))?);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{basic}") {
            out.push_str(basic.as_deref().ok_or_else(|| {
                format!("{{basic}} needs a username and password, not {}", credential.shape().as_str())
            })?);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    // A header cannot carry control characters; a line break would split it. The usual
    // cause is a Secret written with a trailing newline. Never echo the value.
    if out.chars().any(|c| c.is_control() && c != '\t') {
        let from = if format.chars().any(|c| c.is_control() && c != '\t') { "the format" } else { "the credential" };
        return Err(format!(
            "{from} contains a line break or another control character, which a header cannot carry (a trailing newline in the Secret?)"
        ));
    }
    Ok(SecretString::new(out))
}

/// The app's request on its way upstream, before the credential is added.
pub(super) struct Outgoing<'a> {
    /// The app's method, which SigV4 signs.
    pub method: &'a Method,
    /// The upstream URL (`https://host[:port]/path?query`), which SigV4 signs.
    pub url: &'a str,
    /// The host the app asked for (lower case, no trailing dot), which names the SigV4
    /// service and region when the policy does not.
    pub host: &'a str,
    /// The headers going upstream (hop-by-hop ones removed, `Host` set); the credential
    /// is added here.
    pub headers: &'a mut HeaderMap,
    /// The app's body, not read yet.
    pub body: Body,
    /// Whether the app sent no body (`Content-Length: 0`, or neither a length nor
    /// chunked encoding).
    pub empty_body: bool,
}

/// Adds `route`'s credential to `request` and returns the body to send: streamed
/// through, or buffered up to `max_body` bytes when SigV4 signs it. A credential that
/// does not fit the delivery, or a SigV4 scope that cannot be derived, is the refusal.
pub(super) async fn add_credential(
    route: &ProxyRoute,
    credential: &Credential,
    request: Outgoing<'_>,
    max_body: usize,
    now: SystemTime,
) -> Result<reqwest::Body, Response> {
    let stream = |body: Body| reqwest::Body::wrap_stream(body.into_data_stream());

    let Outgoing { method, url, host, headers, body, empty_body } = request;
    Ok(match &route.action {
        Action::Header { name, format } => {
            let value = header_value(format, credential)
                .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("policy {}: {e}", route.policy)))?;
            let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
                refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("policy {}: the credential is not a header value", route.policy),
                )
            })?;
            value.set_sensitive(true);
            headers.remove(name);
            headers.insert(name.clone(), value);
            if empty_body { reqwest::Body::from(Vec::new()) } else { stream(body) }
        }
        Action::SigV4 { service, region } => {
            let Credential::Aws { access_key_id, secret_access_key, session_token, .. } = credential else {
                return Err(refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("policy {} holds a {} credential, not AWS keys", route.policy, credential.shape().as_str()),
                ));
            };
            let derived = sigv4_scope_from_host(host);
            let (Some(service), Some(region)) = (
                service.clone().or_else(|| derived.as_ref().map(|d| d.0.clone())),
                region.clone().or_else(|| derived.as_ref().map(|d| d.1.clone())),
            ) else {
                return Err(refuse(
                    StatusCode::BAD_GATEWAY,
                    format!("cannot derive the SigV4 service and region from host {host}; set them in the policy"),
                ));
            };
            let signing_error = |e: SigningError| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            let sign_with = |headers: &mut HeaderMap, signable| {
                sign_v4(
                    method.as_str(),
                    url,
                    headers,
                    signable,
                    access_key_id,
                    secret_access_key.expose(),
                    Some(session_token.expose()),
                    &service,
                    &region,
                    now,
                )
            };
            if empty_body {
                sign_with(headers, SignableBody::Bytes(&[])).map_err(signing_error)?;
                reqwest::Body::from(Vec::new())
            } else if service == "s3" {
                // S3 takes an unsigned payload over TLS: the body streams through.
                sign_with(headers, SignableBody::UnsignedPayload).map_err(signing_error)?;
                stream(body)
            } else {
                let bytes = axum::body::to_bytes(body, max_body).await.map_err(|_| {
                    refuse(StatusCode::PAYLOAD_TOO_LARGE, AgentError::BodyTooLarge { limit: max_body }.to_string())
                })?;
                headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                sign_with(headers, SignableBody::Bytes(&bytes)).map_err(signing_error)?;
                reqwest::Body::from(bytes)
            }
        }
    })
}
