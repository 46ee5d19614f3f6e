//! The cloudpass mutating admission webhook: decides from the operator's compiled config
//! which pods get the credential agent, injects it, and manages its own serving
//! certificate.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admission;
pub mod inject;
pub mod metrics;
pub mod server;

// The self-managed certificate, config watcher, watched files and TLS serving are shared
// with the operator's broker; re-exported under the names this crate always used.
pub use cloudpass_runtime::{Error, certs, configs as config, files, tls};

/// Fills `buf` from the workspace's one crypto library (aws-lc-rs).
pub fn random_bytes(buf: &mut [u8]) {
    rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(buf).expect("the system random source works");
}

/// A random value for a per-pod proof (hex, 32 bytes of entropy).
pub fn random_proof() -> String {
    let mut buf = [0u8; 32];
    random_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
