//! The retrieval labeler: encode an utterance, retrieve labeled neighbours for every
//! candidate span and for the whole utterance, decode slots and intent, and keep the
//! neighbours as the justification of each decision.
//!
//! **What goes into the index.** Every gold slot span with its label, and (by default)
//! every other candidate span of up to `max_width` words with the label [`O_LABEL`]:
//! a query span is then a slot only when it is closer to a slot example than to any
//! non-slot example. The alternative, slots only plus a similarity threshold, is
//! `--no-o-spans`; BENCHMARKS.md compares the two.

use nearspan_index::{BackendKind, EncoderInfo, ExampleId, NewSpan, SearchParallelism, SpanIndex};
use serde::{Deserialize, Serialize};

use crate::data::{Example, LabeledSpan};
use crate::decode::{decode, Candidate, Strategy};
use crate::detector::SpanDetector;
use crate::encoder::{EncodedText, Encoder, EncoderError, SpanPooling};
use crate::scorer::SlotScorer;
use crate::spans::{candidate_spans, factored_span_vectors, span_vectors, SpanVectors, WordSpan};

/// The label of indexed non-slot spans.
pub const O_LABEL: &str = "O";
/// The intent answered when no example is similar enough.
pub const OUT_OF_SCOPE: &str = "oos";

#[derive(Debug, thiserror::Error)]
pub enum LabelerError {
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error(transparent)]
    Index(#[from] nearspan_index::IndexError),
    #[error("example {index} ({text:?}): span {start}..{end} uses the reserved label \"O\"")]
    ReservedLabel { index: usize, text: String, start: usize, end: usize },
}

/// How an index is built: fixed for its lifetime, recorded in its header.
///
/// Default pooling is `start-end`: on the few-shot SNIPS dev domains it beats `mean` by
/// 0.7 F1 (1-shot) and 1.6 F1 (5-shot); see BENCHMARKS.md.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildConfig {
    pub max_width: usize,
    pub pooling: SpanPooling,
    /// Index non-slot candidate spans under [`O_LABEL`].
    pub index_o_spans: bool,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self { max_width: crate::spans::DEFAULT_MAX_WIDTH, pooling: SpanPooling::StartEnd, index_o_spans: true }
    }
}

/// How intents are scored from the utterance neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntentAggregation {
    /// An intent's score is its best neighbour's similarity.
    Max,
    /// An intent's score is the mean similarity of its neighbours among the top k.
    Mean,
}

impl std::str::FromStr for IntentAggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "max" => Ok(Self::Max),
            "mean" => Ok(Self::Mean),
            other => Err(format!("unknown intent aggregation {other:?}; expected \"max\" or \"mean\"")),
        }
    }
}

/// Query-time settings; none of them needs a rebuild.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryConfig {
    /// Neighbours retrieved per candidate span.
    pub k: usize,
    /// A span scoring below this is never a slot.
    pub threshold: f32,
    /// A span is a slot when its best slot similarity plus this margin exceeds its best
    /// non-slot similarity: positive values favour recall, negative ones precision.
    pub o_margin: f32,
    /// Greedy decoding ranks a candidate span by its best slot similarity minus this times
    /// its best non-slot similarity: 0 ranks by similarity alone, 1 by how far its slot
    /// evidence beats its non-slot evidence (which favours the span with the right
    /// boundaries over a longer or shorter one that is just as similar to a slot). The
    /// best-average decoder ignores it.
    pub o_penalty: f32,
    pub strategy: Strategy,
    /// Utterance neighbours retrieved for the intent.
    pub intent_k: usize,
    pub intent_aggregation: IntentAggregation,
    /// Below this intent score the answer is [`OUT_OF_SCOPE`]; `None` never says it.
    pub oos_threshold: Option<f32>,
    /// Neighbours kept as the justification of each decision.
    pub explain: usize,
    pub batch_size: usize,
    /// Two-stage search: look for span neighbours only among the spans of this many
    /// examples nearest the whole utterance, exactly, instead of among all spans. Much
    /// faster on large indexes (no span graph walk); what it costs in accuracy is in
    /// BENCHMARKS.md. `None` searches every span.
    pub prefilter: Option<usize>,
    /// How much the span detector's opinion moves a span's slot score: by this times
    /// (P(slot) − 0.5), in the threshold, the non-slot comparison and the greedy ranking.
    /// 0 ignores it; only spans with a `slotness` are affected.
    pub detector_weight: f32,
}

/// The default `threshold` is the median of the values chosen on the dev domains by
/// `nearspan bench fewshot --shots 5` (BENCHMARKS.md). `o_margin` defaults to 0, the
/// neutral rule (a slot is nearer a slot example than any non-slot example): the dev
/// domains chose values from 0 to 0.2 with no stable trend, and on small domains a
/// positive margin lets short non-slot words through. `o_penalty` defaults to 0, ranking
/// by similarity alone as before it existed (and as the Python peer of `bench query`
/// does); the dev domains chose 0.5 for most folds (BENCHMARKS.md). Tune all three on
/// your own dev data with `nearspan eval`.
impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            k: 10,
            threshold: 0.3,
            o_margin: 0.0,
            o_penalty: 0.0,
            strategy: Strategy::Greedy,
            intent_k: 10,
            intent_aggregation: IntentAggregation::Max,
            oos_threshold: None,
            explain: 3,
            batch_size: crate::encoder::DEFAULT_BATCH_SIZE,
            prefilter: None,
            detector_weight: 0.0,
        }
    }
}

