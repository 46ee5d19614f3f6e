//! `cloudpass-operator`: the controller, broker and OIDC issuer of cloudpass. With
//! `--components all` (the default) every replica serves the broker, health and metrics
//! and only the holder of the leader Lease reconciles and writes; the chart runs the
//! controller and the broker as two Deployments under two service accounts
//! (`--components controller`, `--components broker`), so that the process that parses
//! agents' input holds only the rights the broker needs.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, RwLock, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use cloudpass_api::duration::Duration as TextDuration;
use cloudpass_broker::{
    Broker, BrokerSettings,
    audit::Audit,
    egress::{Egress, EgressPolicy},
    issuer, server as broker_server,
};
use cloudpass_cli::{LogArgs, kube_client, termination_deadline};
use cloudpass_operator::{
    metrics::Metrics,
    reconcile::{self, Settings},
    secret_access::BrokerSecretAccess,
    server::{self, Health},
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

/// Reconciles cloudpass TrustProviders, CredentialProviders and AccessPolicies into status
/// and one compiled config ConfigMap per namespace.
#[derive(Parser, Debug)]
#[command(name = "cloudpass-operator", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// What this process runs: the controller (reconciling, leader-elected), the broker
    /// (with the issuer), or both.
    #[arg(long, env = "CLOUDPASS_COMPONENTS", value_enum, default_value_t = Components::All)]
    components: Components,
    /// The broker's service account (in `--namespace`) when the broker runs apart from
    /// the controller: the controller then keeps, in each namespace, a Role that lets it
    /// `get` exactly the Secrets that CredentialProviders reference (see
    /// docs/broker.md). Unset: no such Roles (the broker's own RBAC decides).
    #[arg(long, env = "CLOUDPASS_BROKER_SERVICE_ACCOUNT")]
    broker_service_account: Option<String>,
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
    /// Address of the broker's HTTPS API (with the issuer's documents). Loopback by
    /// default; the chart sets `0.0.0.0:8443`.
    #[arg(long, env = "CLOUDPASS_BROKER_ADDR", default_value = "127.0.0.1:8443")]
    broker_addr: SocketAddr,
    /// Time a broker client has to complete its TLS handshake after connecting.
    #[arg(long, env = "CLOUDPASS_BROKER_HANDSHAKE_TIMEOUT", default_value = ServerLimits::DEFAULT_HANDSHAKE_TIMEOUT)]
    broker_handshake_timeout: TextDuration,
    /// Time a broker client has to send a request's headers; also how long an idle
    /// HTTP/1.1 connection is kept.
    #[arg(long, env = "CLOUDPASS_BROKER_HEADER_READ_TIMEOUT", default_value = ServerLimits::DEFAULT_HEADER_READ_TIMEOUT)]
    broker_header_read_timeout: TextDuration,
    /// How long an HTTP/2 connection to the broker with no request in progress is kept.
    #[arg(long, env = "CLOUDPASS_BROKER_IDLE_TIMEOUT", default_value = ServerLimits::DEFAULT_IDLE_TIMEOUT)]
    broker_idle_timeout: TextDuration,
    /// Time from a request's headers to the broker's answer (body and upstream calls
    /// included); past it the client gets 503.
    #[arg(long, env = "CLOUDPASS_BROKER_REQUEST_TIMEOUT", default_value = ServerLimits::DEFAULT_REQUEST_TIMEOUT)]
    broker_request_timeout: TextDuration,
    /// Connections the broker serves at once; more wait in the listen backlog.
    #[arg(long, env = "CLOUDPASS_BROKER_MAX_CONNECTIONS", default_value_t = ServerLimits::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    broker_max_connections: u32,
    /// Who provides the broker's serving certificate. `self-managed`: the operator keeps
    /// a CA and certificate in `--broker-cert-secret`, rotates them, and publishes the
    /// CA bundle in `--broker-ca-configmap`. `files`: `--broker-tls-cert-file` and
    /// `--broker-tls-key-file` (e.g. from cert-manager). Default: `files` when those are
    /// given, `self-managed` otherwise.
    #[arg(long, env = "CLOUDPASS_BROKER_CERT_MODE", value_enum)]
    broker_cert_mode: Option<BrokerCertMode>,
    /// The broker's serving certificate (PEM, `files` mode), re-read when it changes.
    #[arg(long, env = "CLOUDPASS_BROKER_TLS_CERT_FILE", requires = "broker_tls_key_file")]
    broker_tls_cert_file: Option<PathBuf>,
    /// The broker's serving key (PEM, `files` mode).
    #[arg(long, env = "CLOUDPASS_BROKER_TLS_KEY_FILE", requires = "broker_tls_cert_file")]
    broker_tls_key_file: Option<PathBuf>,
    /// The CA (PEM) that signed the `files` certificate, e.g. cert-manager's `ca.crt`:
    /// published in `--broker-ca-configmap` whenever it changes. Without it, `files`
    /// mode publishes nothing and agents must get the CA some other way.
    #[arg(long, env = "CLOUDPASS_BROKER_TLS_CA_FILE", requires = "broker_tls_cert_file")]
    broker_tls_ca_file: Option<PathBuf>,
    /// Secret (in `--namespace`) holding the self-managed CA and serving certificate;
    /// created if absent.
    #[arg(long, env = "CLOUDPASS_BROKER_CERT_SECRET", default_value = "cloudpass-broker-tls")]
    broker_cert_secret: String,
    /// ConfigMap (in `--namespace`) where the broker's CA bundle is published under
    /// `ca.crt`: public, for the webhook to hand to every agent.
    #[arg(long, env = "CLOUDPASS_BROKER_CA_CONFIGMAP", default_value = "cloudpass-broker-ca")]
    broker_ca_configmap: String,
    /// The broker's Service: the self-managed certificate is valid for
    /// `<name>.<namespace>.svc` and `<name>.<namespace>.svc.cluster.local`.
    #[arg(long, env = "CLOUDPASS_BROKER_SERVICE_NAME", default_value = "cloudpass-broker")]
    broker_service_name: String,
    /// Further names (DNS or IP) for the self-managed certificate; repeatable.
    #[arg(long = "broker-extra-san", env = "CLOUDPASS_BROKER_EXTRA_SANS", value_delimiter = ',')]
    broker_extra_sans: Vec<String>,
    /// Public issuer URL (https) of broker-signed tokens: what AWS, Azure and GCP are
    /// told to trust. Its discovery document and JWKS must be reachable there. The
    /// broker runs when this is set.
    #[arg(long = "issuer-url", env = "CLOUDPASS_ISSUER_URL")]
    broker_issuer_url: Option<String>,
    /// This broker's server ID, which `awsRole` evidence (a pre-signed
    /// `sts:GetCallerIdentity`) must name in its signed `x-cloudpass-server-id` header so
    /// that evidence signed for another server cannot be replayed here; repeatable, any
    /// of them is accepted. Default: the host of `--issuer-url` and
    /// `<--broker-service-name>.<--namespace>.svc`, the host of the broker URL agents
    /// call by default.
    #[arg(long = "broker-server-id", env = "CLOUDPASS_BROKER_SERVER_ID", value_delimiter = ',')]
    broker_server_ids: Vec<String>,
    /// Secret (in `--namespace`) holding the issuer's signing keys; created if absent.
    #[arg(long = "issuer-keys-secret", env = "CLOUDPASS_ISSUER_KEYS_SECRET", default_value = "cloudpass-issuer-keys")]
    broker_keys_secret: String,
    /// Plain-HTTP address serving only the issuer's public documents, for an Ingress or
    /// load balancer that terminates TLS. Off by default.
    #[arg(long, env = "CLOUDPASS_ISSUER_ADDR")]
    issuer_addr: Option<SocketAddr>,
    /// Extra CA certificates (PEM) trusted for upstream HTTPS (token endpoints, JWKS) on
    /// top of the system roots, e.g. for private STS endpoints.
    #[arg(long, env = "CLOUDPASS_UPSTREAM_CA_FILE")]
    upstream_ca_file: Option<PathBuf>,
    /// Let the broker call loopback, private (`10/8`, `172.16/12`, `192.168/16`,
    /// `fc00::/7`), shared (`100.64/10`) and other non-public addresses at the URLs that
    /// TrustProviders and CredentialProviders name (JWKS, discovery, token and STS
    /// endpoints). Off: only public addresses, so a namespace admin cannot make the
    /// operator call services inside the cluster or its network. Link-local (instance
    /// metadata) addresses and `--cluster-cidr` are refused either way.
    #[arg(long, env = "CLOUDPASS_ALLOW_PRIVATE_UPSTREAMS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    allow_private_upstreams: bool,
    /// The cluster's service and pod ranges (CIDR), which the broker never calls, even
    /// with `--allow-private-upstreams`; repeatable or comma-separated.
    #[arg(long = "cluster-cidr", env = "CLOUDPASS_CLUSTER_CIDRS", value_delimiter = ',')]
    cluster_cidrs: Vec<ipnet::IpNet>,
    /// How long a TokenReview's answer (with the pod's labels) is reused; a deleted pod's
    /// token is refused at most this long after the deletion, and a refused token is
    /// not reviewed again within it.
    #[arg(long, env = "CLOUDPASS_TOKEN_CACHE_TTL", default_value = "10s")]
    token_cache_ttl: TextDuration,
    /// After SIGTERM, how long the broker keeps answering (already reporting not ready)
    /// before the process exits: Services stop routing to a terminating pod only after
    /// its endpoint is removed everywhere, and agents' requests sent meanwhile still get
    /// an answer. Keep it below the pod's termination grace period.
    #[arg(long, env = "CLOUDPASS_SHUTDOWN_DELAY", default_value = "5s")]
    shutdown_delay: TextDuration,
    /// Where audit records go: `stdout` or a file path (appended).
    #[arg(long, env = "CLOUDPASS_AUDIT_LOG", default_value = "stdout")]
    audit_log: String,
    #[command(flatten)]
    log: LogArgs,
}

