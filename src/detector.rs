//! Span detector: how likely a candidate span is a slot of *any* label.
//!
//! Retrieval decides a span's label from its neighbours, but in a few-shot index the
//! non-slot spans of the support set far outnumber the slot examples, and an unseen slot
//! value is often nearer some non-slot piece than any slot (BENCHMARKS.md, "Where the
//! errors are"). Whether a span *is* a slot (its boundaries, its place in the sentence)
//! transfers across domains better than what label it has, so a small network on the
//! vectors around the span's edges, fitted with the encoder frozen, gives the decoder a
//! second, label-free opinion. It is small by default (8 hidden units): reading the last
//! layer, wider ones fit the source domains better and carried to a new domain worse
//! (BENCHMARKS.md, "A span detector beside retrieval"); reading the middle layer, 32
//! units did better on the few-shot dev domains ("Which layer the detector reads"), and
//! better still when they also read the mean of the span's own tokens (`inside`).
//!
//! The first layer is linear in each token vector, so an utterance's tokens are projected
//! once and a span only adds a few rows: the cost is per token, not per span.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::encoder::ops::dot;
use crate::encoder::EncodedText;
use crate::spans::{candidate_spans, token_range, WordSpan};
use crate::train::rng::Rng;

const FORMAT: &str = "nearspan-span-detector/1";

#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error("{path}: cannot read the span detector: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not a span detector: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{path}: cannot write the span detector: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("no training example has a candidate span that is a slot (within width {max_width})")]
    NoPositives { max_width: usize },
    #[error("cannot average span detectors: {reason}")]
    Average { reason: String },
    #[error("the span detector reads the states after layer {layer}, but the encoder did not keep them (Encoder::set_tap_layer)")]
    MissingLayer { layer: usize },
    #[error("a span detector reads 1 to {max} tokens on each side of a span, not {context}", max = MAX_CONTEXT)]
    Context { context: usize },
}

/// A small network on four token vectors of a span: the token before it, its first and
/// last sub-tokens, and the token after it ([CLS] and [SEP] at the edges), and optionally
/// the mean of its own tokens ([`SpanDetector::inside`]), each divided by a fixed scale
/// `s` (the mean token-vector norm of the training data):
///
/// `logit = w_out · relu(Σ_b W_b h_b / s + w_width[width] + b_hidden) + b_out`.
///
/// The first layer is linear in each token vector, so an utterance's tokens are
/// projected once and a span only adds four rows (plus one per token inside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanDetector {
    format: String,
    pub dim: usize,
    /// Which token vectors it reads: the states after this many encoder layers, or the
    /// last hidden state when absent (files written before the choice existed). Boundaries
    /// are better read from a middle layer than from the last one, which span training
    /// shapes for labels (BENCHMARKS.md, "Which layer the detector reads").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    pub hidden: usize,
    /// Whether it also reads the mean of the span's own token vectors (a fifth role
    /// after the four edges): what the span says, beside where its edges are. Absent in
    /// files written before the choice existed (edges only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inside: bool,
    /// How many tokens it reads on each side of the span (1 to [`MAX_CONTEXT`]): the
    /// nearest is an edge role, farther ones are roles of their own. 1 in files written
    /// before the choice existed.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub context: usize,
    pub max_width: usize,
    pub scale: f32,
    /// `roles × hidden` rows of `dim` (role-major): W_before, W_first, W_last, W_after,
    /// then W_before2, W_after2, … up to [`SpanDetector::context`], then W_inside when
    /// [`SpanDetector::inside`].
    pub w_tokens: Vec<f32>,
    /// `max_width × hidden`: one row per span width (wider spans use the last).
    pub w_width: Vec<f32>,
    pub b_hidden: Vec<f32>,
    pub w_out: Vec<f32>,
    pub b_out: f32,
}

/// Edge roles of a span: the token before it, its first and last, the token after it.
const EDGE_ROLES: usize = 4;

/// The most tokens a detector reads on each side of a span.
pub const MAX_CONTEXT: usize = 4;

/// Token roles of a span at the widest context: its first and last token and
/// `MAX_CONTEXT` on each side.
const MAX_TOKEN_ROLES: usize = 2 + 2 * MAX_CONTEXT;

/// Roles a detector reads: the span's first and last token, `context` tokens on each
/// side, and the inside mean when asked (always the last role).
fn roles(context: usize, inside: bool) -> usize {
    2 + 2 * context + inside as usize
}

fn one() -> usize {
    1
}

fn is_one(x: &usize) -> bool {
    *x == 1
}

/// Fitting settings (Adam on the logistic loss).
#[derive(Debug, Clone, Copy)]
pub struct FitConfig {
    pub max_width: usize,
    pub hidden: usize,
    pub epochs: usize,
    pub lr: f32,
    /// Utterances per step.
    pub batch: usize,
    pub seed: u64,
    /// The encoder layer a fresh detector reads ([`SpanDetector::layer`]); one being
    /// adapted keeps its own.
    pub layer: Option<usize>,
    /// Whether a fresh detector reads the mean of the span's tokens
    /// ([`SpanDetector::inside`]); one being adapted keeps its own.
    pub inside: bool,
    /// Tokens a fresh detector reads on each side ([`SpanDetector::context`]); one being
    /// adapted keeps its own.
    pub context: usize,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self { max_width: crate::spans::DEFAULT_MAX_WIDTH, hidden: 8, epochs: 4, lr: 1e-3, batch: 32, seed: 7, layer: None, inside: false, context: 1 }
    }
}

