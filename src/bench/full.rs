//! Full-data benchmark (ATIS, SNIPS): the fine-tuned baseline and retrieval with a
//! trained encoder, each trained on train, selected on dev, reported on test: intent
//! accuracy, strict slot F1 and frame accuracy.
//!
//! End to end: a model folder not given is trained first, into `--runs`, with the same
//! code and defaults as `nearspan train` (an interrupted run resumes).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser};
use nearspan_index::SpanIndex;

use crate::cli::train::TrainCommand;
use crate::cli::{load_examples, BuildArgs};
use crate::data::Example;
use crate::encoder::Encoder;
use crate::eval::{EvalReport, Evaluator};
use crate::labeler::{self, QueryConfig};

#[derive(Debug, Args)]
pub struct FullArgs {
    /// A dataset with train, dev and test splits (../shared/data/atis or ../shared/data/snips).
    #[arg(long)]
    pub data: PathBuf,
    /// baseline, retrieval, or both (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "baseline,retrieval")]
    pub methods: Vec<String>,
    /// A trained baseline model folder; without it, one is trained into --runs.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// A trained retrieval encoder; without it, one is trained into --runs.
    #[arg(long)]
    pub retriever: Option<PathBuf>,
    /// Where models are trained when not given.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Epochs when the baseline is trained here.
    #[arg(long, default_value_t = 5.0)]
    pub baseline_epochs: f64,
    #[arg(long, default_value_t = 5e-5)]
    pub baseline_lr: f64,
    /// The baseline's tag decoding (see `nearspan eval --help`).
    #[arg(long, value_enum, default_value_t = crate::train::baseline::TagDecoding::default())]
    pub tag_decoding: crate::train::baseline::TagDecoding,
    /// Epochs when the retriever is trained here.
    #[arg(long, default_value_t = 1.0)]
    pub retriever_epochs: f64,
    #[arg(long, default_value_t = 5e-5)]
    pub retriever_lr: f64,
    #[command(flatten)]
    pub build: BuildArgs,
    #[arg(long, default_value = "benches/results/full_data.json")]
    pub out: PathBuf,
}

fn percent(r: &EvalReport) -> serde_json::Value {
    let round = |x: f64| (x * 10_000.0).round() / 100.0;
    serde_json::json!({
        "intent_acc": round(r.intent_accuracy.unwrap_or(0.0)),
        "slot_f1": round(r.micro.f1),
        "frame_acc": round(r.frame_accuracy),
        "examples": r.examples,
    })
}

fn dataset_name(data: &Path) -> String {
    data.canonicalize().unwrap_or_else(|_| data.to_path_buf()).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into())
}

/// Runs `nearspan train ...` with these arguments (so the defaults are the CLI's).
fn train_with(args: &[String], out: &mut dyn Write) -> Result<()> {
    #[derive(Parser)]
    struct Wrap {
        #[command(subcommand)]
        cmd: TrainCommand,
    }
    let parsed = Wrap::try_parse_from(std::iter::once("train".to_string()).chain(args.iter().cloned()))?;
    crate::cli::train::run(parsed.cmd, out)
}

pub fn run(a: FullArgs, out: &mut dyn Write) -> Result<()> {
    let name = dataset_name(&a.data);
    let started = std::time::Instant::now();
    let data = a.data.display().to_string();
    for method in &a.methods {
        let result = match method.as_str() {
            "baseline" => {
                let dir = match &a.baseline {
                    Some(d) => d.clone(),
                    None => {
                        let run = a.runs.join(format!("{name}-baseline"));
                        train_with(&["baseline".into(), "--data".into(), data.clone(), "--out".into(), run.display().to_string(),
                            "--epochs".into(), a.baseline_epochs.to_string(), "--lr".into(), a.baseline_lr.to_string(),
                            "--eval-every".into(), "0".into(), "--resume".into()], out)?;
                        run.join("model")
                    }
                };
                baseline_on_test(&dir, &a.data, a.tag_decoding, out)?
            }
            "retrieval" => {
                let dir = match &a.retriever {
                    Some(d) => d.clone(),
                    None => {
                        let run = a.runs.join(format!("{name}-retriever"));
                        train_with(&["retriever".into(), "--data".into(), data.clone(), "--out".into(), run.display().to_string(),
                            "--epochs".into(), a.retriever_epochs.to_string(), "--lr".into(), a.retriever_lr.to_string(), "--resume".into()], out)?;
                        run.join("model")
                    }
                };
                retrieval_on_test(&dir, &a.data, &a.build, out)?
            }
            other => anyhow::bail!("unknown method {other:?}; expected baseline or retrieval"),
        };
        crate::bench::merge_result(&a.out, &[&name, method], result)?;
        writeln!(out, "wrote {} [{name}][{method}] ({:.0} s so far)", a.out.display(), started.elapsed().as_secs_f64())?;
    }
    Ok(())
}

