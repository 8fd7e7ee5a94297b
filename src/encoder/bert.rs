//! BERT (Devlin et al. 2019, <https://arxiv.org/abs/1810.04805>) as a plain candle struct:
//! `BertModel::load(vb, &config)` and `forward`. It mirrors Hugging Face's `BertModel`
//! (transformers/models/bert/modeling_bert.py), weight names included, so a model folder
//! in HF layout loads unchanged.
//!
//! One model, two kinds of forward pass ([`ForwardMode`]): inference uses candle's fused
//! softmax and layer norm kernels, which are fast but have no backward (candle issues
//! #3569, #3011: gradients silently stop there); training uses nearspan's fused ops with
//! an analytic backward ([`super::ops`]), so every weight receives a gradient at a
//! fraction of the cost of composing basic candle ops. Both compute the same function
//! (`tests/suite/train.rs` checks it), training adding dropout.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::BertConfig;
use super::ops;

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ForwardMode {
    /// Fused kernels, no dropout, no gradient.
    Inference,
    /// Differentiable ops; dropout with this probability (0 disables it).
    Train { dropout: f32 },
}

/// Layer norm over the last dimension, with a backward in training mode.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }

    pub fn forward(&self, xs: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        match mode {
            ForwardMode::Train { .. } => ops::layer_norm(xs, &self.weight, &self.bias, self.eps),
            ForwardMode::Inference => {
                candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)
            }
        }
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, Some(vb.get(out_dim, "bias")?)))
}

/// A linear layer's bias (BERT's all have one); the training ops add it themselves.
fn bias(layer: &Linear) -> &Tensor {
    layer.bias().expect("BERT linear layers have a bias")
}

/// Word, position and token-type embeddings, summed and normalized.
#[derive(Debug, Clone)]
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, c: &BertConfig) -> Result<Self> {
        let emb = |name: &str, n: usize| -> Result<Embedding> {
            Ok(Embedding::new(vb.pp(name).get((n, c.hidden_size), "weight")?, c.hidden_size))
        };
        Ok(Self {
            word: emb("word_embeddings", c.vocab_size)?,
            position: emb("position_embeddings", c.max_position_embeddings)?,
            token_type: emb("token_type_embeddings", c.type_vocab_size)?,
            norm: LayerNorm::load(vb.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let xs = self
            .word
            .forward(input_ids)?
            .add(&self.token_type.forward(token_type_ids)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        self.norm.forward(&xs, ForwardMode::Inference)
    }

    /// Training: (b * t, hidden), each table read with one `index_select` (token type 0).
    fn forward_train(&self, input_ids: &Tensor, dropout: f32) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let dev = input_ids.device();
        let positions = Tensor::from_vec((0..b * t).map(|i| (i % t) as u32).collect::<Vec<_>>(), b * t, dev)?;
        let types = Tensor::zeros(b * t, DType::U32, dev)?;
        let xs = (self.word.embeddings().index_select(&input_ids.flatten_all()?, 0)?
            + self.token_type.embeddings().index_select(&types, 0)?)?
            .add(&self.position.embeddings().index_select(&positions, 0)?)?;
        ops::dropout(&self.norm.forward(&xs, ForwardMode::Train { dropout })?, dropout)
    }
}

/// Multi-head self-attention with its output projection and residual norm.
#[derive(Debug, Clone)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, c: &BertConfig) -> Result<Self> {
        let h = c.hidden_size;
        let sa = vb.pp("self");
        Ok(Self {
            query: linear(sa.pp("query"), h, h)?,
            key: linear(sa.pp("key"), h, h)?,
            value: linear(sa.pp("value"), h, h)?,
            output: linear(vb.pp("output").pp("dense"), h, h)?,
            norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        })
    }

    /// `mask_bias`: (b, 1, 1, t), 0 for real tokens and a large negative for padding.
    fn forward(&self, xs: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let split = |x: Tensor| -> Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.query.forward(xs)?)?;
        let k = split(self.key.forward(xs)?)?;
        let v = split(self.value.forward(xs)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask_bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let out = self.output.forward(&context)?;
        self.norm.forward(&(out + xs)?, ForwardMode::Inference)
    }

    /// Training: `xs` is (b * t, hidden); the three projections are one matmul with the
    /// weights stacked, and [`ops::attention`] does the rest up to the output projection.
    fn forward_train(&self, xs: &Tensor, mask_bias: &Tensor, seq_len: usize, dropout: f32) -> Result<Tensor> {
        let w = Tensor::cat(&[self.query.weight(), self.key.weight(), self.value.weight()], 0)?;
        let b = Tensor::cat(&[bias(&self.query), bias(&self.key), bias(&self.value)], 0)?;
        let context = ops::attention(&ops::linear(xs, &w)?, &b, mask_bias, seq_len, self.heads, dropout)?;
        let out = ops::bias_dropout_add(&ops::linear(&context, self.output.weight())?, bias(&self.output), xs, dropout)?;
        self.norm.forward(&out, ForwardMode::Train { dropout })
    }
}

