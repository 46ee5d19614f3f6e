//! `cloudpass-operator`: the controller, broker and OIDC issuer of cloudpass. With
//! `--components all` (the default) every replica serves the broker, health and metrics
//! and only the holder of the leader Lease reconciles and writes; the chart runs the
//! controller and the broker as two Deployments under two service accounts
//! (`--components controller`, `--components broker`), so that the process that parses
//! agents' input holds only the rights the broker needs.
#![forbid(unsafe_code)]

use std::{
    path::Path,
    process::ExitCode,
    sync::{Arc, RwLock, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use clap::Parser;
use cloudpass_broker::{
    Broker, BrokerSettings,
    audit::Audit,
    egress::{Egress, EgressPolicy},
    issuer, server as broker_server,
};
use cloudpass_cli::{kube_client, termination_deadline};
use cloudpass_operator::{
    args::{Args, BrokerCertMode, Command, Components, broker_cert_mode, server_ids},
    metrics::Metrics,
    reconcile::{self, Settings},
    secret_access::BrokerSecretAccess,
    server::{self, Health},
    verify::VerifySettings,
};
use cloudpass_runtime::{
    certs::{self, CertManager, CertSettings},
    configs::{self, Configs},
    files::{WatchedText, validate_pem_certificates},
    tls::{self, ReloadableCert, ServerLimits},
};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Lifetime of the self-managed broker CA (five years); rotated when a third is left.
const BROKER_CA_VALIDITY: Duration = Duration::from_secs(43_800 * 3600);
/// Lifetime of a self-managed broker serving certificate (90 days); renewed when a
/// third is left.
const BROKER_CERT_VALIDITY: Duration = Duration::from_secs(2_160 * 3600);
/// How often certificate files are re-read (`files` mode).
const BROKER_CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often the self-managed certificate is checked for rotation (as the webhook's).
const BROKER_CERT_SYNC_INTERVAL: Duration = Duration::from_secs(60);

/// The running broker and its serving certificate (for readiness).
type RunningBroker = (Arc<Broker>, Arc<ReloadableCert>);

/// The HTTP client for the destinations providers name, under the egress policy: the
/// broker's, and the controller's verification probes.
fn upstream_client(args: &Args) -> Result<Egress, String> {
    let mut http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("cloudpass-broker/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &args.upstream_ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
        http = http.tls_certs_merge(certs);
    }
    let egress =
        EgressPolicy { allow_private: args.allow_private_upstreams, cluster_cidrs: args.cluster_cidrs.clone() };
    Egress::new(http, egress).map_err(|e| e.to_string())
}

/// The controller's verification settings: `None` when `--verify-interval` is `0s` or
/// there is no `--issuer-url` to sign probes for.
fn verify_settings(args: &Args) -> Result<Option<VerifySettings>, String> {
    let interval = args.verify_interval.as_std();
    let Some(issuer_url) = args.broker_issuer_url.clone().filter(|_| !interval.is_zero()) else {
        info!("verification of CredentialProviders off: --verify-interval 0s or no --issuer-url");
        return Ok(None);
    };
    Ok(Some(VerifySettings {
        interval,
        issuer_url,
        keys_namespace: args.namespace.clone(),
        keys_secret: args.broker_keys_secret.clone(),
        http: upstream_client(args)?,
    }))
}

/// Starts the broker when configured; `Ok(None)` when it is off.
async fn start_broker(
    client: &kube::Client,
    args: &Args,
    metrics: &Arc<Metrics>,
) -> Result<Option<RunningBroker>, String> {
    if !args.components.broker() {
        info!("broker off: --components controller");
        return Ok(None);
    }
    if args.broker_issuer_url.is_none() && args.broker_tls_cert_file.is_none() && args.broker_cert_mode.is_none() {
        if args.components == Components::Broker {
            return Err("--components broker needs --issuer-url".into());
        }
        info!("broker off: no --issuer-url");
        return Ok(None);
    }
    let mode = broker_cert_mode(args)?;
    let issuer_url = args.broker_issuer_url.clone().ok_or("the broker needs --issuer-url")?;
    if !issuer_url.starts_with("https://") {
        return Err(format!("--issuer-url must be an https URL, got {issuer_url:?}"));
    }
    let http = upstream_client(args)?;
    if args.allow_private_upstreams {
        warn!("--allow-private-upstreams: the broker calls loopback and private addresses that providers name");
    }
    let audit = Audit::open(&args.audit_log).map_err(|e| format!("--audit-log {}: {e}", args.audit_log))?;
    let configs = Arc::new(Configs::default());
    tokio::spawn(configs::watch(client.clone(), args.namespace.clone(), configs.clone()));
    tokio::spawn(configs::watch_withdrawals(client.clone(), configs.clone()));
    let keys = Arc::new(RwLock::new(None));
    tokio::spawn(keep_keys(client.clone(), args.namespace.clone(), args.broker_keys_secret.clone(), keys.clone()));
    let server_ids = server_ids(args, &issuer_url)?;
    info!(server_ids = ?server_ids, "awsRole evidence must be signed for one of these server IDs");
    let settings =
        BrokerSettings { issuer_url, token_cache_ttl: args.token_cache_ttl.as_std(), server_ids, ..Default::default() };
    let broker = Arc::new(Broker::new(settings, client.clone(), http, configs, keys, audit, metrics.broker.clone()));
    let cert = Arc::new(ReloadableCert::default());
    start_broker_cert(client, args, mode, &cert, metrics).await;
    let limits = ServerLimits {
        handshake_timeout: args.broker_handshake_timeout.as_std(),
        header_read_timeout: args.broker_header_read_timeout.as_std(),
        idle_timeout: args.broker_idle_timeout.as_std(),
        request_timeout: args.broker_request_timeout.as_std(),
        max_connections: args.broker_max_connections as usize,
    };
    let router = broker_server::router(broker.clone());
    let addr = tls::serve(args.broker_addr, router, cert.clone(), Default::default(), limits)
        .await
        .map_err(|e| format!("cannot serve the broker on {}: {e}", args.broker_addr))?;
    info!(%addr, "broker serving");
    if let Some(issuer_addr) = args.issuer_addr {
        let router = broker_server::issuer_router(broker.clone());
        tls::serve_plain(issuer_addr, router, Default::default(), limits)
            .await
            .map_err(|e| format!("--issuer-addr {issuer_addr}: {e}"))?;
        info!(addr = %issuer_addr, "serving the issuer's documents over plain HTTP");
    }
    let sweeper = broker.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            sweeper.sweep();
        }
    });
    Ok(Some((broker, cert)))
}

