//! moto in server mode: the AWS side of the test bed (STS, IAM, S3).
//!
//! moto issues real-looking STS credentials and, with authentication enforced, checks the
//! SigV4 signature and the access key of every request and evaluates the caller's IAM
//! policies, like AWS. It does not check web identity tokens; the STS gate
//! ([`crate::fakes::aws_sts`]) in front of it does.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::ManagedProcess;

/// The account moto puts every resource in.
pub const ACCOUNT_ID: &str = "123456789012";
/// The region the helpers use.
pub const REGION: &str = "us-east-1";

/// AWS credentials (an IAM user's keys or an STS session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsKeys {
    /// `AKIA...` for IAM users, `ASIA...` for STS sessions.
    pub access_key_id: String,
    /// The secret key.
    pub secret_access_key: String,
    /// The session token of STS credentials.
    pub session_token: Option<String>,
}

impl AwsKeys {
    /// The keys as the environment variables boto3 and the AWS CLI read.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ];
        if let Some(token) = &self.session_token {
            env.push(("AWS_SESSION_TOKEN", token.clone()));
        }
        env
    }
}

/// moto behind HTTPS: a front that relays every request unchanged (the `Host` header
/// too, so SigV4 signatures still verify), for clients that speak only HTTPS. Stops on
/// drop.
pub struct HttpsFront {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsFront {
    /// Its port on the test bed's listen address.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        crate::net::local_url("https", self.port)
    }
}

impl Drop for HttpsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `moto_server` process on a free loopback port, stopped on drop.
pub struct MotoServer {
    process: ManagedProcess,
    url: String,
    python: PathBuf,
    // Holds the log and a HOME without ~/.aws for the Python helpers.
    dir: TempDir,
}

