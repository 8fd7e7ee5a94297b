//! Errors from reading datasets. Every message starts with the file and, where the
//! format has lines, the 1-based line, so a user can open the file at the fault.

use std::path::PathBuf;

/// A tag sequence that is not valid IOB2, or words that cannot form an [`super::Example`].
///
/// Positions are 1-based word numbers, like line numbers in [`DataError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BioError {
    #[error("tag count {tags} != word count {words}")]
    LengthMismatch { tags: usize, words: usize },
    #[error("{tag} follows {prev} (IOB2 requires B- first) at word {word}")]
    InsideWithoutBegin { tag: String, prev: String, word: usize },
    #[error("tag {tag:?} at word {word} is not O, B-<label> or I-<label>")]
    BadTag { tag: String, word: usize },
    #[error("word {word} ({text:?}) is empty or contains whitespace")]
    BadWord { text: String, word: usize },
}

impl BioError {
    /// The 1-based word the error is about, if any; CoNLL turns it into a line number.
    pub fn word(&self) -> Option<usize> {
        match self {
            BioError::LengthMismatch { .. } => None,
            BioError::InsideWithoutBegin { word, .. }
            | BioError::BadTag { word, .. }
            | BioError::BadWord { word, .. } => Some(*word),
        }
    }
}

/// Why a dataset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: line {line}: invalid UTF-8", .path.display())]
    InvalidUtf8 { path: PathBuf, line: usize },
    #[error("{}: line {line}: {source}", .path.display())]
    Bio { path: PathBuf, line: usize, source: BioError },
    /// Few-shot files are one JSON line, so the place is given as domain/episode/part/sentence.
    #[error("{}: {place}: {source}", .path.display())]
    BioAt { path: PathBuf, place: String, source: BioError },
    #[error("{}: {place}: {what}", .path.display())]
    Structure { path: PathBuf, place: String, what: String },
    #[error(
        "{}: {a_lines} lines but {}: {b_lines} lines; seq.in, seq.out and label must be line-aligned",
        .a_path.display(), .b_path.display()
    )]
    LineCountMismatch { a_path: PathBuf, a_lines: usize, b_path: PathBuf, b_lines: usize },
    #[error("{}: line {line}, column {column}: {message}", .path.display())]
    Json { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{}: line {line}: span {start}..{end} is outside the text ({len} chars)", .path.display())]
    SpanOutside { path: PathBuf, line: usize, start: usize, end: usize, len: usize },
    #[error("{}: line {line}: span {start}..{end} is empty (start must be < end)", .path.display())]
    SpanEmpty { path: PathBuf, line: usize, start: usize, end: usize },
    #[error("{}: line {line}: span {start}..{end} has an empty label", .path.display())]
    SpanNoLabel { path: PathBuf, line: usize, start: usize, end: usize },
    #[error("{}: line {line}: spans {a_start}..{a_end} and {b_start}..{b_end} overlap", .path.display())]
    SpanOverlap { path: PathBuf, line: usize, a_start: usize, a_end: usize, b_start: usize, b_end: usize },
    #[error(
        "{}: line {line}: span {start}..{end} ({text:?}) does not {which} on a word boundary; \
         words split at whitespace and around each punctuation character, offsets count characters",
        .path.display()
    )]
    SpanNotOnWord { path: PathBuf, line: usize, start: usize, end: usize, text: String, which: &'static str },
    #[error(
        "{}: line {line}: expected `token [POS chunk] TAG` columns, got {columns}",
        .path.display()
    )]
    ConllColumns { path: PathBuf, line: usize, columns: usize },
    #[error("{}: cannot tell the dataset format ({why}); pass one of: {}", .path.display(), Format::NAMES)]
    UnknownFormat { path: PathBuf, why: String },
    #[error("unknown format {name:?}; expected one of: {}", Format::NAMES)]
    UnknownFormatName { name: String },
    #[error("{}: no {format} splits found ({expected})", .path.display())]
    NoSplits { path: PathBuf, format: Format, expected: &'static str },
}

use super::Format;

impl DataError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn bio(path: &std::path::Path, line: usize, source: BioError) -> Self {
        DataError::Bio { path: path.to_path_buf(), line, source }
    }

    /// serde_json appends " at line L column C"; we put the place first, in our own style.
    pub(crate) fn json(path: &std::path::Path, line_offset: usize, e: &serde_json::Error) -> Self {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
        DataError::Json {
            path: path.to_path_buf(),
            line: line_offset + e.line().max(1) - 1,
            column: e.column(),
            message,
        }
    }
}
