//! The fine-tuned baseline: a JointBERT-style joint intent + slot model (Chen et al. 2019,
//! "BERT for Joint Intent Classification and Slot Filling") on our encoder.
//!
//! - Intent: dropout, then `Linear(hidden → intents)` on the `[CLS]` token's last hidden
//!   state.
//! - Slots: dropout, then `Linear(hidden → BIO tags)` on each word's *first* sub-token.
//!   The tags are `O`, then `B-x`, `I-x` for each slot label `x` (sorted). A word the
//!   tokenizer drops (no sub-token) gets no prediction: it is `O`, and it takes no part
//!   in the loss.
//! - Loss: intent cross-entropy (mean over the batch's examples that have an intent) +
//!   slot cross-entropy (mean over all words of the batch).
//!
//! The heads are variables of the encoder's own [`VarMap`] (`intent_classifier.*`,
//! `slot_classifier.*`), so [`super::train`] trains them with the encoder and saves them
//! into the same `model.safetensors`; the label lists go beside them as [`LABELS_FILE`]
//! (pass [`JointModel::labels_json`] as an `extra` file). [`JointModel::load`] reads such
//! a folder back.
//!
//! Tags are chosen per word by [`TagDecoding`]: `constrained` (the default) takes the
//! most probable sequence in which every `I-x` follows `B-x` or `I-x` (a Viterbi pass
//! over the per-word probabilities, as BIO taggers' constrained decoders do); `argmax`
//! takes each word's most probable tag alone. Reading tags as slots is conlleval's: a
//! slot is a maximal `B-x I-x*` run, and an `I-x` after `O` or after another label
//! starts a new slot (argmax decoding, unlike gold data, can emit one).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::sampler::shuffled_batches;
use super::{Objective, TrainError};
use crate::data::Example;
use crate::encoder::{Encoder, ForwardMode, TokenizedText};
use crate::labeler::{IntentPrediction, Prediction, SlotPrediction, O_LABEL};

/// The label lists of a baseline model folder, beside `model.safetensors`.
pub const LABELS_FILE: &str = "baseline_labels.json";
/// Variable-name prefixes of the two heads.
pub const INTENT_HEAD: &str = "intent_classifier";
pub const SLOT_HEAD: &str = "slot_classifier";
/// Heads are initialized from this seed (PyTorch's `nn.Linear` default: uniform in
/// ±1/√hidden), so a run is reproducible up to dropout.
const HEAD_INIT_SEED: u64 = 0x6a6f_696e_7462_6572;

/// The model's label sets: intents, and slot labels (without `B-`/`I-`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JointLabels {
    pub intents: Vec<String>,
    pub slots: Vec<String>,
}

impl JointLabels {
    /// Every intent and slot label used by `examples`, sorted.
    pub fn from_examples(examples: &[Example]) -> Self {
        let intents: BTreeSet<&str> = examples.iter().filter_map(|e| e.intent.as_deref()).collect();
        let slots: BTreeSet<&str> = examples.iter().flat_map(|e| e.spans.iter().map(|s| s.label.as_str())).collect();
        Self { intents: intents.into_iter().map(String::from).collect(), slots: slots.into_iter().map(String::from).collect() }
    }

    /// The slot head's classes: `O`, then `B-x`, `I-x` for each slot label in order.
    pub fn bio_tags(&self) -> Vec<String> {
        let mut tags = vec![O_LABEL.to_string()];
        for s in &self.slots {
            tags.push(format!("B-{s}"));
            tags.push(format!("I-{s}"));
        }
        tags
    }

    fn check(&self) -> Result<(), String> {
        for (what, list) in [("intent", &self.intents), ("slot label", &self.slots)] {
            let mut seen = BTreeSet::new();
            for l in list {
                if l.is_empty() {
                    return Err(format!("an empty {what}"));
                }
                if !seen.insert(l) {
                    return Err(format!("{what} {l:?} is listed twice"));
                }
            }
        }
        Ok(())
    }
}

