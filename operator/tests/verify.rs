//! The `Verified` condition end to end: the real `cloudpass-operator` (controller and
//! broker, `--verify-interval` on) checks each federated CredentialProvider with a real
//! exchange at the cloud fakes under `e2e/`, which refuse each way trust can be wrong
//! with the cloud's own error code; the condition, the policy's mirror of it, the Event
//! and the metric follow. The probe tokens are checked too: marked, short-lived, never
//! accepted by the broker as a caller or by a data plane, and asking the clouds for
//! nothing usable.
//!
//! One operator process serves the suite.

use std::time::Duration;

use cloudpass_e2e::{
    ControlPlane,
    broker::{BrokerOptions, RunningBroker},
    cloudpass_object,
    fakes::{
        aws_sts::{AwsOidcProvider, AwsRoleTrust, StsGate, StsGateConfig},
        entra::{EntraApp, EntraConfig, EntraFake, FederatedCredential},
        google::{GoogleConfig, GoogleFake, ServiceAccount, WorkloadIdentityProvider},
        jwt::unverified_claims,
        secret_stores::{KeyVaultFake, SecretManagerFake},
    },
    moto::MotoServer,
    net::free_port,
};
use serde_json::{Value, json};

const TENANT: &str = "8c1d3f0e-7b6a-4e55-9f21-0a3b5c7d9e11";
const CLIENT_ID: &str = "4f9e2c1a-33b7-4d8e-a1f0-6c2b9e8d7a55";
const UNKNOWN_CLIENT_ID: &str = "0a0a0a0a-33b7-4d8e-a1f0-6c2b9e8d7a55";
const OBJECT_ID: &str = "6b1f2e3d-4c5b-4a69-8877-665544332211";
const NS: &str = "verify";

async fn start(cp: &ControlPlane) -> RunningBroker {
    let options = BrokerOptions {
        namespace: "cloudpass-verify".into(),
        // Trace level everywhere: the suite searches the whole log for the probe tokens.
        log_level: "trace".into(),
        verify_interval: "1h".into(),
        ..Default::default()
    };
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudpass-operator"));
    RunningBroker::start(cp, binary, &options).await.unwrap()
}

fn apply(cp: &ControlPlane, kind: &str, name: &str, spec: Value) {
    cp.apply_yaml(Some(NS), &cloudpass_object(kind, name, spec).to_string()).unwrap();
}

