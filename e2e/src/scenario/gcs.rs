//! The GCP side: fake-gcs-server (the GCS JSON API, no authentication of its own) behind a
//! small HTTPS gate that checks every request's bearer token the way GCS does (issued by
//! Google, unexpired, OAuth scopes sufficient for the method, the identity allowed on the
//! bucket), and the Google fake (STS token exchange and service-account impersonation)
//! that issues those tokens. The any-cluster → GCS example, pointed at them.
//!
//! Apps use an explicit API endpoint (`client_options={"api_endpoint": ...}`), never
//! `STORAGE_EMULATOR_HOST`, which makes the client drop its credentials.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;

use super::{Deployed, Example, emulators_bin, example::App};
use crate::{
    certs::TestCa,
    fakes::google::{GoogleConfig, GoogleFake, ServiceAccount, WorkloadIdentityProvider},
    process::{ManagedProcess, free_port},
    tls::serve_https,
};

/// The bucket of the example's dashboards, seeded with [`OBJECT`].
pub const BUCKET: &str = "dashboards";
/// The seeded object.
pub const OBJECT: &str = "daily/visits.csv";
/// Its content.
pub const OBJECT_CONTENT: &str = "day,visits\nmonday,1024\n";
/// The GCS app: google-cloud-storage with the metadata-server credentials reads the
/// seeded object and tries to write one (JSON on the last line).
pub const GCS_APP: &str = include_str!("apps/gcs.py");

/// Scopes that allow reading objects.
const READ_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/devstorage.read_only",
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/devstorage.full_control",
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/cloud-platform.read-only",
];
/// Scopes that allow writing objects.
const WRITE_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/devstorage.full_control",
    "https://www.googleapis.com/auth/cloud-platform",
];

struct GateState {
    google: Arc<GoogleFake>,
    upstream: String,
    allowed_identities: Vec<String>,
    http: reqwest::Client,
    served: AtomicU64,
}

/// fake-gcs-server behind the token-checking gate; stops on drop.
pub struct GcsGate {
    process: ManagedProcess,
    task: JoinHandle<()>,
    state: Arc<GateState>,
    /// The API endpoint, `https://127.0.0.1:<port>`.
    pub url: String,
    _dir: TempDir,
}

impl GcsGate {
    /// Starts fake-gcs-server (installed by `make tools`) with bucket [`BUCKET`] holding
    /// [`OBJECT`], and the gate in front of it, serving with a certificate of `ca`. Only
    /// tokens `google` issued, for one of `allowed_identities`, pass.
    pub async fn start(google: Arc<GoogleFake>, allowed_identities: Vec<String>, ca: &TestCa) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cloudpass-gcs-").tempdir()?;
        let seed = dir.path().join("data").join(BUCKET).join(OBJECT);
        std::fs::create_dir_all(seed.parent().context("object path")?)?;
        std::fs::write(&seed, OBJECT_CONTENT)?;
        let port = free_port()?;
        let upstream = format!("http://127.0.0.1:{port}");
        let state = Arc::new(GateState {
            google,
            upstream: upstream.clone(),
            allowed_identities,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
            served: AtomicU64::new(0),
        });
        let router = Router::new().fallback(handle).with_state(state.clone());
        let (addr, task) = serve_https(router, &ca.issue_server(&[])?).await?;
        let url = crate::net::local_url("https", addr.port());
        let args: Vec<String> = [
            "-scheme=http".into(),
            "-host=127.0.0.1".into(),
            format!("-port={port}"),
            "-backend=memory".into(),
            format!("-data={}", dir.path().join("data").display()),
            // Upload sessions and media links point back at the gate.
            format!("-external-url={url}"),
            format!("-public-host={}", url.trim_start_matches("https://")),
            "-log-level=warn".into(),
        ]
        .into();
        let mut process = ManagedProcess::spawn(
            "fake-gcs-server",
            &emulators_bin()?.join("fake-gcs-server"),
            &args,
            &dir.path().join("fake-gcs-server.log"),
            &[],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while state.http.get(format!("{upstream}/storage/v1/b")).send().await.is_err() {
            if process.has_exited() || Instant::now() > deadline {
                task.abort();
                bail!("fake-gcs-server did not start; log tail:\n{}", process.log_tail(4000));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { process, task, state, url, _dir: dir })
    }

    /// Requests the gate let through.
    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::SeqCst)
    }

    /// The last part of fake-gcs-server's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(4000)
    }
}

impl Drop for GcsGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A GCS JSON API error.
fn gcs_error(status: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16(), "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}]}});
    let mut response =
        (status, [(header::CONTENT_TYPE, "application/json; charset=UTF-8")], body.to_string()).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer realm=\"https://accounts.google.com/\"".parse().expect("header"));
    }
    response
}