/// What fitting saw and reached, for the training log.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub utterances: usize,
    pub spans: usize,
    pub positives: usize,
    /// Mean logistic loss over the training spans, during each epoch.
    pub loss: Vec<f64>,
}

/// One candidate span in token terms: the token row of each of its token roles (the
/// first `n`), in role order, and its width in words (its own tokens are
/// `rows[1]..=rows[2]`).
#[derive(Debug, Clone, Copy)]
struct SpanTokens {
    rows: [usize; MAX_TOKEN_ROLES],
    n: usize,
    width: usize,
}

impl SpanTokens {
    fn roles(&self) -> &[usize] {
        &self.rows[..self.n]
    }

    fn inside(&self) -> std::ops::RangeInclusive<usize> {
        self.rows[1]..=self.rows[2]
    }
}

/// The token rows of `span`'s roles with `context` tokens on each side; past the
/// utterance's ends they repeat [CLS] and [SEP].
fn span_tokens(word_tokens: &[std::ops::Range<usize>], n_tokens: usize, span: WordSpan, context: usize) -> Option<SpanTokens> {
    let tokens = token_range(word_tokens, span);
    if tokens.is_empty() {
        return None;
    }
    let before = |d: usize| tokens.start.saturating_sub(d);
    let after = |d: usize| (tokens.end - 1 + d).min(n_tokens - 1);
    let mut rows = [0; MAX_TOKEN_ROLES];
    rows[..EDGE_ROLES].copy_from_slice(&[before(1), tokens.start, tokens.end - 1, after(1)]);
    for d in 2..=context {
        rows[2 * d] = before(d);
        rows[2 * d + 1] = after(d);
    }
    Some(SpanTokens { rows, n: 2 + 2 * context, width: span.width() })
}

/// The token vectors a detector reading `layer` takes from `enc`, if `enc` has them.
fn states_of(enc: &EncodedText, layer: Option<usize>) -> Option<&[f32]> {
    match layer {
        None => Some(&enc.hidden),
        Some(l) => enc.tapped.as_ref().filter(|t| t.layer == l).map(|t| t.hidden.as_slice()),
    }
}

