//! `nearspan train retriever|baseline`: arguments, data selection, progress display.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::{load_examples, BuildArgs, ModelArg};
use crate::bench::fewshot::{dev_score, load_domain, DOMAINS};
use crate::data::Example;
use crate::encoder::SpanPooling;
use crate::eval::Evaluator;
use crate::train::baseline::{JointLabels, JointModel, JointObjective, LABELS_FILE};
use crate::train::optim::AdamWConfig;
use crate::train::retriever::{LabelScope, RetrieverLoss, RetrieverObjective};
use crate::train::{self, Observer, RunPaths, StepReport, TrainConfig, TrainError, TrainSummary, TrainableEncoder};

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Fine-tune the encoder so that spans (and utterances) with the same label lie close
    /// together: the retrieval model (batch-softmax objective of Yu et al. 2021).
    Retriever(RetrieverArgs),
    /// Fine-tune the JointBERT-style baseline: intent on [CLS], BIO slots on each word's
    /// first sub-token.
    Baseline(BaselineArgs),
    /// Fit a span detector (is this span a slot of any label?) on a model's frozen
    /// vectors; `--detector FILE` then lets it join retrieval's slot decisions.
    Detector(DetectorArgs),
    /// Fit a slot scorer (which spans are slots, from their retrieval evidence) on
    /// labeled examples that are not in the index; `--scorer FILE` then makes the slot
    /// decisions in query, eval and serve.
    Scorer(ScorerArgs),
}

/// Settings of the training loop, shared by both models.
#[derive(Debug, Args)]
pub struct LoopArgs {
    /// Output folder: model/ (the best model on dev, else the last), checkpoints/, training.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its latest checkpoint (same settings and data).
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Stop after this many steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 3e-5)]
    pub lr: f64,
    /// Warmup as a fraction of all steps, then linear decay to 0.
    #[arg(long, default_value_t = 0.1)]
    pub warmup: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay: each encoder layer trains at this times the rate
    /// of the layer above it, the embeddings below the lowest (1: all at --lr).
    #[arg(long, default_value_t = 1.0)]
    pub layer_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 13)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f32,
    /// Evaluate on dev every N steps and keep the best model (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Stop after N evaluations without improvement.
    #[arg(long)]
    pub patience: Option<u64>,
    /// Write a resumable checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
}

impl LoopArgs {
    fn config(&self) -> Result<TrainConfig> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.warmup) {
            bail!("--warmup is a fraction of the steps, in 0..1; got {}", self.warmup);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("--dropout must be in 0..1, got {}", self.dropout);
        }
        if !(self.epochs > 0.0) {
            bail!("--epochs must be positive");
        }
        let decay_ok = self.layer_decay > 0.0 && self.layer_decay <= 1.0; // false for NaN
        if !decay_ok {
            bail!("--layer-decay must be in (0, 1], got {}", self.layer_decay);
        }
        Ok(TrainConfig {
            epochs: self.epochs,
            max_steps: self.max_steps,
            lr: self.lr,
            warmup: self.warmup,
            clip: self.clip,
            seed: self.seed,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            patience: self.patience,
            adamw: AdamWConfig { weight_decay: self.weight_decay, layer_decay: self.layer_decay, ..Default::default() },
        })
    }

    /// Refuses to overwrite a finished or interrupted run unless asked to resume it.
    fn check_out(&self) -> Result<()> {
        let ck = self.out.join("checkpoints");
        if !self.resume && ck.exists() {
            bail!(
                "{} already holds a training run; pass --resume to continue it, or choose another --out",
                self.out.display()
            );
        }
        Ok(())
    }
}

/// Which labeled examples a model is fitted on.
#[derive(Debug, Args)]
pub struct SourceData {
    /// Training data (any supported format), e.g. ../shared/data/snips.
    #[arg(long)]
    pub data: PathBuf,
    /// Which split of --data (default: train).
    #[arg(long)]
    pub split: Option<String>,
    /// Leave out examples of these intents (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_intents: Vec<String>,
}