async fn handle(
    State(state): State<Arc<GateState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(bearer) = bearer else {
        return gcs_error(
            StatusCode::UNAUTHORIZED,
            "required",
            "Anonymous caller does not have storage access to this bucket.",
        );
    };
    let Some(token) = state.google.check_access_token(bearer) else {
        return gcs_error(StatusCode::UNAUTHORIZED, "authError", "Invalid Credentials");
    };
    let writes = !matches!(method, Method::GET | Method::HEAD);
    let needed = if writes { WRITE_SCOPES } else { READ_SCOPES };
    if !token.scopes.iter().any(|s| needed.contains(&s.as_str())) {
        return gcs_error(StatusCode::FORBIDDEN, "insufficientPermissions", "Provided scope(s) are not authorized");
    }
    if !state.allowed_identities.contains(&token.identity) {
        let who = token.identity.trim_start_matches("serviceAccount:");
        return gcs_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("{who} does not have storage access to this bucket."),
        );
    }
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut request = state.http.request(method, format!("{}{path_and_query}", state.upstream)).body(body);
    for (name, value) in &headers {
        let skip = [
            header::HOST,
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            header::CONNECTION,
            header::TRANSFER_ENCODING,
        ];
        if !skip.contains(name) {
            request = request.header(name, value);
        }
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(_) => return gcs_error(StatusCode::SERVICE_UNAVAILABLE, "backendError", "fake-gcs-server did not answer"),
    };
    let status = answer.status();
    let mut out = HeaderMap::new();
    for (name, value) in answer.headers() {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING && name != header::CONNECTION {
            out.append(name, value.clone());
        }
    }
    let body = answer.bytes().await.unwrap_or_default();
    state.served.fetch_add(1, Ordering::SeqCst);
    (status, out, body).into_response()
}

/// The any-cluster → GCS direction, set up in a namespace: a workload identity pool
/// provider trusting the cloudpass issuer, the example's service account impersonable by
/// `system:cloudpass:<namespace>:gcs-reader` of that pool, allowed on the bucket.
pub struct AnyToGcs {
    /// The namespace.
    pub namespace: String,
    /// Google STS and IAM Credentials.
    pub google: Arc<GoogleFake>,
    /// GCS (the gate in front of fake-gcs-server).
    pub gcs: GcsGate,
    /// The example, pointed at the fakes.
    pub example: Example,
    /// The pod its Deployment would create.
    pub pod: Value,
    /// Its app.
    pub app: App,
    /// The service account the pod acts as.
    pub service_account: String,
}

impl AnyToGcs {
    /// Sets up the Google side and the example for `namespace` (which must exist, opted in).
    pub async fn prepare(stack: &dyn Deployed, namespace: &str) -> Result<Self> {
        let mut example = Example::load("any-to-gcs")?;
        let spec = &example.get("CredentialProvider", "gcs-reader")?["spec"]["gcpWorkloadIdentity"];
        let provider_name = spec["workloadIdentityProvider"].as_str().context("workloadIdentityProvider")?.to_owned();
        let email = spec["serviceAccountEmail"].as_str().context("serviceAccountEmail")?.to_owned();
        let project = spec["projectId"].as_str().context("projectId")?.to_owned();
        let parts: Vec<&str> = provider_name.split('/').collect();
        let [_, number, _, _, _, pool, _, provider] = parts.as_slice() else {
            bail!("unexpected workloadIdentityProvider {provider_name}");
        };
        let wip = WorkloadIdentityProvider::new(number, pool, provider, stack.issuer_url());
        let subject = format!("system:cloudpass:{namespace}:gcs-reader");
        let google = Arc::new(
            GoogleFake::start(
                GoogleConfig {
                    providers: vec![wip.clone()],
                    service_accounts: vec![ServiceAccount {
                        email: email.clone(),
                        allowed_members: vec![wip.principal(&subject)],
                    }],
                    issuer_ca_pem: stack.issuer_ca_pem(),
                },
                stack.cloud_ca(),
            )
            .await?,
        );
        let gcs = GcsGate::start(google.clone(), vec![format!("serviceAccount:{email}")], stack.cloud_ca()).await?;
        for field in ["stsEndpoint", "iamCredentialsEndpoint"] {
            example.set(
                "CredentialProvider",
                "gcs-reader",
                &format!("/spec/gcpWorkloadIdentity/{field}"),
                json!(google.url()),
            )?;
        }
        let app = App::new(
            "dashboards",
            "web",
            "gcs.py",
            &[
                ("STORAGE_API_ENDPOINT", gcs.url.as_str()),
                ("GOOGLE_CLOUD_PROJECT", project.as_str()),
                ("BUCKET", BUCKET),
                ("OBJECT", OBJECT),
            ],
        );
        let pod = example.app_pod(&app)?;
        Ok(Self { namespace: namespace.to_owned(), google, gcs, example, pod, app, service_account: email })
    }

    /// Applies the example's objects and waits until its policy is Ready.
    pub async fn apply(&self, stack: &dyn Deployed) -> Result<String> {
        stack.apply_example(&self.namespace, &self.example, "dashboards-to-gcs").await
    }
}
