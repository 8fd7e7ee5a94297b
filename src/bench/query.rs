//! End-to-end query speed: encode, retrieve neighbours for every candidate span,
//! decode, and build the justifications, for utterances of a labeled split.
//! Single-utterance latency (p50, p99) and batched throughput, side by side with the
//! PyTorch peer (`benches/peers/query_peer.py`): the same method written with HF
//! transformers + PyTorch + numpy, measured after ours in the same invocation, with
//! the same thread count, utterances and settings.
//!
//! The peer builds its own index, untimed, from the first N examples of `--train`, N
//! being the example count of `--index`; we check that the index holds exactly those
//! texts, in order, so both sides search the same collection. The peer always searches
//! exactly (numpy matrix products); our index uses the backend it was built with, which
//! by default (`Auto`) is HNSW (usearch, approximate) at 20,000 span vectors and more:
//! SNIPS train's 623k spans are searched approximately here and exactly by the peer.
//! The report says which (`index.backend`, `search_note`).
//!
//! Same method check: the peer writes its predictions for the batched run, and we report
//! how often its intents and slots agree with ours (`agreement`). Same model in f32, so
//! agreement should be high; float differences decide near ties, and HNSW misses some
//! neighbours exact search finds.
//!
//! Threads: as in the encoder benchmark ([`super::encoder`]), candle's pools are sized
//! from the environment before the model loads and our work runs in a local rayon pool
//! of `--threads`; the peer gets `torch.set_num_threads` and OMP/MKL/OpenBLAS/rayon
//! variables of the same count.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser as _;
use clap::Args;
use nearspan_index::{BackendKind, SpanIndex};
use serde_json::{json, Value};

use super::encoder::{check_threads, command_line, cpu_model, peer_json, pin_candle_threads, ratio, resolve_script, round, CpuSample};
use crate::cli::{ModelArg, QuerySettings};
use crate::detector::SpanDetector;
use crate::scorer::SlotScorer;
use crate::data::{Example, Format};
use crate::decode::Strategy;
use crate::encoder::Encoder;
use crate::labeler::{self, BuildConfig, Prediction, QueryConfig};

#[derive(Debug, Args)]
pub struct QueryBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A prebuilt index, e.g. of SNIPS train:
    /// `nearspan index build --examples ../shared/data/snips --split train --out snips_train.nsi`.
    #[arg(long)]
    pub index: PathBuf,
    /// Utterances to label: any labeled dataset (default split: test); a JointBERT
    /// folder for the peer.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub split: Option<String>,
    /// Utterances timed one at a time.
    #[arg(long, default_value_t = 300)]
    pub single: usize,
    /// Times the whole split is labeled in batches, on both sides; the throughput reported
    /// is the median pass's (one pass over SNIPS test is under a second, short enough for
    /// the host's noise to move it by a tenth).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100).map(|v| v as usize))]
    pub passes: usize,
    /// The JointBERT data the index was built from (its train split when it has several):
    /// the peer indexes its first N examples, N = the index's example count.
    /// Default: ../shared/data/snips/train.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Threads for both implementations.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024).map(|v| v as usize))]
    pub threads: usize,
    /// Python of the venv holding torch, transformers and numpy (see benches/peers/README.md).
    #[arg(long, default_value = "/work/peers-venv/bin/python")]
    pub python: PathBuf,
    /// Measure nearspan only.
    #[arg(long)]
    pub no_peer: bool,
    /// The peer script.
    #[arg(long, default_value = "benches/peers/query_peer.py")]
    pub peer_script: PathBuf,
    /// Results file: the report goes under its "query" key, other keys are kept.
    #[arg(long, default_value = "benches/results/query.json")]
    pub out: PathBuf,
    #[command(flatten)]
    pub settings: QuerySettings,
}

pub fn run(a: QueryBenchArgs, out: &mut dyn Write) -> Result<()> {
    let report = measure(&a)?;
    write_summary(out, &report)?;
    crate::bench::merge_result(&a.out, &["query"], report)?;
    writeln!(out, "wrote {}", a.out.display())?;
    Ok(())
}