/// A retrieved example that supports a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Neighbour {
    /// The example's text.
    pub example: String,
    /// The neighbour span's text (the whole example for an intent neighbour).
    pub text: String,
    pub start: usize,
    pub end: usize,
    pub label: String,
    pub similarity: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentPrediction {
    pub label: String,
    pub score: f32,
    pub neighbours: Vec<Neighbour>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotPrediction {
    /// Character offsets into the text, half-open.
    pub start: usize,
    pub end: usize,
    pub text: String,
    pub label: String,
    /// Similarity to the nearest example of its label.
    pub score: f32,
    pub neighbours: Vec<Neighbour>,
    /// Word indices, for scoring against word-level gold data.
    #[serde(skip)]
    pub words: (usize, usize),
}

/// The output for one utterance; its JSON form is documented in the README.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub text: String,
    pub intent: Option<IntentPrediction>,
    pub slots: Vec<SlotPrediction>,
}

impl Prediction {
    /// The prediction as an [`Example`] over `words`, for the metrics.
    pub fn to_example(&self, gold: &Example) -> Example {
        let spans = self
            .slots
            .iter()
            .map(|s| LabeledSpan { label: s.label.clone(), word_start: s.words.0, word_end: s.words.1, start: s.start, end: s.end })
            .collect();
        Example { text: gold.text.clone(), words: gold.words.clone(), intent: self.intent.as_ref().map(|i| i.label.clone()), spans }
    }
}

/// The identity an index records for vectors made by `encoder` with `build`.
pub fn encoder_info(encoder: &Encoder, build: &BuildConfig) -> EncoderInfo {
    let info = encoder.info();
    EncoderInfo {
        model_id: info.id.clone(),
        revision: info.weights_sha256.clone(),
        pooling: build.pooling.name().to_string(),
        max_width: build.max_width as u32,
        dim: build.pooling.dim(info.hidden_size) as u32,
    }
}

/// The build settings an opened index was made with: width and pooling from its header,
/// and whether it holds non-slot spans from its labels.
pub fn build_config_of(index: &SpanIndex) -> Result<BuildConfig, String> {
    let e = index.encoder();
    let index_o_spans = index.label_id(O_LABEL).is_some();
    Ok(BuildConfig { max_width: e.max_width as usize, pooling: e.pooling.parse()?, index_o_spans })
}

/// Encodes `examples` and adds them, with their gold spans (and non-slot spans), to `index`.
/// Only the new examples are encoded; nothing is retrained.
pub fn add_examples(
    encoder: &Encoder,
    index: &mut SpanIndex,
    examples: &[Example],
    build: &BuildConfig,
    batch_size: usize,
) -> Result<Vec<ExampleId>, LabelerError> {
    check_labels(examples)?; // before encoding: bad input costs no model time
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let encoded = encoder.encode(&texts, batch_size)?;
    add_checked(index, examples, &encoded, build)
}

/// Rejects examples that use the reserved non-slot label as a slot label.
fn check_labels(examples: &[Example]) -> Result<(), LabelerError> {
    for (i, ex) in examples.iter().enumerate() {
        if let Some(s) = ex.spans.iter().find(|s| s.label == O_LABEL) {
            return Err(LabelerError::ReservedLabel { index: i, text: ex.text.clone(), start: s.start, end: s.end });
        }
    }
    Ok(())
}

/// [`add_examples`] for examples already encoded (`encoded[i]` is `examples[i]`).
pub fn add_encoded(
    index: &mut SpanIndex,
    examples: &[Example],
    encoded: &[EncodedText],
    build: &BuildConfig,
) -> Result<Vec<ExampleId>, LabelerError> {
    check_labels(examples)?;
    add_checked(index, examples, encoded, build)
}

/// Adds examples whose labels [`check_labels`] has accepted.
fn add_checked(
    index: &mut SpanIndex,
    examples: &[Example],
    encoded: &[EncodedText],
    build: &BuildConfig,
) -> Result<Vec<ExampleId>, LabelerError> {
    let mut ids = Vec::with_capacity(examples.len());
    for (ex, enc) in examples.iter().zip(encoded) {
        let (spans, labels) = index_spans(ex, build);
        let sv = span_vectors(enc, &ex.words, spans, build.pooling);
        let new: Vec<(NewSpan, &[f32])> = sv
            .spans
            .iter()
            .zip(&labels)
            .enumerate()
            .map(|(i, (s, label))| {
                let (start, end) = char_range(ex, *s);
                (NewSpan { label, start: start as u32, end: end as u32, text: crate::data::char_slice(&ex.text, start, end) }, sv.vector(i))
            })
            .collect();
        ids.push(index.add_example(&ex.text, ex.intent.as_deref(), &utterance_vector(enc, build), &new)?);
    }
    Ok(ids)
}

