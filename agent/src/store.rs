//! The credentials the agent holds, one slot per policy.
//!
//! Refreshers write; endpoints read. A credential is served while it is valid for at
//! least [`MIN_REMAINING`] more, whatever happened to the broker since: an unreachable
//! broker does not take away a credential that still works. Only an explicit refusal
//! (the broker's `Denied`) clears a slot early.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use cloudpass_api::broker::{Credential, CredentialResponse};
use jiff::Timestamp;

use crate::error::AgentError;

/// A credential is not handed out when it expires sooner than this: the SDK would get a
/// credential that dies in flight.
pub const MIN_REMAINING: Duration = Duration::from_secs(5);

/// A credential as fetched.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The credential (its secret parts never print).
    pub credential: Credential,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// When the broker suggested fetching the next one.
    pub refresh_at: Timestamp,
    /// When the agent received it.
    pub fetched_at: Timestamp,
}

impl Fetched {
    /// A credential from the broker's answer, received now.
    pub fn from_response(response: CredentialResponse) -> Self {
        Self {
            credential: response.credential,
            expires_at: response.expires_at,
            refresh_at: response.refresh_at,
            fetched_at: Timestamp::now(),
        }
    }

    /// Whether it may be handed out at `now`.
    pub fn is_valid_at(&self, now: Timestamp) -> bool {
        self.expires_at.duration_since(now).as_secs_f64() >= MIN_REMAINING.as_secs_f64()
    }

    /// Whole seconds left at `now` (0 when expired).
    pub fn seconds_left(&self, now: Timestamp) -> u64 {
        self.expires_at.duration_since(now).as_secs().max(0) as u64
    }
}

/// The type name of a credential, for messages and checks.
pub fn credential_type(credential: &Credential) -> &'static str {
    match credential {
        Credential::Aws { .. } => "aws",
        Credential::AccessToken { .. } => "accessToken",
        Credential::Jwt { .. } => "jwt",
        Credential::ApiKey { .. } => "apiKey",
        Credential::UsernamePassword { .. } => "usernamePassword",
    }
}

#[derive(Default)]
struct Slot {
    current: Option<Arc<Fetched>>,
    /// The last refresh failure, for the error an SDK gets once nothing valid is left.
    last_error: Option<String>,
}

/// The credentials of every delivery, by policy name.
pub struct CredentialStore {
    slots: RwLock<BTreeMap<String, Slot>>,
}

