//! The container images, built without a container engine (`e2e/src/images/`, `make
//! images`) and read back from their OCI archives, checked against what the Dockerfile
//! declares and what the chart, the webhook and the kubelet expect of them. Nothing
//! here trusts the assembler's own account: every file, digest and setting is read from
//! the archive.
//!
//! All tests share one build (the static release build of the three binaries takes
//! minutes the first time; the Debian root filesystem and the SDKs come from the cache
//! after the first build).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use cloudpass_e2e::{
    images::{
        self, APPS_IMAGE_REPOSITORY, BUILD_SCRIPT, BuildOptions, BuiltImage, PAUSE_IMAGE, REQUIREMENTS, SITE_PACKAGES,
        dockerfile::{Copy, Dockerfile, Stage},
    },
    repo_root,
};
use flate2::read::GzDecoder;
use serde_json::Value;
use sha2::{Digest, Sha256};

const TARGETS: [&str; 3] = ["operator", "webhook", "agent"];

/// The one build of this test binary, with the inputs it was given.
struct Built {
    images: Vec<BuiltImage>,
    epoch: i64,
    revision: String,
}

fn options() -> BuildOptions {
    let repo = repo_root();
    BuildOptions {
        // Pinned once, so that a commit landing during the tests changes nothing.
        source_date_epoch: Some(images::source_date_epoch(&repo).unwrap()),
        revision: Some(images::git_revision(&repo).unwrap()),
        ..Default::default()
    }
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let options = options();
        let started = std::time::Instant::now();
        let images = images::build_all(&options).map_err(|e| format!("{e:#}"))?;
        eprintln!("built {} images in {:.1}s", images.len(), started.elapsed().as_secs_f64());
        Ok(Built { images, epoch: options.source_date_epoch.unwrap(), revision: options.revision.unwrap() })
    });
    match result {
        Ok(built) => built,
        Err(e) => panic!("building the images: {e}"),
    }
}

fn image(name_prefix: &str) -> &'static BuiltImage {
    built()
        .images
        .iter()
        .find(|i| i.name.starts_with(name_prefix))
        .unwrap_or_else(|| panic!("no image named {name_prefix}*"))
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// One path of an image, as its layers leave it.
#[derive(Clone, Debug)]
struct File {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    data: Vec<u8>,
}

/// An OCI archive read back: every blob checked against its digest.
struct Archive {
    index: Value,
    manifest_digest: String,
    config: Value,
    /// The uncompressed layers, bottom first.
    layers: Vec<Vec<u8>>,
    compressed_sizes: Vec<u64>,
}

