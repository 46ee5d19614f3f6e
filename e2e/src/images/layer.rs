//! Image layers made reproducible: a [`Tree`] of files written as a tar in path order,
//! every header normalized (one mtime, numeric owners, fixed modes, no user names),
//! compressed with gzip without a timestamp; and the content-addressed [`Store`] that
//! keeps the compressed blobs so that an unchanged layer is not compressed again.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Mode of a regular file that is not executable.
pub const FILE_MODE: u32 = 0o644;
/// Mode of an executable file and of a directory.
pub const EXEC_MODE: u32 = 0o755;

/// Where the bytes of a regular file come from.
#[derive(Clone, Debug)]
pub enum Content {
    /// Read from this path when the layer is written.
    Path(PathBuf),
    /// These bytes.
    Bytes(Vec<u8>),
}

/// What a path in a layer is.
#[derive(Clone, Debug)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file.
    File(Content),
    /// A symbolic link to this target.
    Symlink(String),
    /// A hard link to this earlier path of the same layer.
    Hardlink(String),
}

/// One path of a layer: what it is, its permission bits and its numeric owner.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The node.
    pub node: Node,
    /// Permission bits (setuid/setgid/sticky included).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Its own modification time; `None` takes the layer's. Only a root filesystem made
    /// by a package manager keeps the packages' times (byte code is checked against them).
    pub mtime: Option<u64>,
}

/// The files of one layer, by relative path (`usr/local/bin/x`), all with one mtime.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

/// `/usr/local/bin/` -> `usr/local/bin`; refuses `..`.
pub fn relative(path: &str) -> Result<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        bail!("{path}: `..` is not allowed in an image path");
    }
    Ok(parts.join("/"))
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `path` owned by root.
    pub fn insert(&mut self, path: &str, node: Node, mode: u32) -> Result<()> {
        self.insert_owned(path, node, mode, 0, 0)
    }

    /// Adds (or replaces) `path` with an owner.
    pub fn insert_owned(&mut self, path: &str, node: Node, mode: u32, uid: u64, gid: u64) -> Result<()> {
        self.insert_entry(path, Entry { node, mode, uid, gid, mtime: None })
    }

    /// Adds (or replaces) `path` as `entry` says.
    pub fn insert_entry(&mut self, path: &str, mut entry: Entry) -> Result<()> {
        let path = relative(path)?;
        if path.is_empty() {
            bail!("a layer entry needs a path below /");
        }
        entry.mode &= 0o7777;
        self.entries.insert(path, entry);
        Ok(())
    }

    /// The paths listed in the tree (implicit parents not included), in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Copies the host file or directory `source` to `dest`: regular files get mode 0755
    /// if any execute bit is set on the host and 0644 otherwise (as git checks them out),
    /// directories 0755, symbolic links inside a directory stay links. `chmod` overrides
    /// the mode of files, `chown` the owner of everything copied.
    pub fn copy_from_host(
        &mut self,
        source: &Path,
        dest: &str,
        chmod: Option<u32>,
        chown: Option<(u64, u64)>,
    ) -> Result<()> {
        let (uid, gid) = chown.unwrap_or((0, 0));
        // The source itself is followed if it is a link, as Docker does.
        let metadata = fs::metadata(source).with_context(|| format!("COPY source {}", source.display()))?;
        if metadata.is_dir() {
            if !relative(dest)?.is_empty() {
                self.insert_owned(dest, Node::Dir, chmod.unwrap_or(EXEC_MODE), uid, gid)?;
            }
            let mut children: Vec<_> =
                fs::read_dir(source)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
            children.sort();
            for child in children {
                let name = child.to_str().with_context(|| format!("{}: a non-UTF-8 name", source.display()))?;
                let child_source = source.join(name);
                let child_dest = format!("{}/{name}", dest.trim_end_matches('/'));
                let link = fs::symlink_metadata(&child_source)?;
                if link.file_type().is_symlink() {
                    let target = fs::read_link(&child_source)?;
                    let target = target.to_str().context("a non-UTF-8 link target")?.to_owned();
                    self.insert_owned(&child_dest, Node::Symlink(target), 0o777, uid, gid)?;
                } else {
                    self.copy_from_host(&child_source, &child_dest, chmod, chown)?;
                }
            }
        } else if metadata.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let mode = chmod.unwrap_or(if metadata.permissions().mode() & 0o111 != 0 { EXEC_MODE } else { FILE_MODE });
            self.insert_owned(dest, Node::File(Content::Path(source.to_owned())), mode, uid, gid)?;
        } else {
            bail!("{}: only files and directories can be copied into an image", source.display());
        }
        Ok(())
    }

    /// Writes the tree as an uncompressed tar: paths in byte order, every parent directory
    /// before its children (created 0755 root:root if the tree does not list it), every
    /// header with mtime `mtime` (unless the entry has its own), numeric owners only, no
    /// user or group names, GNU long names where needed.
    pub fn write_tar<W: Write>(&self, out: W, mtime: u64) -> Result<W> {
        // Parents the tree does not list are added, so that every path follows its
        // parent; path order puts a prefix before its extensions.
        let implicit = Entry { node: Node::Dir, mode: EXEC_MODE, uid: 0, gid: 0, mtime: None };
        let mut all: BTreeMap<&str, &Entry> = BTreeMap::new();
        for (path, entry) in &self.entries {
            let mut end = 0;
            while let Some(slash) = path[end..].find('/') {
                end += slash;
                all.entry(&path[..end]).or_insert(&implicit);
                end += 1;
            }
            all.insert(path, entry);
        }
        let mut builder = tar::Builder::new(out);
        for (path, entry) in all {
            append(&mut builder, path, entry, mtime)?;
        }
        builder.into_inner().context("finishing the layer tar")
    }
}