/// Decodes one BIO tag per word into slots `(label, word range)`, as conlleval does: a
/// slot is a maximal `B-x I-x*` run; an `I-x` that does not continue a slot of label
/// `x` (after `O`, after another label, or first) starts a new one. Any other tag is `O`.
pub fn bio_spans<S: AsRef<str>>(tags: &[S]) -> Vec<(String, Range<usize>)> {
    let mut spans: Vec<(String, Range<usize>)> = Vec::new();
    let mut open = false;
    for (i, tag) in tags.iter().map(AsRef::as_ref).enumerate() {
        if let Some(label) = tag.strip_prefix("I-").filter(|l| !l.is_empty()) {
            match spans.last_mut() {
                Some((l, r)) if open && l == label => r.end = i + 1,
                _ => spans.push((label.to_string(), i..i + 1)),
            }
            open = true;
        } else if let Some(label) = tag.strip_prefix("B-").filter(|l| !l.is_empty()) {
            spans.push((label.to_string(), i..i + 1));
            open = true;
        } else {
            open = false;
        }
    }
    spans
}

/// How the slot head's per-word probabilities become tags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TagDecoding {
    /// The most probable tag sequence with no `I-x` that does not continue an `x` slot.
    #[default]
    Constrained,
    /// Each word's most probable tag, independently (JointBERT's decoding).
    Argmax,
}

/// The encoder with an intent head and a slot head.
pub struct JointModel<'a> {
    encoder: &'a Encoder,
    /// `None` when the label set has no intents (slot-only data such as CoNLL).
    intent_head: Option<Linear>,
    slot_head: Linear,
    labels: JointLabels,
    tags: Vec<String>,
    decoding: TagDecoding,
}

fn candle(what: impl Into<String>) -> impl FnOnce(candle_core::Error) -> TrainError {
    let what = what.into();
    move |source| TrainError::Candle { what, source }
}

/// A fresh `(out, in)` weight and `(out)` bias, uniform in ±1/√in.
fn fresh_linear(rng: &mut Rng, in_dim: usize, out_dim: usize) -> candle_core::Result<(Var, Var)> {
    let bound = 1.0 / (in_dim as f32).sqrt();
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| (2.0 * rng.unit() - 1.0) * bound).collect() };
    let w = Var::from_tensor(&Tensor::from_vec(draw(out_dim * in_dim), (out_dim, in_dim), &Device::Cpu)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(draw(out_dim), out_dim, &Device::Cpu)?)?;
    Ok((w, b))
}

impl<'a> JointModel<'a> {
    /// New heads (random init) registered in `varmap`, beside the encoder's weights.
    /// Heads of an earlier model in the same `varmap` are replaced.
    pub fn new(encoder: &'a Encoder, varmap: &VarMap, labels: JointLabels) -> Result<Self, TrainError> {
        Self::with_new_heads(encoder, varmap, labels)
    }

    /// Fresh heads for `labels` under the usual names, keeping the encoder's weights:
    /// variables already in `varmap` under those names (e.g. the heads of another label
    /// set, of any shape) are replaced, not reused. The few-shot protocol calls this once
    /// per target domain. The optimizer must be built after this call (as
    /// [`super::train`] does) to see the new variables.
    pub fn with_new_heads(encoder: &'a Encoder, varmap: &VarMap, labels: JointLabels) -> Result<Self, TrainError> {
        labels.check().map_err(TrainError::NoData)?;
        let hidden = encoder.info().hidden_size;
        let tags = labels.bio_tags();
        let mut rng = Rng::new(HEAD_INIT_SEED);
        let mut data = varmap.data().lock().expect("varmap lock poisoned");
        for head in [INTENT_HEAD, SLOT_HEAD] {
            data.remove(&format!("{head}.weight"));
            data.remove(&format!("{head}.bias"));
        }
        let mut add = |head: &str, out_dim: usize| -> Result<Linear, TrainError> {
            let (w, b) = fresh_linear(&mut rng, hidden, out_dim).map_err(candle(format!("creating {head}")))?;
            let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
            data.insert(format!("{head}.weight"), w);
            data.insert(format!("{head}.bias"), b);
            Ok(linear)
        };
        let intent_head = if labels.intents.is_empty() { None } else { Some(add(INTENT_HEAD, labels.intents.len())?) };
        let slot_head = add(SLOT_HEAD, tags.len())?;
        drop(data);
        Ok(Self { encoder, intent_head, slot_head, labels, tags, decoding: TagDecoding::default() })
    }