/// The utterance vector at the index's dimension. The index has one dimension for spans
/// and utterances; with `start-end` pooling spans are twice the hidden size, so the
/// sentence vector is tiled twice and scaled by 1/√2, which keeps every cosine
/// similarity between utterances exactly as it was.
fn utterance_vector(enc: &EncodedText, build: &BuildConfig) -> Vec<f32> {
    let v = enc.sentence_vector();
    let copies = build.pooling.dim(enc.dim) / enc.dim;
    if copies <= 1 {
        return v;
    }
    let scale = 1.0 / (copies as f32).sqrt();
    (0..copies).flat_map(|_| v.iter().map(move |x| x * scale)).collect()
}

/// The spans of an example that go into the index, with their labels.
fn index_spans<'a>(ex: &'a Example, build: &BuildConfig) -> (Vec<WordSpan>, Vec<&'a str>) {
    let mut spans: Vec<WordSpan> = ex.spans.iter().map(LabeledSpan::words).collect();
    let mut labels: Vec<&str> = ex.spans.iter().map(|s| s.label.as_str()).collect();
    if build.index_o_spans {
        for c in candidate_spans(ex.words.len(), build.max_width) {
            if !spans[..ex.spans.len()].contains(&c) {
                spans.push(c);
                labels.push(O_LABEL);
            }
        }
    }
    (spans, labels)
}

fn char_range(ex: &Example, s: WordSpan) -> (usize, usize) {
    (ex.words[s.start].start, ex.words[s.end - 1].end)
}

/// One candidate span's retrieval result: the best neighbour of each label.
#[derive(Debug, Clone)]
pub struct SpanEvidence {
    pub span: WordSpan,
    /// (label id, best similarity, span id of that neighbour), best first.
    pub by_label: Vec<(u32, f32, u32)>,
    /// Best similarity to a non-slot span, if any was retrieved.
    pub o_score: Option<f32>,
    /// The span detector's logit that this span is a slot of any label
    /// ([`crate::detector`]); `None` without a detector.
    pub slotness: Option<f32>,
    /// The best neighbour of each label among the index's memory spans (see
    /// [`Memory`]), best first, kept apart from `by_label` until
    /// [`Retrieved::with_memory`] merges them; empty without a memory.
    pub memory: Vec<(u32, f32, u32)>,
}

/// Labeled spans borrowed from other domains, searched apart from the rest of the
/// index: the index's spans from `first_span` on. They only add slot evidence: they
/// never crowd the index's own neighbours (non-slot spans included) out of the `k`
/// retrieved, and their similarity is lowered by a discount when merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub first_span: u32,
}

/// Everything retrieved for one utterance; decoding it is cheap, so thresholds can
/// be swept without retrieving again.
#[derive(Debug, Clone)]
pub struct Retrieved {
    pub spans: Vec<SpanEvidence>,
    /// (example id, similarity), best first.
    pub utterances: Vec<(u32, f32)>,
}

impl Retrieved {
    /// The evidence with each span's best memory neighbour merged into `by_label`, its
    /// similarity lowered by `discount`: its label's best similarity becomes the larger
    /// of its own and the memory's. Only the best one joins, so that the memory can
    /// change which label wins but adds no runners-up (the slot scorer reads how far the
    /// second label is behind). The memory lists are emptied; an infinite discount leaves
    /// the memory out.
    pub fn with_memory(&self, discount: f32) -> Retrieved {
        let spans = self
            .spans
            .iter()
            .map(|e| {
                let mut by_label = e.by_label.clone();
                for &(label, similarity, id) in e.memory.iter().take(1).filter(|_| discount.is_finite()) {
                    let lowered = similarity - discount;
                    match by_label.iter_mut().find(|x| x.0 == label) {
                        Some(x) if x.1 >= lowered => {}
                        Some(x) => *x = (label, lowered, id),
                        None => by_label.push((label, lowered, id)),
                    }
                }
                by_label.sort_by(|a, b| b.1.total_cmp(&a.1));
                SpanEvidence { by_label, memory: Vec::new(), ..e.clone() }
            })
            .collect();
        Retrieved { spans, utterances: self.utterances.clone() }
    }
}

/// Retrieves neighbours for every candidate span of every example (one encoder pass
/// per batch, one batched index search per batch). With a `detector`, every span also
/// gets its [`SpanEvidence::slotness`].
pub fn retrieve(
    encoder: &Encoder,
    index: &SpanIndex,
    examples: &[Example],
    build: &BuildConfig,
    cfg: &QueryConfig,
    detector: Option<&SpanDetector>,
) -> Result<Vec<Retrieved>, LabelerError> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let encoded = encoder.encode(&texts, cfg.batch_size)?;
    Ok(retrieve_encoded(index, examples, &encoded, build, cfg, detector))
}

/// [`retrieve`] for examples already encoded (the few-shot benchmark encodes each
/// distinct text once; the server encodes outside the index lock).
pub fn retrieve_encoded(
    index: &SpanIndex,
    examples: &[Example],
    encoded: &[EncodedText],
    build: &BuildConfig,
    cfg: &QueryConfig,
    detector: Option<&SpanDetector>,
) -> Vec<Retrieved> {
    retrieve_with_memory(index, examples, encoded, build, cfg, detector, None)
}

