//! The Helm chart with the real helm and kubectl against the real apiserver: lint,
//! deterministic rendering, installation, idempotent server-side apply, and the RBAC
//! matrix of each component.

use std::fs;

use cloudpass_e2e::{ControlPlane, repo_root};

const RELEASE: &str = "cp";
const NS: &str = "cloudpass-chart";

/// Documented option combinations.
const COMBINATIONS: &[&[&str]] = &[
    &[],
    &["--set", "certManager.enabled=true"],
    &[
        "--set",
        "certManager.enabled=true",
        "--set",
        "certManager.issuerRef.name=corp-ca",
        "--set",
        "certManager.issuerRef.kind=ClusterIssuer",
    ],
    &[
        "--set",
        "podDisruptionBudget.enabled=false",
        "--set",
        "webhook.failurePolicy=Ignore",
        "--set",
        "webhook.timeoutSeconds=3",
    ],
    &[
        "--set",
        "operator.replicas=1",
        "--set",
        "webhook.replicas=3",
        "--set",
        "operator.image.tag=v9.9.9",
        "--set",
        "operator.logFormat=text",
    ],
];

fn helm(cp: &ControlPlane, args: &[&str]) -> std::process::Output {
    cp.helm().args(args).output().unwrap()
}

fn chart() -> String {
    repo_root().join("charts/cloudpass").to_string_lossy().into_owned()
}

#[test]
fn chart_crds_are_the_generated_crds() {
    for entry in fs::read_dir(repo_root().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let in_chart = fs::read_to_string(repo_root().join("charts/cloudpass/crds").join(name)).unwrap_or_default();
        assert!(
            in_chart == fs::read_to_string(&path).unwrap(),
            "charts/cloudpass/crds/{} differs from crds/; copy it: cp crds/*.yaml charts/cloudpass/crds/",
            name.to_string_lossy()
        );
    }
}

#[test]
fn lint_is_clean_and_rendering_is_deterministic_for_every_combination() {
    let cp = ControlPlane::shared();
    let chart = chart();
    for combo in COMBINATIONS {
        let mut lint = vec!["lint", "--strict", &chart[..]];
        lint.extend_from_slice(combo);
        let out = helm(cp, &lint);
        assert!(out.status.success(), "helm lint {combo:?}: {}", String::from_utf8_lossy(&out.stdout));
        let mut template = vec!["template", RELEASE, &chart[..], "-n", NS];
        template.extend_from_slice(combo);
        let first = helm(cp, &template);
        assert!(first.status.success(), "helm template {combo:?}: {}", String::from_utf8_lossy(&first.stderr));
        assert_eq!(first.stdout, helm(cp, &template).stdout, "rendering changes between runs for {combo:?}");
        let text = String::from_utf8(first.stdout).unwrap();
        // Every pod runs restricted.
        for needle in [
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "type: RuntimeDefault",
        ] {
            assert_eq!(text.matches(needle).count(), 2, "{needle} on both pods for {combo:?}");
        }
        assert!(!text.contains("caBundle:"), "the chart never renders a caBundle (no GitOps drift)");
    }
    let bad = helm(cp, &["lint", "--strict", &chart, "--set", "webhook.failurePolicy=Sometimes"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stdout).contains("failurePolicy"));
    let unknown = helm(cp, &["lint", "--strict", &chart, "--set", "webhook.replica=2"]);
    assert!(!unknown.status.success(), "unknown values are refused by the schema");
}

fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let who = format!("--as=system:serviceaccount:{NS}:{RELEASE}-{sa}");
    let mut full = vec!["auth", "can-i", &who[..]];
    full.extend_from_slice(args);
    let out = cp.kubectl_output(&full, None).unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test]
