//! `kubectl-cloudpass`: a kubectl plugin (`kubectl cloudpass ...`) that reads the cluster
//! with the caller's own kubeconfig and says what cloudpass does and needs.
//!
//! `trust`: for each federated CredentialProvider, the issuer, audience and subjects of
//! the tokens the broker signs, and the exact cloud-side configuration to create.
//! `who-can`: who can obtain a CredentialProvider's credential, through which policies,
//! under which conditions, and which running workloads that is.
//! `verify`: the cloud-side check of a federated CredentialProvider, now.
//! `explain pod`: why a pod has (or lacks) credentials.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod explain;
mod verify;
mod who_can;

use std::{fmt::Write as _, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use cloudpass_api::{AccessPolicy, CredentialProvider, TrustProvider};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{Api, Client, ResourceExt, api::ListParams};

use cloudpass_api::cloud_trust::{self as trust, Trust};

/// What cloudpass does and needs, read from the cluster with your kubeconfig.
#[derive(Parser, Debug)]
#[command(name = "kubectl-cloudpass", bin_name = "kubectl cloudpass", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// What each cloud must trust for the federated CredentialProviders (awsSts,
    /// azureWorkloadIdentity, gcpWorkloadIdentity, oidcToken), and the commands and
    /// documents that configure it.
    Trust(TrustArgs),
    /// Who can obtain a CredentialProvider's credential: through which AccessPolicies, as
    /// which service accounts, verified by which TrustProviders, under which conditions,
    /// and which running workloads that means now.
    WhoCan(WhoCanArgs),
    /// Checks a federated CredentialProvider's cloud-side trust now: asks the operator
    /// for a real exchange at the cloud (its `Verified` condition) and prints the result;
    /// exits 1 unless the cloud accepted.
    Verify(VerifyArgs),
    /// Why an object has (or lacks) credentials.
    Explain {
        #[command(subcommand)]
        what: Explain,
    },
}

#[derive(Subcommand, Debug)]
enum Explain {
    /// Whether its namespace is opted in, which AccessPolicies select it and why the
    /// others do not, what was injected, which deliveries each container has, and the
    /// broker's last decisions for it (from the broker's audit records).
    Pod(ExplainPodArgs),
}

#[derive(clap::Args, Debug)]
struct ExplainPodArgs {
    /// The pod.
    name: String,
    /// Its namespace. Default: the kubeconfig context's.
    #[arg(short, long)]
    namespace: Option<String>,
    /// Namespace cloudpass is installed in (its broker pods' audit records are read).
    #[arg(long, default_value = "cloudpass-system")]
    cloudpass_namespace: String,
    /// How many of the broker's last decisions for the pod to show.
    #[arg(long, default_value_t = 5)]
    decisions: usize,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args, Debug)]