impl SourceData {
    /// The examples of --split (default train), without the intents in --exclude-intents
    /// and `more_left_out`; also returns every intent left out.
    fn load(&self, more_left_out: &[String]) -> Result<(Vec<Example>, Vec<String>)> {
        let mut left_out = self.exclude_intents.clone();
        left_out.extend(more_left_out.iter().cloned());
        let examples = load_examples(&self.data, self.split.as_deref(), "train")?;
        Ok((exclude(examples, &left_out, &self.data)?, left_out))
    }
}

#[derive(Debug, Args)]
pub struct RetrieverArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub source: SourceData,
    /// SNIPS few-shot protocol (Hou et al. 2020): fold N's target domain and its dev
    /// domain N+1 are left out of training, and dev episodes of domain N+1 decide early
    /// stopping. Needs --episodes.
    #[arg(long, requires = "episodes", value_parser = clap::value_parser!(u32).range(1..=7))]
    pub fold: Option<u32>,
    /// The snips_fewshot folder (for --fold).
    #[arg(long)]
    pub episodes: Option<PathBuf>,
    /// Shots of the dev episodes (for --fold).
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    /// Dev episodes scored at each evaluation (for --fold).
    #[arg(long, default_value_t = 20)]
    pub dev_episodes: usize,
    /// Cosine similarities are multiplied by this in the softmax (1 / temperature).
    #[arg(long, default_value_t = 20.0)]
    pub scale: f32,
    /// Random non-slot spans per utterance that take part as label O.
    #[arg(long, default_value_t = 2)]
    pub o_spans: usize,
    /// Non-slot spans only compete: slot spans are pushed away from them, but they are
    /// not drawn towards each other (by default they are, as one more label).
    #[arg(long)]
    pub o_not_anchors: bool,
    /// Weight of the utterance-level intent loss (0: slots only).
    #[arg(long, default_value_t = 1.0)]
    pub intent_weight: f32,
    /// Examples drawn per label when a batch is built (at least 2).
    #[arg(long, default_value_t = 4)]
    pub per_label: usize,
    /// Whether slot labels of the same name are one label across intents (shared) or
    /// one per intent (intent).
    #[arg(long, value_enum, default_value_t = LabelScope::Shared)]
    pub label_scope: LabelScope,
    #[command(flatten)]
    pub build: BuildArgs,
    #[command(flatten)]
    pub run: LoopArgs,
}

#[derive(Debug, Args)]
pub struct BaselineArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Training data (any supported format), e.g. ../shared/data/atis.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Split of --data for model selection (intent accuracy + slot F1); "none" to skip.
    #[arg(long, default_value = "dev")]
    pub dev_split: String,
    /// Leave out examples of these intents (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_intents: Vec<String>,
    #[command(flatten)]
    pub run: LoopArgs,
}