    /// Loads a trained baseline model folder: `model.safetensors` holds the encoder and
    /// the heads, [`LABELS_FILE`] the labels. `encoder` must be loaded from the same
    /// folder (`Encoder::load(dir)`), or from one with the same weights file.
    pub fn load(encoder: &'a Encoder, dir: &Path) -> Result<Self, TrainError> {
        let state = |path: PathBuf, message: String| TrainError::State { path, message };
        let labels_path = dir.join(LABELS_FILE);
        if !labels_path.is_file() {
            return Err(state(
                dir.to_path_buf(),
                format!("not a fine-tuned baseline model folder: it has no {LABELS_FILE} (an encoder-only model has no intent and slot classifiers; train the baseline to make one)"),
            ));
        }
        let text = std::fs::read_to_string(&labels_path).map_err(|source| TrainError::Io { path: labels_path.clone(), source })?;
        let labels: JointLabels = serde_json::from_str(&text).map_err(|e| state(labels_path.clone(), format!("not a baseline label file: {e}")))?;
        labels.check().map_err(|m| state(labels_path.clone(), m))?;

        let weights = dir.join(super::checkpoint::WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(state(dir.to_path_buf(), format!("missing {}", super::checkpoint::WEIGHTS_FILE)));
        }
        check_same_encoder(encoder, dir, &weights)?;
        // SAFETY: the weights file is mapped read-only and copied out tensor by tensor.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
            .map_err(candle(format!("reading {}", weights.display())))?;
        let hidden = encoder.info().hidden_size;
        let tags = labels.bio_tags();
        let head = |name: &str, out_dim: usize, what: &str| -> Result<Linear, TrainError> {
            for part in ["weight", "bias"] {
                if !vb.contains_tensor(&format!("{name}.{part}")) {
                    return Err(state(
                        weights.clone(),
                        format!("has no tensor {name}.{part}: not a fine-tuned baseline model (its {LABELS_FILE} has no classifier weights beside it)"),
                    ));
                }
            }
            let vb = vb.pp(name);
            let w = vb.get((out_dim, hidden), "weight");
            let b = vb.get(out_dim, "bias");
            match (w, b) {
                (Ok(w), Ok(b)) => Ok(Linear::new(w, Some(b))),
                (Err(e), _) | (_, Err(e)) => Err(state(
                    weights.clone(),
                    format!("{name} does not fit {LABELS_FILE} ({out_dim} {what}, hidden size {hidden}): {e}"),
                )),
            }
        };
        let intent_head = if labels.intents.is_empty() { None } else { Some(head(INTENT_HEAD, labels.intents.len(), "intents")?) };
        let slot_head = head(SLOT_HEAD, tags.len(), "BIO tags")?;
        Ok(Self { encoder, intent_head, slot_head, labels, tags, decoding: TagDecoding::default() })
    }

