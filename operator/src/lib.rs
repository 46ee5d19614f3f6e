//! The cloudpass operator: reconciles TrustProviders, CredentialProviders and
//! AccessPolicies into `status` and a compiled config per namespace, which the webhook
//! and broker consume. The broker and the OIDC issuer are the crate `cloudpass-broker`;
//! the `cloudpass-operator` binary runs either or both.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod args;
pub mod broker_ca;
pub mod evaluate;
pub mod metrics;
pub mod reconcile;
pub mod secret_access;
pub mod server;
pub mod verify;

/// Everything that can fail in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A shared runtime step (publishing a CA bundle) failed other than in its API call.
    #[error("{0}")]
    Runtime(cloudpass_runtime::Error),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "api_status",
            Self::Kube(_) => "api_transport",
            Self::Runtime(e) => e.metric_label(),
        }
    }
}

impl From<cloudpass_runtime::Error> for Error {
    fn from(e: cloudpass_runtime::Error) -> Self {
        match e {
            cloudpass_runtime::Error::Kube(e) => Self::Kube(e),
            other => Self::Runtime(other),
        }
    }
}