#[derive(Debug, Args)]
pub struct DetectorArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub source: SourceData,
    /// SNIPS few-shot fold N: leave out its target domain and its dev domain N+1.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=7))]
    pub fold: Option<u32>,
    /// Maximum span width in words (the width retrieval uses).
    #[arg(long, default_value_t = crate::spans::DEFAULT_MAX_WIDTH, value_parser = clap::value_parser!(u32).range(1..=64).map(|v| v as usize))]
    pub max_width: usize,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Width of the detector's hidden layer (small: wider ones fit the source domains
    /// better and carry to new ones worse, BENCHMARKS.md).
    #[arg(long, default_value_t = 8)]
    pub hidden: usize,
    /// Utterances per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Start from this detector and go on fitting it on --data: adapts a detector fitted
    /// on broad data to your own examples (e.g. `--epochs 20 --batch 4` on a few dozen).
    /// It keeps its own --hidden and --max-width.
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Fit this many detectors, with seeds --seed, --seed + 1, ..., and write one whose
    /// logit is their mean (hidden layer N × --hidden wide).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16).map(|v| v as usize), conflicts_with = "init")]
    pub ensemble: usize,
    /// Which token vectors it reads: `middle` (after half the encoder's layers: 3 of
    /// the default encoder's 6; on the few-shot SNIPS dev domains this finds slot
    /// boundaries better than the last layer, BENCHMARKS.md), `last`, or a number of layers
    /// (0: the embeddings). An ensemble of encoders gives `last` only. A detector given
    /// as --init keeps its own.
    #[arg(long, default_value = "middle", conflicts_with = "init")]
    pub layer: DetectorLayer,
    /// Also read the mean of each span's own token vectors, not only the tokens at and
    /// around its edges. A detector given as --init keeps its own.
    #[arg(long, conflicts_with = "init")]
    pub inside: bool,
    /// How many tokens it reads on each side of a span (the nearest one by default). A
    /// detector given as --init keeps its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=crate::detector::MAX_CONTEXT as i64).map(|v| v as usize), conflicts_with = "init")]
    pub context: usize,
    /// Also report how well it finds the slots (any label, strict boundaries) of these
    /// intents' examples in --data, e.g. the dev domain (comma-separated; excluded from fitting).
    #[arg(long, value_delimiter = ',')]
    pub eval_intents: Vec<String>,
    /// Where to write it (JSON), e.g. span_detector.json beside the model's weights.
    #[arg(long)]
    pub out: PathBuf,
}

/// `train detector --layer`: which encoder layer's token vectors a new detector reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorLayer {
    Last,
    Middle,
    After(usize),
}

impl std::str::FromStr for DetectorLayer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "last" => Ok(Self::Last),
            "middle" => Ok(Self::Middle),
            n => n.parse().map(Self::After).map_err(|_| format!("{n:?} is not a layer; expected \"middle\", \"last\" or a number of layers")),
        }
    }
}

impl DetectorLayer {
    /// The layer to keep for an encoder of `n_layers` layers (`None`: the last hidden
    /// state, which every encoding has anyway).
    pub fn resolve(self, n_layers: usize) -> Option<usize> {
        match self {
            Self::Last => None,
            Self::Middle => Some(n_layers / 2),
            Self::After(n) if n == n_layers => None,
            Self::After(n) => Some(n),
        }
    }
}

#[derive(Debug, Args)]
pub struct ScorerArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The index the scorer will decide for.
    #[arg(long)]
    pub index: PathBuf,
    /// Labeled examples the index does not hold (retrieving an indexed example finds
    /// itself, which teaches the scorer nothing; those whose text is in the index are
    /// left out): a JSONL file or a dataset folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Split of a dataset folder (default: dev).
    #[arg(long)]
    pub split: Option<String>,
    /// Retrieval settings as at query time (--k, --prefilter, --detector, ...); the
    /// hand-set rule's settings (--threshold, ...) are only the comparison printed.
    #[command(flatten)]
    pub settings: super::QuerySettings,
    /// Where to write it (JSON).
    #[arg(long)]
    pub out: PathBuf,
}

pub(crate) fn run(cmd: TrainCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        TrainCommand::Retriever(a) => retriever(a, out),
        TrainCommand::Baseline(a) => baseline(a, out),
        TrainCommand::Detector(a) => detector(a, out),
        TrainCommand::Scorer(a) => scorer(a, out),
    }
}

