//! An ensemble of encoders: a folder whose `ensemble.json` names model folders that
//! share one tokenizer. Each token's vector is the members' vectors side by side, so a
//! span's cosine similarity mixes the members' (in proportion to their vector norms,
//! which are close for models fine-tuned from one base); everything downstream (span
//! pooling, the index, span detectors) sees one wider encoder.
//!
//! ```json
//! {"format": "nearspan-ensemble/1", "members": ["../retriever_a", "/models/retriever_b"]}
//! ```
//! Relative member paths are read from the ensemble folder. An ensemble encodes only:
//! training refuses it ([`super::EncoderError::EnsembleNotTrainable`]).

use std::path::{Path, PathBuf};

use super::{Encoder, EncoderError, ModelInfo, Precision};

/// The manifest's file name inside an ensemble folder.
pub const MANIFEST: &str = "ensemble.json";
const FORMAT: &str = "nearspan-ensemble/1";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// Model folders, in the order their vectors are put side by side.
    pub members: Vec<PathBuf>,
}

impl Manifest {
    pub fn new(members: Vec<PathBuf>) -> Self {
        Self { format: FORMAT.to_string(), members }
    }

    /// The manifest of `dir` when it is an ensemble folder, checked; `None` otherwise.
    pub fn find(dir: &Path) -> Result<Option<Manifest>, EncoderError> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Ok(None);
        }
        let bad = |reason: String| EncoderError::Ensemble { path: path.clone(), reason };
        let text = std::fs::read_to_string(&path).map_err(|source| EncoderError::Io { path: path.clone(), source })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(format!("not an ensemble manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(bad(format!("format {:?}, expected {FORMAT:?}", m.format)));
        }
        if m.members.is_empty() {
            return Err(bad("\"members\" is empty; list the model folders to combine".into()));
        }
        Ok(Some(m))
    }

    /// Writes the manifest into `dir` (created if missing), atomically.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(".{MANIFEST}.tmp"));
        std::fs::write(&tmp, json + "\n")?;
        std::fs::rename(&tmp, dir.join(MANIFEST))
    }
}

/// Loads every member of `manifest` (found in `dir`) for inference in `precision` and
/// joins them into one encoder.
pub(super) fn load(dir: &Path, manifest: &Manifest, precision: Precision) -> Result<Encoder, EncoderError> {
    let path = dir.join(MANIFEST);
    let bad = |reason: String| EncoderError::Ensemble { path: path.clone(), reason };
    let mut loaded = Vec::with_capacity(manifest.members.len());
    let mut tokenizer_bytes: Option<(PathBuf, Vec<u8>)> = None;
    for member in &manifest.members {
        let member_dir = if member.is_absolute() { member.clone() } else { dir.join(member) };
        if !member_dir.is_dir() {
            return Err(bad(format!("member {}: no such folder ({})", member.display(), member_dir.display())));
        }
        if Manifest::find(&member_dir)?.is_some() {
            return Err(bad(format!("member {} is an ensemble itself; list its members instead", member.display())));
        }
        let tok_path = member_dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|source| EncoderError::Io { path: tok_path.clone(), source })?;
        match &tokenizer_bytes {
            Some((first, b)) if *b != bytes => {
                return Err(bad(format!(
                    "members {} and {} have different tokenizers; an ensemble's members must share one vocabulary",
                    first.display(),
                    member_dir.display()
                )))
            }
            Some(_) => {}
            None => tokenizer_bytes = Some((member_dir.clone(), bytes)),
        }
        loaded.push(Encoder::load_with_precision(&member_dir, precision)?);
    }
    let mut members = loaded.into_iter();
    let mut first = members.next().expect("a manifest has at least one member");
    let rest: Vec<Encoder> = members.collect();
    let all = std::iter::once(&first).chain(&rest);
    // Which weights in which order: vectors of another list are not comparable.
    let revision = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(FORMAT.as_bytes());
        for e in all.clone() {
            h.update(b"\n");
            h.update(e.info.weights_sha256.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    };
    let id = dir
        .canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ensemble".into());
    first.info = ModelInfo {
        id,
        dir: dir.to_path_buf(),
        weights_sha256: revision,
        hidden_size: all.clone().map(|e| e.info.hidden_size).sum(),
        max_tokens: all.map(|e| e.info.max_tokens).min().unwrap_or(0),
    };
    first.members = rest;
    Ok(first)
}

/// Puts per-token rows side by side: `parts[m]` holds (tokens × `widths[m]`) rows.
pub(super) fn interleave(parts: &[&[f32]], widths: &[usize]) -> Vec<f32> {
    let tokens = parts.first().map_or(0, |p| p.len() / widths[0].max(1));
    let total: usize = widths.iter().sum();
    let mut out = Vec::with_capacity(tokens * total);
    for t in 0..tokens {
        for (p, &w) in parts.iter().zip(widths) {
            out.extend_from_slice(&p[t * w..(t + 1) * w]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_puts_each_token_side_by_side() {
        let a = [1.0, 2.0, 3.0, 4.0]; // 2 tokens × 2
        let b = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]; // 2 tokens × 3
        assert_eq!(interleave(&[&a, &b], &[2, 3]), vec![1.0, 2.0, 10.0, 20.0, 30.0, 3.0, 4.0, 40.0, 50.0, 60.0]);
    }

    #[test]
    fn manifest_errors_name_the_file_and_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(Manifest::find(dir).unwrap().is_none(), "a folder without a manifest is not an ensemble");
        for (text, needle) in [
            ("{\"format\": \"nearspan-ensemble/1\", \"members\": []}", "empty"),
            ("{\"format\": \"other/2\", \"members\": [\"a\"]}", "expected"),
            ("{\"members\": [\"a\"]", "not an ensemble manifest"),
            ("{\"format\": \"nearspan-ensemble/1\", \"members\": [\"a\"], \"weights\": 1}", "unknown field"),
        ] {
            std::fs::write(dir.join(MANIFEST), text).unwrap();
            let err = Manifest::find(dir).unwrap_err().to_string();
            assert!(err.contains(MANIFEST) && err.contains(needle), "{text}: {err}");
        }
        let m = Manifest::new(vec!["../a".into(), "/b".into()]);
        m.write(dir).unwrap();
        assert_eq!(Manifest::find(dir).unwrap(), Some(m));
    }
}
