//! Few-shot slot filling on SNIPS, the protocol of Hou et al. (2020): for each of the 7
//! target domains, 100 episodes; index each episode's support set, label its query
//! set, score strict span F1 per episode, average over episodes, then over domains.
//!
//! The decision threshold is chosen on the dev domain (target k → dev k+1, cyclic),
//! never on the target.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser as _;
use clap::Args;
use nearspan_index::{BackendKind, HnswParams, SpanIndex};

use crate::cli::{BuildArgs, ModelArg, QuerySettings};
use crate::data::{read_fewshot, Episode, Example};
use crate::detector::SpanDetector;
use crate::encoder::{EncodedText, Encoder};
use crate::eval::{ErrorCounts, EvalReport, Evaluator, SpanCounts};
use crate::labeler::{self, BuildConfig, QueryConfig, Retrieved};
use crate::scorer::{self, ScorerFit, SlotScorer};

/// SNIPS domain of each fold, in Hou et al.'s order (We, Mu, Pl, Bo, Se, Re, Cr).
pub const DOMAINS: [&str; 7] =
    ["GetWeather", "PlayMusic", "AddToPlaylist", "RateBook", "SearchScreeningEvent", "BookRestaurant", "SearchCreativeWork"];

#[derive(Debug, Args)]
pub struct FewshotArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The snips_fewshot folder (holding xval_snips_shot_{1,5}_out_{1..7}).
    #[arg(long)]
    pub data: PathBuf,
    /// 1 or 5.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["1", "5"]).map(|s| s.parse::<usize>().unwrap_or(1)))]
    pub shots: usize,
    /// Only the first N episodes of each domain (for quick runs; the benchmark uses all 100).
    #[arg(long)]
    pub episodes: Option<usize>,
    /// Only these folds (comma-separated, 1..=7), for quick looks; the average then
    /// covers only them.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 3, 4, 5, 6, 7])]
    pub folds: Vec<usize>,
    /// Dev-domain episodes used to choose the threshold.
    #[arg(long, default_value_t = 50)]
    pub dev_episodes: usize,
    /// Skip the first N dev-domain episodes. `train retriever --dev-episodes N` picks its
    /// checkpoint on the first N, so comparing training recipes by dev F1 should leave
    /// those out: a recipe with more checkpoints to pick from gains on them by chance.
    #[arg(long, default_value_t = 0)]
    pub dev_skip: usize,
    /// Use --threshold as given instead of choosing it on the dev domain.
    #[arg(long)]
    pub no_tune: bool,
    /// Results file to update.
    #[arg(long, default_value = "benches/results/fewshot_snips.json")]
    pub out: PathBuf,
    /// Entry to write in the results file, e.g. retrieval_untrained.
    #[arg(long, default_value = "retrieval_untrained")]
    pub key: String,
    /// One trained model per fold instead of --model: a path in which `{fold}` stands for
    /// the fold number 1..=7, e.g. runs/snips-5shot/fold{fold}/model (`nearspan train
    /// retriever --fold N` writes them).
    #[arg(long, conflicts_with = "model")]
    pub fold_models: Option<String>,
    /// retrieval (index each support set) or finetune (the baseline: fine-tune a joint
    /// model with fresh heads on each support set; slow, so use --episodes).
    #[arg(long, default_value = "retrieval", value_parser = ["retrieval", "finetune"])]
    pub method: String,
    #[command(flatten)]
    pub finetune: crate::bench::finetune::FinetuneSettings,
    /// With --detector: fit each episode's copy of the detector this many more epochs on
    /// the episode's support set (what `nearspan train detector --init` does for a
    /// user's own examples), 4 utterances per step.
    #[arg(long, default_value_t = 0, requires = "detector")]
    pub detector_adapt: usize,
    /// Diagnostic, never a result: a detector that knows the gold slot boundaries of
    /// every query (logit ±20), weighted as --detector is. Bounds what better slot
    /// detection could gain.
    #[arg(long, conflicts_with = "detector")]
    pub oracle_detector: bool,
    /// Decide with a slot scorer (a logistic regression on each span's retrieval
    /// evidence) fitted per fold on the dev episodes' queries, its lowest logit chosen
    /// there too, instead of the hand-set threshold, margin, penalty and detector weight
    /// (`src/scorer.rs`; BENCHMARKS.md).
    #[arg(long, conflicts_with_all = ["no_tune", "scorer"])]
    pub fit_scorer: bool,
    /// Diagnostic: append every dev-episode query span's retrieval evidence to this file
    /// (tab-separated: fold, episode, query, words, start, end, best label, its
    /// similarity, the second label's, the non-slot similarity, the detector's logit, the
    /// gold label or "-"; then one `GOLD` row per gold slot), for studying decision rules
    /// outside the binary (`benches/peers/decision_rule_transfer.py`).
    #[arg(long, value_name = "FILE", conflicts_with = "no_tune")]
    pub dump_evidence: Option<PathBuf>,
    /// A SNIPS data folder whose train split lends examples to every episode: the slot
    /// spans of the fold's source domains (neither its target nor its dev domain) whose
    /// label the episode's support set also has become a memory
    /// ([`labeler::Memory`]), searched apart, their similarity lowered by a discount
    /// chosen on the dev domain (where "no memory" is one of the choices).
    #[arg(long, value_name = "DIR", conflicts_with = "no_tune")]
    pub source_memory: Option<PathBuf>,
    /// Slot descriptions (`name : description` per line, as in snips_fewshot's
    /// `slot_description`): each becomes a one-span example of its slot, lent to every
    /// episode whose support set has that label as a memory, like --source-memory (with
    /// which it combines), the discount chosen on the dev domain.
    #[arg(long, value_name = "FILE", conflicts_with = "no_tune")]
    pub slot_descriptions: Option<PathBuf>,
    #[command(flatten)]
    pub build: BuildArgs,
    #[command(flatten)]
    pub settings: QuerySettings,
}