fn append<W: Write>(builder: &mut tar::Builder<W>, path: &str, entry: &Entry, mtime: u64) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(entry.mode);
    header.set_uid(entry.uid);
    header.set_gid(entry.gid);
    header.set_mtime(entry.mtime.unwrap_or(mtime));
    let context = || format!("adding {path} to a layer");
    match &entry.node {
        Node::Dir => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, format!("{path}/"), io::empty()).with_context(context)
        }
        Node::File(content) => {
            header.set_entry_type(tar::EntryType::Regular);
            match content {
                Content::Bytes(bytes) => {
                    header.set_size(bytes.len() as u64);
                    builder.append_data(&mut header, path, bytes.as_slice()).with_context(context)
                }
                Content::Path(source) => {
                    let file = fs::File::open(source).with_context(|| format!("reading {}", source.display()))?;
                    let size = file.metadata()?.len();
                    header.set_size(size);
                    // A file that grows while it is read must not corrupt the archive.
                    builder.append_data(&mut header, path, file.take(size)).with_context(context)
                }
            }
        }
        Node::Symlink(target) => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, path, target).with_context(context)
        }
        Node::Hardlink(target) => {
            header.set_entry_type(tar::EntryType::Link);
            header.set_size(0);
            builder.append_link(&mut header, path, target).with_context(context)
        }
    }
}

/// A writer that hashes (SHA-256) and counts what goes through it.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W> Hashing<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// The inner writer, `sha256:<hex>` of what was written, and its length.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, format!("sha256:{}", hex(&self.hasher.finalize())), self.bytes)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// A compressed layer in a [`Store`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:` of the gzip blob: the manifest's layer digest.
    pub digest: String,
    /// Size of the gzip blob in bytes.
    pub size: u64,
    /// `sha256:` of the uncompressed tar: the config's `diff_id`.
    pub diff_id: String,
    /// Size of the uncompressed tar in bytes.
    pub uncompressed_size: u64,
    /// Where the blob is.
    #[serde(skip)]
    pub blob: PathBuf,
}

