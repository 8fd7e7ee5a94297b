//! Command-line interface: clap arguments, validated into settings, then one library
//! call per subcommand. Output goes to the writer it is given; errors are returned
//! (the binary prints them once).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use nearspan_index::{BackendKind, HnswParams, SpanIndex};

use crate::data::{self, Example, Format};
use crate::decode::Strategy;
use crate::encoder::{Encoder, SpanPooling};
use crate::eval::Evaluator;
use crate::labeler::{self, BuildConfig, IntentAggregation, Prediction, QueryConfig};

pub(crate) mod train;

#[derive(Debug, Parser)]
#[command(name = "nearspan", version, about = "Few-shot intent and slot labeling by retrieving labeled example spans")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Encode texts: one JSON line per text with tokens, offsets and the sentence vector.
    Encode(EncodeArgs),
    /// Combine encoders that share a tokenizer into one ensemble folder, usable wherever
    /// a model folder is: each token's vector is the members' vectors side by side.
    Ensemble(EnsembleArgs),
    /// Inspect datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Build, extend and describe span indexes.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Label utterances with intents and slots, explained by their nearest examples.
    Query(QueryArgs),
    /// Score predictions against gold data (from files, or by labeling with an index).
    Eval(EvalArgs),
    /// Fine-tune an encoder: the retrieval span encoder, or the fine-tuned baseline.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Run the benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve the labeler over HTTP, with a web playground at /.
    #[cfg(feature = "server")]
    Serve(crate::serve::ServeArgs),
}

#[derive(Debug, Args)]
pub struct EnsembleArgs {
    /// The ensemble folder to create (it must not hold a model or an ensemble already).
    #[arg(long)]
    pub out: PathBuf,
    /// Member model folders, in order (at least 2).
    #[arg(required = true, num_args = 2..)]
    pub members: Vec<PathBuf>,
}

/// `nearspan ensemble`: writes the manifest with absolute member paths (so the folder can
/// be read from anywhere), then loads it to prove the members fit together.
fn ensemble(a: EnsembleArgs, out: &mut dyn Write) -> Result<()> {
    use crate::encoder::ensemble::{Manifest, MANIFEST};
    for taken in [MANIFEST, "model.safetensors", "config.json"] {
        if a.out.join(taken).exists() {
            bail!("{}: already holds {taken}; choose a new folder", a.out.display());
        }
    }
    let members = a
        .members
        .iter()
        .map(|m| m.canonicalize().with_context(|| format!("{}: cannot read the member's folder", m.display())))
        .collect::<Result<Vec<_>>>()?;
    let manifest = Manifest::new(members);
    manifest.write(&a.out).with_context(|| format!("{}: cannot write {MANIFEST}", a.out.display()))?;
    match Encoder::load(&a.out) {
        Ok(e) => {
            let i = e.info();
            writeln!(out, "wrote {}: {} models, {}-dim token vectors", a.out.join(MANIFEST).display(), e.n_models(), i.hidden_size)?;
            Ok(())
        }
        Err(err) => {
            // Leave nothing behind that would fail to load later.
            let _ = std::fs::remove_file(a.out.join(MANIFEST));
            Err(err).context("the ensemble does not load; nothing written")
        }
    }
}

#[derive(Debug, Args)]
pub struct ModelArg {
    /// Model folder in Hugging Face layout (config.json, model.safetensors, tokenizer.json),
    /// or an ensemble folder (ensemble.json, made by `nearspan ensemble`).
    /// Default: $NEARSPAN_MODEL, ../shared/models/all-minilm-l6-v2 or models/all-minilm-l6-v2.
    #[arg(long, env = "NEARSPAN_MODEL")]
    pub model: Option<PathBuf>,
    /// Precision of the encoder's matrix products at inference: f32 (exact) or bf16
    /// (faster; needs Intel AMX or AVX512-BF16; costs accuracy, see BENCHMARKS.md).
    #[arg(long, env = "NEARSPAN_PRECISION", default_value = "f32")]
    pub precision: crate::encoder::Precision,
}