fn scorer(a: ScorerArgs, out: &mut dyn Write) -> Result<()> {
    use crate::labeler;
    use crate::scorer::{Labeled, ScorerFit, SlotScorer};
    if a.settings.scorer.is_some() {
        bail!("train scorer: --scorer is what it writes; give --out instead");
    }
    let cfg = a.settings.config()?;
    let mut encoder = a.model.load()?;
    let mut index = super::open_index(&a.index, &encoder)?;
    a.settings.apply(&mut index);
    let build = super::build_config(&index)?;
    let all = load_examples(&a.data, a.split.as_deref(), "dev")?;
    // An indexed example retrieves itself (similarity 1 with its own labels), which
    // teaches the scorer nothing true: such examples (duplicates across splits are
    // common) are left out, and the rest must not be empty.
    let indexed: std::collections::HashSet<&str> =
        (0..index.n_examples() as u32).map(|i| index.example(nearspan_index::ExampleId(i)).text.as_str()).collect();
    let (inside, data): (Vec<Example>, Vec<Example>) = all.into_iter().partition(|e| indexed.contains(e.text.as_str()));
    if data.is_empty() {
        bail!(
            "{}: all {} of its examples are in the index {}; fit the scorer on labeled examples the index does not hold",
            a.data.display(),
            inside.len(),
            a.index.display()
        );
    }
    let detector = a.settings.load_detector(&mut encoder)?;
    let retrieved = labeler::retrieve(&encoder, &index, &data, &build, &cfg, detector.as_ref())?;
    let labeled: Vec<Labeled> = data.iter().zip(&retrieved).map(|(ex, r)| Labeled::new(r, ex, &index)).collect();
    let mut scorer = SlotScorer::fit(&labeled, &ScorerFit::default())
        .with_context(|| format!("{}: fitting the slot scorer", a.data.display()))?;
    let f1 = |scorer: Option<&SlotScorer>| -> Result<f64> {
        let mut ev = Evaluator::new();
        for (ex, r) in data.iter().zip(&retrieved) {
            ev.add(ex, &labeler::decide_with(&index, ex, r, &cfg, scorer).to_example(ex))?;
        }
        Ok(100.0 * ev.report().micro.f1)
    };
    let fitted_f1 = scorer.choose_min_logit(|s| f1(Some(s)))?;
    scorer.save(&a.out)?;
    let hand_set = f1(None)?;
    writeln!(
        out,
        "slot scorer: {} examples ({} left out: their text is in the index); slot F1 on them {:.2} (hand-set rule at the given settings: {hand_set:.2}); lowest logit {:.1}; wrote {}",
        data.len(),
        inside.len(),
        fitted_f1,
        scorer.min_logit,
        a.out.display()
    )?;
    if hand_set >= fitted_f1 {
        writeln!(
            out,
            "note: the hand-set rule does as well or better on these examples; the scorer has paid off where its examples and the queries come from different domains (BENCHMARKS.md)"
        )?;
    }
    Ok(())
}

