//! The credentials the agent holds, one slot per policy.
//!
//! Refreshers write; endpoints read. A credential is served while it is valid for at
//! least [`MIN_REMAINING`] more and the broker's `serveUntil` (the end of the policy's
//! time window) has not passed, whatever happened to the broker since: an unreachable
//! broker does not take away a credential that still works, nor keep one alive past
//! its window. Only an explicit refusal (the broker's `Denied`) clears a slot early.

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

/// A credential as fetched from the broker, with the times that decide when it is
/// served and refreshed.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The credential (its secret parts never print).
    pub credential: Credential,
    /// When it stops working upstream (the broker's `expiresAt`).
    pub expires_at: Timestamp,
    /// When the agent stops handing it out: the broker's `serveUntil` (the end of the
    /// policy's time window) if earlier than `expires_at`, else `expires_at`. This is the
    /// expiry the SDKs are told, so that they stop using it then too.
    pub serve_until: Timestamp,
    /// When the broker suggested fetching the next one.
    pub refresh_at: Timestamp,
    /// When the agent received it.
    pub fetched_at: Timestamp,
}

impl Fetched {
    /// A credential from the broker's answer, received now.
    pub fn from_response(response: CredentialResponse) -> Self {
        let serve_until = response.serve_until.map_or(response.expires_at, |until| until.min(response.expires_at));
        Self {
            credential: response.credential,
            expires_at: response.expires_at,
            serve_until,
            refresh_at: response.refresh_at,
            fetched_at: Timestamp::now(),
        }
    }

    /// Whether it may be handed out at `now`: before `serve_until`, and not within
    /// [`MIN_REMAINING`] of its expiry.
    pub fn is_valid_at(&self, now: Timestamp) -> bool {
        now < self.serve_until && self.expires_at.duration_since(now).as_secs_f64() >= MIN_REMAINING.as_secs_f64()
    }

    /// The first moment it may no longer be handed out.
    pub fn unservable_from(&self) -> Timestamp {
        let margin = jiff::SignedDuration::try_from(MIN_REMAINING).unwrap_or(jiff::SignedDuration::ZERO);
        self.serve_until.min(self.expires_at.checked_sub(margin).unwrap_or(self.expires_at))
    }

    /// Whether it is held back by the policy's time window rather than by its expiry.
    pub fn ends_with_window(&self) -> bool {
        self.serve_until < self.expires_at
    }

    /// Whole seconds left at `now` until `serve_until` (0 when past): the lifetime the
    /// SDKs are told.
    pub fn seconds_left(&self, now: Timestamp) -> u64 {
        self.serve_until.duration_since(now).as_secs().max(0) as u64
    }

    /// Why it may no longer be handed out, for errors.
    fn why_not(&self) -> String {
        if self.ends_with_window() {
            format!(
                "the last credential was to be served only until {} (the end of the policy's time window)",
                self.serve_until
            )
        } else {
            format!("the last credential expired at {}", self.expires_at)
        }
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
            (Some(f), Some(e)) => format!("{}; the last refresh failed: {e}", f.why_not()),
            (Some(f), None) => f.why_not(),
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
            serve_until: now + SignedDuration::from_secs(secs),
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
    fn the_time_window_ends_serving_before_expiry() {
        let now = Timestamp::now();
        let secs = |s: i64| now + SignedDuration::from_secs(s);
        let response = |serve_until| CredentialResponse {
            policy: "p".into(),
            credential: api_key("k"),
            expires_at: secs(3600),
            refresh_at: secs(2700),
            serve_until,
        };
        let f = Fetched::from_response(response(Some(secs(60))));
        assert_eq!(f.serve_until, secs(60));
        assert!(f.ends_with_window());
        assert!(f.is_valid_at(secs(59)));
        assert!(!f.is_valid_at(secs(60)), "never served at or after serveUntil");
        assert_eq!(f.unservable_from(), secs(60));
        assert_eq!(f.seconds_left(now), 60, "the SDK is told the window's end");

        // Without serveUntil, or with one after expiry: the expiry decides.
        for serve_until in [None, Some(secs(7200))] {
            let f = Fetched::from_response(response(serve_until));
            assert_eq!(f.serve_until, f.expires_at);
            assert!(!f.ends_with_window());
            assert_eq!(f.unservable_from(), secs(3600 - MIN_REMAINING.as_secs() as i64));
        }

        // Past the window the store refuses it and says why.
        let store = CredentialStore::new(["p"]);
        let mut ended = Fetched::from_response(response(Some(secs(-1))));
        ended.fetched_at = secs(-10);
        store.put("p", ended);
        let err = store.valid("p").unwrap_err().to_string();
        assert!(err.contains("served only until") && err.contains("time window"), "{err}");
        assert_eq!(store.not_ready(), ["p"]);
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
