//! An image from its layers and run configuration: the OCI config, manifest and
//! index (types from `oci-spec`, serialized with sorted keys so that the same image
//! always has the same bytes), written as an OCI image layout archive.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, ConfigBuilder, Descriptor, Digest, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder, SCHEMA_VERSION,
};
use serde::{Deserialize, Serialize};

use super::layer::{Layer, Store, write_atomically};

/// The `PATH` that BuildKit gives a Linux image whose base sets none (`FROM scratch`).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The annotation `ctr images import` names an image by.
pub const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// What an image runs and how it is described, as the config's `config` object says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `USER`.
    pub user: Option<String>,
    /// `ENV`, in order, as `NAME=value`.
    pub env: Vec<String>,
    /// `ENTRYPOINT` (exec form).
    pub entrypoint: Option<Vec<String>>,
    /// `CMD` (exec form).
    pub cmd: Option<Vec<String>>,
    /// `WORKDIR`.
    pub working_dir: Option<String>,
    /// `LABEL`s.
    pub labels: BTreeMap<String, String>,
}

/// One history entry: the instruction that made a layer, or changed only the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// The instruction as written.
    pub created_by: String,
    /// Whether it added no layer.
    pub empty_layer: bool,
}

/// An image to write: its reference, layers (bottom first), configuration and history.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The full reference, e.g. `ghcr.io/cloudpass-dev/cloudpass-agent:0.1.0`; with
    /// `tag_from_content`, the repository only.
    pub name: String,
    /// Tag the repository `name` with the first 12 hex digits of the manifest digest.
    pub tag_from_content: bool,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
    /// The run configuration.
    pub config: RunConfig,
    /// The history, one entry per instruction.
    pub history: Vec<History>,
    /// Seconds since the epoch for `created` (SOURCE_DATE_EPOCH).
    pub created: i64,
}

/// An image written as an OCI image layout archive.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuiltImage {
    /// Its full reference, which `ctr images import` gives it.
    pub name: String,
    /// The archive (a tar of `oci-layout`, `index.json` and `blobs/sha256/`).
    pub archive: PathBuf,
    /// `sha256:<hex>` of the manifest: the image's identity.
    pub manifest_digest: String,
    /// Bytes a registry would transfer: the manifest, the config and the gzip layers.
    pub compressed_bytes: u64,
    /// Bytes of the uncompressed layers (tar), about what the image takes once unpacked.
    pub uncompressed_bytes: u64,
}

/// JSON with the keys of every object sorted, whatever map type produced it: `oci-spec`
/// keeps labels and annotations in `HashMap`s, whose order changes from run to run.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    fn sort(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let sorted: BTreeMap<String, serde_json::Value> = map.into_iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sort).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sort(serde_json::to_value(value)?))?)
}

/// RFC 3339 UTC time of `seconds` since the epoch.
pub fn rfc3339(seconds: i64) -> Result<String> {
    Ok(jiff::Timestamp::from_second(seconds).context("SOURCE_DATE_EPOCH out of range")?.to_string())
}

fn digest(text: &str) -> Result<Digest> {
    text.parse().with_context(|| format!("not a digest: {text}"))
}

