//! The agent's one error type.
//!
//! Messages name policies, hosts, paths and broker error codes, never a token or a
//! credential: the types that carry secrets ([`cloudpass_api::secret::SecretString`]) do
//! not print, and no variant holds one.

use std::{io, net::SocketAddr, path::PathBuf};

use cloudpass_api::broker::ErrorCode;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration (flags, environment, the webhook's JSON) is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A loopback listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The loopback address asked for.
        addr: SocketAddr,
        /// Why the operating system refused (usually: the port is in use).
        source: io::Error,
    },
    /// The projected service-account token could not be read, or is empty.
    #[error("service-account token {}: {source}", path.display())]
    Token {
        /// The projected token file (`--token-file`).
        path: PathBuf,
        /// Why it could not be read, or that it is empty.
        source: io::Error,
    },
    /// The AWS authorization token could not be written to the shared directory.
    #[error("AWS authorization token file {}: {source}", path.display())]
    TokenFile {
        /// The token file in the shared directory.
        path: PathBuf,
        /// Why writing or replacing it failed.
        source: io::Error,
    },
    /// TLS configuration (a CA bundle) is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker could not be reached (connection, TLS handshake, timeout).
    #[error("broker unreachable: {0}")]
    BrokerUnreachable(String),
    /// The broker answered with an error.
    #[error("broker answered {status} {code:?}: {message}{}", upstream_code.as_deref().map(|c| format!(" (upstream {c})")).unwrap_or_default())]
    Broker {
        /// The HTTP status of the broker's answer.
        status: u16,
        /// The broker's error category, which decides whether the credential is dropped.
        code: ErrorCode,
        /// The broker's explanation (never contains a secret).
        message: String,
        /// The upstream identity service's own code, if any.
        upstream_code: Option<String>,
    },
    /// The broker's answer could not be understood.
    #[error("broker answer not understood: {0}")]
    BrokerResponse(String),
    /// The broker sent a credential the delivery cannot use.
    #[error("credential of policy {policy} does not fit its delivery: {reason}")]
    WrongCredential {
        /// The policy whose credential it is.
        policy: String,
        /// What was sent and what the delivery takes ([`cloudpass_api::fit::Misfit`]).
        reason: String,
    },
    /// The broker's credential cannot be delivered as configured (a header format whose
    /// placeholder the credential does not fill, a value a header cannot carry).
    #[error("credential of policy {policy} cannot be delivered: {reason}")]
    UnusableCredential {
        /// The policy whose credential it is.
        policy: String,
        /// What does not fit, never the value.
        reason: String,
    },
    /// No valid credential is held for a policy (not fetched yet, expired, or refused).
    #[error("no valid credential for policy {policy}: {reason}")]
    NoCredential {
        /// The policy asked for.
        policy: String,
        /// Why nothing valid is held: not fetched yet, expired, window over, or the last
        /// refresh error.
        reason: String,
    },
    /// A proxied request could not be sent upstream or its answer not read.
    #[error("upstream {host}: {message}")]
    Upstream {
        /// The upstream's authority (`host[:port]`).
        host: String,
        /// What failed, with its causes.
        message: String,
    },
    /// A request body is larger than the agent buffers for signing.
    #[error("request body larger than {limit} bytes cannot be signed")]
    BodyTooLarge {
        /// The limit in bytes (`--sigv4-max-body-bytes`).
        limit: usize,
    },
    /// A request could not be signed with SigV4.
    #[error("SigV4: {0}")]
    Signing(String),
    /// Cloud evidence for a trust provider could not be gathered.
    #[error("evidence for trust provider {trust_provider}: {message}")]
    Evidence {
        /// The TrustProvider it was for.
        trust_provider: String,
        /// What failed (never a token).
        message: String,
    },
}

impl AgentError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Bind { .. } => "bind",
            Self::Token { .. } => "token",
            Self::TokenFile { .. } => "token_file",
            Self::Tls(_) => "tls",
            Self::BrokerUnreachable(_) => "unreachable",
            Self::Broker { code, .. } => match code {
                ErrorCode::Unauthenticated => "unauthenticated",
                ErrorCode::Denied => "denied",
                ErrorCode::BadRequest => "bad_request",
                ErrorCode::UpstreamFailure => "upstream_failure",
                ErrorCode::Unavailable => "unavailable",
            },
            Self::BrokerResponse(_) => "invalid_response",
            Self::WrongCredential { .. } => "wrong_credential",
            Self::UnusableCredential { .. } => "unusable_credential",
            Self::NoCredential { .. } => "no_credential",
            Self::Upstream { .. } => "upstream",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Signing(_) => "signing",
            Self::Evidence { .. } => "evidence",
        }
    }

    /// Whether the broker explicitly refused the caller (the policy no longer allows this
    /// pod), as opposed to failing: the agent then stops serving the cached credential.
    pub fn is_denial(&self) -> bool {
        matches!(self, Self::Broker { code: ErrorCode::Denied, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_messages() {
        let e = AgentError::Broker {
            status: 502,
            code: ErrorCode::UpstreamFailure,
            message: "AWS STS refused the web identity token".into(),
            upstream_code: Some("InvalidIdentityToken".into()),
        };
        assert_eq!(e.metric_label(), "upstream_failure");
        assert_eq!(
            e.to_string(),
            "broker answered 502 UpstreamFailure: AWS STS refused the web identity token (upstream InvalidIdentityToken)"
        );
        assert!(!e.is_denial());
        let denied =
            AgentError::Broker { status: 403, code: ErrorCode::Denied, message: "no".into(), upstream_code: None };
        assert!(denied.is_denial());
        assert_eq!(denied.metric_label(), "denied");
        assert_eq!(AgentError::BrokerUnreachable("timeout".into()).metric_label(), "unreachable");
    }
}