struct VerifyArgs {
    /// The CredentialProvider.
    name: String,
    /// Its namespace. Default: the kubeconfig context's.
    #[arg(short, long)]
    namespace: Option<String>,
    /// How long to wait for the operator's answer.
    #[arg(long, default_value = "60s", value_parser = humantime_seconds)]
    timeout: std::time::Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// A duration such as `60s`, `2m` or `500ms`.
fn humantime_seconds(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<cloudpass_api::duration::Duration>().map(|d| d.as_std()).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
struct WhoCanArgs {
    /// The CredentialProvider.
    name: String,
    /// Its namespace. Default: the kubeconfig context's.
    #[arg(short, long)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args, Debug)]
struct TrustArgs {
    /// Only this CredentialProvider.
    name: Option<String>,
    /// Namespace of the CredentialProviders. Default: the kubeconfig context's.
    #[arg(short, long)]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with_all = ["namespace", "name"])]
    all_namespaces: bool,
    /// The cloudpass issuer URL. Default: the `--issuer-url` of the broker Deployment
    /// `<release>-broker` in `--cloudpass-namespace`.
    #[arg(long, env = "CLOUDPASS_ISSUER_URL")]
    issuer_url: Option<String>,
    /// Namespace cloudpass is installed in.
    #[arg(long, default_value = "cloudpass-system")]
    cloudpass_namespace: String,
    /// Helm release name of cloudpass.
    #[arg(long, default_value = "cloudpass")]
    release: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A table, then each provider's configuration steps.
    Table,
    /// One JSON document.
    Json,
    /// One YAML document.
    Yaml,
}

/// Why a command failed, in words that name what is missing.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("no Kubernetes configuration: {0}")]
    Config(String),
    #[error("{0}")]
    NotFound(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Format(String),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Trust(trust) => run_trust(trust).await,
        Command::WhoCan(who) => run_who_can(who).await,
        Command::Verify(args) => match verify::run(args).await {
            // A refusal is an answer: printed, and exit status 1.
            Ok((text, false)) => {
                print!("{text}");
                return ExitCode::FAILURE;
            }
            Ok((text, true)) => Ok(text),
            Err(e) => Err(e),
        },
        Command::Explain { what: Explain::Pod(pod) } => run_explain_pod(pod).await,
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn client() -> Result<(Client, String), Error> {
    let config = kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?;
    let namespace = config.default_namespace.clone();
    Ok((Client::try_from(config).map_err(|e| Error::Config(e.to_string()))?, namespace))
}

/// The issuer URL the broker Deployment of the release runs with.
async fn issuer_of_release(client: &Client, namespace: &str, release: &str) -> Result<String, Error> {
    let name = format!("{release}-broker");
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace).get_opt(&name).await?.ok_or_else(|| {
        Error::NotFound(format!(
            "Deployment {namespace}/{name} not found, so the issuer URL is unknown: pass --issuer-url, or --cloudpass-namespace and --release"
        ))
    })?;
    let containers = deployment.spec.template.spec.map(|s| s.containers).unwrap_or_default();
    containers
        .iter()
        .flat_map(|c| c.args.iter().flatten())
        .find_map(|a| a.strip_prefix("--issuer-url=").map(str::to_owned))
        .ok_or_else(|| {
            Error::NotFound(format!("Deployment {namespace}/{name} has no --issuer-url argument: pass --issuer-url"))
        })
}

async fn run_trust(args: TrustArgs) -> Result<String, Error> {
    let (client, default_namespace) = client().await?;
    let issuer = match &args.issuer_url {
        Some(url) => url.clone(),
        None => issuer_of_release(&client, &args.cloudpass_namespace, &args.release).await?,
    };
    let namespace = args.namespace.clone().unwrap_or(default_namespace);
    let (providers, policies): (Api<CredentialProvider>, Api<AccessPolicy>) = if args.all_namespaces {
        (Api::all(client.clone()), Api::all(client.clone()))
    } else {
        (Api::namespaced(client.clone(), &namespace), Api::namespaced(client.clone(), &namespace))
    };
    let providers = match &args.name {
        Some(name) => vec![
            providers
                .get_opt(name)
                .await?
                .ok_or_else(|| Error::NotFound(format!("CredentialProvider {namespace}/{name} not found")))?,
        ],
        None => providers.list(&ListParams::default()).await?.items,
    };
    let policies = policies.list(&ListParams::default()).await?.items;
    let trusts: Vec<Trust> = providers
        .iter()
        .filter_map(|p| {
            let same_namespace: Vec<AccessPolicy> =
                policies.iter().filter(|a| a.namespace() == p.namespace()).cloned().collect();
            trust::of(p, &same_namespace, &issuer)
        })
        .collect();
    if let (Some(name), true) = (&args.name, trusts.is_empty()) {
        return Err(Error::NotFound(format!(
            "CredentialProvider {namespace}/{name} is not federated: it needs nothing in a cloud"
        )));
    }
    match args.output {
        Output::Json => {
            serde_json::to_string_pretty(&trusts).map(|s| s + "\n").map_err(|e| Error::Format(e.to_string()))
        }
        Output::Yaml => serde_yaml::to_string(&trusts).map_err(|e| Error::Format(e.to_string())),
        Output::Table => Ok(table(&trusts)),
    }
}

async fn run_who_can(args: WhoCanArgs) -> Result<String, Error> {
    let (client, default_namespace) = client().await?;
    let namespace = args.namespace.unwrap_or(default_namespace);
    let name = &args.name;
    Api::<CredentialProvider>::namespaced(client.clone(), &namespace)
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("CredentialProvider {namespace}/{name} not found")))?;
    let list = ListParams::default();
    let policies = Api::<AccessPolicy>::namespaced(client.clone(), &namespace).list(&list).await?.items;
    let trust = Api::<TrustProvider>::namespaced(client.clone(), &namespace).list(&list).await?.items;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace).list(&list).await?.items;
    let access = who_can::of(name, &policies, &trust, &pods);
    match args.output {
        Output::Json => {
            serde_json::to_string_pretty(&access).map(|s| s + "\n").map_err(|e| Error::Format(e.to_string()))
        }
        Output::Yaml => serde_yaml::to_string(&access).map_err(|e| Error::Format(e.to_string())),
        Output::Table if access.is_empty() => Ok(format!(
            "No AccessPolicy of namespace {namespace} uses CredentialProvider {name}: nobody can obtain it.\n"
        )),
        Output::Table => Ok(columns(
            ["POLICY", "READY", "SERVICE-ACCOUNTS", "PODS", "TRUST-PROVIDERS", "WORKLOADS", "CONDITIONS"],
            access.iter().map(|a| {
                [
                    a.policy.clone(),
                    a.ready.clone(),
                    a.service_accounts.join(","),
                    a.pod_selector.clone(),
                    a.trust_providers.join("; "),
                    a.workloads
                        .iter()
                        .map(|w| format!("{} ({} as {})", w.owner, w.pods, w.service_account))
                        .collect::<Vec<_>>()
                        .join(", "),
                    a.conditions.join("; "),
                ]
            }),
        )),
    }
}

