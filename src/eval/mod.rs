//! Metrics: strict span P/R/F1 (micro and per label), intent accuracy and frame
//! (sentence) accuracy.
//!
//! **Strict spans.** A predicted slot counts as a true positive only when its label and
//! both word boundaries (`word_start`, `word_end`) equal a gold slot's; each gold slot
//! matches at most once. On valid IOB2 this is exactly conlleval and seqeval (default and
//! `mode="strict"` alike). They differ only on invalid IOB2: conlleval and seqeval's
//! default mode read an `I-x` after `O` (or after another label) as the start of a span,
//! while seqeval's strict mode drops it. Our spans come from validated IOB2
//! ([`crate::data::tags_to_spans`] rejects such tags), so the cases never arise.
//! Adjacent same-label slots (`B-x B-x`) are two slots, as in both tools.
//!
//! Scores are fractions in [0, 1]. Precision (recall) is 0 when nothing was predicted
//! (nothing was gold); F1 is 0 when precision + recall is 0.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::{Example, LabeledSpan};
use crate::spans::WordSpan;

mod error;
mod files;

pub use error::EvalError;
pub use files::evaluate_files;

/// True positives, false positives and false negatives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpanCounts {
    pub tp: usize,
    pub fp: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl SpanCounts {
    pub fn scores(&self) -> Scores {
        Scores::from_counts(*self)
    }

    pub fn add(&mut self, other: SpanCounts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
    }
}

/// Precision, recall, F1, each in [0, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Scores {
    pub fn from_counts(c: SpanCounts) -> Scores {
        let ratio = |num: usize, den: usize| if den == 0 { 0.0 } else { num as f64 / den as f64 };
        let precision = ratio(c.tp, c.tp + c.fp);
        let recall = ratio(c.tp, c.tp + c.fn_);
        let sum = precision + recall;
        let f1 = if sum == 0.0 { 0.0 } else { 2.0 * precision * recall / sum };
        Scores { precision, recall, f1 }
    }
}

/// Why predicted slots were wrong, counted over all slots: each false positive falls in
/// exactly one of the first four kinds, checked in order; `missed` counts the gold slots
/// that no prediction touches at all. It tells boundary trouble from label confusion,
/// which strict F1 alone cannot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// The boundaries of a gold slot, another label.
    pub wrong_label: usize,
    /// Overlaps a gold slot of the same label, other boundaries.
    pub boundary: usize,
    /// Overlaps gold slots only of other labels, other boundaries.
    pub boundary_and_label: usize,
    /// Overlaps no gold slot.
    pub spurious: usize,
    /// Gold slots that no prediction overlaps.
    pub missed: usize,
}

impl ErrorCounts {
    pub fn add(&mut self, o: ErrorCounts) {
        self.wrong_label += o.wrong_label;
        self.boundary += o.boundary;
        self.boundary_and_label += o.boundary_and_label;
        self.spurious += o.spurious;
        self.missed += o.missed;
    }
}

/// One slot label's scores; `support` is its number of gold slots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelReport {
    #[serde(flatten)]
    pub scores: Scores,
    pub counts: SpanCounts,
    pub support: usize,
}

/// Everything [`Evaluator::report`] measures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub examples: usize,
    /// Micro-averaged over all slots.
    pub micro: Scores,
    pub counts: SpanCounts,
    /// The false positives and misses, by kind.
    pub errors: ErrorCounts,
    /// Every label seen in gold or predictions (a label only predicted has support 0).
    pub per_label: BTreeMap<String, LabelReport>,
    /// Over examples whose gold has an intent; `None` when none has.
    pub intent_accuracy: Option<f64>,
    pub intent_examples: usize,
    pub intent_correct: usize,
    /// Examples with the intent right (when gold has one) and exactly the gold slots.
    pub frame_accuracy: f64,
    pub frames_correct: usize,
}

/// Accumulates gold/prediction pairs, then reports.
#[derive(Debug, Clone, Default)]
pub struct Evaluator {
    examples: usize,
    per_label: BTreeMap<String, SpanCounts>,
    errors: ErrorCounts,
    intent_examples: usize,
    intent_correct: usize,
    frames_correct: usize,
}