/// Writes `spec` into `archive` (blobs staged in `store`), unless the archive there holds
/// this very manifest already; returns what was written.
pub fn write_image(spec: &ImageSpec, store: &Store, archive: &Path) -> Result<BuiltImage> {
    let created = rfc3339(spec.created)?;
    let mut config = ConfigBuilder::default();
    if let Some(user) = &spec.config.user {
        config = config.user(user.clone());
    }
    if !spec.config.env.is_empty() {
        config = config.env(spec.config.env.clone());
    }
    if let Some(entrypoint) = &spec.config.entrypoint {
        config = config.entrypoint(entrypoint.clone());
    }
    if let Some(cmd) = &spec.config.cmd {
        config = config.cmd(cmd.clone());
    }
    if let Some(dir) = &spec.config.working_dir {
        config = config.working_dir(dir.clone());
    }
    if !spec.config.labels.is_empty() {
        config = config.labels(spec.config.labels.clone().into_iter().collect::<HashMap<_, _>>());
    }
    let history = spec
        .history
        .iter()
        .map(|h| {
            let entry = HistoryBuilder::default()
                .created(created.clone())
                .created_by(h.created_by.clone())
                .comment("cloudpass-images");
            if h.empty_layer { entry.empty_layer(true) } else { entry }.build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let image_config = ImageConfigurationBuilder::default()
        .created(created)
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config.build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(spec.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>())
                .build()?,
        )
        .history(history)
        .build()?;
    let config_bytes = canonical_json(&image_config)?;
    let config_digest = store.put(&config_bytes)?;

    let layers = spec
        .layers
        .iter()
        .map(|l| Ok(Descriptor::new(MediaType::ImageLayerGzip, l.size, digest(&l.digest)?)))
        .collect::<Result<Vec<_>>>()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(MediaType::ImageConfig, config_bytes.len() as u64, digest(&config_digest)?))
        .layers(layers)
        .build()?;
    let manifest_bytes = canonical_json(&manifest)?;
    let manifest_digest = store.put(&manifest_bytes)?;

    let mut descriptor =
        Descriptor::new(MediaType::ImageManifest, manifest_bytes.len() as u64, digest(&manifest_digest)?);
    descriptor.set_platform(Some(PlatformBuilder::default().architecture(Arch::Amd64).os(Os::Linux).build()?));
    let name = if spec.tag_from_content {
        format!("{}:{}", spec.name, &manifest_digest["sha256:".len().."sha256:".len() + 12])
    } else {
        spec.name.clone()
    };
    descriptor.set_annotations(Some(HashMap::from([
        (CONTAINERD_IMAGE_NAME.to_owned(), name.clone()),
        (ANNOTATION_REF_NAME.to_owned(), name.clone()),
    ])));
    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![descriptor])
        .build()?;
    let index_bytes = canonical_json(&index)?;

    let built = BuiltImage {
        name,
        archive: archive.to_owned(),
        manifest_digest: manifest_digest.clone(),
        compressed_bytes: manifest_bytes.len() as u64
            + config_bytes.len() as u64
            + spec.layers.iter().map(|l| l.size).sum::<u64>(),
        uncompressed_bytes: spec.layers.iter().map(|l| l.uncompressed_size).sum(),
    };
    // The archive is rewritten only when its content would change.
    let stamp = archive.with_extension("json");
    let previous: Option<BuiltImage> = fs::read(&stamp).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if previous.as_ref() == Some(&built) && archive.is_file() {
        return Ok(built);
    }

    let mut blobs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for d in [&config_digest, &manifest_digest] {
        blobs.insert(d.clone(), store.blob_path(d));
    }
    for layer in &spec.layers {
        blobs.insert(layer.digest.clone(), layer.blob.clone());
    }
    let dir = archive.parent().context("archive path with a parent")?;
    fs::create_dir_all(dir)?;
    let temp = tempfile::NamedTempFile::new_in(dir)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(temp));
    let header = |size: u64, mode: u32, kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.set_mtime(spec.created.max(0) as u64);
        h
    };
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    tar.append_data(&mut header(0, 0o755, tar::EntryType::Directory), "blobs/", std::io::empty())?;
    tar.append_data(&mut header(0, 0o755, tar::EntryType::Directory), "blobs/sha256/", std::io::empty())?;
    for (digest, path) in &blobs {
        let file = fs::File::open(path).with_context(|| format!("blob {}", path.display()))?;
        let size = file.metadata()?.len();
        let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        tar.append_data(&mut header(size, 0o644, tar::EntryType::Regular), name, std::io::Read::take(file, size))?;
    }
    tar.append_data(
        &mut header(index_bytes.len() as u64, 0o644, tar::EntryType::Regular),
        "index.json",
        &index_bytes[..],
    )?;
    tar.append_data(&mut header(layout.len() as u64, 0o644, tar::EntryType::Regular), "oci-layout", &layout[..])?;
    let mut buffered = tar.into_inner()?;
    buffered.flush()?;
    let temp = buffered.into_inner().map_err(|e| e.into_error())?;
    temp.persist(archive).with_context(|| format!("writing {}", archive.display()))?;
    write_atomically(&stamp, &serde_json::to_vec_pretty(&built)?)?;
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_every_object() {
        let value = serde_json::json!({"b": 1, "a": {"d": [{"z": 1, "y": 2}], "c": null}});
        assert_eq!(
            String::from_utf8(canonical_json(&value).unwrap()).unwrap(),
            r#"{"a":{"c":null,"d":[{"y":2,"z":1}]},"b":1}"#
        );
        let labels: HashMap<String, String> = (0..50).map(|i| (format!("k{i}"), i.to_string())).collect();
        let first = canonical_json(&labels).unwrap();
        let again: HashMap<String, String> = labels.clone().into_iter().collect();
        assert_eq!(first, canonical_json(&again).unwrap());
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
    }
}
