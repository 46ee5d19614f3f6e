//! The Helm chart with the real helm and kubectl against the real apiserver: lint,
//! deterministic rendering, installation, idempotent server-side apply, the RBAC matrix
//! of each component, the optional objects, and the README's install command.

use std::fs;

use cloudpass_e2e::{ControlPlane, repo_root};

const RELEASE: &str = "cp";
const NS: &str = "cloudpass-chart";

/// cert-manager issues the broker's certificate, with extra names of both kinds.
const CERT_MANAGER_WITH_SANS: &[&str] =
    &["--set", "certManager.enabled=true", "--set", "operator.broker.extraSANs={broker.example.com,10.0.0.5}"];

/// A public issuer behind an Ingress, NetworkPolicies and ServiceMonitors.
const EVERY_OPTIONAL_OBJECT: &[&str] = &[
    "--set",
    "issuer.url=https://oidc.example.com",
    "--set",
    "issuer.ingress.enabled=true",
    "--set",
    "issuer.ingress.className=nginx",
    "--set",
    "issuer.ingress.tlsSecretName=oidc-tls",
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "serviceMonitor.enabled=true",
];

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
    CERT_MANAGER_WITH_SANS,
    EVERY_OPTIONAL_OBJECT,
    &[
        "--set",
        "issuer.url=https://example.com/cloudpass",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.metricsNamespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
        "--set",
        "operator.broker.tokenCacheTTL=30s",
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
            assert_eq!(
                text.matches(needle).count(),
                3,
                "{needle} on every pod (controller, broker, webhook) for {combo:?}"
            );
        }
        assert!(!text.contains("caBundle:"), "the chart never renders a caBundle (no GitOps drift)");
    }
    let bad = helm(cp, &["lint", "--strict", &chart, "--set", "webhook.failurePolicy=Sometimes"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stdout).contains("failurePolicy"));
    let unknown = helm(cp, &["lint", "--strict", &chart, "--set", "webhook.replica=2"]);
    assert!(!unknown.status.success(), "unknown values are refused by the schema");
    let plain = helm(cp, &["lint", "--strict", &chart, "--set", "issuer.url=http://oidc.example.com"]);
    assert!(!plain.status.success(), "the issuer must be https");
    // An Ingress needs a public host at the root: refused with a message, not half-rendered.
    for (set, message) in [
        ("issuer.ingress.enabled=true", "needs issuer.url"),
        ("issuer.url=https://example.com/cloudpass,issuer.ingress.enabled=true", "has a path"),
    ] {
        let out = helm(cp, &["template", RELEASE, &chart, "-n", NS, "--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(message), "{set}: {stderr}");
    }
}

fn render(cp: &ControlPlane, extra: &[&str]) -> Vec<serde_yaml::Value> {
    let mut args = vec!["template", RELEASE, "./charts/cloudpass", "-n", NS];
    args.extend_from_slice(extra);
    let out = cp.helm().args(&args).current_dir(repo_root()).output().unwrap();
    assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_yaml::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap())
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    docs.iter()
        .map(|d| format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect()
}

#[test]
fn images_default_to_the_app_version_and_optional_objects_render_only_when_enabled() {
    let cp = ControlPlane::shared();
    let app_version = fs::read_to_string(repo_root().join("charts/cloudpass/Chart.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("appVersion: "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap();
    let defaults = render(cp, &[]);
    let text = serde_yaml::to_string(&defaults).unwrap();
    for image in ["cloudpass-operator", "cloudpass-webhook", "cloudpass-agent"] {
        assert!(text.contains(&format!("ghcr.io/cloudpass-dev/{image}:{app_version}")), "{image}:{app_version}");
    }
    let names = kinds(&defaults);
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("Ingress/") || n.starts_with("NetworkPolicy/") || n.starts_with("ServiceMonitor/")),
        "optional objects are off by default: {names:?}"
    );
    assert!(names.contains(&"Service/cp-broker".to_owned()));

    let all = render(cp, EVERY_OPTIONAL_OBJECT);
    let names = kinds(&all);
    for wanted in [
        "Ingress/cp-issuer",
        "Service/cp-issuer",
        "NetworkPolicy/cp-operator",
        "NetworkPolicy/cp-broker",
        "NetworkPolicy/cp-webhook",
    ] {
        assert!(names.contains(&wanted.to_owned()), "{wanted} missing: {names:?}");
    }
    // The Ingress routes the issuer's host, and only the two documents.
    let ingress = all.iter().find(|d| d["kind"] == "Ingress").unwrap();
    assert_eq!(ingress["spec"]["rules"][0]["host"], "oidc.example.com");
    let paths: Vec<&str> = ingress["spec"]["rules"][0]["http"]["paths"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/.well-known/openid-configuration", "/openid/v1/jwks"]);
    let broker = all.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "cp-broker").unwrap();
    let args = serde_yaml::to_string(&broker["spec"]["template"]["spec"]["containers"][0]["args"]).unwrap();
    assert!(args.contains("--issuer-url=https://oidc.example.com\n") && args.contains("--issuer-addr=0.0.0.0:8081"));
    // The issuer's documents come from the broker's pods.
    let issuer = all.iter().find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "cp-issuer").unwrap();
    assert_eq!(issuer["spec"]["selector"]["app.kubernetes.io/component"], "broker");
    // Every component is scraped; the webhook's HTTPS verified with its own CA.
    let monitors: Vec<_> = all.iter().filter(|d| d["kind"] == "ServiceMonitor").collect();
    assert_eq!(monitors.len(), 3);
    let webhook = monitors.iter().find(|m| m["metadata"]["name"] == "cp-webhook").unwrap();
    let endpoint = &webhook["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(endpoint["tlsConfig"]["ca"]["secret"]["name"], "cp-webhook-tls");
    assert!(endpoint["tlsConfig"]["insecureSkipVerify"].is_null());
    let operator_monitor = monitors.iter().find(|m| m["metadata"]["name"] == "cp-operator").unwrap();
    let selected = &operator_monitor["spec"]["selector"]["matchLabels"];
    let service = all
        .iter()
        .find(|d| {
            d["kind"] == "Service"
                && selected
                    .as_mapping()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &d["metadata"]["labels"][k.as_str().unwrap()] == v)
        })
        .expect("a Service the operator's ServiceMonitor selects");
    assert_eq!(service["spec"]["ports"][0]["name"], operator_monitor["spec"]["endpoints"][0]["port"]);

    // cert-manager: the broker's certificate comes from a CA Issuer, mounted as files.
    let managed = render(cp, CERT_MANAGER_WITH_SANS);
    let names = kinds(&managed);
    for wanted in ["Certificate/cp-broker", "Certificate/cp-broker-ca", "Issuer/cp-broker-ca", "Issuer/cp-selfsigned"] {
        assert!(names.contains(&wanted.to_owned()), "{wanted} missing: {names:?}");
    }
    let certificate =
        managed.iter().find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == "cp-broker").unwrap();
    assert_eq!(certificate["spec"]["ipAddresses"][0], "10.0.0.5");
    assert_eq!(certificate["spec"]["dnsNames"][2], "broker.example.com");
    let broker = managed.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "cp-broker").unwrap();
    let args = serde_yaml::to_string(&broker["spec"]["template"]["spec"]["containers"][0]["args"]).unwrap();
    assert!(args.contains("--broker-cert-mode=files") && args.contains("--broker-tls-ca-file="), "{args}");
}

