//! Benchmarks run from the CLI (`nearspan bench ...`); results go to
//! `benches/results/*.json` and the tables in BENCHMARKS.md.

pub mod clinc;
pub mod encoder;
pub mod fewshot;
pub mod finetune;
pub mod full;
pub mod hnsw;
pub mod query;
pub mod speed;
pub mod train_step;

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
    write_json(path, &root)
}

/// Writes `value` as pretty JSON to `path` through a temporary file and a rename, so an
/// interrupted benchmark never leaves a half-written results file.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n").with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
    Ok(())
}

/// Linear-interpolation percentile (`q` in 0..=100) of sorted values: numpy's default,
/// which the Python peers use, so both sides of a comparison are summarized alike.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// The 1-minute load average from /proc/loadavg (None off Linux): benchmarks record it
/// because the machine is shared.
pub fn loadavg_1min() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