impl ModelArg {
    /// The model folder: --model, or the default one.
    pub(crate) fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(d) => Ok(d.clone()),
            None => crate::paths::default_model_dir().with_context(|| {
                format!(
                    "no model found (looked in {:?}); pass --model DIR or run scripts/setup",
                    crate::paths::default_model_candidates()
                )
            }),
        }
    }

    pub(crate) fn load(&self) -> Result<Encoder> {
        Ok(Encoder::load_with_precision(&self.dir()?, self.precision)?)
    }
}

#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Texts to encode.
    #[arg(required = true)]
    pub texts: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Counts per split, label inventories, span widths and a validation report.
    /// Exits non-zero on malformed input.
    Stats {
        /// A dataset file or folder.
        path: PathBuf,
        /// jointbert, fewshot, clinc, conll or jsonl (detected when omitted).
        #[arg(long)]
        format: Option<Format>,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Maximum span width in words.
    #[arg(long, default_value_t = crate::spans::DEFAULT_MAX_WIDTH, value_parser = clap::value_parser!(u32).range(1..=64).map(|v| v as usize))]
    pub max_width: usize,
    /// Span pooling: start-end (first ⊕ last sub-token), mean, or start-end-mean.
    #[arg(long, default_value = "start-end")]
    pub pooling: SpanPooling,
    /// Do not index non-slot spans; a threshold alone then decides what is a slot.
    #[arg(long)]
    pub no_o_spans: bool,
    /// exact, hnsw-rs, usearch, ivf (k-means lists of 8-bit codes, re-scored in f32) or
    /// auto (exact while small, then usearch).
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Precision of the HNSW graph's copy of the vectors (usearch): f32, or bf16 for half
    /// the memory and about twice the search speed (BENCHMARKS.md: the accuracy cost).
    #[arg(long, default_value = "f32")]
    pub graph_precision: nearspan_index::GraphPrecision,
}

impl BuildArgs {
    pub(crate) fn config(&self) -> BuildConfig {
        BuildConfig { max_width: self.max_width, pooling: self.pooling, index_o_spans: !self.no_o_spans }
    }