#[test]
fn the_apiserver_accepts_the_ingress_and_network_policies() {
    let cp = ControlPlane::shared();
    let _logs = cp.logs_on_panic();
    let namespace = "cloudpass-optional";
    cp.kubectl_ok(&["create", "namespace", namespace]).unwrap();
    let mut extra = vec!["--set", "networkPolicy.metricsNamespaceSelector.matchLabels.team=monitoring"];
    extra.extend_from_slice(EVERY_OPTIONAL_OBJECT);
    let mut args = vec!["template", RELEASE, "./charts/cloudpass", "-n", namespace];
    args.extend_from_slice(&extra);
    let out = cp.helm().args(&args).current_dir(repo_root()).output().unwrap();
    assert!(out.status.success());
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap())
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &serde_yaml::Value| {
            ["Ingress", "NetworkPolicy", "Service"].contains(&d["kind"].as_str().unwrap_or(""))
        })
        .collect();
    assert!(kinds(&docs).contains(&"Ingress/cp-issuer".to_owned()), "{:?}", kinds(&docs));
    let yaml: String = docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap())).collect();
    let out = cp.kubectl_output(&["apply", "--dry-run=server", "-n", namespace, "-f", "-"], Some(&yaml)).unwrap();
    assert!(out.status.success(), "refused: {}", String::from_utf8_lossy(&out.stderr));
    let accepted = String::from_utf8_lossy(&out.stdout);
    for name in [
        "ingress.networking.k8s.io/cp-issuer",
        "networkpolicy.networking.k8s.io/cp-operator",
        "networkpolicy.networking.k8s.io/cp-broker",
    ] {
        assert!(accepted.contains(name), "{name}: {accepted}");
    }
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
        "deployment.apps/cp-broker",
        "deployment.apps/cp-webhook",
        "service/cp-webhook",
        "service/cp-broker",
        "serviceaccount/cp-broker",
        "poddisruptionbudget.policy/cp-broker",
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
        // The broker's per-namespace Role and its binding.
        &["create", "roles", "-n", "team"],
        &["create", "rolebindings", "-n", "team"],
        &["update", "roles/cp-broker-secrets", "-n", "team"],
        &["delete", "rolebindings/cp-broker-secrets", "-n", "team"],
        // The copy of the broker's CA that injected agents mount.
        &["create", "configmaps", "-n", "team"],
        &["get", "configmaps/cp-broker-ca", "-n", "team"],
        &["watch", "configmaps/cp-broker-ca", "--all-namespaces"],
        &["update", "configmaps/cp-broker-ca", "-n", "team"],
        &["delete", "configmaps/cp-broker-ca", "-n", "team"],
    ];
    let operator_no: &[&[&str]] = &[
        &["update", "accesspolicies.cloudpass.dev", "-n", "team"],
        &["get", "configmaps/app-settings", "-n", "team"],
        &["list", "configmaps", "-n", "team"],
        &["watch", "configmaps", "--all-namespaces"],
        &["update", "configmaps/app-settings", "-n", "team"],
        &["delete", "configmaps/app-settings", "-n", "team"],
        &["delete", "secrets", "-n", "team"],
        &["update", "secrets/other", "-n", NS],
        &["update", "secrets/cp-webhook-tls", "-n", NS],
        &["update", "secrets/cp-broker-tls", "-n", "team"],
        &["create", "pods", "-n", "team"],
        &["list", "pods", "-n", "team"],
        &["create", "pods/exec", "-n", "team"],
        &["create", "serviceaccounts/token", "-n", "team"],
        &["create", "clusterrolebindings"],
        &["escalate", "clusterroles"],
        &["patch", "mutatingwebhookconfigurations"],
        // Never lists or watches a Secret; the broker's rights are not its own.
        &["list", "secrets", "-n", "team"],
        &["watch", "secrets", "--all-namespaces"],
        &["create", "tokenreviews.authentication.k8s.io"],
        &["get", "pods", "-n", "team"],
        &["update", "secrets/cp-broker-tls", "-n", NS],
        &["update", "secrets/cp-issuer-keys", "-n", NS],
        &["update", "roles/other", "-n", "team"],
        &["delete", "rolebindings/other", "-n", "team"],
        &["escalate", "roles", "-n", "team"],
        &["bind", "roles", "-n", "team"],
    ];
    let broker_yes: &[&[&str]] = &[
        &["create", "tokenreviews.authentication.k8s.io"],
        &["get", "pods", "-n", "team"],
        &["watch", "configmaps", "-n", NS],
        &["update", "secrets/cp-broker-tls", "-n", NS],
        &["get", "secrets/cp-issuer-keys", "-n", NS],
        &["update", "secrets/cp-issuer-keys", "-n", NS],
        &["update", "configmaps/cp-broker-ca", "-n", NS],
        // Deletions refuse a policy at once (docs/broker.md, Revocation).
        &["watch", "accesspolicies.cloudpass.dev", "--all-namespaces"],
    ];
    // Until the controller grants a namespace's referenced Secrets by name (tested where
    // the controller runs: operator/tests/chart_runs.rs), it reads no Secret there.
    let broker_no: &[&[&str]] = &[
        &["get", "secrets", "-n", "team"],
        &["get", "secrets/api-key", "-n", "team"],
        &["list", "secrets", "-n", "team"],
        &["watch", "secrets", "--all-namespaces"],
        &["get", "secrets/cp-webhook-tls", "-n", NS],
        &["list", "secrets", "-n", NS],
        &["update", "configmaps/cloudpass-config-team", "-n", NS],
        &["update", "accesspolicies.cloudpass.dev", "-n", "team"],
        &["list", "credentialproviders.cloudpass.dev", "--all-namespaces"],
        &["patch", "accesspolicies.cloudpass.dev", "--subresource=status", "-n", "team"],
        &["list", "pods", "-n", "team"],
        &["create", "pods", "-n", "team"],
        &["create", "roles", "-n", "team"],
        &["create", "rolebindings", "-n", "team"],
        &["update", "leases.coordination.k8s.io", "-n", NS],
    ];
    let webhook_yes: &[&[&str]] = &[
        &["watch", "configmaps", "-n", NS],
        &["get", "secrets/cp-webhook-tls", "-n", NS],
        &["update", "secrets/cp-webhook-tls", "-n", NS],
        &["patch", "mutatingwebhookconfigurations/cp-webhook"],
    ];
    let webhook_no: &[&[&str]] = &[
        &["get", "secrets/cloudpass-issuer-keys", "-n", NS],
        &["get", "secrets/cp-issuer-keys", "-n", NS],
        &["get", "secrets/cp-broker-tls", "-n", NS],
        &["list", "secrets", "-n", NS],
        &["create", "tokenreviews.authentication.k8s.io"],
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
        ("broker", broker_yes, true),
        ("broker", broker_no, false),
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
    // Its values are valid for this chart.
    let values = tempfile::NamedTempFile::new().unwrap();
    fs::write(values.path(), serde_yaml::to_string(&release["spec"]["values"]).unwrap()).unwrap();
    let out = helm(ControlPlane::shared(), &["lint", "--strict", &chart(), "-f", &values.path().to_string_lossy()]);
    assert!(out.status.success(), "the HelmRelease's values: {}", String::from_utf8_lossy(&out.stdout));
}