/// What one operator process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Components {
    /// The controller and the broker in one process.
    All,
    /// Only the controller: reconciling under the leader Lease.
    Controller,
    /// Only the broker and the issuer: every replica serves, none reconciles.
    Broker,
}

impl Components {
    fn broker(self) -> bool {
        self != Self::Controller
    }

    fn controller(self) -> bool {
        self != Self::Broker
    }
}

/// Who provides the broker's serving certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BrokerCertMode {
    /// The operator creates and rotates a CA and certificate in a Secret and publishes
    /// the CA bundle in a ConfigMap.
    SelfManaged,
    /// Certificate and key files (cert-manager, the chart); re-read when they change.
    Files,
}

/// Lifetime of the self-managed broker CA (five years); rotated when a third is left.
const BROKER_CA_VALIDITY: Duration = Duration::from_secs(43_800 * 3600);
/// Lifetime of a self-managed broker serving certificate (90 days); renewed when a
/// third is left.
const BROKER_CERT_VALIDITY: Duration = Duration::from_secs(2_160 * 3600);
/// How often certificate files are re-read (`files` mode).
const BROKER_CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often the self-managed certificate is checked for rotation (as the webhook's).
const BROKER_CERT_SYNC_INTERVAL: Duration = Duration::from_secs(60);

/// The certificate mode from the flags, refusing combinations that cannot mean anything.
fn broker_cert_mode(args: &Args) -> Result<BrokerCertMode, String> {
    match (args.broker_cert_mode, args.broker_tls_cert_file.is_some()) {
        (Some(BrokerCertMode::SelfManaged), true) => {
            Err("--broker-tls-cert-file is for --broker-cert-mode files, not self-managed".into())
        }
        (Some(BrokerCertMode::Files), false) => {
            Err("--broker-cert-mode files needs --broker-tls-cert-file and --broker-tls-key-file".into())
        }
        (Some(mode), _) => Ok(mode),
        (None, true) => Ok(BrokerCertMode::Files),
        (None, false) => Ok(BrokerCertMode::SelfManaged),
    }
}

/// The broker's server IDs: `--broker-server-id`, or by default the issuer URL's host and
/// the broker Service's name.
fn server_ids(args: &Args, issuer_url: &str) -> Result<Vec<String>, String> {
    let mut ids: Vec<String> = args.broker_server_ids.iter().map(|id| id.trim().to_owned()).collect();
    if ids.is_empty() {
        let url = reqwest::Url::parse(issuer_url).map_err(|e| format!("--issuer-url {issuer_url:?}: {e}"))?;
        ids.extend(url.host_str().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned()));
        ids.push(format!("{}.{}.svc", args.broker_service_name, args.namespace));
        ids.dedup();
    }
    if let Some(bad) =
        ids.iter().find(|id| id.is_empty() || id.len() > 253 || !id.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(format!("--broker-server-id {bad:?} is not a host name or ID (1 to 253 visible ASCII characters)"));
    }
    Ok(ids)
}

