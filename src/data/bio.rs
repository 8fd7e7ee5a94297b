//! IOB2 ("BIO") tags ↔ spans.
//!
//! Every span starts with `B-<label>` and continues with `I-<label>`; `O` is outside.
//! Two adjacent same-label spans are `B-x B-x`, so they stay two spans.
//!
//! **Strict.** An `I-x` that follows `O`, or follows a span of another label, is an
//! error ([`BioError::InsideWithoutBegin`]), not silently repaired. conlleval and
//! seqeval's default mode would read it as the start of a new span; we reject it
//! because in gold data it means a corrupted line, and repairing it would make the
//! tags → spans → tags round trip lossy. Every shipped file (ATIS, SNIPS, CoNLL-2003,
//! the 14 few-shot files) has no such tag, so nothing needs repairing.

use super::{BioError, LabeledSpan, Word};

/// Turns one IOB2 tag per word into spans (sorted, non-overlapping).
pub fn tags_to_spans<S: AsRef<str>>(tags: &[S], words: &[Word]) -> Result<Vec<LabeledSpan>, BioError> {
    if tags.len() != words.len() {
        return Err(BioError::LengthMismatch { tags: tags.len(), words: words.len() });
    }
    let mut spans: Vec<LabeledSpan> = Vec::new();
    let mut open = false;
    for (i, tag) in tags.iter().map(AsRef::as_ref).enumerate() {
        match parse_tag(tag, i)? {
            Tag::Outside => open = false,
            Tag::Begin(label) => {
                spans.push(new_span(label, i, words));
                open = true;
            }
            Tag::Inside(label) => match spans.last_mut() {
                Some(s) if open && s.label == label => {
                    s.word_end = i + 1;
                    s.end = words[i].end;
                }
                _ => {
                    let prev = if i == 0 { "the start" } else { tags[i - 1].as_ref() };
                    return Err(BioError::InsideWithoutBegin {
                        tag: tag.to_string(),
                        prev: prev.to_string(),
                        word: i + 1,
                    });
                }
            },
        }
    }
    Ok(spans)
}

/// Turns spans back into one IOB2 tag per word; words no span covers get `O`.
/// Spans reaching past `n_words` are cut at the end.
pub fn spans_to_tags(n_words: usize, spans: &[LabeledSpan]) -> Vec<String> {
    let mut tags = vec!["O".to_string(); n_words];
    for s in spans {
        for (k, tag) in tags.iter_mut().enumerate().take(s.word_end).skip(s.word_start) {
            let prefix = if k == s.word_start { "B-" } else { "I-" };
            *tag = format!("{prefix}{}", s.label);
        }
    }
    tags
}

enum Tag<'a> {
    Outside,
    Begin(&'a str),
    Inside(&'a str),
}

fn parse_tag(tag: &str, i: usize) -> Result<Tag<'_>, BioError> {
    let bad = || BioError::BadTag { tag: tag.to_string(), word: i + 1 };
    if tag == "O" {
        return Ok(Tag::Outside);
    }
    let (kind, label) = match (tag.strip_prefix("B-"), tag.strip_prefix("I-")) {
        (Some(l), _) => (true, l),
        (_, Some(l)) => (false, l),
        _ => return Err(bad()),
    };
    if label.is_empty() {
        return Err(bad());
    }
    Ok(if kind { Tag::Begin(label) } else { Tag::Inside(label) })
}

fn new_span(label: &str, i: usize, words: &[Word]) -> LabeledSpan {
    LabeledSpan {
        label: label.to_string(),
        word_start: i,
        word_end: i + 1,
        start: words[i].start,
        end: words[i].end,
    }
}