/// Keeps the broker's serving certificate in `cert` and its CA bundle published.
async fn start_broker_cert(
    client: &kube::Client,
    args: &Args,
    mode: BrokerCertMode,
    cert: &Arc<ReloadableCert>,
    metrics: &Arc<Metrics>,
) {
    let reloads = metrics.broker_cert_reloads.clone();
    let on_reload = move || {
        reloads.inc();
    };
    match (mode, &args.broker_tls_cert_file, &args.broker_tls_key_file) {
        (BrokerCertMode::Files, Some(cert_file), Some(key_file)) => {
            tls::watch_files(cert.clone(), cert_file.clone(), key_file.clone(), BROKER_CERT_CHECK_INTERVAL, on_reload);
            if let Some(ca_file) = &args.broker_tls_ca_file {
                let ca = WatchedText::watch(
                    ca_file.clone(),
                    BROKER_CERT_CHECK_INTERVAL,
                    "broker CA",
                    validate_pem_certificates,
                );
                let (client, namespace, name) =
                    (client.clone(), args.namespace.clone(), args.broker_ca_configmap.clone());
                tokio::spawn(publish_ca_file(client, namespace, name, ca));
            }
        }
        _ => {
            let mut names = vec![
                format!("{}.{}.svc", args.broker_service_name, args.namespace),
                format!("{}.{}.svc.cluster.local", args.broker_service_name, args.namespace),
            ];
            names.extend(args.broker_extra_sans.iter().cloned());
            let settings = CertSettings {
                owner: "cloudpass-broker".into(),
                namespace: args.namespace.clone(),
                secret_name: args.broker_cert_secret.clone(),
                webhook_config_name: None,
                ca_config_map: Some(args.broker_ca_configmap.clone()),
                names,
                ca_validity: BROKER_CA_VALIDITY,
                cert_validity: BROKER_CERT_VALIDITY,
            };
            let manager = Arc::new(CertManager::new(client.clone(), settings, cert.clone(), on_reload));
            if let Err(e) = manager.sync().await {
                // Keep running: /readyz says not ready until it works, and the loop retries.
                warn!(error = %e, secret = %args.broker_cert_secret, "initial broker certificate sync failed");
            }
            tokio::spawn(manager.run(BROKER_CERT_SYNC_INTERVAL));
        }
    }
}

/// Publishes the files-mode CA in the ConfigMap whenever the file's content changes
/// (retrying failed writes), so the webhook hands the same CA to agents as in
/// self-managed mode.
async fn publish_ca_file(client: kube::Client, namespace: String, name: String, ca: Arc<WatchedText>) {
    let mut published: Option<Arc<str>> = None;
    loop {
        let current = ca.get();
        if ca.is_loaded() && published.as_ref() != Some(&current) {
            match certs::publish_ca(&client, &namespace, &name, "cloudpass-broker", &current).await {
                Ok(_) => published = Some(current),
                Err(e) => warn!(error = %e, configmap = name, "cannot publish the broker CA; retrying"),
            }
        }
        tokio::time::sleep(BROKER_CERT_CHECK_INTERVAL).await;
    }
}

