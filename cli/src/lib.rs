//! What every cloudpass binary shares on the command line: the logging flags and their
//! setup, the termination signals, and the Kubernetes client.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use tracing::{error, info};

/// Logging flags, flattened into each binary's arguments.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "CLOUDPASS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `cloudpass_operator=debug,kube=warn`, ...).
    #[arg(long, env = "CLOUDPASS_LOG", default_value = "info")]
    pub log_level: String,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

impl LogArgs {
    /// Installs the global subscriber; an invalid filter falls back to `info` with a
    /// warning rather than failing the process.
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log_level);
        let invalid = filter.is_err();
        let filter = filter.unwrap_or_else(|_| "info".into());
        match self.log_format {
            LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
            LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        }
        if invalid {
            tracing::warn!(filter = %self.log_level, "invalid --log-level; using info");
        }
    }
}

/// The Kubernetes client from the in-cluster configuration or `KUBECONFIG`, or the exit
/// code to stop with after logging why.
pub async fn kube_client() -> Result<kube::Client, ExitCode> {
    kube::Client::try_default().await.map_err(|e| {
        error!(error = %e, "no Kubernetes client configuration (in-cluster or KUBECONFIG)");
        ExitCode::FAILURE
    })
}

/// For servers behind a Service: completes on SIGTERM or SIGINT after setting `stopping`
/// (which readiness reports, so that endpoints drop this replica), with the instant
/// `delay` later until which the caller keeps serving. Requests routed here before
/// every node has dropped the endpoint still get an answer.
pub async fn termination_deadline(
    stopping: &std::sync::atomic::AtomicBool,
    delay: std::time::Duration,
) -> tokio::time::Instant {
    termination().await;
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    info!(delay_seconds = delay.as_secs_f64(), "not ready any more; serving until the shutdown delay is over");
    tokio::time::Instant::now() + delay
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received; shutting down"),
    }
}
