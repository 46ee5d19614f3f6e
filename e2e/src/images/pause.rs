//! The pod sandbox ("pause") image, built as Kubernetes builds it: `pause.c` from the
//! pinned Kubernetes source (the Go module cache's copy, the one `make tools` uses),
//! compiled static, alone in a `FROM scratch` image that runs it as 65535.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{
    layer::{Content, EXEC_MODE, Node, Store, Tree, sha256_digest},
    oci::{DEFAULT_PATH, History, ImageSpec, RunConfig},
};

/// Name of the pause image: the sandbox image the node's containerd must be configured
/// with. Its tag is the Kubernetes version pinned in `e2e/tools/versions.env` (a test and
/// the build check that they agree).
pub const PAUSE_IMAGE: &str = "localhost/cloudpass-e2e/pause:1.37.2";

/// `KEY=value` of `e2e/tools/versions.env`.
pub fn pinned_version(repo: &Path, key: &str) -> Result<String> {
    let path = repo.join("e2e/tools/versions.env");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("{key} is not set in {}", path.display()))
}

/// The directory of `k8s.io/kubernetes@v<version>` in the Go module cache (downloaded
/// from the Go module proxy if needed).
fn kubernetes_source(version: &str) -> Result<PathBuf> {
    // Outside any module, so that no go.mod or go.work around changes the answer.
    let scratch = tempfile::tempdir()?;
    let out = Command::new("go")
        .args(["mod", "download", "-json", &format!("k8s.io/kubernetes@v{version}")])
        .current_dir(scratch.path())
        .output()
        .context("running `go mod download` (Go is needed for the pause image, as for `make tools`)")?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("go mod download: {}", String::from_utf8_lossy(&out.stderr)))?;
    if !out.status.success() {
        bail!("go mod download k8s.io/kubernetes@v{version}: {}", info["Error"]);
    }
    info["Dir"].as_str().map(PathBuf::from).context("go mod download printed no Dir")
}

/// Compiles `pause.c` into `work` (again only if the source or the command changed) and
/// returns the image spec.
pub fn image(repo: &Path, work: &Path, store: &Store, epoch: i64) -> Result<ImageSpec> {
    let version = pinned_version(repo, "KUBERNETES_VERSION")?;
    let (_, tag) = PAUSE_IMAGE.rsplit_once(':').expect("a tag");
    if tag != version {
        bail!("PAUSE_IMAGE ({PAUSE_IMAGE}) does not follow KUBERNETES_VERSION={version} in versions.env: update it");
    }
    let source_dir = kubernetes_source(&version)?.join("build/pause");
    let source = source_dir.join("linux/pause.c");
    // The version pause.c prints (`pause -v`) is the pause release the Makefile names.
    let makefile = fs::read_to_string(source_dir.join("Makefile"))?;
    let pause_tag = makefile
        .lines()
        .find_map(|l| l.strip_prefix("TAG ?= "))
        .map(str::trim)
        .context("build/pause/Makefile: no `TAG ?=`")?;
    let source_root = source_dir.to_str().context("a UTF-8 module path")?;
    // Kubernetes' own flags (build/pause/Makefile), stripped, with the module cache's
    // path mapped away so that the binary does not depend on where the cache is.
    let args: Vec<String> = vec![
        "-Os".into(),
        "-Wall".into(),
        "-Werror".into(),
        "-static".into(),
        "-s".into(),
        format!("-DVERSION=v{pause_tag}-cloudpass"),
        format!("-ffile-prefix-map={source_root}=/pause"),
    ];
    fs::create_dir_all(work)?;
    let binary = work.join("pause");
    let stamp = work.join("pause.inputs");
    let inputs = sha256_digest(format!("{args:?}\n{}", sha256_digest(&fs::read(&source)?)).as_bytes());
    if !(binary.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(inputs.as_str())) {
        eprintln!("images: compiling {} (gcc -static)", source.display());
        let out = Command::new("gcc")
            .args(&args)
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .output()
            .context("running gcc (Debian's build-essential) for the pause image")?;
        if !out.status.success() {
            bail!("gcc pause.c: {}", String::from_utf8_lossy(&out.stderr));
        }
        fs::write(&stamp, &inputs)?;
    }

    let mut tree = Tree::new();
    tree.insert("/pause", Node::File(Content::Path(binary)), EXEC_MODE)?;
    let layer = store.layer(&tree, epoch.max(0) as u64)?;
    // What Kubernetes' build/pause/Dockerfile says.
    Ok(ImageSpec {
        name: PAUSE_IMAGE.to_owned(),
        tag_from_content: false,
        layers: vec![layer],
        config: RunConfig {
            user: Some("65535:65535".into()),
            env: vec![DEFAULT_PATH.to_owned()],
            entrypoint: Some(vec!["/pause".into()]),
            ..Default::default()
        },
        history: vec![
            History {
                created_by: format!("ADD pause.c from k8s.io/kubernetes@v{version}, gcc {}", args.join(" ")),
                empty_layer: false,
            },
            History { created_by: "USER 65535:65535".into(), empty_layer: true },
            History { created_by: r#"ENTRYPOINT ["/pause"]"#.into(), empty_layer: true },
        ],
        created: epoch,
    })
}