/// Thresholds tried on the dev domain.
const THRESHOLD_GRID: [f32; 12] = [0.0, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9];
/// Non-slot margins tried on the dev domain (with `O` spans indexed).
const MARGIN_GRID: [f32; 10] = [-0.05, 0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4];

/// Non-slot penalties of the decoder's ranking tried on the dev domain (with `O` spans).
const PENALTY_GRID: [f32; 3] = [0.0, 0.5, 1.0];

/// Span-detector weights tried on the dev domain (with `--detector`).
const DETECTOR_GRID: [f32; 5] = [0.0, 0.1, 0.2, 0.4, 0.8];

/// Discounts of memory similarities tried on the dev domain (with `--source-memory`);
/// infinity leaves the memory out. Ties go to the first, so a dev domain that shares no
/// label with the source domains (where every discount scores the same) keeps none.
const MEMORY_DISCOUNT_GRID: [f32; 5] = [f32::INFINITY, 0.2, 0.1, 0.05, 0.0];

/// Encodes every distinct text once, however many episodes and folds reuse it (each
/// file serves as target of one fold and dev of another; all of them fit in memory).
struct EncodingCache<'a> {
    encoder: &'a Encoder,
    batch_size: usize,
    map: HashMap<String, EncodedText>,
    slotness: Slotness<'a>,
}

/// Where the query spans' slotness comes from ([`labeler::SpanEvidence::slotness`]).
#[derive(Debug, Clone, Copy, Default)]
struct Slotness<'a> {
    detector: Option<&'a SpanDetector>,
    /// Epochs of fitting a copy of `detector` on each episode's support set first.
    adapt_epochs: usize,
    /// The gold boundaries instead (`--oracle-detector`).
    oracle: bool,
}

impl Slotness<'_> {
    fn is_some(&self) -> bool {
        self.detector.is_some() || self.oracle
    }

    /// The detector for one episode: a copy fitted on its support set when adapting.
    fn for_episode(&self, ep: &Episode, support: &[EncodedText]) -> Result<Option<std::borrow::Cow<'_, SpanDetector>>> {
        use std::borrow::Cow;
        match self.detector {
            Some(d) if self.adapt_epochs > 0 => {
                let cfg = crate::detector::FitConfig { epochs: self.adapt_epochs, batch: 4, max_width: d.max_width, ..Default::default() };
                Ok(Some(Cow::Owned(SpanDetector::fit_from(Some(d), &ep.support, support, &cfg)?.0)))
            }
            other => Ok(other.map(Cow::Borrowed)),
        }
    }

    /// `--oracle-detector`: the gold boundaries as slotness (logit ±20).
    fn add_oracle(ep: &Episode, retrieved: &mut [Retrieved]) {
        for (ex, r) in ep.query.iter().zip(retrieved.iter_mut()) {
            let gold: Vec<_> = ex.spans.iter().map(|s| s.words()).collect();
            for e in r.spans.iter_mut() {
                e.slotness = Some(if gold.contains(&e.span) { 20.0 } else { -20.0 });
            }
        }
    }
}