/// A content-addressed folder of blobs (`blobs/sha256/<hex>`) with an index from the
/// uncompressed digest of a layer to its compressed blob (`layers/<hex>.json`), and named
/// entries for layers that are expensive to make (`keys/<name>.json`).
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Path of the blob `sha256:<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    /// Writes `bytes` as a blob (if not there yet) and returns its digest.
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest);
        if !path.is_file() {
            write_atomically(&path, bytes)?;
        }
        Ok(digest)
    }

    /// The layer of `tree`: the tar is hashed first, and compressed only if the store does
    /// not hold that content already (so an unchanged layer costs one read of its files).
    pub fn layer(&self, tree: &Tree, mtime: u64) -> Result<Layer> {
        let (_, diff_id, _) = tree.write_tar(Hashing::new(io::sink()), mtime)?.finish();
        if let Some(layer) = self.indexed(&diff_id)? {
            return Ok(layer);
        }
        let blobs = self.dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        let temp = tempfile::NamedTempFile::new_in(&blobs)?;
        let compressed = Hashing::new(io::BufWriter::new(temp));
        // No file name, no timestamp in the gzip header: the same tar gives the same blob.
        let gzip = GzBuilder::new().mtime(0).write(compressed, Compression::default());
        let tar = tree.write_tar(Hashing::new(gzip), mtime)?;
        let (gzip, tar_digest, uncompressed_size) = tar.finish();
        if tar_digest != diff_id {
            bail!("a layer's files changed while it was being written ({diff_id} then {tar_digest})");
        }
        let (buffered, digest, size) = gzip.finish()?.finish();
        let temp = buffered.into_inner().map_err(|e| e.into_error())?;
        let blob = self.blob_path(&digest);
        temp.persist(&blob).with_context(|| format!("storing {}", blob.display()))?;
        let layer = Layer { digest, size, diff_id, uncompressed_size, blob };
        let index = self.dir.join("layers").join(format!("{}.json", layer.diff_id.trim_start_matches("sha256:")));
        write_atomically(&index, &serde_json::to_vec_pretty(&layer)?)?;
        Ok(layer)
    }

    /// The layer stored under `key`, if its blob is still there.
    pub fn keyed(&self, key: &str) -> Result<Option<Layer>> {
        self.read_layer(&self.dir.join("keys").join(format!("{key}.json")))
    }

    /// Stores `layer` under `key`.
    pub fn set_key(&self, key: &str, layer: &Layer) -> Result<()> {
        write_atomically(&self.dir.join("keys").join(format!("{key}.json")), &serde_json::to_vec_pretty(layer)?)
    }

    fn indexed(&self, diff_id: &str) -> Result<Option<Layer>> {
        self.read_layer(&self.dir.join("layers").join(format!("{}.json", diff_id.trim_start_matches("sha256:"))))
    }

    fn read_layer(&self, path: &Path) -> Result<Option<Layer>> {
        let Ok(text) = fs::read(path) else { return Ok(None) };
        let Ok(mut layer) = serde_json::from_slice::<Layer>(&text) else { return Ok(None) };
        layer.blob = self.blob_path(&layer.digest);
        let present = fs::metadata(&layer.blob).is_ok_and(|m| m.len() == layer.size);
        Ok(present.then_some(layer))
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a reader (or
/// a concurrent build) never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a path with a parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(bytes)?;
    temp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, u32, u64, u64, u64)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn tar_is_sorted_with_parents_and_normalized_headers() {
        let mut tree = Tree::new();
        tree.insert("/usr/local/bin/b", Node::File(Content::Bytes(b"b".to_vec())), EXEC_MODE).unwrap();
        tree.insert("/etc/passwd", Node::File(Content::Bytes(b"p".to_vec())), FILE_MODE).unwrap();
        tree.insert("/usr/local/bin/a", Node::Symlink("b".into()), 0o777).unwrap();
        let long = format!("/x/{}", "n".repeat(150));
        tree.insert(&long, Node::File(Content::Bytes(Vec::new())), FILE_MODE).unwrap();
        let bytes = tree.write_tar(Vec::new(), 1_700_000_000).unwrap();
        let got = entries(&bytes);
        let paths: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "etc/",
                "etc/passwd",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/a",
                "usr/local/bin/b",
                "x/",
                &long[1..]
            ]
        );
        assert!(got.iter().all(|e| e.2 == 0 && e.3 == 0 && e.4 == 1_700_000_000));
        assert_eq!(got[1].1, 0o644);
        assert_eq!(got[6].1, 0o755);
        assert_eq!(bytes, tree.write_tar(Vec::new(), 1_700_000_000).unwrap(), "same tree, same bytes");
        assert!(relative("/a/../b").is_err());
    }

    #[test]
    fn store_compresses_once_and_reproducibly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut tree = Tree::new();
        tree.insert("/a", Node::File(Content::Bytes(vec![7; 100_000])), FILE_MODE).unwrap();
        let first = store.layer(&tree, 1).unwrap();
        assert!(first.size < first.uncompressed_size);
        let mtime_before = fs::metadata(&first.blob).unwrap().modified().unwrap();
        let second = store.layer(&tree, 1).unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::metadata(&second.blob).unwrap().modified().unwrap(), mtime_before, "reused, not rewritten");

        let other = tempfile::tempdir().unwrap();
        let again = Store::new(other.path()).layer(&tree, 1).unwrap();
        assert_eq!(again.digest, first.digest, "a fresh store compresses to the same bytes");
        assert_ne!(Store::new(other.path()).layer(&tree, 2).unwrap().diff_id, first.diff_id, "mtime is content");
        let gz = fs::read(&first.blob).unwrap();
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "no gzip timestamp");
    }
}
