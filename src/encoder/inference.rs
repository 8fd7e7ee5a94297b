//! The inference forward pass: the same BERT function as [`super::BertModel`], written
//! for speed on the CPU rather than for autograd.
//!
//! - **No padding.** The tokens of all texts in a batch are packed into one
//!   (tokens x hidden) matrix; the linear layers run on it as one product, and attention
//!   runs per text over its own tokens only, so no mask is needed and no padded position
//!   is ever computed. (HF and candle pad every text to the longest in its batch.)
//! - **Fused passes.** Bias + GELU is one pass; bias + residual + layer norm is one pass;
//!   the query, key and value projections are one product with the weights stacked.
//! - **Precision.** The products run in f32 or bf16 ([`Precision`]); everything else is
//!   f32.
//! - **Buffers** are allocated once per forward pass and reused by every layer.
//!
//! `tests/suite/encoder.rs` checks it against the PyTorch reference (f32, 1e-4) and
//! bounds the bf16 error.

use candle_core::DType;
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::config::BertConfig;
use super::matmul::{PackedWeight, Precision};
use super::ops::{exp_f32, gelu_rows, layer_norm_rows, max, multiversion, par_rows, row_stats, sum};

/// Layer norm parameters.
#[derive(Debug, Clone)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

#[derive(Debug, Clone)]
struct Layer {
    /// Query, key and value weights stacked: (3 hidden) x hidden.
    qkv: PackedWeight,
    qkv_bias: Vec<f32>,
    attention_out: PackedWeight,
    attention_out_bias: Vec<f32>,
    attention_norm: Norm,
    up: PackedWeight,
    up_bias: Vec<f32>,
    down: PackedWeight,
    down_bias: Vec<f32>,
    norm: Norm,
}

/// BERT for inference over packed tokens; see the module documentation.
#[derive(Debug, Clone)]
pub struct InferenceBert {
    word: Vec<f32>,
    position: Vec<f32>,
    /// Token type 0's embedding (nearspan encodes single texts).
    token_type: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    vocab: usize,
    max_positions: usize,
    precision: Precision,
}

fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Vec<f32>> {
    vb.get(shape, name)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

fn norm(vb: VarBuilder, c: &BertConfig) -> candle_core::Result<Norm> {
    Ok(Norm {
        weight: get(&vb, &[c.hidden_size], "weight")?,
        bias: get(&vb, &[c.hidden_size], "bias")?,
        eps: c.layer_norm_eps as f32,
    })
}

impl InferenceBert {
    /// Loads weights named as in HF's `BertModel`, packing the linear layers for `precision`.
    pub fn load(vb: VarBuilder, c: &BertConfig, precision: Precision) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let emb = vb.pp("embeddings");
        let table = |name: &str, rows: usize| get(&emb.pp(name), &[rows, h], "weight");
        let linear = |vb: VarBuilder,
                      out: usize,
                      inp: usize|
         -> candle_core::Result<(PackedWeight, Vec<f32>)> {
            Ok((
                PackedWeight::new(get(&vb, &[out, inp], "weight")?, out, inp, precision),
                get(&vb, &[out], "bias")?,
            ))
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp("encoder").pp("layer").pp(i);
                let att = vb.pp("attention");
                let sa = att.pp("self");
                let parts = ["query", "key", "value"].map(|n| {
                    (
                        get(&sa.pp(n), &[h, h], "weight"),
                        get(&sa.pp(n), &[h], "bias"),
                    )
                });
                let mut qkv_w = Vec::with_capacity(3 * h * h);
                let mut qkv_bias = Vec::with_capacity(3 * h);
                for (w, b) in parts {
                    qkv_w.extend(w?);
                    qkv_bias.extend(b?);
                }
                let (attention_out, attention_out_bias) =
                    linear(att.pp("output").pp("dense"), h, h)?;
                let (up, up_bias) =
                    linear(vb.pp("intermediate").pp("dense"), c.intermediate_size, h)?;
                let (down, down_bias) =
                    linear(vb.pp("output").pp("dense"), h, c.intermediate_size)?;
                Ok(Layer {
                    qkv: PackedWeight::new(qkv_w, 3 * h, h, precision),
                    qkv_bias,
                    attention_out,
                    attention_out_bias,
                    attention_norm: norm(att.pp("output").pp("LayerNorm"), c)?,
                    up,
                    up_bias,
                    down,
                    down_bias,
                    norm: norm(vb.pp("output").pp("LayerNorm"), c)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let token_types = table("token_type_embeddings", c.type_vocab_size)?;
        Ok(Self {
            word: table("word_embeddings", c.vocab_size)?,
            position: table("position_embeddings", c.max_position_embeddings)?,
            token_type: token_types[..h].to_vec(),
            embedding_norm: norm(emb.pp("LayerNorm"), c)?,
            layers,
            hidden: h,
            heads: c.num_attention_heads,
            vocab: c.vocab_size,
            max_positions: c.max_position_embeddings,
            precision,
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Last hidden states of the texts given as token ids, packed: the rows of text `i`
    /// follow those of text `i - 1`, (sum of lengths) x hidden. Callers check lengths
    /// against the position table and ids against the vocabulary (the tokenizer's ids
    /// always are); out-of-range ones are an error here rather than a panic.
    pub fn forward(&self, texts: &[&[u32]]) -> candle_core::Result<Vec<f32>> {
        Ok(self.forward_tapped(texts, None)?.0)
    }

    /// [`InferenceBert::forward`], and with `tap = Some(l)` also the hidden states after
    /// the first `l` layers (0: the embeddings), one (tokens x hidden) row block per text:
    /// copied out once, at the layer. Callers check `l` against the number of layers.
    pub fn forward_tapped(&self, texts: &[&[u32]], tap: Option<usize>) -> candle_core::Result<(Vec<f32>, Option<Vec<Vec<f32>>>)> {
        let h = self.hidden;
        let lens: Vec<usize> = texts.iter().map(|t| t.len()).collect();
        if let Some(&n) = lens.iter().find(|&&n| n > self.max_positions) {
            candle_core::bail!(
                "a text has {n} tokens; the model reads at most {}",
                self.max_positions
            );
        }
        if let Some(&id) = texts
            .iter()
            .flat_map(|t| t.iter())
            .find(|&&id| id as usize >= self.vocab)
        {
            candle_core::bail!("token id {id} is outside the vocabulary of {}", self.vocab);
        }
        let rows: usize = lens.iter().sum();
        let mut x = vec![0f32; rows * h];
        self.embed(texts, &mut x);
        let inter = self.layers.first().map_or(0, |l| l.up.out_dim());
        let mut qkv = vec![0f32; rows * 3 * h];
        let mut context = vec![0f32; rows * h];
        let mut projected = vec![0f32; rows * h];
        let mut up = vec![0f32; rows * inter];
        let mut activated = vec![0f32; rows * inter];
        let mut tapped = None;
        for (done, layer) in self.layers.iter().enumerate() {
            if tap == Some(done) {
                tapped = Some(split_per_text(&x, &lens, h));
            }
            let _span = tracing::trace_span!("bert_layer_packed").entered();
            layer.qkv.matmul(&x, rows, &mut qkv);
            attention(&qkv, &layer.qkv_bias, &lens, self.heads, &mut context);
            layer.attention_out.matmul(&context, rows, &mut projected);
            bias_residual_norm(
                &projected,
                &layer.attention_out_bias,
                &mut x,
                &layer.attention_norm,
            );
            layer.up.matmul(&x, rows, &mut up);
            par_rows(&mut activated, inter, |row0, out| {
                gelu_rows(
                    &up[row0 * inter..row0 * inter + out.len()],
                    &layer.up_bias,
                    out,
                )
            });
            layer.down.matmul(&activated, rows, &mut projected);
            bias_residual_norm(&projected, &layer.down_bias, &mut x, &layer.norm);
        }
        if tap == Some(self.layers.len()) {
            tapped = Some(split_per_text(&x, &lens, h));
        }
        Ok((x, tapped))
    }

    /// [`InferenceBert::forward`] split back into one (tokens x hidden) row block per text.
    pub fn forward_per_text(&self, texts: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        Ok(self.forward_per_text_tapped(texts, None)?.into_iter().map(|(rows, _)| rows).collect())
    }

    /// [`InferenceBert::forward_tapped`] split back per text: (last hidden state, tapped
    /// states) row blocks.
    pub fn forward_per_text_tapped(&self, texts: &[&[u32]], tap: Option<usize>) -> candle_core::Result<Vec<(Vec<f32>, Option<Vec<f32>>)>> {
        let (packed, tapped) = self.forward_tapped(texts, tap)?;
        let lens: Vec<usize> = texts.iter().map(|t| t.len()).collect();
        let own = split_per_text(&packed, &lens, self.hidden);
        Ok(match tapped {
            Some(tapped) => own.into_iter().zip(tapped.into_iter().map(Some)).collect(),
            None => own.into_iter().map(|rows| (rows, None)).collect(),
        })
    }

    /// Word + position + token-type embeddings, layer-normalized, into `x`.
    fn embed(&self, texts: &[&[u32]], x: &mut [f32]) {
        let h = self.hidden;
        let mut sums = vec![0f32; x.len()];
        let mut rows = sums.chunks_exact_mut(h);
        for text in texts {
            for (pos, (&id, row)) in text.iter().zip(&mut rows).enumerate() {
                let (w, p) = (
                    &self.word[id as usize * h..][..h],
                    &self.position[pos * h..][..h],
                );
                for (((r, w), p), t) in row.iter_mut().zip(w).zip(p).zip(&self.token_type) {
                    *r = w + p + t;
                }
            }
        }
        let norm = &self.embedding_norm;
        par_rows(x, h, |row0, out| layer_norm_rows(&sums[row0 * h..row0 * h + out.len()], &norm.weight, &norm.bias, out, norm.eps));
    }
}

/// Packed rows (texts of `lens` tokens one after another, `h` wide) as one block per text.
fn split_per_text(packed: &[f32], lens: &[usize], h: usize) -> Vec<Vec<f32>> {
    let mut rest = packed;
    lens.iter()
        .map(|&n| {
            let (rows, tail) = rest.split_at(n * h);
            rest = tail;
            rows.to_vec()
        })
        .collect()
}

/// `x = layer_norm(projected + bias + x)`, row by row, in parallel.
fn bias_residual_norm(projected: &[f32], bias: &[f32], x: &mut [f32], norm: &Norm) {
    let h = bias.len();
    par_rows(x, h, |row0, rows| {
        bias_residual_norm_rows(
            &projected[row0 * h..row0 * h + rows.len()],
            bias,
            rows,
            norm,
        )
    });
}

multiversion! {
    fn bias_residual_norm_rows(projected: &[f32], bias: &[f32], x: &mut [f32], norm: &Norm) {
        let h = bias.len();
        let (w, b) = (&norm.weight[..h], &norm.bias[..h]);
        for (xr, pr) in x.chunks_exact_mut(h).zip(projected.chunks_exact(h)) {
            for ((x, p), c) in xr.iter_mut().zip(pr).zip(bias) {
                *x += p + c;
            }
            let (mean, rstd) = row_stats(xr, norm.eps);
            for ((x, w), b) in xr.iter_mut().zip(w).zip(b) {
                *x = (*x - mean) * rstd * w + b;
            }
        }
    }
}

/// Multi-head self-attention of each text over its own tokens: `qkv` holds the packed
/// projections (rows x 3 hidden, before their bias), `context` receives rows x hidden.
fn attention(qkv: &[f32], bias: &[f32], lens: &[usize], heads: usize, context: &mut [f32]) {
    let h = bias.len() / 3;
    // Split the packed rows into per-text slices so texts run in parallel.
    let mut jobs = Vec::with_capacity(lens.len());
    let (mut rest_in, mut rest_out) = (qkv, context);
    for &n in lens {
        let (a, b) = rest_in.split_at(n * 3 * h);
        let (c, d) = std::mem::take(&mut rest_out).split_at_mut(n * h);
        jobs.push((a, c));
        rest_in = b;
        rest_out = d;
    }
    jobs.into_par_iter()
        .for_each(|(x, out)| attention_text(x, bias, heads, out));
}

/// Lanes of the attention's vector loops: inner loops run over fixed `[f32; LANES]` chunks
/// so they compile to whole AVX-512 vectors even for texts shorter than a vector (a loop
/// over a runtime length of 12 would run entirely in its scalar remainder).
const LANES: usize = 16;

/// Queries scored together in [`attention_text`]: each key or value vector loaded feeds
/// this many independent sums, instead of one sum that waits on its own previous
/// multiply-add.
const QUERY_BLOCK: usize = 4;

multiversion! {
    /// One text's attention. Per head, `K` is transposed once (keys padded to a multiple
    /// of [`LANES`]) so that a query's scores against all keys are `d` vector updates,
    /// and the context is `t` vector updates over the head's `d` columns: no per-pair dot
    /// products, whose horizontal sums would cost more than their multiplications.
    /// Queries go [`QUERY_BLOCK`] at a time (a short last block repeats its last query and
    /// drops the copies); each query's sums run in the same order as one at a time.
    fn attention_text(x: &[f32], bias: &[f32], heads: usize, out: &mut [f32]) {
        let w = bias.len();
        let h = w / 3;
        let t = x.len() / w;
        let d = h / heads;
        let tp = t.next_multiple_of(LANES);
        let scale = 1.0 / (d as f32).sqrt();
        let mut q = vec![0f32; QUERY_BLOCK * d];
        let mut k_t = vec![0f32; d * tp];
        // Values with rows padded to a multiple of LANES columns (zeros past d).
        let dp = d.next_multiple_of(LANES);
        let mut v = vec![0f32; t * dp];
        let mut p = vec![0f32; QUERY_BLOCK * tp];
        let mut inv = [0f32; QUERY_BLOCK];
        for head in 0..heads {
            let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
            for j in 0..t {
                let row = &x[j * w..(j + 1) * w];
                for c in 0..d {
                    k_t[c * tp + j] = row[ko + c] + bias[ko + c];
                }
                for ((v, x), b) in v[j * dp..j * dp + d].iter_mut().zip(&row[vo..vo + d]).zip(&bias[vo..vo + d]) {
                    *v = x + b;
                }
            }
            for i0 in (0..t).step_by(QUERY_BLOCK) {
                let n = (t - i0).min(QUERY_BLOCK);
                for (b, q) in q.chunks_exact_mut(d).enumerate() {
                    let i = i0 + b.min(n - 1);
                    for ((q, x), b) in q.iter_mut().zip(&x[i * w + qo..i * w + qo + d]).zip(&bias[qo..qo + d]) {
                        *q = (x + b) * scale;
                    }
                }
                // Scores against LANES keys at a time, summed in local vectors.
                for jc in 0..tp / LANES {
                    let mut acc = [[0f32; LANES]; QUERY_BLOCK];
                    for c in 0..d {
                        let k: &[f32; LANES] = k_t[c * tp + jc * LANES..][..LANES].try_into().expect("LANES keys");
                        for (b, acc) in acc.iter_mut().enumerate() {
                            let qc = q[b * d + c];
                            for l in 0..LANES {
                                acc[l] += qc * k[l];
                            }
                        }
                    }
                    for (b, acc) in acc.iter().enumerate() {
                        p[b * tp + jc * LANES..][..LANES].copy_from_slice(acc);
                    }
                }
                for (p, inv) in p.chunks_exact_mut(tp).zip(&mut inv).take(n) {
                    let m = max(&p[..t]);
                    for chunk in p.chunks_exact_mut(LANES) {
                        for s in chunk.iter_mut() {
                            *s = exp_f32(*s - m);
                        }
                    }
                    *inv = 1.0 / sum(&p[..t]);
                }
                // Context, LANES columns at a time, summed in local vectors.
                for cc in 0..dp / LANES {
                    let mut acc = [[0f32; LANES]; QUERY_BLOCK];
                    for j in 0..t {
                        let vj: &[f32; LANES] = v[j * dp + cc * LANES..][..LANES].try_into().expect("LANES values");
                        for (b, acc) in acc.iter_mut().enumerate() {
                            let s = p[b * tp + j];
                            for l in 0..LANES {
                                acc[l] += s * vj[l];
                            }
                        }
                    }
                    let cols = (d - cc * LANES).min(LANES);
                    for (b, acc) in acc.iter().enumerate().take(n) {
                        let o = &mut out[(i0 + b) * h + qo + cc * LANES..][..cols];
                        for (o, a) in o.iter_mut().zip(acc) {
                            *o = a * inv[b];
                        }
                    }
                }
            }
        }
    }
}