async fn installs_applies_idempotently_and_grants_least_privilege() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let out = helm(cp, &["install", RELEASE, &chart(), "-n", NS, "--create-namespace"]);
    assert!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cloudpass.dev/injection=enabled"),
        "NOTES tell the next step"
    );
    cp.invalidate_discovery_cache();
    let listing = cp.kubectl_ok(&["get", "deploy,svc,sa,role,rolebinding,pdb", "-n", NS, "-o", "name"]).unwrap();
    for wanted in [
        "deployment.apps/cp-operator",
        "deployment.apps/cp-webhook",
        "service/cp-webhook",
        "poddisruptionbudget.policy/cp-webhook",
    ] {
        assert!(listing.contains(wanted), "{wanted} missing:\n{listing}");
    }
    cp.kubectl_ok(&["get", "mutatingwebhookconfiguration", "cp-webhook"]).unwrap();

    // Rendered manifests applied server-side twice: the second time changes nothing.
    let rendered = helm(cp, &["template", RELEASE, &chart(), "-n", NS]).stdout;
    let rendered = String::from_utf8(rendered).unwrap();
    let apply = ["apply", "--server-side", "--force-conflicts", "--field-manager=gitops", "-f", "-"];
    let out = cp.kubectl_output(&apply, Some(&rendered)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let diff = cp
        .kubectl_output(
            &["diff", "--server-side", "--force-conflicts", "--field-manager=gitops", "-f", "-"],
            Some(&rendered),
        )
        .unwrap();
    assert_eq!(diff.status.code(), Some(0), "a second apply would change: {}", String::from_utf8_lossy(&diff.stdout));

    // What each component may do, and what it may not.
    let operator_yes: &[&[&str]] = &[
        &["list", "accesspolicies.cloudpass.dev", "--all-namespaces"],
        &["watch", "trustproviders.cloudpass.dev", "--all-namespaces"],
        &["patch", "accesspolicies.cloudpass.dev", "--subresource=status", "-n", "team"],
        &["create", "configmaps", "-n", NS],
        &["update", "leases.coordination.k8s.io", "-n", NS],
        &["create", "events.events.k8s.io", "-n", "team"],
        &["get", "secrets", "-n", "team"],
        &["list", "namespaces"],
    ];
    let operator_no: &[&[&str]] = &[
        &["update", "accesspolicies.cloudpass.dev", "-n", "team"],
        &["create", "configmaps", "-n", "team"],
        &["delete", "secrets", "-n", "team"],
        &["update", "secrets/other", "-n", NS],
        &["create", "pods", "-n", "team"],
        &["create", "clusterrolebindings"],
        &["escalate", "clusterroles"],
        &["patch", "mutatingwebhookconfigurations"],
    ];
    let webhook_yes: &[&[&str]] = &[
        &["watch", "configmaps", "-n", NS],
        &["get", "secrets/cp-webhook-tls", "-n", NS],
        &["update", "secrets/cp-webhook-tls", "-n", NS],
        &["patch", "mutatingwebhookconfigurations/cp-webhook"],
    ];
    let webhook_no: &[&[&str]] = &[
        &["get", "secrets/cloudpass-issuer-keys", "-n", NS],
        &["list", "secrets", "-n", NS],
        &["get", "secrets", "-n", "team"],
        &["list", "configmaps", "-n", "team"],
        &["patch", "mutatingwebhookconfigurations/someone-else"],
        &["create", "pods", "-n", "team"],
        &["list", "accesspolicies.cloudpass.dev", "--all-namespaces"],
        &["create", "rolebindings", "-n", NS],
    ];
    let mut wrong = Vec::new();
    for (sa, cases, want) in [
        ("operator", operator_yes, true),
        ("operator", operator_no, false),
        ("webhook", webhook_yes, true),
        ("webhook", webhook_no, false),
    ] {
        for case in cases {
            if can_i(cp, sa, case) != want {
                wrong.push(format!("{sa} {}: expected {}", case.join(" "), if want { "yes" } else { "no" }));
            }
        }
    }
    assert!(wrong.is_empty(), "RBAC matrix:\n{}", wrong.join("\n"));

    let out = helm(cp, &["uninstall", RELEASE, "-n", NS]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn kustomize_base_is_the_rendered_chart_and_builds() {
    let cp = ControlPlane::shared();
    let rendered = helm(cp, &["template", "cloudpass", &chart(), "-n", "cloudpass-system", "--include-crds"]);
    assert!(rendered.status.success());
    let path = repo_root().join("deploy/kustomize/base/cloudpass.yaml");
    if std::env::var_os("CLOUDPASS_UPDATE_GENERATED").is_some() {
        fs::write(&path, &rendered.stdout).unwrap();
    }
    assert!(
        fs::read(&path).unwrap() == rendered.stdout,
        "deploy/kustomize/base/cloudpass.yaml is out of date with the chart; regenerate with: CLOUDPASS_UPDATE_GENERATED=1 cargo test -p cloudpass-e2e --test chart"
    );
    let base = repo_root().join("deploy/kustomize/base");
    let built = cp.kubectl_ok(&["kustomize", &base.to_string_lossy()]).unwrap();
    for kind in ["CustomResourceDefinition", "Deployment", "MutatingWebhookConfiguration", "Namespace"] {
        assert!(built.contains(&format!("kind: {kind}")), "{kind} missing from the kustomize build");
    }
}

#[test]
fn flux_example_installs_this_chart() {
    let text = fs::read_to_string(repo_root().join("deploy/flux/helmrelease.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let release = docs.iter().find(|d| d["kind"] == "HelmRelease").expect("a HelmRelease");
    assert_eq!(release["spec"]["chart"]["spec"]["chart"], "./charts/cloudpass");
    assert!(repo_root().join("charts/cloudpass/Chart.yaml").exists());
    assert_eq!(release["spec"]["install"]["crds"], "CreateReplace", "CRDs are installed and upgraded");
}