impl Archive {
    fn read(path: &Path) -> Self {
        let mut files = BTreeMap::new();
        let mut tar = tar::Archive::new(fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(name, data);
        }
        let layout: Value = serde_json::from_slice(&files["oci-layout"]).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let blob = |digest: &str| -> Vec<u8> {
            let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
            let data = files.get(&format!("blobs/sha256/{hex}")).unwrap_or_else(|| panic!("blob {digest} missing"));
            assert_eq!(sha256(data), digest, "blob content matches its name");
            data.clone()
        };
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "one image per archive");
        let descriptor = &manifests[0];
        assert_eq!(descriptor["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(descriptor["platform"], serde_json::json!({"architecture": "amd64", "os": "linux"}));
        let manifest_digest = descriptor["digest"].as_str().unwrap().to_owned();
        let manifest_bytes = blob(&manifest_digest);
        assert_eq!(descriptor["size"], manifest_bytes.len());
        let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
        let config_bytes = blob(manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        let config: Value = serde_json::from_slice(&config_bytes).unwrap();
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(config["rootfs"]["type"], "layers");
        let mut layers = Vec::new();
        let mut compressed_sizes = Vec::new();
        let descriptors = manifest["layers"].as_array().unwrap();
        assert_eq!(descriptors.len(), diff_ids.len(), "one diff_id per layer");
        for (layer, diff_id) in descriptors.iter().zip(diff_ids) {
            assert_eq!(layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
            let gz = blob(layer["digest"].as_str().unwrap());
            assert_eq!(layer["size"], gz.len());
            assert_eq!(&gz[4..8], &[0, 0, 0, 0], "no timestamp in the gzip header");
            let mut tar = Vec::new();
            GzDecoder::new(&gz[..]).read_to_end(&mut tar).unwrap();
            assert_eq!(sha256(&tar), diff_id.as_str().unwrap(), "diff_id is the uncompressed layer's digest");
            compressed_sizes.push(gz.len() as u64);
            layers.push(tar);
        }
        Self { index, manifest_digest, config, layers, compressed_sizes }
    }

    /// The name containerd gives the image on import.
    fn name(&self) -> String {
        let annotations = &self.index["manifests"][0]["annotations"];
        assert_eq!(annotations["io.containerd.image.name"], annotations["org.opencontainers.image.ref.name"]);
        annotations["io.containerd.image.name"].as_str().unwrap().to_owned()
    }

    /// The entries of one layer, in archive order.
    fn layer_entries(&self, layer: usize) -> Vec<(String, File)> {
        let mut archive = tar::Archive::new(&self.layers[layer][..]);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned();
                let header = entry.header().clone();
                let link = entry.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                assert!(
                    header.username().unwrap_or_default().unwrap_or_default().is_empty()
                        && header.groupname().unwrap_or_default().unwrap_or_default().is_empty(),
                    "{path}: numeric owners only"
                );
                let file = File {
                    kind: header.entry_type(),
                    mode: header.mode().unwrap(),
                    uid: header.uid().unwrap(),
                    gid: header.gid().unwrap(),
                    mtime: header.mtime().unwrap(),
                    link,
                    data,
                };
                (path, file)
            })
            .collect()
    }

    /// Every path of the image, the upper layers winning.
    fn files(&self) -> BTreeMap<String, File> {
        let mut files = BTreeMap::new();
        for layer in 0..self.layers.len() {
            let entries = self.layer_entries(layer);
            let paths: Vec<&String> = entries.iter().map(|(p, _)| p).collect();
            let mut sorted = paths.clone();
            sorted.sort();
            assert_eq!(paths, sorted, "layer {layer}: entries sorted by path");
            files.extend(entries);
        }
        files
    }

    /// Unpacks the layers, bottom first, into `dir`.
    fn unpack(&self, dir: &Path) {
        for layer in &self.layers {
            let mut archive = tar::Archive::new(&layer[..]);
            archive.set_preserve_permissions(true);
            archive.unpack(dir).unwrap();
        }
    }
}

fn dockerfile() -> Dockerfile {
    Dockerfile::parse(&fs::read_to_string(repo_root().join("Dockerfile")).unwrap()).unwrap()
}

fn app_version() -> String {
    fs::read_to_string(repo_root().join("charts/cloudpass/Chart.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("appVersion: "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("appVersion")
}

fn rfc3339(epoch: i64) -> String {
    jiff::Timestamp::from_second(epoch).unwrap().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The files (image path -> content) a final stage's COPY instructions declare, read
/// with Docker's rules: the build stage's `/out` holds the staged binaries, its other
/// paths are the Debian system's (this machine's), context paths are the repository's.
fn declared_files(stage: &Stage) -> BTreeMap<String, Vec<u8>> {
    let repo = repo_root();
    let mut files = BTreeMap::new();
    for args in stage.all("COPY") {
        let copy = Copy::parse(args, &BTreeMap::new()).unwrap();
        for source in &copy.sources {
            let local = match (&copy.from, source.strip_prefix("/out/")) {
                // What cargo built, independently of the assembler's staging.
                (Some(_), Some(binary)) => {
                    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or(repo.join("target"), |d| repo.join(d));
                    target_dir.join(cloudpass_e2e::images::built_binary(binary))
                }
                (Some(_), None) => PathBuf::from(source),
                (None, _) => repo.join(source),
            };
            if local.is_dir() {
                let mut stack = vec![local.clone()];
                while let Some(dir) = stack.pop() {
                    for entry in fs::read_dir(&dir).unwrap() {
                        let path = entry.unwrap().path();
                        if path.is_dir() {
                            stack.push(path);
                        } else {
                            let rel = path.strip_prefix(&local).unwrap().to_string_lossy().into_owned();
                            let dest = format!("{}/{rel}", copy.dest.trim_end_matches('/'));
                            files.insert(dest.trim_start_matches('/').to_owned(), fs::read(&path).unwrap());
                        }
                    }
                }
            } else {
                let dest = if copy.dest.ends_with('/') {
                    format!("{}{}", copy.dest, local.file_name().unwrap().to_string_lossy())
                } else {
                    copy.dest.clone()
                };
                files.insert(dest.trim_start_matches('/').to_owned(), fs::read(&local).unwrap());
            }
        }
    }
    files
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!(elf[4], 2, "64-bit");
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

/// Writes `data` as an executable file and runs it with `args`.
fn run_extracted(name: &str, data: &[u8], args: &[&str]) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fs::write(&path, data).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    Command::new(&path).args(args).env_clear().output().unwrap()
}

#[test]
fn every_dockerfile_target_holds_exactly_what_its_final_stage_declares() {
    let built = built();
    let file = dockerfile();
    let values = fs::read_to_string(repo_root().join("charts/cloudpass/values.yaml")).unwrap();
    let workspace_license = fs::read_to_string(repo_root().join("Cargo.toml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("license = "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap();
    for target in TARGETS {
        let binary = format!("cloudpass-{target}");
        let stage = file.stage(target).unwrap_or_else(|| panic!("no target {target}"));
        assert_eq!(stage.from, "scratch", "{target}: nothing but what the stage copies");
        let repository = format!("ghcr.io/cloudpass-dev/{binary}");
        assert!(values.contains(&format!("repository: {repository}\n")), "values.yaml: {repository}");
        let archive = Archive::read(&image(&repository).archive);
        assert_eq!(archive.name(), format!("{repository}:{}", app_version()), "{target}: the chart's default image");

        // Files: exactly the declared ones, with the declared content, plus their parents.
        let declared = declared_files(stage);
        let files = archive.files();
        let regular: BTreeMap<&str, &File> =
            files.iter().filter(|(_, f)| f.kind.is_file()).map(|(p, f)| (p.as_str(), f)).collect();
        assert_eq!(
            regular.keys().copied().collect::<BTreeSet<_>>(),
            declared.keys().map(|k| k.as_str()).collect::<BTreeSet<_>>(),
            "{target}: the files of the image"
        );
        let mut parents = BTreeSet::new();
        for path in declared.keys() {
            let mut prefix = String::new();
            for part in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                prefix = if prefix.is_empty() { part.to_string() } else { format!("{prefix}/{part}") };
                parents.insert(prefix.clone());
            }
        }
        let dirs: BTreeSet<&str> = files.iter().filter(|(_, f)| f.kind.is_dir()).map(|(p, _)| p.as_str()).collect();
        assert_eq!(dirs, parents.iter().map(|p| p.as_str()).collect(), "{target}: directories are the files' parents");
        assert_eq!(files.len(), regular.len() + dirs.len(), "{target}: no links, devices or anything else");
        for (path, content) in &declared {
            let file = regular[path.as_str()];
            assert!(file.data == *content, "{target}: /{path} has the declared content");
            let mode = if path.starts_with("usr/local/bin/") { 0o755 } else { 0o644 };
            assert_eq!(file.mode, mode, "{target}: /{path} mode");
        }
        assert!(declared.contains_key(&format!("usr/local/bin/{binary}")), "{target}: the binary the chart runs");
        assert!(declared.contains_key("etc/ssl/certs/ca-certificates.crt"), "{target}: Debian's CA certificates");
        for (path, file) in &files {
            assert_eq!((file.uid, file.gid), (0, 0), "{target}: /{path} owned by root");
            assert_eq!(file.mtime, built.epoch as u64, "{target}: /{path} has SOURCE_DATE_EPOCH as mtime");
            if file.kind.is_dir() {
                assert_eq!(file.mode, 0o755, "{target}: /{path}/ mode");
            }
        }
        let passwd = String::from_utf8(regular["etc/passwd"].data.clone()).unwrap();
        assert!(passwd.lines().any(|l| l.starts_with("nonroot:x:65532:65532:")), "{target}: user nonroot is 65532");
        let group = String::from_utf8(regular["etc/group"].data.clone()).unwrap();
        assert!(group.lines().any(|l| l == "nonroot:x:65532:"), "{target}: group nonroot is 65532");

        // Configuration: what USER, ENTRYPOINT and LABEL say, and nothing from the host.
        let config = &archive.config;
        assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("amd64"), Some("linux")));
        assert_eq!(config["created"], rfc3339(built.epoch), "{target}: created is SOURCE_DATE_EPOCH");
        let run = &config["config"];
        assert_eq!(stage.all("USER"), ["65532:65532"], "{target}: non-root, numerically");
        assert_eq!(run["User"], "65532:65532", "{target}: USER");
        let entrypoint = stage.all("ENTRYPOINT");
        let declared_entrypoint: Value = serde_json::from_str(entrypoint[0]).expect("ENTRYPOINT in exec form");
        assert_eq!(run["Entrypoint"], declared_entrypoint, "{target}: ENTRYPOINT");
        assert_eq!(run["Entrypoint"], serde_json::json!([format!("/usr/local/bin/{binary}")]));
        assert!(run.get("Cmd").is_none(), "{target}: arguments come from the chart");
        assert!(stage.all("RUN").is_empty() && stage.all("SHELL").is_empty(), "{target}: no shell, nothing to run");
        let labels = run["Labels"].as_object().unwrap();
        let declared_keys: BTreeSet<String> = stage
            .all("LABEL")
            .iter()
            .flat_map(|l| cloudpass_e2e::images::dockerfile::key_values("LABEL", l, &BTreeMap::new()).unwrap())
            .map(|(k, _)| k)
            .collect();
        assert_eq!(labels.keys().cloned().collect::<BTreeSet<_>>(), declared_keys, "{target}: the declared labels");
        let label = |key: &str| labels[&format!("org.opencontainers.image.{key}")].as_str().unwrap().to_owned();
        assert_eq!(label("title"), binary);
        assert!(!label("description").is_empty());
        assert_eq!(label("source"), "https://github.com/cloudpass-dev/cloudpass");
        assert_eq!(label("licenses"), workspace_license);
        assert_eq!(label("version"), app_version(), "{target}: version label is the chart's appVersion");
        assert!(
            stage.all("ARG").contains(&format!("VERSION={}", app_version()).as_str()),
            "{target}: Docker's default"
        );
        assert_eq!(label("revision"), built.revision, "{target}: revision label is git HEAD");
        assert_eq!(label("created"), rfc3339(built.epoch));
        let history = config["history"].as_array().unwrap();
        assert_eq!(history.len(), stage.instructions.len(), "{target}: one history entry per instruction");
        assert_eq!(
            history.iter().filter(|h| h.get("empty_layer").is_none()).count(),
            archive.layers.len(),
            "{target}: one layer per COPY"
        );
        assert!(history.iter().all(|h| h["created"] == rfc3339(built.epoch)), "{target}: history times");
    }
}

#[test]
fn binaries_are_static_leak_no_build_path_and_run_from_the_image() {
    let repo = repo_root().to_string_lossy().into_owned();
    let cargo_home =
        std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    for target in TARGETS {
        let binary = format!("cloudpass-{target}");
        let archive = Archive::read(&image(&format!("ghcr.io/cloudpass-dev/{binary}")).archive);
        let files = archive.files();
        let elf = &files[&format!("usr/local/bin/{binary}")].data;
        assert!(!has_interpreter(elf), "{binary}: statically linked (no PT_INTERP)");
        let contains = |needle: &str| elf.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(!contains(&repo), "{binary}: the checkout's path {repo} is remapped away");
        assert!(!contains(&cargo_home), "{binary}: the cargo home {cargo_home} is remapped away");
        let out = run_extracted(&binary, elf, &["--version"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{binary} --version: {out:?}");
        assert_eq!(stdout.trim(), format!("{binary} {}", app_version()), "{binary} --version");
        println!("{binary}: {} bytes, static", elf.len());
    }
}

#[test]
fn pause_image_is_the_kubernetes_sandbox() {
    let archive = Archive::read(&image(PAUSE_IMAGE).archive);
    assert_eq!(archive.name(), PAUSE_IMAGE);
    let version = images::pinned_version(&repo_root(), "KUBERNETES_VERSION").unwrap();
    assert!(PAUSE_IMAGE.ends_with(&format!(":{version}")), "tagged with the pinned Kubernetes version");
    let files = archive.files();
    assert_eq!(files.keys().collect::<Vec<_>>(), ["pause"], "only /pause");
    let pause = &files["pause"];
    assert_eq!(pause.mode, 0o755);
    assert!(!has_interpreter(&pause.data), "pause is static");
    let out = run_extracted("pause", &pause.data, &["-v"]);
    assert!(out.status.success(), "pause -v: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pause.c v"), "{out:?}");
    let run = &archive.config["config"];
    assert_eq!(run["Entrypoint"], serde_json::json!(["/pause"]));
    assert_eq!(run["User"], "65535:65535", "as Kubernetes' build/pause/Dockerfile");
}

#[test]
fn apps_image_runs_the_sdks_on_debian_python() {
    let built_image = image(APPS_IMAGE_REPOSITORY);
    let archive = Archive::read(&built_image.archive);
    let name = archive.name();
    let tag = name.strip_prefix(&format!("{APPS_IMAGE_REPOSITORY}:")).expect("the apps repository");
    assert_eq!(tag, &archive.manifest_digest["sha256:".len()..][..12], "tagged with its content");
    assert_eq!(archive.layers.len(), 3, "rootfs, SDKs, programs");

    // The programs layer holds exactly the scenarios' programs.
    let programs = archive.layer_entries(2);
    let apps_dir = repo_root().join("e2e/src/scenario/apps");
    let mut expected: Vec<String> = fs::read_dir(&apps_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".py"))
        .map(|n| format!("apps/{n}"))
        .collect();
    expected.push("apps".into());
    expected.sort();
    assert_eq!(programs.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), expected);
    for (path, file) in programs.iter().filter(|(_, f)| f.kind.is_file()) {
        assert_eq!(file.data, fs::read(apps_dir.join(path.strip_prefix("apps/").unwrap())).unwrap(), "{path}");
        assert_eq!((file.mode, file.uid, file.gid), (0o644, 0, 0), "{path}");
    }

    let files = archive.files();
    let site = SITE_PACKAGES.trim_start_matches('/');
    for path in [
        "usr/bin/python3.11".to_owned(),
        "etc/ssl/certs/ca-certificates.crt".to_owned(),
        format!("{site}/boto3/__init__.py"),
        format!("{site}/botocore/__init__.py"),
        format!("{site}/azure/identity/__init__.py"),
        format!("{site}/azure/storage/blob/__init__.py"),
        format!("{site}/google/auth/__init__.py"),
        format!("{site}/google/cloud/storage/__init__.py"),
        format!("{site}/requests/__init__.py"),
    ] {
        assert!(files.contains_key(&path), "/{path} in the apps image");
    }
    assert_eq!(files["usr/bin/python3"].link.as_deref(), Some("python3.11"), "Debian's python3 is 3.11");
    assert!(!files.keys().any(|p| p.starts_with("dev/")), "no device nodes: the runtime provides /dev");
    assert!(!files.contains_key("etc/resolv.conf") && !files.contains_key("etc/hostname"), "nothing of this host");
    let run = &archive.config["config"];
    assert_eq!(run["WorkingDir"], "/apps");
    assert_eq!(run["Cmd"], serde_json::json!(["python3"]));

    // The image's own Python imports the SDKs, in the image's root filesystem.
    let root = tempfile::tempdir().unwrap();
    archive.unpack(root.path());
    let script = "import boto3, azure.identity, azure.storage.blob, google.auth, google.cloud.storage, requests; \
                  import sys; print(sys.version_info[:2], boto3.__version__)";
    let is_root = fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let mut command = if is_root {
        Command::new("chroot")
    } else {
        let mut unshare = Command::new("unshare");
        unshare.args(["--map-root-user", "chroot"]);
        unshare
    };
    let out = command
        .arg(root.path())
        .args(["/usr/bin/python3", "-c", script])
        .env_clear()
        // Finds chroot (and unshare) here, and is the image's PATH inside.
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "python3 in the apps image: {}", String::from_utf8_lossy(&out.stderr));
    let boto3_pin = fs::read_to_string(repo_root().join(REQUIREMENTS))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("boto3==").map(str::to_owned))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("(3, 11) {boto3_pin}"));
}

