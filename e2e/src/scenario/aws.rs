//! The AWS side: moto with authentication enforced (S3 checks SigV4 signatures and the
//! keys moto issued, and the caller's IAM policies), and the STS gate in front of it that
//! verifies `AssumeRoleWithWebIdentity` tokens against the cloudpass issuer as AWS does.
//! The AKS → S3 example, pointed at them.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Deployed, Example, example::App};
use crate::{
    certs::TestCa,
    fakes::aws_sts::{AwsOidcProvider, AwsRoleTrust, StsGate, StsGateConfig},
    moto::{ACCOUNT_ID, AwsKeys, MotoServer},
};

/// The audience cloudpass uses for AWS STS by default, which the IAM OIDC provider lists.
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

/// moto with authentication enforced, and an admin user of its account to set it up.
pub struct AwsCloud {
    /// The moto server.
    pub moto: MotoServer,
    admin: AwsKeys,
}

impl AwsCloud {
    /// Starts moto, creates an admin user (the account's setup identity, also used by the
    /// gate to forward accepted requests) and turns authentication on.
    pub async fn start() -> Result<Self> {
        let moto = MotoServer::start().await?;
        let all = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
        let admin = moto.create_user_keys("cloudpass-e2e-admin", &all).await?;
        moto.enforce_auth(0).await?;
        Ok(Self { moto, admin })
    }

    async fn admin_python(&self, script: &str, env: &[(&str, &str)]) -> Result<String> {
        let keys = self.admin.env();
        let mut all: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(env);
        self.moto.python_with_env(script, &all).await
    }

    /// Creates (or keeps) IAM role `name` with inline policy `policy`; its ARN. Which web
    /// identities may assume it is the gate's business ([`AwsRoleTrust`]).
    pub async fn role(&self, name: &str, policy: &Value) -> Result<String> {
        let script = r#"
import boto3, json, os
iam = boto3.client("iam")
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Federated": "*"},
         "Action": "sts:AssumeRoleWithWebIdentity"}]}
try:
    role = iam.create_role(RoleName=os.environ["ROLE"], AssumeRolePolicyDocument=json.dumps(trust),
                           MaxSessionDuration=43200)["Role"]
except iam.exceptions.EntityAlreadyExistsException:
    role = iam.get_role(RoleName=os.environ["ROLE"])["Role"]
iam.put_role_policy(RoleName=os.environ["ROLE"], PolicyName="inline", PolicyDocument=os.environ["POLICY"])
print(role["Arn"])
"#;
        let out = self.admin_python(script, &[("ROLE", name), ("POLICY", &policy.to_string())]).await?;
        Ok(out.trim().to_owned())
    }

    /// Creates IAM user `name` with inline policy `policy` and an access key: the static
    /// credentials a workload without cloudpass carries (the benchmarks' baseline).
    pub async fn static_keys(&self, name: &str, policy: &Value) -> Result<AwsKeys> {
        let admin = self.admin.env();
        let env: Vec<(&str, &str)> = admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.moto.create_user_keys_as(name, policy, &env).await
    }

    /// Creates (or keeps) S3 bucket `name`.
    pub async fn bucket(&self, name: &str) -> Result<()> {
        let script = r#"
import boto3, os
s3 = boto3.client("s3")
try:
    s3.create_bucket(Bucket=os.environ["BUCKET"])
except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
    pass
"#;
        self.admin_python(script, &[("BUCKET", name)]).await.map(drop)
    }

    /// Stores `value` as the current version of Secrets Manager secret `name`; its
    /// version ID.
    pub async fn secret(&self, name: &str, value: &str) -> Result<String> {
        let keys = self.admin.env();
        let env: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Ok(self.moto.put_secret(name, value, &env).await?.1)
    }

    /// Starts an STS gate that trusts the issuer `issuer` (an IAM OIDC provider with
    /// client ID `sts.amazonaws.com`) for `roles`, its certificate from `ca`.
    pub async fn gate(
        &self,
        issuer: &str,
        issuer_ca_pem: &str,
        ca: &TestCa,
        roles: Vec<AwsRoleTrust>,
    ) -> Result<StsGate> {
        StsGate::start(
            StsGateConfig {
                moto_url: self.moto.url().to_owned(),
                providers: vec![AwsOidcProvider { url: issuer.to_owned(), client_ids: vec![STS_AUDIENCE.into()] }],
                roles,
                issuer_ca_pem: issuer_ca_pem.to_owned(),
                forward_credentials: Some(self.admin.clone()),
            },
            ca,
        )
        .await
    }
}

/// An S3 direction set up in a namespace: the example's role exists in moto with S3
/// rights on bucket [`BUCKET`]; its trust (in the STS gate) names the cloudpass issuer,
/// audience `sts.amazonaws.com` and the subject the example's CredentialProvider makes.
pub struct S3Direction {
    /// The namespace.
    pub namespace: String,
    /// The STS gate (AWS STS for the broker).
    pub gate: StsGate,
    /// The role's ARN.
    pub role_arn: String,
    /// The example, pointed at the gate and moto.
    pub example: Example,
    /// The pod its workload would create.
    pub pod: Value,
    /// Its app.
    pub app: App,
    /// A second container running the same program with the app's settings, where the
    /// example has one (a tool beside the app).
    pub tool: Option<App>,
    /// The example's AccessPolicy.
    pub policy: String,
}

/// AKS → S3 (`examples/aks-to-s3.yaml`), see [`S3Direction::prepare`].
pub type AksToS3 = S3Direction;

/// The bucket the app writes to.
pub const BUCKET: &str = "orders";
/// The S3 app: writes an object, reads it back, says who it was (JSON on the last line).
pub const S3_APP: &str = include_str!("apps/s3.py");

