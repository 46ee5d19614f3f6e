//! Plain HTTPS APIs behind the agent's header proxy: a weather API that wants an API key
//! in `X-API-Key` (from a Secret, or from an Azure Key Vault), and a partner API that
//! wants an OAuth 2.0 bearer token from the OAuth2 fake's client-credentials endpoint. The app sends plain HTTP through `HTTP_PROXY`; the
//! agent adds the header and calls the API over HTTPS.
//!
//! The APIs listen on 127.0.0.2: still loopback, but not in the `NO_PROXY` list the webhook
//! sets (`localhost,127.0.0.1,...`), so the app's requests do go through the proxy, and the
//! policy's host pattern is that address.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use super::{Deployed, Example, example::App};
use crate::{
    certs::TestCa,
    fakes::{
        entra::{EntraApp, EntraConfig, EntraFake, FederatedCredential},
        google::{GoogleConfig, GoogleFake, WorkloadIdentityProvider},
        oauth2::{OAuth2Client, OAuth2Config, OAuth2Fake},
        secret_stores::{KeyVaultFake, SecretManagerFake},
    },
    tls::server_config,
};

/// Where the APIs listen: 127.0.0.2 on loopback (the `NO_PROXY` the webhook sets names
/// `127.0.0.1`, and the app's requests must go through the agent's proxy), else the test
/// bed's listen address.
pub fn api_host() -> String {
    let listen = crate::net::listen_address();
    if listen.is_loopback() { "127.0.0.2".into() } else { listen.to_string() }
}
/// The app: `requests` GETs `$API_URL$API_PATH` (through `HTTP_PROXY`) and prints the
/// status and answer as JSON (last line).
pub const HTTP_APP: &str = include_str!("apps/http_api.py");

/// How an API authenticates its callers.
pub enum ApiAuth {
    /// A fixed key in a header.
    ApiKey {
        /// The header.
        header: String,
        /// The key.
        key: String,
    },
    /// A bearer token the OAuth2 fake issued, with this scope.
    OAuth2 {
        /// The token endpoint that issued it.
        issuer: Arc<OAuth2Fake>,
        /// A scope the token must carry.
        scope: String,
    },
}

struct ApiState {
    auth: ApiAuth,
    served: AtomicU64,
    callers: Mutex<Vec<String>>,
}

/// The ConfigMap holding the CA of the local APIs' certificates, named by the policies'
/// `server.tls`.
pub const API_CA_CONFIGMAP: &str = "api-ca";

/// Creates (or keeps) [`API_CA_CONFIGMAP`] in `namespace` with the cloud CA, as a
/// user creates the ConfigMap of a private CA.
fn trust_api_ca(stack: &dyn Deployed, namespace: &str) -> Result<()> {
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": API_CA_CONFIGMAP},
        "data": {"ca.crt": stack.cloud_ca().cert_pem()},
    });
    stack.cp().apply_yaml(Some(namespace), &manifest.to_string()).map(drop)
}

/// An HTTPS API on [`api_host`]; stops on drop.
pub struct HttpApi {
    task: JoinHandle<()>,
    state: Arc<ApiState>,
    /// Its port.
    pub port: u16,
}

impl HttpApi {
    /// Serves the API over HTTPS with a certificate of `ca` for [`api_host`].
    pub async fn start(auth: ApiAuth, ca: &TestCa) -> Result<Self> {
        let host = api_host();
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&ca.issue_server(&[&host])?)?));
        let listener = TcpListener::bind((host.as_str(), 0)).await.with_context(|| format!("binding {host}"))?;
        let addr: SocketAddr = listener.local_addr()?;
        let state = Arc::new(ApiState { auth, served: AtomicU64::new(0), callers: Mutex::new(Vec::new()) });
        let router = Router::new().fallback(answer).with_state(state.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                while connections.try_join_next().is_some() {}
                let (acceptor, service) = (acceptor.clone(), TowerToHyperService::new(router.clone()));
                connections.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ =
                            auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
                    }
                });
            }
        });
        Ok(Self { task, state, port: addr.port() })
    }

    /// Requests answered with 200.
    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::SeqCst)
    }

    /// Who the authorised calls came as (the OAuth2 client, or `api-key`).
    pub fn callers(&self) -> Vec<String> {
        self.state.callers.lock().expect("callers lock").clone()
    }
}

impl Drop for HttpApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(state): State<Arc<ApiState>>, uri: Uri, headers: HeaderMap) -> Response {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let caller = match &state.auth {
        ApiAuth::ApiKey { header, key } => {
            (value(header).as_deref() == Some(key.as_str())).then(|| "api-key".to_owned())
        }
        ApiAuth::OAuth2 { issuer, scope } => value(header::AUTHORIZATION.as_str())
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
            .and_then(|token| issuer.token_info(&token))
            .filter(|t| t.scopes.contains(scope))
            .map(|t| t.client_id),
    };
    let Some(caller) = caller else {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "unauthorized"}))).into_response();
    };
    state.served.fetch_add(1, Ordering::SeqCst);
    state.callers.lock().expect("callers lock").push(caller.clone());
    Json(json!({"path": uri.path(), "caller": caller, "data": "sunny, 21 C"})).into_response()
}