impl EncodingCache<'_> {
    fn fill(&mut self, episodes: &[Episode]) -> Result<()> {
        self.fill_examples(episodes.iter().flat_map(|ep| ep.support.iter().chain(&ep.query)))
    }

    /// Encodes the examples not encoded yet.
    fn fill_examples<'e>(&mut self, examples: impl IntoIterator<Item = &'e Example>) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        let mut todo: Vec<&str> = Vec::new();
        for ex in examples {
            if !self.map.contains_key(&ex.text) && seen.insert(ex.text.as_str()) {
                todo.push(&ex.text);
            }
        }
        let encoded = self.encoder.encode(&todo, self.batch_size)?;
        for (t, e) in todo.into_iter().zip(encoded) {
            self.map.insert(t.to_string(), e);
        }
        Ok(())
    }

    fn get(&self, examples: &[Example]) -> Vec<EncodedText> {
        examples.iter().map(|e| self.map[&e.text].clone()).collect()
    }
}

/// Retrieval results of one episode's queries against its support set.
struct EpisodeRun {
    index: SpanIndex,
    retrieved: Vec<Retrieved>,
    /// With a source memory: the evidence before merging, kept so that the discount can
    /// be swept.
    unmerged: Option<Vec<Retrieved>>,
}

impl EpisodeRun {
    /// Merges the memory at `discount` (infinity: leaves it out); no-op without one.
    fn set_memory_discount(&mut self, discount: f32) {
        if let Some(raw) = &self.unmerged {
            self.retrieved = raw.iter().map(|r| r.with_memory(discount)).collect();
        }
    }
}

/// The source examples an episode borrows: those with a slot of a label its support set
/// has, only those slots kept.
fn memory_for(ep: &Episode, pool: &[&Example]) -> Vec<Example> {
    let labels: std::collections::HashSet<&str> = ep.support.iter().flat_map(|e| e.spans.iter().map(|s| s.label.as_str())).collect();
    pool.iter()
        .filter_map(|ex| {
            let spans: Vec<_> = ex.spans.iter().filter(|s| labels.contains(s.label.as_str())).cloned().collect();
            (!spans.is_empty()).then(|| Example { text: ex.text.clone(), words: ex.words.clone(), intent: ex.intent.clone(), spans })
        })
        .collect()
}

/// Retrieval for one episode; with a source `pool`, its memory merged at `discount`.
fn run_episode(
    cache: &EncodingCache,
    ep: &Episode,
    build: &BuildConfig,
    cfg: &QueryConfig,
    pool: Option<&[&Example]>,
    discount: f32,
) -> Result<EpisodeRun> {
    let info = labeler::encoder_info(cache.encoder, build);
    let mut index = SpanIndex::new(info, BackendKind::Exact, HnswParams::default())?;
    labeler::add_encoded(&mut index, &ep.support, &cache.get(&ep.support), build)?;
    let memory = match pool {
        Some(pool) => {
            let first_span = index.n_spans() as u32;
            let borrowed = memory_for(ep, pool);
            let slots_only = BuildConfig { index_o_spans: false, ..*build };
            labeler::add_encoded(&mut index, &borrowed, &cache.get(&borrowed), &slots_only)?;
            Some(labeler::Memory { first_span })
        }
        None => None,
    };
    let encoded = cache.get(&ep.query);
    let detector = cache.slotness.for_episode(ep, &cache.get(&ep.support))?;
    let mut retrieved = labeler::retrieve_with_memory(&index, &ep.query, &encoded, build, cfg, detector.as_deref(), memory);
    if cache.slotness.oracle {
        Slotness::add_oracle(ep, &mut retrieved);
    }
    let unmerged = memory.map(|_| std::mem::take(&mut retrieved));
    let mut run = EpisodeRun { index, retrieved, unmerged };
    run.set_memory_discount(discount);
    Ok(run)
}

