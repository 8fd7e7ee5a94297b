//! Training: fine-tuning the encoder (and the baseline's heads) on labeled examples.
//!
//! - [`TrainableEncoder`]: the encoder with its weights as variables. Forward passes for
//!   training use [`ForwardMode::Train`]: candle-nn's fused softmax and layer norm have
//!   no backward, and gradients would silently stop there.
//! - [`Objective`]: what a step computes. [`retriever::RetrieverObjective`] is the
//!   batch-softmax span objective; [`baseline::JointObjective`] the fine-tuned baseline.
//! - [`train`]: the loop every objective shares: AdamW with warmup and linear decay,
//!   gradient clipping, seeded batch plans, evaluation for early stopping, atomic
//!   checkpoints and `--resume`.

pub mod baseline;
pub mod checkpoint;
pub mod optim;
pub mod retriever;
pub mod rng;
pub mod sampler;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::encoder::{Encoder, EncoderError};
use checkpoint::ModelContents;
use optim::{AdamW, AdamWConfig, Schedule};
use rng::Rng;

pub use crate::encoder::ForwardMode;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("{what}: {source}")]
    Candle { what: String, source: candle_core::Error },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", .path.display())]
    State { path: PathBuf, message: String },
    #[error("{0}")]
    NoData(String),
    #[error("{}: cannot resume: {message}", .path.display())]
    Resume { path: PathBuf, message: String },
    #[error("{0}")]
    Eval(String),
}

impl From<candle_core::Error> for TrainError {
    fn from(source: candle_core::Error) -> Self {
        TrainError::Candle { what: "training computation failed".into(), source }
    }
}

/// An encoder whose weights live in a [`VarMap`] (for the optimizer and for saving).
pub struct TrainableEncoder {
    pub encoder: Encoder,
    pub varmap: VarMap,
}

impl TrainableEncoder {
    /// Loads `dir` with every weight as a trainable variable.
    pub fn load(dir: &Path) -> Result<Self, EncoderError> {
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let encoder = Encoder::load_with(dir, vb)?;
        let weights = dir.join("model.safetensors");
        varmap.load(&weights).map_err(|source| EncoderError::Weights { path: weights.clone(), source })?;
        Ok(Self { encoder, varmap })
    }
}

/// What one training step computes.
pub trait Objective {
    /// Number of training examples.
    fn len(&self) -> usize;
    /// The batches of one epoch (indices of examples), drawn from `rng`.
    fn plan_epoch(&self, rng: &mut Rng) -> Vec<Vec<usize>>;
    /// The scalar loss of one batch and the number of tokens it read; `rng` is the
    /// step's own stream (for sampling inside the batch).
    fn loss(&self, batch: &[usize], rng: &mut Rng) -> Result<(Tensor, usize), TrainError>;
}

/// Settings of the loop, shared by every objective.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: f64,
    /// Stop after this many steps instead (overrides `epochs`).
    pub max_steps: Option<u64>,
    pub lr: f64,
    /// Warmup, as a fraction of all steps.
    pub warmup: f64,
    /// Gradient clipping: largest global L2 norm (0 disables).
    pub clip: f64,
    pub seed: u64,
    /// Evaluate (for early stopping) every this many steps; 0: only at the end.
    pub eval_every: u64,
    /// Write a resumable checkpoint every this many steps; 0: only at the end.
    pub checkpoint_every: u64,
    /// Stop when this many evaluations in a row did not improve the best score.
    pub patience: Option<u64>,
    pub adamw: AdamWConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1.0,
            max_steps: None,
            lr: 3e-5,
            warmup: 0.1,
            clip: 1.0,
            seed: 13,
            eval_every: 0,
            checkpoint_every: 200,
            patience: None,
            adamw: AdamWConfig::default(),
        }
    }
}

/// One step, as reported to an [`Observer`].
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: u64,
    pub total: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// Receives progress (the CLI draws a progress bar; tests ignore it).
pub trait Observer {
    fn started(&mut self, _first_step: u64, _total: u64) {}
    fn step(&mut self, _report: &StepReport) {}
    fn evaluated(&mut self, _step: u64, _score: f64, _best: bool) {}
    fn checkpointed(&mut self, _path: &Path) {}
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// One evaluation in the run's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub score: f64,
    /// Mean training loss since the previous evaluation.
    pub train_loss: Option<f64>,
}

/// What `trainer.json` holds: enough to check a resume and continue the run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: u64,
    pub total_steps: u64,
    pub config: TrainConfig,
    /// The objective's settings, as JSON; a resume must use the same.
    pub objective: serde_json::Value,
    /// Identifies the training data (count and hash of the texts and labels).
    pub data: String,
    pub best: Option<EvalPoint>,
    pub history: Vec<EvalPoint>,
    pub evals_since_best: u64,
}

