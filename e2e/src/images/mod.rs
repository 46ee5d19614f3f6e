//! Container images built on this machine without a container engine and without
//! pulling any base image, for a node whose containerd imports them
//! (`ctr images import`) and whose kubelet runs them.
//!
//! - The cloudpass images (`operator`, `webhook`, `agent`) come from the Dockerfile:
//!   its build stage runs `images/build-binaries.sh`, run here too, and its final
//!   `FROM scratch` stages are interpreted instruction by instruction.
//! - The pod sandbox image ([`PAUSE_IMAGE`]) is Kubernetes' `pause.c`, compiled static.
//! - The test apps image ([`APPS_IMAGE_REPOSITORY`]) is Debian bookworm's Python
//!   (mmdebstrap) with the official cloud SDKs (pip) and the scenarios' programs.
//!
//! Every image is written as an OCI image layout archive under `target/images/`, with
//! reproducible layers ([`layer`]) and configuration ([`oci`]): the same inputs give the
//! same manifest digest. `docs/images.md` says what is in each image and why.

pub mod dockerfile;
pub mod layer;
pub mod oci;

mod apps;
mod pause;
mod targets;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
pub use apps::{APPS_DIR, APPS_IMAGE_REPOSITORY, PYTHON_VERSION, REQUIREMENTS, SITE_PACKAGES};
pub use oci::BuiltImage;
pub use pause::{PAUSE_IMAGE, pinned_version};
pub use targets::{BUILD_SCRIPT, built_binary};

use crate::repo_root;

/// The images that are not Dockerfile targets, by short name.
pub const EXTRA_IMAGES: &[&str] = &["pause", "apps"];

