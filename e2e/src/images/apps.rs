//! The test apps image: the unchanged SDK programs of the scenarios
//! (`e2e/src/scenario/apps/*.py`) on Debian bookworm's Python with the official cloud
//! SDKs. Three layers, from the most expensive and stable to the cheapest: the Debian
//! root filesystem (mmdebstrap), the SDKs (the host's pip, for the image's Python), the
//! programs. The first two are cached under a hash of their inputs.

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use sha2::Digest as _;

use super::{
    layer::{Content, Entry, FILE_MODE, Layer, Node, Store, Tree, hex, relative, sha256_digest},
    oci::{DEFAULT_PATH, History, ImageSpec, RunConfig},
};

/// Repository of the test apps image; its tag is derived from the image's content.
pub const APPS_IMAGE_REPOSITORY: &str = "localhost/cloudpass-e2e/apps";

/// The Debian release of the root filesystem.
pub const SUITE: &str = "bookworm";
/// Its Python (`python3` in bookworm), for which the SDKs are installed.
pub const PYTHON_VERSION: &str = "3.11";
/// Where the SDKs go: on the Debian Python's default `sys.path`, no `PYTHONPATH` needed.
pub const SITE_PACKAGES: &str = "/usr/local/lib/python3.11/dist-packages";
/// The pinned SDKs and their dependencies.
pub const REQUIREMENTS: &str = "e2e/images/apps-requirements.txt";
/// Where the programs are in the image.
pub const APPS_DIR: &str = "/apps";

/// mmdebstrap's arguments besides the suite, the output and the mirrors: only
/// `Essential: yes` packages plus Python and the CA certificates; merged /usr set up by
/// mmdebstrap's hook rather than the usrmerge package (which would pull in Perl);
/// documentation, manual pages and translations left out, copyright files kept.
const MMDEBSTRAP_ARGS: &[&str] = &[
    "--variant=essential",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--include=python3,ca-certificates",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
];

/// pip's arguments besides `--target` and `-r`: wheels only, for CPython 3.11 on
/// glibc x86_64 (bookworm's glibc 2.36 runs manylinux2014 wheels), without byte code
/// (compiled separately, see [`sdk_layer`]).
const PIP_ARGS: &[&str] = &[
    "--quiet",
    "--disable-pip-version-check",
    "--no-input",
    "--platform",
    "manylinux2014_x86_64",
    "--python-version",
    PYTHON_VERSION,
    "--implementation",
    "cp",
    "--only-binary=:all:",
    "--no-compile",
];

/// Bumped when the way a cached layer is made changes, to make it again.
const RECIPE: &str = "cloudpass-images apps v1";

/// 16 hex of the SHA-256 of `parts`, for cache keys.
fn key(parts: &[&str]) -> String {
    sha256_digest(parts.join("\n").as_bytes())["sha256:".len().."sha256:".len() + 16].to_owned()
}

/// A cached layer under `name`, or `make` it (holding a lock, so that two builds do not
/// make it twice) and cache it.
fn cached(cache: &Store, cache_dir: &Path, name: &str, make: impl FnOnce() -> Result<Layer>) -> Result<Layer> {
    if let Some(layer) = cache.keyed(name)? {
        eprintln!("images: {name} from the cache ({})", cache_dir.display());
        return Ok(layer);
    }
    fs::create_dir_all(cache_dir)?;
    let lock = fs::File::create(cache_dir.join(format!("{name}.lock")))?;
    lock.lock().context("locking the image cache")?;
    if let Some(layer) = cache.keyed(name)? {
        return Ok(layer);
    }
    let started = std::time::Instant::now();
    let layer = make()?;
    cache.set_key(name, &layer)?;
    eprintln!("images: {name} made in {:.0}s and cached", started.elapsed().as_secs_f64());
    Ok(layer)
}

/// The host's apt source files for Debian `SUITE` (every repository they name is a
/// Debian one): mmdebstrap then fetches from the same mirrors as this machine's apt, or
/// from deb.debian.org if there is none. Third-party repositories are never used.
fn host_sources() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
        .into_iter()
        .filter(|f| {
            let Ok(text) = fs::read_to_string(f) else { return false };
            let words: Vec<&str> =
                text.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(|l| l.split_whitespace()).collect();
            let uris: Vec<&&str> = words.iter().filter(|w| w.contains("://")).collect();
            words.contains(&SUITE) && !uris.is_empty() && uris.iter().all(|u| u.contains("debian"))
        })
        .collect()
}

