//! Speed of one training step of the encoder against the PyTorch peer: forward in
//! [`ForwardMode::Train`] with dropout, a loss that touches every position, backward, and
//! one AdamW step (`candle_nn::AdamW`, or with `--optimizer nearspan` the in-place one
//! `nearspan train` uses), on a fixed batch; the reference stack (HF transformers +
//! PyTorch, `benches/peers/train_step_peer.py`) does the same step on the same batch,
//! in the same invocation (ours first, then the peer) so both see the same machine.
//!
//! The batch: the first `--batch` non-blank lines of `--texts` (default: SNIPS train),
//! each tokenized as `[CLS] … [SEP]`, cut to `--tokens` (the first `tokens - 2`
//! sub-tokens, then `[SEP]`, as HF's `truncation=True, max_length=tokens` does) and
//! padded to exactly `--tokens`, so every step computes `batch × tokens` positions.
//!
//! The loss (both sides): masked mean pooling over the real tokens, L2 normalization,
//! cosine similarities of every pair in the batch divided by a temperature of 0.05, and
//! cross-entropy with each sentence's own row as its target (in-batch InfoNCE). It is a
//! timing load, not a training recipe: what matters is that the gradient reaches every
//! position and every weight.
//!
//! Reported per side: the median step time over `--steps` timed steps after `--warmup`
//! untimed ones, its forward (model + loss), backward and optimizer parts, and
//! tokens/s = `batch × tokens / step` (padded positions: the work computed). Before
//! timing, each side also computes the loss once without dropout: the two must agree
//! (same weights, same batch, same function), which is checked and recorded.
//!
//! Threads are pinned as in [`super::encoder`]: candle's matmul and element-wise pools
//! and a local rayon pool (which also runs nearspan's own fused training kernels) of
//! `--threads`; the peer gets `torch.set_num_threads`.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::builder::TypedValueParser as _;
use clap::Args;
use serde_json::{json, Value};

use super::encoder::{
    check_threads, command_line, cpu_model, peer_json, pin_candle_threads, ratio, read_texts, resolve_script, round,
    CpuSample,
};
use crate::encoder::{BertModel, Encoder, ForwardMode};
use crate::train::TrainableEncoder;

/// Temperature of the in-batch contrastive loss (both sides).
const TEMPERATURE: f64 = 0.05;

#[derive(Debug, Args)]
pub struct TrainStepArgs {
    #[command(flatten)]
    pub model: crate::cli::ModelArg,
    /// Utterances, one per line (trimmed, blank lines skipped); the first --batch are used.
    /// Default: the SNIPS train set, ../shared/data/snips/train/seq.in.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// Texts per step.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=4096).map(|v| v as usize))]
    pub batch: usize,
    /// Tokens per text, [CLS] and [SEP] included: longer texts are cut, shorter padded.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(3..=512).map(|v| v as usize))]
    pub tokens: usize,
    /// Threads for both implementations.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024).map(|v| v as usize))]
    pub threads: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000).map(|v| v as usize))]
    pub steps: usize,
    /// Dropout probability (hidden and attention), as in the model's config.
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f32,
    /// AdamW learning rate (weight decay 0.01, betas 0.9/0.999, eps 1e-8 on both sides).
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// Our side's AdamW: candle-nn's (`candle_nn::AdamW`, a dozen tensor ops per weight)
    /// or nearspan's (`nearspan::train::optim::AdamW`, what `nearspan train` uses: one
    /// in-place pass per weight, no decay on biases and layer norms, no clipping here).
    #[arg(long, value_enum, default_value = "candle-nn")]
    pub optimizer: OptimizerKind,
    /// Python of the venv holding torch and transformers (see benches/peers/README.md).
    #[arg(long, default_value = "/work/peers-venv/bin/python")]
    pub python: PathBuf,
    /// Measure nearspan only.
    #[arg(long)]
    pub no_peer: bool,
    /// The peer script.
    #[arg(long, default_value = "benches/peers/train_step_peer.py")]
    pub peer_script: PathBuf,
    /// Results file (overwritten).
    #[arg(long, default_value = "benches/results/train_step.json")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum OptimizerKind {
    CandleNn,
    Nearspan,
}

/// The optimizer of our side.
enum Optim {
    CandleNn(AdamW),
    Nearspan(crate::train::optim::AdamW),
}