#[test]
fn apps_sdks_are_pinned_as_in_the_test_bed() {
    let pins = |path: &str| -> BTreeMap<String, String> {
        fs::read_to_string(repo_root().join(path))
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (name, version) = l.split_once("==").unwrap_or_else(|| panic!("{path}: not pinned: {l}"));
                (name.split('[').next().unwrap().to_lowercase(), version.trim().to_owned())
            })
            .collect()
    };
    let test_bed = pins("e2e/tools/requirements.txt");
    let image = pins(REQUIREMENTS);
    for (name, version) in &test_bed {
        if name != "moto" {
            assert_eq!(image.get(name), Some(version), "{name}: the apps image has the test bed's SDK version");
        }
    }
}

#[test]
fn builds_are_reproducible() {
    let first = &built().images;
    // A second build into a fresh folder: every layer compressed again, every blob rewritten.
    let out = tempfile::tempdir().unwrap();
    let second = images::build_all(&BuildOptions {
        source_date_epoch: Some(built().epoch),
        revision: Some(built().revision.clone()),
        out_dir: Some(out.path().to_owned()),
        ..Default::default()
    })
    .unwrap();
    let digests = |images: &[BuiltImage]| -> Vec<(String, String)> {
        images.iter().map(|i| (i.name.clone(), Archive::read(&i.archive).manifest_digest)).collect()
    };
    assert_eq!(digests(first), digests(&second), "same inputs, same manifests");
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(fs::read(&a.archive).unwrap(), fs::read(&b.archive).unwrap(), "{}: same archive bytes", a.name);
    }
}