/// Where a run writes, and what it starts from.
pub struct RunPaths<'a> {
    /// The model folder the run started from (config and tokenizer are copied from it).
    pub base_dir: &'a Path,
    /// Output folder: `model/` (the best or final model), `checkpoints/`.
    pub out: &'a Path,
}

impl RunPaths<'_> {
    pub fn model_dir(&self) -> PathBuf {
        self.out.join("model")
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.out.join("checkpoints")
    }
}

/// The outcome of [`train`].
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub state: TrainerState,
    pub resumed_from: Option<u64>,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// A short fingerprint of training data, so that `--resume` refuses other data.
pub fn data_fingerprint<'a>(items: impl Iterator<Item = &'a str>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut n = 0usize;
    for s in items {
        h.update(s.as_bytes());
        h.update([0u8]);
        n += 1;
    }
    let hex: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{n}:{hex}")
}

/// Runs (or, with `resume`, continues) training. `evaluate` scores the current weights
/// (higher is better) for early stopping, or returns `None` when there is nothing to
/// evaluate on; the best-scoring weights are saved as `out/model`, otherwise the final
/// ones are. `extra` files (e.g. label lists) are written into every model folder.
#[allow(clippy::too_many_arguments)]
pub fn train(
    objective: &dyn Objective,
    varmap: &VarMap,
    paths: &RunPaths,
    config: &TrainConfig,
    objective_json: serde_json::Value,
    data: String,
    extra: Vec<(&'static str, String)>,
    evaluate: &mut dyn FnMut(u64) -> Result<Option<f64>, TrainError>,
    observer: &mut dyn Observer,
    resume: bool,
) -> Result<TrainSummary, TrainError> {
    let started = Instant::now();
    let contents = ModelContents { base_dir: paths.base_dir, varmap, extra };
    let mut named: Vec<(String, candle_core::Var)> =
        varmap.data().lock().expect("varmap lock poisoned").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut optimizer = AdamW::new(named, config.adamw)?;

    let steps_per_epoch = objective.plan_epoch(&mut Rng::derive(config.seed, 0)).len().max(1) as u64;
    let total = config.max_steps.unwrap_or_else(|| (config.epochs * steps_per_epoch as f64).ceil().max(1.0) as u64);
    let schedule = Schedule { peak: config.lr, warmup: (config.warmup * total as f64).round() as u64, total };
    let mut state = TrainerState {
        step: 0,
        total_steps: total,
        config: config.clone(),
        objective: objective_json,
        data,
        best: None,
        history: Vec::new(),
        evals_since_best: 0,
    };

    let mut resumed_from = None;
    if resume {
        if let Some(ck) = checkpoint::latest_checkpoint(&paths.checkpoints_dir())? {
            let saved: TrainerState = serde_json::from_str(&ck.trainer_json).map_err(|e| TrainError::Resume {
                path: ck.dir.join(checkpoint::TRAINER_FILE),
                message: e.to_string(),
            })?;
            let mismatch = |what: &str| TrainError::Resume {
                path: ck.dir.clone(),
                message: format!("it was made with other {what}; use the same settings, or a new --out to start over"),
            };
            // How often checkpoints are written does not change the run; all else must match.
            let same_run = TrainConfig { checkpoint_every: saved.config.checkpoint_every, ..config.clone() };
            if saved.config != same_run {
                return Err(mismatch("training settings"));
            }
            if saved.objective != state.objective {
                return Err(mismatch("objective settings"));
            }
            if saved.data != state.data {
                return Err(mismatch("training data"));
            }
            checkpoint::restore_weights(varmap, &ck.weights, &ck.dir)?;
            optimizer
                .load_state(ck.optimizer, saved.step)
                .map_err(|message| TrainError::Resume { path: ck.dir.join(checkpoint::OPTIMIZER_FILE), message })?;
            resumed_from = Some(saved.step);
            state = TrainerState { config: config.clone(), ..saved };
        }
    }

    let save_checkpoint = |state: &TrainerState, optimizer: &AdamW, observer: &mut dyn Observer| -> Result<(), TrainError> {
        let json = serde_json::to_string_pretty(state).expect("trainer state serializes");
        let path = checkpoint::save_checkpoint(&paths.checkpoints_dir(), state.step, &contents, optimizer.state_tensors()?, &json, 2)?;
        observer.checkpointed(&path);
        Ok(())
    };
    // Scores the current weights; saves them as the model when they are the best so far.
    let mut run_eval = |state: &mut TrainerState, train_loss: Option<f64>, observer: &mut dyn Observer| -> Result<bool, TrainError> {
        let Some(score) = evaluate(state.step)? else { return Ok(false) };
        let point = EvalPoint { step: state.step, score, train_loss };
        let better = state.best.as_ref().is_none_or(|b| score > b.score);
        if better {
            save_model_folder_checked(paths, &contents)?;
            state.best = Some(point.clone());
            state.evals_since_best = 0;
        } else {
            state.evals_since_best += 1;
        }
        state.history.push(point);
        observer.evaluated(state.step, score, better);
        Ok(true)
    };

    observer.started(state.step, total);
    if resumed_from.is_none() && config.eval_every > 0 {
        // The starting point competes too: training that never helps keeps the original.
        run_eval(&mut state, None, observer)?;
    }
    let mut plan: Option<(u64, Vec<Vec<usize>>)> = None;
    let (mut loss_sum, mut loss_n, mut tokens_total) = (0f64, 0u64, 0usize);
    let mut stopped_early = false;
    while state.step < total {
        let epoch = state.step / steps_per_epoch;
        if plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
            plan = Some((epoch, objective.plan_epoch(&mut Rng::derive(config.seed, epoch))));
        }
        let batches = &plan.as_ref().expect("plan set above").1;
        let batch = &batches[(state.step % steps_per_epoch) as usize % batches.len().max(1)];
        let report = take_step(objective, batch, &mut optimizer, &schedule, config, state.step, total)?;
        state.step += 1;
        loss_sum += report.loss as f64;
        loss_n += 1;
        tokens_total += report.tokens;
        observer.step(&report);

        let last = state.step == total;
        if (config.eval_every > 0 && state.step % config.eval_every == 0) || last {
            let mean = (loss_n > 0).then(|| loss_sum / loss_n as f64);
            if run_eval(&mut state, mean, observer)? {
                (loss_sum, loss_n) = (0.0, 0);
            }
            if config.patience.is_some_and(|p| state.evals_since_best > p) {
                stopped_early = true;
            }
        }
        if (config.checkpoint_every > 0 && state.step % config.checkpoint_every == 0) || last || stopped_early {
            save_checkpoint(&state, &optimizer, observer)?;
        }
        if stopped_early {
            break;
        }
    }
    if state.best.is_none() {
        // Nothing to evaluate on: the final weights are the model.
        save_model_folder_checked(paths, &contents)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainSummary { state, resumed_from, seconds, tokens_per_s: tokens_total as f64 / seconds.max(1e-9) })
}

