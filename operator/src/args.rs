//! The operator's command line: its flags (each also an environment variable), the
//! components one process runs, and the rules between flags (certificate mode, server
//! IDs), checked before anything starts.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};
use cloudpass_api::duration::Duration as TextDuration;
use cloudpass_cli::LogArgs;
use cloudpass_runtime::tls::ServerLimits;

/// Reconciles cloudpass TrustProviders, CredentialProviders and AccessPolicies into status
/// and one compiled config ConfigMap per namespace.
#[derive(Parser, Debug)]
#[command(name = "cloudpass-operator", version)]
pub struct Args {
    /// A one-off task instead of running (`export-issuer`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// What this process runs: the controller (reconciling, leader-elected), the broker
    /// (with the issuer), or both.
    #[arg(long, env = "CLOUDPASS_COMPONENTS", value_enum, default_value_t = Components::All)]
    pub components: Components,
    /// The broker's service account (in `--namespace`) when the broker runs apart from
    /// the controller: the controller then keeps, in each namespace, a Role that lets it
    /// `get` exactly the Secrets that CredentialProviders reference (see
    /// docs/broker.md). Unset: no such Roles (the broker's own RBAC decides).
    #[arg(long, env = "CLOUDPASS_BROKER_SERVICE_ACCOUNT")]
    pub broker_service_account: Option<String>,
    /// Namespace the operator runs in; compiled configs and the leader Lease live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "cloudpass-system")]
    pub namespace: String,
    /// Name of this instance: the leader-election identity and the reporter on Events.
    /// Default: the host name plus the process ID.
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`. Loopback by default; a pod
    /// exposes it with `--metrics-addr 0.0.0.0:8080`.
    #[arg(long, env = "CLOUDPASS_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect a leader on a Lease so that only one replica reconciles. Turn it off only
    /// when exactly one replica runs.
    #[arg(long, env = "CLOUDPASS_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader-election Lease, in `--namespace`.
    #[arg(long, env = "CLOUDPASS_LEASE_NAME", default_value = "cloudpass-operator")]
    pub lease_name: String,
    /// Seconds a leader's lease is valid without renewal; a standby takes over at most
    /// this long after the leader stops renewing.
    #[arg(long, env = "CLOUDPASS_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration: u64,
    /// Seconds before expiry at which the leader renews its lease.
    #[arg(long, env = "CLOUDPASS_LEASE_RENEW_GRACE", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=299))]
    pub lease_renew_grace: u64,
    /// Namespaces reconciled concurrently.
    #[arg(long, env = "CLOUDPASS_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// How long a namespace's objects must stay unchanged before it is reconciled, so
    /// that a burst of changes (an `apply` of many objects) costs one reconcile and one
    /// set of writes. Revocation does not wait for it: the broker refuses a deleted
    /// policy as soon as its own watch sees the deletion.
    /// `0s` to `10s`, e.g. `200ms`.
    #[arg(long, env = "CLOUDPASS_RECONCILE_DEBOUNCE", default_value = "200ms", value_parser = debounce)]
    pub reconcile_debounce: std::time::Duration,
    /// Address of the broker's HTTPS API (with the issuer's documents). Loopback by
    /// default; the chart sets `0.0.0.0:8443`.
    #[arg(long, env = "CLOUDPASS_BROKER_ADDR", default_value = "127.0.0.1:8443")]
    pub broker_addr: SocketAddr,
    /// Time a broker client has to complete its TLS handshake after connecting.
    #[arg(long, env = "CLOUDPASS_BROKER_HANDSHAKE_TIMEOUT", default_value = ServerLimits::DEFAULT_HANDSHAKE_TIMEOUT)]
    pub broker_handshake_timeout: TextDuration,
    /// Time a broker client has to send a request's headers; also how long an idle
    /// HTTP/1.1 connection is kept.
    #[arg(long, env = "CLOUDPASS_BROKER_HEADER_READ_TIMEOUT", default_value = ServerLimits::DEFAULT_HEADER_READ_TIMEOUT)]
    pub broker_header_read_timeout: TextDuration,
    /// How long an HTTP/2 connection to the broker with no request in progress is kept.
    #[arg(long, env = "CLOUDPASS_BROKER_IDLE_TIMEOUT", default_value = ServerLimits::DEFAULT_IDLE_TIMEOUT)]
    pub broker_idle_timeout: TextDuration,
    /// Time from a request's headers to the broker's answer (body and upstream calls
    /// included); past it the client gets 503.
    #[arg(long, env = "CLOUDPASS_BROKER_REQUEST_TIMEOUT", default_value = ServerLimits::DEFAULT_REQUEST_TIMEOUT)]
    pub broker_request_timeout: TextDuration,
    /// Connections the broker serves at once; more wait in the listen backlog.
    #[arg(long, env = "CLOUDPASS_BROKER_MAX_CONNECTIONS", default_value_t = ServerLimits::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub broker_max_connections: u32,
    /// Who provides the broker's serving certificate. `self-managed`: the operator keeps
    /// a CA and certificate in `--broker-cert-secret`, rotates them, and publishes the
    /// CA bundle in `--broker-ca-configmap`. `files`: `--broker-tls-cert-file` and
    /// `--broker-tls-key-file` (e.g. from cert-manager). Default: `files` when those are
    /// given, `self-managed` otherwise.
    #[arg(long, env = "CLOUDPASS_BROKER_CERT_MODE", value_enum)]
    pub broker_cert_mode: Option<BrokerCertMode>,
    /// The broker's serving certificate (PEM, `files` mode), re-read when it changes.
    #[arg(long, env = "CLOUDPASS_BROKER_TLS_CERT_FILE", requires = "broker_tls_key_file")]
    pub broker_tls_cert_file: Option<PathBuf>,
    /// The broker's serving key (PEM, `files` mode).
    #[arg(long, env = "CLOUDPASS_BROKER_TLS_KEY_FILE", requires = "broker_tls_cert_file")]
    pub broker_tls_key_file: Option<PathBuf>,
    /// The CA (PEM) that signed the `files` certificate, e.g. cert-manager's `ca.crt`:
    /// published in `--broker-ca-configmap` whenever it changes. Without it, `files`
    /// mode publishes nothing and agents must get the CA some other way.
    #[arg(long, env = "CLOUDPASS_BROKER_TLS_CA_FILE", requires = "broker_tls_cert_file")]
    pub broker_tls_ca_file: Option<PathBuf>,
    /// Secret (in `--namespace`) holding the self-managed CA and serving certificate;
    /// created if absent.
    #[arg(long, env = "CLOUDPASS_BROKER_CERT_SECRET", default_value = "cloudpass-broker-tls")]
    pub broker_cert_secret: String,
    /// ConfigMap (in `--namespace`) where the broker's CA bundle is published under
    /// `ca.crt`: public. The controller keeps a copy of the same name in every namespace
    /// labelled `cloudpass.dev/injection=enabled`, which injected agents mount.
    #[arg(long, env = "CLOUDPASS_BROKER_CA_CONFIGMAP", default_value = "cloudpass-broker-ca")]
    pub broker_ca_configmap: String,
    /// The broker's Service: the self-managed certificate is valid for
    /// `<name>.<namespace>.svc` and `<name>.<namespace>.svc.cluster.local`.
    #[arg(long, env = "CLOUDPASS_BROKER_SERVICE_NAME", default_value = "cloudpass-broker")]
    pub broker_service_name: String,
    /// Further names (DNS or IP) for the self-managed certificate; repeatable.
    #[arg(long = "broker-extra-san", env = "CLOUDPASS_BROKER_EXTRA_SANS", value_delimiter = ',')]
    pub broker_extra_sans: Vec<String>,
    /// Public issuer URL (https) of broker-signed tokens: what AWS, Azure and GCP are
    /// told to trust. Its discovery document and JWKS must be reachable there. The
    /// broker runs when this is set.
    #[arg(long = "issuer-url", env = "CLOUDPASS_ISSUER_URL")]
    pub broker_issuer_url: Option<String>,
    /// This broker's server ID, which `awsRole` evidence (a pre-signed
    /// `sts:GetCallerIdentity`) must name in its signed `x-cloudpass-server-id` header so
    /// that evidence signed for another server cannot be replayed here; repeatable, any
    /// of them is accepted. Default: the host of `--issuer-url` and
    /// `<--broker-service-name>.<--namespace>.svc`, the host of the broker URL agents
    /// call by default.
    #[arg(long = "broker-server-id", env = "CLOUDPASS_BROKER_SERVER_ID", value_delimiter = ',')]
    pub broker_server_ids: Vec<String>,
    /// Secret (in `--namespace`) holding the issuer's signing keys; created if absent.
    #[arg(long = "issuer-keys-secret", env = "CLOUDPASS_ISSUER_KEYS_SECRET", default_value = "cloudpass-issuer-keys")]
    pub broker_keys_secret: String,
    /// Plain-HTTP address serving only the issuer's public documents, for an Ingress or
    /// load balancer that terminates TLS. Off by default.
    #[arg(long, env = "CLOUDPASS_ISSUER_ADDR")]
    pub issuer_addr: Option<SocketAddr>,
    /// Extra CA certificates (PEM) trusted for upstream HTTPS (token endpoints, JWKS) on
    /// top of the system roots, e.g. for private STS endpoints.
    #[arg(long, env = "CLOUDPASS_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Let the broker call loopback, private (`10/8`, `172.16/12`, `192.168/16`,
    /// `fc00::/7`), shared (`100.64/10`) and other non-public addresses at the URLs that
    /// TrustProviders and CredentialProviders name (JWKS, discovery, token and STS
    /// endpoints). Off: only public addresses, so a namespace admin cannot make the
    /// operator call services inside the cluster or its network. Link-local (instance
    /// metadata) addresses and `--cluster-cidr` are refused either way.
    #[arg(long, env = "CLOUDPASS_ALLOW_PRIVATE_UPSTREAMS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub allow_private_upstreams: bool,
    /// The cluster's service and pod ranges (CIDR), which the broker never calls, even
    /// with `--allow-private-upstreams`; repeatable or comma-separated.
    #[arg(long = "cluster-cidr", env = "CLOUDPASS_CLUSTER_CIDRS", value_delimiter = ',')]
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// How long a TokenReview's answer (with the pod's labels) is reused; a deleted pod's
    /// token is refused at most this long after the deletion, and a refused token is
    /// not reviewed again within it.
    #[arg(long, env = "CLOUDPASS_TOKEN_CACHE_TTL", default_value = "10s")]
    pub token_cache_ttl: TextDuration,
    /// How often the controller checks each federated CredentialProvider's cloud-side trust
    /// with a real exchange (its `Verified` condition), besides on every change; jittered
    /// by up to 10 %. `0s` turns verification off. Needs `--issuer-url` and read access
    /// to `--issuer-keys-secret`; the exchange goes through the same egress policy as the
    /// broker's (`--allow-private-upstreams`, `--cluster-cidr`, `--upstream-ca-file`).
    #[arg(long, env = "CLOUDPASS_VERIFY_INTERVAL", default_value = "1h")]
    pub verify_interval: TextDuration,
    /// After SIGTERM, how long the broker keeps answering (already reporting not ready)
    /// before the process exits: Services stop routing to a terminating pod only after
    /// its endpoint is removed everywhere, and agents' requests sent meanwhile still get
    /// an answer. Keep it below the pod's termination grace period.
    #[arg(long, env = "CLOUDPASS_SHUTDOWN_DELAY", default_value = "5s")]
    pub shutdown_delay: TextDuration,
    /// Where audit records go: `stdout` or a file path (appended).
    #[arg(long, env = "CLOUDPASS_AUDIT_LOG", default_value = "stdout")]
    pub audit_log: String,
    /// Logging flags.
    #[command(flatten)]
    pub log: LogArgs,
}

/// What one operator process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Components {
    /// The controller and the broker in one process.
    All,
    /// Only the controller: reconciling under the leader Lease.
    Controller,
    /// Only the broker and the issuer: every replica serves, none reconciles.
    Broker,
}

impl Components {
    /// Whether the process serves the broker and the issuer.
    pub fn broker(self) -> bool {
        self != Self::Controller
    }

    /// Whether the process reconciles (under the leader Lease).
    pub fn controller(self) -> bool {
        self != Self::Broker
    }
}

/// Who provides the broker's serving certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BrokerCertMode {
    /// The operator creates and rotates a CA and certificate in a Secret and publishes
    /// the CA bundle in a ConfigMap.
    SelfManaged,
    /// Certificate and key files (cert-manager, the chart); re-read when they change.
    Files,
}

/// The certificate mode from the flags, refusing combinations that cannot mean anything.
pub fn broker_cert_mode(args: &Args) -> Result<BrokerCertMode, String> {
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
pub fn server_ids(args: &Args, issuer_url: &str) -> Result<Vec<String>, String> {
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

/// The operator's subcommands (without one it runs).
#[derive(clap::Subcommand, Debug)]
pub enum Command {
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

/// A debounce: a duration such as `200ms` or `1s`, at most ten seconds.
fn debounce(text: &str) -> Result<std::time::Duration, String> {
    let parsed: jiff::SignedDuration =
        text.parse().map_err(|e| format!("{text:?} is not a duration like 200ms: {e}"))?;
    let duration = std::time::Duration::try_from(parsed).map_err(|_| format!("{text:?} is negative"))?;
    if duration > std::time::Duration::from_secs(10) {
        return Err(format!("{text:?} is longer than 10s, which would delay every change"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(args: &[&str]) -> Result<BrokerCertMode, String> {
        let parsed = Args::try_parse_from([&["cloudpass-operator"], args].concat()).map_err(|e| e.to_string())?;
        broker_cert_mode(&parsed)
    }

    #[test]
    fn the_debounce_is_a_short_duration() {
        assert_eq!(debounce("200ms"), Ok(std::time::Duration::from_millis(200)));
        assert_eq!(debounce("0s"), Ok(std::time::Duration::ZERO));
        assert!(debounce("11s").unwrap_err().contains("longer than 10s"));
        assert!(debounce("-1s").unwrap_err().contains("negative"));
        assert!(debounce("soon").is_err());
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
