//! Datasets: one [`Example`] type for every benchmark format we read, so the rest of the
//! pipeline never sees a format.
//!
//! **Offsets.** Every offset here (`Word`, `LabeledSpan::start/end`, the JSONL `spans`) is a
//! *character* offset: a count of Unicode scalar values, the same as a Python `str` index,
//! half-open (`start..end`). Character offsets, not bytes, because users write JSONL by
//! hand and from Python, and a byte offset inside "café" is an easy mistake to make.
//! Use [`char_slice`] to turn one into text.
//!
//! **Words.** Spans start and end on word boundaries. Formats that come pre-tokenized
//! (JointBERT, few-shot episodes, CoNLL) keep their tokens and the text is the tokens
//! joined by one space; raw-text formats (CLINC150, JSONL) are split by [`segment_words`].
//!
//! Readers: [`load`] reads any format into named splits; [`read_fewshot`] keeps episodes;
//! [`read_jsonl`] / [`write_jsonl`] are the user format. Readers never drop a line: a bad
//! line is an error naming the file and its 1-based line.

use std::path::PathBuf;

mod bio;
mod clinc;
mod conll;
mod descriptions;
mod detect;
mod error;
mod fewshot;
mod jointbert;
mod json;
pub(crate) mod jsonl;
mod lines;
mod punct;
mod segment;
mod stats;

pub use bio::{spans_to_tags, tags_to_spans};
pub use descriptions::read_slot_descriptions;
pub use detect::{detect_format, load};
pub use error::{BioError, DataError};
pub use fewshot::read_fewshot;
pub use jsonl::{read_jsonl, write_jsonl};
pub use segment::segment_words;
pub use stats::{stats, DatasetStats, SplitStats, WidthCoverage, COVERAGE_MAX_WIDTH};

/// A word of [`Example::text`], as character offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Word {
    pub start: usize,
    pub end: usize,
}

/// A labeled slot: words `word_start..word_end` of the example, which are characters
/// `start..end` of its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LabeledSpan {
    pub label: String,
    pub word_start: usize,
    /// Exclusive.
    pub word_end: usize,
    pub start: usize,
    /// Exclusive.
    pub end: usize,
}

impl LabeledSpan {
    /// The words it covers.
    pub fn words(&self) -> crate::spans::WordSpan {
        crate::spans::WordSpan { start: self.word_start, end: self.word_end }
    }
}

/// One utterance with its gold (or predicted) intent and slots.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub text: String,
    pub words: Vec<Word>,
    pub intent: Option<String>,
    /// Sorted by `start`, non-overlapping.
    pub spans: Vec<LabeledSpan>,
}

/// A named part of a dataset (train, dev, test, support, ...) and where it was read from.
#[derive(Debug, Clone)]
pub struct Split {
    pub name: String,
    pub source: PathBuf,
    pub examples: Vec<Example>,
}

/// What [`load`] returns.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub format: Format,
    pub splits: Vec<Split>,
}

impl Dataset {
    /// The split called `name`, if there is one.
    pub fn split(&self, name: &str) -> Option<&Split> {
        self.splits.iter().find(|s| s.name == name)
    }
}

/// The on-disk formats [`load`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// monologg/JointBERT folders: `seq.in`, `seq.out`, `label`.
    JointBert,
    /// Hou et al. (2020) few-shot episodes, one `test.json` per target domain.
    FewShot,
    /// CLINC150 `data_full.json`: `[utterance, intent]` pairs per split.
    Clinc,
    /// CoNLL column files, IOB2 tags in the last column.
    Conll,
    /// nearspan's own JSONL, documented on [`read_jsonl`].
    Jsonl,
}

impl Format {
    pub const ALL: [Format; 5] =
        [Format::JointBert, Format::FewShot, Format::Clinc, Format::Conll, Format::Jsonl];
    pub(crate) const NAMES: &'static str = "jointbert, fewshot, clinc, conll, jsonl";

    pub fn name(self) -> &'static str {
        match self {
            Format::JointBert => "jointbert",
            Format::FewShot => "fewshot",
            Format::Clinc => "clinc",
            Format::Conll => "conll",
            Format::Jsonl => "jsonl",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| DataError::UnknownFormatName { name: s.to_string() })
    }
}

/// A few-shot episode: label the `query` examples using only the `support` examples.
#[derive(Debug, Clone)]
pub struct Episode {
    pub support: Vec<Example>,
    pub query: Vec<Example>,
}

/// `text[start..end]` in characters; clamps out-of-range offsets instead of panicking.
pub fn char_slice(text: &str, start: usize, end: usize) -> &str {
    let byte = |n: usize| text.char_indices().nth(n).map_or(text.len(), |(b, _)| b);
    let (s, e) = (byte(start), byte(end.max(start)));
    &text[s..e]
}

impl Example {
    /// Builds an example from pre-tokenized words and their IOB2 tags; the text is the
    /// words joined by one space.
    ///
    /// ```
    /// use nearspan::data::Example;
    /// let e = Example::from_words(&["play", "daft", "punk"], &["O", "B-artist", "I-artist"], None).unwrap();
    /// assert_eq!(e.span_text(&e.spans[0]), "daft punk");
    /// assert_eq!((e.spans[0].start, e.spans[0].end), (5, 14));
    /// assert_eq!(e.to_bio(), ["O", "B-artist", "I-artist"]);
    /// ```
    pub fn from_words(words: &[&str], tags: &[&str], intent: Option<String>) -> Result<Example, BioError> {
        let (text, offsets) = join_words(words)?;
        let spans = tags_to_spans(tags, &offsets)?;
        Ok(Example { text, words: offsets, intent, spans })
    }

    /// Builds an unlabeled-slot example from raw text, words by [`segment_words`].
    pub fn from_text(text: &str, intent: Option<String>) -> Example {
        Example { text: text.to_string(), words: segment_words(text), intent, spans: Vec::new() }
    }

    /// The text of word `i` (empty if `i` is out of range).
    pub fn word_text(&self, i: usize) -> &str {
        self.words.get(i).map_or("", |w| char_slice(&self.text, w.start, w.end))
    }

    /// The text a span covers, from its character offsets.
    pub fn span_text(&self, s: &LabeledSpan) -> &str {
        char_slice(&self.text, s.start, s.end)
    }

    /// One IOB2 tag per word.
    pub fn to_bio(&self) -> Vec<String> {
        spans_to_tags(self.words.len(), &self.spans)
    }
}

/// Joins words with one space and records each word's character offsets.
fn join_words(words: &[&str]) -> Result<(String, Vec<Word>), BioError> {
    let mut text = String::new();
    let mut offsets = Vec::with_capacity(words.len());
    let mut pos = 0;
    for (i, w) in words.iter().enumerate() {
        if w.is_empty() || w.chars().any(char::is_whitespace) {
            return Err(BioError::BadWord { text: w.to_string(), word: i + 1 });
        }
        if i > 0 {
            text.push(' ');
            pos += 1;
        }
        let len = w.chars().count();
        text.push_str(w);
        offsets.push(Word { start: pos, end: pos + len });
        pos += len;
    }
    Ok((text, offsets))
}