fn baseline_on_test(dir: &Path, data: &Path, decoding: crate::train::baseline::TagDecoding, out: &mut dyn Write) -> Result<serde_json::Value> {
    let encoder = Encoder::load(dir)?;
    let mut model = crate::train::baseline::JointModel::load(&encoder, dir)?;
    model.set_tag_decoding(decoding);
    let test = load_examples(data, Some("test"), "test")?;
    let t = std::time::Instant::now();
    let (_, report) = crate::cli::train::joint_score(&model, &test, 64)?;
    let r = percent(&report);
    writeln!(out, "baseline on test: {r}")?;
    Ok(serde_json::json!({"model": dir, "tag_decoding": decoding, "test": r, "intent_acc": r["intent_acc"], "slot_f1": r["slot_f1"], "frame_acc": r["frame_acc"], "seconds": t.elapsed().as_secs_f64().round()}))
}

/// Threshold and non-slot margin grids tried on dev.
const THRESHOLDS: [f32; 7] = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8];
const MARGINS: [f32; 5] = [-0.05, 0.0, 0.05, 0.1, 0.2];

fn score(index: &SpanIndex, gold: &[Example], retrieved: &[labeler::Retrieved], cfg: &QueryConfig) -> Result<EvalReport> {
    let mut ev = Evaluator::new();
    for (g, r) in gold.iter().zip(retrieved) {
        ev.add(g, &labeler::decide(index, g, r, cfg).to_example(g))?;
    }
    Ok(ev.report())
}

fn retrieval_on_test(dir: &Path, data: &Path, build: &BuildArgs, out: &mut dyn Write) -> Result<serde_json::Value> {
    let t = std::time::Instant::now();
    let encoder = Encoder::load(dir)?;
    let build_cfg = build.config();
    let train = load_examples(data, Some("train"), "train")?;
    let mut index = SpanIndex::new(labeler::encoder_info(&encoder, &build_cfg), build.backend, build.hnsw_params())?;
    labeler::add_examples(&encoder, &mut index, &train, &build_cfg, 64).context("indexing the train split")?;
    writeln!(out, "indexed {} train examples ({} spans) in {:.0} s", train.len(), index.n_spans(), t.elapsed().as_secs_f64())?;
    let base = QueryConfig::default();
    let dev = load_examples(data, Some("dev"), "dev")?;
    let dev_r = labeler::retrieve(&encoder, &index, &dev, &build_cfg, &base, None)?;
    let mut best = (f64::NEG_INFINITY, base);
    for &threshold in &THRESHOLDS {
        for &o_margin in &MARGINS {
            let cfg = QueryConfig { threshold, o_margin, ..base };
            let r = score(&index, &dev, &dev_r, &cfg)?;
            let s = r.micro.f1 + r.intent_accuracy.unwrap_or(0.0);
            if s > best.0 {
                best = (s, cfg);
            }
        }
    }
    let cfg = best.1;
    let test = load_examples(data, Some("test"), "test")?;
    let test_r = labeler::retrieve(&encoder, &index, &test, &build_cfg, &cfg, None)?;
    let report = score(&index, &test, &test_r, &cfg)?;
    let r = percent(&report);
    writeln!(out, "retrieval on test (threshold {}, margin {} chosen on dev): {r}", cfg.threshold, cfg.o_margin)?;
    Ok(serde_json::json!({
        "model": dir, "test": r, "intent_acc": r["intent_acc"], "slot_f1": r["slot_f1"], "frame_acc": r["frame_acc"],
        "chosen_on_dev": {"threshold": cfg.threshold, "o_margin": cfg.o_margin}, "spans_indexed": index.n_spans(),
        "seconds": t.elapsed().as_secs_f64().round(),
    }))
}
