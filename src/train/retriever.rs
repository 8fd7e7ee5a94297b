//! The Retriever objective (Yu et al., NAACL 2021): batch softmax over labels, where a
//! span's score for a label is its similarity to the *best* span of that label in the
//! batch. It trains exactly what inference does: label a span by its nearest labeled
//! neighbours.
//!
//! Choices (measured in BENCHMARKS.md):
//! - Spans are pooled as at inference ([`SpanPooling`], default start-end) and
//!   L2-normalized; the score is `scale × cosine` (scale 20 ≈ temperature 0.05).
//! - Non-slot spans take part as the label `O`: `o_spans` random non-gold candidate
//!   spans per utterance, as a competing label, because the index holds `O` spans at
//!   inference and a slot span must end up nearer its own label than `O`; and, unless
//!   `o_anchors` is off, as anchors too (pulled towards each other like any label).
//! - Intents are trained by the same loss over mean-pooled utterance vectors; the total
//!   loss is `slot loss + intent_weight × intent loss` (one encoder, summed).
//! - Slot labels of the same name are one label across intents by default
//!   ([`LabelScope::Shared`]: `city` of a weather request and of a booking are drawn
//!   together); [`LabelScope::Intent`] keeps them apart.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::rng::Rng;
use super::sampler::label_batches;
use super::{Objective, TrainError};
use crate::data::Example;
use crate::encoder::{Encoder, ForwardMode, SpanPooling, TokenizedText};
use crate::labeler::O_LABEL;

/// The label id of `O` among the slot labels of training.
const O_ID: u32 = 0;

/// The objective's settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetrieverLoss {
    pub pooling: SpanPooling,
    /// Longest candidate span (words) sampled as `O`.
    pub max_width: usize,
    /// Cosine similarities are multiplied by this before the softmax.
    pub scale: f32,
    /// Random non-slot spans per utterance (0: slots only).
    pub o_spans: usize,
    /// Whether `O` spans are anchors of the loss (drawn towards their nearest `O`
    /// neighbour) or only competitors that slot spans are pushed away from.
    #[serde(default = "anchors_by_default")]
    pub o_anchors: bool,
    pub intent_weight: f32,
    /// Examples drawn per label when a batch is built.
    pub per_label: usize,
    pub dropout: f32,
    /// Whether a slot label is one label across intents or one per intent.
    #[serde(default)]
    pub label_scope: LabelScope,
}

/// Which slot spans count as the same label in the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LabelScope {
    /// By name: `object_type` of every intent is one label.
    #[default]
    Shared,
    /// By intent and name: `object_type` of SearchCreativeWork and of RateBook are two
    /// labels, pushed apart like any other pair (examples without an intent keep the name).
    Intent,
}

impl Default for RetrieverLoss {
    fn default() -> Self {
        Self {
            pooling: SpanPooling::StartEnd,
            max_width: crate::spans::DEFAULT_MAX_WIDTH,
            scale: 20.0,
            o_spans: 2,
            o_anchors: true,
            intent_weight: 1.0,
            per_label: 4,
            dropout: 0.1,
            label_scope: LabelScope::default(),
        }
    }
}

/// The loss's name for slot label `label` of example `e` under `scope`.
fn scoped_label(scope: LabelScope, e: &Example, label: &str) -> String {
    match (scope, &e.intent) {
        (LabelScope::Intent, Some(intent)) => format!("{intent}/{label}"),
        _ => label.to_string(),
    }
}

/// Training examples prepared once: tokens and each word's sub-token range.
pub struct RetrieverObjective<'a> {
    encoder: &'a Encoder,
    examples: Vec<Example>,
    tokens: Vec<TokenizedText>,
    word_tokens: Vec<Vec<Range<usize>>>,
    /// Sampler groups of each example: its slot labels, or its intent if it has none.
    groups: Vec<Vec<String>>,
    /// Label id of each example's slots, in the order of `Example::spans` (named once,
    /// here, under the loss's [`LabelScope`]).
    span_ids: Vec<Vec<u32>>,
    /// Distinct slot labels, `O` included.
    slot_labels: usize,
    intent_ids: HashMap<String, u32>,
    loss: RetrieverLoss,
    batch_size: usize,
}

