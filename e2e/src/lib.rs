//! The cloudpass test bed: a real kube-apiserver and etcd on loopback (built by
//! `make tools`), helpers to drive them, and HTTPS test servers. Nothing here imitates
//! the Kubernetes API; the end-to-end tests in `e2e/tests/` talk to the real thing.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bench;
pub mod broker;
pub mod certs;
pub mod chart;
pub mod cluster;
pub mod control_plane;
pub mod fakes;
pub mod images;
pub mod moto;
pub mod net;
pub mod process;
pub mod python;
pub mod scenario;
pub mod tls;

use std::{path::PathBuf, sync::OnceLock};

use anyhow::{Context, Result, bail};
pub use control_plane::{ControlPlane, TokenOptions, WebhookRegistration};

/// What a test binary starts once and shares between its tests (a control plane, a
/// cluster, an emulator): the first caller starts it with `start`, on a thread with its
/// own tokio runtime (this works from sync and async tests alike, and nothing bound to
/// one test's runtime outlives it); every caller gets it, or a panic naming `what` and
/// why it did not start.
pub fn start_once<T, F, Fut>(cell: &'static OnceLock<Result<T, String>>, what: &str, start: F) -> &'static T
where
    T: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let result = cell.get_or_init(|| {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            runtime.block_on(start()).map_err(|e| format!("{e:#}"))
        })
        .join()
        .unwrap_or_else(|_| Err("its start panicked".to_owned()))
    });
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what} did not start: {e}"),
    }
}

/// A cloudpass object (`TrustProvider`, `CredentialProvider`, `AccessPolicy`) named
/// `name` with `spec`, as JSON for `kubectl apply`.
pub fn cloudpass_object(kind: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"apiVersion": "cloudpass.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repository root")
}

/// Directory of the Go-built tools: `$CLOUDPASS_TOOLS_BIN` (set by `make test`), else the
/// cache that `e2e/tools/build.sh` fills. Fails with the command to run if they are missing.
pub fn tools_bin() -> Result<PathBuf> {
    let dir = match std::env::var_os("CLOUDPASS_TOOLS_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = std::process::Command::new(repo_root().join("e2e/tools/build.sh"))
                .arg("--print")
                .output()
                .context("running e2e/tools/build.sh --print")?;
            PathBuf::from(String::from_utf8(out.stdout)?.trim())
        }
    };
    for tool in ["kube-apiserver", "etcd", "kubectl", "helm"] {
        if !dir.join(tool).is_file() {
            bail!("{} is missing: run `make tools` (builds the Kubernetes test tools)", dir.join(tool).display());
        }
    }
    Ok(dir)
}

/// Path of a binary of this workspace (`cloudpass-operator`, `cloudpass-webhook`,
/// `cloudpass-agent`, `kubectl-cloudpass`) for tests and benchmarks of other packages, which cargo does not
/// hand the paths of other packages' binaries. `$CLOUDPASS_BIN_DIR` (set by `make test`,
/// after the workspace build that made them) wins; otherwise cargo builds the binary (or
/// finds it up to date) in the caller's own target directory and profile.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CLOUDPASS_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        if !path.is_file() {
            bail!("{} is missing: build it with `cargo build -p {name}`", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    // target/<profile dir>/deps/<test>-<hash>
    let profile_dir = exe.parent().and_then(std::path::Path::parent).context("target/<profile>/deps")?.to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(other) => other.to_owned(),
        None => bail!("no profile directory above {}", exe.display()),
    };
    let target_dir = profile_dir.parent().context("target directory")?;
    // Every binary is its package's name but the kubectl plugin's, which kubectl finds by
    // its name.
    let package = if name == "kubectl-cloudpass" { "cloudpass-kubectl" } else { name };
    let out = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(repo_root())
        .args(["build", "--quiet", "--locked", "-p", package, "--bin", name, "--profile", &profile])
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("building {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(profile_dir.join(name))
}