/// Scores one episode's queries at `cfg`'s settings, or with a fitted scorer.
fn episode_report(run: &EpisodeRun, ep: &Episode, cfg: &QueryConfig, scorer: Option<&SlotScorer>) -> Result<EvalReport> {
    let mut ev = Evaluator::new();
    for (gold, r) in ep.query.iter().zip(&run.retrieved) {
        let p = labeler::decide_with(&run.index, gold, r, cfg, scorer);
        ev.add(gold, &p.to_example(gold))?;
    }
    Ok(ev.report())
}

/// Strict span F1 (percent) of one episode at `cfg`'s settings.
fn episode_f1(run: &EpisodeRun, ep: &Episode, cfg: &QueryConfig, scorer: Option<&SlotScorer>) -> Result<f64> {
    Ok(100.0 * episode_report(run, ep, cfg, scorer)?.micro.f1)
}

/// Slot counts and error kinds summed over a domain's episodes, for the results file.
fn error_summary(reports: &[EvalReport]) -> serde_json::Value {
    let (mut counts, mut errors) = (SpanCounts::default(), ErrorCounts::default());
    for r in reports {
        counts.add(r.counts);
        errors.add(r.errors);
    }
    serde_json::json!({"tp": counts.tp, "fp": counts.fp, "fn": counts.fn_, "fp_kinds": errors})
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}

/// The decision settings chosen on dev episodes, and the F1 they reach there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DevChoice {
    pub f1: f64,
    pub threshold: f32,
    pub o_margin: f32,
    pub o_penalty: f32,
    pub detector_weight: f32,
}

/// Retrieval for every dev episode (decoding them is cheap, so settings are swept after).
/// With a source `pool`, the memory is left out until a discount is set.
fn dev_runs(cache: &mut EncodingCache, dev: &[Episode], build: &BuildConfig, cfg: &QueryConfig, pool: Option<&[&Example]>) -> Result<Vec<EpisodeRun>> {
    cache.fill(dev)?;
    dev.iter().map(|ep| run_episode(cache, ep, build, cfg, pool, f32::INFINITY)).collect()
}

/// Grid-searches the threshold (and the non-slot margin and penalty, when `O` spans are
/// indexed) on dev episodes; the mean per-episode F1 of the best setting also scores a checkpoint
/// during training.
fn tune_on_dev(cache: &mut EncodingCache, dev: &[Episode], build: &BuildConfig, cfg: &QueryConfig) -> Result<DevChoice> {
    let runs = dev_runs(cache, dev, build, cfg, None)?;
    choose_on_runs(&runs, dev, build, cfg, cache.slotness.is_some())
}

fn choose_on_runs(runs: &[EpisodeRun], dev: &[Episode], build: &BuildConfig, cfg: &QueryConfig, with_detector: bool) -> Result<DevChoice> {
    let (margins, penalties): (&[f32], &[f32]) = if build.index_o_spans { (&MARGIN_GRID, &PENALTY_GRID) } else { (&[0.0], &[0.0]) };
    let weights: &[f32] = if with_detector { &DETECTOR_GRID } else { &[0.0] };
    let mut best = DevChoice {
        f1: f64::NEG_INFINITY,
        threshold: cfg.threshold,
        o_margin: cfg.o_margin,
        o_penalty: cfg.o_penalty,
        detector_weight: cfg.detector_weight,
    };
    for &w in weights {
        for &p in penalties {
            for &t in &THRESHOLD_GRID {
                for &m in margins {
                    let c = QueryConfig { threshold: t, o_margin: m, o_penalty: p, detector_weight: w, ..*cfg };
                    let f1 = mean(&runs.iter().zip(dev).map(|(r, ep)| episode_f1(r, ep, &c, None)).collect::<Result<Vec<_>>>()?);
                    if f1 > best.f1 {
                        best = DevChoice { f1, threshold: t, o_margin: m, o_penalty: p, detector_weight: w };
                    }
                }
            }
        }
    }
    Ok(best)
}