/// The Debian root filesystem layer.
fn rootfs_layer(cache: &Store, cache_dir: &Path, epoch: i64) -> Result<Layer> {
    let mut inputs = vec![RECIPE, SUITE];
    inputs.extend(MMDEBSTRAP_ARGS);
    let name = format!("rootfs-{}", key(&inputs));
    cached(cache, cache_dir, &name, || {
        let work = tempfile::tempdir_in(cache_dir)?;
        let tarball = work.path().join("rootfs.tar");
        eprintln!("images: mmdebstrap {SUITE} with python3 (a few minutes, once)");
        let out = Command::new("mmdebstrap")
            .args(MMDEBSTRAP_ARGS)
            .arg("--quiet")
            .arg(SUITE)
            .arg(&tarball)
            .args(host_sources())
            // Without SOURCE_DATE_EPOCH mmdebstrap keeps the packages' file times instead
            // of clamping them, which would invalidate Debian's byte code.
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .context("running mmdebstrap (Debian's mmdebstrap package; e2e/tools/node-packages.sh installs it)")?;
        if !out.status.success() {
            bail!("mmdebstrap failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let tree = tree_from_rootfs(fs::File::open(&tarball)?)?;
        cache.layer(&tree, epoch.max(0) as u64)
    })
}

/// The files of mmdebstrap's tarball as a layer tree: owners, modes and modification
/// times kept (they are Debian's, and Python's byte code is validated against the
/// times); device nodes left out (the runtime provides `/dev`), as are the files
/// mmdebstrap copied from this machine (`/etc/hostname`, `/etc/resolv.conf`, the apt
/// sources: the runtime provides the first two, the image has no apt); hard links point
/// at the first path of their group in path order, as a sorted tar needs.
pub fn tree_from_rootfs(tarball: impl Read) -> Result<Tree> {
    let mut archive = tar::Archive::new(tarball);
    let mut tree = Tree::new();
    let mut hardlinks: BTreeMap<String, String> = BTreeMap::new();
    let mut files: BTreeMap<String, (Vec<u8>, Entry)> = BTreeMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_str().context("a non-UTF-8 path in the rootfs")?.to_owned();
        let path = relative(&path)?;
        let header = entry.header();
        let meta = Entry {
            node: Node::Dir,
            mode: header.mode()?,
            uid: header.uid()?,
            gid: header.gid()?,
            mtime: Some(header.mtime()?),
        };
        let from_host = matches!(path.as_str(), "etc/hostname" | "etc/resolv.conf" | "etc/apt/sources.list")
            || path.starts_with("etc/apt/sources.list.d/");
        if path.is_empty() || path.starts_with("dev/") || from_host {
            continue;
        }
        match header.entry_type() {
            tar::EntryType::Directory => tree.insert_entry(&path, meta)?,
            tar::EntryType::Regular => {
                let mut bytes = Vec::with_capacity(header.size()? as usize);
                entry.read_to_end(&mut bytes)?;
                files.insert(path, (bytes, meta));
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name()?.context("a symlink without target")?;
                let target = target.to_str().context("a non-UTF-8 link target")?.to_owned();
                tree.insert_entry(&path, Entry { node: Node::Symlink(target), mode: 0o777, ..meta })?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name()?.context("a hard link without target")?;
                hardlinks.insert(path, relative(target.to_str().context("a non-UTF-8 link target")?)?);
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {}
            other => bail!("{path}: unexpected entry type {other:?} in the rootfs"),
        }
    }
    // Each hard-link group becomes: its first path (in tar order) the file, the others links.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (link, target) in hardlinks {
        groups.entry(target).or_default().push(link);
    }
    for (target, mut all) in groups {
        let (bytes, meta) = files.remove(&target).with_context(|| format!("hard link to missing {target}"))?;
        all.push(target);
        all.sort();
        let first = all[0].clone();
        for other in &all[1..] {
            tree.insert_entry(other, Entry { node: Node::Hardlink(first.clone()), ..meta.clone() })?;
        }
        tree.insert_entry(&first, Entry { node: Node::File(Content::Bytes(bytes)), ..meta })?;
    }
    for (path, (bytes, meta)) in files {
        tree.insert_entry(&path, Entry { node: Node::File(Content::Bytes(bytes)), ..meta })?;
    }
    Ok(tree)
}

/// The host's `python3` as `major.minor`.
fn host_python() -> Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .context("running python3 (the host's pip installs the SDKs)")?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The SDK layer: pip installs the pinned wheels for the image's Python into a
/// temporary folder that becomes `SITE_PACKAGES`. When the host's Python has the image's
/// version, the byte code is compiled too, with hash-based validation (its timestamps
/// would not match the layer's) and the image's paths in it.
fn sdk_layer(repo: &Path, cache: &Store, cache_dir: &Path, epoch: i64) -> Result<Layer> {
    let requirements = fs::read_to_string(repo.join(REQUIREMENTS))?;
    let host = host_python()?;
    let compile = host == PYTHON_VERSION;
    let mut inputs = vec![RECIPE, requirements.as_str(), SITE_PACKAGES, if compile { "compiled" } else { "source" }];
    inputs.extend(PIP_ARGS);
    let name = format!("sdk-{}", key(&inputs));
    cached(cache, cache_dir, &name, || {
        let work = tempfile::tempdir_in(cache_dir)?;
        let site = work.path().join("site");
        eprintln!("images: pip install of the cloud SDKs for Python {PYTHON_VERSION} (about a minute, once)");
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--target"])
            .arg(&site)
            .args(PIP_ARGS)
            .arg("-r")
            .arg(repo.join(REQUIREMENTS))
            .output()
            .context("running python3 -m pip")?;
        if !out.status.success() {
            bail!("pip install for the apps image failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Console scripts point at this machine's interpreter: useless in the image.
        let scripts = site.join("bin");
        if scripts.exists() {
            fs::remove_dir_all(&scripts)?;
        }
        if compile {
            let out = Command::new("python3")
                .args(["-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash", "-s"])
                .arg(&site)
                .args(["-p", SITE_PACKAGES])
                .arg(&site)
                .output()
                .context("running python3 -m compileall")?;
            if !out.status.success() {
                bail!("compileall: {}", String::from_utf8_lossy(&out.stdout));
            }
        } else {
            eprintln!("images: the host's Python is {host}, not {PYTHON_VERSION}: the SDKs go in without byte code");
        }
        let mut tree = Tree::new();
        tree.copy_from_host(&site, SITE_PACKAGES, None, None)?;
        cache.layer(&tree, epoch.max(0) as u64)
    })
}

/// The programs layer: every `e2e/src/scenario/apps/*.py` in `APPS_DIR`.
fn programs_tree(repo: &Path) -> Result<Tree> {
    let dir = repo.join("e2e/src/scenario/apps");
    let mut tree = Tree::new();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".py"))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no programs in {}", dir.display());
    }
    for name in names {
        tree.insert(&format!("{APPS_DIR}/{name}"), Node::File(Content::Path(dir.join(&name))), FILE_MODE)?;
    }
    Ok(tree)
}