/// Runs the whole benchmark (ours, then the peer unless `--no-peer`) and returns the
/// report that [`run`] stores under "query": nearspan's `query_p50_ms`, `query_p99_ms`,
/// `query_throughput_utt_per_s` at the top, the peer's result under `peer`, the ratios
/// and the prediction agreement.
///
/// It sets candle's thread variables to `--threads` first, so it must run before any
/// tensor operation of the process, or after others that used the same thread count
/// (else it refuses to measure).
pub fn measure(a: &QueryBenchArgs) -> Result<Value> {
    let cfg = a.settings.config()?;
    let command = command_line();
    let load_at_start = super::loadavg_1min();
    pin_candle_threads(a.threads);

    let mut encoder = a.model.load()?;
    let mut index = crate::cli::open_index(&a.index, &encoder)?;
    a.settings.apply(&mut index);
    let build = crate::cli::build_config(&index)?;
    let (format, test) = crate::cli::load_split(&a.data, a.split.as_deref(), "test")?;
    if test.examples.is_empty() {
        bail!("{}: split {:?} has no utterances", a.data.display(), test.name);
    }
    // Everything the peer needs is checked before anything is measured.
    let peer = if a.no_peer { None } else { Some(Peer::new(a, &encoder, &index, &build, &cfg, format, &test.source)?) };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()
        .context("cannot start the benchmark's rayon thread pool")?;
    let thread_check = check_threads(&pool, a.threads)?;

    let load = super::loadavg_1min();
    let cpu = CpuSample::now();
    let detector = a.settings.load_detector(&mut encoder)?;
    let scorer = a.settings.load_scorer()?;
    let ours = || measure_ours(&encoder, &index, &test.examples, &build, &cfg, (detector.as_ref(), scorer.as_ref()), a.single, a.passes);
    let (ours, predictions) = pool.install(ours)?;
    let mut report = ours;
    report["loadavg_before"] = json!(load);
    report["other_processes_cores_busy"] = json!(cpu.and_then(|c| c.others_busy()));
    report["loadavg_1min_after"] = json!(super::loadavg_1min());

    if let Some(peer) = &peer {
        let load = super::loadavg_1min();
        let cpu = CpuSample::now();
        let (mut theirs, their_predictions) = peer.run()?;
        theirs["loadavg_before"] = json!(load);
        theirs["other_processes_cores_busy"] = json!(cpu.and_then(|c| c.others_busy()));
        report["latency_ratio_p50"] = ratio(theirs["query_p50_ms"].as_f64(), report["query_p50_ms"].as_f64());
        report["throughput_ratio"] =
            ratio(report["query_throughput_utt_per_s"].as_f64(), theirs["query_throughput_utt_per_s"].as_f64());
        report["ratio_meaning"] = json!(
            "latency_ratio_p50 = peer p50 / nearspan p50, throughput_ratio = nearspan / peer utterances/s: above 1, nearspan is faster"
        );
        report["agreement"] = agreement(&predictions, &their_predictions)?;
        report["peer"] = theirs;
    }

    let backend = index.backend();
    let info = encoder.info();
    report["index"] = json!({
        "path": a.index,
        "examples": index.n_examples(),
        "spans": index.n_spans(),
        "backend": backend.to_string(),
        "max_width": build.max_width,
        "pooling": build.pooling.name(),
        "o_spans": build.index_o_spans,
    });
    if let Some(m) = cfg.prefilter {
        report["search_note"] = json!(format!(
            "both search spans exactly among the spans of the {m} examples nearest each utterance (--prefilter), of {} spans in all",
            index.n_spans()
        ));
    } else if backend != BackendKind::Exact {
        report["search_note"] = json!(format!(
            "nearspan searches the {} span vectors with {backend} (HNSW, approximate); the peer searches exactly",
            index.n_spans()
        ));
    }
    report["data"] = json!({ "path": a.data, "split": test.name, "utterances": test.examples.len() });
    report["settings"] = json!({
        "k": cfg.k, "threshold": cfg.threshold, "o_margin": cfg.o_margin, "decoder": cfg.strategy,
        "intent_k": cfg.intent_k, "intent_aggregation": cfg.intent_aggregation, "oos_threshold": cfg.oos_threshold,
        "explain": cfg.explain, "batch_size": cfg.batch_size, "prefilter": cfg.prefilter,
        "halves_precision": a.settings.halves_precision.to_string(),
        "detector": a.settings.detector, "detector_weight": cfg.detector_weight, "scorer": a.settings.scorer
    });
    report["threads"] = json!(a.threads);
    report["thread_check"] = thread_check;
    report["machine"] = json!({
        "cpu": cpu_model(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "loadavg_at_start": load_at_start,
    });
    report["model"] = json!({ "id": info.id, "dir": info.dir.display().to_string(), "weights_sha256": info.weights_sha256 });
    report["nearspan_version"] = json!(env!("CARGO_PKG_VERSION"));
    report["command"] = json!(command);
    Ok(report)
}

/// Our side: 8 untimed utterances, then `single` utterances labeled one at a time
/// (cycling through the split), then the whole split labeled in one call (encoder
/// batches of `cfg.batch_size`), `passes` times. Returns the timings (the median pass's
/// throughput) and the batched predictions.
fn measure_ours(
    encoder: &Encoder,
    index: &SpanIndex,
    examples: &[Example],
    build: &BuildConfig,
    cfg: &QueryConfig,
    learned: (Option<&SpanDetector>, Option<&SlotScorer>),
    single: usize,
    passes: usize,
) -> Result<(Value, Vec<Prediction>)> {
    // Warm-up: page in the weights and the index.
    labeler::label_examples(encoder, index, &examples[..examples.len().min(8)], build, cfg, learned.0, learned.1)?;
    let mut latencies: Vec<f64> = examples
        .iter()
        .cycle()
        .take(single)
        .map(|ex| {
            let t = Instant::now();
            labeler::label_examples(encoder, index, std::slice::from_ref(ex), build, cfg, learned.0, learned.1).map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    latencies.sort_by(f64::total_cmp);
    let mut pass_rates = Vec::with_capacity(passes);
    let mut predictions = Vec::new();
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let labeled = labeler::label_examples(encoder, index, examples, build, cfg, learned.0, learned.1)?;
        pass_rates.push(labeled.len() as f64 / t.elapsed().as_secs_f64());
        if !predictions.is_empty() && labeled != predictions {
            bail!("two batched passes disagree: labeling is not deterministic");
        }
        predictions = labeled;
    }
    // The same batched work again in its two phases, so the report says where the time
    // goes: the encoder's forward passes, then search and decoding of every utterance.
    let t = Instant::now();
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let encoded = encoder.encode(&texts, cfg.batch_size)?;
    let encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let retrieved = labeler::retrieve_encoded(index, examples, &encoded, build, cfg, learned.0);
    let again: Vec<Prediction> =
        examples.iter().zip(&retrieved).map(|(ex, r)| labeler::decide_with(index, ex, r, cfg, learned.1)).collect();
    let search_s = t.elapsed().as_secs_f64();
    if again != predictions {
        bail!("the batched run and its two-phase rerun disagree: labeling is not deterministic");
    }
    let per_utt_ms = |s: f64| round(s * 1e3 / examples.len() as f64, 4);
    let report = json!({
        "impl": format!("nearspan ({} encoder products, {} graph, cpu)", encoder.precision().name(), index.params().graph_precision),
        "ef_search": index.params().ef_search,
        "query_p50_ms": round(super::percentile(&latencies, 50.0), 3),
        "query_p99_ms": round(super::percentile(&latencies, 99.0), 3),
        "query_throughput_utt_per_s": round(super::percentile(&sorted(&pass_rates), 50.0), 2),
        "query_throughput_per_pass": pass_rates.iter().map(|&r| round(r, 2)).collect::<Vec<_>>(),
        "utterances_single": latencies.len(),
        "utterances_batched": predictions.len(),
        "batch_size": cfg.batch_size,
        "batched_encode_ms_per_utt": per_utt_ms(encode_s),
        "batched_search_decode_ms_per_utt": per_utt_ms(search_s),
    });
    Ok((report, predictions))
}

fn sorted(xs: &[f64]) -> Vec<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// The PyTorch peer and the arguments that make it run our method on our data.
struct Peer {
    python: PathBuf,
    script: PathBuf,
    args: Vec<String>,
    threads: usize,
}

impl Peer {
    fn new(
        a: &QueryBenchArgs,
        encoder: &Encoder,
        index: &SpanIndex,
        build: &BuildConfig,
        cfg: &QueryConfig,
        test_format: Format,
        test_dir: &Path,
    ) -> Result<Self> {
        let no_peer = "or pass --no-peer";
        if cfg.strategy != Strategy::Greedy {
            bail!("the query peer implements only --decoder greedy; {no_peer}");
        }
        if test_format != Format::JointBert {
            bail!("{}: the query peer reads JointBERT folders (seq.in, seq.out, label); {no_peer}", a.data.display());
        }
        let train_path = a.train.clone().unwrap_or_else(|| crate::paths::shared_data_dir().join("snips/train"));
        let (train_format, train) = crate::cli::load_split(&train_path, None, "train")?;
        if train_format != Format::JointBert {
            bail!("{}: the query peer reads JointBERT folders; pass --train, {no_peer}", train_path.display());
        }
        check_index_holds(index, &train.examples, &train.source)?;
        let script = resolve_script(&a.peer_script)?;
        if !a.python.is_file() {
            bail!("{}: no such Python; create the peers venv (benches/peers/README.md), pass --python, {no_peer}", a.python.display());
        }
        let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf()).display().to_string();
        let mut args = vec![
            "--model".into(), abs(&encoder.info().dir),
            "--train".into(), abs(&train.source),
            "--max-train".into(), index.n_examples().to_string(),
            "--test".into(), abs(test_dir),
            "--single".into(), a.single.to_string(),
            "--passes".into(), a.passes.to_string(),
            "--batch-size".into(), cfg.batch_size.to_string(),
            "--threads".into(), a.threads.to_string(),
            "--max-width".into(), build.max_width.to_string(),
            "--pooling".into(), build.pooling.name().into(),
            "--k".into(), cfg.k.to_string(),
            "--threshold".into(), cfg.threshold.to_string(),
            "--o-margin".into(), cfg.o_margin.to_string(),
            "--intent-k".into(), cfg.intent_k.to_string(),
            "--intent-aggregation".into(), serde_json::to_value(cfg.intent_aggregation)?.as_str().unwrap_or("max").into(),
            "--explain".into(), cfg.explain.to_string(),
        ];
        if !build.index_o_spans {
            args.push("--no-o-spans".into());
        }
        if let Some(t) = cfg.oos_threshold {
            args.extend(["--oos-threshold".into(), t.to_string()]);
        }
        if let Some(m) = cfg.prefilter {
            args.extend(["--prefilter".into(), m.to_string()]);
        }
        Ok(Self { python: a.python.clone(), script, args, threads: a.threads })
    }

    /// Runs the peer; returns its JSON line and its predictions for the batched run.
    fn run(&self) -> Result<(Value, Vec<Prediction>)> {
        let predictions_path = std::env::temp_dir().join(format!("nearspan-query-peer-{}.jsonl", std::process::id()));
        let t = self.threads.to_string();
        let output = Command::new(&self.python)
            .arg(&self.script)
            .args(&self.args)
            .arg("--predictions-out")
            .arg(&predictions_path)
            .env("OMP_NUM_THREADS", &t)
            .env("MKL_NUM_THREADS", &t)
            .env("OPENBLAS_NUM_THREADS", &t)
            .env("RAYON_NUM_THREADS", &t)
            .output()
            .with_context(|| format!("{}: cannot start the peer", self.python.display()))?;
        let result = peer_json(&self.script, &output, "(query)");
        let predictions = result.as_ref().ok().map(|_| read_predictions(&predictions_path));
        let _ = std::fs::remove_file(&predictions_path);
        Ok((result?, predictions.unwrap_or_else(|| Ok(Vec::new()))?))
    }
}

/// Checks that `index` holds the first `index.n_examples()` of `train`, in order, so
/// that the peer's index of those examples is the same collection.
fn check_index_holds(index: &SpanIndex, train: &[Example], train_dir: &Path) -> Result<()> {
    let n = index.n_examples();
    if n > train.len() {
        bail!("the index has {n} examples, {} has only {}; pass --train the data it was built from", train_dir.display(), train.len());
    }
    for (i, ex) in train[..n].iter().enumerate() {
        let stored = index.example(nearspan_index::ExampleId(i as u32));
        if stored.text != ex.text || stored.intent != ex.intent {
            bail!(
                "index example {i} is {:?}, example {i} of {} is {:?}: the peer needs an index of the first N \
                 examples of --train, in order; pass --train the data the index was built from",
                stored.text,
                train_dir.display(),
                ex.text
            );
        }
    }
    Ok(())
}

fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: the peer wrote no predictions", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}: line {}: not a prediction", path.display(), i + 1)))
        .collect()
}

