//! A string that must never be printed: tokens, keys, passwords.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Secret text (an access token, a secret access key, an API key, a password).
///
/// It serializes as the plain string, because the wire needs it, but its `Debug` shows
/// only its length, and it has no `Display`: a `tracing` field or `{:?}` in a log line
/// cannot leak it by accident. Read it with [`SecretString::expose`], at the one place
/// that needs the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value. Call this only where the value leaves the process on purpose.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretString(<redacted {} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = SecretString::new("AKIAEXAMPLESECRET");
        let shown = format!("{s:?} {:#?}", vec![s.clone()]);
        assert!(!shown.contains("AKIA"), "{shown}");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"AKIAEXAMPLESECRET\"");
    }
}