impl Optim {
    fn new(kind: OptimizerKind, t: &TrainableEncoder, lr: f64) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::CandleNn => {
                let params = ParamsAdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
                Optim::CandleNn(AdamW::new(t.varmap.all_vars(), params)?)
            }
            OptimizerKind::Nearspan => {
                let vars = t.varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                Optim::Nearspan(crate::train::optim::AdamW::new(vars, crate::train::optim::AdamWConfig::default())?)
            }
        })
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<()> {
        match self {
            Optim::CandleNn(o) => o.step(grads)?,
            Optim::Nearspan(o) => {
                o.step(grads, lr, 0.0)?;
            }
        }
        Ok(())
    }
}

pub fn run(a: TrainStepArgs, out: &mut dyn Write) -> Result<()> {
    if !(0.0..1.0).contains(&a.dropout) {
        bail!("--dropout must be in [0, 1), got {}", a.dropout);
    }
    let command = command_line();
    let load_at_start = super::loadavg_1min();
    pin_candle_threads(a.threads);

    let model_dir = match &a.model.model {
        Some(d) => d.clone(),
        None => crate::paths::default_model_dir().with_context(|| {
            format!(
                "no model found (looked in {:?}); pass --model DIR or run scripts/setup",
                crate::paths::default_model_candidates()
            )
        })?,
    };
    let texts_path = match &a.texts {
        Some(p) => p.clone(),
        None => crate::paths::shared_data_dir().join("snips/train/seq.in"),
    };
    let texts = read_texts(&texts_path)?;
    if texts.len() < a.batch {
        bail!("{}: {} texts, fewer than --batch {}", texts_path.display(), texts.len(), a.batch);
    }
    let texts = &texts[..a.batch];
    let trainable = TrainableEncoder::load(&model_dir)?;
    let script = if a.no_peer { None } else { Some(resolve_script(&a.peer_script)?) };
    if script.is_some() && !a.python.is_file() {
        bail!(
            "{}: no such Python; create the peers venv (benches/peers/README.md), pass --python, or --no-peer",
            a.python.display()
        );
    }

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()
        .context("cannot start the benchmark's rayon thread pool")?;
    let thread_check = check_threads(&pool, a.threads)?;

    let batch = Batch::new(&trainable.encoder, texts, a.tokens)?;
    let load = super::loadavg_1min();
    let cpu = CpuSample::now();
    let ours = pool.install(|| measure(&trainable, &batch, &a))?;
    let mut ours = ours.to_json(&a);
    ours["impl"] = json!("nearspan (candle 0.11.1, f32, cpu)");
    ours["real_tokens"] = json!(batch.real_tokens);
    ours["loadavg_before"] = json!(load);
    ours["other_processes_cores_busy"] = json!(cpu.and_then(|c| c.others_busy()));

    let theirs = match &script {
        None => None,
        Some(script) => {
            let load = super::loadavg_1min();
            let cpu = CpuSample::now();
            let t = a.threads.to_string();
            let abs = |p: &std::path::Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            let output = Command::new(&a.python)
                .arg(script)
                .arg("--model")
                .arg(abs(&model_dir))
                .arg("--texts")
                .arg(abs(&texts_path))
                .args(["--batch", &a.batch.to_string(), "--tokens", &a.tokens.to_string(), "--threads", &t])
                .args(["--warmup", &a.warmup.to_string(), "--steps", &a.steps.to_string()])
                .args(["--dropout", &a.dropout.to_string(), "--lr", &a.lr.to_string()])
                .args(["--temperature", &TEMPERATURE.to_string()])
                .env("OMP_NUM_THREADS", &t)
                .env("MKL_NUM_THREADS", &t)
                .env("RAYON_NUM_THREADS", &t)
                .output()
                .with_context(|| format!("{}: cannot start the peer", a.python.display()))?;
            let mut theirs = peer_json(script, &output, "(train step)")?;
            theirs["loadavg_before"] = json!(load);
            theirs["other_processes_cores_busy"] = json!(cpu.and_then(|c| c.others_busy()));
            Some(theirs)
        }
    };

    let candle_step = ours["step_s"].as_f64();
    let pytorch_step = theirs.as_ref().and_then(|t| t["step_s"].as_f64());
    // Same function on the same batch without dropout: the losses must agree.
    let loss_gap = theirs.as_ref().and_then(|t| {
        Some((t["loss_no_dropout"].as_f64()? - ours["loss_no_dropout"].as_f64()?).abs())
    });
    let info = trainable.encoder.info();
    let report = json!({
        "candle_step_s": candle_step,
        "pytorch_step_s": pytorch_step,
        "ratio": ratio(pytorch_step, candle_step),
        "ratio_meaning": "pytorch_step_s / candle_step_s: above 1, nearspan's step is faster",
        "candle_tokens_per_s": ours["tokens_per_s"],
        "pytorch_tokens_per_s": theirs.as_ref().map(|t| t["tokens_per_s"].clone()),
        "threads": a.threads,
        "loadavg_before": load_at_start,
        "loadavg_after": super::loadavg_1min(),
        "loss_no_dropout_abs_diff": loss_gap,
        "machine": {
            "cpu": cpu_model(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        },
        "thread_check": thread_check,
        "model": { "id": info.id, "dir": info.dir.display().to_string(), "weights_sha256": info.weights_sha256 },
        "texts": { "path": texts_path.display().to_string(), "count": a.batch },
        "batch": a.batch,
        "tokens": a.tokens,
        "dropout": round(a.dropout as f64, 6),
        "lr": a.lr,
        "optimizer": match a.optimizer {
            OptimizerKind::CandleNn => "candle_nn::AdamW",
            OptimizerKind::Nearspan => "nearspan::train::optim::AdamW",
        },
        "temperature": TEMPERATURE,
        "warmup_steps": a.warmup,
        "timed_steps": a.steps,
        "nearspan": ours,
        "pytorch": theirs,
        "nearspan_version": env!("CARGO_PKG_VERSION"),
        "command": command,
    });
    write_table(out, &report)?;
    super::write_json(&a.out, &report)?;
    if let Some(gap) = loss_gap {
        // f32 on both sides through six layers: agreement to ~1e-4 relative is expected.
        let tol = 1e-3 * report["nearspan"]["loss_no_dropout"].as_f64().unwrap_or(1.0).abs().max(1.0);
        if gap > tol {
            bail!("the two losses without dropout differ by {gap} (> {tol}): the two steps do not compute the same function");
        }
    }
    writeln!(out, "wrote {}", a.out.display())?;
    Ok(())
}

/// The fixed batch: ids and attention mask (batch, tokens) u32, and the mask as f32
/// (batch, tokens, 1) for pooling.
struct Batch {
    ids: Tensor,
    mask: Tensor,
    mask_f: Tensor,
    targets: Tensor,
    real_tokens: usize,
}

impl Batch {
    fn new(encoder: &Encoder, texts: &[String], tokens: usize) -> Result<Self> {
        let (b, t) = (texts.len(), tokens);
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        for (row, text) in texts.iter().enumerate() {
            let tok = encoder.tokenize(text)?;
            let mut row_ids = tok.ids.clone();
            if row_ids.len() > t {
                let sep = *row_ids.last().expect("[CLS] and [SEP] at least");
                row_ids.truncate(t - 1);
                row_ids.push(sep);
            }
            ids[row * t..row * t + row_ids.len()].copy_from_slice(&row_ids);
            mask[row * t..row * t + row_ids.len()].fill(1);
        }
        let real_tokens = mask.iter().filter(|&&m| m == 1).count();
        let dev = Device::Cpu;
        let mask_f = Tensor::from_vec(mask.iter().map(|&m| m as f32).collect::<Vec<_>>(), (b, t, 1), &dev)?;
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), &dev)?,
            mask: Tensor::from_vec(mask, (b, t), &dev)?,
            mask_f,
            targets: Tensor::arange(0u32, b as u32, &dev)?,
            real_tokens,
        })
    }
}

