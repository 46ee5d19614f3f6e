//! The Python virtualenv of the test bed: moto and the official cloud SDKs (boto3,
//! azure-identity, google-auth, ...), pinned in `e2e/tools/requirements.txt` and created by
//! `e2e/tools/python.sh` (`make tools`) in a cache outside the repository.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::repo_root;

/// Directory of the venv: `$CLOUDPASS_PYTHON_VENV` (set by `make test`), else the cache
/// that `e2e/tools/python.sh` fills. Fails with the command to run if it is missing.
pub fn venv() -> Result<PathBuf> {
    let dir = match std::env::var_os("CLOUDPASS_PYTHON_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = std::process::Command::new(repo_root().join("e2e/tools/python.sh"))
                .arg("--print")
                .output()
                .context("running e2e/tools/python.sh --print")?;
            PathBuf::from(String::from_utf8(out.stdout)?.trim())
        }
    };
    if !dir.join("bin/python").is_file() {
        bail!(
            "{} is missing: run `make tools` (creates the Python venv with moto and the SDKs)",
            dir.join("bin/python").display()
        );
    }
    Ok(dir)
}

/// The venv's Python interpreter.
pub fn interpreter() -> Result<PathBuf> {
    Ok(venv()?.join("bin/python"))
}