fn detector(a: DetectorArgs, out: &mut dyn Write) -> Result<()> {
    use crate::detector::{FitConfig, SpanDetector};
    if a.epochs == 0 || a.hidden == 0 || a.batch == 0 || !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--epochs, --hidden and --batch must be at least 1 and --lr a positive number");
    }
    let mut encoder = a.model.load()?;
    let mut more_left_out = a.fold.map(fold_domains).unwrap_or_default();
    more_left_out.extend(a.eval_intents.iter().cloned());
    let (examples, _) = a.source.load(&more_left_out)?;
    let held_out: Vec<Example> = match a.eval_intents.is_empty() {
        true => Vec::new(),
        false => load_examples(&a.source.data, a.source.split.as_deref(), "train")?
            .into_iter()
            .filter(|e| e.intent.as_ref().is_some_and(|i| a.eval_intents.contains(i)))
            .collect(),
    };
    let started = std::time::Instant::now();
    let init = match &a.init {
        Some(path) => Some(SpanDetector::load(path, encoder.info().hidden_size)?),
        None => None,
    };
    let layer = match &init {
        Some(d) => d.layer,
        None => a.layer.resolve(encoder.n_layers()),
    };
    encoder.set_tap_layer(layer)?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let encoded = encoder.encode(&texts, crate::encoder::DEFAULT_BATCH_SIZE)?;
    // A detector to adapt keeps its own shape.
    let (max_width, hidden) = init.as_ref().map_or((a.max_width, a.hidden), |d| (d.max_width, d.hidden));
    let (members, reports): (Vec<SpanDetector>, Vec<_>) = (a.seed..)
        .take(a.ensemble)
        .map(|seed| {
            let cfg = FitConfig { max_width, epochs: a.epochs, lr: a.lr, seed, hidden, batch: a.batch, layer, inside: a.inside, context: a.context };
            SpanDetector::fit_from(init.as_ref(), &examples, &encoded, &cfg)
                .with_context(|| format!("{}: fitting the span detector", a.source.data.display()))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    // The average of one detector is that detector, weight for weight.
    let det = SpanDetector::average(&members)?;
    let report = reports.last().expect("--ensemble is at least 1");
    det.save(&a.out)?;
    let losses: Vec<String> = report.loss.iter().map(|l| format!("{l:.4}")).collect();
    writeln!(
        out,
        "span detector{}: {} utterances, {} spans ({} slots); loss per epoch {}{}; {:.0} s; wrote {}",
        if a.ensemble > 1 { format!(" (mean of {})", a.ensemble) } else { String::new() },
        report.utterances,
        report.spans,
        report.positives,
        losses.join(" "),
        if a.ensemble > 1 { " (the last one)" } else { "" },
        started.elapsed().as_secs_f64(),
        a.out.display()
    )?;
    if !held_out.is_empty() {
        let texts: Vec<&str> = held_out.iter().map(|e| e.text.as_str()).collect();
        let encoded = encoder.encode(&texts, crate::encoder::DEFAULT_BATCH_SIZE)?;
        for min_logit in [-2.0f32, -1.0, 0.0, 1.0, 2.0] {
            let (mut tp, mut n_pred, mut n_gold) = (0usize, 0usize, 0usize);
            for (ex, enc) in held_out.iter().zip(&encoded) {
                let found = det.detect(enc, &ex.words, max_width, min_logit);
                let gold: Vec<_> = ex.spans.iter().map(|s| s.words()).collect();
                tp += found.iter().filter(|s| gold.contains(s)).count();
                n_pred += found.len();
                n_gold += gold.len();
            }
            let counts = crate::eval::SpanCounts { tp, fp: n_pred - tp, fn_: n_gold - tp };
            let sc = counts.scores();
            writeln!(
                out,
                "held out ({} examples), logit > {min_logit}: P {:.3} R {:.3} F1 {:.3}",
                held_out.len(),
                sc.precision,
                sc.recall,
                sc.f1
            )?;
        }
    }
    Ok(())
}

/// Draws a progress bar (on a terminal) and prints evaluations and checkpoints.
struct Progress<'a> {
    bar: ProgressBar,
    out: &'a mut dyn Write,
    smoothed: Option<f32>,
}

impl<'a> Progress<'a> {
    fn new(out: &'a mut dyn Write) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self { bar, out, smoothed: None }
    }

    fn line(&mut self, text: String) {
        let out = &mut self.out;
        self.bar.suspend(|| {
            let _ = writeln!(out, "{text}");
        });
    }
}

impl Observer for Progress<'_> {
    fn started(&mut self, first_step: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(first_step);
        if first_step > 0 {
            self.line(format!("resumed at step {first_step} of {total}"));
        }
    }

    fn step(&mut self, r: &StepReport) {
        let s = self.smoothed.map_or(r.loss, |s| 0.95 * s + 0.05 * r.loss);
        self.smoothed = Some(s);
        self.bar.set_position(r.step);
        let message = format!(
            "loss {s:.4}, lr {:.1e}, |g| {:.2}, {:.0} tokens/s, {:.2} s/step",
            r.lr,
            r.grad_norm,
            r.tokens as f64 / r.seconds.max(1e-9),
            r.seconds
        );
        // Without a terminal (logs, CI) the bar is hidden: print a line now and then.
        if self.bar.is_hidden() && r.step % (r.total / 20).max(10) == 0 {
            self.line(format!("step {}/{}: {message}", r.step, r.total));
        }
        self.bar.set_message(message);
    }

    fn evaluated(&mut self, step: u64, score: f64, best: bool) {
        let loss = self.smoothed.map(|l| format!(", train loss {l:.4}")).unwrap_or_default();
        self.line(format!("step {step}: dev {score:.2}{loss}{}", if best { " (best so far: saved)" } else { "" }));
    }

    fn checkpointed(&mut self, path: &Path) {
        self.line(format!("checkpoint {}", path.display()));
    }
}