/// In-batch InfoNCE on masked-mean-pooled, L2-normalized sentence vectors.
fn contrastive_loss(model: &BertModel, batch: &Batch, mode: ForwardMode) -> candle_core::Result<Tensor> {
    let hidden = model.forward(&batch.ids, &batch.mask, mode)?; // (b, t, h)
    let summed = hidden.broadcast_mul(&batch.mask_f)?.sum(1)?; // (b, h)
    let pooled = summed.broadcast_div(&batch.mask_f.sum(1)?)?;
    let z = pooled.broadcast_div(&pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
    let sims = (z.matmul(&z.t()?)? / TEMPERATURE)?;
    candle_nn::loss::cross_entropy(&sims, &batch.targets)
}

/// Per-step seconds of each part, and the loss before training.
struct Measurement {
    steps: Vec<[f64; 4]>, // forward, backward, optimizer, total
    loss_no_dropout: f64,
    losses: Vec<f64>,
}

impl Measurement {
    fn to_json(&self, a: &TrainStepArgs) -> Value {
        let median = |i: usize| {
            let mut v: Vec<f64> = self.steps.iter().map(|s| s[i]).collect();
            v.sort_by(f64::total_cmp);
            super::percentile(&v, 50.0)
        };
        let step = median(3);
        json!({
            "threads": a.threads,
            "batch": a.batch,
            "tokens": a.tokens,
            "step_s": round(step, 4),
            "forward_s": round(median(0), 4),
            "backward_s": round(median(1), 4),
            "optimizer_s": round(median(2), 4),
            "step_s_all": self.steps.iter().map(|s| round(s[3], 4)).collect::<Vec<_>>(),
            "tokens_per_s": round((a.batch * a.tokens) as f64 / step, 1),
            "loss_no_dropout": self.loss_no_dropout,
            "losses": self.losses.iter().map(|l| round(*l, 5)).collect::<Vec<_>>(),
        })
    }
}

fn measure(t: &TrainableEncoder, batch: &Batch, a: &TrainStepArgs) -> Result<Measurement> {
    let model = t.encoder.model();
    let loss_no_dropout =
        contrastive_loss(model, batch, ForwardMode::Train { dropout: 0.0 })?.to_scalar::<f32>()? as f64;
    let mut opt = Optim::new(a.optimizer, t, a.lr)?;
    let mode = ForwardMode::Train { dropout: a.dropout };
    let mut m = Measurement { steps: Vec::new(), loss_no_dropout, losses: Vec::new() };
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let loss = contrastive_loss(model, batch, mode)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, a.lr)?;
        drop(grads);
        drop(loss);
        let t3 = Instant::now();
        if i >= a.warmup {
            let s = |x: Instant, y: Instant| (y - x).as_secs_f64();
            m.steps.push([s(t0, t1), s(t1, t2), s(t2, t3), s(t0, t3)]);
            m.losses.push(value);
        }
    }
    Ok(m)
}

