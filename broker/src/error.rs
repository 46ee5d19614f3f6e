//! What can go wrong inside the broker, below the answer to the caller.
//!
//! [`Error`] is the typed failure of one step (a JWT check, a key fetch, the `awsRole`
//! evidence, an outbound address): its `Display` is the message callers, the audit and
//! trust-provider details see (never a token or secret), and
//! [`Error::metric_label`] a short, stable label for logs and metrics.
//! [`crate::Refusal`] stays the wire-facing type: which [`ErrorCode`] a step's failure
//! becomes depends on the step (a refused `tokenUrl` is `Denied`, an unreadable STS
//! answer `UpstreamFailure`), so call sites choose it.
//!
//! [`ErrorCode`]: cloudpass_api::broker::ErrorCode

/// Why one step of a decision failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The egress policy refused the destination (not https, not a URL, or an address
    /// the broker never calls or calls only with `--allow-private-upstreams`); nothing
    /// was sent.
    #[error("{0}")]
    Refused(String),
    /// The outbound HTTP client could not be built.
    #[error("HTTP client: {0}")]
    HttpClient(String),
    /// A JWT did not verify: not a JWT, algorithm, key, signature, issuer, audience or
    /// time claims.
    #[error("{0}")]
    InvalidToken(String),
    /// No keys to verify a JWT with: fetching them failed and no usable keys are cached.
    #[error("no keys to verify with: {0}")]
    KeysUnavailable(String),
    /// A document could not be fetched or read: a JWKS, a discovery document, an
    /// answer's body (unreachable, HTTP error, too large, not JSON).
    #[error("{0}")]
    Fetch(String),
    /// An upstream answer could not be parsed (malformed or hostile XML).
    #[error("{0}")]
    Malformed(String),
    /// The evidence is missing, malformed, not the request it must be, or not bound
    /// to this broker.
    #[error("{0}")]
    Evidence(String),
    /// An upstream service (STS) refused the evidence or could not be reached.
    #[error("{0}")]
    Upstream(String),
    /// The caller's verified identity is not what the trust provider trusts.
    #[error("{0}")]
    NotTrusted(String),
    /// A trust provider's settings can never match (e.g. a `roleArns` entry with a path
    /// and a wildcard, a provider without a kind).
    #[error("{0}")]
    InvalidSpec(String),
}

impl Error {
    /// A short, stable label of the failure's category, for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Refused(_) => "egress_refused",
            Self::HttpClient(_) => "http_client",
            Self::InvalidToken(_) => "invalid_token",
            Self::KeysUnavailable(_) => "keys_unavailable",
            Self::Fetch(_) => "fetch_failed",
            Self::Malformed(_) => "malformed_answer",
            Self::Evidence(_) => "invalid_evidence",
            Self::Upstream(_) => "upstream_failure",
            Self::NotTrusted(_) => "not_trusted",
            Self::InvalidSpec(_) => "invalid_spec",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_message_and_labels_are_stable() {
        assert_eq!(Error::NotTrusted("account 1 is not trusted".into()).to_string(), "account 1 is not trusted");
        assert_eq!(Error::KeysUnavailable("HTTP 503".into()).to_string(), "no keys to verify with: HTTP 503");
        assert_eq!(Error::HttpClient("x".into()).to_string(), "HTTP client: x");
        let labels: Vec<_> = [
            Error::Refused(String::new()),
            Error::HttpClient(String::new()),
            Error::InvalidToken(String::new()),
            Error::KeysUnavailable(String::new()),
            Error::Fetch(String::new()),
            Error::Malformed(String::new()),
            Error::Evidence(String::new()),
            Error::Upstream(String::new()),
            Error::NotTrusted(String::new()),
            Error::InvalidSpec(String::new()),
        ]
        .iter()
        .map(Error::metric_label)
        .collect();
        assert_eq!(
            labels,
            [
                "egress_refused",
                "http_client",
                "invalid_token",
                "keys_unavailable",
                "fetch_failed",
                "malformed_answer",
                "invalid_evidence",
                "upstream_failure",
                "not_trusted",
                "invalid_spec"
            ]
        );
    }
}