/// Fits a [`SlotScorer`] on the dev episodes' queries and chooses its lowest logit
/// there; returns it with its mean dev F1.
fn fit_scorer(runs: &[EpisodeRun], dev: &[Episode], cfg: &QueryConfig, fit: &ScorerFit) -> Result<(SlotScorer, f64)> {
    let data: Vec<scorer::Labeled> = runs
        .iter()
        .zip(dev)
        .flat_map(|(run, ep)| ep.query.iter().zip(&run.retrieved).map(|(gold, r)| scorer::Labeled::new(r, gold, &run.index)))
        .collect();
    let mut scorer = SlotScorer::fit(&data, fit).context("fitting the slot scorer on the dev episodes")?;
    let f1 = scorer.choose_min_logit(|s| -> Result<f64> {
        Ok(mean(&runs.iter().zip(dev).map(|(r, ep)| episode_f1(r, ep, cfg, Some(s))).collect::<Result<Vec<_>>>()?))
    })?;
    Ok((scorer, f1))
}

/// Scores an encoder on dev episodes (settings tuned there), for early stopping.
pub(crate) fn dev_score(encoder: &Encoder, dev: &[Episode], build: &BuildConfig, cfg: &QueryConfig) -> Result<DevChoice> {
    let mut cache = EncodingCache { encoder, batch_size: cfg.batch_size, map: HashMap::new(), slotness: Slotness::default() };
    tune_on_dev(&mut cache, dev, build, cfg)
}

/// Appends the dev runs' span evidence (`--dump-evidence`).
fn dump_evidence(path: &std::path::Path, fold: usize, runs: &[EpisodeRun], dev: &[Episode]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    let num = |x: Option<f32>| x.map_or("NaN".to_string(), |x| x.to_string());
    for (ei, (run, ep)) in runs.iter().zip(dev).enumerate() {
        for (qi, (ex, r)) in ep.query.iter().zip(&run.retrieved).enumerate() {
            for e in &r.spans {
                let gold = ex.spans.iter().find(|s| s.words() == e.span).map_or("-", |s| s.label.as_str());
                let best = e.by_label.first().map(|x| (run.index.label(nearspan_index::LabelId(x.0)), x.1));
                writeln!(
                    f,
                    "{fold}\t{ei}\t{qi}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{gold}",
                    ex.words.len(),
                    e.span.start,
                    e.span.end,
                    best.map_or("-", |b| b.0),
                    num(best.map(|b| b.1)),
                    num(e.by_label.get(1).map(|x| x.1)),
                    num(e.o_score),
                    num(e.slotness)
                )?;
            }
            for s in &ex.spans {
                writeln!(f, "{fold}\t{ei}\t{qi}\tGOLD\t{}\t{}\t{}", s.word_start, s.word_end, s.label)?;
            }
        }
    }
    f.flush()
}

/// Dev episodes `skip + 1 ..= skip + take` (fewer when the domain ends first).
fn dev_window(mut episodes: Vec<Episode>, skip: usize, take: usize) -> Result<Vec<Episode>> {
    if skip >= episodes.len() {
        bail!("--dev-skip {skip} leaves no dev episodes (the dev domain has {})", episodes.len());
    }
    episodes.drain(..skip);
    episodes.truncate(take);
    Ok(episodes)
}

fn check_folds(folds: &[usize]) -> Result<()> {
    if let Some(f) = folds.iter().find(|f| !(1..=7).contains(*f)) {
        anyhow::bail!("--folds: {f} is not a fold (1..=7)");
    }
    Ok(())
}

pub(crate) fn load_domain(data: &std::path::Path, shots: usize, fold: usize) -> Result<Vec<Episode>> {
    let path = data.join(format!("xval_snips_shot_{shots}_out_{fold}")).join("test.json");
    let mut domains = read_fewshot(&path)?;
    let (_, episodes) = domains.pop().with_context(|| format!("{}: no domain inside", path.display()))?;
    Ok(episodes)
}

