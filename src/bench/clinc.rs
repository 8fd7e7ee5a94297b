//! Intent classification with out-of-scope detection on CLINC150 (Larson et al. 2019):
//! index the training utterances, label by nearest utterances, answer `oos` below a
//! threshold. Aggregation (max / mean over the k neighbours), k and the threshold are
//! chosen on the validation split (in-scope `val` + `oos_val`), never on test.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nearspan_index::{BackendKind, HnswParams, SpanIndex};

use crate::cli::ModelArg;
use crate::data::{self, Example};
use crate::encoder::{EncodedText, Encoder};
use crate::labeler::{self, BuildConfig, IntentAggregation, OUT_OF_SCOPE};

#[derive(Debug, Args)]
pub struct ClincArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// CLINC150 data_full.json.
    #[arg(long)]
    pub data: PathBuf,
    /// Examples per intent sampled from train (0 = all of train).
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Samples (seeds 1..=N) averaged when --shots > 0.
    #[arg(long, default_value_t = 3)]
    pub samples: u64,
    #[arg(long, default_value = "benches/results/clinc150.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "retrieval_untrained")]
    pub key: String,
    /// retrieval (nearest training utterances) or finetune (the baseline: a classifier
    /// on [CLS] fine-tuned on the sampled examples; oos when its probability is low).
    #[arg(long, default_value = "retrieval", value_parser = ["retrieval", "finetune"])]
    pub method: String,
    /// With --shots: epochs of training on each sample first (retrieval: the
    /// batch-softmax intent objective; finetune: always trains, default 10 then).
    #[arg(long)]
    pub train_epochs: Option<f64>,
    #[arg(long, default_value_t = 5e-5)]
    pub train_lr: f64,
    #[arg(long, default_value_t = 32)]
    pub train_batch_size: usize,
}

const K_GRID: [usize; 4] = [1, 5, 10, 20];
const AGGREGATIONS: [IntentAggregation; 2] = [IntentAggregation::Max, IntentAggregation::Mean];

/// Accuracy numbers in percent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Scores {
    in_scope_accuracy: f64,
    oos_recall: f64,
}

impl Scores {
    /// The model-selection criterion on validation data: both matter equally.
    fn balanced(&self) -> f64 {
        (self.in_scope_accuracy + self.oos_recall) / 2.0
    }
}

/// Nearest training utterances of each evaluation utterance, retrieved once.
struct Neighbours(Vec<Vec<(u32, f32)>>);

fn retrieve(index: &SpanIndex, encoded: &[EncodedText], k: usize) -> Neighbours {
    use rayon::prelude::*;
    Neighbours(
        encoded
            .par_iter()
            .map(|e| index.search_utterances(&e.sentence_vector(), k).into_iter().map(|n| (n.id, n.similarity)).collect())
            .collect(),
    )
}

/// Predicted intent (or `oos`) from the first `k` neighbours.
fn predict<'a>(index: &'a SpanIndex, hits: &[(u32, f32)], k: usize, agg: IntentAggregation, threshold: f32) -> &'a str {
    match labeler::best_intent(index, &hits[..k.min(hits.len())], agg) {
        Some((intent, score)) if score >= threshold => intent,
        _ => OUT_OF_SCOPE,
    }
}

fn score(index: &SpanIndex, gold: &[Example], hits: &Neighbours, k: usize, agg: IntentAggregation, t: f32) -> Scores {
    let (mut ins, mut ins_ok, mut oos, mut oos_ok) = (0, 0, 0, 0);
    for (g, h) in gold.iter().zip(&hits.0) {
        let want = g.intent.as_deref().unwrap_or(OUT_OF_SCOPE);
        let got = predict(index, h, k, agg, t);
        if want == OUT_OF_SCOPE {
            oos += 1;
            oos_ok += usize::from(got == OUT_OF_SCOPE);
        } else {
            ins += 1;
            ins_ok += usize::from(got == want);
        }
    }
    let pct = |a: usize, b: usize| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
    Scores { in_scope_accuracy: pct(ins_ok, ins), oos_recall: pct(oos_ok, oos) }
}

/// A deterministic per-intent sample of `shots` training examples (splitmix64 shuffle).
fn sample(train: &[Example], shots: usize, seed: u64) -> Vec<Example> {
    let mut by_intent: BTreeMap<&str, Vec<&Example>> = BTreeMap::new();
    for e in train {
        by_intent.entry(e.intent.as_deref().unwrap_or("")).or_default().push(e);
    }
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::new();
    for (_, mut list) in by_intent {
        for i in (1..list.len()).rev() {
            list.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        out.extend(list.into_iter().take(shots).cloned());
    }
    out
}

struct Split {
    examples: Vec<Example>,
    encoded: Vec<EncodedText>,
}

fn encode_split(encoder: &Encoder, examples: Vec<Example>) -> Result<Split> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let encoded = encoder.encode(&texts, 64)?;
    Ok(Split { examples, encoded })
}

