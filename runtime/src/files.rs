//! A small text file (a CA bundle) re-read when it changes, keeping the last good content.
//!
//! Kubernetes updates a mounted ConfigMap or Secret by swapping a symlink, so a change is
//! seen as a new inode, modification time or size. Checking those is one `stat` per
//! interval; the file is read only when they changed.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use tracing::{info, warn};

/// The current content of a watched file (or fixed text).
#[derive(Debug)]
pub struct WatchedText {
    current: RwLock<Arc<str>>,
    loaded: AtomicBool,
}

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    modified: Option<SystemTime>,
    len: u64,
}

impl WatchedText {
    /// Fixed text that never changes (no file configured, tests); counts as loaded.
    pub fn fixed(text: impl Into<Arc<str>>) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(text.into()), loaded: AtomicBool::new(true) })
    }

    /// The current content; empty until the file was first read successfully.
    pub fn get(&self) -> Arc<str> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether good content has been read (always, for fixed text).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Reads `path` now and then checks it every `interval`, re-reading it when its
    /// inode, modification time or size changed. Content that `validate` refuses, and a
    /// missing file, are logged (once per distinct problem) and the last good content is
    /// kept: a half-written or deleted file never replaces a good one. `what` names the
    /// file in logs. Needs a Tokio runtime.
    pub fn watch(
        path: PathBuf,
        interval: Duration,
        what: &'static str,
        validate: fn(&str) -> Result<(), String>,
    ) -> Arc<Self> {
        let text = Arc::new(Self { current: RwLock::new("".into()), loaded: AtomicBool::new(false) });
        let mut state = PollState::default();
        text.poll(&path, what, validate, &mut state);
        let watched = text.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                watched.poll(&path, what, validate, &mut state);
            }
        });
        text
    }

    fn poll(&self, path: &PathBuf, what: &str, validate: fn(&str) -> Result<(), String>, state: &mut PollState) {
        let result = std::fs::metadata(path)
            .map(|m| Stamp { inode: m.ino(), modified: m.modified().ok(), len: m.len() })
            .map_err(|e| e.to_string())
            .and_then(|stamp| {
                if state.stamp == Some(stamp) {
                    return Ok(None);
                }
                let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
                validate(&text)?;
                Ok(Some((stamp, text)))
            });
        match result {
            Ok(None) => {}
            Ok(Some((stamp, text))) => {
                state.stamp = Some(stamp);
                state.problem = None;
                if *self.get() != *text {
                    let first = !self.is_loaded();
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = text.into();
                    self.loaded.store(true, Ordering::Relaxed);
                    if first {
                        info!(path = %path.display(), what, "loaded");
                    } else {
                        info!(path = %path.display(), what, "changed; using the new content");
                    }
                }
            }
            Err(problem) => {
                // Retry the read next time even if the stamp stays the same.
                state.stamp = None;
                if state.problem.as_deref() != Some(problem.as_str()) {
                    if self.is_loaded() {
                        warn!(path = %path.display(), what, error = %problem, "unreadable; keeping the last good content");
                    } else {
                        warn!(path = %path.display(), what, error = %problem, "not readable yet");
                    }
                    state.problem = Some(problem);
                }
            }
        }
    }
}

#[derive(Default)]
struct PollState {
    stamp: Option<Stamp>,
    problem: Option<String>,
}

/// Accepts PEM text holding at least one certificate and nothing unparsable.
pub fn validate_pem_certificates(text: &str) -> Result<(), String> {
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().self_signed(&key).unwrap().pem()
    }

    async fn eventually(check: impl Fn() -> bool) {
        for _ in 0..100 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test]
    async fn appears_changes_and_keeps_the_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        let watched = WatchedText::watch(path.clone(), Duration::from_millis(20), "test CA", validate_pem_certificates);
        assert!(!watched.is_loaded() && watched.get().is_empty(), "a missing file is not loaded");

        std::fs::write(&path, "not a certificate").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!watched.is_loaded(), "invalid content is refused");

        let first = cert("one.example");
        std::fs::write(&path, &first).unwrap();
        eventually(|| *watched.get() == *first).await;
        assert!(watched.is_loaded());

        // Replaced the way the kubelet does it: a new file renamed over the old one.
        let second = format!("{}{first}", cert("two.example"));
        std::fs::write(dir.path().join("new"), &second).unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        eventually(|| *watched.get() == *second).await;

        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*watched.get(), *second, "a broken file never replaces good content");
    }

    #[test]
    fn fixed_text_is_loaded() {
        let fixed = WatchedText::fixed("pem");
        assert!(fixed.is_loaded());
        assert_eq!(&*fixed.get(), "pem");
        assert!(validate_pem_certificates("").is_err());
    }
}