/// Lines of the broker pods' logs the audit records are searched in, per pod.
const AUDIT_TAIL_LINES: i64 = 5000;

/// The broker pods' recent log lines that are JSON (audit records among them), or why
/// they cannot be read.
async fn broker_records(client: &Client, namespace: &str) -> Result<Vec<serde_json::Value>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let brokers = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=broker"))
        .await
        .map_err(|e| format!("cannot list the broker pods in {namespace}: {e}"))?;
    if brokers.items.is_empty() {
        return Err(format!("no broker pod in {namespace} (app.kubernetes.io/component=broker)"));
    }
    let mut records = Vec::new();
    for broker in &brokers.items {
        let name = broker.name_any();
        let params = kube::api::LogParams { tail_lines: Some(AUDIT_TAIL_LINES), ..Default::default() };
        let text =
            pods.logs(&name, &params).await.map_err(|e| format!("cannot read the logs of {namespace}/{name}: {e}"))?;
        records.extend(text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()));
    }
    records.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    Ok(records)
}

async fn run_explain_pod(args: ExplainPodArgs) -> Result<String, Error> {
    let (client, default_namespace) = client().await?;
    let namespace = args.namespace.unwrap_or(default_namespace);
    let name = &args.name;
    let pod = Api::<Pod>::namespaced(client.clone(), &namespace)
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("pod {namespace}/{name} not found")))?;
    let ns = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get_opt(&namespace)
        .await?
        .ok_or_else(|| Error::NotFound(format!("namespace {namespace} not found")))?;
    let policies =
        Api::<AccessPolicy>::namespaced(client.clone(), &namespace).list(&ListParams::default()).await?.items;
    let records = broker_records(&client, &args.cloudpass_namespace).await;
    let explanation = explain::of(&pod, &ns, &policies, records, args.decisions);
    match args.output {
        Output::Json => {
            serde_json::to_string_pretty(&explanation).map(|s| s + "\n").map_err(|e| Error::Format(e.to_string()))
        }
        Output::Yaml => serde_yaml::to_string(&explanation).map_err(|e| Error::Format(e.to_string())),
        Output::Table => Ok(explain_text(&explanation)),
    }
}