/// The `--set` values of the README's `helm install` command.
fn readme_install_sets() -> Vec<String> {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme.split("## Install into a cluster").nth(1).expect("an \"Install into a cluster\" section");
    let section = section.split("\n## ").next().unwrap();
    let command = section
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .find(|block| block.contains("helm install cloudpass ./charts/cloudpass"))
        .expect("a helm install command")
        .replace("\\\n", " ");
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(
        words[..7],
        ["helm", "install", "cloudpass", "./charts/cloudpass", "-n", "cloudpass-system", "--create-namespace"]
    );
    words.windows(2).filter(|w| w[0] == "--set").map(|w| w[1].to_owned()).collect()
}

#[test]
fn the_readme_install_command_matches_the_chart() {
    let cp = ControlPlane::shared();
    let schema: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(repo_root().join("charts/cloudpass/values.schema.json")).unwrap())
            .unwrap();
    let sets = readme_install_sets();
    assert!(sets.iter().any(|s| s.starts_with("issuer.url=https://")), "the README sets the issuer: {sets:?}");
    for set in &sets {
        let key = set.split_once('=').expect("key=value").0;
        let mut node = &schema;
        for part in key.split('.') {
            node = &node["properties"][part];
            if let Some(reference) = node["$ref"].as_str() {
                node = &schema["$defs"][reference.trim_start_matches("#/$defs/")];
            }
            assert!(node.is_object(), "README sets {key}, which values.schema.json does not have");
        }
    }
    // And the values render, lint-clean, with the shell variable filled in.
    let mut args: Vec<String> = ["lint", "--strict", "./charts/cloudpass"].map(str::to_owned).into();
    for set in &sets {
        args.extend(["--set".to_owned(), set.replace("$REGISTRY", "registry.example.com/cloudpass")]);
    }
    let out = cp.helm().args(&args).current_dir(repo_root()).output().unwrap();
    assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stdout));
    args[0] = "template".into();
    args[1] = "cloudpass".into();
    let out = cp.helm().args(&args).args(["-n", "cloudpass-system"]).current_dir(repo_root()).output().unwrap();
    assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("image: registry.example.com/cloudpass/cloudpass-operator:"));
    // The opt-in label the README tells users to set is the one the webhook selects.
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    assert!(readme.contains("kubectl label namespace team cloudpass.dev/injection=enabled"));
    assert!(text.contains("key: cloudpass.dev/injection") && text.contains("values: [\"enabled\"]"));
}