impl S3Direction {
    /// AKS → S3 (`examples/aks-to-s3.yaml`) for `namespace` (which must exist, opted in):
    /// the role keeps the example's ARN (moto's account), the subject is
    /// `system:cloudpass:<namespace>:orders-s3`.
    pub async fn prepare(stack: &dyn Deployed, aws: &AwsCloud, namespace: &str) -> Result<Self> {
        let example = Example::load("aks-to-s3")?;
        Self::setup(stack, aws, namespace, example, ("orders-s3", "orders-to-s3"), ("orders", "api"), None).await
    }

    /// AKS → S3 with the credentials as files (`examples/aks-to-s3-credentials-file.yaml`)
    /// for `namespace`: the pod's `report` container is the app; the subject is
    /// `system:cloudpass:<namespace>:reports-s3`.
    /// Its `sync` container is the [`S3Direction::tool`], with the app's settings.
    pub async fn credentials_file(stack: &dyn Deployed, aws: &AwsCloud, namespace: &str) -> Result<Self> {
        let example = Example::load("aks-to-s3-credentials-file")?;
        let mut direction = Self::setup(
            stack,
            aws,
            namespace,
            example,
            ("reports-s3", "reports-s3-process"),
            ("reports", "report"),
            None,
        )
        .await?;
        let tool = App { container: "sync".into(), ..direction.app.clone() };
        let containers = direction.pod["spec"]["containers"].as_array_mut().context("containers")?;
        let sync = containers.iter_mut().find(|c| c["name"] == "sync").context("no container sync")?;
        let env = sync["env"].as_array_mut().context("sync's env")?;
        for (name, value) in &tool.env {
            env.retain(|e| e["name"] != name.as_str());
            env.push(json!({"name": name, "value": value}));
        }
        direction.tool = Some(tool);
        Ok(direction)
    }

    /// GKE → S3 (`examples/gke-to-s3.yaml`) for `namespace`: the role moves to moto's
    /// account (the example names another), the subject names the service account
    /// (`system:cloudpass:<namespace>:exporter-s3:exporter`), and the example's nightly
    /// time window is removed so the scenario runs at any hour. The pod is the CronJob's.
    pub async fn gke(stack: &dyn Deployed, aws: &AwsCloud, namespace: &str) -> Result<Self> {
        let mut example = Example::load("gke-to-s3")?;
        let arn = example.get("CredentialProvider", "exporter-s3")?["spec"]["awsSts"]["roleArn"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = arn.rsplit_once(":role/").map(|(_, n)| n.to_owned()).unwrap_or_default();
        let local = format!("arn:aws:iam::{ACCOUNT_ID}:role/{name}");
        example.set("CredentialProvider", "exporter-s3", "/spec/awsSts/roleArn", json!(local))?;
        example.set("AccessPolicy", "exporter-to-s3", "/spec/conditions", json!({}))?;
        Self::setup(
            stack,
            aws,
            namespace,
            example,
            ("exporter-s3", "exporter-to-s3"),
            ("exporter", "exporter"),
            Some("exporter"),
        )
        .await
    }

    async fn setup(
        stack: &dyn Deployed,
        aws: &AwsCloud,
        namespace: &str,
        mut example: Example,
        (provider, policy): (&str, &str),
        (workload, container): (&str, &str),
        subject_service_account: Option<&str>,
    ) -> Result<Self> {
        let sts = example.get("CredentialProvider", provider)?["spec"]["awsSts"].clone();
        let arn = sts["roleArn"].as_str().unwrap_or_default().to_owned();
        let Some(role_name) = arn.strip_prefix(&format!("arn:aws:iam::{ACCOUNT_ID}:role/")) else {
            bail!("the example's role {arn} is not in moto's account {ACCOUNT_ID}");
        };
        let s3 = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
            "Resource": [format!("arn:aws:s3:::{BUCKET}"), format!("arn:aws:s3:::{BUCKET}/*")]}]});
        let role_arn = aws.role(role_name, &s3).await?;
        aws.bucket(BUCKET).await?;
        let mut subject = format!("system:cloudpass:{namespace}:{provider}");
        if let Some(sa) = subject_service_account {
            subject = format!("{subject}:{sa}");
        }
        let mut trust = AwsRoleTrust::new(&role_arn, stack.issuer_url(), &subject);
        trust.audiences = vec![STS_AUDIENCE.into()];
        trust.max_session_duration = 43200;
        let gate = aws.gate(stack.issuer_url(), &stack.issuer_ca_pem(), stack.cloud_ca(), vec![trust]).await?;
        example.set("CredentialProvider", provider, "/spec/awsSts/stsEndpoint", json!(gate.url()))?;
        // boto3 and the AWS CLI read the region from AWS_DEFAULT_REGION only, not from
        // AWS_REGION (which the other SDKs read).
        let region = sts["region"].as_str().unwrap_or(crate::moto::REGION).to_owned();
        let app = App::new(
            workload,
            container,
            "s3.py",
            &[("AWS_ENDPOINT_URL", aws.moto.url()), ("AWS_DEFAULT_REGION", &region), ("BUCKET", BUCKET)],
        );
        let pod = example.app_pod(&app)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            gate,
            role_arn,
            example,
            pod,
            app,
            tool: None,
            policy: policy.to_owned(),
        })
    }

    /// Applies the example's objects and waits until its policy is Ready.
    pub async fn apply(&self, stack: &dyn Deployed) -> Result<String> {
        stack.apply_example(&self.namespace, &self.example, &self.policy).await
    }
}
