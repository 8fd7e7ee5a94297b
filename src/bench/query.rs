//! End-to-end query speed: encode, retrieve neighbours for every candidate span,
//! decode, and build the justifications, for utterances of a labeled split.
//! Single-utterance latency (p50, p99) and batched throughput.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use crate::cli::{ModelArg, QuerySettings};
use crate::labeler;

#[derive(Debug, Args)]
pub struct QueryBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A prebuilt index (e.g. of SNIPS train).
    #[arg(long)]
    pub index: PathBuf,
    /// Utterances to label: any labeled dataset (default split: test).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub split: Option<String>,
    /// Utterances timed one at a time.
    #[arg(long, default_value_t = 300)]
    pub single: usize,
    #[arg(long, default_value = "benches/results/query.json")]
    pub out: PathBuf,
    #[command(flatten)]
    pub settings: QuerySettings,
}

pub fn run(a: QueryBenchArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = a.settings.config()?;
    let encoder = a.model.load()?;
    let index = crate::cli::open_index(&a.index, &encoder)?;
    let build = crate::cli::build_config(&index)?;
    let examples = crate::cli::load_examples(&a.data, a.split.as_deref(), "test")?;
    // Warm-up: page in the weights and the index.
    labeler::label_examples(&encoder, &index, &examples[..examples.len().min(8)], &build, &cfg)?;
    let mut latencies: Vec<f64> = examples
        .iter()
        .cycle()
        .take(a.single)
        .map(|ex| {
            let t = Instant::now();
            labeler::label_examples(&encoder, &index, std::slice::from_ref(ex), &build, &cfg).map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    latencies.sort_by(f64::total_cmp);
    let t = Instant::now();
    let predictions = labeler::label_examples(&encoder, &index, &examples, &build, &cfg)?;
    let batch_s = t.elapsed().as_secs_f64();
    let throughput = predictions.len() as f64 / batch_s;
    let (p50, p99) = (super::percentile(&latencies, 50.0), super::percentile(&latencies, 99.0));
    writeln!(out, "single utterance: p50 {p50:.2} ms, p99 {p99:.2} ms ({} utterances)", latencies.len())?;
    writeln!(out, "batched: {throughput:.1} utterances/s ({} utterances, batch size {})", predictions.len(), cfg.batch_size)?;
    let result = serde_json::json!({
        "query_p50_ms": p50, "query_p99_ms": p99, "query_throughput_utt_per_s": throughput,
        "utterances_single": latencies.len(), "utterances_batched": predictions.len(), "batch_size": cfg.batch_size,
        "index": {"path": a.index, "examples": index.n_examples(), "spans": index.n_spans(), "backend": index.backend().to_string()},
        "loadavg_1min_after": super::loadavg_1min(),
        "threads": rayon::current_num_threads(),
    });
    crate::bench::merge_result(&a.out, &["query"], result)?;
    writeln!(out, "wrote {}", a.out.display())?;
    Ok(())
}
