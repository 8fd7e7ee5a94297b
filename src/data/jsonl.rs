//! nearspan's own format, one example per line:
//!
//! ```text
//! {"text": "turn on the kitchen lights", "intent": "turn_on", "spans": [{"start": 12, "end": 19, "label": "room"}]}
//! ```
//!
//! `start`/`end` are character offsets into `text` (half-open, like Python slicing).
//! `intent` and `spans` may be left out (no intent, no slots). Span ends must fall on
//! word boundaries of [`super::segment_words`]. Blank lines are skipped, so files can be
//! grouped with empty lines; any other line must parse, and unknown fields are errors so
//! a typo such as `"spams"` is caught rather than read as "no slots".

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::lines::read_lines;
use super::{segment_words, DataError, Example, LabeledSpan, Word};

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    intent: Option<String>,
    #[serde(default)]
    spans: Vec<Span>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Span {
    start: usize,
    end: usize,
    label: String,
}

/// Reads a JSONL file of labeled examples (the format above).
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, DataError> {
    Ok(read_numbered(path)?.into_iter().map(|(_, e)| e).collect())
}

/// Parses one example (one line of the format above) with the same validation as
/// [`read_jsonl`]; errors name `source` in place of a file, at line 1. The HTTP server
/// reads the examples of a request with it.
#[cfg_attr(not(feature = "server"), allow(dead_code))] // `data::jsonl` is crate-private
pub fn parse_example(source: &Path, json: &str) -> Result<Example, DataError> {
    parse_line(source, 1, json)
}

/// Like [`read_jsonl`], with each example's 1-based line, for errors that compare files.
pub(crate) fn read_numbered(path: &Path) -> Result<Vec<(usize, Example)>, DataError> {
    let mut out = Vec::new();
    for (i, line) in read_lines(path)?.iter().enumerate() {
        if !line.trim().is_empty() {
            out.push((i + 1, parse_line(path, i + 1, line)?));
        }
    }
    Ok(out)
}

/// Writes examples in the format [`read_jsonl`] reads; reading them back gives the same
/// text, intent and span offsets (words are re-derived with [`segment_words`]).
pub fn write_jsonl(mut w: impl Write, examples: &[Example]) -> std::io::Result<()> {
    for e in examples {
        let line = Line {
            text: std::borrow::Cow::Borrowed(&e.text),
            intent: e.intent.clone(),
            spans: e
                .spans
                .iter()
                .map(|s| Span { start: s.start, end: s.end, label: s.label.clone() })
                .collect(),
        };
        serde_json::to_writer(&mut w, &line)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

fn parse_line(path: &Path, line: usize, json: &str) -> Result<Example, DataError> {
    // serde would also read a struct from a JSON array, by position; only objects are the format.
    if !json.trim_start().starts_with('{') {
        let column = json.len() - json.trim_start().len() + 1;
        let message = "expected a JSON object {\"text\": ...}".to_string();
        return Err(DataError::Json { path: path.into(), line, column, message });
    }
    let raw: Line = serde_json::from_str(json).map_err(|e| DataError::json(path, line, &e))?;
    let text = raw.text.into_owned();
    let words = segment_words(&text);
    let len = text.chars().count();
    let mut spans = raw
        .spans
        .into_iter()
        .map(|s| check_span(path, line, &text, len, &words, s))
        .collect::<Result<Vec<_>, _>>()?;
    spans.sort_by_key(|s| (s.start, s.end));
    if let Some(pair) = spans.windows(2).find(|p| p[1].start < p[0].end) {
        let (a, b) = (&pair[0], &pair[1]);
        return Err(DataError::SpanOverlap {
            path: path.into(),
            line,
            a_start: a.start,
            a_end: a.end,
            b_start: b.start,
            b_end: b.end,
        });
    }
    Ok(Example { text, words, intent: raw.intent, spans })
}

/// Validates one span and finds its words.
fn check_span(
    path: &Path,
    line: usize,
    text: &str,
    len: usize,
    words: &[Word],
    s: Span,
) -> Result<LabeledSpan, DataError> {
    let (start, end) = (s.start, s.end);
    let p = path.to_path_buf();
    if start > len || end > len {
        return Err(DataError::SpanOutside { path: p, line, start, end, len });
    }
    if start >= end {
        return Err(DataError::SpanEmpty { path: p, line, start, end });
    }
    if s.label.trim().is_empty() {
        return Err(DataError::SpanNoLabel { path: p, line, start, end });
    }
    let not_on_word = |which| DataError::SpanNotOnWord {
        path: path.into(),
        line,
        start,
        end,
        text: super::char_slice(text, start, end).to_string(),
        which,
    };
    let word_start = words.binary_search_by_key(&start, |w| w.start).map_err(|_| not_on_word("start"))?;
    let word_end = words.binary_search_by_key(&end, |w| w.end).map_err(|_| not_on_word("end"))? + 1;
    Ok(LabeledSpan { label: s.label, word_start, word_end, start, end })
}
