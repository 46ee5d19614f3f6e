//! What the agent's outbound HTTP clients (to the broker, to the metadata services)
//! share: readable error chains and bounded answer bodies.

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
