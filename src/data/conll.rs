//! CoNLL column files: one token per line, `token POS chunk NER` (CoNLL-2003), blank
//! lines between sentences, `-DOCSTART-` lines between documents (skipped). Only the
//! first column (the word) and the last (an IOB2 tag) are read, so two-column
//! `token TAG` files work too. Sentences have no intent.

use std::path::Path;

use super::lines::read_lines;
use super::{DataError, Example, Split};

/// The split files a CoNLL folder may hold, in the order they are listed.
pub(crate) const SPLIT_FILES: [&str; 4] = ["train", "valid", "dev", "test"];

/// A folder of `train.txt` / `valid.txt` / `test.txt`, or one file.
pub(crate) fn read_dataset(path: &Path) -> Result<Vec<Split>, DataError> {
    if path.is_file() {
        return Ok(vec![read_file(path, &super::detect::stem(path))?]);
    }
    SPLIT_FILES
        .iter()
        .map(|n| (n, path.join(format!("{n}.txt"))))
        .filter(|(_, p)| p.is_file())
        .map(|(n, p)| read_file(&p, n))
        .collect()
}

/// Reads one CoNLL file as a split.
pub(crate) fn read_file(path: &Path, name: &str) -> Result<Split, DataError> {
    let lines = read_lines(path)?;
    let mut examples = Vec::new();
    let mut sentence: Vec<(usize, &str, &str)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.is_empty() {
            flush(path, &mut sentence, &mut examples)?;
            continue;
        }
        if cols[0] == "-DOCSTART-" {
            continue;
        }
        if cols.len() < 2 {
            return Err(DataError::ConllColumns {
                path: path.to_path_buf(),
                line: i + 1,
                columns: cols.len(),
            });
        }
        sentence.push((i + 1, cols[0], cols[cols.len() - 1]));
    }
    flush(path, &mut sentence, &mut examples)?;
    Ok(Split { name: name.to_string(), source: path.to_path_buf(), examples })
}

/// Turns the collected `(line, word, tag)` rows into an example; a tag error names the
/// line of its token.
fn flush(
    path: &Path,
    sentence: &mut Vec<(usize, &str, &str)>,
    out: &mut Vec<Example>,
) -> Result<(), DataError> {
    if sentence.is_empty() {
        return Ok(());
    }
    let words: Vec<&str> = sentence.iter().map(|r| r.1).collect();
    let tags: Vec<&str> = sentence.iter().map(|r| r.2).collect();
    let example = Example::from_words(&words, &tags, None).map_err(|e| {
        let line = e.word().map_or(sentence[0].0, |w| sentence[w - 1].0);
        DataError::bio(path, line, e)
    })?;
    out.push(example);
    sentence.clear();
    Ok(())
}
