//! Telling formats apart, and [`load`], which reads any of them.
//!
//! Rules, first match wins: a folder with `seq.in`, or with `train/seq.in`, is JointBERT;
//! a folder with `train.txt` is CoNLL; `.jsonl` is JSONL; `.txt` is CoNLL; `.json` whose
//! top-level keys include `train` and `oos_test` is CLINC150, and `.json` whose values
//! are lists of `{support, batch}` episodes is few-shot.

use std::fmt;
use std::path::Path;

use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::json::{read_json, OrderedMap};
use super::{clinc, conll, fewshot, jointbert, jsonl, DataError, Dataset, Format, Split};

/// Reads a dataset file or folder; `format` is detected when `None`.
pub fn load(path: &Path, format: Option<Format>) -> Result<Dataset, DataError> {
    let format = match format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    let splits = match format {
        Format::JointBert => jointbert::read_dataset(path)?,
        Format::FewShot => fewshot::read_dataset(path)?,
        Format::Clinc => clinc::read_dataset(path)?,
        Format::Conll => conll::read_dataset(path)?,
        Format::Jsonl => {
            vec![Split { name: stem(path), source: path.to_path_buf(), examples: jsonl::read_jsonl(path)? }]
        }
    };
    if splits.is_empty() {
        return Err(DataError::NoSplits { path: path.into(), format, expected: expected_files(format) });
    }
    Ok(Dataset { format, splits })
}

/// Guesses the format of a file or folder from its layout, extension and, for `.json`,
/// its top-level structure.
pub fn detect_format(path: &Path) -> Result<Format, DataError> {
    let unknown = |why: &str| DataError::UnknownFormat { path: path.into(), why: why.into() };
    if path.is_dir() {
        if jointbert::is_split_dir(path) || jointbert::is_split_dir(&path.join("train")) {
            return Ok(Format::JointBert);
        }
        if path.join("train.txt").is_file() {
            return Ok(Format::Conll);
        }
        return Err(unknown("a folder without seq.in, train/seq.in or train.txt"));
    }
    if let Err(e) = std::fs::metadata(path) {
        return Err(DataError::io(path, e));
    }
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("jsonl") => Ok(Format::Jsonl),
        Some("txt") | Some("conll") => Ok(Format::Conll),
        Some("json") => detect_json(path),
        _ => Err(unknown("extension is not .json, .jsonl or .txt")),
    }
}

/// The file or split name a path gives: the file name without its extension.
pub(crate) fn stem(path: &Path) -> String {
    path.file_stem().map_or("data".into(), |s| s.to_string_lossy().into_owned())
}

fn expected_files(format: Format) -> &'static str {
    match format {
        Format::JointBert => "expected seq.in, seq.out, label in the folder or in its subfolders",
        Format::Conll => "expected train.txt, valid.txt, dev.txt or test.txt",
        _ => "the file holds no data",
    }
}

/// One pass over the file that keeps only the shape of each top-level value. A file
/// that is not an object of lists is not a format we know, so its parse error becomes
/// an [`DataError::UnknownFormat`] that says what failed.
fn detect_json(path: &Path) -> Result<Format, DataError> {
    let unknown = |why: String| DataError::UnknownFormat { path: path.into(), why };
    let map: OrderedMap<Shape> = match read_json(path) {
        Ok(map) => map,
        Err(DataError::Json { line, column, message, .. }) => {
            return Err(unknown(format!("line {line}, column {column}: {message}")))
        }
        Err(e) => return Err(e),
    };
    let has = |k: &str| map.0.iter().any(|(key, _)| key == k);
    if has("train") && has("oos_test") {
        return Ok(Format::Clinc);
    }
    if !map.0.is_empty() && map.0.iter().all(|(_, s)| s.0) {
        return Ok(Format::FewShot);
    }
    Err(unknown("a JSON object that is neither CLINC150 (train, oos_test, ...) nor few-shot episodes".into()))
}

/// Whether a top-level JSON list starts with an object that has a `support` key
/// (a few-shot episode). Only the first item is kept in memory.
struct Shape(bool);

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let first: Option<serde_json::Value> = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Shape(first.is_some_and(|v| v.get("support").is_some())))
            }
        }
        d.deserialize_seq(V)
    }
}