/// [`retrieve_encoded`] for an index whose spans from `memory.first_span` on are a
/// [`Memory`]: the usual search runs over the spans before it (exactly, every one of
/// them: `cfg.prefilter` is not applied), and each candidate span's best memory
/// neighbour per label goes to [`SpanEvidence::memory`]. Utterance neighbours still come
/// from every example.
pub fn retrieve_with_memory(
    index: &SpanIndex,
    examples: &[Example],
    encoded: &[EncodedText],
    build: &BuildConfig,
    cfg: &QueryConfig,
    detector: Option<&SpanDetector>,
    memory: Option<Memory>,
) -> Vec<Retrieved> {
    use rayon::prelude::*;
    let o_label = index.label_id(O_LABEL).map(|l| l.0);
    let n_utterances = cfg.intent_k.max(cfg.prefilter.unwrap_or(0));
    // One batched search: exact search then reads the utterance vectors once per batch.
    let utterance_vectors: Vec<f32> = encoded.iter().flat_map(|enc| utterance_vector(enc, build)).collect();
    let utterance_hits = if encoded.is_empty() { Vec::new() } else { index.search_utterances_batch(&utterance_vectors, n_utterances) };
    // Utterances are retrieved side by side; one utterance's span search is split
    // across threads only when there are fewer utterances than threads.
    let parallelism = if examples.len() >= rayon::current_num_threads() { SearchParallelism::Serial } else { SearchParallelism::Split };
    examples
        .par_iter()
        .zip(encoded.par_iter())
        .zip(utterance_hits.into_par_iter())
        .map(|((ex, enc), utterance_hits)| {
            let candidates = candidate_spans(ex.words.len(), build.max_width);
            let mut utterances: Vec<(u32, f32)> = utterance_hits.into_iter().map(|n| (n.id, n.similarity)).collect();
            let nearest = |m: usize| -> Vec<ExampleId> { utterances.iter().take(m).map(|&(id, _)| ExampleId(id)).collect() };
            let mut memory_hits: Vec<Vec<nearspan_index::Neighbor>> = Vec::new();
            let (spans, hits) = match cfg.prefilter {
                _ if candidates.is_empty() => (candidates, Vec::new()),
                prefilter
                    if build.pooling == SpanPooling::StartEnd
                        && memory.is_none()
                        && (prefilter.is_some() || index.backend() == BackendKind::Exact) =>
                {
                    // Start ⊕ end vectors share their halves: score each half once, among
                    // the nearest examples' spans or, searching exactly, every example's.
                    let f = factored_span_vectors(enc, &ex.words, candidates);
                    let hits = match prefilter {
                        Some(m) => index.search_spans_among_factored(&f.queries(), cfg.k, &nearest(m), parallelism),
                        None => index.search_spans_factored(&f.queries(), cfg.k, parallelism),
                    };
                    (f.spans, hits)
                }
                prefilter => {
                    let sv: SpanVectors = span_vectors(enc, &ex.words, candidates, build.pooling);
                    let hits = match (prefilter, memory) {
                        (_, Some(m)) => {
                            let (own, borrowed) = (0..m.first_span, m.first_span..u32::MAX);
                            memory_hits = index.search_spans_in(&sv.vectors, cfg.k, &[borrowed]);
                            index.search_spans_in(&sv.vectors, cfg.k, &[own])
                        }
                        (Some(m), None) => index.search_spans_among(&sv.vectors, cfg.k, &nearest(m)),
                        (None, None) => index.search_spans_batch(&sv.vectors, cfg.k),
                    };
                    (sv.spans, hits)
                }
            };
            utterances.truncate(cfg.intent_k);
            let slotness: Vec<Option<f32>> = match detector {
                Some(d) => d.logits(enc, &ex.words, &spans).into_iter().map(Some).collect(),
                None => vec![None; spans.len()],
            };
            let best_per_label = |neighbours: Vec<nearspan_index::Neighbor>| {
                let mut by_label: Vec<(u32, f32, u32)> = Vec::new();
                for n in neighbours {
                    let label = index.span(n.id).label.0;
                    if !by_label.iter().any(|(l, _, _)| *l == label) {
                        by_label.push((label, n.similarity, n.id));
                    }
                }
                by_label
            };
            let spans: Vec<SpanEvidence> = spans
                .iter()
                .zip(hits)
                .zip(slotness)
                .zip(memory_hits.into_iter().chain(std::iter::repeat_with(Vec::new)))
                .map(|(((span, neighbours), slotness), memory_neighbours)| {
                    let mut by_label = best_per_label(neighbours);
                    let o_score = by_label.iter().find(|(l, _, _)| Some(*l) == o_label).map(|x| x.1);
                    by_label.retain(|(l, _, _)| Some(*l) != o_label);
                    let mut memory = best_per_label(memory_neighbours);
                    memory.retain(|(l, _, _)| Some(*l) != o_label);
                    SpanEvidence { span: *span, by_label, o_score, slotness, memory }
                })
                .collect();
            Retrieved { spans, utterances }
        })
        .collect()
}

/// Decodes one utterance's retrieval into slots and intent, with justifications.
pub fn decide(index: &SpanIndex, ex: &Example, r: &Retrieved, cfg: &QueryConfig) -> Prediction {
    decide_with(index, ex, r, cfg, None)
}