pub fn run(a: FewshotArgs, out: &mut dyn Write) -> Result<()> {
    if a.method == "finetune" {
        return run_finetune(a, out);
    }
    // One encoder for all folds (its cache then serves every fold), or one per fold.
    let mut shared_encoder = match &a.fold_models {
        None => Some(a.model.load()?),
        Some(_) => None,
    };
    let build = a.build.config();
    let base_cfg = a.settings.config()?;
    // Encodings carried from fold to fold while the encoder stays the same.
    let mut carried: HashMap<String, EncodedText> = HashMap::new();
    let mut model_name = shared_encoder.as_ref().map(|e| e.info().id.clone()).unwrap_or_default();
    let started = std::time::Instant::now();
    let mut per_domain = serde_json::Map::new();
    let mut thresholds = serde_json::Map::new();
    let mut errors = serde_json::Map::new();
    let mut f1s = Vec::new();
    check_folds(&a.folds)?;
    let mut source_pool: Option<Vec<Example>> = match &a.source_memory {
        Some(dir) => Some(crate::cli::load_examples(dir, Some("train"), "train").context("--source-memory")?),
        None => None,
    };
    if let Some(path) = &a.slot_descriptions {
        // No intent, so no fold leaves them out: a description names a label, it is not data.
        let described = crate::data::read_slot_descriptions(path).context("--slot-descriptions")?;
        source_pool.get_or_insert_with(Vec::new).extend(described);
    }
    for &fold in &a.folds {
        let mut fold_encoder = match &a.fold_models {
            Some(pattern) => {
                let dir = PathBuf::from(pattern.replace("{fold}", &fold.to_string()));
                model_name = pattern.clone();
                Some(Encoder::load(&dir).with_context(|| format!("fold {fold}: loading the fold's model"))?)
            }
            None => None,
        };
        let own_encoder = fold_encoder.is_some();
        let encoder = fold_encoder.as_mut().or(shared_encoder.as_mut()).expect("a shared or a per-fold encoder");
        // --detector may name each fold's file with `{fold}`, like --fold-models.
        let detector = match &a.settings.detector {
            Some(pattern) => {
                let path = PathBuf::from(pattern.to_string_lossy().replace("{fold}", &fold.to_string()));
                Some(SpanDetector::load(&path, encoder.info().hidden_size).with_context(|| format!("fold {fold}: --detector"))?)
            }
            None => None,
        };
        // The detector's layer must be in every encoding; cached ones without it go.
        let tap = detector.as_ref().and_then(|d| d.layer);
        if encoder.tap_layer() != tap {
            carried.clear();
        }
        encoder.set_tap_layer(tap).with_context(|| format!("fold {fold}: --detector"))?;
        let encoder = &*encoder;
        let slotness = Slotness { detector: detector.as_ref(), adapt_epochs: a.detector_adapt, oracle: a.oracle_detector };
        let mut fold_cache =
            EncodingCache { encoder, batch_size: base_cfg.batch_size, map: std::mem::take(&mut carried), slotness };
        let cache = &mut fold_cache;
        let dev_fold = fold % 7 + 1;
        let mut target = load_domain(&a.data, a.shots, fold)?;
        target.truncate(a.episodes.unwrap_or(usize::MAX));
        let pool: Option<Vec<&Example>> = source_pool.as_ref().map(|all| {
            let left_out = [DOMAINS[fold - 1], DOMAINS[dev_fold - 1]];
            all.iter().filter(|e| !left_out.contains(&e.intent.as_deref().unwrap_or(""))).collect()
        });
        if let Some(pool) = &pool {
            cache.fill_examples(pool.iter().copied())?;
        }
        let pool = pool.as_deref();
        let mut cfg = base_cfg;
        let mut dev_f1 = f64::NAN;
        let mut fitted: Option<(SlotScorer, f64)> = None;
        let mut memory_discount = f32::INFINITY;
        if !a.no_tune {
            let dev = dev_window(load_domain(&a.data, a.shots, dev_fold)?, a.dev_skip, a.dev_episodes)?;
            let mut runs = dev_runs(cache, &dev, &build, &cfg, pool)?;
            // With a memory, the settings are chosen for each discount; the best pair is kept.
            let mut swept: Option<DevChoice> = None;
            if pool.is_some() {
                for d in MEMORY_DISCOUNT_GRID {
                    runs.iter_mut().for_each(|r| r.set_memory_discount(d));
                    let c = choose_on_runs(&runs, &dev, &build, &cfg, cache.slotness.is_some())?;
                    writeln!(out, "{:<22}   dev {}: memory discount {d}: F1 {:.2}", "", DOMAINS[dev_fold - 1], c.f1)?;
                    if swept.is_none_or(|b| c.f1 > b.f1) {
                        (swept, memory_discount) = (Some(c), d);
                    }
                }
                runs.iter_mut().for_each(|r| r.set_memory_discount(memory_discount));
            }
            if let Some(path) = &a.dump_evidence {
                dump_evidence(path, fold, &runs, &dev).with_context(|| format!("{}: writing the evidence", path.display()))?;
            }
            let chosen = match swept {
                Some(c) => c,
                None => choose_on_runs(&runs, &dev, &build, &cfg, cache.slotness.is_some())?,
            };
            (dev_f1, cfg.threshold, cfg.o_margin, cfg.o_penalty) = (chosen.f1, chosen.threshold, chosen.o_margin, chosen.o_penalty);
            cfg.detector_weight = chosen.detector_weight;
            if a.fit_scorer {
                fitted = Some(fit_scorer(&runs, &dev, &cfg, &ScorerFit::default())?);
            }
        }
        let scorer = fitted.as_ref().map(|f| &f.0);
        cache.fill(&target)?;
        let reports: Vec<EvalReport> = target
            .iter()
            .map(|ep| episode_report(&run_episode(cache, ep, &build, &cfg, pool, memory_discount)?, ep, &cfg, scorer))
            .collect::<Result<_>>()?;
        let scores: Vec<f64> = reports.iter().map(|r| 100.0 * r.micro.f1).collect();
        if !own_encoder {
            carried = fold_cache.map;
        }
        let f1 = mean(&scores);
        let domain = DOMAINS[fold - 1];
        writeln!(
            out,
            "{domain:<22} F1 {f1:6.2}  ({} episodes; on dev {}: F1 {dev_f1:.2} at threshold {:.2}, margin {:.3}, penalty {:.1}, detector {:.1}; {:.0}s)",
            scores.len(),
            DOMAINS[dev_fold - 1],
            cfg.threshold,
            cfg.o_margin,
            cfg.o_penalty,
            cfg.detector_weight,
            started.elapsed().as_secs_f64()
        )?;
        per_domain.insert(domain.into(), serde_json::json!((f1 * 100.0).round() / 100.0));
        let mut chosen = serde_json::json!({"threshold": cfg.threshold, "o_margin": cfg.o_margin, "o_penalty": cfg.o_penalty, "detector_weight": cfg.detector_weight, "dev_f1": dev_f1});
        if pool.is_some() {
            // JSON has no infinity: "no memory" is null.
            chosen["memory_discount"] = serde_json::json!(memory_discount.is_finite().then_some(memory_discount));
            writeln!(out, "{:<22}   source memory discount chosen on dev: {memory_discount}", "")?;
        }
        if let Some((s, f1)) = &fitted {
            writeln!(out, "{:<22}   decided by the slot scorer fitted on dev: F1 {f1:.2} there at lowest logit {:.1}", "", s.min_logit)?;
            chosen["scorer"] = serde_json::json!({"weights": s.w, "bias": s.b, "min_logit": s.min_logit, "dev_f1": f1});
        }
        thresholds.insert(domain.into(), chosen);
        errors.insert(domain.into(), error_summary(&reports));
        f1s.push(f1);
    }
    let avg = mean(&f1s);
    writeln!(out, "{:<22} F1 {avg:6.2}", "average")?;
    let result = serde_json::json!({
        "avg_f1": (avg * 100.0).round() / 100.0,
        "per_domain": per_domain,
        "chosen_on_dev": thresholds,
        "errors": errors,
        "episodes_per_domain": a.episodes.unwrap_or(100),
        "dev_episodes": {"skipped": a.dev_skip, "at_most": a.dev_episodes},
        "folds": a.folds,
        "settings": {
            "model": model_name, "pooling": build.pooling.name(), "max_width": build.max_width,
            "o_spans": build.index_o_spans, "k": base_cfg.k, "decoder": format!("{:?}", base_cfg.strategy),
            "tuned": !a.no_tune, "detector": a.settings.detector, "detector_adapt_epochs": a.detector_adapt, "oracle_detector": a.oracle_detector, "scorer": a.fit_scorer,
            "source_memory": a.source_memory,
            "slot_descriptions": a.slot_descriptions,
        },
        "seconds": started.elapsed().as_secs_f64().round(),
    });
    crate::bench::merge_result(&a.out, &[&a.key, &format!("{}shot", a.shots)], result)?;
    writeln!(out, "wrote {} [{}][{}shot]", a.out.display(), a.key, a.shots)?;
    Ok(())
}

