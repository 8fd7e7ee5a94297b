//! CLINC150 (`data_full.json` and its variants): `{split: [[utterance, intent], ...]}`.
//! Utterances are raw text, split into words by [`super::segment_words`]; no slots.

use std::path::Path;

use super::json::{read_json, OrderedMap};
use super::{DataError, Example, Split};

/// The usual split order; other keys follow in file order.
const ORDER: [&str; 6] = ["train", "val", "test", "oos_train", "oos_val", "oos_test"];

/// Reads every key of the file as a split.
pub(crate) fn read_dataset(path: &Path) -> Result<Vec<Split>, DataError> {
    let raw: OrderedMap<Vec<(String, String)>> = read_json(path)?;
    let mut splits: Vec<Split> = raw
        .0
        .into_iter()
        .map(|(name, pairs)| Split {
            name,
            source: path.to_path_buf(),
            examples: pairs
                .into_iter()
                .map(|(text, intent)| Example::from_text(&text, Some(intent)))
                .collect(),
        })
        .collect();
    splits.sort_by_key(|s| ORDER.iter().position(|&k| k == s.name).unwrap_or(ORDER.len()));
    Ok(splits)
}
