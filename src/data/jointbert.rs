//! monologg/JointBERT folders: `seq.in` (space-separated words), `seq.out` (one IOB2 tag
//! per word) and `label` (the intent), line-aligned. Lines may end in spaces, so both are
//! split on whitespace. Multi-intent labels such as `atis_flight#atis_airfare` are kept
//! as one intent string.

use std::path::Path;

use super::lines::read_lines;
use super::{DataError, Example, Split};

/// Whether `dir` is a split folder (it has a `seq.in`).
pub(crate) fn is_split_dir(dir: &Path) -> bool {
    dir.join("seq.in").is_file()
}

/// A dataset root (subfolders train/dev/test with `seq.in`) or a single split folder.
pub(crate) fn read_dataset(dir: &Path) -> Result<Vec<Split>, DataError> {
    if is_split_dir(dir) {
        let name = dir.file_name().map_or("split".into(), |n| n.to_string_lossy().into_owned());
        return Ok(vec![read_split(dir, &name)?]);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if is_split_dir(&entry.path()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort_by_key(|n| (split_rank(n), n.clone()));
    names.iter().map(|n| read_split(&dir.join(n), n)).collect()
}

/// train, dev, test first; anything else after, alphabetically.
fn split_rank(name: &str) -> usize {
    ["train", "dev", "valid", "test"].iter().position(|&k| k == name).unwrap_or(4)
}

/// Reads one split folder.
pub(crate) fn read_split(dir: &Path, name: &str) -> Result<Split, DataError> {
    let (in_path, out_path, label_path) = (dir.join("seq.in"), dir.join("seq.out"), dir.join("label"));
    let words = read_lines(&in_path)?;
    let tags = read_lines(&out_path)?;
    let labels = read_lines(&label_path)?;
    for (other, lines) in [(&out_path, &tags), (&label_path, &labels)] {
        if lines.len() != words.len() {
            return Err(DataError::LineCountMismatch {
                a_path: in_path.clone(),
                a_lines: words.len(),
                b_path: other.clone(),
                b_lines: lines.len(),
            });
        }
    }
    let mut examples = Vec::with_capacity(words.len());
    for (i, ((w, t), l)) in words.iter().zip(&tags).zip(&labels).enumerate() {
        examples.push(read_line([&in_path, &out_path, &label_path], i + 1, [w, t, l])?);
    }
    Ok(Split { name: name.to_string(), source: dir.to_path_buf(), examples })
}

/// One aligned line of the three files; `paths` and `text` are seq.in, seq.out, label.
fn read_line(paths: [&Path; 3], line: usize, text: [&str; 3]) -> Result<Example, DataError> {
    let [in_path, out_path, label_path] = paths;
    let [words, tags, label] = text;
    let words: Vec<&str> = words.split_whitespace().collect();
    let tags: Vec<&str> = tags.split_whitespace().collect();
    if words.is_empty() {
        return Err(DataError::Structure {
            path: in_path.to_path_buf(),
            place: format!("line {line}"),
            what: "empty utterance".into(),
        });
    }
    let label = label.trim();
    if label.is_empty() {
        return Err(DataError::Structure {
            path: label_path.to_path_buf(),
            place: format!("line {line}"),
            what: "empty intent label".into(),
        });
    }
    Example::from_words(&words, &tags, Some(label.to_string())).map_err(|e| DataError::bio(out_path, line, e))
}