#[test]
fn image_sizes_are_reported() {
    for built in &built().images {
        let archive = Archive::read(&built.archive);
        let compressed: u64 = archive.compressed_sizes.iter().sum();
        let uncompressed: u64 = archive.layers.iter().map(|l| l.len() as u64).sum();
        assert!(compressed > 0 && compressed <= built.compressed_bytes, "{}", built.name);
        // A figure, not a limit: the goal for the agent is 10 MB compressed.
        println!(
            "{}: {:.2} MB compressed layers, {:.2} MB uncompressed, manifest {}",
            built.name,
            compressed as f64 / 1e6,
            uncompressed as f64 / 1e6,
            archive.manifest_digest
        );
    }
}

#[test]
fn dockerfile_build_stage_builds_what_the_chart_and_webhook_expect() {
    let file = dockerfile();
    let root_manifest = fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let rust_version = root_manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("workspace rust-version");
    let minor = |v: &str| -> (u32, u32) {
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap())
    };
    let finals: Vec<&str> = file.scratch_stages().map(|s| s.name.as_str()).collect();
    assert_eq!(finals, TARGETS, "the final stages are the three images");
    for target in TARGETS {
        let stage = file.stage(target).unwrap();
        for copy in stage.all("COPY") {
            let copy = Copy::parse(copy, &BTreeMap::new()).unwrap();
            let Some(from) = copy.from else { continue };
            let build = file.stage(&from).unwrap_or_else(|| panic!("{target}: no stage {from}"));
            // The build stage runs the shared script, with the toolchain the workspace needs.
            let runs = build.all("RUN").join(" ");
            assert!(runs.contains(&format!("{BUILD_SCRIPT} /out")), "{from}: runs {BUILD_SCRIPT}");
            assert!(runs.contains("musl-tools") && runs.contains("x86_64-unknown-linux-musl"), "{from}: musl");
            let toolchain =
                build.from.strip_prefix("rust:").and_then(|t| t.strip_suffix("-bookworm")).expect("rust:<v>-bookworm");
            assert!(minor(toolchain) >= minor(rust_version), "{} older than rust-version {rust_version}", build.from);
        }
    }
    // Static, locked, paths remapped; the agent for size.
    let script = fs::read_to_string(repo_root().join(BUILD_SCRIPT)).unwrap();
    for needle in [
        "cargo build --release --locked --target \"$triple\"",
        "cargo build --profile agent-image --locked --target \"$triple\" -p cloudpass-agent",
        "--remap-path-prefix",
        "triple=x86_64-unknown-linux-musl",
    ] {
        assert!(script.contains(needle), "{BUILD_SCRIPT}: {needle}");
    }
    for target in TARGETS {
        assert!(script.contains(&format!("cloudpass-{target}")), "{BUILD_SCRIPT} builds cloudpass-{target}");
    }

    let helpers = fs::read_to_string(repo_root().join("charts/cloudpass/templates/_helpers.tpl")).unwrap();
    assert!(helpers.contains("runAsUser: 65532") && helpers.contains("runAsGroup: 65532"), "the chart runs as 65532");
    let webhook_main = fs::read_to_string(repo_root().join("webhook/src/main.rs")).unwrap();
    assert!(
        webhook_main.contains(r#"default_value = "/usr/local/bin/cloudpass-agent""#),
        "the webhook's postStart hook runs the agent where the agent image puts it"
    );
    let ignore = fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"), ".dockerignore keeps target/ out of the build context");
}