/// How often the peer's predictions agree with ours, utterance by utterance.
///
/// - `intent_agreement`: same intent label.
/// - `slot_frame_agreement`: exactly the same slots (offsets and labels).
/// - `slot_agreement_f1`: 2 x common slots / (our slots + its slots), over all utterances.
/// - `intent_score_max_abs_diff`: the largest intent score difference where the intents agree.
fn agreement(ours: &[Prediction], theirs: &[Prediction]) -> Result<Value> {
    if ours.len() != theirs.len() {
        bail!("the peer labeled {} utterances, nearspan {}", theirs.len(), ours.len());
    }
    let (mut intents, mut frames, mut common, mut n_ours, mut n_theirs) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut score_diff = 0f32;
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        if o.text != t.text {
            bail!("utterance {i}: nearspan labeled {:?}, the peer {:?}", o.text, t.text);
        }
        match (&o.intent, &t.intent) {
            (Some(a), Some(b)) if a.label == b.label => {
                intents += 1;
                score_diff = score_diff.max((a.score - b.score).abs());
            }
            (None, None) => intents += 1,
            _ => {}
        }
        let key = |s: &labeler::SlotPrediction| (s.start, s.end, s.label.clone());
        let theirs_slots: Vec<_> = t.slots.iter().map(key).collect();
        let same = o.slots.iter().filter(|s| theirs_slots.contains(&key(s))).count();
        common += same;
        n_ours += o.slots.len();
        n_theirs += t.slots.len();
        frames += usize::from(same == o.slots.len() && same == t.slots.len());
    }
    let n = ours.len().max(1) as f64;
    let f1 = if n_ours + n_theirs == 0 { 1.0 } else { 2.0 * common as f64 / (n_ours + n_theirs) as f64 };
    Ok(json!({
        "utterances": ours.len(),
        "intent_agreement": round(intents as f64 / n, 4),
        "slot_frame_agreement": round(frames as f64 / n, 4),
        "slot_agreement_f1": round(f1, 4),
        "slots_nearspan": n_ours,
        "slots_peer": n_theirs,
        "slots_common": common,
        "intent_score_max_abs_diff": score_diff,
    }))
}

