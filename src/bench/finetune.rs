//! The fine-tune baseline's few-shot protocol (Hou et al. 2020's "fine-tune" row): start
//! from a joint model trained on the source domains, put fresh heads on it for the
//! episode's labels, fine-tune everything on the support set, label the queries.

use std::path::Path;

use anyhow::Result;
use clap::Args;

use crate::data::Example;
use crate::train::baseline::{JointLabels, JointModel, JointObjective, TagDecoding};
use crate::train::{self, TrainConfig, TrainableEncoder};

/// Settings of the per-episode fine-tuning (fixed in advance, never tuned on targets).
#[derive(Debug, Clone, Copy, Args, serde::Serialize)]
pub struct FinetuneSettings {
    /// Optimizer steps on each support set.
    #[arg(id = "finetune_steps", long = "finetune-steps", default_value_t = 30)]
    pub steps: u64,
    #[arg(id = "finetune_lr", long = "finetune-lr", default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(id = "finetune_batch_size", long = "finetune-batch-size", default_value_t = 16)]
    pub batch_size: usize,
    #[arg(id = "finetune_dropout", long = "finetune-dropout", default_value_t = 0.1)]
    pub dropout: f32,
    /// How slot tags are read from the fine-tuned model (see `nearspan eval --help`).
    #[arg(id = "finetune_tag_decoding", long = "tag-decoding", value_enum, default_value_t = TagDecoding::Constrained)]
    pub tag_decoding: TagDecoding,
}

/// Fine-tunes a fresh copy of `model_dir` on `support` and predicts `query` (as examples
/// aligned with the query's words, for scoring).
pub fn finetune_and_label(model_dir: &Path, support: &[Example], query: &[Example], s: &FinetuneSettings, seed: u64) -> Result<Vec<Example>> {
    let t = TrainableEncoder::load(model_dir)?;
    let labels = JointLabels::from_examples(support);
    let mut model = JointModel::with_new_heads(&t.encoder, &t.varmap, labels)?;
    model.set_tag_decoding(s.tag_decoding);
    let objective = JointObjective::new(&model, support.to_vec(), s.batch_size, s.dropout)?;
    let config = TrainConfig { max_steps: Some(s.steps), lr: s.lr, warmup: 0.1, seed, checkpoint_every: 0, ..Default::default() };
    train::fit(&objective, &t.varmap, &config)?;
    let preds = model.predict(query, 64)?;
    Ok(preds.iter().zip(query).map(|(p, q)| p.to_example(q)).collect())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::TagDecoding;
    use crate::cli::{BenchCommand, Cli, Command};

    #[test]
    fn fewshot_finetune_takes_a_tag_decoding_defaulting_to_constrained() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["nearspan", "bench", "fewshot", "--data", "d", "--shots", "5", "--method", "finetune"];
            argv.extend_from_slice(extra);
            let Command::Bench(BenchCommand::Fewshot(a)) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not bench fewshot")
            };
            a.finetune.tag_decoding
        };
        assert_eq!(parse(&[]), TagDecoding::Constrained);
        assert_eq!(parse(&["--tag-decoding", "argmax"]), TagDecoding::Argmax);
    }
}
