//! The credential cache: one slot per (namespace, policy, credential provider, subject),
//! so that agents asking again before a credential nears its expiry cost no upstream
//! call, and agents asking at the same time share one upstream call (the first caller
//! fetches; the others wait for it and take its answer). The entries live in a bounded
//! moka cache that expires each one when it stops being served.
//!
//! A credential is served from the cache until a refresh margin (a quarter of its
//! lifetime) before it expires; the broker tells the agent to refresh at that moment, so
//! the agent's next request finds the slot stale and gets a fresh credential. Upstream
//! failures are kept only briefly ([`CredentialCache::new`]'s `error_ttl`), so a broken
//! upstream is not hammered by every agent but recovers within seconds.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use cloudpass_api::broker::Credential;
use moka::{Expiry, future::Cache, ops::compute::Op};

use crate::Refusal;

/// A credential with its lifetime.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The credential as handed to the agent.
    pub credential: Credential,
    /// When it was obtained: with `expires_at`, its lifetime, a quarter of which
    /// [`Issued::refresh_at`] leaves before expiry.
    pub issued_at: jiff::Timestamp,
    /// When it stops working (or stops being served, under `maxCredentialLifetime`).
    pub expires_at: jiff::Timestamp,
    /// When the policy's time window closes, if that is before `expires_at`: the agent
    /// stops serving it then, and the cache too.
    pub serve_until: Option<jiff::Timestamp>,
    /// For a secret read from a cloud's store: which secret and version it is (never the
    /// value), for the audit record.
    pub source: Option<String>,
}

impl Issued {
    /// When the agent should fetch a new one, and until when the cache serves it: a
    /// quarter of the lifetime before expiry, and at the latest when its time window
    /// closes.
    pub fn refresh_at(&self) -> jiff::Timestamp {
        let lifetime = self.expires_at.as_millisecond().saturating_sub(self.issued_at.as_millisecond());
        let at = self.expires_at.as_millisecond().saturating_sub(lifetime.max(0) / 4);
        let at = jiff::Timestamp::from_millisecond(at).unwrap_or(self.expires_at);
        self.serve_until.map_or(at, |until| at.min(until))
    }

    /// Until when it may be served at all.
    pub fn usable_until(&self) -> jiff::Timestamp {
        self.serve_until.map_or(self.expires_at, |until| until.min(self.expires_at))
    }
}

/// How a lookup was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// From the cache: a credential still before its `refresh_at`, or a remembered
    /// upstream failure within the error TTL.
    Hit,
    /// By an upstream call this request made.
    Miss,
    /// By an upstream call another request made while this one waited.
    Coalesced,
}

impl Lookup {
    /// The label of the `credential` cache metric and of the audit record's `cache`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
        }
    }
}

/// What the cache holds for one key.
#[derive(Clone)]
enum Entry {
    /// A credential, served until its [`Issued::refresh_at`].
    Ready(Arc<Issued>),
    /// An upstream failure, served until the instant (the error TTL after it happened).
    Failed(Refusal, Instant),
}

impl Entry {
    /// What the entry answers now, or `None` once it must not be served. Moka expires
    /// entries at the same moments ([`ExpireWhenStale`]); this keeps the rule exact
    /// whatever its timer's granularity.
    fn served(&self) -> Option<Result<Arc<Issued>, Refusal>> {
        match self {
            Self::Ready(issued) if jiff::Timestamp::now() < issued.refresh_at() => Some(Ok(issued.clone())),
            Self::Failed(refusal, until) if Instant::now() < *until => Some(Err(refusal.clone())),
            _ => None,
        }
    }
}

/// Expires an entry when it stops being served: a credential at its
/// [`Issued::refresh_at`], a failure at the end of its error TTL.
struct ExpireWhenStale;

impl ExpireWhenStale {
    fn remaining(entry: &Entry) -> Duration {
        match entry {
            Entry::Ready(issued) => {
                let left = issued.refresh_at().duration_since(jiff::Timestamp::now());
                if left.is_positive() { left.unsigned_abs() } else { Duration::ZERO }
            }
            Entry::Failed(_, until) => until.saturating_duration_since(Instant::now()),
        }
    }
}

impl Expiry<String, Entry> for ExpireWhenStale {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _created_at: Instant) -> Option<Duration> {
        Some(Self::remaining(entry))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(Self::remaining(entry))
    }
}

/// Entries kept at most; beyond it moka evicts the least likely to be asked for again.
const MAX_ENTRIES: u64 = 100_000;

/// The credential cache: one entry per key, served until [`Issued::refresh_at`]; one
/// upstream call per key at a time (other requests wait for it and take its answer);
/// upstream failures remembered for the error TTL, other refusals not at all. At most
/// [`MAX_ENTRIES`] entries.
pub struct CredentialCache {
    entries: Cache<String, Entry>,
    error_ttl: Duration,
}

impl CredentialCache {
    /// A cache keeping upstream failures for `error_ttl`.
    pub fn new(error_ttl: Duration) -> Self {
        let entries = Cache::builder().max_capacity(MAX_ENTRIES).expire_after(ExpireWhenStale).build();
        Self { entries, error_ttl }
    }

