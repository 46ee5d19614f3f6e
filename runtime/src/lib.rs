//! What the cloudpass operator (broker) and webhook share at run time: the watcher of the
//! operator's compiled configs, and HTTPS serving with a certificate that can be replaced
//! while serving.
#![forbid(unsafe_code)]

pub mod configs;
pub mod tls;

/// Why a certificate could not be installed or a listener started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
            Self::Certificate(_) => "certificate",
            Self::Io(_) => "io",
        }
    }
}