impl SpanDetector {
    /// # Panics
    /// When `enc` lacks the layer this detector reads: the encoder was not set up with
    /// [`crate::encoder::Encoder::set_tap_layer`] for it (a bug in the caller; the CLI
    /// sets it wherever it loads a detector).
    fn states<'a>(&self, enc: &'a EncodedText) -> &'a [f32] {
        states_of(enc, self.layer).unwrap_or_else(|| panic!("{}", DetectorError::MissingLayer { layer: self.layer.unwrap_or(0) }))
    }

    fn n_tokens(&self, enc: &EncodedText) -> usize {
        self.states(enc).len() / self.dim.max(1)
    }

    fn roles(&self) -> usize {
        roles(self.context, self.inside)
    }

    /// What the first layer of one span reads: for each projected row it adds, the row's
    /// offset in the utterance's projections (`tokens × roles × hidden`) and its weight,
    /// 1 for a token role and a share of the mean for each token of the inside role (the
    /// last role). The forward and backward passes both walk this.
    fn span_reads<'a>(&self, st: &'a SpanTokens) -> impl Iterator<Item = (usize, f32)> + 'a {
        let (hd, rows) = (self.hidden, self.roles() * self.hidden);
        let edges = st.roles().iter().enumerate().map(move |(role, &t)| (t * rows + role * hd, 1.0));
        let inside = self.inside.then(|| st.inside()).into_iter().flatten();
        let share = 1.0 / st.inside().count() as f32;
        let at = roles(self.context, false) * hd;
        edges.chain(inside.map(move |t| (t * rows + at, share)))
    }

    /// Projects every token of `enc` by every role: `(tokens × roles × hidden)`.
    fn project(&self, enc: &EncodedText) -> Vec<f32> {
        let inv = 1.0 / self.scale;
        let rows = self.roles() * self.hidden;
        let states = self.states(enc);
        let mut out = vec![0f32; self.n_tokens(enc) * rows];
        for (t, o) in out.chunks_exact_mut(rows).enumerate() {
            let h = &states[t * self.dim..(t + 1) * self.dim];
            for (r, x) in o.iter_mut().enumerate() {
                *x = dot(&self.w_tokens[r * self.dim..(r + 1) * self.dim], h) * inv;
            }
        }
        out
    }

    /// The hidden layer's input for one span (before the ReLU).
    fn pre_activation(&self, proj: &[f32], st: &SpanTokens, out: &mut [f32]) {
        let hd = self.hidden;
        let w = st.width.min(self.max_width) - 1;
        out.copy_from_slice(&self.b_hidden);
        axpy(1.0, &self.w_width[w * hd..(w + 1) * hd], out);
        for (at, weight) in self.span_reads(st) {
            axpy(weight, &proj[at..at + hd], out);
        }
    }

    fn output(&self, pre: &[f32]) -> f32 {
        pre.iter().zip(&self.w_out).map(|(p, w)| p.max(0.0) * w).sum::<f32>() + self.b_out
    }

    /// The logit of each span of one encoded utterance (−∞ for a span without tokens).
    pub fn logits(&self, enc: &EncodedText, words: &[crate::data::Word], spans: &[WordSpan]) -> Vec<f32> {
        let word_tokens = enc.tokens.align_words(words);
        let n_tokens = self.n_tokens(enc);
        let proj = self.project(enc);
        let mut pre = vec![0f32; self.hidden];
        spans
            .iter()
            .map(|s| match span_tokens(&word_tokens, n_tokens, *s, self.context) {
                None => f32::NEG_INFINITY,
                Some(st) => {
                    self.pre_activation(&proj, &st, &mut pre);
                    self.output(&pre)
                }
            })
            .collect()
    }

    /// The spans it would call slots on their own: candidates with a logit above
    /// `min_logit`, taken best first, skipping overlaps; sorted by start.
    pub fn detect(&self, enc: &EncodedText, words: &[crate::data::Word], max_width: usize, min_logit: f32) -> Vec<WordSpan> {
        let spans = candidate_spans(words.len(), max_width);
        let logits = self.logits(enc, words, &spans);
        let mut order: Vec<usize> = (0..spans.len()).filter(|&i| logits[i] > min_logit).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut chosen: Vec<WordSpan> = Vec::new();
        for i in order {
            if chosen.iter().all(|c| !c.overlaps(&spans[i])) {
                chosen.push(spans[i]);
            }
        }
        chosen.sort();
        chosen
    }

    /// One detector whose logit is the mean of the members' logits: their hidden units
    /// side by side (each member's token weights rescaled to the first one's scale), the
    /// output weights divided by their number. Members fitted with different seeds
    /// disagree where the data does not decide; their mean is steadier, and it stays one
    /// small network (adapting it fits all its units together).
    pub fn average(members: &[SpanDetector]) -> Result<SpanDetector, DetectorError> {
        let first = members.first().ok_or_else(|| DetectorError::Average { reason: "no detectors given".into() })?;
        let differs =
            |m: &&SpanDetector| (m.dim, m.max_width, m.layer, m.inside, m.context) != (first.dim, first.max_width, first.layer, first.inside, first.context);
        if let Some(m) = members.iter().find(differs) {
            let shape = |d: &SpanDetector| format!("{}-dim, width {}, layer {:?}, inside {}, context {}", d.dim, d.max_width, d.layer, d.inside, d.context);
            let reason = format!("they differ in vector size, maximum width, layer, inside reading or context ({} against {})", shape(first), shape(m));
            return Err(DetectorError::Average { reason });
        }
        let n = members.len() as f32;
        let hidden: usize = members.iter().map(|m| m.hidden).sum();
        let (dim, max_width) = (first.dim, first.max_width);
        let mut w_tokens = Vec::with_capacity(first.roles() * hidden * dim);
        for role in 0..first.roles() {
            for m in members {
                // W h / s_m = (W s / s_m) h / s: the same pre-activation at the first's scale.
                let rescale = first.scale / m.scale;
                w_tokens.extend(m.w_tokens[role * m.hidden * dim..(role + 1) * m.hidden * dim].iter().map(|w| w * rescale));
            }
        }
        let mut w_width = Vec::with_capacity(max_width * hidden);
        for w in 0..max_width {
            for m in members {
                w_width.extend_from_slice(&m.w_width[w * m.hidden..(w + 1) * m.hidden]);
            }
        }
        Ok(SpanDetector {
            format: FORMAT.into(),
            dim,
            layer: first.layer,
            hidden,
            inside: first.inside,
            context: first.context,
            max_width,
            scale: first.scale,
            w_tokens,
            w_width,
            b_hidden: members.iter().flat_map(|m| m.b_hidden.iter().copied()).collect(),
            w_out: members.iter().flat_map(|m| m.w_out.iter().map(|w| w / n)).collect(),
            b_out: members.iter().map(|m| m.b_out).sum::<f32>() / n,
        })
    }

    /// Fits on `examples` (gold slots are the positives, every other candidate span of
    /// at most `max_width` words a negative) with the encoder's vectors `encoded`.
    pub fn fit(examples: &[Example], encoded: &[EncodedText], cfg: &FitConfig) -> Result<(SpanDetector, FitReport), DetectorError> {
        Self::fit_from(None, examples, encoded, cfg)
    }

    /// [`SpanDetector::fit`], starting from `init` when given (its shape and scale kept).
    pub fn fit_from(
        init: Option<&SpanDetector>,
        examples: &[Example],
        encoded: &[EncodedText],
        cfg: &FitConfig,
    ) -> Result<(SpanDetector, FitReport), DetectorError> {
        use rayon::prelude::*;
        let dim = encoded.first().map_or(0, |e| e.dim);
        let layer = init.map_or(cfg.layer, |d| d.layer);
        let context = init.map_or(cfg.context, |d| d.context);
        if !(1..=MAX_CONTEXT).contains(&context) {
            return Err(DetectorError::Context { context });
        }
        // Per utterance: its spans in token terms and which are slots.
        let mut data: Vec<Vec<(SpanTokens, bool)>> = Vec::with_capacity(examples.len());
        let (mut norm_sum, mut norm_n) = (0f64, 0usize);
        for (ex, enc) in examples.iter().zip(encoded) {
            let states = states_of(enc, layer).ok_or(DetectorError::MissingLayer { layer: layer.unwrap_or(0) })?;
            let word_tokens = enc.tokens.align_words(&ex.words);
            let n_tokens = states.len() / dim.max(1);
            let gold: Vec<WordSpan> = ex.spans.iter().map(|s| s.words()).collect();
            let spans = candidate_spans(ex.words.len(), cfg.max_width);
            data.push(spans.iter().filter_map(|&s| Some((span_tokens(&word_tokens, n_tokens, s, context)?, gold.contains(&s)))).collect());
            for h in states.chunks_exact(dim.max(1)) {
                norm_sum += dot(h, h).sqrt() as f64;
                norm_n += 1;
            }
        }
        let n_spans: usize = data.iter().map(Vec::len).sum();
        let positives = data.iter().flatten().filter(|(_, slot)| *slot).count();
        if positives == 0 {
            return Err(DetectorError::NoPositives { max_width: cfg.max_width });
        }
        let mut rng = Rng::new(cfg.seed);
        let mut det = match init {
            Some(d) => d.clone(),
            None => {
                let scale = if norm_n > 0 && norm_sum > 0.0 { (norm_sum / norm_n as f64) as f32 } else { 1.0 };
                Self::fresh(dim, scale, positives as f32 / n_spans as f32, cfg, &mut rng)
            }
        };
        let mut adam = Adam::new(det.n_params(), cfg.lr);
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut losses = Vec::with_capacity(cfg.epochs);
        for _ in 0..cfg.epochs {
            rng.shuffle(&mut order);
            let mut loss_sum = 0f64;
            for batch in order.chunks(cfg.batch.max(1)) {
                let det_ref = &det;
                let (grad, loss, count) = batch
                    .par_iter()
                    .fold(
                        || (vec![0f32; det_ref.n_params()], 0f64, 0usize),
                        |(mut g, loss, count), &u| {
                            let l = det_ref.accumulate_gradient(&encoded[u], &data[u], &mut g);
                            (g, loss + l, count + data[u].len())
                        },
                    )
                    .reduce(
                        || (vec![0f32; det_ref.n_params()], 0f64, 0usize),
                        |(mut a, la, ca), (b, lb, cb)| {
                            axpy(1.0, &b, &mut a);
                            (a, la + lb, ca + cb)
                        },
                    );
                loss_sum += loss;
                if count > 0 {
                    adam.step(det.params_mut(), &grad, 1.0 / count as f32);
                }
            }
            losses.push(loss_sum / n_spans as f64);
        }
        let report = FitReport { utterances: examples.len(), spans: n_spans, positives, loss: losses };
        Ok((det, report))
    }

    /// A detector to fit from scratch: random token weights, zero width weights, and the
    /// output bias at the base rate of slots, so the first steps learn features rather
    /// than the prior.
    fn fresh(dim: usize, scale: f32, rate: f32, cfg: &FitConfig, rng: &mut Rng) -> SpanDetector {
        let (hd, n_roles) = (cfg.hidden, roles(cfg.context, cfg.inside));
        let mut normal = |std: f32| {
            // Sum of 4 uniforms: close enough to a normal for initialisation.
            let u: f32 = (0..4).map(|_| rng.unit() - 0.5).sum();
            u * std * 3f32.sqrt()
        };
        SpanDetector {
            format: FORMAT.into(),
            dim,
            layer: cfg.layer,
            hidden: hd,
            inside: cfg.inside,
            context: cfg.context,
            max_width: cfg.max_width,
            scale,
            w_tokens: (0..n_roles * hd * dim).map(|_| normal((1.0 / n_roles as f32).sqrt())).collect(),
            w_width: vec![0.0; cfg.max_width * hd],
            b_hidden: vec![0.0; hd],
            w_out: (0..hd).map(|_| normal(1.0 / (hd as f32).sqrt())).collect(),
            b_out: (rate / (1.0 - rate)).ln(),
        }
    }

    /// Every parameter, in the order of the gradient buffer.
    fn params_mut(&mut self) -> impl Iterator<Item = &mut f32> {
        self.w_tokens
            .iter_mut()
            .chain(self.w_width.iter_mut())
            .chain(self.b_hidden.iter_mut())
            .chain(self.w_out.iter_mut())
            .chain(std::iter::once(&mut self.b_out))
    }

    fn n_params(&self) -> usize {
        self.w_tokens.len() + self.w_width.len() + self.b_hidden.len() + self.w_out.len() + 1
    }

    /// Adds one utterance's summed loss gradient to `grad` (laid out as
    /// [`SpanDetector::params_mut`]); returns its summed loss.
    fn accumulate_gradient(&self, enc: &EncodedText, spans: &[(SpanTokens, bool)], grad: &mut [f32]) -> f64 {
        let (hd, rows, dim) = (self.hidden, self.roles() * self.hidden, self.dim);
        let n_tokens = self.n_tokens(enc);
        let proj = self.project(enc);
        let (g_tokens, rest) = grad.split_at_mut(self.w_tokens.len());
        let (g_width, rest) = rest.split_at_mut(self.w_width.len());
        let (g_bias, rest) = rest.split_at_mut(hd);
        let (g_out, g_b_out) = rest.split_at_mut(hd);
        let mut d_proj = vec![0f32; n_tokens * rows];
        let (mut pre, mut d_pre) = (vec![0f32; hd], vec![0f32; hd]);
        let mut loss = 0f64;
        for (st, slot) in spans {
            self.pre_activation(&proj, st, &mut pre);
            let z = self.output(&pre);
            let y = if *slot { 1.0 } else { 0.0 };
            loss += logistic_loss(z, y) as f64;
            let dz = sigmoid(z) - y;
            g_b_out[0] += dz;
            for j in 0..hd {
                let a = pre[j].max(0.0);
                g_out[j] += dz * a;
                d_pre[j] = if pre[j] > 0.0 { dz * self.w_out[j] } else { 0.0 };
            }
            let w = st.width.min(self.max_width) - 1;
            axpy(1.0, &d_pre, &mut g_width[w * hd..(w + 1) * hd]);
            axpy(1.0, &d_pre, g_bias);
            for (at, weight) in self.span_reads(st) {
                axpy(weight, &d_pre, &mut d_proj[at..at + hd]);
            }
        }
        // proj[t][r] = W[r] · h_t / s, so dW[r] += d_proj[t][r] · h_t / s.
        let inv = 1.0 / self.scale;
        let states = self.states(enc);
        for t in 0..n_tokens {
            let h = &states[t * dim..(t + 1) * dim];
            for r in 0..rows {
                let d = d_proj[t * rows + r];
                if d != 0.0 {
                    axpy(d * inv, h, &mut g_tokens[r * dim..(r + 1) * dim]);
                }
            }
        }
        loss
    }

    /// Reads a detector written by [`SpanDetector::save`], checking it fits `hidden` dims.
    pub fn load(path: &Path, dim: usize) -> Result<SpanDetector, DetectorError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| DetectorError::Read { path: shown.clone(), source })?;
        let det: SpanDetector = serde_json::from_str(&text).map_err(|source| DetectorError::Parse { path: shown.clone(), source })?;
        let invalid = |reason: String| DetectorError::Invalid { path: shown.clone(), reason };
        if det.format != FORMAT {
            return Err(invalid(format!("format {:?}, expected {FORMAT:?}", det.format)));
        }
        if det.dim != dim {
            return Err(invalid(format!("made for {}-dim token vectors, but the encoder gives {dim}", det.dim)));
        }
        if !(1..=MAX_CONTEXT).contains(&det.context) {
            return Err(invalid(format!("context {}: it reads 1 to {MAX_CONTEXT} tokens on each side", det.context)));
        }
        let (hd, mw) = (det.hidden, det.max_width);
        let sizes = [
            ("w_tokens", det.w_tokens.len(), det.roles() * hd * dim),
            ("w_width", det.w_width.len(), mw * hd),
            ("b_hidden", det.b_hidden.len(), hd),
            ("w_out", det.w_out.len(), hd),
        ];
        for (field, got, want) in sizes {
            if got != want {
                return Err(invalid(format!("field {field}: {got} numbers, expected {want}")));
            }
        }
        let scale_ok = det.scale > 0.0; // false for NaN
        if hd == 0 || mw == 0 || !scale_ok {
            return Err(invalid("hidden, max_width and scale must be positive".into()));
        }
        let params = det.w_tokens.iter().chain(&det.w_width).chain(&det.b_hidden).chain(&det.w_out);
        if !params.chain([&det.b_out, &det.scale]).all(|x| x.is_finite()) {
            return Err(invalid("a weight is not a finite number".into()));
        }
        Ok(det)
    }

    /// Writes the detector as JSON through a temporary file and a rename.
    pub fn save(&self, path: &Path) -> Result<(), DetectorError> {
        let shown = path.display().to_string();
        let json = serde_json::to_string(self).map_err(|source| DetectorError::Parse { path: shown.clone(), source })?;
        crate::train::checkpoint::write_file_atomic(path, json.as_bytes())
            .map_err(|e| DetectorError::Write { path: shown, source: std::io::Error::other(e.to_string()) })
    }
}