/// One optimizer step on `batch` (the `step`-th of the run, 0-based).
fn take_step(
    objective: &dyn Objective,
    batch: &[usize],
    optimizer: &mut AdamW,
    schedule: &Schedule,
    config: &TrainConfig,
    step: u64,
    total: u64,
) -> Result<StepReport, TrainError> {
    let t0 = Instant::now();
    let mut step_rng = Rng::derive(config.seed, 1 << 40 | step);
    // Dropout masks from the step's own seed: a resumed run draws the same masks.
    crate::encoder::ops::set_dropout_seed(Rng::derive(config.seed, 2 << 40 | step).next_u64());
    let (loss, tokens) = objective.loss(batch, &mut step_rng)?;
    let loss_value = loss.to_scalar::<f32>()?;
    if !loss_value.is_finite() {
        return Err(TrainError::Eval(format!("the loss became {loss_value} at step {step}; lower --lr")));
    }
    let grads = loss.backward()?;
    let lr = schedule.lr(step);
    let grad_norm = optimizer.step(&grads, lr, config.clip)?;
    Ok(StepReport { step: step + 1, total, loss: loss_value, lr, grad_norm, tokens, seconds: t0.elapsed().as_secs_f64() })
}

/// Trains in memory, with no evaluation and nothing written: for short runs such as
/// fine-tuning on one few-shot episode. Returns the loss of every step.
pub fn fit(objective: &dyn Objective, varmap: &VarMap, config: &TrainConfig) -> Result<Vec<f32>, TrainError> {
    let named: Vec<(String, candle_core::Var)> =
        varmap.data().lock().expect("varmap lock poisoned").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut optimizer = AdamW::new(named, config.adamw)?;
    let steps_per_epoch = objective.plan_epoch(&mut Rng::derive(config.seed, 0)).len().max(1) as u64;
    let total = config.max_steps.unwrap_or_else(|| (config.epochs * steps_per_epoch as f64).ceil().max(1.0) as u64);
    let schedule = Schedule { peak: config.lr, warmup: (config.warmup * total as f64).round() as u64, total };
    let mut losses = Vec::with_capacity(total as usize);
    let mut plan = Vec::new();
    for step in 0..total {
        let epoch = step / steps_per_epoch;
        if step % steps_per_epoch == 0 {
            plan = objective.plan_epoch(&mut Rng::derive(config.seed, epoch));
        }
        let batch = &plan[(step % steps_per_epoch) as usize % plan.len().max(1)];
        losses.push(take_step(objective, batch, &mut optimizer, &schedule, config, step, total)?.loss);
    }
    Ok(losses)
}

fn save_model_folder_checked(paths: &RunPaths, contents: &ModelContents) -> Result<(), TrainError> {
    checkpoint::save_model_folder(&paths.model_dir(), contents)
}