    pub fn encoder(&self) -> &'a Encoder {
        self.encoder
    }

    /// Chooses how [`Self::predict`] turns tag probabilities into tags.
    pub fn set_tag_decoding(&mut self, decoding: TagDecoding) {
        self.decoding = decoding;
    }

    pub fn tag_decoding(&self) -> TagDecoding {
        self.decoding
    }

    pub fn labels(&self) -> &JointLabels {
        &self.labels
    }

    /// The content of [`LABELS_FILE`].
    pub fn labels_json(&self) -> String {
        serde_json::to_string_pretty(&self.labels).expect("labels serialize")
    }

    /// The slot head's classes, in order ([`JointLabels::bio_tags`]).
    pub fn bio_tags(&self) -> &[String] {
        &self.tags
    }

    /// Logits of `head` on rows `rows` of the flattened hidden states, after dropout.
    fn head_logits(head: &Linear, flat: &Tensor, rows: &[u32], dropout: f32) -> candle_core::Result<Tensor> {
        let x = flat.index_select(&Tensor::new(rows, flat.device())?, 0)?;
        let x = if dropout > 0.0 { candle_nn::ops::dropout(&x, dropout)? } else { x };
        head.forward(&x)
    }

    /// Predicts intent and slots in inference mode (no dropout, fused kernels), batched
    /// by length like [`Encoder::encode`]. Scores are softmax probabilities: the intent's,
    /// and for a slot the mean over its words of the chosen tag's probability. No
    /// neighbours: this model retrieves nothing.
    pub fn predict(&self, examples: &[Example], batch_size: usize) -> Result<Vec<Prediction>, TrainError> {
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let tokens = self.encoder.tokenize_all(&texts)?;
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| tokens[i].len());
        let mut out: Vec<Option<Prediction>> = vec![None; examples.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<&TokenizedText> = chunk.iter().map(|&i| &tokens[i]).collect();
            let hidden = self.encoder.hidden_states(&batch)?;
            let (b, t, h) = hidden.dims3()?;
            let flat = hidden.reshape((b * t, h))?;
            let probs = |head: &Linear, rows: &[u32]| -> candle_core::Result<Vec<Vec<f32>>> {
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                candle_nn::ops::softmax_last_dim(&Self::head_logits(head, &flat, rows, 0.0)?)?.to_vec2::<f32>()
            };
            let intent_probs = match &self.intent_head {
                Some(head) => probs(head, &(0..b).map(|row| (row * t) as u32).collect::<Vec<_>>())?,
                None => Vec::new(),
            };
            let aligned: Vec<Vec<Range<usize>>> = chunk.iter().map(|&i| tokens[i].align_words(&examples[i].words)).collect();
            let word_rows: Vec<u32> = aligned
                .iter()
                .enumerate()
                .flat_map(|(row, words)| words.iter().filter(|r| !r.is_empty()).map(move |r| (row * t + r.start) as u32))
                .collect();
            let tag_probs = probs(&self.slot_head, &word_rows)?;
            let mut next_word = tag_probs.iter();
            for (row, &i) in chunk.iter().enumerate() {
                let ex = &examples[i];
                let intent = intent_probs.get(row).map(|p| {
                    let (k, score) = argmax(p);
                    IntentPrediction { label: self.labels.intents[k].clone(), score, neighbours: Vec::new() }
                });
                // One probability row per word; a word without sub-tokens is `O` for sure.
                let word_probs: Vec<Option<&[f32]>> = aligned[row]
                    .iter()
                    .map(|r| (!r.is_empty()).then(|| next_word.next().expect("one probability row per aligned word").as_slice()))
                    .collect();
                let chosen = match self.decoding {
                    TagDecoding::Argmax => word_probs.iter().map(|p| p.map_or(0, |p| argmax(p).0)).collect(),
                    TagDecoding::Constrained => constrained_tags(&word_probs, &self.tags),
                };
                let word_tags: Vec<&str> = chosen.iter().map(|&k| self.tags[k].as_str()).collect();
                let word_scores: Vec<f32> = chosen.iter().zip(&word_probs).map(|(&k, p)| p.map_or(1.0, |p| p[k])).collect();
                let slots = bio_spans(&word_tags)
                    .into_iter()
                    .map(|(label, w)| {
                        let (start, end) = (ex.words[w.start].start, ex.words[w.end - 1].end);
                        let score = word_scores[w.clone()].iter().sum::<f32>() / w.len() as f32;
                        SlotPrediction {
                            start,
                            end,
                            text: crate::data::char_slice(&ex.text, start, end).to_string(),
                            label,
                            score,
                            neighbours: Vec::new(),
                            words: (w.start, w.end),
                        }
                    })
                    .collect();
                out[i] = Some(Prediction { text: ex.text.clone(), intent, slots });
            }
        }
        Ok(out.into_iter().map(|p| p.expect("every example is in one batch")).collect())
    }
}