impl Evaluator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores `pred` against `gold`; both must have the same text and words, since slots
    /// are compared by word boundaries.
    pub fn add(&mut self, gold: &Example, pred: &Example) -> Result<(), EvalError> {
        let example = self.examples + 1;
        if gold.text != pred.text {
            return Err(EvalError::TextMismatch {
                example,
                gold: gold.text.clone(),
                pred: pred.text.clone(),
            });
        }
        if gold.words != pred.words {
            return Err(EvalError::WordsMismatch { example, text: gold.text.clone() });
        }
        self.examples += 1;
        let slots_exact = self.add_spans(&gold.spans, &pred.spans);
        let intent_ok = match &gold.intent {
            None => true,
            Some(g) => {
                self.intent_examples += 1;
                let ok = pred.intent.as_ref() == Some(g);
                self.intent_correct += usize::from(ok);
                ok
            }
        };
        self.frames_correct += usize::from(intent_ok && slots_exact);
        Ok(())
    }

    /// Matches slots one to one; returns whether the prediction had exactly the gold slots.
    fn add_spans(&mut self, gold: &[LabeledSpan], pred: &[LabeledSpan]) -> bool {
        let key = |s: &LabeledSpan| (s.word_start, s.word_end, s.label.clone());
        let mut unmatched: Vec<_> = gold.iter().map(key).collect();
        let mut exact = true;
        for p in pred {
            let hit = unmatched.iter().position(|g| *g == key(p));
            let counts = self.per_label.entry(p.label.clone()).or_default();
            match hit {
                Some(i) => {
                    unmatched.swap_remove(i);
                    counts.tp += 1;
                }
                None => {
                    counts.fp += 1;
                    exact = false;
                    self.errors.add(false_positive_kind(p, gold));
                }
            }
        }
        for (start, end, label) in unmatched {
            let gold_words = WordSpan { start, end };
            let touched = pred.iter().any(|p| p.words().overlaps(&gold_words));
            self.errors.missed += usize::from(!touched);
            self.per_label.entry(label).or_default().fn_ += 1;
            exact = false;
        }
        exact
    }

    pub fn report(&self) -> EvalReport {
        let mut counts = SpanCounts::default();
        let per_label = self
            .per_label
            .iter()
            .map(|(label, c)| {
                counts.add(*c);
                let report = LabelReport { scores: c.scores(), counts: *c, support: c.tp + c.fn_ };
                (label.clone(), report)
            })
            .collect();
        let ratio = |n: usize, d: usize| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        EvalReport {
            examples: self.examples,
            micro: counts.scores(),
            counts,
            errors: self.errors,
            per_label,
            intent_accuracy: (self.intent_examples > 0)
                .then(|| ratio(self.intent_correct, self.intent_examples)),
            intent_examples: self.intent_examples,
            intent_correct: self.intent_correct,
            frame_accuracy: ratio(self.frames_correct, self.examples),
            frames_correct: self.frames_correct,
        }
    }
}

/// The kind of a predicted slot that matches no gold slot exactly (one count set).
fn false_positive_kind(p: &LabeledSpan, gold: &[LabeledSpan]) -> ErrorCounts {
    let p_words = p.words();
    let overlaps = |g: &&LabeledSpan| g.words().overlaps(&p_words);
    let mut kind = ErrorCounts::default();
    if gold.iter().any(|g| g.words() == p_words) {
        kind.wrong_label = 1;
    } else if gold.iter().filter(overlaps).any(|g| g.label == p.label) {
        kind.boundary = 1;
    } else if gold.iter().any(|g| overlaps(&g)) {
        kind.boundary_and_label = 1;
    } else {
        kind.spurious = 1;
    }
    kind
}

/// Scores `pred[i]` against `gold[i]` for every i.
pub fn evaluate(gold: &[Example], pred: &[Example]) -> Result<EvalReport, EvalError> {
    if gold.len() != pred.len() {
        return Err(EvalError::LengthMismatch { gold: gold.len(), pred: pred.len() });
    }
    let mut evaluator = Evaluator::new();
    for (g, p) in gold.iter().zip(pred) {
        evaluator.add(g, p)?;
    }
    Ok(evaluator.report())
}
