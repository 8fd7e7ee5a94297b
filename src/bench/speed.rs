//! `nearspan bench speed`: the whole speed picture in one run, each part measured by its
//! own benchmark (which writes its own results file) and summarized in
//! `benches/results/speed.json` under the keys BENCHMARKS.md quotes:
//!
//! - the encoder against PyTorch ([`super::encoder`], `encoder.json`): throughput at
//!   batch 32 and p50 latency at batch 1 as ratios, for every precision this CPU runs;
//! - the end-to-end query ([`super::query`], `query.json`): p50/p99 of one SNIPS test
//!   utterance and batched throughput, over an index the caller names;
//! - the HNSW index at 10^6 vectors, then IVF on the same vectors ([`super::hnsw`],
//!   written into `speed.json` itself);
//! - the matrix products of one encoder layer at each precision, in GFLOP/s, beside the
//!   encoder's FLOPs per token, so the write-up can say how close each path gets to the
//!   machine.
//!
//! Parts run one after another, never overlapping, so each sees the same machine.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser};
use serde_json::{json, Value};

use crate::encoder::matmul::{PackedWeight, Precision};

#[derive(Debug, Args)]
pub struct SpeedArgs {
    #[command(flatten)]
    pub model: crate::cli::ModelArg,
    /// Index for the end-to-end query part (e.g. of SNIPS train: `nearspan index build
    /// --examples ../shared/data/snips --split train --out snips_train.nsi`).
    #[arg(long)]
    pub query_index: Option<PathBuf>,
    /// Labeled data whose test split is queried.
    #[arg(long, default_value = "../shared/data/snips")]
    pub query_data: PathBuf,
    /// Minimum timed seconds per encoder measurement.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Threads for every part (and for the peers).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Leave out the encoder part.
    #[arg(long)]
    pub skip_encoder: bool,
    /// Leave out the HNSW and IVF part (its first run builds a 10^6-vector graph: about 20 min on 2 cores; later runs load it).
    #[arg(long)]
    pub skip_hnsw: bool,
    /// Graph precision of the HNSW part (bf16: half the memory traffic per distance).
    #[arg(long, default_value = "bf16")]
    pub hnsw_graph_precision: nearspan_index::GraphPrecision,
    /// Leave out the end-to-end query part (also left out when no --query-index is given).
    #[arg(long)]
    pub skip_query: bool,
    /// Run the query part with `--prefilter N`: span neighbours searched exactly among the
    /// spans of the N examples nearest each utterance (no span graph needed).
    #[arg(long, value_name = "N")]
    pub query_prefilter: Option<u32>,
    /// Measure nearspan only (the encoder part; the query part never runs its peer here).
    #[arg(long)]
    pub no_peer: bool,
    #[arg(long, default_value = "benches/results/speed.json")]
    pub out: PathBuf,
}

/// Parses a sub-benchmark's command line exactly as the CLI would, so `bench speed` runs
/// each part with the options a person would type.
fn sub_args<T: Args>(name: &str, args: &[String]) -> Result<T> {
    #[derive(Parser)]
    struct Wrapper<T: Args> {
        #[command(flatten)]
        inner: T,
    }
    let argv = std::iter::once(name.to_string()).chain(args.iter().cloned());
    Ok(Wrapper::<T>::try_parse_from(argv)
        .with_context(|| format!("bench speed: bad arguments for {name}"))?
        .inner)
}

fn model_args(model: &crate::cli::ModelArg) -> Vec<String> {
    model
        .model
        .iter()
        .flat_map(|m| ["--model".to_string(), m.display().to_string()])
        .collect()
}