fn joined(ds: &data::Dataset, a: &str, b: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for name in [a, b] {
        out.extend(ds.split(name).with_context(|| format!("CLINC150 file has no {name:?} split"))?.examples.iter().cloned());
    }
    Ok(out)
}

/// One run: index `train`, choose settings on `val`, score `test`.
fn evaluate(encoder: &Encoder, train: &[Example], train_enc: &[EncodedText], val: &Split, test: &Split) -> Result<serde_json::Value> {
    let build = BuildConfig { max_width: 1, pooling: crate::encoder::SpanPooling::Mean, index_o_spans: false };
    let mut index = SpanIndex::new(labeler::encoder_info(encoder, &build), BackendKind::Exact, HnswParams::default())?;
    labeler::add_encoded(&mut index, train, train_enc, &build)?;
    let kmax = *K_GRID.iter().max().unwrap_or(&10);
    let val_hits = retrieve(&index, &val.encoded, kmax);
    let mut best = (f64::NEG_INFINITY, 1, IntentAggregation::Max, 0.0f32);
    for k in K_GRID {
        for agg in AGGREGATIONS {
            for step in 0..=40 {
                let t = 0.2 + step as f32 * 0.02;
                let s = score(&index, &val.examples, &val_hits, k, agg, t).balanced();
                if s > best.0 {
                    best = (s, k, agg, t);
                }
            }
        }
    }
    let (_, k, agg, t) = best;
    let test_hits = retrieve(&index, &test.encoded, kmax);
    let test_scores = score(&index, &test.examples, &test_hits, k, agg, t);
    let val_scores = score(&index, &val.examples, &val_hits, k, agg, t);
    Ok(serde_json::json!({
        "test": test_scores, "val": val_scores,
        "chosen_on_val": {"k": k, "aggregation": format!("{agg:?}").to_lowercase(), "oos_threshold": t},
        "no_threshold_test": score(&index, &test.examples, &test_hits, k, agg, -1.0),
    }))
}

/// Fine-tunes the encoder on one sample with the retriever's intent objective.
fn train_retriever_on_sample(a: &ClincArgs, sample: &[Example], seed: u64, epochs: f64) -> Result<crate::train::TrainableEncoder> {
    use crate::train::{self, TrainConfig};
    let t = train::TrainableEncoder::load(&a.model.dir()?)?;
    let config = TrainConfig { epochs, lr: a.train_lr, seed, checkpoint_every: 0, ..Default::default() };
    let loss = train::retriever::RetrieverLoss { o_spans: 0, intent_weight: 1.0, ..Default::default() };
    let objective = train::retriever::RetrieverObjective::new(&t.encoder, sample.to_vec(), loss, a.train_batch_size)?;
    train::fit(&objective, &t.varmap, &config)?;
    Ok(t)
}

/// The baseline on one sample: a classifier on [CLS] fine-tuned with the encoder.
fn finetune_on_sample(a: &ClincArgs, sample: &[Example], seed: u64, epochs: f64, val: &[Example], test: &[Example]) -> Result<serde_json::Value> {
    use crate::train::{self, baseline, TrainConfig};
    let t = train::TrainableEncoder::load(&a.model.dir()?)?;
    let config = TrainConfig { epochs, lr: a.train_lr, seed, checkpoint_every: 0, ..Default::default() };
    let model = baseline::JointModel::new(&t.encoder, &t.varmap, baseline::JointLabels::from_examples(sample))?;
    let objective = baseline::JointObjective::new(&model, sample.to_vec(), a.train_batch_size, 0.1)?;
    train::fit(&objective, &t.varmap, &config)?;
    evaluate_finetuned(&model, val, test)
}

/// The fine-tuned classifier on val and test: oos below a probability threshold chosen on val.
fn evaluate_finetuned(model: &crate::train::baseline::JointModel, val: &[Example], test: &[Example]) -> Result<serde_json::Value> {
    let predict = |gold: &[Example]| -> Result<Vec<(String, f32)>> {
        Ok(model.predict(gold, 64)?.into_iter().map(|p| p.intent.map(|i| (i.label, i.score)).unwrap_or_default()).collect())
    };
    let (val_p, test_p) = (predict(val)?, predict(test)?);
    let scores = |gold: &[Example], preds: &[(String, f32)], threshold: f32| {
        let (mut ins, mut ins_ok, mut oos, mut oos_ok) = (0, 0, 0, 0);
        for (g, (label, p)) in gold.iter().zip(preds) {
            let got = if *p >= threshold { label.as_str() } else { OUT_OF_SCOPE };
            match g.intent.as_deref().unwrap_or(OUT_OF_SCOPE) {
                OUT_OF_SCOPE => { oos += 1; oos_ok += usize::from(got == OUT_OF_SCOPE); }
                want => { ins += 1; ins_ok += usize::from(got == want); }
            }
        }
        let pct = |a: usize, b: usize| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
        Scores { in_scope_accuracy: pct(ins_ok, ins), oos_recall: pct(oos_ok, oos) }
    };
    let mut best = (f64::NEG_INFINITY, 0.0f32);
    for step in 0..=49 {
        let th = step as f32 * 0.02;
        let s = scores(val, &val_p, th).balanced();
        if s > best.0 {
            best = (s, th);
        }
    }
    Ok(serde_json::json!({
        "test": scores(test, &test_p, best.1), "val": scores(val, &val_p, best.1),
        "chosen_on_val": {"oos_probability_threshold": best.1},
        "no_threshold_test": scores(test, &test_p, -1.0),
    }))
}