    pub(crate) fn hnsw_params(&self) -> HnswParams {
        HnswParams { graph_precision: self.graph_precision, ..HnswParams::default() }
    }
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    match s {
        "exact" => Ok(BackendKind::Exact),
        "hnsw-rs" | "hnsw_rs" => Ok(BackendKind::HnswRs),
        "usearch" => Ok(BackendKind::Usearch),
        "auto" => Ok(BackendKind::Auto),
        "ivf" => Ok(BackendKind::Ivf),
        other => Err(format!("unknown backend {other:?}; expected exact, hnsw-rs, usearch, ivf or auto")),
    }
}

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Build an index from labeled examples.
    Build {
        #[command(flatten)]
        model: ModelArg,
        /// Labeled examples, in any supported format (JSONL: one {"text","intent","spans"} per line).
        #[arg(long)]
        examples: PathBuf,
        /// Which split to index when EXAMPLES holds several (default: train, or the only one).
        #[arg(long)]
        split: Option<String>,
        /// The index file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Add labeled examples to an existing index (only they are encoded).
    Add {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        examples: PathBuf,
        #[arg(long)]
        split: Option<String>,
    },
    /// Counts of examples, spans and labels; encoder; format version.
    Info {
        #[arg(long)]
        index: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct QuerySettings {
    /// Neighbours retrieved per candidate span.
    #[arg(long, default_value_t = QueryConfig::default().k)]
    pub k: usize,
    /// Similarity below which a span is never a slot.
    #[arg(long, default_value_t = QueryConfig::default().threshold)]
    pub threshold: f32,
    /// A span is a slot when its slot similarity plus this margin beats its non-slot similarity.
    #[arg(long, default_value_t = QueryConfig::default().o_margin, allow_negative_numbers = true)]
    pub o_margin: f32,
    /// Greedy decoding ranks a candidate span by its slot similarity minus this times its
    /// non-slot similarity (0: by similarity alone; 1: by how far the slot evidence wins).
    #[arg(long, default_value_t = QueryConfig::default().o_penalty)]
    pub o_penalty: f32,
    /// greedy, greedy-unique-labels (greedy, each label at most once per utterance: the
    /// few-shot SNIPS headline's choice, BENCHMARKS.md) or best-average.
    #[arg(long, default_value = "greedy")]
    pub decoder: Strategy,
    /// Utterance neighbours retrieved for the intent.
    #[arg(long, default_value_t = QueryConfig::default().intent_k)]
    pub intent_k: usize,
    /// max or mean.
    #[arg(long, default_value = "max")]
    pub intent_aggregation: IntentAggregation,
    /// Answer "oos" when the best intent scores below this.
    #[arg(long)]
    pub oos_threshold: Option<f32>,
    /// Neighbours shown per decision.
    #[arg(long, default_value_t = 3)]
    pub explain: usize,
    /// Texts per encoder batch.
    #[arg(long, default_value_t = crate::encoder::DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=4096).map(|v| v as usize))]
    pub batch_size: usize,
    /// HNSW search list size (ef) for this run; default: the index's own (64 unless built
    /// otherwise). With the ivf backend: the lists scanned per query (default 4). Smaller
    /// is faster and misses more neighbours; no effect on exact search.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000).map(|v| v as usize))]
    pub ef: Option<usize>,
    /// Search span neighbours only among the spans of the N examples nearest the whole
    /// utterance (exactly, no span graph): several times faster on large indexes, at an
    /// accuracy cost measured in BENCHMARKS.md. Default: search all spans.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|v| v as usize))]
    pub prefilter: Option<usize>,
    /// Precision of the span halves that exact start ⊕ end span search reads (with
    /// --prefilter, or every span of an exact index): f32, or bf16 for half the memory
    /// read per query, each similarity off by about 1e-3 (accuracy cost in BENCHMARKS.md).
    #[arg(long, value_name = "PRECISION", default_value = "f32")]
    pub halves_precision: nearspan_index::HalvesPrecision,
    /// A span detector (`nearspan train detector`, JSON): its probability P that a span
    /// is a slot moves the span's score by --detector-weight × (P − 0.5). Default: none.
    #[arg(long, value_name = "FILE")]
    pub detector: Option<PathBuf>,
    /// How far the detector moves a span's score (0..=2; the few-shot dev domains chose
    /// 0.1 or 0.2, BENCHMARKS.md).
    #[arg(long, default_value_t = 0.1)]
    pub detector_weight: f32,
    /// A slot scorer (`nearspan train scorer`, JSON) decides which spans are slots from
    /// their retrieval evidence, instead of --threshold, --o-margin, --o-penalty and
    /// --detector-weight. Default: none.
    #[arg(long, value_name = "FILE")]
    pub scorer: Option<PathBuf>,
}

impl QuerySettings {
    /// Applies the index-side settings (`--ef`, `--halves-precision`; with `--prefilter`,
    /// builds the factored span halves now rather than during the first query).
    pub(crate) fn apply(&self, index: &mut SpanIndex) {
        if let Some(ef) = self.ef {
            index.set_ef_search(ef);
        }
        index.set_halves_precision(self.halves_precision);
        if self.prefilter.is_some() {
            index.prepare_factored_search();
        }
    }

    pub(crate) fn config(&self) -> Result<QueryConfig> {
        if !(-1.0..=1.0).contains(&self.threshold) {
            bail!("--threshold {} is not a cosine similarity (expected -1..=1)", self.threshold);
        }
        if !(0.0..=1.0).contains(&self.o_penalty) {
            bail!("--o-penalty {} must be between 0 and 1", self.o_penalty);
        }
        if self.k == 0 || self.intent_k == 0 {
            bail!("--k and --intent-k must be at least 1");
        }
        if !(0.0..=2.0).contains(&self.detector_weight) {
            bail!("--detector-weight {} must be between 0 and 2", self.detector_weight);
        }
        Ok(QueryConfig {
            k: self.k,
            threshold: self.threshold,
            o_margin: self.o_margin,
            o_penalty: self.o_penalty,
            strategy: self.decoder,
            intent_k: self.intent_k,
            intent_aggregation: self.intent_aggregation,
            oos_threshold: self.oos_threshold,
            explain: self.explain,
            batch_size: self.batch_size,
            prefilter: self.prefilter,
            detector_weight: if self.detector.is_some() { self.detector_weight } else { 0.0 },
        })
    }

    /// The `--scorer` file, checked to have been fitted with a span detector exactly
    /// when `--detector` is given.
    pub(crate) fn load_scorer(&self) -> Result<Option<crate::scorer::SlotScorer>> {
        let Some(path) = &self.scorer else { return Ok(None) };
        let scorer = crate::scorer::SlotScorer::load(path)?;
        match (scorer.with_detector, self.detector.is_some()) {
            (true, false) => bail!("{}: this slot scorer was fitted with a span detector; give it as --detector", path.display()),
            (false, true) => bail!("{}: this slot scorer was fitted without a span detector; leave out --detector or fit one with it", path.display()),
            _ => Ok(Some(scorer)),
        }
    }

    /// The `--detector` file, checked against the encoder's vector size; the encoder is
    /// set to keep the layer the detector reads.
    pub(crate) fn load_detector(&self, encoder: &mut Encoder) -> Result<Option<crate::detector::SpanDetector>> {
        match &self.detector {
            None => Ok(None),
            Some(path) => {
                let detector = crate::detector::SpanDetector::load(path, encoder.info().hidden_size)?;
                encoder.set_tap_layer(detector.layer).with_context(|| format!("{}: the layer it reads", path.display()))?;
                Ok(Some(detector))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A readable table with the slots marked.
    Table,
    /// One JSON object per line, with neighbours (the documented query JSON).
    Json,
    /// nearspan's JSONL example format: correct it and `index add` it back.
    Examples,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[arg(long)]
    pub index: PathBuf,
    /// Shorthand for --format json.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
    /// Read utterances from a file: JSONL examples, or plain text with one utterance per line.
    #[arg(long, conflicts_with = "texts")]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub settings: QuerySettings,
    /// Utterances to label.
    #[arg(required_unless_present = "input")]
    pub texts: Vec<String>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Gold examples (JSONL) to score --pred against.
    #[arg(long, requires = "pred", conflicts_with_all = ["index", "data"])]
    pub gold: Option<PathBuf>,
    /// Predicted examples (JSONL, line-aligned with --gold).
    #[arg(long)]
    pub pred: Option<PathBuf>,
    /// Label --data with this index and score the result.
    #[arg(long, requires = "data")]
    pub index: Option<PathBuf>,
    /// Label --data with this fine-tuned baseline (a `nearspan train baseline` model
    /// folder) and score the result.
    #[arg(long, requires = "data", conflicts_with_all = ["index", "model"])]
    pub baseline: Option<PathBuf>,
    /// How --baseline turns per-word tag probabilities into tags: constrained (the best
    /// sequence with no I-x outside an x slot) or argmax (each word alone).
    #[arg(long, value_enum, default_value_t = crate::train::baseline::TagDecoding::default(), requires = "baseline")]
    pub tag_decoding: crate::train::baseline::TagDecoding,
    /// Labeled data in any supported format.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Which split of --data (default: test, or the only one).
    #[arg(long)]
    pub split: Option<String>,
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub settings: QuerySettings,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Few-shot slot filling on SNIPS episodes (Hou et al. 2020): 7 folds, per-episode F1.
    Fewshot(crate::bench::fewshot::FewshotArgs),
    /// Full ATIS or SNIPS: the fine-tuned baseline and trained retrieval on the test split.
    Full(crate::bench::full::FullArgs),
    /// End-to-end query latency and throughput.
    Query(crate::bench::query::QueryBenchArgs),
    /// The whole speed picture: encoder vs PyTorch, end-to-end query, HNSW at 10^6, matmul GFLOP/s.
    Speed(crate::bench::speed::SpeedArgs),
    /// HNSW single-query latency and recall@1 at 10^6 synthetic vectors, against exact search.
    Hnsw(crate::bench::hnsw::HnswBenchArgs),
    /// Intent accuracy and out-of-scope recall on CLINC150.
    Clinc(crate::bench::clinc::ClincArgs),
    /// Encoder throughput and latency, side by side with the PyTorch peer.
    Encoder(crate::bench::encoder::EncoderBenchArgs),
    /// One training step (forward with dropout, backward, AdamW), side by side with PyTorch.
    TrainStep(crate::bench::train_step::TrainStepArgs),
    /// Load test of a `nearspan serve` on loopback: latency percentiles and throughput.
    #[cfg(feature = "server")]
    ServeLoad(crate::serve::loadtest::LoadArgs),
}

/// Runs one parsed command, writing its output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    match cli.command {
        Command::Encode(a) => encode(a, out),
        Command::Ensemble(a) => ensemble(a, out),
        Command::Data(DataCommand::Stats { path, format }) => data_stats(&path, format, out),
        Command::Index(cmd) => index(cmd, out),
        Command::Query(a) => query(a, out),
        Command::Eval(a) => eval(a, out),
        Command::Train(cmd) => train::run(cmd, out),
        Command::Bench(BenchCommand::Fewshot(a)) => crate::bench::fewshot::run(a, out),
        Command::Bench(BenchCommand::Full(a)) => crate::bench::full::run(a, out),
        Command::Bench(BenchCommand::Query(a)) => crate::bench::query::run(a, out),
        Command::Bench(BenchCommand::Hnsw(a)) => crate::bench::hnsw::run(a, out),
        Command::Bench(BenchCommand::Speed(a)) => crate::bench::speed::run(a, out),
        Command::Bench(BenchCommand::Clinc(a)) => crate::bench::clinc::run(a, out),
        Command::Bench(BenchCommand::Encoder(a)) => crate::bench::encoder::run(a, out),
        Command::Bench(BenchCommand::TrainStep(a)) => crate::bench::train_step::run(a, out),
        #[cfg(feature = "server")]
        Command::Bench(BenchCommand::ServeLoad(a)) => crate::serve::loadtest::run(a, out),
        #[cfg(feature = "server")]
        Command::Serve(a) => crate::serve::run(a, out),
    }
}

fn encode(a: EncodeArgs, out: &mut dyn Write) -> Result<()> {
    let encoder = a.model.load()?;
    let texts: Vec<&str> = a.texts.iter().map(String::as_str).collect();
    for (text, enc) in texts.iter().zip(encoder.encode(&texts, crate::encoder::DEFAULT_BATCH_SIZE)?) {
        let line = serde_json::json!({
            "text": text,
            "tokens": enc.tokens.tokens,
            "offsets": enc.tokens.offsets,
            "vector": enc.sentence_vector(),
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn data_stats(path: &Path, format: Option<Format>, out: &mut dyn Write) -> Result<()> {
    let dataset = data::load(path, format)?;
    let stats = data::stats(&dataset);
    writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
    Ok(())
}

/// Loads the examples of one split of any dataset (`preferred` when several).
pub(crate) fn load_examples(path: &Path, split: Option<&str>, preferred: &str) -> Result<Vec<Example>> {
    Ok(load_split(path, split, preferred)?.1.examples)
}

/// [`load_examples`] with the dataset's format and the split's name and source path.
pub(crate) fn load_split(path: &Path, split: Option<&str>, preferred: &str) -> Result<(Format, data::Split)> {
    let mut dataset = data::load(path, None)?;
    let names: Vec<String> = dataset.splits.iter().map(|s| s.name.clone()).collect();
    let position = |name: &str| names.iter().position(|n| n == name);
    let chosen = match split {
        Some(name) => position(name).with_context(|| format!("{}: no split {name:?} (has {names:?})", path.display()))?,
        None if names.len() == 1 => 0,
        None => position(preferred)
            .with_context(|| format!("{}: several splits {names:?}; choose one with --split", path.display()))?,
    };
    // Move the split out rather than copying every example.
    Ok((dataset.format, dataset.splits.swap_remove(chosen)))
}

fn index(cmd: IndexCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        IndexCommand::Build { model, examples, split, out: path, build } => {
            let encoder = model.load()?;
            let examples = load_examples(&examples, split.as_deref(), "train")?;
            let cfg = build.config();
            let mut index = SpanIndex::new(labeler::encoder_info(&encoder, &cfg), build.backend, build.hnsw_params())?;
            labeler::add_examples(&encoder, &mut index, &examples, &cfg, crate::encoder::DEFAULT_BATCH_SIZE)?;
            index.save(&path)?;
            writeln!(out, "built {}: {} examples, {} spans, {} labels", path.display(), index.n_examples(), index.n_spans(), index.n_labels())?;
        }
        IndexCommand::Add { model, index: path, examples, split } => {
            let encoder = model.load()?;
            let mut index = open_index(&path, &encoder)?;
            let cfg = build_config(&index)?;
            let examples = load_examples(&examples, split.as_deref(), "train")?;
            labeler::add_examples(&encoder, &mut index, &examples, &cfg, crate::encoder::DEFAULT_BATCH_SIZE)?;
            index.save(&path)?;
            writeln!(out, "added {} examples to {}: now {} examples, {} spans", examples.len(), path.display(), index.n_examples(), index.n_spans())?;
        }
        IndexCommand::Info { index: path } => {
            let index = SpanIndex::summary(&path)?;
            let e = &index.encoder;
            let info = serde_json::json!({
                "path": path,
                "format_version": index.format_version,
                "examples": index.n_examples,
                "spans": index.n_spans,
                "labels": index.labels,
                "encoder": {"model": e.model_id, "revision": e.revision, "pooling": e.pooling, "max_width": e.max_width, "dim": e.dim},
                "backend": index.backend.to_string(),
                "hnsw": index.params,
                "o_spans": index.labels.iter().any(|l| l == labeler::O_LABEL),
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
        }
    }
    Ok(())
}

pub(crate) fn build_config(index: &SpanIndex) -> Result<BuildConfig> {
    labeler::build_config_of(index).map_err(anyhow::Error::msg)
}

/// Opens an index and checks it was built by `encoder` (not just any encoder of that dimension).
pub(crate) fn open_index(path: &Path, encoder: &Encoder) -> Result<SpanIndex> {
    let stored = SpanIndex::open(path, None)?;
    let cfg = build_config(&stored)?;
    let expected = labeler::encoder_info(encoder, &cfg);
    if stored.encoder().fingerprint() != expected.fingerprint() {
        // Re-open with the expectation to get the index's own mismatch error.
        SpanIndex::open(path, Some(&expected))?;
    }
    Ok(stored)
}

fn read_query_examples(a: &QueryArgs) -> Result<Vec<Example>> {
    match &a.input {
        None => Ok(a.texts.iter().map(|t| Example::from_text(t, None)).collect()),
        Some(path) if path.extension().is_some_and(|e| e == "jsonl") => Ok(data::read_jsonl(path)?),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            Ok(text.lines().filter(|l| !l.trim().is_empty()).map(|t| Example::from_text(t, None)).collect())
        }
    }
}

fn query(a: QueryArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = a.settings.config()?;
    let mut encoder = a.model.load()?;
    let mut index = open_index(&a.index, &encoder)?;
    a.settings.apply(&mut index);
    let build = build_config(&index)?;
    let examples = read_query_examples(&a)?;
    let detector = a.settings.load_detector(&mut encoder)?;
    let scorer = a.settings.load_scorer()?;
    let predictions = labeler::label_examples(&encoder, &index, &examples, &build, &cfg, detector.as_ref(), scorer.as_ref())?;
    let format = if a.json { OutputFormat::Json } else { a.format };
    for (ex, p) in examples.iter().zip(&predictions) {
        match format {
            OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(p)?)?,
            OutputFormat::Examples => data::write_jsonl(&mut *out, &[p.to_example(ex)])?,
            OutputFormat::Table => write_table(p, out)?,
        }
    }
    Ok(())
}

/// A readable rendering: the text with [slots](label), then each decision's reasons.
fn write_table(p: &Prediction, out: &mut dyn Write) -> Result<()> {
    let mut marked = String::new();
    let mut pos = 0;
    for s in &p.slots {
        marked.push_str(data::char_slice(&p.text, pos, s.start));
        marked.push_str(&format!("[{}]({})", s.text, s.label));
        pos = s.end;
    }
    marked.push_str(data::char_slice(&p.text, pos, p.text.chars().count()));
    writeln!(out, "{marked}")?;
    if let Some(i) = &p.intent {
        writeln!(out, "  intent  {:<24} {:.3}", i.label, i.score)?;
        for n in &i.neighbours {
            writeln!(out, "          {:.3}  {:?} ({})", n.similarity, n.example, n.label)?;
        }
    }
    for s in &p.slots {
        writeln!(out, "  slot    {:<24} {:.3}  {:?}", s.label, s.score, s.text)?;
        for n in &s.neighbours {
            writeln!(out, "          {:.3}  {:?} in {:?} ({})", n.similarity, n.text, n.example, n.label)?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn eval(a: EvalArgs, out: &mut dyn Write) -> Result<()> {
    let report = match (&a.gold, &a.pred, &a.index, &a.data) {
        (Some(gold), Some(pred), None, None) => crate::eval::evaluate_files(gold, pred)?,
        (None, None, Some(index_path), Some(data_path)) => {
            let cfg = a.settings.config()?;
            let mut encoder = a.model.load()?;
            let mut index = open_index(index_path, &encoder)?;
            a.settings.apply(&mut index);
            let build = build_config(&index)?;
            let gold = load_examples(data_path, a.split.as_deref(), "test")?;
            let detector = a.settings.load_detector(&mut encoder)?;
            let scorer = a.settings.load_scorer()?;
            let predictions = labeler::label_examples(&encoder, &index, &gold, &build, &cfg, detector.as_ref(), scorer.as_ref())?;
            let mut ev = Evaluator::new();
            for (g, p) in gold.iter().zip(&predictions) {
                ev.add(g, &p.to_example(g))?;
            }
            ev.report()
        }
        _ => match (&a.baseline, &a.data) {
            (Some(dir), Some(data_path)) => {
                let encoder = Encoder::load_with_precision(dir, a.model.precision)?;
                let mut model = crate::train::baseline::JointModel::load(&encoder, dir)?;
                model.set_tag_decoding(a.tag_decoding);
                let gold = load_examples(data_path, a.split.as_deref(), "test")?;
                train::joint_score(&model, &gold, a.settings.batch_size)?.1
            }
            _ => bail!("pass either --gold FILE --pred FILE, --index INDEX --data PATH, or --baseline DIR --data PATH"),
        },
    };
    writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// Every subcommand parses a minimal valid command line. Two flattened settings
    /// structs that reuse an argument id pass clap's own checks but fail here (at run
    /// time they fail with a confusing "argument not provided").
    #[test]
    fn every_subcommand_parses_a_minimal_command_line() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
        let lines: &[&[&str]] = &[
            &["encode", "hello"],
            &["data", "stats", "x"],
            &["index", "build", "--examples", "x", "--out", "y"],
            &["query", "--index", "i", "hello"],
            &["eval", "--gold", "g", "--pred", "p"],
            &["eval", "--baseline", "m", "--data", "d"],
            &["train", "retriever", "--data", "d", "--out", "o"],
            &["train", "retriever", "--data", "d", "--out", "o", "--fold", "2", "--episodes", "e"],
            &["train", "baseline", "--data", "d", "--out", "o"],
            &["bench", "fewshot", "--data", "d", "--shots", "5"],
            &["bench", "fewshot", "--data", "d", "--shots", "1", "--method", "finetune", "--fold-models", "r/{fold}"],
            &["bench", "full", "--data", "d"],
            &["bench", "clinc", "--data", "d", "--shots", "5", "--method", "finetune"],
            &["bench", "query", "--index", "i", "--data", "d"],
            &["bench", "query", "--index", "i", "--data", "d", "--passes", "5"],
            &["bench", "fewshot", "--data", "d", "--shots", "1", "--slot-descriptions", "f"],
            &["index", "build", "--examples", "x", "--out", "y", "--backend", "ivf"],
            &["bench", "hnsw", "--backend", "ivf", "--nprobe", "1,2", "--lists", "100"],
            &["bench", "encoder", "--precisions", "f32,bf16"],
            &["bench", "train-step"],
            &["bench", "hnsw", "--n", "1000"],
            &["bench", "speed", "--query-index", "i", "--skip-hnsw"],
            &["encode", "--precision", "bf16", "hello"],
        ];
        for line in lines {
            let args = std::iter::once("nearspan").chain(line.iter().copied());
            if let Err(e) = super::Cli::try_parse_from(args) {
                panic!("nearspan {}: {e}", line.join(" "));
            }
        }
        for bad in [
            &["bench", "query", "--index", "i", "--data", "d", "--passes", "0"][..],
            &["index", "build", "--examples", "x", "--out", "y", "--backend", "faiss"],
        ] {
            let args = std::iter::once("nearspan").chain(bad.iter().copied());
            assert!(super::Cli::try_parse_from(args).is_err(), "nearspan {} must be refused", bad.join(" "));
        }
    }
}