/// [`decide`], or with a fitted [`SlotScorer`]: its logit replaces the threshold, the
/// non-slot margin and penalty and the detector weight (greedy decoding by logit, each
/// label once per utterance with [`Strategy::GreedyUniqueLabels`], spans below
/// [`SlotScorer::min_logit`] left out).
pub fn decide_with(index: &SpanIndex, ex: &Example, r: &Retrieved, cfg: &QueryConfig, scorer: Option<&SlotScorer>) -> Prediction {
    if let Some(scorer) = scorer {
        let firsts: Vec<(usize, f32)> = scorer.score(r).into_iter().filter(|&(_, logit)| logit >= scorer.min_logit).collect();
        let mut candidates: Vec<Candidate> =
            firsts.iter().map(|&(i, logit)| Candidate { span: r.spans[i].span, label: r.spans[i].by_label[0].0, score: logit }).collect();
        // With each label used once, a span whose best label went to a better span may
        // still be a slot of its second label: offered as a second candidate, scored as
        // if that label were its best but never above its first (so it is only reached
        // when the first was skipped for its label).
        if cfg.strategy == Strategy::GreedyUniqueLabels {
            for &(i, first) in &firsts {
                let e = &r.spans[i];
                let Some(x) = crate::scorer::features_as(e, 1) else { continue };
                let logit = scorer.logit(&x).min(first);
                if logit >= scorer.min_logit {
                    candidates.push(Candidate { span: e.span, label: e.by_label[1].0, score: logit });
                }
            }
        }
        // The logits rank best first, so a scorer always decodes greedily.
        let strategy = if cfg.strategy.is_greedy() { cfg.strategy } else { Strategy::Greedy };
        let chosen = decode(&candidates, &[], strategy);
        return prediction(index, ex, r, cfg, &chosen);
    }
    let candidates: Vec<Candidate> = r
        .spans
        .iter()
        .filter_map(|e| {
            let &(label, similarity, _) = e.by_label.first()?;
            let score = similarity + e.slotness.map_or(0.0, |z| cfg.detector_weight * (crate::detector::sigmoid(z) - 0.5));
            let beats_o = e.o_score.is_none_or(|o| score + cfg.o_margin > o);
            // Greedy decoding sees the ranking key; the similarity is reported below.
            // Best-average sums similarities, so it keeps them.
            let rank = match cfg.strategy {
                Strategy::Greedy | Strategy::GreedyUniqueLabels => score - cfg.o_penalty * e.o_score.unwrap_or(0.0),
                Strategy::BestAverage => score,
            };
            (score >= cfg.threshold && beats_o).then_some(Candidate { span: e.span, label, score: rank })
        })
        .collect();
    // How well each word fits no slot: its single-word span's best non-slot similarity,
    // never below the threshold.
    let mut word_scores = vec![cfg.threshold; ex.words.len()];
    for e in r.spans.iter().filter(|e| e.span.width() == 1) {
        if let (Some(o), Some(w)) = (e.o_score, word_scores.get_mut(e.span.start)) {
            *w = o.max(cfg.threshold);
        }
    }
    let chosen = decode(&candidates, &word_scores, cfg.strategy);
    prediction(index, ex, r, cfg, &chosen)
}

/// The chosen spans as slots with their justifications, and the intent.
fn prediction(index: &SpanIndex, ex: &Example, r: &Retrieved, cfg: &QueryConfig, chosen: &[Candidate]) -> Prediction {
    let slots = chosen
        .iter()
        .map(|c| {
            let (start, end) = char_range(ex, c.span);
            // The few chosen spans are found among ~50 candidates; no map is worth building.
            let evidence = r.spans.iter().find(|e| e.span == c.span).map_or(&[][..], |e| &e.by_label[..]);
            // The chosen label's neighbour first (it is not the best one when a decoder
            // gave the span its second label), then the others best first.
            let chosen = evidence.iter().position(|x| x.0 == c.label).unwrap_or(0);
            let similarity = evidence.get(chosen).map_or(c.score, |x| x.1);
            let neighbours = evidence
                .get(chosen)
                .into_iter()
                .chain(evidence.iter().enumerate().filter(|&(i, _)| i != chosen).map(|(_, x)| x))
                .take(cfg.explain)
                .map(|&(_, similarity, id)| span_neighbour(index, id, similarity))
                .collect();
            SlotPrediction {
                start,
                end,
                text: crate::data::char_slice(&ex.text, start, end).to_string(),
                label: index.label(nearspan_index::LabelId(c.label)).to_string(),
                score: similarity,
                neighbours,
                words: (c.span.start, c.span.end),
            }
        })
        .collect();
    Prediction { text: ex.text.clone(), intent: decide_intent(index, r, cfg), slots }
}

fn span_neighbour(index: &SpanIndex, id: u32, similarity: f32) -> Neighbour {
    let rec = index.span(id);
    Neighbour {
        example: index.example(rec.example).text.clone(),
        text: rec.text.clone(),
        start: rec.start as usize,
        end: rec.end as usize,
        label: index.label(rec.label).to_string(),
        similarity,
    }
}