/// The running broker and its serving certificate (for readiness).
type RunningBroker = (Arc<Broker>, Arc<ReloadableCert>);

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
    if egress.allow_private {
        warn!("--allow-private-upstreams: the broker calls loopback and private addresses that providers name");
    }
    let http = Egress::new(http, egress).map_err(|e| e.to_string())?;
    let audit = Audit::open(&args.audit_log).map_err(|e| format!("--audit-log {}: {e}", args.audit_log))?;
    let configs = Arc::new(Configs::default());
    tokio::spawn(configs::watch(client.clone(), args.namespace.clone(), configs.clone()));
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
        broker_secret_access: args
            .broker_service_account
            .clone()
            .map(|account| Arc::new(BrokerSecretAccess::new(client.clone(), args.namespace.clone(), account))),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(args: &[&str]) -> Result<BrokerCertMode, String> {
        let parsed = Args::try_parse_from([&["cloudpass-operator"], args].concat()).map_err(|e| e.to_string())?;
        broker_cert_mode(&parsed)
    }

    #[test]
    fn server_ids_default_to_the_hosts_agents_call() {
        let ids = |args: &[&str]| {
            let parsed = Args::try_parse_from([&["cloudpass-operator"], args].concat()).map_err(|e| e.to_string())?;
            server_ids(&parsed, "https://oidc.example.com/cloudpass")
        };
        assert_eq!(
            ids(&[]).unwrap(),
            ["oidc.example.com", "cloudpass-broker.cloudpass-system.svc"],
            "the issuer's host and the Service's"
        );
        assert_eq!(ids(&["--namespace=cp", "--broker-service-name=b"]).unwrap()[1], "b.cp.svc");
        assert_eq!(ids(&["--broker-server-id=vault.example.com,b.ext"]).unwrap(), ["vault.example.com", "b.ext"]);
        assert_eq!(ids(&["--broker-server-id=a", "--broker-server-id=b"]).unwrap(), ["a", "b"]);
        assert!(ids(&["--broker-server-id=has space"]).is_err());
        let parsed = Args::try_parse_from(["cloudpass-operator"]).unwrap();
        assert_eq!(server_ids(&parsed, "https://127.0.0.1:8443").unwrap()[0], "127.0.0.1");
    }

    #[test]
    fn private_upstreams_are_refused_unless_allowed() {
        let parse = |args: &[&str]| Args::try_parse_from([&["cloudpass-operator"], args].concat()).unwrap();
        assert!(!parse(&[]).allow_private_upstreams);
        assert!(parse(&["--allow-private-upstreams"]).allow_private_upstreams);
        assert!(parse(&["--allow-private-upstreams=true"]).allow_private_upstreams);
        assert!(!parse(&["--allow-private-upstreams=false"]).allow_private_upstreams);
        let cidrs = parse(&["--cluster-cidr=10.96.0.0/12,10.244.0.0/16", "--cluster-cidr", "fd00::/108"]).cluster_cidrs;
        assert_eq!(cidrs.len(), 3);
        assert!(Args::try_parse_from(["cloudpass-operator", "--cluster-cidr=10.96.0.1"]).is_err());
    }

    #[test]
    fn the_broker_cert_mode_follows_the_flags() {
        assert_eq!(mode(&[]), Ok(BrokerCertMode::SelfManaged));
        let files = ["--broker-tls-cert-file=c", "--broker-tls-key-file=k"];
        assert_eq!(mode(&files), Ok(BrokerCertMode::Files), "files given: files mode");
        assert_eq!(mode(&[&files[..], &["--broker-cert-mode=files"]].concat()), Ok(BrokerCertMode::Files));
        assert!(mode(&[&files[..], &["--broker-cert-mode=self-managed"]].concat()).is_err());
        assert!(mode(&["--broker-cert-mode=files"]).is_err(), "files mode without files");
        assert!(mode(&["--broker-tls-cert-file=c"]).is_err(), "a certificate without its key");
    }
}
