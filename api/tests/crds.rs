//! The checked-in CRD YAML under `crds/` is what the code generates, and it has what users
//! rely on: descriptions everywhere (`kubectl explain`), status, columns, names, CEL.

use std::{fs, path::PathBuf};

use cloudpass_api::crd::{crds, to_yaml};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn checked_in_crds_match_the_code() {
    let dir = repo_root().join("crds");
    let mut stale = Vec::new();
    for (file, crd) in crds() {
        let on_disk = fs::read_to_string(dir.join(file)).unwrap_or_default();
        if on_disk != to_yaml(&crd) {
            stale.push(file);
        }
    }
    let expected: Vec<_> = crds().into_iter().map(|(f, _)| f.to_owned()).collect();
    let mut present: Vec<_> =
        fs::read_dir(&dir).expect("crds/ exists").map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    present.sort();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert!(
        stale.is_empty() && present == expected_sorted,
        "crds/ is out of date with api/src (stale: {stale:?}, present: {present:?}).\nRegenerate with: make crds"
    );
}

/// Every property at every depth, with its dotted path.
fn walk<'a>(path: String, schema: &'a JSONSchemaProps, out: &mut Vec<(String, &'a JSONSchemaProps)>) {
    for (name, child) in schema.properties.iter().flatten() {
        let child_path = format!("{path}.{name}");
        out.push((child_path.clone(), child));
        walk(child_path, child, out);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = &schema.items {
        walk(format!("{path}[]"), item, out);
    }
}

fn root_schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
    crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()
}

#[test]
fn every_property_has_a_description() {
    for (file, crd) in crds() {
        let mut props = Vec::new();
        walk(String::new(), root_schema(&crd), &mut props);
        let missing: Vec<_> = props
            .iter()
            .filter(|(path, s)| {
                !path.starts_with(".metadata") && s.description.as_deref().is_none_or(|d| d.trim().is_empty())
            })
            .map(|(p, _)| p.clone())
            .collect();
        assert!(missing.is_empty(), "{file}: properties without description: {missing:?}");
        assert!(props.len() > 10, "{file}: suspiciously few properties");
    }
}

#[test]
fn every_crd_is_namespaced_with_status_columns_names_and_category() {
    for (file, crd) in crds() {
        assert_eq!(crd.spec.group, "cloudpass.dev", "{file}");
        assert_eq!(crd.spec.scope, "Namespaced", "{file}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{file}: status subresource");
        let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        for wanted in ["Ready", "Reason", "Age"] {
            assert!(columns.contains(&wanted), "{file}: column {wanted} missing from {columns:?}");
        }
        assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{file}: short name");
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["cloudpass".to_owned()][..]), "{file}");
        let status = &root_schema(&crd).properties.as_ref().unwrap()["status"];
        let status_props = status.properties.as_ref().unwrap();
        assert!(status_props.contains_key("conditions") && status_props.contains_key("observedGeneration"));
    }
}

#[test]
fn one_of_rules_are_enforced_by_cel() {
    let by_kind: Vec<_> = crds().into_iter().map(|(_, c)| (c.spec.names.kind.clone(), c)).collect();
    for (kind, crd) in &by_kind {
        let spec = &root_schema(crd).properties.as_ref().unwrap()["spec"];
        let mut rules: Vec<String> = Vec::new();
        let mut props = vec![(String::new(), spec)];
        walk(String::new(), spec, &mut props);
        for (_, s) in props {
            for v in s.x_kubernetes_validations.iter().flatten() {
                rules.push(v.message.clone().unwrap_or_default());
            }
        }
        let wanted = match kind.as_str() {
            "TrustProvider" => "exactly one of kubernetesServiceAccount",
            "CredentialProvider" => "exactly one of awsSts",
            "AccessPolicy" => "exactly one of sdkEndpoint, httpHeader, awsSigV4 or file",
            other => panic!("unexpected kind {other}"),
        };
        assert!(rules.iter().any(|m| m.starts_with(wanted)), "{kind}: no one-of rule in {rules:?}");
        assert!(rules.iter().all(|m| !m.is_empty()), "{kind}: every CEL rule carries a message");
    }
}

#[test]
fn cel_rules_only_touch_bounded_values() {
    // The apiserver refuses CRDs whose estimated CEL cost is too high; a rule over an
    // unbounded string or list is what makes it so.
    for (file, crd) in crds() {
        let mut props = Vec::new();
        walk(String::new(), root_schema(&crd), &mut props);
        for (path, s) in props {
            if s.x_kubernetes_validations.is_none() {
                continue;
            }
            if s.type_.as_deref() == Some("string") {
                assert!(s.max_length.is_some(), "{file}{path}: CEL on a string without maxLength");
            }
        }
    }
}