/// The intents a SNIPS few-shot fold leaves out of training: its target domain and the
/// dev domain after it.
fn fold_domains(fold: u32) -> Vec<String> {
    let fold = fold as usize;
    vec![DOMAINS[fold - 1].to_string(), DOMAINS[fold % 7].to_string()]
}

/// Drops examples of the given intents; fails if an intent named matches nothing.
fn exclude(examples: Vec<Example>, intents: &[String], source: &Path) -> Result<Vec<Example>> {
    for i in intents {
        if !examples.iter().any(|e| e.intent.as_deref() == Some(i)) {
            bail!("{}: no example has intent {i:?} (to exclude)", source.display());
        }
    }
    Ok(examples.into_iter().filter(|e| !e.intent.as_ref().is_some_and(|i| intents.contains(i))).collect())
}

/// Identifies training data by its texts and labels, so that `--resume` refuses other data.
fn examples_fingerprint(examples: &[Example]) -> String {
    train::data_fingerprint(examples.iter().flat_map(|e| {
        std::iter::once(e.text.as_str()).chain(e.intent.as_deref()).chain(e.spans.iter().map(|s| s.label.as_str()))
    }))
}

fn finish(summary: &TrainSummary, paths: &RunPaths, settings: serde_json::Value, out: &mut dyn Write) -> Result<()> {
    let s = &summary.state;
    let result = serde_json::json!({
        "steps": s.step,
        "total_steps": s.total_steps,
        "resumed_from": summary.resumed_from,
        "best": s.best,
        "history": s.history,
        "seconds": summary.seconds.round(),
        "tokens_per_s": summary.tokens_per_s.round(),
        "config": s.config,
        "objective": s.objective,
        "data": s.data,
        "settings": settings,
    });
    crate::bench::write_json(&paths.out.join("training.json"), &result)?;
    match &s.best {
        Some(b) => writeln!(out, "best dev score {:.2} at step {}; model: {}", b.score, b.step, paths.model_dir().display())?,
        None => writeln!(out, "trained {} steps; model: {}", s.step, paths.model_dir().display())?,
    }
    writeln!(out, "{:.0} s, {:.0} tokens/s", summary.seconds, summary.tokens_per_s)?;
    Ok(())
}

fn retriever(a: RetrieverArgs, out: &mut dyn Write) -> Result<()> {
    a.run.check_out()?;
    let config = a.run.config()?;
    let base_dir = a.model.dir()?;
    let mut dev = Vec::new();
    let mut fold_left_out = Vec::new();
    if let (Some(fold), Some(episodes)) = (a.fold, &a.episodes) {
        fold_left_out = fold_domains(fold);
        dev = load_domain(episodes, a.shots, fold as usize % 7 + 1)?;
        dev.truncate(a.dev_episodes);
    }
    let (examples, left_out) = a.source.load(&fold_left_out)?;
    if a.per_label < 2 {
        bail!("--per-label must be at least 2 (a label needs a partner in its batch)");
    }
    let loss = RetrieverLoss {
        pooling: a.build.pooling,
        max_width: a.build.max_width,
        scale: a.scale,
        o_spans: a.o_spans,
        o_anchors: !a.o_not_anchors,
        intent_weight: a.intent_weight,
        per_label: a.per_label,
        dropout: a.run.dropout,
        label_scope: a.label_scope,
    };
    let trainable = TrainableEncoder::load(&base_dir)?;
    let fingerprint = examples_fingerprint(&examples);
    let n = examples.len();
    let objective = RetrieverObjective::new(&trainable.encoder, examples, loss, a.run.batch_size)?;
    writeln!(
        out,
        "training the retriever on {n} examples ({} slot labels incl. O){}",
        objective.slot_labels(),
        if left_out.is_empty() { String::new() } else { format!(", leaving out {}", left_out.join(", ")) }
    )?;
    let build = a.build.config();
    let cfg = crate::labeler::QueryConfig::default();
    let mut evaluate = |_step: u64| -> Result<Option<f64>, TrainError> {
        if dev.is_empty() {
            return Ok(None);
        }
        let choice = dev_score(&trainable.encoder, &dev, &build, &cfg).map_err(|e| TrainError::Eval(format!("{e:#}")))?;
        Ok(Some(choice.f1))
    };
    let paths = RunPaths { base_dir: &base_dir, out: &a.run.out };
    let objective_json = serde_json::to_value(loss)?;
    let mut progress = Progress::new(out);
    let summary = train::train(
        &objective,
        &trainable.varmap,
        &paths,
        &config,
        objective_json,
        fingerprint,
        Vec::new(),
        &mut evaluate,
        &mut progress,
        a.run.resume,
    )?;
    progress.bar.finish_and_clear();
    let settings = serde_json::json!({
        "model": "retriever", "base_model": base_dir, "data": a.source.data, "left_out_intents": left_out,
        "fold": a.fold, "dev": if dev.is_empty() { None } else { Some(format!("{}-shot episodes of {}, first {}", a.shots, DOMAINS[a.fold.unwrap_or(1) as usize % 7], dev.len())) },
        "pooling": SpanPooling::name(a.build.pooling),
    });
    finish(&summary, &paths, settings, out)
}

