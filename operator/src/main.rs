//! `cloudpass-operator`: the controller (and, in later releases, the broker and OIDC
//! issuer) of cloudpass.
#![forbid(unsafe_code)]

use clap::{Parser, ValueEnum};
use cloudpass_operator::reconcile::{self, Settings};
use tracing::{error, info};

/// Reconciles cloudpass TrustProviders, CredentialProviders and AccessPolicies into status
/// and one compiled config ConfigMap per namespace.
#[derive(Parser, Debug)]
#[command(name = "cloudpass-operator", version)]
struct Args {
    /// Namespace the operator runs in; compiled configs are written there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudpass-system")]
    namespace: String,
    /// Name of this instance, reported on Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Namespaces reconciled concurrently.
    #[arg(long, env = "CLOUDPASS_CONCURRENCY", default_value_t = 4)]
    concurrency: u16,
    /// Log format.
    #[arg(long, env = "CLOUDPASS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Log filter (`info`, `debug`, `cloudpass_operator=debug,kube=warn`, ...).
    #[arg(long, env = "CLOUDPASS_LOG", default_value = "info")]
    log_level: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "no Kubernetes client configuration (in-cluster or KUBECONFIG)");
            return std::process::ExitCode::FAILURE;
        }
    };
    match reconcile::collect_orphaned_configs(&client, &args.namespace).await {
        Ok(n) if n > 0 => info!(deleted = n, "removed compiled configs of deleted namespaces"),
        Ok(_) => {}
        Err(e) => error!(error = %e, "could not collect orphaned configs"),
    }
    let settings =
        Settings { operator_namespace: args.namespace, instance: args.instance, concurrency: args.concurrency };
    info!(namespace = %settings.operator_namespace, "cloudpass-operator starting");
    if let Err(e) = reconcile::run(client, settings, |_| {}).await {
        error!(error = %e, "operator stopped");
        return std::process::ExitCode::FAILURE;
    }
    info!("cloudpass-operator stopped");
    std::process::ExitCode::SUCCESS
}