/// The best intent among utterance neighbours `(example id, similarity)` and its score:
/// the best similarity of its neighbours (`Max`) or their mean (`Mean`). Ties go to the
/// intent met first; neighbours without an intent are skipped.
pub fn best_intent<'a>(index: &'a SpanIndex, neighbours: &[(u32, f32)], aggregation: IntentAggregation) -> Option<(&'a str, f32)> {
    let mut per_intent: Vec<(&str, f32, usize)> = Vec::new(); // (intent, score, count)
    for &(id, sim) in neighbours {
        let Some(intent) = index.example(ExampleId(id)).intent.as_deref() else { continue };
        match per_intent.iter_mut().find(|(i, _, _)| *i == intent) {
            Some(entry) => {
                entry.2 += 1;
                match aggregation {
                    IntentAggregation::Max => entry.1 = entry.1.max(sim),
                    IntentAggregation::Mean => entry.1 += sim,
                }
            }
            None => per_intent.push((intent, sim, 1)),
        }
    }
    if aggregation == IntentAggregation::Mean {
        per_intent.iter_mut().for_each(|e| e.1 /= e.2 as f32);
    }
    per_intent.into_iter().fold(None, |best, (intent, score, _)| match best {
        Some((_, top)) if top >= score => best,
        _ => Some((intent, score)),
    })
}

fn decide_intent(index: &SpanIndex, r: &Retrieved, cfg: &QueryConfig) -> Option<IntentPrediction> {
    let (intent, score) = best_intent(index, &r.utterances, cfg.intent_aggregation)?;
    let label = match cfg.oos_threshold {
        Some(t) if score < t => OUT_OF_SCOPE,
        _ => intent,
    };
    let neighbours = r
        .utterances
        .iter()
        .filter(|(id, _)| index.example(ExampleId(*id)).intent.is_some())
        .take(cfg.explain)
        .map(|&(id, similarity)| {
            let ex = index.example(ExampleId(id));
            Neighbour {
                example: ex.text.clone(),
                text: ex.text.clone(),
                start: 0,
                end: ex.text.chars().count(),
                label: ex.intent.clone().unwrap_or_default(),
                similarity,
            }
        })
        .collect();
    Some(IntentPrediction { label: label.to_string(), score, neighbours })
}

/// Labels examples (their words decide the candidate spans), with the span detector's
/// opinion and a slot scorer's decisions when given.
pub fn label_examples(
    encoder: &Encoder,
    index: &SpanIndex,
    examples: &[Example],
    build: &BuildConfig,
    cfg: &QueryConfig,
    detector: Option<&SpanDetector>,
    scorer: Option<&SlotScorer>,
) -> Result<Vec<Prediction>, LabelerError> {
    let retrieved = retrieve(encoder, index, examples, build, cfg, detector)?;
    Ok(examples.iter().zip(&retrieved).map(|(ex, r)| decide_with(index, ex, r, cfg, scorer)).collect())
}