fn write_table(out: &mut dyn Write, r: &Value) -> Result<()> {
    let fmt = |v: &Value, d: usize| v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.d$}"));
    writeln!(
        out,
        "training step, batch {} x {} tokens, dropout {}, {} threads, {} ({} cores), load before {}",
        r["batch"],
        r["tokens"],
        r["dropout"],
        r["threads"],
        r["machine"]["cpu"].as_str().unwrap_or("?"),
        r["machine"]["cores"],
        fmt(&r["loadavg_before"], 2)
    )?;
    writeln!(
        out,
        "{:<9}  {:>8}  {:>9}  {:>10}  {:>11}  {:>8}  {:>6}  {:>7}",
        "impl", "step s", "fwd s", "bwd s", "optim s", "tok/s", "load1", "others"
    )?;
    for name in ["nearspan", "pytorch"] {
        let x = &r[name];
        if x.is_null() {
            continue;
        }
        writeln!(
            out,
            "{:<9}  {:>8}  {:>9}  {:>10}  {:>11}  {:>8}  {:>6}  {:>7}",
            name,
            fmt(&x["step_s"], 3),
            fmt(&x["forward_s"], 3),
            fmt(&x["backward_s"], 3),
            fmt(&x["optimizer_s"], 3),
            fmt(&x["tokens_per_s"], 0),
            fmt(&x["loadavg_before"], 2),
            fmt(&x["other_processes_cores_busy"], 2),
        )?;
    }
    if !r["ratio"].is_null() {
        writeln!(
            out,
            "pytorch/nearspan step time: x{} (>1: nearspan faster); loss without dropout differs by {}",
            fmt(&r["ratio"], 2),
            r["loss_no_dropout_abs_diff"]
        )?;
    }
    writeln!(out, "medians of the timed steps; load1: 1-min load average before; others: cores busy with other processes during the measurement")?;
    let busy = ["nearspan", "pytorch"].iter().filter_map(|k| r[*k]["other_processes_cores_busy"].as_f64()).fold(0f64, f64::max);
    if busy >= 0.5 {
        writeln!(
            out,
            "warning: other processes kept {busy:.2} cores busy during the measurement: timings on a shared machine are noisy, \
             and with more threads than free cores both sides (PyTorch's OpenMP threads most) slow down severalfold"
        )?;
    }
    Ok(())
}
