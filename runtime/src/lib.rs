//! What the cloudpass operator (broker) and webhook share at run time: the watcher of the
//! operator's compiled configs, HTTPS serving with a certificate that can be replaced
//! while serving, the self-managed CA and serving certificate, and files re-read when
//! they change.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod certs;
pub mod configs;
pub mod files;
pub mod tls;

/// Why a certificate could not be created, published or installed, or a listener started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Certificate or key parsing failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A socket could not be bound.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Certificate(_) => "certificate",
            Self::Io(_) => "io",
        }
    }
}
