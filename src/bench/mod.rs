//! Benchmarks run from the CLI (`nearspan bench ...`); results go to
//! `benches/results/*.json` and the tables in BENCHMARKS.md.

pub mod clinc;
pub mod encoder;
pub mod fewshot;
pub mod query;

use std::path::Path;

use anyhow::{Context, Result};

/// Sets `key` in the JSON object stored at `path` (created if absent), keeping the
/// other keys, and writes it back atomically.
pub fn merge_result(path: &Path, key: &[&str], value: serde_json::Value) -> Result<()> {
    let mut root: serde_json::Value = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let mut node = &mut root;
    for k in &key[..key.len() - 1] {
        if !node.get(*k).is_some_and(|v| v.is_object()) {
            node[*k] = serde_json::json!({});
        }
        node = &mut node[*k];
    }
    node[key[key.len() - 1]] = value;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&root)? + "\n").with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
    Ok(())
}
