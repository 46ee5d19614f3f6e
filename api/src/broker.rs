//! Wire types between the agent and the broker.
//!
//! The agent calls `POST /v1/credentials` over HTTPS with its projected service-account
//! token (audience `cloudpass`) as `Authorization: Bearer`, and a [`CredentialRequest`]
//! body naming the policy. The broker answers `200` with a [`CredentialResponse`] or an
//! error status with a [`BrokerError`] body. The caller's namespace and pod come from the
//! verified token, never from the body.
//!
//! An agent of the broker's own cluster first calls `GET /v1/agent-config` with the same
//! token: the broker answers [`AgentDeliveries`], what the agent serves for the policies
//! the webhook listed in its pod's `cloudpass.dev/policies` annotation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::secret::SecretString;

/// Path of the credential endpoint.
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// Path of the agent's deliveries (`GET`), asked once at its start.
pub const AGENT_CONFIG_PATH: &str = "/v1/agent-config";
/// Largest request body the broker reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Header of the pre-signed `sts:GetCallerIdentity` evidence that names the broker it is
/// meant for, covered by the SigV4 signature (as Vault's AWS auth method's server-ID
/// header): a request signed for one broker cannot be replayed to another. Its value is
/// the broker's server ID, by default the host of the broker URL the agent calls.
pub const SERVER_ID_HEADER: &str = "x-cloudpass-server-id";

/// The agent asks for the credential of one policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialRequest {
    /// Name of the AccessPolicy, in the caller's namespace.
    pub policy: String,
    /// Namespace of the policy, for callers from **another** cluster (verified by a
    /// `kubernetesServiceAccount` TrustProvider with an `issuer`): the namespace in the
    /// broker's cluster whose policy applies. A caller of the broker's own cluster may
    /// only name its own namespace (or leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Extra proof for trust providers that need more than the service-account token.
    #[serde(default, skip_serializing_if = "Evidence::is_empty")]
    pub evidence: Evidence,
}

/// Proof of identity beyond the service-account token.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Evidence {
    /// JWTs for JWT-based trust providers (Azure managed identity, Google identity token,
    /// OIDC), by TrustProvider name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, SecretString>,
    /// A pre-signed `sts:GetCallerIdentity` request, for `awsRole` trust providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_get_caller_identity: Option<SignedRequest>,
}

impl Evidence {
    /// Whether no evidence is given.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.aws_get_caller_identity.is_none()
    }
}

/// An HTTP request signed by the workload, for the broker to send on its behalf.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedRequest {
    /// HTTP method (`POST` for STS).
    pub method: String,
    /// Full URL; the broker sends it only to an allowed STS endpoint.
    pub url: String,
    /// Headers, including the signature (`Authorization`, `X-Amz-Date`, ...).
    pub headers: BTreeMap<String, SecretString>,
    /// Request body.
    #[serde(default)]
    pub body: String,
}

/// The broker's answer to [`AGENT_CONFIG_PATH`]: what the calling pod's agent serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentDeliveries {
    /// One per policy of the pod's annotation that is Ready and selects the pod, in the
    /// annotation's order.
    pub deliveries: Vec<crate::agent::AgentDelivery>,
    /// The policies of the annotation that cannot be served now, and why; the agent asks
    /// again until none is left (a policy the webhook saw Ready may not have reached
    /// this broker replica yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<UnavailablePolicy>,
}

/// A policy the broker cannot give the agent, and why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UnavailablePolicy {
    /// Name of the AccessPolicy.
    pub policy: String,
    /// Why, in words that name what to fix.
    pub message: String,
}

/// A credential with its lifetime.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialResponse {
    /// The policy it was issued under.
    pub policy: String,
    /// The credential.
    pub credential: Credential,
    /// When the credential stops working.
    pub expires_at: jiff::Timestamp,
    /// When the agent should fetch a new one (before expiry, leaving room for retries).
    pub refresh_at: jiff::Timestamp,
    /// When the agent must stop serving this credential even if it still works: the end
    /// of the policy's time window, when the upstream could not issue a credential that
    /// short. Absent: at `expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve_until: Option<jiff::Timestamp>,
}

/// A typed credential. Secret parts are [`SecretString`]s, which never print.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Credential {
    /// AWS temporary credentials (from STS).
    Aws {
        /// Access key ID (`ASIA...`).
        access_key_id: String,
        /// Secret access key.
        secret_access_key: SecretString,
        /// Session token.
        session_token: SecretString,
        /// Account the role belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        account_id: Option<String>,
    },
    /// An OAuth2 access token (Entra ID, Google, any OAuth2 server).
    AccessToken {
        /// The token.
        access_token: SecretString,
        /// Token type, normally `Bearer`.
        token_type: String,
        /// Azure resource the token is for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resource: Option<String>,
        /// Azure client ID of the identity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        /// Google service-account email (impersonated account), for the metadata server.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_account_email: Option<String>,
        /// Google project ID, for the metadata server.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        project_id: Option<String>,
    },
    /// A JWT signed by the cloudpass issuer.
    Jwt {
        /// The token.
        token: SecretString,
    },
    /// An API key.
    ApiKey {
        /// The key.
        key: SecretString,
    },
    /// A username and password.
    UsernamePassword {
        /// The username, as the Secret holds it.
        username: String,
        /// The password; redacted in `Debug`.
        password: SecretString,
    },
}