impl<'a> RetrieverObjective<'a> {
    pub fn new(encoder: &'a Encoder, examples: Vec<Example>, loss: RetrieverLoss, batch_size: usize) -> Result<Self, TrainError> {
        if examples.is_empty() {
            return Err(TrainError::NoData("no training examples".into()));
        }
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let tokens = encoder.tokenize_all(&texts)?;
        let word_tokens = tokens.iter().zip(&examples).map(|(t, e)| t.align_words(&e.words)).collect();
        let mut slot_ids = HashMap::from([(O_LABEL.to_string(), O_ID)]);
        let mut intent_ids = HashMap::new();
        let mut groups = Vec::with_capacity(examples.len());
        for e in &examples {
            let mut g: Vec<String> =
                e.spans.iter().map(|s| scoped_label(loss.label_scope, e, &s.label)).collect::<BTreeSet<_>>().into_iter().collect();
            for l in &g {
                let n = slot_ids.len() as u32;
                slot_ids.entry(l.clone()).or_insert(n);
            }
            if let Some(i) = &e.intent {
                let n = intent_ids.len() as u32;
                intent_ids.entry(i.clone()).or_insert(n);
                if g.is_empty() {
                    g.push(format!("intent:{i}"));
                }
            }
            groups.push(g);
        }
        let span_ids =
            examples.iter().map(|e| e.spans.iter().map(|s| slot_ids[&scoped_label(loss.label_scope, e, &s.label)]).collect()).collect();
        let slot_labels = slot_ids.len();
        Ok(Self { encoder, examples, tokens, word_tokens, groups, span_ids, slot_labels, intent_ids, loss, batch_size })
    }

    /// Slot labels seen in training (`O` included).
    pub fn slot_labels(&self) -> usize {
        self.slot_labels
    }

    /// The spans of one utterance that enter the loss: its slots, then `o_spans` random
    /// non-slot candidates. (word span, label id), only spans with sub-tokens.
    fn loss_spans(&self, i: usize, rng: &mut Rng) -> Vec<(Range<usize>, u32)> {
        let ex = &self.examples[i];
        let wt = &self.word_tokens[i];
        let tok = |w: Range<usize>| -> Option<Range<usize>> {
            let s = wt[w.clone()].iter().find(|r| !r.is_empty())?.start;
            let e = wt[w].iter().rev().find(|r| !r.is_empty())?.end;
            Some(s..e)
        };
        let mut out: Vec<(Range<usize>, u32)> =
            ex.spans.iter().zip(&self.span_ids[i]).filter_map(|(s, &id)| Some((tok(s.word_start..s.word_end)?, id))).collect();
        let n = ex.words.len();
        let mut tries = 0;
        let mut added = 0;
        while added < self.loss.o_spans && n > 0 && tries < 20 {
            tries += 1;
            let start = rng.below(n);
            let end = start + 1 + rng.below(self.loss.max_width.min(n - start));
            if ex.spans.iter().any(|s| s.word_start == start && s.word_end == end) {
                continue;
            }
            if let Some(t) = tok(start..end) {
                if !out.iter().any(|(r, _)| *r == t) {
                    out.push((t, O_ID));
                    added += 1;
                }
            }
        }
        out
    }
}

/// L2-normalizes the rows of a (n, d) tensor.
fn normalize_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)
}

fn anchors_by_default() -> bool {
    true
}

/// Batch softmax over labels: for each row `i` of the normalized vectors `v`, its score
/// for label `l` is `scale × max_{j ≠ i, label(j) = l} cos(v_i, v_j)`; cross-entropy
/// towards its own label, averaged over rows whose label has another member in the
/// batch, except rows of `not_anchor` (a label that only competes). `None` when no row
/// is left.
pub fn batch_softmax_loss(v: &Tensor, labels: &[u32], scale: f32, not_anchor: Option<u32>) -> Result<Option<Tensor>, TrainError> {
    let n = labels.len();
    let distinct: Vec<u32> = labels.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
    let count = |l: u32| labels.iter().filter(|&&x| x == l).count();
    let rows: Vec<u32> =
        (0..n as u32).filter(|&i| count(labels[i as usize]) >= 2 && Some(labels[i as usize]) != not_anchor).collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let device = v.device();
    let mut self_mask = vec![0f32; n * n];
    for i in 0..n {
        self_mask[i * n + i] = -1e4;
    }
    let sims = v.matmul(&v.t()?)?.add(&Tensor::from_vec(self_mask, (n, n), device)?)?;
    let rows_t = Tensor::new(rows.as_slice(), device)?;
    let sims = sims.index_select(&rows_t, 0)?;
    let mut columns = Vec::with_capacity(distinct.len());
    for &l in &distinct {
        let cols: Vec<u32> = (0..n as u32).filter(|&j| labels[j as usize] == l).collect();
        columns.push(sims.index_select(&Tensor::new(cols.as_slice(), device)?, 1)?.max_keepdim(1)?);
    }
    let logits = (Tensor::cat(&columns, 1)? * scale as f64)?;
    let targets: Vec<u32> = rows.iter().map(|&i| distinct.binary_search(&labels[i as usize]).unwrap_or(0) as u32).collect();
    let targets = Tensor::new(targets.as_slice(), device)?;
    Ok(Some(candle_nn::loss::cross_entropy(&logits, &targets)?))
}

