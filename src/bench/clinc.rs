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

pub fn run(a: ClincArgs, out: &mut dyn Write) -> Result<()> {
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