/// What [`build_all`] builds, and with which inputs.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Short names of the images to build: Dockerfile targets (`operator`, `webhook`,
    /// `agent`), `pause`, `apps`. Empty builds them all.
    pub only: Vec<String>,
    /// Seconds since the epoch for every timestamp in the images. Default:
    /// `$SOURCE_DATE_EPOCH`, else the commit time of `HEAD`.
    pub source_date_epoch: Option<i64>,
    /// The `REVISION` build argument (the `org.opencontainers.image.revision` label).
    /// Default: `git rev-parse HEAD`.
    pub revision: Option<String>,
    /// Where the archives go. Default: `<repo>/target/images`.
    pub out_dir: Option<PathBuf>,
    /// Where the expensive layers (Debian root filesystem, SDKs) are cached. Default:
    /// `${XDG_CACHE_HOME:-~/.cache}/cloudpass/images`.
    pub cache_dir: Option<PathBuf>,
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/cloudpass/images`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
    base.join("cloudpass/images")
}

fn git(repo: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git").arg("-C").arg(repo).args(args).output().context("running git")?;
    if !out.status.success() {
        bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `$SOURCE_DATE_EPOCH` if set, else the commit time of `HEAD` in `repo`.
pub fn source_date_epoch(repo: &Path) -> Result<i64> {
    if let Some(value) = std::env::var_os("SOURCE_DATE_EPOCH").filter(|v| !v.is_empty()) {
        return value.to_str().and_then(|v| v.parse().ok()).context("SOURCE_DATE_EPOCH is not a number of seconds");
    }
    git(repo, &["log", "-1", "--format=%ct", "HEAD"])?.parse().context("git log %ct")
}

/// The commit checked out in `repo` (`git rev-parse HEAD`).
pub fn git_revision(repo: &Path) -> Result<String> {
    git(repo, &["rev-parse", "HEAD"])
}

/// The chart's `appVersion` (the tag of the cloudpass images) and its default image
/// repositories by component (`operator` -> `ghcr.io/cloudpass-dev/cloudpass-operator`).
pub fn chart_images(repo: &Path) -> Result<(String, BTreeMap<String, String>)> {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(repo.join("charts/cloudpass/Chart.yaml"))?)?;
    let app_version = chart["appVersion"].as_str().context("Chart.yaml: appVersion")?.to_owned();
    let values: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(repo.join("charts/cloudpass/values.yaml"))?)?;
    let repositories = values
        .as_mapping()
        .context("values.yaml: a mapping")?
        .iter()
        .filter_map(|(component, v)| {
            Some((component.as_str()?.to_owned(), v["image"]["repository"].as_str()?.to_owned()))
        })
        .collect();
    Ok((app_version, repositories))
}

/// File name of an image's archive: the last part of its repository (`cloudpass-agent.tar`).
fn archive_name(reference: &str) -> String {
    let repository = reference.rsplit_once(':').map_or(reference, |(r, _)| r);
    format!("{}.tar", repository.rsplit('/').next().unwrap_or(repository))
}

/// Builds the images (all, or those `options.only` names) into OCI archives and
/// returns them in build order: Dockerfile targets, `pause`, `apps`. Incremental: cargo
/// rebuilds nothing when no source changed, an unchanged layer is not compressed again,
/// the Debian root filesystem and the SDKs come from the cache, and an archive whose
/// manifest did not change is not rewritten. Concurrent builds into the same folder
/// wait for each other.
pub fn build_all(options: &BuildOptions) -> Result<Vec<BuiltImage>> {
    let started = Instant::now();
    let repo = repo_root();
    let out = options.out_dir.clone().unwrap_or_else(|| repo.join("target/images"));
    let cache_dir = options.cache_dir.clone().unwrap_or_else(default_cache_dir);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let lock = fs::File::create(out.join(".lock"))?;
    lock.lock().context("locking the images folder")?;

    let epoch = match options.source_date_epoch {
        Some(epoch) => epoch,
        None => source_date_epoch(&repo)?,
    };
    let revision = match &options.revision {
        Some(revision) => revision.clone(),
        None => git_revision(&repo)?,
    };
    // What a Docker user passes with --build-arg (see the Dockerfile's header).
    let build_args = BTreeMap::from([
        ("REVISION".to_owned(), revision),
        ("SOURCE_DATE_EPOCH".to_owned(), epoch.to_string()),
        ("CREATED".to_owned(), oci::rfc3339(epoch)?),
    ]);
    let dockerfile = targets::DockerfileImages::load(&repo, build_args)?;
    let all_targets = dockerfile.targets();
    for name in &options.only {
        if !all_targets.contains(name) && !EXTRA_IMAGES.contains(&name.as_str()) {
            bail!("no image {name}: the images are {} and {}", all_targets.join(", "), EXTRA_IMAGES.join(", "));
        }
    }
    let wanted = |name: &str| options.only.is_empty() || options.only.iter().any(|o| o == name);
    let targets: Vec<String> = all_targets.into_iter().filter(|t| wanted(t)).collect();

    let store = layer::Store::new(out.join("store"));
    let binaries = out.join("binaries");
    dockerfile.run_build_stages(&targets, &binaries)?;
    let (app_version, repositories) = chart_images(&repo)?;
    let mut built = Vec::new();
    for target in &targets {
        let repository = repositories.get(target).with_context(|| {
            format!("values.yaml has no {target}.image.repository for the Dockerfile target {target}")
        })?;
        let name = format!("{repository}:{app_version}");
        let spec = dockerfile.image(target, &name, &binaries, &store, epoch)?;
        built.push(oci::write_image(&spec, &store, &out.join(archive_name(&name)))?);
    }
    if wanted("pause") {
        let spec = pause::image(&repo, &out.join("pause"), &store, epoch)?;
        built.push(oci::write_image(&spec, &store, &out.join(archive_name(PAUSE_IMAGE)))?);
    }
    if wanted("apps") {
        let spec = apps::image(&repo, &store, &cache_dir, epoch)?;
        built.push(oci::write_image(&spec, &store, &out.join(archive_name(APPS_IMAGE_REPOSITORY)))?);
    }
    eprintln!("images: {} images in {} ({:.1}s)", built.len(), out.display(), started.elapsed().as_secs_f64());
    Ok(built)
}

/// Imports `images` into the containerd at `containerd_address` (its socket), in the
/// `k8s.io` namespace where the kubelet's CRI finds them, with containerd's own client:
/// `ctr --address <socket> --namespace k8s.io images import --platform linux/amd64
/// <archive>`. containerd names each image from the archive's `io.containerd.image.name`
/// annotation and unpacks it into its default snapshotter; the names are then checked
/// with `ctr images ls`.
pub fn import(ctr: &Path, containerd_address: &Path, images: &[BuiltImage]) -> Result<()> {
    let ctr_command = |args: &[&str]| {
        let mut command = Command::new(ctr);
        command.arg("--address").arg(containerd_address).args(["--namespace", "k8s.io"]).args(args);
        command
    };
    for image in images {
        let out = ctr_command(&["images", "import", "--platform", "linux/amd64"])
            .arg(&image.archive)
            .output()
            .with_context(|| format!("running {}", ctr.display()))?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}{}",
                image.archive.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = ctr_command(&["images", "ls", "--quiet"]).output()?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> =
        images.iter().map(|i| i.name.as_str()).filter(|name| !listed.lines().any(|l| l.trim() == *name)).collect();
    if !missing.is_empty() {
        bail!("after import, containerd does not list {}: {listed}", missing.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names() {
        assert_eq!(archive_name("ghcr.io/cloudpass-dev/cloudpass-agent:0.1.0"), "cloudpass-agent.tar");
        assert_eq!(archive_name(PAUSE_IMAGE), "pause.tar");
        assert_eq!(archive_name(APPS_IMAGE_REPOSITORY), "apps.tar");
    }

    #[test]
    fn pause_image_follows_the_pinned_kubernetes_version() {
        let version = pinned_version(&repo_root(), "KUBERNETES_VERSION").unwrap();
        assert_eq!(PAUSE_IMAGE.rsplit_once(':').unwrap().1, version, "update PAUSE_IMAGE with versions.env");
    }
}