/// Intent accuracy and slot F1 (percent), averaged: the baseline's dev score.
pub(crate) fn joint_score(model: &JointModel, gold: &[Example], batch_size: usize) -> Result<(f64, crate::eval::EvalReport)> {
    let preds = model.predict(gold, batch_size)?;
    let mut ev = Evaluator::new();
    for (g, p) in gold.iter().zip(&preds) {
        ev.add(g, &p.to_example(g))?;
    }
    let report = ev.report();
    let intent = report.intent_accuracy.unwrap_or(0.0);
    Ok((100.0 * (intent + report.micro.f1) / 2.0, report))
}

fn baseline(a: BaselineArgs, out: &mut dyn Write) -> Result<()> {
    a.run.check_out()?;
    let config = a.run.config()?;
    let base_dir = a.model.dir()?;
    let examples = exclude(load_examples(&a.data, Some(&a.split), "train")?, &a.exclude_intents, &a.data)?;
    let dev = match a.dev_split.as_str() {
        "none" => Vec::new(),
        name => exclude(load_examples(&a.data, Some(name), "dev")?, &a.exclude_intents, &a.data)?,
    };
    let trainable = TrainableEncoder::load(&base_dir)?;
    let labels = JointLabels::from_examples(&examples);
    let model = JointModel::new(&trainable.encoder, &trainable.varmap, labels)?;
    let fingerprint = examples_fingerprint(&examples);
    writeln!(
        out,
        "training the baseline on {} examples ({} intents, {} slot labels)",
        examples.len(),
        model.labels().intents.len(),
        model.labels().slots.len()
    )?;
    let objective = JointObjective::new(&model, examples, a.run.batch_size, a.run.dropout)?;
    let mut evaluate = |_step: u64| -> Result<Option<f64>, TrainError> {
        if dev.is_empty() {
            return Ok(None);
        }
        let (score, _) = joint_score(&model, &dev, 64).map_err(|e| TrainError::Eval(format!("{e:#}")))?;
        Ok(Some(score))
    };
    let paths = RunPaths { base_dir: &base_dir, out: &a.run.out };
    let objective_json = serde_json::json!({"model": "baseline", "dropout": a.run.dropout, "batch_size": a.run.batch_size});
    let mut progress = Progress::new(out);
    let summary = train::train(
        &objective,
        &trainable.varmap,
        &paths,
        &config,
        objective_json,
        fingerprint,
        vec![(LABELS_FILE, model.labels_json())],
        &mut evaluate,
        &mut progress,
        a.run.resume,
    )?;
    progress.bar.finish_and_clear();
    let settings = serde_json::json!({
        "model": "baseline", "base_model": base_dir, "data": a.data, "split": a.split, "dev_split": a.dev_split,
        "left_out_intents": a.exclude_intents,
    });
    finish(&summary, &paths, settings, out)
}
