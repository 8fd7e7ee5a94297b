//! Scoring a prediction file against a gold file, both nearspan JSONL, line by line.

use std::path::Path;

use super::{EvalError, EvalReport, Evaluator};
use crate::data::jsonl::read_numbered;

/// Reads both files with [`crate::data::read_jsonl`] and scores the i-th prediction against
/// the i-th gold example (blank lines skipped in both). Errors name both files and lines
/// when the counts or the texts do not line up.
pub fn evaluate_files(gold: &Path, pred: &Path) -> Result<EvalReport, EvalError> {
    let gold_examples = read_numbered(gold)?;
    let pred_examples = read_numbered(pred)?;
    if gold_examples.len() != pred_examples.len() {
        return Err(EvalError::CountMismatch {
            gold: gold.into(),
            gold_count: gold_examples.len(),
            pred: pred.into(),
            pred_count: pred_examples.len(),
        });
    }
    let mut evaluator = Evaluator::new();
    for ((gold_line, g), (pred_line, p)) in gold_examples.iter().zip(&pred_examples) {
        if g.text != p.text {
            return Err(EvalError::LineMismatch {
                gold: gold.into(),
                gold_line: *gold_line,
                gold_text: g.text.clone(),
                pred: pred.into(),
                pred_line: *pred_line,
                pred_text: p.text.clone(),
            });
        }
        evaluator.add(g, p)?;
    }
    Ok(evaluator.report())
}
