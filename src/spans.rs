//! Candidate spans: every run of 1..=W consecutive words, and their vectors.
//!
//! Spans are on word boundaries, so a span never splits a word's sub-tokens. All
//! candidate vectors of an utterance come from one encoder pass over the whole
//! utterance: a span's vector is pooled from the contextual vectors of its sub-tokens.

use std::ops::Range;

use crate::data::Word;
use crate::encoder::{span_vector_into, EncodedText, SpanPooling};

/// Default maximum span width in words. In SNIPS train, spans of at most 10 words cover
/// 99.94% of gold slots (8 words: 99.79%; dev and test: 100%), measured by
/// `nearspan data stats ../shared/data/snips`; on the few-shot dev domains 6 and 10
/// score the same, and 10 keeps long titles reachable (BENCHMARKS.md).
pub const DEFAULT_MAX_WIDTH: usize = 10;

/// A run of words `start..end` (word indices, half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WordSpan {
    pub start: usize,
    pub end: usize,
}

impl WordSpan {
    pub fn width(&self) -> usize {
        self.end - self.start
    }

    pub fn overlaps(&self, other: &WordSpan) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Every span of 1..=`max_width` words in an utterance of `n_words`, ordered by start,
/// then width.
///
/// ```
/// use nearspan::spans::{candidate_spans, WordSpan};
/// let spans = candidate_spans(3, 2);
/// let pairs: Vec<(usize, usize)> = spans.iter().map(|s| (s.start, s.end)).collect();
/// assert_eq!(pairs, [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]);
/// ```
pub fn candidate_spans(n_words: usize, max_width: usize) -> Vec<WordSpan> {
    let mut out = Vec::with_capacity(n_words * max_width.min(n_words));
    for start in 0..n_words {
        for end in start + 1..=(start + max_width).min(n_words) {
            out.push(WordSpan { start, end });
        }
    }
    out
}

/// The candidate spans of one utterance and their pooled, normalized vectors.
#[derive(Debug, Clone)]
pub struct SpanVectors {
    pub spans: Vec<WordSpan>,
    /// (spans × dim) row-major.
    pub vectors: Vec<f32>,
    pub dim: usize,
}

impl SpanVectors {
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
}

/// Pools the vectors of `spans` (word spans over `words`) from one encoded utterance.
/// Spans whose words have no sub-tokens get a zero vector (similar to nothing).
pub fn span_vectors(encoded: &EncodedText, words: &[Word], spans: Vec<WordSpan>, pooling: SpanPooling) -> SpanVectors {
    let word_tokens = encoded.tokens.align_words(words);
    let dim = pooling.dim(encoded.dim);
    let mut vectors = vec![0f32; spans.len() * dim];
    for (span, out) in spans.iter().zip(vectors.chunks_exact_mut(dim)) {
        let tokens = token_range(&word_tokens, *span);
        span_vector_into(&encoded.hidden, encoded.dim, tokens, pooling, out);
    }
    SpanVectors { spans, vectors, dim }
}

/// Start ⊕ end span vectors in factored form, for
/// [`SpanIndex::search_spans_among_factored`](nearspan_index::SpanIndex::search_spans_among_factored):
/// each distinct first and last sub-token vector once, and per span (first, last,
/// 1 / norm of the concatenation), so `pairs[i]` stands for the normalized vector that
/// [`span_vectors`] with [`SpanPooling::StartEnd`] gives span `i`.
#[derive(Debug, Clone)]
pub struct FactoredSpans {
    pub spans: Vec<WordSpan>,
    /// Distinct first sub-token vectors (row-major, hidden size wide).
    pub firsts: Vec<f32>,
    /// Distinct last sub-token vectors.
    pub lasts: Vec<f32>,
    /// Per span: (row of `firsts`, row of `lasts`, scale); scale 0 for a span without tokens.
    pub pairs: Vec<(u32, u32, f32)>,
}

impl FactoredSpans {
    pub fn queries(&self) -> nearspan_index::backend::exact::FactoredQueries<'_> {
        nearspan_index::backend::exact::FactoredQueries { firsts: &self.firsts, lasts: &self.lasts, pairs: &self.pairs }
    }
}

/// The factored start ⊕ end vectors of `spans` (see [`FactoredSpans`]).
pub fn factored_span_vectors(encoded: &EncodedText, words: &[Word], spans: Vec<WordSpan>) -> FactoredSpans {
    let word_tokens = encoded.tokens.align_words(words);
    let dim = encoded.dim;
    let row = |t: usize| &encoded.hidden[t * dim..(t + 1) * dim];
    let n_tokens = encoded.hidden.len() / dim.max(1);
    // Each token's squared norm once, not once per span that starts or ends on it.
    let sq: Vec<f32> = (0..n_tokens).map(|t| row(t).iter().map(|x| x * x).sum()).collect();
    // token -> its row in firsts / lasts
    let (mut first_of, mut last_of) = (vec![u32::MAX; n_tokens], vec![u32::MAX; n_tokens]);
    let (mut firsts, mut lasts) = (Vec::new(), Vec::new());
    let mut pairs = Vec::with_capacity(spans.len());
    for span in &spans {
        let tokens = token_range(&word_tokens, *span);
        if tokens.is_empty() {
            pairs.push((0, 0, 0.0));
            continue;
        }
        let (f, l) = (tokens.start, tokens.end - 1);
        if first_of[f] == u32::MAX {
            first_of[f] = (firsts.len() / dim) as u32;
            firsts.extend_from_slice(row(f));
        }
        if last_of[l] == u32::MAX {
            last_of[l] = (lasts.len() / dim) as u32;
            lasts.extend_from_slice(row(l));
        }
        let norm = (sq[f] + sq[l]).sqrt();
        pairs.push((first_of[f], last_of[l], if norm > 0.0 { 1.0 / norm } else { 0.0 }));
    }
    if firsts.is_empty() {
        // Only token-less spans: one zero row so that every pair points somewhere.
        firsts = vec![0.0; dim];
        lasts = vec![0.0; dim];
    }
    FactoredSpans { spans, firsts, lasts, pairs }
}

/// Sub-token range covered by a word span (empty if its words have no tokens).
pub(crate) fn token_range(word_tokens: &[Range<usize>], span: WordSpan) -> Range<usize> {
    let covered = &word_tokens[span.start..span.end];
    let start = covered.iter().find(|r| !r.is_empty()).map(|r| r.start);
    let end = covered.iter().rev().find(|r| !r.is_empty()).map(|r| r.end);
    match (start, end) {
        (Some(s), Some(e)) => s..e,
        _ => 0..0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_closed_form() {
        // n words, width w: sum over starts of min(w, n - start).
        for n in 0..15 {
            for w in 1..8 {
                let expect: usize = (0..n).map(|s| w.min(n - s)).sum();
                assert_eq!(candidate_spans(n, w).len(), expect, "n={n} w={w}");
            }
        }
    }

    #[test]
    fn token_range_skips_words_without_tokens() {
        let wt = vec![1..2, 2..2, 2..4];
        assert_eq!(token_range(&wt, WordSpan { start: 0, end: 3 }), 1..4);
        assert_eq!(token_range(&wt, WordSpan { start: 1, end: 2 }), 0..0);
    }
}
