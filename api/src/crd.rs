//! The CustomResourceDefinitions, as checked in under `crds/` (`make crds` writes them;
//! a test fails when they differ from what this code generates).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::{AccessPolicy, CredentialProvider, TrustProvider};

/// Header of every generated CRD file.
pub const GENERATED_HEADER: &str = "# Generated from api/src by `make crds`. Do not edit by hand.\n";

/// Every CRD with the file name it is stored under in `crds/`.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("cloudpass.dev_trustproviders.yaml", finish(TrustProvider::crd())),
        ("cloudpass.dev_credentialproviders.yaml", finish(CredentialProvider::crd())),
        ("cloudpass.dev_accesspolicies.yaml", finish(AccessPolicy::crd())),
    ]
}

/// A CRD as the YAML document stored in `crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml::to_string(crd).expect("a CRD serializes to YAML");
    format!("{GENERATED_HEADER}{body}")
}

/// Drops `nullable: true`, which kube adds for every `Option`. Without it the apiserver
/// prunes an explicit `null` (as some GitOps tools write) before validation, so a CEL
/// rule's `has(self.x)` never sees a null and an absent field stays absent.
fn finish(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            strip_nullable(schema);
        }
    }
    crd
}

fn strip_nullable(schema: &mut JSONSchemaProps) {
    schema.nullable = None;
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_nullable(child);
    }
    match schema.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(item)) => strip_nullable(item),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter_mut().for_each(strip_nullable),
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        strip_nullable(extra);
    }
}
