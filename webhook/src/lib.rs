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
// with the operator's broker.
pub use cloudpass_runtime::{Error, certs, configs, files, tls};
