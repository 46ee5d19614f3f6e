//! The container images, without a container engine: the Dockerfile is parsed and each
//! target checked against what the chart and the webhook expect of it.

use std::{collections::BTreeMap, fs, process::Command};

use cloudpass_e2e::repo_root;

/// One `FROM ... AS name` stage: its base image and its instructions (keyword, rest).
#[derive(Debug)]
struct Stage {
    from: String,
    instructions: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions.iter().filter(|(k, _)| k == keyword).map(|(_, v)| v.as_str()).collect()
    }
}

/// Stages by name, with line continuations joined and comments dropped.
fn parse_dockerfile(text: &str) -> BTreeMap<String, Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => current.push_str(&format!("{} ", part.trim())),
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages = BTreeMap::new();
    let mut name = None;
    for line in logical.into_iter().filter(|l| !l.is_empty()) {
        let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let (keyword, rest) = (keyword.to_uppercase(), rest.trim().to_owned());
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let stage = match words.as_slice() {
                [_, as_, stage] if as_.eq_ignore_ascii_case("as") => stage.to_string(),
                _ => panic!("every stage is named: FROM {rest}"),
            };
            stages.insert(stage.clone(), Stage { from: words[0].to_owned(), instructions: Vec::new() });
            name = Some(stage);
        } else {
            let stage = name.as_ref().expect("an instruction before the first FROM");
            stages.get_mut(stage).unwrap().instructions.push((keyword, rest));
        }
    }
    stages
}

/// Workspace packages and the binaries each builds, from `cargo metadata`.
fn workspace_binaries() -> BTreeMap<String, Vec<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let bins = p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect();
            (p["name"].as_str().unwrap().to_owned(), bins)
        })
        .collect()
}

/// `(major, minor)` of a version such as `1.95` or `1.89.0`.
fn minor_version(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn every_image_target_is_distroless_nonroot_and_runs_the_binary_the_chart_expects() {
    let dockerfile = fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let stages = parse_dockerfile(&dockerfile);
    let packages = workspace_binaries();
    let root_manifest = fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let rust_version = root_manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("workspace rust-version");
    let app_version = fs::read_to_string(repo_root().join("charts/cloudpass/Chart.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("appVersion: "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("appVersion");
    let values = fs::read_to_string(repo_root().join("charts/cloudpass/values.yaml")).unwrap();
    let helpers = fs::read_to_string(repo_root().join("charts/cloudpass/templates/_helpers.tpl")).unwrap();

    for target in ["operator", "webhook", "agent"] {
        let binary = format!("cloudpass-{target}");
        let path = format!("/usr/local/bin/{binary}");
        let stage = stages.get(target).unwrap_or_else(|| panic!("no target {target}"));
        assert_eq!(stage.from, "gcr.io/distroless/cc-debian12:nonroot", "{target}: minimal final image");
        assert_eq!(stage.all("USER"), ["65532:65532"], "{target}: non-root, numerically");
        assert!(helpers.contains("runAsUser: 65532") && helpers.contains("runAsGroup: 65532"), "the chart agrees");
        // No shell in the image: nothing may need one.
        assert!(stage.all("RUN").is_empty() && stage.all("SHELL").is_empty(), "{target}: no RUN on distroless");
        let entrypoint = stage.all("ENTRYPOINT");
        assert_eq!(entrypoint.len(), 1, "{target}: one ENTRYPOINT");
        let exec: Vec<String> = serde_json::from_str(entrypoint[0])
            .unwrap_or_else(|_| panic!("{target}: ENTRYPOINT in exec (JSON) form, not shell form"));
        assert_eq!(exec, [path.as_str()], "{target}: runs the binary itself");
        assert!(stage.all("CMD").is_empty(), "{target}: arguments come from the chart");

        // The binary comes from a stage that builds exactly that workspace package.
        let copies = stage.all("COPY");
        assert_eq!(copies.len(), 1, "{target}: one COPY");
        let words: Vec<&str> = copies[0].split_whitespace().collect();
        let from = words[0].strip_prefix("--from=").expect("COPY --from=<build stage>");
        assert_eq!(words.last(), Some(&path.as_str()), "{target}: binary at the path the chart and webhook use");
        let build = stages.get(from).unwrap_or_else(|| panic!("{target}: no stage {from}"));
        let runs = build.all("RUN").join(" ");
        let package = runs
            .split("cargo build --release --locked -p ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{from}: cargo build --release --locked -p <package>"));
        let bins = packages.get(package).unwrap_or_else(|| panic!("{from}: -p {package} is not a workspace package"));
        assert!(bins.contains(&binary), "{package} builds {binary}: {bins:?}");
        assert!(runs.contains(&format!("target/release/{binary}")), "{from}: copies out {binary}");

        // The build stage's Rust is at least the workspace's minimum.
        let mut base = build.from.as_str();
        while let Some(parent) = stages.get(base) {
            base = parent.from.as_str();
        }
        let toolchain =
            base.strip_prefix("rust:").and_then(|t| t.strip_suffix("-bookworm")).expect("rust:<v>-bookworm");
        assert!(
            minor_version(toolchain) >= minor_version(rust_version),
            "{base} older than rust-version {rust_version}"
        );

        let labels = stage.all("LABEL").join(" ");
        for label in ["title", "description", "source", "licenses", "version"] {
            assert!(labels.contains(&format!("org.opencontainers.image.{label}=")), "{target}: OCI label {label}");
        }
        assert!(stage.all("ARG").contains(&format!("VERSION={app_version}").as_str()), "{target}: version label");
        // The chart's default image is this target's binary, tagged with appVersion.
        assert!(values.contains(&format!("repository: ghcr.io/cloudpass-dev/{binary}\n")), "values.yaml: {binary}");
    }

    let webhook_main = fs::read_to_string(repo_root().join("webhook/src/main.rs")).unwrap();
    assert!(
        webhook_main.contains(r#"default_value = "/usr/local/bin/cloudpass-agent""#),
        "the webhook's startup probe runs the agent where the agent image puts it"
    );
    let ignore = fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"), ".dockerignore keeps target/ out of the build context");
}