/// The most probable tag sequence (sum of log-probabilities) in which every `I-x` follows
/// `B-x` or `I-x`. `words[i]` is word i's probability row over `tags` (`O` at index 0),
/// `None` for a word that must be `O`. Linear in words × tags: an `I-x` has two possible
/// predecessors, any other tag takes the best of all.
fn constrained_tags(words: &[Option<&[f32]>], tags: &[String]) -> Vec<usize> {
    let n_tags = tags.len();
    // For I-x at index k: the indices of B-x and I-x.
    let inside_of: Vec<Option<[usize; 2]>> = tags
        .iter()
        .enumerate()
        .map(|(k, tag)| {
            let label = tag.strip_prefix("I-")?;
            let begin = tags.iter().position(|t| t.strip_prefix("B-") == Some(label))?;
            Some([begin, k])
        })
        .collect();
    let log = |p: f32| p.max(1e-30).ln();
    let mut score = vec![f64::NEG_INFINITY; n_tags];
    let mut back: Vec<Vec<usize>> = Vec::with_capacity(words.len());
    for (i, probs) in words.iter().enumerate() {
        let mut next = vec![f64::NEG_INFINITY; n_tags];
        let mut from = vec![0usize; n_tags];
        // The best previous tag of any kind (ties: the lowest index, so `O` first).
        let best_prev = (0..n_tags).fold(0, |b, k| if score[k] > score[b] { k } else { b });
        for k in 0..n_tags {
            let emit = match probs {
                Some(p) => log(p[k]) as f64,
                None if k == 0 => 0.0,
                None => continue,
            };
            let (prev, prev_score) = match (i, inside_of[k]) {
                (0, Some(_)) => continue,
                (0, None) => (0, 0.0),
                (_, Some(pair)) => {
                    let p = if score[pair[1]] > score[pair[0]] { pair[1] } else { pair[0] };
                    (p, score[p])
                }
                (_, None) => (best_prev, score[best_prev]),
            };
            if prev_score.is_finite() {
                next[k] = prev_score + emit;
                from[k] = prev;
            }
        }
        score = next;
        back.push(from);
    }
    let mut out = vec![0usize; words.len()];
    if let Some(last) = words.len().checked_sub(1) {
        let mut k = (0..n_tags).fold(0, |b, k| if score[k] > score[b] { k } else { b });
        for i in (0..=last).rev() {
            out[i] = k;
            k = back[i][k];
        }
    }
    out
}

/// Index and value of the largest entry (the first on ties).
fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter().copied().enumerate().fold((0, f32::NEG_INFINITY), |best, (k, x)| if x > best.1 { (k, x) } else { best })
}

/// Refuses an encoder loaded from other weights than the model folder's.
fn check_same_encoder(encoder: &Encoder, dir: &Path, weights: &Path) -> Result<(), TrainError> {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    if canon(&encoder.info().dir) == canon(dir) {
        return Ok(());
    }
    use sha2::Digest;
    let io = |source| TrainError::Io { path: weights.to_path_buf(), source };
    let mut file = std::fs::File::open(weights).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    let sha: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if sha != encoder.info().weights_sha256 {
        return Err(TrainError::State {
            path: dir.to_path_buf(),
            message: format!(
                "the encoder was loaded from {}, not from this baseline model; load it with the same folder",
                encoder.info().dir.display()
            ),
        });
    }
    Ok(())
}

