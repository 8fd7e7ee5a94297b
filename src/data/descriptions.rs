//! Slot descriptions: one `name : description` per line, as in Hou et al. (2020)'s
//! `slot_description` file (`playlist_owner : playlist owner`). Each is read as an
//! example whose words are all one span of the slot's label, so that retrieval has an
//! example of a label from its name alone.

use std::collections::HashSet;
use std::path::Path;

use super::lines::read_lines;
use super::{DataError, Example};

/// One example per described slot, in file order. Blank lines are skipped; a line
/// without `:`, with an empty name or description, or naming a slot twice is an error
/// that names its line.
pub fn read_slot_descriptions(path: &Path) -> Result<Vec<Example>, DataError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, line) in read_lines(path)?.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| DataError::Structure { path: path.to_path_buf(), place: format!("line {}", i + 1), what };
        let Some((name, description)) = line.split_once(':') else {
            return Err(bad("expected `slot_name : description`".into()));
        };
        let (name, description) = (name.trim(), description.trim());
        if name.is_empty() || description.is_empty() {
            return Err(bad("the slot name and its description must both be non-empty".into()));
        }
        if name == "O" || name.chars().any(char::is_whitespace) {
            return Err(bad(format!("{name:?} is not a slot name (no spaces, and `O` is reserved)")));
        }
        if !seen.insert(name.to_string()) {
            return Err(bad(format!("slot {name:?} is described twice")));
        }
        let words: Vec<&str> = description.split_whitespace().collect();
        let tags: Vec<String> =
            (0..words.len()).map(|w| format!("{}-{name}", if w == 0 { "B" } else { "I" })).collect();
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        out.push(Example::from_words(&words, &tags, None).map_err(|source| DataError::Bio { path: path.to_path_buf(), line: i + 1, source })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<Example>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot_description");
        std::fs::write(&path, text).unwrap();
        read_slot_descriptions(&path)
    }

    #[test]
    fn each_description_is_one_span_of_its_slot() {
        let got = read("playlist_owner : playlist owner\n\npoi : point of interest \ncity:city\n").unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].text, "playlist owner");
        assert_eq!(got[0].to_bio(), ["B-playlist_owner", "I-playlist_owner"]);
        assert_eq!(got[1].span_text(&got[1].spans[0]), "point of interest");
        assert_eq!((got[2].text.as_str(), got[2].spans[0].label.as_str()), ("city", "city"));
        assert!(got.iter().all(|e| e.intent.is_none() && e.spans.len() == 1));
    }

    #[test]
    fn bad_lines_name_their_line() {
        for (text, want) in [
            ("city : city\nno colon here\n", "line 2: expected"),
            ("city : \n", "line 1: the slot name and its description"),
            ("city : a\ncity : b\n", "line 2: slot \"city\" is described twice"),
            ("O : outside\n", "line 1: \"O\" is not a slot name"),
        ] {
            let err = read(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
