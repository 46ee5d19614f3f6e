//! `make images`: the cloudpass images (the Dockerfile's targets), the pause image and
//! the test apps image, built without a container engine into OCI archives under
//! `target/images/`, then a JSON summary of them on standard output.
//!
//! ```text
//! cloudpass-images [--only NAME[,NAME...]] [--out DIR]
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use cloudpass_e2e::images::{BuildOptions, build_all};

fn main() -> Result<()> {
    let mut options = BuildOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--only" => {
                let names = args.next().context("--only needs NAME[,NAME...]")?;
                options.only.extend(names.split(',').filter(|n| !n.is_empty()).map(str::to_owned));
            }
            "--out" => options.out_dir = Some(PathBuf::from(args.next().context("--out needs a folder")?)),
            "-h" | "--help" => {
                println!(
                    "cloudpass-images [--only NAME[,NAME...]] [--out DIR]\n\n\
                     Builds the images operator, webhook, agent (from the Dockerfile), pause and apps as OCI\n\
                     archives (default folder target/images) and prints a JSON summary."
                );
                return Ok(());
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    let images = build_all(&options)?;
    let summary: Vec<serde_json::Value> = images
        .iter()
        .map(|image| {
            serde_json::json!({
                "name": image.name,
                "archive": image.archive,
                "manifestDigest": image.manifest_digest,
                "compressedBytes": image.compressed_bytes,
                "uncompressedBytes": image.uncompressed_bytes,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