/// Why the broker refused or failed a request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The service-account token is missing, malformed, expired or not accepted (401).
    Unauthenticated,
    /// The caller is known but not allowed: no policy selects it, a trust provider
    /// refused it, or a condition is not met (403).
    Denied,
    /// The request is malformed (400).
    BadRequest,
    /// The upstream identity service failed or refused the exchange (502).
    UpstreamFailure,
    /// The broker is not ready to answer yet, e.g. config not loaded (503).
    Unavailable,
}

impl ErrorCode {
    /// The code as it is sent (`Unauthenticated`, `Denied`, ...): also the `code` of
    /// audit records and the `code` label of the broker's metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "Unauthenticated",
            Self::Denied => "Denied",
            Self::BadRequest => "BadRequest",
            Self::UpstreamFailure => "UpstreamFailure",
            Self::Unavailable => "Unavailable",
        }
    }

    /// The HTTP status the broker answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Unauthenticated => 401,
            Self::Denied => 403,
            Self::BadRequest => 400,
            Self::UpstreamFailure => 502,
            Self::Unavailable => 503,
        }
    }
}

/// Error body of every non-200 answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerError {
    /// Category of the error.
    pub code: ErrorCode,
    /// What went wrong, for a human (e.g. "trust provider eks failed: audience ...").
    /// Never contains a token or secret.
    pub message: String,
    /// The upstream service's own error code, for `UpstreamFailure` (e.g.
    /// `InvalidIdentityToken`, `invalid_client`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_labels_are_the_wire_names() {
        for (code, label) in [
            (ErrorCode::Unauthenticated, "Unauthenticated"),
            (ErrorCode::Denied, "Denied"),
            (ErrorCode::BadRequest, "BadRequest"),
            (ErrorCode::UpstreamFailure, "UpstreamFailure"),
            (ErrorCode::Unavailable, "Unavailable"),
        ] {
            assert_eq!(code.as_str(), label);
            // What audit records and metrics carried before `as_str`: they must not change.
            assert_eq!(format!("{code:?}"), label);
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::json!(label));
        }
    }

    #[test]
    fn request_round_trip_and_strictness() {
        let mut evidence = Evidence::default();
        evidence.tokens.insert("entra".into(), SecretString::new("eyJ.token"));
        let req = CredentialRequest { policy: "orders-to-s3".into(), namespace: None, evidence };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<CredentialRequest>(&json).unwrap(), req);
        let minimal: CredentialRequest = serde_json::from_str(r#"{"policy":"p"}"#).unwrap();
        assert!(minimal.evidence.is_empty());
        let err = serde_json::from_str::<CredentialRequest>(r#"{"policy":"p","pod":"other"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `pod`"), "{err}");
        assert!(!format!("{req:?}").contains("eyJ.token"), "Debug redacts evidence tokens");
    }

    #[test]
    fn credentials_are_tagged_and_redacted() {
        let resp = CredentialResponse {
            policy: "p".into(),
            credential: Credential::Aws {
                access_key_id: "ASIAEXAMPLE".into(),
                secret_access_key: SecretString::new("wJalrXUtnFEMI"),
                session_token: SecretString::new("FwoGZXIvYXdzE"),
                account_id: Some("123456789012".into()),
            },
            expires_at: "2030-01-01T00:00:00Z".parse().unwrap(),
            refresh_at: "2029-12-31T23:48:00Z".parse().unwrap(),
            serve_until: None,
        };
        let json = serde_json::to_value(&resp).unwrap();
        assert_eq!(json["credential"]["type"], "aws");
        assert_eq!(json["credential"]["secretAccessKey"], "wJalrXUtnFEMI");
        assert_eq!(json["expiresAt"], "2030-01-01T00:00:00Z");
        assert_eq!(serde_json::from_value::<CredentialResponse>(json).unwrap(), resp);
        let debug = format!("{resp:?}");
        assert!(!debug.contains("wJalr") && !debug.contains("FwoGZ"), "{debug}");

        for (cred, tag) in [
            (Credential::Jwt { token: SecretString::new("t") }, "jwt"),
            (Credential::ApiKey { key: SecretString::new("k") }, "apiKey"),
            (
                Credential::UsernamePassword { username: "u".into(), password: SecretString::new("p") },
                "usernamePassword",
            ),
            (
                Credential::AccessToken {
                    access_token: SecretString::new("a"),
                    token_type: "Bearer".into(),
                    resource: Some("https://storage.azure.com/".into()),
                    client_id: None,
                    service_account_email: None,
                    project_id: None,
                },
                "accessToken",
            ),
        ] {
            let v = serde_json::to_value(&cred).unwrap();
            assert_eq!(v["type"], tag);
            assert_eq!(serde_json::from_value::<Credential>(v).unwrap(), cred);
        }
    }

    #[test]
    fn errors_map_to_http_statuses() {
        let err = BrokerError {
            code: ErrorCode::UpstreamFailure,
            message: "AWS STS refused the web identity token".into(),
            upstream_code: Some("InvalidIdentityToken".into()),
        };
        let json = serde_json::to_string(&err).unwrap();
        assert!(json.contains(r#""code":"UpstreamFailure""#), "{json}");
        assert_eq!(serde_json::from_str::<BrokerError>(&json).unwrap(), err);
        let statuses: Vec<_> = [
            ErrorCode::BadRequest,
            ErrorCode::Unauthenticated,
            ErrorCode::Denied,
            ErrorCode::UpstreamFailure,
            ErrorCode::Unavailable,
        ]
        .iter()
        .map(|c| c.http_status())
        .collect();
        assert_eq!(statuses, [400, 401, 403, 502, 503]);
    }
}