fn explain_text(e: &explain::Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Pod {} (service account {})", e.pod, e.service_account);
    let opted = if e.namespace_opted_in { "yes" } else { "no: label it cloudpass.dev/injection=enabled" };
    let _ = writeln!(out, "Namespace opted in: {opted}");
    let injected = e.injected.as_ref().map_or("no".to_owned(), |v| format!("yes, agent {v}"));
    let _ = writeln!(out, "Agent injected: {injected}");
    if let Some(skipped) = &e.skipped {
        let _ = writeln!(out, "Left out by the webhook: {skipped}");
    }
    let _ = writeln!(out, "\nPolicies:");
    out.push_str(&columns(
        ["POLICY", "SELECTS", "WHY", "READY", "CREDENTIAL-PROVIDER"],
        e.policies.iter().map(|p| {
            [
                p.policy.clone(),
                if p.selects { "yes" } else { "no" }.into(),
                p.why.clone(),
                p.ready.clone(),
                p.credential_provider.clone(),
            ]
        }),
    ));
    if !e.deliveries.is_empty() {
        let _ = writeln!(out, "\nDeliveries:");
        out.push_str(&columns(
            ["POLICY", "ENDPOINT", "CONTAINERS"],
            e.deliveries.iter().map(|d| [d.policy.clone(), d.endpoint.clone(), d.containers.join(",")]),
        ));
    }
    let _ = writeln!(out, "\nBroker decisions:");
    match &e.decisions_unavailable {
        Some(why) => {
            let _ = writeln!(out, "  unavailable: {why}");
        }
        None if e.decisions.is_empty() => {
            let _ = writeln!(out, "  none in the broker's recent records");
        }
        None => out.push_str(&columns(
            ["TIME", "POLICY", "OUTCOME", "REASON"],
            e.decisions.iter().map(|d| {
                let text = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
                [text("time"), text("policy"), text("outcome"), text("reason")]
            }),
        )),
    }
    out
}

/// A policy's `Ready` condition in words: `True`, or the status with its reason (a
/// policy that is not Ready gives nothing).
fn policy_ready(policy: &AccessPolicy) -> String {
    match policy.status.as_ref().and_then(|s| s.status.condition(cloudpass_api::common::CONDITION_READY)) {
        Some(c) if c.status == "True" => "True".into(),
        Some(c) => format!("{} ({})", c.status, c.reason),
        None => "Unknown (not reconciled yet)".into(),
    }
}

/// Rows under a header, each column as wide as its widest cell.
fn columns<const N: usize>(header: [&str; N], rows: impl Iterator<Item = [String; N]>) -> String {
    let rows: Vec<[String; N]> = std::iter::once(header.map(String::from)).chain(rows).collect();
    let widths: Vec<usize> = (0..N).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("   ").trim_end());
    }
    out
}

fn table(trusts: &[Trust]) -> String {
    if trusts.is_empty() {
        return "No federated CredentialProvider found.\n".into();
    }
    let mut out = columns(
        ["NAMESPACE", "NAME", "KIND", "AUDIENCE", "SUBJECTS"],
        trusts
            .iter()
            .map(|t| [t.namespace.clone(), t.name.clone(), t.kind.clone(), t.audience.clone(), t.subjects.join(",")]),
    );
    for t in trusts {
        let _ = writeln!(out, "\n# {}/{} ({}): tokens from {}", t.namespace, t.name, t.kind, t.issuer);
        for step in &t.configure {
            let _ = writeln!(out, "# {}\n{}", step.what, step.text);
        }
    }
    out
}
