//! What token services answer, read strictly: the answers of OAuth2 token endpoints, Entra
//! ID, Google STS and IAM Credentials, their lifetimes, and the form and JSON requests
//! that fetch them (bounded, through the egress policy).

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use cloudpass_api::secret::SecretString;
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use super::expiry;
use crate::{
    Refusal,
    egress::{Egress, error_reason, json_error},
    jwt::read_limited,
};

/// Largest token-endpoint answer read.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

pub(crate) async fn post_form(
    http: &Egress,
    url: &str,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
    service: &str,
) -> Result<Value, Refusal> {
    let mut builder =
        http.post(url).map_err(|e| Refusal::denied(e.to_string()))?.header("accept", "application/json").form(form);
    if let Some((user, password)) = basic {
        // RFC 6749 section 2.3.1: both parts are form-encoded before Basic encoding.
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        builder = builder
            .header("authorization", format!("Basic {}", B64.encode(format!("{}:{}", enc(user), enc(password)))));
    }
    send_json(builder, url, service).await
}

pub(crate) async fn send_json(builder: reqwest::RequestBuilder, url: &str, service: &str) -> Result<Value, Refusal> {
    let response = builder
        .send()
        .await
        .map_err(|e| Refusal::upstream(format!("{service} at {url} unreachable: {}", error_reason(&e)), None))?;
    let status = response.status();
    let body = read_limited(response, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| Refusal::upstream(format!("{service}: {e}"), None))?;
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status.is_success() {
        return if value.is_object() {
            Ok(value)
        } else {
            Err(Refusal::upstream(format!("{service} answered HTTP {status} without a JSON object"), None))
        };
    }
    // Only the upstream's error code and description, bounded: never the body itself.
    // AWS answers some refusals of its JSON APIs in its XML error format.
    let (code, message) = match json_error(&value) {
        (None, None) => crate::aws::sts_error(&String::from_utf8_lossy(&body)),
        found => found,
    };
    Err(Refusal::upstream(
        format!(
            "{service} refused the request (HTTP {}): {}",
            status.as_u16(),
            message.unwrap_or_else(|| "no description".into())
        ),
        code.or_else(|| Some(format!("HTTP{}", status.as_u16()))),
    ))
}

pub(super) fn string_field(value: &Value, field: &str, service: &str) -> Result<String, Refusal> {
    value
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Refusal::upstream(format!("{service} answer has no {field}"), None))
}

/// The longest credential lifetime believed from an upstream answer (a year): anything
/// longer is a broken or hostile answer, refused rather than cached for ever.
pub const MAX_UPSTREAM_LIFETIME: SignedDuration = SignedDuration::from_hours(366 * 24);

/// `expires_in` (RFC 6749 section 5.1) as a number of seconds or a numeric string:
/// `Ok(None)` when absent, an error when present but not a whole number of seconds from
/// 1 to [`MAX_UPSTREAM_LIFETIME`] (`1e15`, `-1`, `0`, `"soon"`, 20 digits).
pub fn expires_in(value: &Value) -> Result<Option<SignedDuration>, String> {
    let max = MAX_UPSTREAM_LIFETIME.as_secs();
    let raw = match value.get("expires_in") {
        None | Some(Value::Null) => return Ok(None),
        Some(raw) => raw,
    };
    // Wide enough for any JSON integer serde_json keeps; floats saturate.
    let seconds: Option<i128> = match raw {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| n.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0).map(|f| f as i128)),
        Value::String(s) if s.len() <= 40 => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    let shown = || {
        let text = raw.to_string();
        if text.chars().count() > 32 { format!("{}...", text.chars().take(32).collect::<String>()) } else { text }
    };
    match seconds {
        Some(s) if (1..=i128::from(max)).contains(&s) => Ok(Some(SignedDuration::from_secs(s as i64))),
        Some(_) => Err(format!("expires_in {} is out of range (1 s to {} days)", shown(), max / 86400)),
        None => Err(format!("expires_in {} is not a whole number of seconds", shown())),
    }
}

/// An access token from a token endpoint's answer.
#[derive(Debug)]
pub struct TokenAnswer {
    /// `access_token`, redacted in `Debug`.
    pub access_token: SecretString,
    /// `token_type`; `Bearer` when absent.
    pub token_type: String,
    /// `expires_in`, when given (and then within range).
    pub expires_in: Option<SignedDuration>,
}

pub(super) fn token_answer(value: &Value, service: &str, expires_in_required: bool) -> Result<TokenAnswer, Refusal> {
    let access_token = SecretString::new(string_field(value, "access_token", service)?);
    let token_type = match value.get("token_type") {
        None | Some(Value::Null) => "Bearer".to_owned(),
        Some(Value::String(t)) if !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()) => {
            t.clone()
        }
        Some(_) => return Err(Refusal::upstream(format!("{service} answer has an invalid token_type"), None)),
    };
    let expires_in = expires_in(value).map_err(|e| Refusal::upstream(format!("{service} answer: {e}"), None))?;
    if expires_in_required && expires_in.is_none() {
        return Err(Refusal::upstream(format!("{service} answer has no expires_in"), None));
    }
    Ok(TokenAnswer { access_token, token_type, expires_in })
}

/// An OAuth2 token endpoint's `client_credentials` answer (`expires_in` optional).
pub fn parse_oauth2_answer(value: &Value) -> Result<TokenAnswer, Refusal> {
    token_answer(value, "the OAuth2 token endpoint", false)
}

/// Entra ID's `client_credentials` answer (`expires_in` required).
pub fn parse_entra_answer(value: &Value) -> Result<TokenAnswer, Refusal> {
    token_answer(value, "Entra ID", true)
}

/// Google STS's token-exchange answer (`expires_in` required).
pub fn parse_google_sts_answer(value: &Value) -> Result<TokenAnswer, Refusal> {
    token_answer(value, "Google STS", true)
}

/// Google IAM Credentials' `generateAccessToken` answer: the token and its `expireTime`,
/// which must be after `issued_at` and at most [`MAX_UPSTREAM_LIFETIME`] later.
pub fn parse_google_iam_answer(value: &Value, issued_at: Timestamp) -> Result<(SecretString, Timestamp), Refusal> {
    let service = "Google IAM Credentials";
    let token = SecretString::new(string_field(value, "accessToken", service)?);
    let expire = string_field(value, "expireTime", service)?;
    let expire: Timestamp = expire
        .parse()
        .map_err(|e| Refusal::upstream(format!("{service} answer has an invalid expireTime: {e}"), None))?;
    Ok((token, check_expiry(issued_at, expire, service)?))
}

/// An absolute expiry from an upstream answer, refused unless after `issued_at` and at
/// most [`MAX_UPSTREAM_LIFETIME`] later.
pub fn check_expiry(issued_at: Timestamp, expires_at: Timestamp, service: &str) -> Result<Timestamp, Refusal> {
    let lifetime = expires_at.duration_since(issued_at);
    if lifetime <= SignedDuration::ZERO || lifetime > MAX_UPSTREAM_LIFETIME {
        return Err(Refusal::upstream(
            format!("{service} answered an expiry of {expires_at}, which is not within a year after {issued_at}"),
            None,
        ));
    }
    Ok(expires_at)
}

/// The expiry of a token answer: `issued_at + expires_in`, or `issued_at + default`.
pub(crate) fn answer_expiry(
    answer: &TokenAnswer,
    issued_at: Timestamp,
    default: SignedDuration,
    service: &str,
) -> Result<Timestamp, Refusal> {
    expiry(issued_at, answer.expires_in.unwrap_or(default), service)
}