impl MotoServer {
    /// Starts `moto_server` from the venv and waits until it answers. Authentication is
    /// off until [`MotoServer::enforce_auth`].
    pub async fn start() -> Result<Self> {
        let venv = crate::python::venv()?;
        let dir = tempfile::Builder::new().prefix("cloudpass-moto-").tempdir()?;
        let port = crate::net::free_port()?;
        let process = ManagedProcess::spawn(
            "moto_server",
            &venv.join("bin/moto_server"),
            &["-H".into(), crate::net::listen_address().to_string(), "-p".into(), port.to_string()],
            &dir.path().join("moto.log"),
            &[],
        )?;
        let mut server =
            Self { process, url: crate::net::local_url("http", port), python: venv.join("bin/python"), dir };
        server.wait_until_ready().await?;
        Ok(server)
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Any HTTP answer means moto serves; a GET of reset-auth answers 400 and changes nothing.
        while Instant::now() < deadline {
            if http.get(format!("{}/moto-api/reset-auth", self.url)).send().await.is_ok() {
                return Ok(());
            }
            if self.process.has_exited() {
                bail!("moto_server exited before answering; log tail:\n{}", self.process.log_tail(4000));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("moto_server did not answer within 60 s; log tail:\n{}", self.process.log_tail(4000))
    }

    /// An HTTPS front to this moto with a serving certificate of `ca`.
    pub async fn https_front(&self, ca: &crate::certs::TestCa) -> Result<HttpsFront> {
        use axum::{
            Router,
            body::Body,
            extract::Request,
            http::{HeaderValue, StatusCode, header::HOST},
            response::{IntoResponse, Response},
        };
        let client = reqwest::Client::builder().no_proxy().build()?;
        let moto_url = self.url.clone();
        let router = Router::new().fallback(move |request: Request| {
            let (client, moto_url) = (client.clone(), moto_url.clone());
            async move {
                let (parts, body) = request.into_parts();
                let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
                    return (StatusCode::PAYLOAD_TOO_LARGE, "body over 16 MiB").into_response();
                };
                let mut headers = parts.headers;
                if !headers.contains_key(HOST) {
                    let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_default();
                    if let Ok(value) = HeaderValue::from_str(&authority) {
                        headers.insert(HOST, value);
                    }
                }
                let url = format!("{moto_url}{}", parts.uri.path_and_query().map_or("/", |p| p.as_str()));
                let answer = match client.request(parts.method, url).headers(headers).body(body).send().await {
                    Ok(answer) => answer,
                    Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
                };
                let mut response = Response::builder().status(answer.status());
                for (name, value) in answer.headers() {
                    if !["transfer-encoding", "connection", "content-length"].contains(&name.as_str()) {
                        response = response.header(name, value);
                    }
                }
                response
                    .body(Body::from(answer.bytes().await.unwrap_or_default()))
                    .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
            }
        });
        let (addr, task) = crate::tls::serve_https(router, &ca.issue_server(&[])?).await?;
        Ok(HttpsFront { port: addr.port(), task })
    }

    /// Base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The last bytes of moto's log (one line per request).
    pub fn log_tail(&self) -> String {
        self.process.log_tail(8000)
    }

    /// Turns on authentication: after `unauthenticated_requests` more requests, every
    /// request must be SigV4-signed with keys moto issued (IAM user or STS session) and be
    /// allowed by the caller's IAM policies. Set up users, roles and buckets first.
    pub async fn enforce_auth(&self, unauthenticated_requests: u32) -> Result<()> {
        self.reset_auth(&unauthenticated_requests.to_string()).await
    }

    /// Turns authentication off again (moto's default).
    pub async fn disable_auth(&self) -> Result<()> {
        // moto parses the body as a float, so "inf" means "never enforce".
        self.reset_auth("inf").await
    }

    async fn reset_auth(&self, count: &str) -> Result<()> {
        let response = crate::net::client_builder()
            .build()?
            .post(format!("{}/moto-api/reset-auth", self.url))
            .body(count.to_owned())
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("moto reset-auth answered {}: {}", response.status(), response.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// Runs a Python snippet with the venv's interpreter and returns its standard output.
    /// boto3 in the snippet talks to this moto (`AWS_ENDPOINT_URL`) with the dummy keys
    /// `testing`/`testing`, which work only while authentication is not enforced.
    pub async fn python(&self, script: &str) -> Result<String> {
        self.python_with_env(script, &[]).await
    }

    /// Like [`MotoServer::python`], with extra environment variables (which override the
    /// defaults, e.g. other AWS keys).
    pub async fn python_with_env(&self, script: &str, env: &[(&str, &str)]) -> Result<String> {
        let mut command = tokio::process::Command::new(&self.python);
        // A clean environment: no AWS profile, proxy or key of the developer's leaks in.
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("AWS_ENDPOINT_URL", &self.url)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(env.iter().copied())
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .context("Python snippet did not finish within 120 s")?
            .context("running the venv's python")?;
        if !output.status.success() {
            bail!(
                "Python snippet failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Creates an IAM role whose inline policy is `policy` (a policy document) and returns
    /// its ARN. Its trust policy allows web identities; moto does not evaluate trust
    /// policies, the STS gate does.
    pub async fn create_role(&self, name: &str, policy: &Value) -> Result<String> {
        let script = r#"
import boto3, json, os
iam = boto3.client("iam")
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Federated": "*"},
         "Action": "sts:AssumeRoleWithWebIdentity"}]}
role = iam.create_role(RoleName=os.environ["ROLE"], AssumeRolePolicyDocument=json.dumps(trust),
                       MaxSessionDuration=43200)
iam.put_role_policy(RoleName=os.environ["ROLE"], PolicyName="inline", PolicyDocument=os.environ["POLICY"])
print(role["Role"]["Arn"])
"#;
        let out = self.python_with_env(script, &[("ROLE", name), ("POLICY", &policy.to_string())]).await?;
        Ok(out.trim().to_owned())
    }

    /// Stores `value` as the current version of Secrets Manager secret `name` (creating
    /// it), signed with the keys in `env` once authentication is enforced; its ARN and
    /// version ID.
    pub async fn put_secret(&self, name: &str, value: &str, env: &[(&str, &str)]) -> Result<(String, String)> {
        let script = r#"
import boto3, os
sm = boto3.client("secretsmanager")
try:
    r = sm.create_secret(Name=os.environ["NAME"], SecretString=os.environ["VALUE"])
except sm.exceptions.ResourceExistsException:
    r = sm.put_secret_value(SecretId=os.environ["NAME"], SecretString=os.environ["VALUE"])
print(r["ARN"], r["VersionId"])
"#;
        let mut all = vec![("NAME", name), ("VALUE", value)];
        all.extend_from_slice(env);
        let out = self.python_with_env(script, &all).await?;
        let mut parts = out.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some(arn), Some(version)) => Ok((arn.to_owned(), version.to_owned())),
            _ => anyhow::bail!("unexpected answer of put_secret: {out}"),
        }
    }

    /// Creates an IAM user with the inline policy `policy` and returns a new access key of it.
    pub async fn create_user_keys(&self, name: &str, policy: &Value) -> Result<AwsKeys> {
        self.create_user_keys_as(name, policy, &[]).await
    }

    /// [`MotoServer::create_user_keys`] signed with the keys in `env` (once authentication
    /// is enforced, an admin's).
    pub async fn create_user_keys_as(&self, name: &str, policy: &Value, env: &[(&str, &str)]) -> Result<AwsKeys> {
        let script = r#"
import boto3, os
iam = boto3.client("iam")
iam.create_user(UserName=os.environ["USER_NAME"])
iam.put_user_policy(UserName=os.environ["USER_NAME"], PolicyName="inline", PolicyDocument=os.environ["POLICY"])
key = iam.create_access_key(UserName=os.environ["USER_NAME"])["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let policy = policy.to_string();
        let mut all = vec![("USER_NAME", name), ("POLICY", policy.as_str())];
        all.extend_from_slice(env);
        let out = self.python_with_env(script, &all).await?;
        let (id, secret) = out.trim().split_once(' ').context("create_access_key printed no key")?;
        Ok(AwsKeys { access_key_id: id.to_owned(), secret_access_key: secret.to_owned(), session_token: None })
    }

    /// Creates an S3 bucket.
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        self.python_with_env(
            r#"import boto3, os; boto3.client("s3").create_bucket(Bucket=os.environ["BUCKET"])"#,
            &[("BUCKET", name)],
        )
        .await
        .map(drop)
    }
}