fn write_summary(out: &mut dyn Write, r: &Value) -> Result<()> {
    let fmt = |v: &Value, d: usize| v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.d$}"));
    writeln!(
        out,
        "end-to-end query, {} threads, index {} examples / {} spans ({}), load before {}",
        r["threads"],
        r["index"]["examples"],
        r["index"]["spans"],
        r["index"]["backend"].as_str().unwrap_or("?"),
        fmt(&r["loadavg_before"], 2)
    )?;
    writeln!(out, "{:<9}  {:>8}  {:>8}  {:>10}  {:>6}  {:>7}", "impl", "p50 ms", "p99 ms", "utt/s", "load1", "others")?;
    for (name, row) in [("nearspan", r), ("pytorch", &r["peer"])] {
        if row.is_null() {
            continue;
        }
        writeln!(
            out,
            "{:<9}  {:>8}  {:>8}  {:>10}  {:>6}  {:>7}",
            name,
            fmt(&row["query_p50_ms"], 2),
            fmt(&row["query_p99_ms"], 2),
            fmt(&row["query_throughput_utt_per_s"], 1),
            fmt(&row["loadavg_before"], 2),
            fmt(&row["other_processes_cores_busy"], 2),
        )?;
    }
    writeln!(
        out,
        "({} utterances one at a time, {} in batches of {}; batched, per utterance: encoder {} ms, search and decoding {} ms)",
        r["utterances_single"],
        r["utterances_batched"],
        r["batch_size"],
        fmt(&r["batched_encode_ms_per_utt"], 3),
        fmt(&r["batched_search_decode_ms_per_utt"], 3)
    )?;
    if !r["peer"].is_null() {
        writeln!(
            out,
            "nearspan/pytorch: p50 latency x{}, throughput x{} (>1: nearspan faster); peer setup {} s",
            fmt(&r["latency_ratio_p50"], 2),
            fmt(&r["throughput_ratio"], 2),
            fmt(&r["peer"]["setup_s"], 1)
        )?;
        let g = &r["agreement"];
        writeln!(
            out,
            "agreement with the peer: intents {}, slot frames {}, slot F1 {} ({} / {} slots in common)",
            fmt(&g["intent_agreement"], 4),
            fmt(&g["slot_frame_agreement"], 4),
            fmt(&g["slot_agreement_f1"], 4),
            g["slots_common"],
            g["slots_nearspan"]
        )?;
    }
    if let Some(note) = r["search_note"].as_str() {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}
