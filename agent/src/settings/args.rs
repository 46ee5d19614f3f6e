//! The command line and environment of the agent binary, turned into checked
//! [`Settings`]. The webhook starts the agent with no arguments: everything comes from
//! the environment it sets (`CLOUDPASS_AGENT_CONFIG`, `CLOUDPASS_BROKER_CA`,
//! `IDENTITY_HEADER`) and the fixed paths of `cloudpass_api::agent`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use cloudpass_api::{
    agent::{
        AGENT_CONFIG_ENV, AgentConfig, BROKER_CA_ENV, BROKER_CA_FILE, SERVER_CA_DIR, SHARED_DIR, TOKEN_DIR, TOKEN_FILE,
    },
    duration::Duration as TextDuration,
    secret::SecretString,
};
use cloudpass_cli::LogArgs;

use super::{
    AwsSource, BrokerCa, BrokerClientSettings, EvidenceSettings, LINK_LOCAL_METADATA, RetrySettings, Settings,
};
use crate::error::AgentError;

/// The cloudpass agent: fetches this pod's credentials from the cloudpass broker and
/// serves them on loopback to unchanged cloud SDKs (AWS container credentials, Azure
/// App Service managed identity, GCP metadata server) and through an HTTP proxy that adds
/// a header or signs with AWS SigV4.
#[derive(Parser, Debug)]
#[command(name = "cloudpass-agent", version)]
pub struct Args {
    /// What to do; without a subcommand the agent runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of the running agent (also read by `probe` for the health port).
    #[command(flatten)]
    pub run: RunArgs,
    /// Log format and level (`--log-format`, `--log-level`), shared with the other
    /// cloudpass binaries.
    #[command(flatten)]
    pub log: LogArgs,
}

/// What the binary does besides running the agent.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Readiness check: `GET /ready` on the loopback health port; exits 0 when the agent
    /// holds a credential for every delivery, 1 otherwise. The kubelet runs it as the
    /// agent's postStart hook with `--wait` (the image has no shell or curl).
    Probe {
        /// Health port to ask; default: `healthPort` of the configuration.
        #[arg(long)]
        port: Option<u16>,
        /// Give up on one request after this long.
        #[arg(long, default_value = "2s")]
        timeout: TextDuration,
        /// Keep asking until ready for up to this long (the webhook's postStart hook: the
        /// kubelet starts the app the moment it returns; on failure it restarts the
        /// agent). `0s`: ask once.
        #[arg(long, default_value = "60s")]
        wait: TextDuration,
    },
}

/// Flags and environment of the running agent.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The agent configuration as JSON (broker URL, health port, deliveries), written by
    /// the webhook where something differs from the defaults. Without it, or without
    /// deliveries in it, the agent asks the broker what to serve.
    #[arg(long, env = AGENT_CONFIG_ENV, hide_env_values = true)]
    pub config: Option<String>,
    /// PEM certificate(s) of the CA that signed the broker's serving certificate. Only
    /// these are trusted for the broker unless `--broker-trust-system-roots`.
    #[arg(long, env = BROKER_CA_ENV, hide_env_values = true)]
    pub broker_ca: Option<String>,
    /// PEM file of the broker's CA bundle, used when `--broker-ca` is not given and read
    /// again before each broker call (the kubelet replaces it when the CA rotates).
    #[arg(long, env = "CLOUDPASS_BROKER_CA_FILE", default_value_t = default_broker_ca_file())]
    pub broker_ca_file: String,
    /// Also trust the system's root CAs for the broker (a broker behind a publicly
    /// trusted certificate).
    #[arg(long, env = "CLOUDPASS_BROKER_TRUST_SYSTEM_ROOTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub broker_trust_system_roots: bool,
    /// Projected service-account token (audience `cloudpass`) presented to the broker;
    /// re-read on every request, so the kubelet's rotation is picked up.
    #[arg(long, env = "CLOUDPASS_TOKEN_FILE", default_value_t = default_token_file())]
    pub token_file: String,
    /// Directory shared read-only with the app containers, where the agent writes the
    /// AWS authorization token file.
    #[arg(long, env = "CLOUDPASS_SHARED_DIR", default_value = SHARED_DIR)]
    pub shared_dir: PathBuf,
    /// Proof the Azure SDKs send as `X-IDENTITY-HEADER` (the webhook generates one per
    /// pod). Required when an Azure delivery is configured.
    #[arg(long, env = "IDENTITY_HEADER", hide_env_values = true)]
    pub identity_header: Option<String>,
    /// Extra PEM CA bundle trusted for proxied upstreams, besides the system roots.
    #[arg(long, env = "CLOUDPASS_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Time limit of one broker request.
    #[arg(long, env = "CLOUDPASS_BROKER_TIMEOUT", default_value = "10s")]
    pub broker_timeout: TextDuration,
    /// First retry delay after a failed fetch; it doubles per failure (with jitter).
    #[arg(long, env = "CLOUDPASS_RETRY_INITIAL", default_value = "1s")]
    pub retry_initial: TextDuration,
    /// Longest retry delay: the doubling stops here.
    #[arg(long, env = "CLOUDPASS_RETRY_MAX", default_value = "1m")]
    pub retry_max: TextDuration,
    /// Largest request body the SigV4 proxy buffers to sign (services other than S3;
    /// S3 bodies stream with `UNSIGNED-PAYLOAD`).
    #[arg(long, env = "CLOUDPASS_SIGV4_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub sigv4_max_body_bytes: usize,
    /// Directory of the server CA bundles the webhook mounts (`<dir>/<policy>/ca.crt`).
    #[arg(long, env = "CLOUDPASS_SERVER_CA_DIR", default_value = SERVER_CA_DIR)]
    pub server_ca_dir: PathBuf,
    /// How often to ask the broker again for this pod's deliveries (when the
    /// configuration names none), so that an AccessPolicy changed after the pod started
    /// reaches its agent.
    #[arg(long, env = "CLOUDPASS_CONFIG_REFRESH", default_value = "1m")]
    pub config_refresh: TextDuration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "CLOUDPASS_SHUTDOWN_GRACE", default_value = "5s")]
    pub shutdown_grace: TextDuration,
    /// Azure Instance Metadata Service, for `azureManagedIdentity` evidence.
    #[arg(long, env = "CLOUDPASS_AZURE_IMDS_URL", default_value = LINK_LOCAL_METADATA)]
    pub azure_imds_url: String,
    /// GKE / Compute Engine metadata server, for `gcpIdentityToken` evidence.
    #[arg(long, env = "CLOUDPASS_GCP_METADATA_URL", default_value = LINK_LOCAL_METADATA)]
    pub gcp_metadata_url: String,
    /// The broker's server ID, signed into `awsRole` evidence (the pre-signed
    /// `GetCallerIdentity`) as `x-cloudpass-server-id` so that it is valid for this broker
    /// only. Default: the host of the configuration's broker URL, without the port; set it
    /// when the broker knows itself by another name.
    #[arg(long, env = "CLOUDPASS_BROKER_SERVER_ID")]
    pub broker_server_id: Option<String>,
    /// AWS instance metadata service (IMDSv2), for `awsRole` evidence when neither AWS
    /// keys nor `AWS_CONTAINER_CREDENTIALS_FULL_URI` are set (the standard AWS variables,
    /// `AWS_REGION` and `AWS_ENDPOINT_URL_STS` included, are read as the AWS SDKs do).
    #[arg(long, env = "CLOUDPASS_AWS_IMDS_URL", default_value = LINK_LOCAL_METADATA)]
    pub aws_imds_url: String,
}