/// An HTTP-API direction set up in a namespace: the example, pointed at a local API.
pub struct HttpApiScenario {
    /// The namespace.
    pub namespace: String,
    /// The API.
    pub api: HttpApi,
    /// The OAuth2 token endpoint, for the OAuth2 example.
    pub oauth2: Option<Arc<OAuth2Fake>>,
    /// The Entra tenant and the Key Vault, for the Key Vault example.
    pub key_vault: Option<(EntraFake, KeyVaultFake)>,
    /// Google STS and Secret Manager, for the Secret Manager example.
    pub secret_manager: Option<(GoogleFake, SecretManagerFake)>,
    /// The example.
    pub example: Example,
    /// The pod its Deployment would create.
    pub pod: Value,
    /// Its app.
    pub app: App,
    /// The policy's name.
    pub policy: String,
}

impl HttpApiScenario {
    /// The scenario of `example`'s `policy` with `api` as its server: the policy's host
    /// and port point at the local API, whose certificate comes from the test bed's CA as
    /// an internal API's from a private one (the agent's proxy trusts it through
    /// `server.tls`), and the app (`workload`, `container`) GETs `path` through the proxy.
    /// No cloud fakes: the constructors that start some keep them.
    fn serving(
        stack: &dyn Deployed,
        namespace: &str,
        mut example: Example,
        policy: &str,
        api: HttpApi,
        (workload, container, path): (&str, &str, &str),
    ) -> Result<Self> {
        example.set("AccessPolicy", policy, "/spec/server/hosts", json!([api_host()]))?;
        trust_api_ca(stack, namespace)?;
        example.set("AccessPolicy", policy, "/spec/server/tls", json!({"caConfigMap": {"name": API_CA_CONFIGMAP}}))?;
        example.set("AccessPolicy", policy, "/spec/server/port", json!(api.port))?;
        let app = App::new(
            workload,
            container,
            "http_api.py",
            &[("API_URL", &format!("http://{}", api_host())), ("API_PATH", path)],
        );
        let pod = example.app_pod(&app)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            api,
            oauth2: None,
            key_vault: None,
            secret_manager: None,
            example,
            pod,
            app,
            policy: policy.into(),
        })
    }

    /// `examples/http-api-key.yaml`: the Secret `weather-api` holds the key (created here
    /// with kubectl, as its comment says to), the policy's host is the local API.
    pub async fn api_key(stack: &dyn Deployed, namespace: &str) -> Result<Self> {
        let key = "wx-7f3a9c1e5b2d";
        stack.cp().kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "weather-api",
            "-n",
            namespace,
            &format!("--from-literal=api-key={key}"),
        ])?;
        let api =
            HttpApi::start(ApiAuth::ApiKey { header: "X-API-Key".into(), key: key.into() }, stack.cloud_ca()).await?;
        let example = Example::load("http-api-key")?;
        let policy = "forecaster-to-weather-api";
        Self::serving(stack, namespace, example, policy, api, ("forecaster", "app", "/v1/forecast?city=berlin"))
    }

    /// `examples/eks-to-key-vault-api-key.yaml`: the partner API's key lives in a Key
    /// Vault; its Entra tenant trusts the cloudpass issuer for the reader provider's
    /// subject, and the app registration may read that one secret. The vault, the tenant
    /// and the policy's host point here.
    pub async fn key_vault(stack: &dyn Deployed, namespace: &str) -> Result<Self> {
        let key = "pk-live-2c9e71b4";
        let mut example = Example::load("eks-to-key-vault-api-key")?;
        let reader = example.get("CredentialProvider", "partner-vault-reader")?;
        let tenant = reader["spec"]["azureWorkloadIdentity"]["tenantId"].as_str().context("tenantId")?.to_owned();
        let client_id = reader["spec"]["azureWorkloadIdentity"]["clientId"].as_str().context("clientId")?.to_owned();
        let object_id = "3e9d5c1b-7a28-4f46-b0e3-8c1d2a4b6f90";
        let subject = format!("system:cloudpass:{namespace}:partner-vault-reader");
        let entra = EntraFake::start(
            EntraConfig {
                tenant_id: tenant.clone(),
                apps: vec![EntraApp {
                    client_id,
                    object_id: object_id.into(),
                    federated_credentials: vec![FederatedCredential::new(stack.issuer_url(), &subject)],
                }],
                issuer_ca_pem: stack.issuer_ca_pem(),
            },
            stack.cloud_ca(),
        )
        .await?;
        let vault = KeyVaultFake::start(&tenant, entra.access_token_check(), stack.cloud_ca()).await?;
        vault.set_secret("partner-api-key", key, &[object_id]);
        let reader = "partner-vault-reader";
        example.set("CredentialProvider", reader, "/spec/azureWorkloadIdentity/authorityHost", json!(entra.url()))?;
        example.set("CredentialProvider", "partner-api-key", "/spec/azureKeyVault/vaultUrl", json!(vault.url()))?;
        let api =
            HttpApi::start(ApiAuth::ApiKey { header: "X-API-Key".into(), key: key.into() }, stack.cloud_ca()).await?;
        let policy = "invoicing-to-partner-api";
        let app = ("invoicing", "app", "/v1/invoices?status=open");
        Ok(Self { key_vault: Some((entra, vault)), ..Self::serving(stack, namespace, example, policy, api, app)? })
    }

    /// `examples/gke-to-secret-manager.yaml`: the webhook signing key lives in Secret
    /// Manager, readable by the federated principal of the reader provider's subject in a
    /// workload identity pool that trusts the cloudpass issuer.
    pub async fn secret_manager(stack: &dyn Deployed, namespace: &str) -> Result<Self> {
        let key = "whsec-3f8a0c27d1";
        let mut example = Example::load("gke-to-secret-manager")?;
        let reader = "webhook-secret-reader";
        let wip = WorkloadIdentityProvider::new("123456789", "cloudpass", "cloudpass", stack.issuer_url());
        let google = GoogleFake::start(
            GoogleConfig {
                providers: vec![wip.clone()],
                service_accounts: vec![],
                issuer_ca_pem: stack.issuer_ca_pem(),
            },
            stack.cloud_ca(),
        )
        .await?;
        let manager = SecretManagerFake::start(google.access_token_check(), stack.cloud_ca()).await?;
        let secret = "projects/my-project/secrets/webhook-signing-key";
        manager.add_version(secret, key, &[&wip.principal(&format!("system:cloudpass:{namespace}:{reader}"))]);
        example.set("CredentialProvider", reader, "/spec/gcpWorkloadIdentity/stsEndpoint", json!(google.url()))?;
        example.set(
            "CredentialProvider",
            "webhook-signing-key",
            "/spec/gcpSecretManager/endpoint",
            json!(manager.url()),
        )?;
        let api = HttpApi::start(ApiAuth::ApiKey { header: "X-Signing-Key".into(), key: key.into() }, stack.cloud_ca())
            .await?;
        let policy = "notifier-to-hooks";
        let app = ("notifier", "app", "/v1/hooks");
        Ok(Self {
            secret_manager: Some((google, manager)),
            ..Self::serving(stack, namespace, example, policy, api, app)?
        })
    }

    /// `examples/oauth2-client-credentials.yaml`: the OAuth2 fake knows the example's
    /// client; the Secret `partner-oauth` holds its secret; the token URL and the policy's
    /// host point here. The example's business-hours time window is removed, so that the
    /// scenario does not depend on the hour it runs (the time-window scenario covers it).
    pub async fn oauth2(stack: &dyn Deployed, namespace: &str) -> Result<Self> {
        Self::oauth2_with_token_lifetime(stack, namespace, Duration::from_secs(3600)).await
    }

    /// [`HttpApiScenario::oauth2`] with tokens of `token_lifetime`: the broker serves a
    /// token until a quarter of its life is left, the agent refreshes it then, so a short
    /// lifetime makes the agent ask the broker again soon (revocation, outages).
    pub async fn oauth2_with_token_lifetime(
        stack: &dyn Deployed,
        namespace: &str,
        token_lifetime: Duration,
    ) -> Result<Self> {
        let secret = "Oa-partner-5d41402a";
        stack.cp().kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "partner-oauth",
            "-n",
            namespace,
            &format!("--from-literal=client-secret={secret}"),
        ])?;
        let oauth2 = Arc::new(
            OAuth2Fake::start(
                OAuth2Config {
                    clients: vec![OAuth2Client {
                        client_id: "cloudpass-billing".into(),
                        client_secret: secret.into(),
                        allowed_scopes: vec!["invoices:read".into(), "invoices:write".into()],
                    }],
                    token_lifetime,
                },
                stack.cloud_ca(),
            )
            .await?,
        );
        let api =
            HttpApi::start(ApiAuth::OAuth2 { issuer: oauth2.clone(), scope: "invoices:read".into() }, stack.cloud_ca())
                .await?;
        let mut example = Example::load("oauth2-client-credentials")?;
        let policy = "billing-to-partner-api";
        example.set(
            "CredentialProvider",
            "partner-api",
            "/spec/oauth2ClientCredentials/tokenUrl",
            json!(oauth2.token_url()),
        )?;
        example.set("AccessPolicy", policy, "/spec/conditions", json!({}))?;
        let app = ("billing", "billing", "/v1/invoices?status=open");
        Ok(Self { oauth2: Some(oauth2), ..Self::serving(stack, namespace, example, policy, api, app)? })
    }

    /// Applies the example's objects and waits until its policy is Ready.
    pub async fn apply(&self, stack: &dyn Deployed) -> Result<String> {
        stack.apply_example(&self.namespace, &self.example, &self.policy).await
    }
}