/// Gathers pooled span vectors from the flattened hidden states (b·t, h).
fn pool_spans(flat: &Tensor, spans: &[(usize, Range<usize>)], t: usize, pooling: SpanPooling, device: &Device) -> candle_core::Result<Tensor> {
    let index = |f: &dyn Fn(&Range<usize>) -> usize| -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = spans.iter().map(|(row, r)| (row * t + f(r)) as u32).collect();
        Tensor::new(ids.as_slice(), device)
    };
    let first = || flat.index_select(&index(&|r| r.start)?, 0);
    let last = || flat.index_select(&index(&|r| r.end - 1)?, 0);
    let mean = || -> candle_core::Result<Tensor> {
        let rows = flat.dim(0)?;
        let mut w = vec![0f32; spans.len() * rows];
        for (k, (row, r)) in spans.iter().enumerate() {
            for tok in r.clone() {
                w[k * rows + row * t + tok] = 1.0 / r.len() as f32;
            }
        }
        Tensor::from_vec(w, (spans.len(), rows), device)?.matmul(flat)
    };
    let pooled = match pooling {
        SpanPooling::Mean => mean()?,
        SpanPooling::StartEnd => Tensor::cat(&[first()?, last()?], 1)?,
        SpanPooling::StartEndMean => Tensor::cat(&[first()?, last()?, mean()?], 1)?,
    };
    normalize_rows(&pooled)
}

