//! `cloudpass-operator`: the controller of cloudpass (the broker and OIDC issuer join it
//! in later releases). Every replica serves health and metrics; only the holder of the
//! leader Lease reconciles and writes.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
};

use clap::Parser;
use cloudpass_cli::{LogArgs, kube_client, termination};
use cloudpass_operator::{
    issuer,
    metrics::Metrics,
    reconcile::{self, Settings},
    server::{self, Health},
};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Reconciles cloudpass TrustProviders, CredentialProviders and AccessPolicies into status
/// and one compiled config ConfigMap per namespace.
#[derive(Parser, Debug)]
#[command(name = "cloudpass-operator", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Namespace the operator runs in; compiled configs and the leader Lease live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudpass-system")]
    namespace: String,
    /// Name of this instance: the leader-election identity and the reporter on Events.
    /// Default: the host name plus the process ID.
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`. Loopback by default; a pod
    /// exposes it with `--metrics-addr 0.0.0.0:8080`.
    #[arg(long, env = "CLOUDPASS_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader on a Lease so that only one replica reconciles. Turn it off only
    /// when exactly one replica runs.
    #[arg(long, env = "CLOUDPASS_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader-election Lease, in `--namespace`.
    #[arg(long, env = "CLOUDPASS_LEASE_NAME", default_value = "cloudpass-operator")]
    lease_name: String,
    /// Seconds a leader's lease is valid without renewal; a standby takes over at most
    /// this long after the leader stops renewing.
    #[arg(long, env = "CLOUDPASS_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_duration: u64,
    /// Seconds before expiry at which the leader renews its lease.
    #[arg(long, env = "CLOUDPASS_LEASE_RENEW_GRACE", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=299))]
    lease_renew_grace: u64,
    /// Namespaces reconciled concurrently.
    #[arg(long, env = "CLOUDPASS_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Write the OIDC issuer's discovery document and JWKS into a folder, for static
    /// hosting (a bucket or an Ingress), creating or rotating the signing keys as due.
    /// The files mirror the URL paths: `.well-known/openid-configuration` and
    /// `openid/v1/jwks`.
    ExportIssuer {
        /// Public issuer URL (https), the `iss` of every broker-signed token.
        #[arg(long, env = "CLOUDPASS_ISSUER_URL")]
        issuer_url: String,
        /// Folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// Secret (in `--namespace`) holding the signing keys.
        #[arg(long, env = "CLOUDPASS_ISSUER_KEYS_SECRET", default_value = "cloudpass-issuer-keys")]
        keys_secret: String,
    },
}

/// Runs `export-issuer`.
async fn export_issuer(
    client: &kube::Client,
    namespace: &str,
    issuer_url: &str,
    out: &Path,
    secret: &str,
) -> Result<(), String> {
    if !issuer_url.starts_with("https://") {
        return Err(format!("--issuer-url must be an https URL, got {issuer_url:?}"));
    }
    let keys = issuer::sync_keys(client, namespace, secret, &issuer::RotationPolicy::default())
        .await
        .map_err(|e| e.to_string())?;
    let write = |relative: &str, value: serde_json::Value| -> Result<(), String> {
        let path = out.join(relative.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().expect("a path with a parent"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(&path, serde_json::to_string_pretty(&value).expect("JSON serializes"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        info!(path = %path.display(), "written");
        Ok(())
    };
    write(issuer::DISCOVERY_PATH, issuer::discovery(issuer_url))?;
    write(issuer::JWKS_PATH, keys.jwks())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    args.log.init();
    if args.lease_renew_grace >= args.lease_duration {
        error!("--lease-renew-grace must be shorter than --lease-duration");
        return ExitCode::FAILURE;
    }
    let client = match kube_client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(Command::ExportIssuer { issuer_url, out, keys_secret }) = &args.command {
        return match export_issuer(&client, &args.namespace, issuer_url, out, keys_secret).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "export failed");
                ExitCode::FAILURE
            }
        };
    }
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    match server::spawn(args.metrics_addr, Health { metrics: metrics.clone(), ready: ready.clone() }).await {
        Ok(addr) => info!(%addr, "serving /healthz, /readyz and /metrics"),
        Err(e) => {
            error!(error = %e, addr = %args.metrics_addr, "cannot serve health and metrics");
            return ExitCode::FAILURE;
        }
    }

    // One shutdown signal for everything: SIGTERM/SIGINT, or the loss of leadership.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_on_signal = stop_tx.clone();
    tokio::spawn(async move {
        termination().await;
        let _ = stop_on_signal.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let instance = args.instance.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let mut lease = None;
    if args.leader_elect {
        let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.namespace)
            .with_identity(&instance)
            .with_duration(args.lease_duration)
            .with_grace(args.lease_renew_grace)
            .build()
            .await;
        let manager = match manager {
            Ok(m) => m,
            Err(e) => {
                error!(error = %e, lease = %args.lease_name, "cannot take part in leader election");
                return ExitCode::FAILURE;
            }
        };
        let (mut is_leader, task) = manager.watch().await;
        ready.store(true, Ordering::Relaxed);
        info!(identity = %instance, lease = %args.lease_name, "standing by for leadership");
        let became_leader = tokio::select! {
            _ = stopped(stop_rx.clone()) => false,
            result = is_leader.wait_for(|leader| *leader) => result.is_ok(),
        };
        if !became_leader {
            drop(is_leader);
            let _ = task.await;
            info!("cloudpass-operator stopped while standing by");
            return ExitCode::SUCCESS;
        }
        ready.store(false, Ordering::Relaxed);
        metrics.leader.set(1);
        info!(identity = %instance, "became leader; reconciling");
        // Losing the lease ends reconciling at once.
        let mut watch_leader = is_leader.clone();
        let lost = stop_tx.clone();
        tokio::spawn(async move {
            if watch_leader.wait_for(|leader| !*leader).await.is_ok() {
                warn!("lost leadership");
                let _ = lost.send(true);
            }
        });
        lease = Some((is_leader, task));
    }

    match reconcile::collect_orphaned_configs(&client, &args.namespace).await {
        Ok(n) if n > 0 => info!(deleted = n, "removed compiled configs of deleted namespaces"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not collect orphaned configs"),
    }
    let settings = Settings {
        operator_namespace: args.namespace.clone(),
        instance: Some(instance),
        concurrency: args.concurrency,
    };
    let warm = ready.clone();
    reconcile::run(client, settings, metrics.clone(), stopped(stop_rx), move || warm.store(true, Ordering::Relaxed))
        .await;

    metrics.leader.set(0);
    if let Some((is_leader, task)) = lease {
        let still_leader = *is_leader.borrow();
        // Dropping the receiver makes the lease task release the lease: a standby takes
        // over at once instead of after the lease expires.
        drop(is_leader);
        let _ = task.await;
        if !still_leader {
            error!("stopped because leadership was lost; exiting so a fresh instance can stand by");
            return ExitCode::FAILURE;
        }
    }
    info!("cloudpass-operator stopped");
    ExitCode::SUCCESS
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "cloudpass".into())
}