/// The fine-tune baseline over the 7 folds: per episode, fine-tune the fold's model on
/// the support set and score the queries. Its settings are fixed, so no dev domain is used.
fn run_finetune(a: FewshotArgs, out: &mut dyn Write) -> Result<()> {
    let started = std::time::Instant::now();
    let mut per_domain = serde_json::Map::new();
    let mut errors = serde_json::Map::new();
    let mut f1s = Vec::new();
    let default_dir = match &a.fold_models {
        None => Some(a.model.dir()?),
        Some(_) => None,
    };
    check_folds(&a.folds)?;
    for &fold in &a.folds {
        let dir = match (&a.fold_models, &default_dir) {
            (Some(pattern), _) => PathBuf::from(pattern.replace("{fold}", &fold.to_string())),
            (None, Some(d)) => d.clone(),
            (None, None) => unreachable!("a model folder or a per-fold pattern"),
        };
        let mut target = load_domain(&a.data, a.shots, fold)?;
        target.truncate(a.episodes.unwrap_or(usize::MAX));
        let mut reports = Vec::with_capacity(target.len());
        for (i, ep) in target.iter().enumerate() {
            let preds = crate::bench::finetune::finetune_and_label(&dir, &ep.support, &ep.query, &a.finetune, i as u64)
                .with_context(|| format!("fold {fold}, episode {i}"))?;
            let mut ev = Evaluator::new();
            for (gold, pred) in ep.query.iter().zip(&preds) {
                ev.add(gold, pred)?;
            }
            reports.push(ev.report());
        }
        let scores: Vec<f64> = reports.iter().map(|r| 100.0 * r.micro.f1).collect();
        let f1 = mean(&scores);
        let domain = DOMAINS[fold - 1];
        writeln!(out, "{domain:<22} F1 {f1:6.2}  ({} episodes; {:.0}s)", scores.len(), started.elapsed().as_secs_f64())?;
        per_domain.insert(domain.into(), serde_json::json!((f1 * 100.0).round() / 100.0));
        errors.insert(domain.into(), error_summary(&reports));
        f1s.push(f1);
    }
    let avg = mean(&f1s);
    writeln!(out, "{:<22} F1 {avg:6.2}", "average")?;
    let result = serde_json::json!({
        "avg_f1": (avg * 100.0).round() / 100.0,
        "per_domain": per_domain,
        "errors": errors,
        "episodes_per_domain": a.episodes.unwrap_or(100),
        "folds": a.folds,
        "settings": {
            "model": a.fold_models.clone().unwrap_or_else(|| default_dir.map(|d| d.display().to_string()).unwrap_or_default()),
            "method": "finetune", "finetune": a.finetune,
        },
        "seconds": started.elapsed().as_secs_f64().round(),
    });
    crate::bench::merge_result(&a.out, &[&a.key, &format!("{}shot", a.shots)], result)?;
    writeln!(out, "wrote {} [{}][{}shot]", a.out.display(), a.key, a.shots)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn episodes(n: usize) -> Vec<Episode> {
        let ex = |i: usize| Example { text: format!("episode {i}"), words: Vec::new(), intent: None, spans: Vec::new() };
        (1..=n).map(|i| Episode { support: Vec::new(), query: vec![ex(i)] }).collect()
    }

    fn names(eps: &[Episode]) -> Vec<&str> {
        eps.iter().map(|e| e.query[0].text.as_str()).collect()
    }

    #[test]
    fn dev_window_skips_then_takes() {
        assert_eq!(names(&dev_window(episodes(5), 2, 2).unwrap()), ["episode 3", "episode 4"]);
        assert_eq!(names(&dev_window(episodes(5), 0, 2).unwrap()), ["episode 1", "episode 2"]);
        // The domain ends before `take` is reached.
        assert_eq!(names(&dev_window(episodes(5), 3, 10).unwrap()), ["episode 4", "episode 5"]);
        let err = dev_window(episodes(5), 5, 1).unwrap_err().to_string();
        assert!(err.contains("--dev-skip 5") && err.contains("has 5"), "{err}");
    }
}
