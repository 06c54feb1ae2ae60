//! Writes the CRD YAML generated from the Rust types: the plain manifests under `deploy/` and the
//! Helm chart's template. `crdgen --check` exits non-zero when the committed files differ.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let outputs = match rolemesh_crds::generated_files() {
        Ok(outputs) => outputs,
        Err(error) => {
            eprintln!("crdgen: failed to render CRDs: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = false;
    for (relative, content) in outputs {
        let path = root.join(relative);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == content {
            continue;
        }
        if check {
            eprintln!("crdgen: {relative} is out of date; run `make crds`");
            stale = true;
        } else if let Err(error) = std::fs::write(&path, content) {
            eprintln!("crdgen: failed to write {}: {error}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("crdgen: wrote {relative}");
        }
    }
    if stale {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