/// One transformer layer: attention, then the GELU feed-forward block.
#[derive(Debug, Clone)]
struct Layer {
    attention: Attention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

impl Layer {
    fn load(vb: VarBuilder, c: &BertConfig) -> Result<Self> {
        Ok(Self {
            attention: Attention::load(vb.pp("attention"), c)?,
            intermediate: linear(vb.pp("intermediate").pp("dense"), c.hidden_size, c.intermediate_size)?,
            output: linear(vb.pp("output").pp("dense"), c.intermediate_size, c.hidden_size)?,
            norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
        })
    }

    fn forward(&self, xs: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("bert_layer").entered();
        let attended = self.attention.forward(xs, mask_bias)?;
        // HF's "gelu" is the exact erf form.
        let inner = self.intermediate.forward(&attended)?.gelu_erf()?;
        let out = self.output.forward(&inner)?;
        self.norm.forward(&(out + attended)?, ForwardMode::Inference)
    }

    /// Training: `xs` is (b * t, hidden).
    fn forward_train(&self, xs: &Tensor, mask_bias: &Tensor, seq_len: usize, dropout: f32) -> Result<Tensor> {
        let _span = tracing::trace_span!("bert_layer_train").entered();
        let attended = self.attention.forward_train(xs, mask_bias, seq_len, dropout)?;
        let inner = ops::bias_gelu(&ops::linear(&attended, self.intermediate.weight())?, bias(&self.intermediate))?;
        let out = ops::bias_dropout_add(&ops::linear(&inner, self.output.weight())?, bias(&self.output), &attended, dropout)?;
        self.norm.forward(&out, ForwardMode::Train { dropout })
    }
}

/// The BERT encoder stack (no pooler: nearspan pools tokens itself).
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    config: BertConfig,
}

impl BertModel {
    /// Loads weights named as in HF's `BertModel` (`embeddings.*`, `encoder.layer.N.*`).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder").pp("layer").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings: Embeddings::load(vb.pp("embeddings"), config)?, layers, config: config.clone() })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// `input_ids`, `attention_mask`: (batch, tokens) u32; returns the last hidden state
    /// (batch, tokens, hidden) in f32.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        Ok(self.forward_tapped(input_ids, attention_mask, mode, None)?.0)
    }

    /// [`BertModel::forward`], and with `tap = Some(l)` also the hidden states after the
    /// first `l` layers (0: the embeddings), the same shape.
    pub fn forward_tapped(&self, input_ids: &Tensor, attention_mask: &Tensor, mode: ForwardMode, tap: Option<usize>) -> Result<(Tensor, Option<Tensor>)> {
        let _span = tracing::debug_span!("bert_forward").entered();
        let (b, t) = input_ids.dims2()?;
        // (1 - mask) * -10000 as in the original BERT: padding gets ~0 attention.
        let mask_bias = ((attention_mask.to_dtype(DType::F32)? - 1.0)? * 10_000.0)?.reshape((b, 1, 1, t))?;
        match mode {
            ForwardMode::Inference => {
                let token_type_ids = input_ids.zeros_like()?;
                let mut xs = self.embeddings.forward(input_ids, &token_type_ids)?;
                let mut tapped = None;
                for (done, layer) in self.layers.iter().enumerate() {
                    if tap == Some(done) {
                        tapped = Some(xs.clone());
                    }
                    xs = layer.forward(&xs, &mask_bias)?;
                }
                if tap == Some(self.layers.len()) {
                    tapped = Some(xs.clone());
                }
                Ok((xs, tapped))
            }
            ForwardMode::Train { dropout } => {
                let mut xs = self.embeddings.forward_train(input_ids, dropout)?;
                let mut tapped = None;
                for (done, layer) in self.layers.iter().enumerate() {
                    if tap == Some(done) {
                        tapped = Some(xs.reshape((b, t, ()))?);
                    }
                    xs = layer.forward_train(&xs, &mask_bias, t, dropout)?;
                }
                let xs = xs.reshape((b, t, ()))?;
                if tap == Some(self.layers.len()) {
                    tapped = Some(xs.clone());
                }
                Ok((xs, tapped))
            }
        }
    }
}
