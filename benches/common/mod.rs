//! Inputs shared by the benches that need the real model: the default encoder and the
//! SNIPS test utterances, both read from `../shared` (nothing is downloaded).

use std::path::PathBuf;

use nearspan::encoder::Encoder;

/// The default encoder, or None (with a note on stderr) when no model folder is found,
/// so that `cargo bench` still runs the benches that need no model.
pub fn encoder() -> Option<Encoder> {
    let Some(dir) = nearspan::paths::default_model_dir() else {
        eprintln!(
            "skipped: no model found (looked in {:?}); set NEARSPAN_MODEL or run scripts/setup",
            nearspan::paths::default_model_candidates()
        );
        return None;
    };
    Some(Encoder::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

/// The SNIPS test utterances, trimmed, in file order.
pub fn snips_test() -> Vec<String> {
    let path: PathBuf = nearspan::paths::shared_data_dir().join("snips/test/seq.in");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}