impl Objective for RetrieverObjective<'_> {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn plan_epoch(&self, rng: &mut Rng) -> Vec<Vec<usize>> {
        label_batches(&self.groups, self.batch_size, self.loss.per_label, rng)
    }

    fn loss(&self, batch: &[usize], rng: &mut Rng) -> Result<(Tensor, usize), TrainError> {
        let toks: Vec<&TokenizedText> = batch.iter().map(|&i| &self.tokens[i]).collect();
        let hidden = self.encoder.forward(&toks, ForwardMode::Train { dropout: self.loss.dropout })?;
        let (b, t, h) = hidden.dims3()?;
        let device = hidden.device().clone();
        let flat = hidden.reshape((b * t, h))?;
        let mut spans = Vec::new();
        let mut span_labels = Vec::new();
        for (row, &i) in batch.iter().enumerate() {
            for (r, l) in self.loss_spans(i, rng) {
                spans.push((row, r));
                span_labels.push(l);
            }
        }
        let mut total: Option<Tensor> = None;
        if !spans.is_empty() {
            let v = pool_spans(&flat, &spans, t, self.loss.pooling, &device)?;
            let not_anchor = if self.loss.o_anchors { None } else { Some(O_ID) };
            total = batch_softmax_loss(&v, &span_labels, self.loss.scale, not_anchor)?;
        }
        let intents: Vec<Option<u32>> = batch.iter().map(|&i| self.examples[i].intent.as_ref().map(|x| self.intent_ids[x])).collect();
        if self.loss.intent_weight > 0.0 && intents.iter().all(Option::is_some) {
            // Mean over real tokens ([CLS] and [SEP] included), as sentence_vector does.
            let mut mask = vec![0f32; b * t];
            for (row, tk) in toks.iter().enumerate() {
                mask[row * t..row * t + tk.len()].fill(1.0 / tk.len() as f32);
            }
            let mask = Tensor::from_vec(mask, (b, 1, t), &device)?;
            let sent = normalize_rows(&mask.matmul(&hidden)?.squeeze(1)?)?;
            let labels: Vec<u32> = intents.into_iter().flatten().collect();
            if let Some(l) = batch_softmax_loss(&sent, &labels, self.loss.scale, None)? {
                let l = (l * self.loss.intent_weight as f64)?;
                total = Some(match total {
                    Some(s) => (s + l)?,
                    None => l,
                });
            }
        }
        let tokens = toks.iter().map(|x| x.len()).sum();
        match total {
            Some(loss) => Ok((loss, tokens)),
            // Nothing to compare in this batch: a zero loss that still touches the graph.
            None => Ok((hidden.sum_all()?.affine(0.0, 0.0)?.to_dtype(DType::F32)?, tokens)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| {
            let n = (r[0] * r[0] + r[1] * r[1]).sqrt();
            [r[0] / n, r[1] / n]
        }).collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    /// Hand-computed: two labels, two members each.
    #[test]
    fn loss_uses_the_best_other_member_of_each_label() {
        // a0, a1 point right; b0, b1 point up; a1 is slightly tilted.
        let v = unit(&[[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0]]);
        let labels = [0, 0, 1, 1];
        let scale = 5.0f32;
        let vv = v.to_vec2::<f32>().unwrap();
        let cos = |i: usize, j: usize| vv[i][0] * vv[j][0] + vv[i][1] * vv[j][1];
        let row_loss = |i: usize| {
            let own: Vec<usize> = (0..4).filter(|&j| j != i && labels[j] == labels[i]).collect();
            let other: Vec<usize> = (0..4).filter(|&j| labels[j] != labels[i]).collect();
            let s_own = own.iter().map(|&j| cos(i, j)).fold(f32::MIN, f32::max) * scale;
            let s_other = other.iter().map(|&j| cos(i, j)).fold(f32::MIN, f32::max) * scale;
            -(s_own - (s_own.exp() + s_other.exp()).ln())
        };
        let got = batch_softmax_loss(&v, &labels, scale, None).unwrap().unwrap().to_scalar::<f32>().unwrap();
        let want = (0..4).map(row_loss).sum::<f32>() / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Label 0 only competing: the mean over the rows of label 1 alone.
        let got = batch_softmax_loss(&v, &labels, scale, Some(0)).unwrap().unwrap().to_scalar::<f32>().unwrap();
        let want = (row_loss(2) + row_loss(3)) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Nothing left to anchor.
        assert!(batch_softmax_loss(&v, &[0, 0, 1, 2], scale, Some(0)).unwrap().is_none());
    }

    #[test]
    fn lonely_rows_are_left_out_and_all_lonely_is_none() {
        let v = unit(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]);
        assert!(batch_softmax_loss(&v, &[0, 1, 2], 20.0, None).unwrap().is_none());
        // Label 2 has one member: only rows 0 and 1 are anchors, but 2 still competes.
        let with = batch_softmax_loss(&unit(&[[1.0, 0.0], [1.0, 0.1], [1.0, 0.05]]), &[0, 0, 2], 20.0, None).unwrap().unwrap();
        let without = batch_softmax_loss(&unit(&[[1.0, 0.0], [1.0, 0.1]]), &[0, 0], 20.0, None).unwrap().unwrap();
        assert!(with.to_scalar::<f32>().unwrap() > without.to_scalar::<f32>().unwrap() + 0.1);
    }

    #[test]
    fn label_scope_decides_whether_one_name_is_one_label_across_intents() {
        let mut a = Example::from_text("rate this book", Some("RateBook".into()));
        a.spans.push(crate::data::LabeledSpan { label: "object_type".into(), word_start: 2, word_end: 3, start: 10, end: 14 });
        let b = Example { intent: Some("SearchCreativeWork".into()), ..a.clone() };
        let c = Example { intent: None, ..a.clone() };
        let names = |scope| [&a, &b, &c].map(|e| scoped_label(scope, e, "object_type"));
        assert_eq!(names(LabelScope::Shared), ["object_type", "object_type", "object_type"]);
        assert_eq!(names(LabelScope::Intent), ["RateBook/object_type", "SearchCreativeWork/object_type", "object_type"]);
    }

    #[test]
    fn gradient_flows_to_the_vectors() {
        let var = candle_core::Var::from_tensor(&unit(&[[1.0, 0.0], [0.5, 1.0], [0.0, 1.0], [1.0, 0.7]])).unwrap();
        let loss = batch_softmax_loss(var.as_tensor(), &[0, 0, 1, 1], 10.0, None).unwrap().unwrap();
        let g = loss.backward().unwrap();
        let grad = g.get(var.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(grad > 0.0);
    }
}
