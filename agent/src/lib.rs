//! The cloudpass agent: the container the webhook injects into every selected pod.
//!
//! It authenticates to the broker with the pod's projected service-account token,
//! fetches the credential of each delivery the webhook configured, refreshes it before
//! expiry, and hands it to the app only on 127.0.0.1, through the endpoints the official
//! SDKs already speak: AWS container credentials ([`aws`]), Azure App Service managed
//! identity ([`azure`]), the GCP metadata server ([`gcp`]), and an HTTP proxy that adds a
//! header or an AWS SigV4 signature ([`proxy`]). Every endpoint requires its SDK's proof
//! and refuses relayed requests (`Forwarded`, `X-Forwarded-For` and their kin, see
//! [`common::FORWARDING_HEADERS`]). Trust providers that need proof from the cloud the
//! pod runs in get it from [`evidence`].
//!
//! In process (tests), [`Agent::start`] runs an agent and reports its addresses;
//! [`run`] runs one until a future completes. Flags and environment are in [`settings`];
//! `docs/agent.md` describes the endpoints, security rules and metrics.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod aws;
pub mod azure;
pub mod broker_client;
pub mod common;
pub mod endpoint;
pub mod error;
pub mod evidence;
pub mod file;
pub mod gcp;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod settings;
pub mod store;

pub use endpoint::EndpointKind;
pub use error::AgentError;
pub use server::{Agent, run};
pub use settings::Settings;