    /// The credential of `key`: cached, or fetched by `fetch` (once for all concurrent
    /// callers of the same key).
    pub async fn get<F, Fut>(&self, key: &str, fetch: F) -> (Result<Arc<Issued>, Refusal>, Lookup)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Issued, Refusal>>,
    {
        if let Some(served) = self.entries.get(key).await.and_then(|e| e.served()) {
            return (served, Lookup::Hit);
        }
        // Callers of one key queue here; each finds what the one before it stored.
        let mut outcome = None;
        let slot = &mut outcome;
        self.entries
            .entry_by_ref(key)
            .and_compute_with(|current| async move {
                if let Some(served) = current.as_ref().and_then(|e| e.value().served()) {
                    *slot = Some((served, Lookup::Coalesced));
                    return Op::Nop;
                }
                let result = fetch().await.map(Arc::new);
                let op = match &result {
                    Ok(issued) => Op::Put(Entry::Ready(issued.clone())),
                    // Only upstream trouble is worth remembering; a Secret fixed a second
                    // later or a denial must not stick.
                    Err(refusal) if refusal.is_upstream() => {
                        Op::Put(Entry::Failed(refusal.clone(), Instant::now() + self.error_ttl))
                    }
                    Err(_) if current.is_some() => Op::Remove,
                    Err(_) => Op::Nop,
                };
                *slot = Some((result, Lookup::Miss));
                op
            })
            .await;
        outcome.expect("and_compute_with runs its closure once")
    }

    /// Drops entries that can no longer be served now, instead of when moka's own
    /// housekeeping next runs (it also runs as the cache is used). Needs a Tokio runtime;
    /// without one it does nothing.
    pub fn sweep(&self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let entries = self.entries.clone();
            runtime.spawn(async move { entries.run_pending_tasks().await });
        }
    }

    /// Number of entries that can still be served (an O(n) scan, for tests and
    /// diagnostics).
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|(_, e)| e.served().is_some()).count()
    }

    /// Whether no entry can be served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use cloudpass_api::secret::SecretString;

    use super::*;

    fn issued(lifetime_s: i64) -> Issued {
        let now = jiff::Timestamp::now();
        Issued {
            credential: Credential::ApiKey { key: SecretString::new("k") },
            issued_at: now,
            expires_at: now + jiff::SignedDuration::from_secs(lifetime_s),
            serve_until: None,
            source: None,
        }
    }

    #[tokio::test]
    async fn hits_coalesces_and_forgets_failures() {
        let cache = Arc::new(CredentialCache::new(Duration::from_millis(200)));
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = |calls: Arc<AtomicUsize>, lifetime| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(issued(lifetime))
        };
        // Ten concurrent requests: one upstream call.
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move { cache.get("k", || fetch(calls, 3600)).await.1 })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == Lookup::Miss).count(), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == Lookup::Coalesced).count(), 9);
        assert_eq!(cache.get("k", || fetch(calls.clone(), 3600)).await.1, Lookup::Hit);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // A credential inside its refresh margin is fetched again.
        let (_, l) = cache.get("short", || fetch(calls.clone(), 0)).await;
        assert_eq!(l, Lookup::Miss);
        let (_, l) = cache.get("short", || fetch(calls.clone(), 0)).await;
        assert_eq!(l, Lookup::Miss);

        // Upstream failures are remembered briefly; denials are not.
        let fail = || async { Err(Refusal::upstream("STS 500", Some("InternalFailure".into()))) };
        assert_eq!(cache.get("f", fail).await.1, Lookup::Miss);
        let (r, l) = cache.get("f", || fetch(calls.clone(), 3600)).await;
        assert_eq!((r.is_err(), l), (true, Lookup::Hit));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (r, l) = cache.get("f", || fetch(calls.clone(), 3600)).await;
        assert_eq!((r.is_ok(), l), (true, Lookup::Miss));
        let deny = || async { Err(Refusal::denied("Secret missing")) };
        assert_eq!(cache.get("d", deny).await.1, Lookup::Miss);
        assert_eq!(cache.get("d", || fetch(calls.clone(), 3600)).await.1, Lookup::Miss);

        cache.sweep();
        assert_eq!(cache.len(), 3, "expired and empty slots are swept: {}", cache.len());
    }

    #[test]
    fn refresh_is_a_quarter_before_expiry() {
        let i = issued(3600);
        let margin = i.expires_at.as_second() - i.refresh_at().as_second();
        assert!((899..=901).contains(&margin), "{margin}");
    }

    #[tokio::test]
    async fn nothing_is_served_past_the_end_of_its_window() {
        // A one-hour credential obtained a second before its time window closes: it is
        // refreshed (and served from the cache) no later than the close.
        let mut i = issued(3600);
        let close = i.issued_at + jiff::SignedDuration::from_secs(1);
        i.serve_until = Some(close);
        assert_eq!(i.refresh_at(), close);
        assert_eq!(i.usable_until(), close);
        let cache = CredentialCache::new(Duration::from_secs(5));
        let window = i.clone();
        assert_eq!(cache.get("w", || async { Ok(window) }).await.1, Lookup::Miss);
        let window = i.clone();
        assert_eq!(cache.get("w", || async { Ok(window) }).await.1, Lookup::Hit);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (again, lookup) = cache.get("w", || async { Ok(issued(3600)) }).await;
        assert_eq!(lookup, Lookup::Miss, "the window's credential is not served after the window");
        assert_eq!(again.unwrap().serve_until, None);
        // Swept once unusable, even though it has not expired.
        let cache = CredentialCache::new(Duration::from_secs(5));
        let mut past = issued(3600);
        past.serve_until = Some(past.issued_at - jiff::SignedDuration::from_secs(1));
        let _ = cache.get("p", || async { Ok(past) }).await;
        cache.sweep();
        assert!(cache.is_empty());
    }
}