/// Loads the signing keys, and rotates them as due, every few minutes (every replica:
/// writes use optimistic concurrency, so racing replicas cannot both rotate).
async fn keep_keys(client: kube::Client, namespace: String, secret: String, keys: Arc<RwLock<Option<issuer::KeySet>>>) {
    let policy = issuer::RotationPolicy::default();
    loop {
        let wait = match issuer::sync_keys(&client, &namespace, &secret, &policy).await {
            Ok(set) => {
                *keys.write().unwrap_or_else(|e| e.into_inner()) = Some(set);
                Duration::from_secs(300)
            }
            Err(e) => {
                warn!(error = %e, secret, "cannot load the issuer's signing keys; retrying");
                Duration::from_secs(5)
            }
        };
        tokio::time::sleep(wait).await;
    }
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
    // Every replica serves the broker, leader or not.
    let broker = match start_broker(&client, &args, &metrics).await {
        Ok(b) => b,
        Err(e) => {
            error!(error = %e, "cannot start the broker");
            return ExitCode::FAILURE;
        }
    };
    let (broker, broker_cert) = broker.unzip();
    let stopping = Arc::new(AtomicBool::new(false));
    let health =
        Health { metrics: metrics.clone(), ready: ready.clone(), broker, broker_cert, stopping: stopping.clone() };
    match server::spawn(args.metrics_addr, health).await {
        Ok(addr) => info!(%addr, "serving /healthz, /readyz and /metrics"),
        Err(e) => {
            error!(error = %e, addr = %args.metrics_addr, "cannot serve health and metrics");
            return ExitCode::FAILURE;
        }
    }

    // One shutdown signal for everything: SIGTERM/SIGINT, or the loss of leadership.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_on_signal = stop_tx.clone();
    let (drain_tx, drain_rx) = watch::channel(None::<tokio::time::Instant>);
    let args_shutdown_delay = args.shutdown_delay.as_std();
    tokio::spawn(async move {
        let deadline = termination_deadline(&stopping, args_shutdown_delay).await;
        let _ = drain_tx.send(Some(deadline));
        let _ = stop_on_signal.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    if !args.components.controller() {
        // A broker replica: ready once serving (its certificate is part of /readyz), until
        // told to stop.
        ready.store(true, Ordering::Relaxed);
        info!("serving the broker; the controller runs elsewhere");
        stopped(stop_rx).await;
        drain(drain_rx).await;
        info!("cloudpass-operator stopped");
        return ExitCode::SUCCESS;
    }

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
            release(task).await;
            drain(drain_rx).await;
            info!("cloudpass-operator stopped while standing by");
            return ExitCode::SUCCESS;
        }
        ready.store(false, Ordering::Relaxed);
        metrics.leader.set(1);
        info!(identity = %instance, "became leader; reconciling");
        // Losing the lease ends reconciling at once. This watcher holds a receiver of the
        // lease task, which runs until every receiver is gone: it is aborted on the way
        // out, or the lease would never be released.
        let mut watch_leader = is_leader.clone();
        let lost = stop_tx.clone();
        let watcher = tokio::spawn(async move {
            if watch_leader.wait_for(|leader| !*leader).await.is_ok() {
                warn!("lost leadership");
                let _ = lost.send(true);
            }
        });
        lease = Some((is_leader, task, watcher));
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
        debounce: args.reconcile_debounce,
        broker_secret_access: args
            .broker_service_account
            .clone()
            .map(|account| Arc::new(BrokerSecretAccess::new(client.clone(), args.namespace.clone(), account))),
        broker_ca_configmap: Some(args.broker_ca_configmap.clone()),
        verify: match verify_settings(&args) {
            Ok(v) => v,
            Err(e) => {
                error!(error = %e, "cannot set up verification");
                return ExitCode::FAILURE;
            }
        },
    };
    let warm = ready.clone();
    reconcile::run(client, settings, metrics.clone(), stopped(stop_rx), move || warm.store(true, Ordering::Relaxed))
        .await;

    metrics.leader.set(0);
    if let Some((is_leader, task, watcher)) = lease {
        let still_leader = *is_leader.borrow();
        // Dropping the last receiver makes the lease task release the lease: a standby
        // takes over at once instead of after the lease expires.
        watcher.abort();
        let _ = watcher.await;
        drop(is_leader);
        release(task).await;
        if !still_leader {
            error!("stopped because leadership was lost; exiting so a fresh instance can stand by");
            return ExitCode::FAILURE;
        }
    }
    drain(drain_rx).await;
    info!("cloudpass-operator stopped");
    ExitCode::SUCCESS
}

/// How long releasing the Lease may take on the way out; past it the Lease expires on its
/// own, which only delays the next leader.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits for the lease task to release the Lease, at most [`LEASE_RELEASE_TIMEOUT`].
async fn release<T>(task: tokio::task::JoinHandle<T>) {
    if tokio::time::timeout(LEASE_RELEASE_TIMEOUT, task).await.is_err() {
        warn!("the Lease was not released in time; it expires on its own");
    }
}

/// After SIGTERM: keeps serving (already not ready) until the shutdown delay is over.
async fn drain(drain_rx: watch::Receiver<Option<tokio::time::Instant>>) {
    let deadline = *drain_rx.borrow();
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "cloudpass".into())
}
