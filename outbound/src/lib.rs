//! What the outbound calls of the agent (to the broker, to metadata services), the broker
//! (to token services, JWKS) and the operator (to the apiserver) share: readable error
//! chains, bounded answer bodies, the delays between retries and AWS SigV4 signing.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod retry;
pub mod sigv4;

pub use retry::Retry;

/// An error's message with its causes (`reqwest` puts the useful part, such as
/// "connection refused" or the certificate problem, in the source chain).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why an answer's body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// The connection failed while reading (with its causes).
    Read(String),
    /// The body is larger than the limit (in bytes).
    TooLarge(usize),
}

/// Reads an answer's body, refusing more than `limit` bytes.
pub async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| BodyError::Read(chain(&e)))? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn the_chain_names_every_cause() {
        let error = Layer("request failed", Some(Box::new(Layer("connect", Some(Box::new(Layer("refused", None)))))));
        assert_eq!(chain(&error), "request failed: connect: refused");
    }
}