pub fn run(a: SpeedArgs, out: &mut dyn Write) -> Result<()> {
    let command = super::encoder::command_line();
    let results_dir = a.out.parent().map(PathBuf::from).unwrap_or_default();
    let fastest = if Precision::Bf16.is_supported() {
        Precision::Bf16
    } else {
        Precision::F32
    };
    let threads = a.threads.to_string();
    let mut summary = json!({ "command": command, "threads": a.threads, "loadavg_before": super::loadavg_1min() });

    if !a.skip_encoder {
        writeln!(out, "== encoder ==")?;
        let path = results_dir.join("encoder.json");
        let mut args = model_args(&a.model);
        args.extend([
            "--seconds".into(),
            a.seconds.to_string(),
            "--threads".into(),
            threads.clone(),
        ]);
        args.extend(["--out".into(), path.display().to_string()]);
        if a.no_peer {
            args.push("--no-peer".into());
        }
        super::encoder::run(sub_args("encoder", &args)?, out)?;
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        summarize_encoder(&report, &mut summary);
        summary["matmul"] = matmul_rates(a.threads)?;
    }
    if !a.skip_query {
        match &a.query_index {
            None => writeln!(out, "== query: skipped (no --query-index) ==")?,
            Some(index) => {
                writeln!(out, "== end-to-end query ({} products) ==", fastest.name())?;
                let path = results_dir.join("query.json");
                let mut args = model_args(&a.model);
                args.extend([
                    "--precision".into(),
                    fastest.name().into(),
                    "--index".into(),
                    index.display().to_string(),
                ]);
                args.extend([
                    "--data".into(),
                    a.query_data.display().to_string(),
                    "--out".into(),
                    path.display().to_string(),
                ]);
                // The query peer searches exactly (numpy): at a full-size index that takes
                // minutes per pass, so its side-by-side run is `bench query` over a smaller
                // index (BENCHMARKS.md), not part of this summary.
                args.extend(["--threads".into(), threads.clone(), "--no-peer".into()]);
                if let Some(m) = a.query_prefilter {
                    args.extend(["--prefilter".into(), m.to_string()]);
                }
                super::query::run(sub_args("query", &args)?, out)?;
                let report: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                let q = &report["query"];
                for key in ["query_p50_ms", "query_p99_ms", "query_throughput_utt_per_s"] {
                    summary[key] = q[key].clone();
                }
                summary["query_precision"] = json!(fastest.name());
                summary["query_index"] = q["index"].clone();
                summary["query_prefilter"] = json!(a.query_prefilter);
            }
        }
    }
    // The HNSW part merges its own keys into the same file; the summary is merged after it.
    if !a.skip_hnsw {
        writeln!(out, "== HNSW at 10^6 ==")?;
        let args = vec![
            "--out".to_string(),
            a.out.display().to_string(),
            "--graph-precision".to_string(),
            a.hnsw_graph_precision.to_string(),
        ];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(a.threads)
            .build()?;
        let mut log = Vec::new();
        let done = pool.install(|| super::hnsw::run(sub_args("hnsw", &args)?, &mut log));
        out.write_all(&log)?;
        done?;
        // The same vectors and queries through IVF (built in seconds, so never cached).
        writeln!(out, "== IVF at 10^6 ==")?;
        let args = vec!["--out".to_string(), a.out.display().to_string(), "--backend".to_string(), "ivf".to_string()];
        let mut log = Vec::new();
        let done = pool.install(|| super::hnsw::run(sub_args("hnsw", &args)?, &mut log));
        out.write_all(&log)?;
        done?;
    }
    summary["loadavg_after"] = json!(super::loadavg_1min());
    if let Value::Object(map) = summary {
        for (key, value) in map {
            super::merge_result(&a.out, &[key.as_str()], value)?;
        }
    }
    writeln!(out, "wrote {}", a.out.display())?;
    Ok(())
}

/// Headline encoder ratios: the fastest precision's, plus each precision's own.
fn summarize_encoder(report: &Value, summary: &mut Value) {
    let rows = report["results"].as_array().cloned().unwrap_or_default();
    let ratio = |batch: u64, precision: &str, key: &str| {
        rows.iter()
            .find(|r| r["batch"] == batch && r["precision"] == precision)
            .map_or(Value::Null, |r| r[key].clone())
    };
    let mut best: Option<(String, f64)> = None;
    for p in [Precision::F32, Precision::Bf16] {
        let name = p.name();
        let b32 = ratio(32, name, "throughput_ratio");
        let b1 = ratio(1, name, "latency_ratio");
        if b32.is_null() && b1.is_null() {
            continue;
        }
        summary[format!("encoder_b32_throughput_ratio_vs_pytorch_{name}")] = b32.clone();
        summary[format!("encoder_b1_latency_ratio_vs_pytorch_{name}")] = b1;
        if let Some(v) = b32.as_f64() {
            if best.as_ref().is_none_or(|(_, b)| v > *b) {
                best = Some((name.to_string(), v));
            }
        }
    }
    if let Some((name, _)) = best {
        summary["encoder_b32_throughput_ratio_vs_pytorch"] =
            summary[format!("encoder_b32_throughput_ratio_vs_pytorch_{name}")].clone();
        summary["encoder_b1_latency_ratio_vs_pytorch"] =
            summary[format!("encoder_b1_latency_ratio_vs_pytorch_{name}")].clone();
        summary["encoder_headline_precision"] = json!(name);
    }
    summary["encoder_results"] = json!("encoder.json");
}

/// GFLOP/s of the four products of one MiniLM layer (384 rows: 32 SNIPS utterances of
/// about 12 tokens) at each supported precision, on `threads` threads and on one.
fn matmul_rates(threads: usize) -> Result<Value> {
    const ROWS: usize = 384;
    // (name, out, in) of all-MiniLM-L6-v2's layer.
    let shapes = [
        ("qkv", 1152, 384),
        ("attention_out", 384, 384),
        ("up", 1536, 384),
        ("down", 384, 1536),
    ];
    let mut rows = Vec::new();
    for precision in [Precision::F32, Precision::Bf16]
        .into_iter()
        .filter(|p| p.is_supported())
    {
        for t in [1, threads] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
            let (mut flops, mut seconds) = (0f64, 0f64);
            for &(_, n, k) in &shapes {
                let x: Vec<f32> = (0..ROWS * k)
                    .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                    .collect();
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i % 89) as f32 - 44.0) / 890.0)
                    .collect();
                let weight = PackedWeight::new(w, n, k, precision);
                let mut y = vec![0f32; ROWS * n];
                let reps = 20;
                let s = pool.install(|| {
                    weight.matmul(&x, ROWS, &mut y); // warm-up
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        weight.matmul(&x, ROWS, &mut y);
                    }
                    t0.elapsed().as_secs_f64()
                });
                std::hint::black_box(&y);
                flops += 2.0 * (ROWS * n * k * reps) as f64;
                seconds += s;
            }
            rows.push(json!({ "precision": precision.name(), "threads": t, "gflops": (flops / seconds / 1e9 * 10.0).round() / 10.0 }));
        }
    }
    Ok(
        json!({ "rows": ROWS, "layer_shapes": shapes.map(|(n, o, i)| json!({"name": n, "out": o, "in": i})), "results": rows }),
    )
}