fn default_token_file() -> String {
    format!("{TOKEN_DIR}/{TOKEN_FILE}")
}

fn default_broker_ca_file() -> String {
    format!("{TOKEN_DIR}/{BROKER_CA_FILE}")
}

impl RunArgs {
    /// The parsed agent configuration only (what `probe` needs); the defaults when none
    /// is given.
    pub fn agent_config(&self) -> Result<AgentConfig, AgentError> {
        let Some(json) = self.config.as_deref() else { return Ok(AgentConfig::default()) };
        serde_json::from_str(json).map_err(|e| AgentError::Config(format!("{AGENT_CONFIG_ENV} is not valid: {e}")))
    }

    /// Checked settings of the running agent.
    pub fn into_settings(self) -> Result<Settings, AgentError> {
        let config = self.agent_config()?;
        let upstream_ca_pem = match &self.upstream_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| AgentError::Config(format!("--upstream-ca-file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let settings = Settings {
            broker: BrokerClientSettings {
                url: config.broker_url.clone(),
                ca: match self.broker_ca.filter(|pem| !pem.trim().is_empty()) {
                    Some(pem) => Some(BrokerCa::Pem(pem)),
                    None => Some(PathBuf::from(self.broker_ca_file)).filter(|file| file.exists()).map(BrokerCa::File),
                },
                trust_system_roots: self.broker_trust_system_roots,
                token_file: PathBuf::from(self.token_file),
                timeout: self.broker_timeout.as_std(),
                evidence: EvidenceSettings {
                    azure_imds_url: self.azure_imds_url,
                    gcp_metadata_url: self.gcp_metadata_url,
                    aws_imds_url: self.aws_imds_url,
                    aws: AwsSource::from_env(),
                    server_id: self.broker_server_id.filter(|id| !id.is_empty()),
                },
            },
            config,
            shared_dir: self.shared_dir,
            identity_header: self.identity_header.filter(|h| !h.is_empty()).map(SecretString::new),
            upstream_ca_pem,
            retry: RetrySettings { initial: self.retry_initial.as_std(), max: self.retry_max.as_std() },
            sigv4_max_body_bytes: self.sigv4_max_body_bytes,
            shutdown_grace: self.shutdown_grace.as_std(),
            server_ca_dir: self.server_ca_dir,
            config_refresh: self.config_refresh.as_std(),
        };
        settings.validate()?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn help_documents_every_flag_and_hides_secret_values() {
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        for flag in [
            "--config",
            "CLOUDPASS_AGENT_CONFIG",
            "--broker-ca",
            "CLOUDPASS_BROKER_CA",
            "--broker-ca-file",
            "--token-file",
            "--shared-dir",
            "--identity-header",
            "IDENTITY_HEADER",
            "--upstream-ca-file",
            "--retry-max",
            "--broker-server-id",
            "--log-format",
            "probe",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        let command = Args::command();
        for secret in ["config", "broker_ca", "identity_header"] {
            let arg = command.get_arguments().find(|a| a.get_id() == secret).unwrap();
            assert!(arg.is_hide_env_values_set(), "--help must not print the value of {secret}");
        }
    }
}
