//! The cloudpass test bed: a real kube-apiserver and etcd on loopback (built by
//! `make tools`), helpers to drive them, and HTTPS test servers. Nothing here imitates
//! the Kubernetes API; the end-to-end tests in `e2e/tests/` talk to the real thing.
#![forbid(unsafe_code)]

pub mod broker;
pub mod certs;
pub mod chart;
pub mod control_plane;
pub mod fakes;
pub mod moto;
pub mod process;
pub mod python;
pub mod scenario;
pub mod tls;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
pub use control_plane::{ControlPlane, TokenOptions, WebhookRegistration};

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