/// Adam over a small model's parameters, in the order of its gradient buffer (the
/// detector's and the [`crate::scorer`]'s).
pub(crate) struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    step: i32,
    lr: f32,
}

impl Adam {
    pub(crate) fn new(n: usize, lr: f32) -> Self {
        Self { m: vec![0.0; n], v: vec![0.0; n], step: 0, lr }
    }

    /// One step with gradient `grad × grad_scale`.
    pub(crate) fn step<'p>(&mut self, params: impl Iterator<Item = &'p mut f32>, grad: &[f32], grad_scale: f32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.step += 1;
        let (c1, c2) = (1.0 - b1.powi(self.step), 1.0 - b2.powi(self.step));
        for (((p, g), m), v) in params.zip(grad).zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
            let g = g * grad_scale;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
}

fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// −log σ(z) for y = 1, −log(1 − σ(z)) for y = 0, computed without overflow.
pub(crate) fn logistic_loss(z: f32, y: f32) -> f32 {
    let softplus = |x: f32| if x > 20.0 { x } else { x.exp().ln_1p() };
    if y > 0.5 { softplus(-z) } else { softplus(z) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::LabeledSpan;
    use crate::encoder::TokenizedText;

    /// An utterance of one-letter words, one token per word, with given token vectors
    /// (the [CLS] and [SEP] rows first and last) and slots (word ranges).
    fn utterance(rows: &[Vec<f32>], slots: &[(usize, usize)]) -> (Example, EncodedText) {
        let n_words = rows.len() - 2;
        let text: String = (0..n_words).map(|_| "w").collect::<Vec<_>>().join(" ");
        let mut ex = Example::from_text(&text, None);
        ex.spans = slots
            .iter()
            .map(|&(s, e)| LabeledSpan { label: "x".into(), word_start: s, word_end: e, start: 2 * s, end: 2 * e - 1 })
            .collect();
        let mut offsets = vec![(0, 0)];
        offsets.extend((0..n_words).map(|i| (2 * i, 2 * i + 1)));
        offsets.push((0, 0));
        let tokens = TokenizedText { ids: vec![0; rows.len()], tokens: vec![String::new(); rows.len()], offsets };
        let dim = rows[0].len();
        (ex, EncodedText { tokens, hidden: rows.concat(), dim, tapped: None })
    }

    /// How many of `test`'s utterances `det` does not detect exactly (logit above 0,
    /// spans up to `max_width` words).
    fn wrongly_detected(det: &SpanDetector, test: &[(Example, EncodedText)], max_width: usize) -> usize {
        test.iter()
            .filter(|(ex, enc)| det.detect(enc, &ex.words, max_width, 0.0) != ex.spans.iter().map(|s| s.words()).collect::<Vec<_>>())
            .count()
    }

    fn random_detector(dim: usize, hidden: usize, max_width: usize, seed: u64) -> SpanDetector {
        random_detector_reading(dim, hidden, max_width, seed, false, 1)
    }

    fn random_detector_reading(dim: usize, hidden: usize, max_width: usize, seed: u64, inside: bool, context: usize) -> SpanDetector {
        let mut rng = Rng::new(seed);
        let mut r = |n: usize| (0..n).map(|_| rng.unit() - 0.5).collect::<Vec<f32>>();
        SpanDetector {
            format: FORMAT.into(),
            dim,
            layer: None,
            hidden,
            inside,
            context,
            max_width,
            scale: 1.3,
            w_tokens: r(roles(context, inside) * hidden * dim),
            w_width: r(max_width * hidden),
            b_hidden: r(hidden),
            w_out: r(hidden),
            b_out: 0.2,
        }
    }

    /// The hand-written backward pass agrees with finite differences of the loss, for
    /// every parameter, with and without the inside role and with wider context.
    #[test]
    fn gradient_matches_finite_differences() {
        gradient_check(false, 1);
        gradient_check(true, 1);
        gradient_check(true, 2);
    }

    fn gradient_check(inside: bool, context: usize) {
        let mut rng = Rng::new(3);
        let rows: Vec<Vec<f32>> = (0..6).map(|_| (0..4).map(|_| rng.unit() * 2.0 - 1.0).collect()).collect();
        let (ex, enc) = utterance(&rows, &[(1, 3)]);
        let word_tokens = enc.tokens.align_words(&ex.words);
        let spans: Vec<(SpanTokens, bool)> = candidate_spans(4, 3)
            .into_iter()
            .map(|s| (span_tokens(&word_tokens, 6, s, context).unwrap(), s == WordSpan { start: 1, end: 3 }))
            .collect();
        let det = random_detector_reading(4, 3, 3, 11, inside, context);
        assert_eq!(det.n_params(), roles(context, inside) * 3 * 4 + 3 * 3 + 3 + 3 + 1);
        let mut grad = vec![0f32; det.n_params()];
        det.accumulate_gradient(&enc, &spans, &mut grad);
        let loss = |d: &SpanDetector| d.accumulate_gradient(&enc, &spans, &mut vec![0f32; d.n_params()]);
        let h = 1e-2f32;
        for j in 0..det.n_params() {
            let mut plus = det.clone();
            let mut minus = det.clone();
            nudge(&mut plus, j, h);
            nudge(&mut minus, j, -h);
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
            let analytic = grad[j] as f64;
            assert!((numeric - analytic).abs() < 2e-3 + 1e-2 * analytic.abs(), "parameter {j}: numeric {numeric}, analytic {analytic}");
        }
    }

    fn nudge(d: &mut SpanDetector, j: usize, by: f32) {
        *d.params_mut().nth(j).unwrap() += by;
    }

    /// Slots are the words whose token has a high first coordinate (two-word slots where
    /// two such words follow each other); after fitting, `detect` finds exactly those in
    /// utterances it never saw.
    #[test]
    fn fitting_learns_a_rule_that_carries_to_new_utterances() {
        let mut rng = Rng::new(5);
        let mut make = |n: usize| {
            let mut all = Vec::new();
            for _ in 0..n {
                let marked: Vec<bool> = (0..6).map(|_| rng.below(4) == 0).collect();
                let mut rows = vec![vec![0.0, 0.0, 1.0]];
                rows.extend(marked.iter().map(|&m| vec![if m { 1.0 } else { -1.0 }, rng.unit() - 0.5, 0.0]));
                rows.push(vec![0.0, 0.0, -1.0]);
                // Maximal runs of marked words are the slots.
                let mut slots = Vec::new();
                let mut i = 0;
                while i < 6 {
                    if marked[i] {
                        let s = i;
                        while i < 6 && marked[i] {
                            i += 1;
                        }
                        slots.push((s, i));
                    } else {
                        i += 1;
                    }
                }
                all.push(utterance(&rows, &slots));
            }
            all
        };
        let (train, test) = (make(300), make(50));
        let (ex, enc): (Vec<Example>, Vec<EncodedText>) = train.into_iter().unzip();
        let cfg = FitConfig { max_width: 6, hidden: 8, epochs: 30, lr: 1e-2, batch: 16, seed: 1, layer: None, inside: false, context: 1 };
        let (det, report) = SpanDetector::fit(&ex, &enc, &cfg).unwrap();
        assert!(report.loss.last().unwrap() < &(report.loss[0] / 4.0), "{:?}", report.loss);
        let mut wrong = 0;
        for (ex, enc) in &test {
            let gold: Vec<WordSpan> = ex.spans.iter().map(|s| s.words()).collect();
            wrong += usize::from(det.detect(enc, &ex.words, 6, 0.0) != gold);
        }
        assert!(wrong <= 2, "{wrong} of 50 utterances detected wrongly");
    }

    /// The average's logit is the members' mean logit on every span, scales differing.
    #[test]
    fn average_gives_the_mean_logit_of_its_members() {
        let mut rng = Rng::new(4);
        let rows: Vec<Vec<f32>> = (0..7).map(|_| (0..4).map(|_| rng.unit() * 2.0 - 1.0).collect()).collect();
        let (ex, enc) = utterance(&rows, &[]);
        let mut members = vec![random_detector(4, 3, 3, 1), random_detector(4, 2, 3, 2), random_detector(4, 5, 3, 3)];
        members[1].scale = 0.7;
        members[2].scale = 2.9;
        let avg = SpanDetector::average(&members).unwrap();
        assert_eq!(avg.hidden, 10);
        let spans = candidate_spans(5, 3);
        let each: Vec<Vec<f32>> = members.iter().map(|m| m.logits(&enc, &ex.words, &spans)).collect();
        let mean = avg.logits(&enc, &ex.words, &spans);
        for (i, z) in mean.iter().enumerate() {
            let expected = each.iter().map(|l| l[i]).sum::<f32>() / 3.0;
            assert!((z - expected).abs() < 1e-5, "span {i}: {z} against {expected}");
        }
        assert!(each[0] != each[1], "the members should differ for this test to mean anything");
        assert_eq!(SpanDetector::average(&members[1..2]).unwrap(), members[1], "the average of one is itself");
        assert!(SpanDetector::average(&[]).is_err());
        let err = SpanDetector::average(&[random_detector(4, 3, 3, 1), random_detector(5, 3, 3, 1)]).unwrap_err().to_string();
        assert!(err.contains("4-dim") && err.contains("5-dim"), "{err}");
    }

    /// A detector reading an earlier layer learns from that layer's states: where only
    /// they mark the slots (the last hidden state is noise), it finds them and one reading
    /// the last state does not; encodings without that layer are an error when fitting.
    #[test]
    fn a_detector_reads_the_layer_it_was_fitted_on() {
        let mut rng = Rng::new(6);
        let mut make = |n: usize| {
            (0..n)
                .map(|_| {
                    let marked: Vec<bool> = (0..6).map(|_| rng.below(3) == 0).collect();
                    let mut tap = vec![vec![0.0, 0.0, 1.0]];
                    tap.extend(marked.iter().map(|&m| vec![if m { 1.0 } else { -1.0 }, 0.0, 0.0]));
                    tap.push(vec![0.0, 0.0, -1.0]);
                    let noise: Vec<Vec<f32>> = (0..8).map(|_| (0..3).map(|_| rng.unit() - 0.5).collect()).collect();
                    let slots: Vec<(usize, usize)> = (0..6).filter(|&i| marked[i]).map(|i| (i, i + 1)).collect();
                    let (ex, mut enc) = utterance(&noise, &slots);
                    enc.tapped = Some(crate::encoder::Tapped { layer: 2, hidden: tap.concat() });
                    (ex, enc)
                })
                .collect::<Vec<_>>()
        };
        let (train, test) = (make(200), make(40));
        let (ex, enc): (Vec<Example>, Vec<EncodedText>) = train.into_iter().unzip();
        let cfg = |layer| FitConfig { max_width: 1, hidden: 4, epochs: 30, lr: 1e-2, batch: 16, seed: 1, layer, inside: false, context: 1 };
        let wrong = |det: &SpanDetector| wrongly_detected(det, &test, 1);
        let (tapped, _) = SpanDetector::fit(&ex, &enc, &cfg(Some(2))).unwrap();
        assert_eq!(tapped.layer, Some(2));
        assert!(wrong(&tapped) <= 1, "{} of 40 wrong reading layer 2", wrong(&tapped));
        let (last, _) = SpanDetector::fit(&ex, &enc, &cfg(None)).unwrap();
        assert!(wrong(&last) >= 20, "reading the noise should fail, {} of 40 wrong", wrong(&last));
        let err = SpanDetector::fit(&ex, &enc, &cfg(Some(3))).unwrap_err();
        assert!(matches!(err, DetectorError::MissingLayer { layer: 3 }), "{err}");
        let err = SpanDetector::average(&[tapped, last]).unwrap_err().to_string();
        assert!(err.contains("layer"), "{err}");
    }

    /// The slots are the three-word spans whose middle word is marked: their edges look
    /// like any other span's, so only a detector that reads the inside finds them; the
    /// two kinds cannot be averaged into one.
    #[test]
    fn an_inside_reading_detector_sees_the_middle_of_a_span() {
        let mut rng = Rng::new(8);
        let mut make = |n: usize| {
            (0..n)
                .map(|_| {
                    // 12 words, the slot is middle-1..middle+2: a span far from the marked
                    // word has edges just like the slot's.
                    let middle = 1 + rng.below(10);
                    let mut rows = vec![vec![0.0, 0.0, 1.0]];
                    rows.extend((0..12).map(|i| vec![if i == middle { 1.0 } else { -1.0 }, rng.unit() - 0.5, 0.0]));
                    rows.push(vec![0.0, 0.0, -1.0]);
                    utterance(&rows, &[(middle - 1, middle + 2)])
                })
                .collect::<Vec<_>>()
        };
        let (train, test) = (make(300), make(40));
        let (ex, enc): (Vec<Example>, Vec<EncodedText>) = train.into_iter().unzip();
        let cfg = |inside| FitConfig { max_width: 3, hidden: 8, epochs: 30, lr: 1e-2, batch: 16, seed: 1, layer: None, inside, context: 1 };
        let wrong = |det: &SpanDetector| wrongly_detected(det, &test, 3);
        let (inside, _) = SpanDetector::fit(&ex, &enc, &cfg(true)).unwrap();
        assert!(inside.inside);
        assert!(wrong(&inside) <= 2, "{} of 40 wrong reading the inside", wrong(&inside));
        let (edges, _) = SpanDetector::fit(&ex, &enc, &cfg(false)).unwrap();
        assert!(wrong(&edges) >= 20, "the edges alone should not tell, {} of 40 wrong", wrong(&edges));
        let err = SpanDetector::average(&[inside, edges]).unwrap_err().to_string();
        assert!(err.contains("inside"), "{err}");
    }

    /// The slots are the one-word spans two words after a marked word: only a detector
    /// that reads two tokens on each side sees the mark; contexts past the limit are an
    /// error, and detectors of different contexts cannot be averaged.
    #[test]
    fn a_wider_context_sees_two_tokens_away() {
        let mut rng = Rng::new(9);
        let mut make = |n: usize| {
            (0..n)
                .map(|_| {
                    let marked = rng.below(8); // words 0..10: the slot is marked + 2
                    let mut rows = vec![vec![0.0, 0.0, 1.0]];
                    rows.extend((0..10).map(|i| vec![if i == marked { 1.0 } else { -1.0 }, rng.unit() - 0.5, 0.0]));
                    rows.push(vec![0.0, 0.0, -1.0]);
                    utterance(&rows, &[(marked + 2, marked + 3)])
                })
                .collect::<Vec<_>>()
        };
        let (train, test) = (make(300), make(40));
        let (ex, enc): (Vec<Example>, Vec<EncodedText>) = train.into_iter().unzip();
        let cfg = |context| FitConfig { max_width: 1, hidden: 8, epochs: 30, lr: 1e-2, batch: 16, seed: 1, layer: None, inside: false, context };
        let wrong = |det: &SpanDetector| wrongly_detected(det, &test, 1);
        let (wide, _) = SpanDetector::fit(&ex, &enc, &cfg(2)).unwrap();
        assert_eq!(wide.context, 2);
        assert!(wrong(&wide) <= 2, "{} of 40 wrong reading two tokens each side", wrong(&wide));
        let (near, _) = SpanDetector::fit(&ex, &enc, &cfg(1)).unwrap();
        assert!(wrong(&near) >= 20, "one token each side should not tell, {} of 40 wrong", wrong(&near));
        let err = SpanDetector::average(&[wide, near]).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        for context in [0, MAX_CONTEXT + 1] {
            let err = SpanDetector::fit(&ex, &enc, &cfg(context)).unwrap_err();
            assert!(matches!(err, DetectorError::Context { .. }), "{err}");
        }
    }

    #[test]
    fn fitting_without_any_slot_is_an_error() {
        let (ex, enc) = utterance(&[vec![0.0, 1.0], vec![1.0, 0.0], vec![0.0, -1.0]], &[]);
        let err = SpanDetector::fit(&[ex], &[enc], &FitConfig::default()).unwrap_err();
        assert!(matches!(err, DetectorError::NoPositives { .. }), "{err}");
    }

    #[test]
    fn save_and_load_round_trip_and_bad_files_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("nearspan-detector-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("span_detector.json");
        let det = random_detector(4, 3, 2, 9);
        det.save(&path).unwrap();
        assert_eq!(SpanDetector::load(&path, 4).unwrap(), det);
        // Files from before the layer choice read the last hidden state; a layer round-trips.
        assert!(!std::fs::read_to_string(&path).unwrap().contains("layer"));
        let layered = SpanDetector { layer: Some(3), ..det.clone() };
        layered.save(&path).unwrap();
        assert_eq!(SpanDetector::load(&path, 4).unwrap().layer, Some(3));
        // Likewise the inside role: absent means edges only.
        assert!(!std::fs::read_to_string(&path).unwrap().contains("inside"));
        let inside = random_detector_reading(4, 3, 2, 9, true, 1);
        inside.save(&path).unwrap();
        assert_eq!(SpanDetector::load(&path, 4).unwrap(), inside);
        // And the context: absent means one token each side.
        assert!(!std::fs::read_to_string(&path).unwrap().contains("context"));
        let wide = random_detector_reading(4, 3, 2, 9, true, 3);
        wide.save(&path).unwrap();
        assert_eq!(SpanDetector::load(&path, 4).unwrap(), wide);
        SpanDetector { context: MAX_CONTEXT + 1, ..wide }.save(&path).unwrap();
        let err = SpanDetector::load(&path, 4).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        let mut edges_sized = inside.clone();
        edges_sized.w_tokens.truncate(EDGE_ROLES * 3 * 4);
        edges_sized.save(&path).unwrap();
        let err = SpanDetector::load(&path, 4).unwrap_err().to_string();
        assert!(err.contains("w_tokens"), "{err}");
        det.save(&path).unwrap();
        let err = SpanDetector::load(&path, 5).unwrap_err().to_string();
        assert!(err.contains("span_detector.json") && err.contains("4-dim") && err.contains("5"), "{err}");

        let mut short = det.clone();
        short.w_out.pop();
        short.save(&path).unwrap();
        let err = SpanDetector::load(&path, 4).unwrap_err().to_string();
        assert!(err.contains("w_out"), "{err}");

        let mut nan = det.clone();
        nan.b_hidden[1] = f32::NAN;
        // serde_json writes NaN as null, which is no number.
        nan.save(&path).unwrap();
        assert!(SpanDetector::load(&path, 4).is_err());

        std::fs::write(&path, "{\"format\": \"something else\"}").unwrap();
        let err = SpanDetector::load(&path, 4).unwrap_err().to_string();
        assert!(err.contains("not a span detector"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
