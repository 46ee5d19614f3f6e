//! The Argo CD health check for the cloudpass kinds, run by a real Lua 5.4 interpreter
//! against Ready, not-Ready and progressing objects, and the argocd-cm patch kept in
//! step with it.

use std::fs;

use cloudpass_e2e::repo_root;
use mlua::{Lua, LuaSerdeExt, Table};
use serde_json::{Value, json};

fn health(object: Value) -> (String, String) {
    let script = fs::read_to_string(repo_root().join("deploy/argocd/health.lua")).unwrap();
    let lua = Lua::new();
    lua.globals().set("obj", lua.to_value(&object).unwrap()).unwrap();
    let result: Table = lua.load(&script).eval().unwrap();
    (result.get("status").unwrap(), result.get("message").unwrap())
}

fn policy(generation: i64, status: Value) -> Value {
    json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": "AccessPolicy",
           "metadata": {"name": "orders-to-s3", "namespace": "team", "generation": generation},
           "spec": {}, "status": status})
}

fn ready(status: &str, reason: &str, message: &str, observed: i64) -> Value {
    json!({"observedGeneration": observed, "conditions": [
        {"type": "Ready", "status": status, "reason": reason, "message": message,
         "lastTransitionTime": "2026-11-22T10:00:00Z", "observedGeneration": observed}]})
}

#[test]
fn health_follows_ready_and_observed_generation() {
    let (s, m) = health(policy(2, ready("True", "Ready", "aws server reachable", 2)));
    assert_eq!((s.as_str(), m.as_str()), ("Healthy", "Ready: aws server reachable"));

    let (s, m) = health(policy(2, ready("False", "SecretNotFound", "Secret weather-api not found", 2)));
    assert_eq!(s, "Degraded");
    assert!(m.contains("SecretNotFound") && m.contains("weather-api"), "{m}");

    let (s, m) = health(policy(3, ready("True", "Ready", "old news", 2)));
    assert_eq!(s, "Progressing", "a spec the operator has not seen yet is not Healthy");
    assert!(m.contains("generation 3"), "{m}");

    let (s, _) = health(policy(1, ready("Unknown", "Reconciling", "", 1)));
    assert_eq!(s, "Progressing");

    let mut fresh = policy(1, json!({}));
    fresh.as_object_mut().unwrap().remove("status");
    assert_eq!(health(fresh).0, "Progressing");
    assert_eq!(health(policy(1, json!({"observedGeneration": 1, "conditions": []}))).0, "Progressing");
}

fn expected_patch() -> String {
    let lua = fs::read_to_string(repo_root().join("deploy/argocd/health.lua")).unwrap();
    let indented: Vec<String> =
        lua.trim_end().lines().map(|l| if l.is_empty() { String::new() } else { format!("    {l}") }).collect();
    let mut out = String::from(
        "# Generated from deploy/argocd/health.lua (a test keeps them in sync).\n\
         # Merge into Argo CD's argocd-cm ConfigMap (or the Helm chart's configs.cm values):\n\
         #   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file deploy/argocd/argocd-cm-patch.yaml\n\
         data:\n",
    );
    for kind in ["TrustProvider", "CredentialProvider", "AccessPolicy"] {
        out.push_str(&format!("  resource.customizations.health.cloudpass.dev_{kind}: |\n{}\n", indented.join("\n")));
    }
    out
}

#[test]
fn argocd_patch_embeds_the_health_check_for_every_kind() {
    let path = repo_root().join("deploy/argocd/argocd-cm-patch.yaml");
    let expected = expected_patch();
    if std::env::var_os("CLOUDPASS_UPDATE_GENERATED").is_some() {
        fs::write(&path, &expected).unwrap();
    }
    let actual = fs::read_to_string(&path).unwrap();
    assert!(
        actual == expected,
        "{} is out of date with health.lua; regenerate with: CLOUDPASS_UPDATE_GENERATED=1 cargo test -p cloudpass-e2e --test gitops",
        path.display()
    );
    let parsed: serde_yaml::Value = serde_yaml::from_str(&actual).unwrap();
    assert_eq!(parsed["data"].as_mapping().unwrap().len(), 3);
}