/// The baseline's training objective for [`super::train`]: shuffled batches, joint loss.
pub struct JointObjective<'a> {
    model: &'a JointModel<'a>,
    examples: Vec<Example>,
    tokens: Vec<TokenizedText>,
    word_tokens: Vec<Vec<Range<usize>>>,
    /// Intent class of each example; `None` for an example without an intent.
    intents: Vec<Option<u32>>,
    /// BIO class of each word of each example.
    tags: Vec<Vec<u32>>,
    batch_size: usize,
    dropout: f32,
}

impl<'a> JointObjective<'a> {
    /// Tokenizes `examples` once. An example whose intent or slot label is not in the
    /// model's labels is an error naming it. An example without an intent takes part in
    /// the slot loss only.
    pub fn new(model: &'a JointModel<'a>, examples: Vec<Example>, batch_size: usize, dropout: f32) -> Result<Self, TrainError> {
        if examples.is_empty() {
            return Err(TrainError::NoData("no training examples".into()));
        }
        let intent_ids: HashMap<&str, u32> = model.labels.intents.iter().enumerate().map(|(k, l)| (l.as_str(), k as u32)).collect();
        let tag_ids: HashMap<&str, u32> = model.tags.iter().enumerate().map(|(k, l)| (l.as_str(), k as u32)).collect();
        let mut intents = Vec::with_capacity(examples.len());
        let mut tags = Vec::with_capacity(examples.len());
        for (i, e) in examples.iter().enumerate() {
            let unknown = |what: &str, label: &str, known: &[String]| {
                TrainError::NoData(format!(
                    "training example {i} ({:?}): {what} {label:?} is not among the model's {} ({})",
                    e.text,
                    if what == "intent" { "intents" } else { "slot labels" },
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ))
            };
            intents.push(match &e.intent {
                None => None,
                Some(l) => Some(*intent_ids.get(l.as_str()).ok_or_else(|| unknown("intent", l, &model.labels.intents))?),
            });
            if let Some(s) = e.spans.iter().find(|s| !model.labels.slots.contains(&s.label)) {
                return Err(unknown("slot label", &s.label, &model.labels.slots));
            }
            tags.push(e.to_bio().iter().map(|t| tag_ids[t.as_str()]).collect());
        }
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let tokens = model.encoder.tokenize_all(&texts)?;
        let word_tokens = tokens.iter().zip(&examples).map(|(t, e)| t.align_words(&e.words)).collect();
        Ok(Self { model, examples, tokens, word_tokens, intents, tags, batch_size: batch_size.max(1), dropout })
    }

    /// The objective's settings, for [`super::train`]'s `objective_json` (a resume must
    /// use the same).
    pub fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({
            "objective": "baseline",
            "batch_size": self.batch_size,
            "dropout": self.dropout,
            "labels": self.model.labels,
        })
    }

    /// A fingerprint of the training data (texts, intents, tags), for [`super::train`]'s `data`.
    pub fn data_fingerprint(&self) -> String {
        let items: Vec<String> = self
            .examples
            .iter()
            .map(|e| format!("{}\t{}\t{}", e.text, e.intent.as_deref().unwrap_or(""), e.to_bio().join(" ")))
            .collect();
        super::data_fingerprint(items.iter().map(String::as_str))
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }
}

