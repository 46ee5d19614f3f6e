//! `cloudpass-webhook`: the mutating admission webhook that injects the cloudpass agent.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, ValueEnum};
use cloudpass_api::duration::Duration as TextDuration;
use cloudpass_cli::{LogArgs, kube_client, termination_deadline};
use cloudpass_webhook::{
    admission::Admission,
    certs::{CertManager, CertSettings},
    configs::{self, Configs},
    files::{WatchedText, validate_pem_certificates},
    inject::{AgentPorts, BrokerCa, InjectSettings},
    metrics::Metrics,
    server::{self, AppState},
    tls::{self, ReloadableCert, ServerLimits},
};
use tracing::{error, info, warn};

/// Injects the cloudpass agent into pods that a Ready AccessPolicy selects, in namespaces
/// labelled cloudpass.dev/injection=enabled.
#[derive(Parser, Debug)]
#[command(name = "cloudpass-webhook", version)]
struct Args {
    /// Namespace the webhook runs in (its certificate Secret lives there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudpass-system")]
    namespace: String,
    /// Namespace of the operator's compiled configs. Default: `--namespace`.
    #[arg(long, env = "CLOUDPASS_CONFIG_NAMESPACE")]
    config_namespace: Option<String>,
    /// Kubeconfig of the cluster whose operator compiles the configs, when that is not
    /// this cluster (see `--remote-cluster`). It needs only to list and watch ConfigMaps
    /// in `--config-namespace`.
    #[arg(long, env = "CLOUDPASS_CONFIG_KUBECONFIG")]
    config_kubeconfig: Option<PathBuf>,
    /// This cluster is not the broker's: injected agents name their namespace to the
    /// broker, whose policies of the same namespace apply (a TrustProvider there must
    /// trust this cluster's issuer), and only policies with an empty pod selector select
    /// pods here (the broker cannot see this cluster's labels).
    #[arg(long, env = "CLOUDPASS_REMOTE_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    remote_cluster: bool,
    /// HTTPS address serving `/mutate`, `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "CLOUDPASS_LISTEN_ADDR", default_value = "0.0.0.0:9443")]
    listen_addr: SocketAddr,
    /// Time a client has to complete its TLS handshake after connecting.
    #[arg(long, env = "CLOUDPASS_HANDSHAKE_TIMEOUT", default_value = ServerLimits::DEFAULT_HANDSHAKE_TIMEOUT)]
    handshake_timeout: TextDuration,
    /// Time a client has to send a request's headers; also how long an idle HTTP/1.1
    /// connection is kept.
    #[arg(long, env = "CLOUDPASS_HEADER_READ_TIMEOUT", default_value = ServerLimits::DEFAULT_HEADER_READ_TIMEOUT)]
    header_read_timeout: TextDuration,
    /// How long an HTTP/2 connection with no request in progress is kept.
    #[arg(long, env = "CLOUDPASS_IDLE_TIMEOUT", default_value = ServerLimits::DEFAULT_IDLE_TIMEOUT)]
    idle_timeout: TextDuration,
    /// Time from a request's headers to the answer (body included); past it the client
    /// gets 503.
    #[arg(long, env = "CLOUDPASS_REQUEST_TIMEOUT", default_value = ServerLimits::DEFAULT_REQUEST_TIMEOUT)]
    request_timeout: TextDuration,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "CLOUDPASS_MAX_CONNECTIONS", default_value_t = ServerLimits::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Agent image injected into pods.
    #[arg(long, env = "CLOUDPASS_AGENT_IMAGE", default_value = concat!("ghcr.io/cloudpass-dev/cloudpass-agent:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
    /// Pull policy of the agent image.
    #[arg(long, env = "CLOUDPASS_AGENT_PULL_POLICY", default_value = "IfNotPresent")]
    agent_pull_policy: String,
    /// Path of the agent binary inside its image (runs the postStart hook).
    #[arg(long, env = "CLOUDPASS_AGENT_PATH", default_value = "/usr/local/bin/cloudpass-agent")]
    agent_path: String,
    /// Broker URL the agent calls. Default: `https://cloudpass-broker.<namespace>.svc:8443`.
    #[arg(long, env = "CLOUDPASS_BROKER_URL")]
    broker_url: Option<String>,
    /// ConfigMap holding the broker's CA bundle (`ca.crt`) in every opted-in namespace,
    /// which the operator keeps there: projected into each agent beside its token, so
    /// the kubelet brings a rotated CA to running agents.
    #[arg(long, env = "CLOUDPASS_BROKER_CA_CONFIGMAP", default_value = "cloudpass-broker-ca")]
    broker_ca_configmap: String,
    /// PEM file with the broker's CA bundle, handed to each agent in its environment
    /// instead of `--broker-ca-configmap`: for `--remote-cluster`, where no operator keeps
    /// the namespaces' copies. Re-read when it changes (checked every few seconds); until
    /// it has been read once the webhook is not ready.
    #[arg(long, env = "CLOUDPASS_BROKER_CA_FILE")]
    broker_ca_file: Option<PathBuf>,
    /// Lifetime of the projected token mounted into the agent (the kubelet renews it at 80%).
    #[arg(long, env = "CLOUDPASS_TOKEN_LIFETIME", default_value = "1h")]
    token_lifetime: TextDuration,
    /// Who provides the serving certificate.
    #[arg(long, env = "CLOUDPASS_CERT_MODE", value_enum, default_value_t = CertMode::SelfManaged)]
    cert_mode: CertMode,
    /// Serving certificate file (`--cert-mode files`, e.g. from cert-manager); re-read when it changes.
    #[arg(long, env = "CLOUDPASS_TLS_CERT_FILE", default_value = "/etc/cloudpass/tls/tls.crt")]
    tls_cert_file: PathBuf,
    /// Serving key file (`--cert-mode files`).
    #[arg(long, env = "CLOUDPASS_TLS_KEY_FILE", default_value = "/etc/cloudpass/tls/tls.key")]
    tls_key_file: PathBuf,
    /// Secret holding the self-managed CA and serving certificate.
    #[arg(long, env = "CLOUDPASS_CERT_SECRET", default_value = "cloudpass-webhook-tls")]
    cert_secret: String,
    /// MutatingWebhookConfiguration whose caBundle the webhook keeps in sync (self-managed mode).
    #[arg(long, env = "CLOUDPASS_WEBHOOK_CONFIG", default_value = "cloudpass-webhook")]
    webhook_config_name: String,
    /// Service name, for the serving certificate's DNS names.
    #[arg(long, env = "CLOUDPASS_SERVICE_NAME", default_value = "cloudpass-webhook")]
    service_name: String,
    /// Further names (DNS or IP) for the serving certificate; repeatable.
    #[arg(long = "extra-san", env = "CLOUDPASS_EXTRA_SANS", value_delimiter = ',')]
    extra_sans: Vec<String>,
    /// Lifetime of the self-managed CA; it is rotated when a third is left.
    #[arg(long, env = "CLOUDPASS_CA_VALIDITY", default_value = "43800h")]
    ca_validity: TextDuration,
    /// Lifetime of a serving certificate; it is renewed when a third is left.
    #[arg(long, env = "CLOUDPASS_CERT_VALIDITY", default_value = "2160h")]
    cert_validity: TextDuration,
    /// How often certificates are checked (and files re-read).
    #[arg(long, env = "CLOUDPASS_CERT_CHECK_INTERVAL", default_value = "1m")]
    cert_check_interval: TextDuration,
    /// After SIGTERM, how long the webhook keeps answering the apiserver (already
    /// reporting not ready) before it exits, so admissions routed here while its endpoint
    /// is being removed still succeed. Keep it below the pod's termination grace period.
    #[arg(long, env = "CLOUDPASS_SHUTDOWN_DELAY", default_value = "5s")]
    shutdown_delay: TextDuration,
    #[command(flatten)]
    log: LogArgs,
}

