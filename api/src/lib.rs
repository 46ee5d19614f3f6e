//! The cloudpass API: the three custom resources users write (`TrustProvider`,
//! `CredentialProvider`, `AccessPolicy`, group `cloudpass.dev`, version `v1alpha1`), the
//! compiled per-namespace config document the operator hands to the webhook and broker,
//! and the wire types spoken between the injected agent and the broker.
//!
//! Everything a user can get wrong without looking at other objects is refused by the
//! generated OpenAPI schema and its CEL rules at admission; what needs other objects
//! (references, Secrets, time zones, conflicts) is reported by the operator in
//! `status.conditions`. Design notes live in `docs/api.md`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
pub mod broker;
pub mod cloud_trust;
pub mod common;
pub mod config;
pub mod crd;
pub mod credential;
pub mod duration;
pub mod endpoint;
pub mod fit;
pub mod jwt;
pub mod policy;
pub mod secret;
pub mod secret_store;
pub mod selector;
pub mod trust;

pub use common::{LocalObjectReference, SecretKeyRef, Status};
pub use credential::{CredentialProvider, CredentialProviderSpec};
pub use policy::{AccessPolicy, AccessPolicySpec};
pub use trust::{TrustProvider, TrustProviderSpec};

/// API group of every cloudpass resource.
pub const GROUP: &str = "cloudpass.dev";
/// API version of every cloudpass resource.
pub const VERSION: &str = "v1alpha1";

/// Label a namespace carries to opt its pods into injection (`enabled`).
pub const INJECTION_LABEL: &str = "cloudpass.dev/injection";
/// Value of [`INJECTION_LABEL`] that opts a namespace in.
pub const INJECTION_ENABLED: &str = "enabled";
/// Pod annotation forcing (`"true"`) or refusing (`"false"`) injection.
pub const INJECT_ANNOTATION: &str = "cloudpass.dev/inject";
/// CredentialProvider annotation asking for a verification now (any new value, e.g. a
/// timestamp), as `kubectl cloudpass verify` sets it.
pub const VERIFY_REQUESTED_ANNOTATION: &str = "cloudpass.dev/verify-requested-at";
/// Label on the operator's compiled-config ConfigMaps, valued with the source namespace.
pub const CONFIG_NAMESPACE_LABEL: &str = "cloudpass.dev/config-for";
/// Annotation on a compiled-config ConfigMap holding the document's content hash.
pub const CONFIG_HASH_ANNOTATION: &str = "cloudpass.dev/config-hash";
/// Key inside the compiled-config ConfigMap that holds the JSON document.
pub const CONFIG_DATA_KEY: &str = "config.json";
/// Audience of the projected service-account token the agent presents to the broker.
pub const BROKER_AUDIENCE: &str = "cloudpass";