/// Labels raw texts, words split by [`crate::data::segment_words`].
pub fn label_texts(
    encoder: &Encoder,
    index: &SpanIndex,
    texts: &[&str],
    build: &BuildConfig,
    cfg: &QueryConfig,
) -> Result<Vec<Prediction>, LabelerError> {
    let examples: Vec<Example> = texts.iter().map(|t| Example::from_text(t, None)).collect();
    label_examples(encoder, index, &examples, build, cfg, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearspan_index::{BackendKind, HnswParams};

    fn toy_index(intents: &[Option<&str>]) -> SpanIndex {
        let info = EncoderInfo { model_id: "toy".into(), revision: "0".into(), pooling: "mean".into(), max_width: 1, dim: 2 };
        let mut index = SpanIndex::new(info, BackendKind::Exact, HnswParams::default()).unwrap();
        for (i, intent) in intents.iter().enumerate() {
            index.add_example(&format!("example {i}"), *intent, &[1.0, 0.0], &[]).unwrap();
        }
        index
    }

    #[test]
    fn best_intent_aggregates_by_max_or_mean() {
        let index = toy_index(&[Some("a"), Some("b"), Some("a"), None]);
        // a: 0.9 and 0.5; b: 0.8; the intent-less example is skipped.
        let hits = [(0, 0.9), (1, 0.8), (2, 0.5), (3, 0.95)];
        assert_eq!(best_intent(&index, &hits, IntentAggregation::Max), Some(("a", 0.9)));
        assert_eq!(best_intent(&index, &hits, IntentAggregation::Mean), Some(("b", 0.8)));
        assert_eq!(best_intent(&index, &hits[3..], IntentAggregation::Max), None);
    }

    /// The best memory neighbour joins a span's evidence lowered by the discount: the
    /// label's own neighbour stays when it is at least as similar, a label only the
    /// memory has is added, the list stays best first, the memory's runners-up stay out,
    /// and an infinite discount changes nothing.
    #[test]
    fn memory_evidence_merges_at_its_discount() {
        let (city, state, country) = (1, 2, 3);
        let evidence = |memory: Vec<(u32, f32, u32)>| SpanEvidence {
            span: WordSpan { start: 0, end: 1 },
            by_label: vec![(city, 0.6, 1), (country, 0.3, 2)],
            o_score: Some(0.5),
            slotness: None,
            memory,
        };
        let merged = |memory: Vec<(u32, f32, u32)>, d: f32| {
            let r = Retrieved { spans: vec![evidence(memory)], utterances: vec![(0, 0.9)] };
            let m = r.with_memory(d);
            assert!(m.spans[0].memory.is_empty() && m.spans[0].o_score == Some(0.5) && m.utterances == r.utterances);
            m.spans[0].by_label.iter().map(|&(l, s, id)| (l, (s * 100.0).round() / 100.0, id)).collect::<Vec<_>>()
        };
        let memory = vec![(city, 0.8, 10), (state, 0.7, 11)];
        assert_eq!(merged(memory.clone(), 0.1), [(city, 0.7, 10), (country, 0.3, 2)]);
        assert_eq!(merged(memory.clone(), 0.3), [(city, 0.6, 1), (country, 0.3, 2)]);
        assert_eq!(merged(memory.clone(), f32::INFINITY), [(city, 0.6, 1), (country, 0.3, 2)]);
        assert_eq!(merged(vec![(state, 0.75, 11)], 0.05), [(state, 0.7, 11), (city, 0.6, 1), (country, 0.3, 2)]);
        assert_eq!(merged(vec![(country, 0.5, 12)], 0.1), [(city, 0.6, 1), (country, 0.4, 12)]);
    }

    #[test]
    fn best_intent_ties_go_to_the_first_met() {
        let index = toy_index(&[Some("b"), Some("a")]);
        assert_eq!(best_intent(&index, &[(0, 0.7), (1, 0.7)], IntentAggregation::Max), Some(("b", 0.7)));
    }

    /// Two overlapping candidates: "new york city" is more similar to a city example
    /// (0.80) but as similar to a non-slot span (0.78); "new york" a little less similar
    /// (0.75) with clear non-slot evidence against it (0.40). Similarity alone keeps the
    /// long span; a penalty of 1 keeps the span whose slot evidence wins by more. Either
    /// way the reported score is the similarity.
    #[test]
    fn the_o_penalty_ranks_by_how_far_slot_evidence_wins() {
        let info = EncoderInfo { model_id: "toy".into(), revision: "0".into(), pooling: "mean".into(), max_width: 3, dim: 2 };
        let mut index = SpanIndex::new(info, BackendKind::Exact, HnswParams::default()).unwrap();
        let city = NewSpan { label: "city", start: 3, end: 8, text: "paris" };
        let o = NewSpan { label: O_LABEL, start: 0, end: 2, text: "to" };
        index.add_example("to paris", None, &[1.0, 0.0], &[(city, &[1.0, 0.0][..]), (o, &[0.0, 1.0][..])]).unwrap();
        let city_id = index.label_id("city").unwrap().0;
        let ex = Example::from_text("new york city", None);
        let evidence = |start, end, score, o| SpanEvidence {
            span: WordSpan { start, end },
            by_label: vec![(city_id, score, 0)],
            o_score: Some(o),
            slotness: None,
            memory: Vec::new(),
        };
        let r = Retrieved { spans: vec![evidence(0, 3, 0.80, 0.78), evidence(0, 2, 0.75, 0.40)], utterances: vec![] };
        let slots_with = |o_penalty: f32, strategy: Strategy| {
            let cfg = QueryConfig { o_penalty, strategy, ..QueryConfig::default() };
            decide(&index, &ex, &r, &cfg).slots.into_iter().map(|s| (s.text, s.score)).collect::<Vec<_>>()
        };
        let slots = |o_penalty: f32| slots_with(o_penalty, Strategy::Greedy);
        assert_eq!(slots(0.0), [("new york city".to_string(), 0.80)]);
        assert_eq!(slots(1.0), [("new york".to_string(), 0.75)]);
        // Best-average sums similarities and ignores the penalty.
        assert_eq!(slots_with(1.0, Strategy::BestAverage), slots_with(0.0, Strategy::BestAverage));
    }

    /// A 2-dimensional index holding "to paris" with "paris" as a city, and the city label's id.
    fn paris_index() -> (SpanIndex, u32) {
        let info = EncoderInfo { model_id: "toy".into(), revision: "0".into(), pooling: "mean".into(), max_width: 3, dim: 2 };
        let mut index = SpanIndex::new(info, BackendKind::Exact, HnswParams::default()).unwrap();
        let city = NewSpan { label: "city", start: 3, end: 8, text: "paris" };
        index.add_example("to paris", None, &[1.0, 0.0], &[(city, &[1.0, 0.0][..])]).unwrap();
        let city_id = index.label_id("city").unwrap().0;
        (index, city_id)
    }

    /// "from oslo to rome": two spans whose best label is city. The greedy decoder keeps
    /// both; greedy-unique-labels keeps the better one, with the hand-set rule and with a
    /// slot scorer alike.
    #[test]
    fn unique_labels_keep_one_slot_per_label_with_or_without_a_scorer() {
        let (index, city_id) = paris_index();
        let ex = Example::from_text("from oslo to rome", None);
        let evidence = |start, score| SpanEvidence {
            span: WordSpan { start, end: start + 1 },
            by_label: vec![(city_id, score, 0)],
            o_score: Some(0.2),
            slotness: None,
            memory: Vec::new(),
        };
        let r = Retrieved { spans: vec![evidence(1, 0.8), evidence(3, 0.9)], utterances: vec![] };
        // Fitted to prefer the more similar span, then told to keep every span.
        let gold = vec![(WordSpan { start: 3, end: 4 }, city_id)];
        let mut scorer = crate::scorer::SlotScorer::fit(&[crate::scorer::Labeled { retrieved: &r, gold }], &Default::default()).unwrap();
        scorer.min_logit = -1e3;
        for scorer in [None, Some(&scorer)] {
            let slots = |strategy| {
                let cfg = QueryConfig { strategy, ..QueryConfig::default() };
                decide_with(&index, &ex, &r, &cfg, scorer).slots.into_iter().map(|s| s.text).collect::<Vec<_>>()
            };
            assert_eq!(slots(Strategy::Greedy), ["oslo", "rome"], "scorer: {}", scorer.is_some());
            assert_eq!(slots(Strategy::GreedyUniqueLabels), ["rome"], "scorer: {}", scorer.is_some());
        }
    }

    /// "from oslo to rome", both best as city, oslo second as from_city. With a slot
    /// scorer, greedy-unique-labels gives rome the city and oslo its second label,
    /// explained by that label's neighbour first; plain greedy keeps both as city, and
    /// without a second label oslo is dropped as before.
    #[test]
    fn unique_labels_give_a_span_that_lost_its_label_its_second() {
        let (mut index, city_id) = paris_index();
        let from = NewSpan { label: "from_city", start: 5, end: 10, text: "paris" };
        index.add_example("from paris", None, &[0.0, 1.0], &[(from, &[0.0, 1.0][..])]).unwrap();
        let from_id = index.label_id("from_city").unwrap().0;
        let ex = Example::from_text("from oslo to rome", None);
        let evidence = |start, by_label| SpanEvidence { span: WordSpan { start, end: start + 1 }, by_label, o_score: Some(0.2), slotness: None, memory: Vec::new() };
        let retrieved = |oslo| Retrieved { spans: vec![evidence(1, oslo), evidence(3, vec![(city_id, 0.9, 0)])], utterances: vec![] };
        let r = retrieved(vec![(city_id, 0.8, 0), (from_id, 0.7, 1)]);
        let gold = vec![(WordSpan { start: 1, end: 2 }, from_id), (WordSpan { start: 3, end: 4 }, city_id)];
        let mut scorer = crate::scorer::SlotScorer::fit(&[crate::scorer::Labeled { retrieved: &r, gold }], &Default::default()).unwrap();
        scorer.min_logit = -1e3;
        let slots = |r: &Retrieved, strategy| {
            let cfg = QueryConfig { strategy, ..QueryConfig::default() };
            let p = decide_with(&index, &ex, r, &cfg, Some(&scorer));
            p.slots.into_iter().map(|s| (s.text, s.label, s.score, s.neighbours[0].label.clone())).collect::<Vec<_>>()
        };
        let slot = |text: &str, label: &str, score: f32| (text.to_string(), label.to_string(), score, label.to_string());
        assert_eq!(slots(&r, Strategy::GreedyUniqueLabels), [slot("oslo", "from_city", 0.7), slot("rome", "city", 0.9)]);
        assert_eq!(slots(&r, Strategy::Greedy), [slot("oslo", "city", 0.8), slot("rome", "city", 0.9)]);
        assert_eq!(slots(&retrieved(vec![(city_id, 0.8, 0)]), Strategy::GreedyUniqueLabels), [slot("rome", "city", 0.9)]);
    }

    /// The detector's opinion: a span that loses to non-slot evidence becomes a slot when
    /// the detector is sure it is one, a span that wins is dropped below the threshold
    /// when it is sure it is not; weight 0 or no slotness changes nothing, and the
    /// reported score stays the similarity.
    #[test]
    fn the_detector_moves_slot_decisions_by_its_weight() {
        let (index, city_id) = paris_index();
        let ex = Example::from_text("fly to oslo from rome", None);
        let evidence = |start, score, o, slotness| SpanEvidence {
            span: WordSpan { start, end: start + 1 },
            by_label: vec![(city_id, score, 0)],
            o_score: Some(o),
            slotness,
            memory: Vec::new(),
        };
        // "oslo": slot 0.70 loses to non-slot 0.75; "rome": slot 0.80 beats non-slot 0.50.
        let r = |oslo, rome| Retrieved { spans: vec![evidence(2, 0.70, 0.75, oslo), evidence(4, 0.80, 0.50, rome)], utterances: vec![] };
        let slots = |r: &Retrieved, detector_weight: f32| {
            let cfg = QueryConfig { detector_weight, threshold: 0.7, ..QueryConfig::default() };
            decide(&index, &ex, r, &cfg).slots.into_iter().map(|s| (s.text, s.score)).collect::<Vec<_>>()
        };
        let sure = r(Some(6.0), Some(-6.0));
        assert_eq!(slots(&sure, 0.0), [("rome".to_string(), 0.80)]);
        // 0.70 + 0.4 × (σ(6) − 0.5) ≈ 0.90 > 0.75; 0.80 − 0.4 × 0.4975 ≈ 0.60 < 0.7.
        assert_eq!(slots(&sure, 0.4), [("oslo".to_string(), 0.70)]);
        assert_eq!(slots(&r(None, None), 0.4), [("rome".to_string(), 0.80)]);
    }
}