impl Objective for JointObjective<'_> {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn plan_epoch(&self, rng: &mut Rng) -> Vec<Vec<usize>> {
        shuffled_batches(self.examples.len(), self.batch_size, rng)
    }

    fn loss(&self, batch: &[usize], _rng: &mut Rng) -> Result<(Tensor, usize), TrainError> {
        let toks: Vec<&TokenizedText> = batch.iter().map(|&i| &self.tokens[i]).collect();
        let hidden = self.model.encoder.forward(&toks, ForwardMode::Train { dropout: self.dropout })?;
        let (b, t, h) = hidden.dims3()?;
        let flat = hidden.reshape((b * t, h))?;
        let device = flat.device().clone();
        let (mut cls_rows, mut intent_targets) = (Vec::new(), Vec::new());
        let (mut word_rows, mut tag_targets) = (Vec::new(), Vec::new());
        for (row, &i) in batch.iter().enumerate() {
            if let Some(target) = self.intents[i] {
                cls_rows.push((row * t) as u32);
                intent_targets.push(target);
            }
            for (r, &tag) in self.word_tokens[i].iter().zip(&self.tags[i]) {
                if !r.is_empty() {
                    word_rows.push((row * t + r.start) as u32);
                    tag_targets.push(tag);
                }
            }
        }
        let mut total: Option<Tensor> = None;
        let mut add = |head: &Linear, rows: &[u32], targets: &[u32]| -> candle_core::Result<()> {
            if rows.is_empty() {
                return Ok(());
            }
            let logits = JointModel::head_logits(head, &flat, rows, self.dropout)?;
            let l = candle_nn::loss::cross_entropy(&logits, &Tensor::new(targets, &device)?)?;
            total = Some(match total.take() {
                Some(s) => (s + l)?,
                None => l,
            });
            Ok(())
        };
        if let Some(head) = &self.model.intent_head {
            add(head, &cls_rows, &intent_targets)?;
        }
        add(&self.model.slot_head, &word_rows, &tag_targets)?;
        let tokens = toks.iter().map(|x| x.len()).sum();
        match total {
            Some(loss) => Ok((loss, tokens)),
            // Nothing labeled in this batch: a zero loss that still touches the graph.
            None => Ok((hidden.sum_all()?.affine(0.0, 0.0)?, tokens)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(tags: &[&str]) -> Vec<(String, Range<usize>)> {
        bio_spans(tags)
    }

    fn s(label: &str, r: Range<usize>) -> (String, Range<usize>) {
        (label.to_string(), r)
    }

    #[test]
    fn bio_runs_become_spans() {
        assert_eq!(spans(&["O", "B-a", "I-a", "I-a", "O", "B-b"]), [s("a", 1..4), s("b", 5..6)]);
        assert_eq!(spans(&["B-a", "I-a"]), [s("a", 0..2)]);
        assert!(spans(&["O", "O"]).is_empty());
        assert!(spans(&[]).is_empty());
    }

    #[test]
    fn adjacent_begins_are_separate_spans() {
        assert_eq!(spans(&["B-a", "B-a", "I-a", "B-b"]), [s("a", 0..1), s("a", 1..3), s("b", 3..4)]);
    }

    #[test]
    fn inside_without_begin_starts_a_span_as_conlleval_does() {
        // I- after O, first, and after another label.
        assert_eq!(spans(&["I-a", "I-a", "O", "I-b"]), [s("a", 0..2), s("b", 3..4)]);
        assert_eq!(spans(&["B-a", "I-b", "I-b", "I-a"]), [s("a", 0..1), s("b", 1..3), s("a", 3..4)]);
        // O breaks a run even when the next I- has the same label.
        assert_eq!(spans(&["B-a", "O", "I-a"]), [s("a", 0..1), s("a", 2..3)]);
    }

    #[test]
    fn malformed_tags_are_outside() {
        assert_eq!(spans(&["B-", "X-a", "B-a", "I-"]), [s("a", 2..3)]);
    }

    #[test]
    fn labels_from_examples_are_sorted_and_tags_follow_them() {
        let a = Example::from_words(&["play", "daft", "punk"], &["O", "B-artist", "I-artist"], Some("play".into())).unwrap();
        let b = Example::from_words(&["at", "noon"], &["O", "B-time"], Some("alarm".into())).unwrap();
        let c = Example::from_words(&["hello"], &["O"], None).unwrap();
        let labels = JointLabels::from_examples(&[a, b, c]);
        assert_eq!(labels.intents, ["alarm", "play"]);
        assert_eq!(labels.slots, ["artist", "time"]);
        assert_eq!(labels.bio_tags(), ["O", "B-artist", "I-artist", "B-time", "I-time"]);
        let back: JointLabels = serde_json::from_str(&serde_json::to_string(&labels).unwrap()).unwrap();
        assert_eq!(back, labels);
    }

    fn tags(labels: &[&str]) -> Vec<String> {
        JointLabels { intents: Vec::new(), slots: labels.iter().map(|s| s.to_string()).collect() }.bio_tags()
    }

    #[test]
    fn constrained_decoding_never_starts_a_slot_with_inside() {
        // Tags: O, B-a, I-a, B-b, I-b. Word 1 prefers I-b after B-a: argmax gives B-a I-b,
        // the constrained decoder the best legal pair.
        let t = tags(&["a", "b"]);
        let w0 = [0.1, 0.8, 0.0, 0.1, 0.0];
        let w1 = [0.05, 0.0, 0.4, 0.0, 0.55];
        let words = [Some(&w0[..]), Some(&w1[..])];
        assert_eq!(constrained_tags(&words, &t), [1, 2]); // 0.8 * 0.4 beats 0.1 * 0.55 and 0.8 * 0.05
        // First word cannot be I-.
        let w = [0.2, 0.0, 0.8, 0.0, 0.0];
        assert_eq!(constrained_tags(&[Some(&w[..])], &t), [0]);
        // A word without sub-tokens is O, and breaks a run.
        let b = [0.0, 0.9, 0.1, 0.0, 0.0];
        let i = [0.3, 0.0, 0.7, 0.0, 0.0];
        assert_eq!(constrained_tags(&[Some(&b[..]), None, Some(&i[..])], &t), [1, 0, 0]);
        assert_eq!(constrained_tags(&[Some(&b[..]), Some(&i[..])], &t), [1, 2]);
        assert!(constrained_tags(&[], &t).is_empty());
    }

    #[test]
    fn constrained_decoding_is_the_best_legal_sequence() {
        // Brute force over all legal sequences of 4 words and 7 tags.
        let t = tags(&["a", "b", "c"]);
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            let rows: Vec<Vec<f32>> = (0..4)
                .map(|_| {
                    let raw: Vec<f32> = (0..t.len()).map(|_| rng.unit() + 1e-3).collect();
                    let sum: f32 = raw.iter().sum();
                    raw.iter().map(|x| x / sum).collect()
                })
                .collect();
            let words: Vec<Option<&[f32]>> = rows.iter().map(|r| Some(r.as_slice())).collect();
            let legal = |seq: &[usize]| {
                seq.iter().enumerate().all(|(i, &k)| match t[k].strip_prefix("I-") {
                    Some(l) => i > 0 && t[seq[i - 1]].get(2..) == Some(l),
                    None => true,
                })
            };
            let score = |seq: &[usize]| seq.iter().zip(&rows).map(|(&k, r)| (r[k] as f64).ln()).sum::<f64>();
            let mut best = (f64::NEG_INFINITY, Vec::new());
            for code in 0..t.len().pow(4) {
                let seq: Vec<usize> = (0..4).map(|i| code / t.len().pow(i) % t.len()).collect();
                if legal(&seq) && score(&seq) > best.0 {
                    best = (score(&seq), seq);
                }
            }
            let got = constrained_tags(&words, &t);
            assert!(legal(&got), "{got:?}");
            assert!((score(&got) - best.0).abs() < 1e-9, "{got:?} vs {:?}", best.1);
        }
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[0.2, 0.5, 0.5]), (1, 0.5));
    }
}
