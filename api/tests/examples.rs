//! Every manifest under `examples/` parses into the typed API, its references resolve
//! within its own file, and its policies select the workload the file ships. Every file
//! under `examples/invalid/` names the message the apiserver must refuse it with.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use cloudpass_api::{AccessPolicy, CredentialProvider, TrustProvider, selector::selector_matches};
use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::CronJob,
    core::v1::{PodTemplateSpec, ServiceAccount},
};
use serde::Deserialize;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<serde_yaml::Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(doc: serde_yaml::Value, path: &Path) -> T {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{}: {kind} does not parse: {e}", path.display()))
}

#[derive(Default)]
struct FileSet {
    trust: Vec<TrustProvider>,
    credential: Vec<CredentialProvider>,
    policies: Vec<AccessPolicy>,
    service_accounts: Vec<String>,
    pod_templates: Vec<PodTemplateSpec>,
}

fn parse(path: &Path) -> FileSet {
    let mut set = FileSet::default();
    let name = path.display();
    for doc in documents(path) {
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{name}: document without kind")).to_owned();
        match kind.as_str() {
            "TrustProvider" => set.trust.push(typed(doc, path)),
            "CredentialProvider" => set.credential.push(typed(doc, path)),
            "AccessPolicy" => set.policies.push(typed(doc, path)),
            "ServiceAccount" => {
                let sa: ServiceAccount = typed(doc, path);
                set.service_accounts.push(sa.metadata.name.unwrap());
            }
            "Deployment" => {
                let d: Deployment = typed(doc, path);
                set.pod_templates.push(d.spec.template);
            }
            "CronJob" => {
                let c: CronJob = typed(doc, path);
                set.pod_templates.push(c.spec.job_template.spec.unwrap().template);
            }
            // The app's own configuration (an AWS config file, say).
            "ConfigMap" => {}
            other => panic!("{name}: unexpected kind {other} in an example"),
        }
    }
    set
}

#[test]
fn examples_parse_and_their_references_resolve() {
    let files = yaml_files(&examples_dir());
    assert!(files.len() >= 6, "at least six examples, found {}", files.len());
    for path in &files {
        let set = parse(path);
        let name = path.display();
        assert!(!set.policies.is_empty(), "{name}: no AccessPolicy");
        let trust: Vec<_> = set.trust.iter().map(|t| t.metadata.name.clone().unwrap()).collect();
        let cred: Vec<_> = set.credential.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
        for t in &set.trust {
            assert!(t.spec.kind_name().is_some(), "{name}: TrustProvider without a kind");
        }
        for c in &set.credential {
            assert!(c.spec.kind_name().is_some(), "{name}: CredentialProvider without a kind");
        }
        for policy in &set.policies {
            let spec = &policy.spec;
            for r in &spec.trust_providers {
                assert!(trust.contains(&r.name), "{name}: TrustProvider {} is not in the file", r.name);
            }
            assert!(cred.contains(&spec.credential_provider.name), "{name}: CredentialProvider missing");
            if let Some(sa) = &spec.client.service_account_name {
                assert!(set.service_accounts.contains(sa), "{name}: ServiceAccount {sa} is not in the file");
            }
            let selected = set.pod_templates.iter().any(|t| {
                let meta = t.metadata.clone().unwrap_or_default();
                let labels: BTreeMap<_, _> = meta.labels.unwrap_or_default();
                let pod_sa = t.spec.as_ref().and_then(|s| s.service_account_name.clone());
                selector_matches(&spec.client.pod_selector, &labels)
                    && spec.client.service_account_name.as_ref().is_none_or(|sa| pod_sa.as_ref() == Some(sa))
                    && spec
                        .client
                        .containers
                        .iter()
                        .all(|c| t.spec.as_ref().unwrap().containers.iter().any(|pc| &pc.name == c))
            });
            assert!(selected, "{name}: policy {:?} selects no workload of the file", policy.metadata.name);
        }
    }
}

#[test]
fn invalid_examples_state_their_expected_message() {
    let files = yaml_files(&examples_dir().join("invalid"));
    assert!(files.len() >= 8, "a handful of invalid examples, found {}", files.len());
    for path in files {
        let text = fs::read_to_string(&path).unwrap();
        let expect = text.lines().find_map(|l| l.strip_prefix("# expect: "));
        assert!(expect.is_some_and(|e| !e.trim().is_empty()), "{}: no '# expect: <message>' line", path.display());
        let docs = documents(&path);
        assert_eq!(docs.len(), 1, "{}: one object per invalid example", path.display());
        assert_eq!(docs[0]["apiVersion"].as_str(), Some("cloudpass.dev/v1alpha1"), "{}", path.display());
    }
}
