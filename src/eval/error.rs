//! Errors from scoring predictions against gold data.

use std::path::PathBuf;

use crate::data::DataError;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(
        "example {example}: gold text {gold:?} != predicted text {pred:?}; predictions must be in gold order"
    )]
    TextMismatch { example: usize, gold: String, pred: String },
    #[error("example {example}: gold and predicted words differ for {text:?}; build predictions on the gold words")]
    WordsMismatch { example: usize, text: String },
    #[error("{gold} gold examples but {pred} predictions")]
    LengthMismatch { gold: usize, pred: usize },
    #[error(
        "{}: {gold_count} examples but {}: {pred_count}; predictions must have one line per gold example",
        .gold.display(), .pred.display()
    )]
    CountMismatch { gold: PathBuf, gold_count: usize, pred: PathBuf, pred_count: usize },
    #[error(
        "{}: line {gold_line} and {}: line {pred_line} differ: gold text {gold_text:?}, predicted {pred_text:?}; \
         predictions must be in gold order",
        .gold.display(), .pred.display()
    )]
    LineMismatch {
        gold: PathBuf,
        gold_line: usize,
        gold_text: String,
        pred: PathBuf,
        pred_line: usize,
        pred_text: String,
    },
}