/// The apps image spec (its name is completed from its manifest digest when written).
pub fn image(repo: &Path, store: &Store, cache_dir: &Path, epoch: i64) -> Result<ImageSpec> {
    let cache = Store::new(cache_dir);
    let rootfs = rootfs_layer(&cache, cache_dir, epoch)?;
    let sdks = sdk_layer(repo, &cache, cache_dir, epoch)?;
    let programs = store.layer(&programs_tree(repo)?, epoch.max(0) as u64)?;
    let requirements_hash = hex(&sha2::Sha256::digest(fs::read(repo.join(REQUIREMENTS))?)[..8]);
    Ok(ImageSpec {
        name: APPS_IMAGE_REPOSITORY.to_owned(),
        tag_from_content: true,
        layers: vec![rootfs, sdks, programs],
        config: RunConfig {
            user: None,
            env: vec![DEFAULT_PATH.to_owned(), "PYTHONDONTWRITEBYTECODE=1".into(), "PYTHONUNBUFFERED=1".into()],
            entrypoint: None,
            cmd: Some(vec!["python3".into()]),
            working_dir: Some(APPS_DIR.into()),
            labels: BTreeMap::from([
                ("org.opencontainers.image.title".into(), "cloudpass-e2e-apps".into()),
                (
                    "org.opencontainers.image.description".into(),
                    "cloudpass test bed: unchanged SDK programs on Debian's Python with the official cloud SDKs".into(),
                ),
            ]),
        },
        history: vec![
            History { created_by: format!("mmdebstrap {SUITE} {}", MMDEBSTRAP_ARGS.join(" ")), empty_layer: false },
            History {
                created_by: format!(
                    "pip install --target {SITE_PACKAGES} -r {REQUIREMENTS} (sha256 {requirements_hash}...)"
                ),
                empty_layer: false,
            },
            History { created_by: format!("COPY e2e/src/scenario/apps/*.py {APPS_DIR}/"), empty_layer: false },
        ],
        created: epoch,
    })
}
