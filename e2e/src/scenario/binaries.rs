//! The cloudpass binaries under test, found in the cargo target directory next to the
//! running executable (`make test` and `make demo` build them first).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Paths of the three cloudpass binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `cloudpass-operator` (controller, broker, issuer).
    pub operator: PathBuf,
    /// `cloudpass-webhook`.
    pub webhook: PathBuf,
    /// `cloudpass-agent`.
    pub agent: PathBuf,
}

impl Binaries {
    /// Finds the binaries: in `$CLOUDPASS_BIN_DIR` if set, else in the directory of the
    /// running executable or its parent (a test runs from `target/<profile>/deps`, the
    /// demo from `target/<profile>`). Fails with the build command when one is missing.
    pub fn locate() -> Result<Self> {
        let dirs: Vec<PathBuf> = match std::env::var_os("CLOUDPASS_BIN_DIR") {
            Some(dir) => vec![PathBuf::from(dir)],
            None => {
                let exe = std::env::current_exe()?;
                exe.ancestors().skip(1).take(2).map(Path::to_path_buf).collect()
            }
        };
        let find = |name: &str| -> Result<PathBuf> {
            match dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
                Some(path) => Ok(path),
                None => bail!(
                    "{name} not found in {}: build it first with \
                     `cargo build -p cloudpass-operator -p cloudpass-webhook -p cloudpass-agent` \
                     (same profile as this program), or set CLOUDPASS_BIN_DIR",
                    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ")
                ),
            }
        };
        Ok(Self {
            operator: find("cloudpass-operator")?,
            webhook: find("cloudpass-webhook")?,
            agent: find("cloudpass-agent")?,
        })
    }
}
