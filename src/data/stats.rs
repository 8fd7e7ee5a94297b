//! Dataset statistics, chiefly to choose the maximum span width: candidate spans grow
//! linearly with it, and [`SplitStats::width_coverage`] shows how many gold slots a
//! given width would make unreachable. [`SplitStats::repeated_label_spans`] likewise
//! says what `--decoder greedy-unique-labels` (each label once per utterance) would cost.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Dataset, Split};

/// Widths (in words) reported in [`SplitStats::width_coverage`]: 1 up to this.
pub const COVERAGE_MAX_WIDTH: usize = 12;

#[derive(Debug, Clone, Serialize)]
pub struct DatasetStats {
    pub format: String,
    pub splits: Vec<SplitStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitStats {
    pub name: String,
    pub examples: usize,
    pub words: usize,
    /// The longest example, in words.
    pub max_words: usize,
    pub spans: usize,
    pub examples_with_intent: usize,
    pub intents: BTreeMap<String, usize>,
    pub slot_labels: BTreeMap<String, usize>,
    /// The widest gold span, in words (0 without spans).
    pub max_span_width: usize,
    /// For each width w in 1..=[`COVERAGE_MAX_WIDTH`], the gold spans no wider than w.
    pub width_coverage: Vec<WidthCoverage>,
    /// Examples with two or more gold spans of one label.
    pub examples_with_a_repeated_label: usize,
    /// Gold spans beyond the first of their label in their example: the slots a decoder
    /// that keeps each label once per utterance can never find.
    pub repeated_label_spans: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WidthCoverage {
    pub max_width: usize,
    pub spans: usize,
    /// `spans` / all spans of the split; 1 when the split has no spans (nothing is missed).
    pub fraction: f64,
}

/// Counts for every split of `dataset`.
pub fn stats(dataset: &Dataset) -> DatasetStats {
    DatasetStats {
        format: dataset.format.to_string(),
        splits: dataset.splits.iter().map(split_stats).collect(),
    }
}

fn split_stats(split: &Split) -> SplitStats {
    let mut s = SplitStats {
        name: split.name.clone(),
        examples: split.examples.len(),
        words: 0,
        max_words: 0,
        spans: 0,
        examples_with_intent: 0,
        intents: BTreeMap::new(),
        slot_labels: BTreeMap::new(),
        max_span_width: 0,
        width_coverage: Vec::new(),
        examples_with_a_repeated_label: 0,
        repeated_label_spans: 0,
    };
    let mut widths = vec![0usize; COVERAGE_MAX_WIDTH + 1];
    for e in &split.examples {
        s.words += e.words.len();
        s.max_words = s.max_words.max(e.words.len());
        if let Some(intent) = &e.intent {
            s.examples_with_intent += 1;
            *s.intents.entry(intent.clone()).or_default() += 1;
        }
        let repeats = e.spans.iter().enumerate().filter(|(i, a)| e.spans[..*i].iter().any(|b| b.label == a.label)).count();
        s.repeated_label_spans += repeats;
        s.examples_with_a_repeated_label += usize::from(repeats > 0);
        for span in &e.spans {
            let width = span.word_end.saturating_sub(span.word_start);
            s.spans += 1;
            s.max_span_width = s.max_span_width.max(width);
            *s.slot_labels.entry(span.label.clone()).or_default() += 1;
            if width <= COVERAGE_MAX_WIDTH {
                widths[width] += 1;
            }
        }
    }
    s.width_coverage = coverage(&widths, s.spans);
    s
}

/// Cumulative counts of the per-width histogram.
fn coverage(widths: &[usize], total: usize) -> Vec<WidthCoverage> {
    let mut covered = widths[0];
    (1..=COVERAGE_MAX_WIDTH)
        .map(|w| {
            covered += widths[w];
            let fraction = if total == 0 { 1.0 } else { covered as f64 / total as f64 };
            WidthCoverage { max_width: w, spans: covered, fraction }
        })
        .collect()
}