impl CredentialStore {
    /// An empty store for these policies.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(policies: I) -> Self {
        let slots = policies.into_iter().map(|p| (p.into(), Slot::default())).collect();
        Self { slots: RwLock::new(slots) }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding the lock cannot leave a slot half-written (each write is
        // one assignment), so a poisoned lock is still consistent.
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a fresh credential and forgets the last error.
    pub fn put(&self, policy: &str, fetched: Fetched) {
        let mut slots = self.write();
        let slot = slots.entry(policy.to_owned()).or_default();
        slot.current = Some(Arc::new(fetched));
        slot.last_error = None;
    }

    /// Records a failed refresh; the current credential stays.
    pub fn record_error(&self, policy: &str, error: &AgentError) {
        self.write().entry(policy.to_owned()).or_default().last_error = Some(error.to_string());
    }

    /// Drops the credential: the broker refused this pod.
    pub fn revoke(&self, policy: &str, error: &AgentError) {
        let mut slots = self.write();
        let slot = slots.entry(policy.to_owned()).or_default();
        slot.current = None;
        slot.last_error = Some(error.to_string());
    }

    /// The latest credential, valid or not (`None`: never fetched, or revoked).
    pub fn latest(&self, policy: &str) -> Option<Arc<Fetched>> {
        self.read().get(policy).and_then(|s| s.current.clone())
    }

    /// The credential if it may be handed out now, else why not.
    pub fn valid(&self, policy: &str) -> Result<Arc<Fetched>, AgentError> {
        let now = Timestamp::now();
        let slots = self.read();
        let slot = slots.get(policy);
        let current = slot.and_then(|s| s.current.as_ref());
        if let Some(fetched) = current.filter(|f| f.is_valid_at(now)) {
            return Ok(fetched.clone());
        }
        let last_error = slot.and_then(|s| s.last_error.as_deref());
        let reason = match (current, last_error) {
            (Some(f), Some(e)) => {
                format!("the last credential expired at {}; the last refresh failed: {e}", f.expires_at)
            }
            (Some(f), None) => format!("the last credential expired at {}", f.expires_at),
            (None, Some(e)) => e.to_owned(),
            (None, None) => "not fetched from the broker yet".to_owned(),
        };
        Err(AgentError::NoCredential { policy: policy.to_owned(), reason })
    }

    /// Policies without a credential that may be handed out now.
    pub fn not_ready(&self) -> Vec<String> {
        let now = Timestamp::now();
        self.read()
            .iter()
            .filter(|(_, s)| !s.current.as_ref().is_some_and(|f| f.is_valid_at(now)))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Every policy with its latest credential, for metrics.
    pub fn snapshot(&self) -> Vec<(String, Option<Arc<Fetched>>)> {
        self.read().iter().map(|(p, s)| (p.clone(), s.current.clone())).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use cloudpass_api::{broker::ErrorCode, secret::SecretString};
    use jiff::SignedDuration;

    use super::*;

    /// A credential valid for `secs` seconds from now (negative: expired).
    pub(crate) fn fetched(credential: Credential, secs: i64) -> Fetched {
        let now = Timestamp::now();
        Fetched {
            credential,
            expires_at: now + SignedDuration::from_secs(secs),
            refresh_at: now + SignedDuration::from_secs(secs * 4 / 5),
            fetched_at: now,
        }
    }

    pub(crate) fn api_key(key: &str) -> Credential {
        Credential::ApiKey { key: SecretString::new(key) }
    }

    #[test]
    fn valid_until_shortly_before_expiry_then_a_clear_error() {
        let store = CredentialStore::new(["p", "q"]);
        let err = store.valid("p").unwrap_err().to_string();
        assert_eq!(err, "no valid credential for policy p: not fetched from the broker yet");
        assert_eq!(store.not_ready(), ["p", "q"]);

        store.put("p", fetched(api_key("k"), 3600));
        assert!(store.valid("p").is_ok());
        assert_eq!(store.not_ready(), ["q"]);

        // The broker goes away: the credential stays while valid.
        let down = AgentError::BrokerUnreachable("connection refused".into());
        store.record_error("p", &down);
        assert!(store.valid("p").is_ok());

        // Expiring within MIN_REMAINING counts as gone; the error says why.
        store.put("p", fetched(api_key("k"), 3));
        store.record_error("p", &down);
        let err = store.valid("p").unwrap_err().to_string();
        assert!(err.contains("expired at") && err.contains("connection refused"), "{err}");
        assert!(store.latest("p").is_some(), "the expired credential is still known");
    }

    #[test]
    fn a_denial_revokes_at_once() {
        let store = CredentialStore::new(["p"]);
        store.put("p", fetched(api_key("k"), 3600));
        let denied = AgentError::Broker {
            status: 403,
            code: ErrorCode::Denied,
            message: "policy p does not select this pod".into(),
            upstream_code: None,
        };
        store.revoke("p", &denied);
        let err = store.valid("p").unwrap_err().to_string();
        assert!(err.contains("does not select this pod"), "{err}");
        assert!(store.latest("p").is_none());
    }

    #[test]
    fn errors_never_show_the_secret() {
        let store = CredentialStore::new(["p"]);
        store.put("p", fetched(api_key("sekrit-value"), -10));
        let shown = format!("{:?} {}", store.snapshot(), store.valid("p").unwrap_err());
        assert!(!shown.contains("sekrit"), "{shown}");
    }
}
