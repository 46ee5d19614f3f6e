//! Writes the CRD YAML files into the directory given as the only argument (`make crds`).
use std::{env, fs, path::PathBuf};

fn main() {
    let dir = PathBuf::from(env::args().nth(1).unwrap_or_else(|| "crds".into()));
    fs::create_dir_all(&dir).expect("create the CRD directory");
    for (file, crd) in cloudpass_api::crd::crds() {
        let path = dir.join(file);
        fs::write(&path, cloudpass_api::crd::to_yaml(&crd)).expect("write a CRD file");
        println!("wrote {}", path.display());
    }
}
