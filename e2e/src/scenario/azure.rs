//! The Azure side: Azurite (Blob) with OAuth on (`--oauth basic`: it accepts only bearer
//! tokens over HTTPS whose issuer is an Entra v1 issuer and whose audience is Azure
//! Storage, unexpired; it does not check signatures), and the Entra fake, which does the
//! federation check Azurite cannot: the broker's client assertion against the app's
//! federated identity credential. The EKS → Azure Blob example, pointed at them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::{Deployed, Example, emulators_bin, example::App};
use crate::{
    certs::TestCa,
    fakes::entra::{EntraApp, EntraConfig, EntraFake, FederatedCredential},
    process::ManagedProcess,
};

/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// The container the app writes to.
pub const CONTAINER: &str = "reports";
/// The Azure Blob app: azure-identity's ManagedIdentityCredential and azure-storage-blob
/// write a blob and read it back (JSON on the last line).
pub const BLOB_APP: &str = include_str!("apps/azure_blob.py");

/// A running Azurite Blob service over HTTPS with OAuth; stops on drop.
pub struct Azurite {
    process: ManagedProcess,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    _dir: TempDir,
}

impl Azurite {
    /// Starts `azurite-blob` (installed by `make tools`) with a serving certificate of `ca`,
    /// `--oauth basic`, in memory, and waits until it answers.
    pub async fn start(ca: &TestCa) -> Result<Self> {
        let bin = emulators_bin()?;
        let dir = tempfile::Builder::new().prefix("cloudpass-azurite-").tempdir()?;
        let pair = ca.issue_server(&[])?;
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, &pair.cert_pem)?;
        std::fs::write(&key, &pair.key_pem)?;
        let port = crate::net::free_port()?;
        let args: Vec<String> = vec![
            "--blobHost".into(),
            crate::net::listen_address().to_string(),
            "--blobPort".into(),
            port.to_string(),
            "--oauth".into(),
            "basic".into(),
            "--cert".into(),
            cert.to_string_lossy().into_owned(),
            "--key".into(),
            key.to_string_lossy().into_owned(),
            "--inMemoryPersistence".into(),
            "--disableTelemetry".into(),
            "--skipApiVersionCheck".into(),
        ];
        let mut process =
            ManagedProcess::spawn("azurite", &bin.join("azurite-blob"), &args, &dir.path().join("azurite.log"), &[])?;
        let url = crate::net::local_url("https", port);
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes())?])
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Any HTTP answer (an anonymous request is refused) means it serves.
        while http.get(format!("{url}/{ACCOUNT}?comp=list")).send().await.is_err() {
            if process.has_exited() {
                bail!("azurite exited before answering; log tail:\n{}", process.log_tail(4000));
            }
            if Instant::now() > deadline {
                bail!("azurite did not answer within 60 s; log tail:\n{}", process.log_tail(4000));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self { process, url, _dir: dir })
    }

    /// The account URL the SDK uses (IP-style: the account is the first path segment).
    pub fn account_url(&self) -> String {
        format!("{}/{ACCOUNT}", self.url)
    }

    /// The last part of Azurite's log (one line per request).
    pub fn log_tail(&self) -> String {
        self.process.log_tail(8000)
    }
}

/// The EKS → Azure Blob direction, set up in a namespace: an Entra tenant (the example's
/// tenant ID) whose app registration (the example's client ID) has a federated identity
/// credential for the cloudpass issuer and subject
/// `system:cloudpass:<namespace>:azure-blob-writer`, audience `api://AzureADTokenExchange`.
pub struct EksToAzureBlob {
    /// The namespace.
    pub namespace: String,
    /// The Entra fake (the tenant's token endpoint).
    pub entra: EntraFake,
    /// The example, pointed at the Entra fake and Azurite.
    pub example: Example,
    /// The pod its Deployment would create.
    pub pod: Value,
    /// Its app.
    pub app: App,
    /// The federated credential's subject.
    pub subject: String,
}

impl EksToAzureBlob {
    /// Sets up Entra and the example for `namespace` (which must exist, opted in), with
    /// the app writing to `azurite`.
    pub async fn prepare(stack: &dyn Deployed, azurite: &Azurite, namespace: &str) -> Result<Self> {
        let mut example = Example::load("eks-to-azure-blob")?;
        let spec = &example.get("CredentialProvider", "azure-blob-writer")?["spec"]["azureWorkloadIdentity"];
        let tenant = spec["tenantId"].as_str().context("tenantId")?.to_owned();
        let client_id = spec["clientId"].as_str().context("clientId")?.to_owned();
        let subject = format!("system:cloudpass:{namespace}:azure-blob-writer");
        let entra = EntraFake::start(
            EntraConfig {
                tenant_id: tenant,
                apps: vec![EntraApp {
                    client_id,
                    object_id: "6d1f7a52-0c3e-4b8d-9a6f-2e5c4b3a1f00".into(),
                    federated_credentials: vec![FederatedCredential::new(stack.issuer_url(), &subject)],
                }],
                issuer_ca_pem: stack.issuer_ca_pem(),
            },
            stack.cloud_ca(),
        )
        .await?;
        example.set(
            "CredentialProvider",
            "azure-blob-writer",
            "/spec/azureWorkloadIdentity/authorityHost",
            json!(entra.url()),
        )?;
        let app = App::new(
            "report-uploader",
            "app",
            "azure_blob.py",
            &[("AZURE_STORAGE_ACCOUNT_URL", &azurite.account_url()), ("CONTAINER", CONTAINER)],
        );
        let pod = example.app_pod(&app)?;
        Ok(Self { namespace: namespace.to_owned(), entra, example, pod, app, subject })
    }

    /// Applies the example's objects and waits until its policy is Ready.
    pub async fn apply(&self, stack: &dyn Deployed) -> Result<String> {
        stack.apply_example(&self.namespace, &self.example, "report-uploader-to-blob").await
    }
}