/// How often `--broker-ca-file` is checked for changes (one `stat`).
const BROKER_CA_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CertMode {
    /// The webhook creates and rotates its own CA and certificate and patches the caBundle.
    SelfManaged,
    /// Certificate files provided by cert-manager or the chart; re-read when they change.
    Files,
}

/// A client of the cluster named by a kubeconfig file.
async fn config_cluster_client(path: &std::path::Path) -> Result<kube::Client, String> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    args.log.init();
    let client = match kube_client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The file may appear after the start (an optional ConfigMap volume filled later)
    // and changes when the broker's CA rotates: watch it, cheaply.
    let broker_ca = match &args.broker_ca_file {
        Some(path) => BrokerCa::Inline(WatchedText::watch(
            path.clone(),
            BROKER_CA_CHECK_INTERVAL,
            "broker CA",
            validate_pem_certificates,
        )),
        None if args.remote_cluster => {
            error!(
                "--remote-cluster needs --broker-ca-file: no operator keeps the broker CA in this cluster's namespaces"
            );
            return ExitCode::FAILURE;
        }
        None => BrokerCa::ConfigMap(args.broker_ca_configmap.clone()),
    };
    let metrics = Metrics::new();
    let configs = Arc::new(Configs::default());
    let config_namespace = args.config_namespace.clone().unwrap_or_else(|| args.namespace.clone());
    let config_client = match &args.config_kubeconfig {
        None => client.clone(),
        Some(path) => match config_cluster_client(path).await {
            Ok(c) => c,
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot use --config-kubeconfig");
                return ExitCode::FAILURE;
            }
        },
    };
    tokio::spawn(configs::watch(config_client, config_namespace.clone(), configs.clone()));

    let settings = InjectSettings {
        image: args.agent_image.clone(),
        pull_policy: args.agent_pull_policy.clone(),
        agent_path: args.agent_path.clone(),
        broker_url: args
            .broker_url
            .clone()
            .unwrap_or_else(|| format!("https://cloudpass-broker.{}.svc:8443", args.namespace)),
        broker_ca,
        ports: AgentPorts::default(),
        token_seconds: args.token_lifetime.as_secs().max(600) as i64,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        remote_cluster: args.remote_cluster,
    };
    let cert = Arc::new(ReloadableCert::default());
    let interval = Duration::from_secs(args.cert_check_interval.as_secs().max(1));
    match args.cert_mode {
        CertMode::SelfManaged => {
            let mut names = vec![
                format!("{}.{}.svc", args.service_name, args.namespace),
                format!("{}.{}.svc.cluster.local", args.service_name, args.namespace),
            ];
            names.extend(args.extra_sans.iter().cloned());
            let manager = Arc::new(CertManager::new(
                client.clone(),
                CertSettings {
                    owner: "cloudpass-webhook".into(),
                    namespace: args.namespace.clone(),
                    secret_name: args.cert_secret.clone(),
                    webhook_config_name: Some(args.webhook_config_name.clone()),
                    ca_config_map: None,
                    names,
                    ca_validity: args.ca_validity.as_std(),
                    cert_validity: args.cert_validity.as_std(),
                },
                cert.clone(),
                {
                    let metrics = metrics.clone();
                    move || {
                        metrics.cert_reloads.inc();
                    }
                },
            ));
            if let Err(e) = manager.sync().await {
                // Keep running: /readyz reports it, and the loop retries.
                warn!(error = %e, "initial certificate sync failed");
            }
            tokio::spawn(manager.run(interval));
        }
        CertMode::Files => {
            let metrics = metrics.clone();
            tls::watch_files(
                cert.clone(),
                args.tls_cert_file.clone(),
                args.tls_key_file.clone(),
                interval,
                move || {
                    metrics.cert_reloads.inc();
                },
            );
        }
    }

    let admission = Arc::new(Admission { configs, settings, metrics: metrics.clone() });
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let router = server::router(AppState { admission, cert: cert.clone(), stopping: stopping.clone() });
    let limits = ServerLimits {
        handshake_timeout: args.handshake_timeout.as_std(),
        header_read_timeout: args.header_read_timeout.as_std(),
        idle_timeout: args.idle_timeout.as_std(),
        request_timeout: args.request_timeout.as_std(),
        max_connections: args.max_connections as usize,
    };
    match tls::serve(args.listen_addr, router, cert, metrics.connections.clone(), limits).await {
        Ok(addr) => info!(%addr, config_namespace, "cloudpass-webhook serving"),
        Err(e) => {
            error!(error = %e, "cannot serve");
            return ExitCode::FAILURE;
        }
    }
    let deadline = termination_deadline(&stopping, args.shutdown_delay.as_std()).await;
    tokio::time::sleep_until(deadline).await;
    info!("cloudpass-webhook stopped");
    ExitCode::SUCCESS
}
