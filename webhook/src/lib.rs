//! The cloudpass mutating admission webhook: decides from the operator's compiled config
//! which pods get the credential agent, injects it, and manages its own serving
//! certificate.
#![forbid(unsafe_code)]

pub mod admission;
pub mod certs;
pub mod inject;
pub mod metrics;
pub mod server;

pub use cloudpass_runtime::{configs as config, tls};

/// Everything that can fail in the webhook outside a single admission request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A file could not be read or a socket bound.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The serving certificate could not be installed or the listener started.
    #[error(transparent)]
    Serving(#[from] cloudpass_runtime::Error),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Certificate(_) => "certificate",
            Self::Io(_) => "io",
            Self::Serving(e) => e.metric_label(),
        }
    }
}

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