pub fn run(a: ClincArgs, out: &mut dyn Write) -> Result<()> {
    if a.shots > 0 && (a.train_epochs.is_some() || a.method == "finetune") {
        return run_trained(a, out);
    }
    let started = std::time::Instant::now();
    let encoder = a.model.load()?;
    let ds = data::load(&a.data, Some(data::Format::Clinc))?;
    let val = encode_split(&encoder, joined(&ds, "val", "oos_val")?)?;
    let test = encode_split(&encoder, joined(&ds, "test", "oos_test")?)?;
    let train_all = &ds.split("train").context("CLINC150 file has no \"train\" split")?.examples;
    let result = if a.shots == 0 {
        let train = encode_split(&encoder, train_all.clone())?;
        evaluate(&encoder, &train.examples, &train.encoded, &val, &test)?
    } else {
        let mut runs = Vec::new();
        for seed in 1..=a.samples {
            let train = encode_split(&encoder, sample(train_all, a.shots, seed))?;
            runs.push(evaluate(&encoder, &train.examples, &train.encoded, &val, &test)?);
        }
        let avg = |field: &str| runs.iter().map(|r| r["test"][field].as_f64().unwrap_or(0.0)).sum::<f64>() / runs.len() as f64;
        serde_json::json!({
            "test": {"in_scope_accuracy": avg("in_scope_accuracy"), "oos_recall": avg("oos_recall")},
            "samples": runs,
        })
    };
    let shots = if a.shots == 0 { "full".to_string() } else { format!("{}shot", a.shots) };
    writeln!(
        out,
        "CLINC150 {shots}: in-scope accuracy {:.2}, oos recall {:.2} ({:.0}s)",
        result["test"]["in_scope_accuracy"].as_f64().unwrap_or(0.0),
        result["test"]["oos_recall"].as_f64().unwrap_or(0.0),
        started.elapsed().as_secs_f64()
    )?;
    let mut result = result;
    result["model"] = serde_json::json!(encoder.info().id);
    result["seconds"] = serde_json::json!(started.elapsed().as_secs_f64().round());
    crate::bench::merge_result(&a.out, &[&a.key, &shots], result)?;
    writeln!(out, "wrote {} [{}][{shots}]", a.out.display(), a.key)?;
    Ok(())
}

/// Few-shot CLINC150 with training on each sample (trained retrieval, or the baseline).
fn run_trained(a: ClincArgs, out: &mut dyn Write) -> Result<()> {
    let started = std::time::Instant::now();
    let ds = data::load(&a.data, Some(data::Format::Clinc))?;
    let val_ex = joined(&ds, "val", "oos_val")?;
    let test_ex = joined(&ds, "test", "oos_test")?;
    let train_all = &ds.split("train").context("CLINC150 file has no \"train\" split")?.examples;
    let epochs = a.train_epochs.unwrap_or(10.0);
    let mut runs = Vec::new();
    for seed in 1..=a.samples {
        let sampled = sample(train_all, a.shots, seed);
        let r = if a.method == "finetune" {
            finetune_on_sample(&a, &sampled, seed, epochs, &val_ex, &test_ex)?
        } else {
            let t = train_retriever_on_sample(&a, &sampled, seed, epochs)?;
            let train = encode_split(&t.encoder, sampled)?;
            let val = encode_split(&t.encoder, val_ex.clone())?;
            let test = encode_split(&t.encoder, test_ex.clone())?;
            evaluate(&t.encoder, &train.examples, &train.encoded, &val, &test)?
        };
        writeln!(out, "sample {seed}: {} ({:.0}s)", r["test"], started.elapsed().as_secs_f64())?;
        runs.push(r);
    }
    let avg = |field: &str| runs.iter().map(|r| r["test"][field].as_f64().unwrap_or(0.0)).sum::<f64>() / runs.len() as f64;
    let shots = format!("{}shot", a.shots);
    let result = serde_json::json!({
        "test": {"in_scope_accuracy": avg("in_scope_accuracy"), "oos_recall": avg("oos_recall")},
        "samples": runs,
        "model": a.model.dir()?.display().to_string(),
        "method": a.method, "train_epochs": epochs, "train_lr": a.train_lr, "train_batch_size": a.train_batch_size,
        "seconds": started.elapsed().as_secs_f64().round(),
    });
    writeln!(out, "CLINC150 {shots} ({}): in-scope accuracy {:.2}, oos recall {:.2}", a.method, avg("in_scope_accuracy"), avg("oos_recall"))?;
    crate::bench::merge_result(&a.out, &[&a.key, &shots], result)?;
    writeln!(out, "wrote {} [{}][{shots}]", a.out.display(), a.key)?;
    Ok(())
}