/// Waits for `Verified` of a CredentialProvider (or AccessPolicy) to be `status` with a
/// reason other than `Pending`; the condition.
async fn verified(cp: &ControlPlane, resource: &str, name: &str, status: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let object =
            cp.wait_for_condition(resource, NS, name, "Verified", status, Duration::from_secs(60)).await.unwrap();
        let condition = object["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Verified")
            .cloned()
            .unwrap();
        if condition["reason"] != "Pending" || std::time::Instant::now() > deadline {
            return condition;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn param<'a>(request: &'a [(String, String)], name: &str) -> Option<&'a str> {
    request.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The request among `requests` whose JWT parameter `token` has subject `sub`.
fn request_of(requests: Vec<Vec<(String, String)>>, token: &str, sub: &str) -> Vec<(String, String)> {
    requests
        .into_iter()
        .rev()
        .find(|r| {
            param(r, token).and_then(|t| unverified_claims(t).ok()).is_some_and(|c| c.sub.as_deref() == Some(sub))
        })
        .unwrap_or_else(|| panic!("no request with {token} for {sub}"))
}

/// Checks that a probe token is what the design says: the workload's issuer, subject and
/// audience, marked as a check, living two minutes.
fn assert_probe(token: &str, issuer: &str, subject: &str, audience: &str) -> Value {
    let claims = unverified_claims(token).unwrap();
    assert_eq!((claims.iss.as_str(), claims.sub.as_deref()), (issuer, Some(subject)));
    assert_eq!(claims.aud, [audience]);
    let raw: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(raw["cloudpass.dev"]["check"], true, "{raw}");
    assert_eq!(raw["cloudpass.dev"]["namespace"], NS);
    assert!(raw["cloudpass.dev"].get("pod").is_none(), "a probe names no pod: {raw}");
    assert_eq!(raw["exp"].as_i64().unwrap() - raw["iat"].as_i64().unwrap(), 120);
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cloud_accepts_or_refuses_with_its_own_code_and_the_probes_open_nothing() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let b = start(cp).await;
    cp.create_namespace(NS, &[]).await.unwrap();
    cp.create_service_account(NS, "orders").await.unwrap();
    let sub = |provider: &str| format!("system:cloudpass:{NS}:{provider}");

    // AWS: a role trusting the broker's tokens for s3-good only, behind the STS gate; a
    // second gate (an account) where the issuer is not registered at all.
    let moto = MotoServer::start().await.unwrap();
    let s3_all =
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
    let role = moto.create_role("orders-s3", &s3_all).await.unwrap();
    let mut trust = AwsRoleTrust::new(&role, &b.url, &sub("s3-good"));
    trust.audiences = vec!["sts.amazonaws.com".into()];
    let gate = b.sts_gate(&moto, vec![trust.clone()]).await.unwrap();
    let bare_account = StsGate::start(
        StsGateConfig {
            moto_url: moto.url().to_owned(),
            providers: vec![AwsOidcProvider { url: "https://other-issuer.example".into(), client_ids: vec![] }],
            roles: vec![trust],
            issuer_ca_pem: b.ca.cert_pem(),
            forward_credentials: None,
        },
        &b.ca,
    )
    .await
    .unwrap();
    // Entra: one app whose federated credential names blob-good.
    let entra = EntraFake::start(
        EntraConfig {
            tenant_id: TENANT.into(),
            apps: vec![EntraApp {
                client_id: CLIENT_ID.into(),
                object_id: OBJECT_ID.into(),
                federated_credentials: vec![FederatedCredential::new(&b.url, &sub("blob-good"))],
            }],
            issuer_ca_pem: b.ca.cert_pem(),
        },
        &b.ca,
    )
    .await
    .unwrap();
    // Google: a pool provider for the issuer; a service account that gcs-good may
    // impersonate.
    let wip = WorkloadIdentityProvider::new("123456789", "cloudpass-pool", "broker", &b.url);
    let email = "reader@orders-project.iam.gserviceaccount.com";
    let google = GoogleFake::start(
        GoogleConfig {
            providers: vec![wip.clone()],
            service_accounts: vec![ServiceAccount {
                email: email.into(),
                allowed_members: vec![wip.principal(&sub("gcs-good"))],
            }],
            issuer_ca_pem: b.ca.cert_pem(),
        },
        &b.ca,
    )
    .await
    .unwrap();

    let aws = |endpoint: &str, audience: Option<&str>| {
        let mut spec = json!({"roleArn": role, "stsEndpoint": endpoint});
        if let Some(a) = audience {
            spec["audience"] = json!(a);
        }
        json!({"awsSts": spec})
    };
    let azure = |client: &str| json!({"azureWorkloadIdentity": {"tenantId": TENANT, "clientId": client, "authorityHost": entra.url()}});
    let gcp = |provider: &str, impersonate: bool| {
        let mut spec = json!({"workloadIdentityProvider": provider, "stsEndpoint": google.url(), "iamCredentialsEndpoint": google.url()});
        if impersonate {
            spec["serviceAccountEmail"] = json!(email);
        }
        json!({"gcpWorkloadIdentity": spec})
    };
    let closed = format!("https://127.0.0.1:{}/", free_port().unwrap());
    let mut off = aws(gate.url(), None);
    off["verification"] = json!({"enabled": false});
    for (name, spec) in [
        ("s3-good", aws(gate.url(), None)),
        ("s3-other-subject", aws(gate.url(), None)),
        ("s3-other-audience", aws(gate.url(), Some("cloudpass-elsewhere"))),
        ("s3-unregistered", aws(bare_account.url(), None)),
        ("s3-down", aws(&closed, None)),
        ("s3-unchecked", off),
        ("blob-good", azure(CLIENT_ID)),
        ("blob-other-subject", azure(CLIENT_ID)),
        ("blob-unknown-app", azure(UNKNOWN_CLIENT_ID)),
        ("gcs-good", gcp(&wip.name(), true)),
        ("gcs-federated", gcp(&wip.name(), false)),
        ("gcs-not-bound", gcp(&wip.name(), true)),
        ("gcs-other-provider", gcp(&wip.name().replace("/providers/broker", "/providers/elsewhere"), false)),
        ("partner", json!({"oidcToken": {"audience": "https://partner.example"}})),
    ] {
        apply(cp, "CredentialProvider", name, spec);
    }

    // Success: what was obtained, and until when.
    let c = verified(cp, "credentialprovider", "s3-good", "True").await;
    assert_eq!(c["reason"], "Verified");
    let message = c["message"].as_str().unwrap();
    assert!(message.contains("arn:aws:sts::123456789012:assumed-role/orders-s3/cloudpass-verify"), "{message}");
    assert!(message.contains("valid until") && message.contains(&format!("sub={}", sub("s3-good"))), "{message}");
    let probe = request_of(gate.requests(), "WebIdentityToken", &sub("s3-good"));
    // The credentials the probe obtained are worthless: a session policy denies everything.
    assert_eq!(param(&probe, "Policy"), Some(cloudpass_broker::verify::AWS_DENY_ALL));
    assert_eq!(param(&probe, "RoleSessionName"), Some("cloudpass-verify"));
    let aws_probe = param(&probe, "WebIdentityToken").unwrap().to_owned();
    assert_probe(&aws_probe, &b.url, &sub("s3-good"), "sts.amazonaws.com");

    let c = verified(cp, "credentialprovider", "blob-good", "True").await;
    assert!(c["message"].as_str().unwrap().contains(&format!("application {CLIENT_ID}")), "{c}");
    // A token for the application itself, which opens no other resource.
    let request = request_of(entra.requests(), "client_assertion", &sub("blob-good"));
    assert_eq!(param(&request, "scope"), Some(format!("{CLIENT_ID}/.default").as_str()));
    let c = verified(cp, "credentialprovider", "gcs-good", "True").await;
    assert!(c["message"].as_str().unwrap().contains(&format!("an access token of {email}")), "{c}");
    // Its federated token may call IAM only; the impersonated one, no API.
    let exchange = request_of(google.requests(), "subject_token", &sub("gcs-good"));
    assert_eq!(param(&exchange, "scope"), Some("https://www.googleapis.com/auth/iam"));
    let impersonation: Vec<_> = google.requests().into_iter().filter(|r| param(r, "lifetime").is_some()).collect();
    assert!(!impersonation.is_empty());
    for r in &impersonation {
        assert_eq!(param(r, "scope"), Some(r#"["https://www.googleapis.com/auth/userinfo.email"]"#));
        assert_eq!(param(r, "lifetime"), Some("300s"));
    }
    let c = verified(cp, "credentialprovider", "gcs-federated", "True").await;
    assert!(c["message"].as_str().unwrap().contains(&wip.principal(&sub("gcs-federated"))), "{c}");

    // Each way trust can be wrong, with the cloud's own code and what to configure.
    for (name, status, reason, says) in [
        ("s3-other-subject", "False", "AccessDenied", "aws iam update-assume-role-policy --role-name orders-s3"),
        ("s3-other-audience", "False", "InvalidIdentityToken", "Incorrect token audience"),
        ("s3-unregistered", "False", "InvalidIdentityToken", "aws iam create-open-id-connect-provider --url"),
        ("blob-other-subject", "False", "AADSTS700213", "az ad app federated-credential create --id"),
        ("blob-unknown-app", "False", "AADSTS700016", "was not found in the directory"),
        ("gcs-not-bound", "False", "PERMISSION_DENIED", "--role=roles/iam.workloadIdentityUser"),
        (
            "gcs-other-provider",
            "False",
            "invalid_target",
            "gcloud iam workload-identity-pools providers create-oidc elsewhere",
        ),
        ("s3-down", "Unknown", "Unreachable", "unreachable"),
    ] {
        let c = verified(cp, "credentialprovider", name, status).await;
        assert_eq!(c["reason"], reason, "{name}: {c}");
        let message = c["message"].as_str().unwrap();
        assert!(message.contains(says), "{name}: {message}");
        if status == "False" {
            assert!(
                message.contains(&format!("sub={}", sub(name))) && message.contains(&format!("iss={}", b.url)),
                "{message}"
            );
        }
    }

    // No check where there is nothing in a cloud, or where it is turned off; both Ready.
    for name in ["s3-unchecked", "partner"] {
        let object = cp
            .wait_for_condition("credentialprovider", NS, name, "Ready", "True", Duration::from_secs(30))
            .await
            .unwrap();
        let types: Vec<&str> =
            object["status"]["conditions"].as_array().unwrap().iter().filter_map(|c| c["type"].as_str()).collect();
        assert_eq!(types, ["Ready"], "{name}");
    }

    // A policy of a refused provider stays Ready and says so.
    apply(
        cp,
        "TrustProvider",
        "this-cluster",
        json!({"kubernetesServiceAccount": {"serviceAccounts": ["orders", "tester"]}}),
    );
    let servers = [json!({"kind": "aws"}), json!({"kind": "azure", "resource": "https://storage.azure.com/"})];
    for ((policy, provider), server) in
        [("to-s3", "s3-other-subject"), ("to-blob", "blob-good")].into_iter().zip(servers)
    {
        apply(
            cp,
            "AccessPolicy",
            policy,
            json!({"client": {"podSelector": {}, "serviceAccountName": "orders"}, "trustProviders": [{"name": "this-cluster"}],
                   "server": server,
                   "credentialProvider": {"name": provider}, "delivery": {"sdkEndpoint": {}}}),
        );
    }
    cp.wait_for_condition("accesspolicy", NS, "to-s3", "Ready", "True", Duration::from_secs(30)).await.unwrap();
    let c = verified(cp, "accesspolicy", "to-s3", "False").await;
    assert_eq!(c["reason"], "AccessDenied");
    assert!(c["message"].as_str().unwrap().contains("CredentialProvider s3-other-subject"), "{c}");
    assert_eq!(verified(cp, "accesspolicy", "to-blob", "True").await["reason"], "Verified");

    // Events on the transitions, and the metric per provider.
    let events = cp.kubectl_ok(&["get", "events", "-n", NS, "-o", "json"]).unwrap();
    let events: Value = serde_json::from_str(&events).unwrap();
    let event = |name: &str| {
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["involvedObject"]["name"] == name && e["action"] == "Verify")
            .cloned()
    };
    assert_eq!(
        event("s3-other-subject").map(|e| (e["type"].clone(), e["reason"].clone())),
        Some((json!("Warning"), json!("AccessDenied")))
    );
    assert_eq!(event("s3-good").map(|e| e["reason"].clone()), Some(json!("Verified")));
    let metrics = b.metrics().await.unwrap();
    for (name, value) in [("s3-good", "1"), ("s3-other-subject", "0"), ("s3-down", "-1")] {
        let series =
            format!(r#"cloudpass_operator_credential_provider_verified{{namespace="{NS}",name="{name}"}} {value}"#);
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }

    // A request (what `kubectl cloudpass verify` sets) runs a new check at once.
    let before = gate.calls();
    cp.kubectl_ok(&[
        "annotate",
        "credentialprovider",
        "s3-good",
        "-n",
        NS,
        "--overwrite",
        "cloudpass.dev/verify-requested-at=now-1",
    ])
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while gate.calls() == before {
        assert!(std::time::Instant::now() < deadline, "the requested check did not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The probe is never a caller: not as the bearer token, not as evidence for a
    // TrustProvider that trusts the cloudpass issuer itself.
    let (status, answer) = b.ask(Some(&aws_probe), &json!({"policy": "to-s3", "namespace": NS})).await.unwrap();
    assert_eq!(status, 401, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("verification probe"), "{answer}");
    apply(
        cp,
        "TrustProvider",
        "cloudpass-itself",
        json!({"oidc": {"issuer": b.url, "audiences": ["sts.amazonaws.com"],
        "subjects": ["system:cloudpass:*"], "algorithms": ["ES256"]}}),
    );
    apply(
        cp,
        "AccessPolicy",
        "via-probe",
        json!({"client": {"podSelector": {}, "serviceAccountName": "tester"}, "trustProviders": [{"name": "this-cluster"}, {"name": "cloudpass-itself"}],
               "server": {"kind": "aws"}, "credentialProvider": {"name": "s3-good"}, "delivery": {"sdkEndpoint": {}}}),
    );
    cp.wait_for_condition("accesspolicy", NS, "via-probe", "Ready", "True", Duration::from_secs(30)).await.unwrap();
    cp.create_service_account(NS, "tester").await.unwrap();
    let token = cloudpass_e2e::broker::pod_token(cp, NS, "tester-1", "tester", json!({"app": "tester"})).await.unwrap();
    let body = json!({"policy": "via-probe", "evidence": {"tokens": {"cloudpass-itself": aws_probe}}});
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let (status, answer) = b.ask(Some(&token), &body).await.unwrap();
        let loading = status == 403 && answer["message"].as_str().is_some_and(|m| m.contains("no Ready AccessPolicy"));
        if !loading || std::time::Instant::now() > deadline {
            assert_eq!(status, 403, "{answer}");
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(answer["message"].as_str().unwrap().contains("verification probe"), "{answer}");

    // Nor is it a token the clouds' data planes take: Key Vault and Secret Manager, with
    // the keys and records of the tenants that took the probes, refuse it.
    let http = b.http();
    let vault = KeyVaultFake::start(TENANT, entra.access_token_check(), &b.ca).await.unwrap();
    vault.set_secret("anything", "value", &[OBJECT_ID]);
    let answer = http
        .get(format!("{}/secrets/anything?api-version=7.4", vault.url()))
        .bearer_auth(&aws_probe)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let manager = SecretManagerFake::start(google.access_token_check(), &b.ca).await.unwrap();
    let answer = http
        .get(format!("{}/v1/projects/p/secrets/s/versions/latest:access", manager.url()))
        .bearer_auth(&aws_probe)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);

    // No probe token, assertion or obtained credential in the operator's log.
    let log = b.log_text();
    assert!(!log.contains(&aws_probe));
    let sent = gate.requests().into_iter().chain(entra.requests()).chain(google.requests());
    for request in sent {
        for (name, value) in request.iter().filter(|(_, v)| v.starts_with("eyJ")) {
            assert!(!log.contains(value.as_str()), "a probe's {name} in the log");
        }
    }
}
