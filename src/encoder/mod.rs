//! The encoder: a BERT-family model folder (Hugging Face layout: `config.json`,
//! `model.safetensors`, `tokenizer.json`) turned into contextual token vectors.
//!
//! Inputs longer than the model's position table (512 tokens for MiniLM) are refused
//! with [`EncoderError::TooLong`] rather than truncated: a truncated utterance would
//! silently lose its slots.

mod bert;
mod config;
pub mod ensemble;
mod inference;
pub mod matmul;
pub mod ops;
mod pooling;
mod tokenize;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

pub use bert::{BertModel, ForwardMode, LayerNorm};
pub use config::BertConfig;
pub use inference::InferenceBert;
pub use matmul::Precision;
pub use pooling::{normalize, sentence_vector, span_vector_into, SpanPooling};
pub use tokenize::TokenizedText;

/// Texts per forward pass when the caller does not say.
pub const DEFAULT_BATCH_SIZE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{}: missing {file}; a model folder needs config.json, model.safetensors and tokenizer.json (Hugging Face layout)", .dir.display())]
    MissingFile { dir: PathBuf, file: &'static str },
    #[error("{}: {source}", .path.display())]
    Config { path: PathBuf, source: serde_json::Error },
    #[error("{}: unsupported model type {found:?}; nearspan loads BERT-architecture models", .path.display())]
    UnsupportedModel { path: PathBuf, found: String },
    #[error("{}: cannot load tokenizer: {message}", .path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("cannot tokenize {text:?}: {message}")]
    Tokenize { text: String, message: String },
    #[error("text {index} has {tokens} tokens but the model reads at most {max}; split it into shorter texts")]
    TooLong { index: usize, tokens: usize, max: usize },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot load weights: {source}", .path.display())]
    Weights { path: PathBuf, source: candle_core::Error },
    #[error("{} precision needs {needs}, which this CPU (or its operating system) does not offer; use f32", .precision.name())]
    UnsupportedPrecision { precision: Precision, needs: &'static str },
    #[error("{}: {reason}", .path.display())]
    Ensemble { path: PathBuf, reason: String },
    #[error("{}: an ensemble of encoders can only be used to encode, not trained; train each member on its own", .dir.display())]
    EnsembleNotTrainable { dir: PathBuf },
    #[error("model computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{}: cannot keep the states after layer {layer}: the model has {layers} layers", .dir.display())]
    TapLayer { dir: PathBuf, layer: usize, layers: usize },
    #[error("{}: an ensemble of encoders gives the last layer only; a span detector that reads layer {layer} needs a single model (fit one with --layer last)", .dir.display())]
    EnsembleTap { dir: PathBuf, layer: usize },
}

/// Who the encoder is: enough to tell two encoders' vectors apart.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The model folder's name, e.g. `all-minilm-l6-v2`.
    pub id: String,
    pub dir: PathBuf,
    /// sha256 of `model.safetensors`, hex: vectors from other weights are not comparable.
    pub weights_sha256: String,
    pub hidden_size: usize,
    pub max_tokens: usize,
}

/// One text after the encoder: its tokens and one vector per token.
#[derive(Debug, Clone)]
pub struct EncodedText {
    pub tokens: TokenizedText,
    /// (tokens × dim) row-major last hidden state, [CLS] and [SEP] included.
    pub hidden: Vec<f32>,
    pub dim: usize,
    /// The states after an earlier layer, when the encoder was asked to keep them
    /// ([`Encoder::set_tap_layer`]): what a span detector reading that layer takes.
    pub tapped: Option<Tapped>,
}

/// Hidden states after the first `layer` layers (0: the embeddings), laid out as
/// [`EncodedText::hidden`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tapped {
    pub layer: usize,
    pub hidden: Vec<f32>,
}

impl EncodedText {
    pub fn token_vector(&self, i: usize) -> &[f32] {
        &self.hidden[i * self.dim..(i + 1) * self.dim]
    }

    /// Mean-pooled, L2-normalized sentence vector.
    pub fn sentence_vector(&self) -> Vec<f32> {
        sentence_vector(&self.hidden, self.dim)
    }
}

/// Tokenizer + BERT model, on the CPU.
///
/// Two forward passes over the same weights: [`BertModel`] (candle tensors, with autograd
/// for training) and, for encoders loaded for inference, [`InferenceBert`] (packed
/// tokens, fused passes, f32 or bf16 products), which [`Encoder::encode`] uses.
pub struct Encoder {
    model: BertModel,
    inference: Option<InferenceBert>,
    tokenizer: Tokenizer,
    device: Device,
    info: ModelInfo,
    /// Width of this model's own token vectors; `info.hidden_size` is wider in an ensemble.
    own_dim: usize,
    /// The other members of an ensemble ([`ensemble`]): each token's vector is this
    /// model's followed by theirs, in order. Empty for a single model.
    members: Vec<Encoder>,
    /// Keep the states after this many layers too ([`EncodedText::tapped`]).
    tap: Option<usize>,
}

/// Paths of the three files a model folder must hold, checked up front.
struct ModelFiles {
    config: PathBuf,
    weights: PathBuf,
    tokenizer: PathBuf,
}

impl ModelFiles {
    fn find(dir: &Path) -> Result<Self, EncoderError> {
        let need = |file: &'static str| {
            let p = dir.join(file);
            if p.is_file() {
                Ok(p)
            } else {
                Err(EncoderError::MissingFile { dir: dir.to_path_buf(), file })
            }
        };
        Ok(Self { config: need("config.json")?, weights: need("model.safetensors")?, tokenizer: need("tokenizer.json")? })
    }
}

fn read_config(path: &Path) -> Result<BertConfig, EncoderError> {
    let text = std::fs::read_to_string(path).map_err(|source| EncoderError::Io { path: path.into(), source })?;
    let config: BertConfig =
        serde_json::from_str(&text).map_err(|source| EncoderError::Config { path: path.into(), source })?;
    match config.model_type.as_deref() {
        None | Some("bert") => Ok(config),
        Some(other) => Err(EncoderError::UnsupportedModel { path: path.into(), found: other.into() }),
    }
}

fn sha256_file(path: &Path) -> Result<String, EncoderError> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|source| EncoderError::Io { path: path.into(), source })?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| EncoderError::Io { path: path.into(), source })?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Encoder {
    /// Loads a model folder for inference in f32 (weights memory-mapped).
    pub fn load(dir: &Path) -> Result<Self, EncoderError> {
        Self::load_with_precision(dir, Precision::F32)
    }

    /// Loads a model folder for inference with matrix products in `precision`; an error
    /// if this machine cannot run it.
    pub fn load_with_precision(dir: &Path, precision: Precision) -> Result<Self, EncoderError> {
        if !precision.is_supported() {
            return Err(EncoderError::UnsupportedPrecision { precision, needs: "Intel AMX (AMX-BF16) or AVX512-BF16" });
        }
        if let Some(manifest) = ensemble::Manifest::find(dir)? {
            return ensemble::load(dir, &manifest, precision);
        }
        let files = ModelFiles::find(dir)?;
        let device = Device::Cpu;
        // SAFETY: the weights file is mapped read-only; nearspan never writes it while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, &device) }
            .map_err(|source| EncoderError::Weights { path: files.weights.clone(), source })?;
        let mut encoder = Self::load_with(dir, vb.clone())?;
        let inference = InferenceBert::load(vb, &read_config(&files.config)?, precision)
            .map_err(|source| EncoderError::Weights { path: files.weights.clone(), source })?;
        encoder.inference = Some(inference);
        Ok(encoder)
    }

    /// Loads the config and tokenizer of `dir` and builds the model from `vb`: the
    /// training code passes a `VarBuilder` over a `VarMap` so the weights are variables.
    /// Such an encoder encodes with the candle model (its weights change as it trains).
    pub fn load_with(dir: &Path, vb: VarBuilder) -> Result<Self, EncoderError> {
        if ensemble::Manifest::find(dir)?.is_some() {
            return Err(EncoderError::EnsembleNotTrainable { dir: dir.to_path_buf() });
        }
        let files = ModelFiles::find(dir)?;
        let config = read_config(&files.config)?;
        let device = vb.device().clone();
        let model = BertModel::load(vb, &config)
            .map_err(|source| EncoderError::Weights { path: files.weights.clone(), source })?;
        let tokenizer = tokenize::load_tokenizer(&files.tokenizer)?;
        let id = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let info = ModelInfo {
            id,
            dir: dir.to_path_buf(),
            weights_sha256: sha256_file(&files.weights)?,
            hidden_size: config.hidden_size,
            max_tokens: config.max_position_embeddings,
        };
        let own_dim = config.hidden_size;
        Ok(Self { model, inference: None, tokenizer, device, info, own_dim, members: Vec::new(), tap: None })
    }

    /// Makes [`Encoder::encode`] also keep the states after the first `layer` layers
    /// (`None`: the last hidden state only), for a span detector that reads them.
    pub fn set_tap_layer(&mut self, layer: Option<usize>) -> Result<(), EncoderError> {
        if let Some(l) = layer {
            let layers = self.model.config().num_hidden_layers;
            if l > layers {
                return Err(EncoderError::TapLayer { dir: self.info.dir.clone(), layer: l, layers });
            }
            if !self.members.is_empty() {
                return Err(EncoderError::EnsembleTap { dir: self.info.dir.clone(), layer: l });
            }
        }
        self.tap = layer;
        Ok(())
    }

    /// Number of transformer layers (of the first member, in an ensemble).
    pub fn n_layers(&self) -> usize {
        self.model.config().num_hidden_layers
    }

    /// The layer [`Encoder::encode`] keeps besides the last, if any.
    pub fn tap_layer(&self) -> Option<usize> {
        self.tap
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The candle model (of the first member, in an ensemble).
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// Number of models whose token vectors [`Encoder::encode`] puts side by side (1
    /// unless this is an ensemble).
    pub fn n_models(&self) -> usize {
        1 + self.members.len()
    }

    /// The precision [`Encoder::encode`] computes in.
    pub fn precision(&self) -> Precision {
        self.inference.as_ref().map_or(Precision::F32, InferenceBert::precision)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn tokenize(&self, text: &str) -> Result<TokenizedText, EncoderError> {
        tokenize::tokenize(&self.tokenizer, text)
    }

    /// Tokenizes every text, refusing any longer than the model's position table.
    pub fn tokenize_all(&self, texts: &[&str]) -> Result<Vec<TokenizedText>, EncoderError> {
        texts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let t = self.tokenize(text)?;
                if t.len() > self.info.max_tokens {
                    return Err(EncoderError::TooLong { index, tokens: t.len(), max: self.info.max_tokens });
                }
                Ok(t)
            })
            .collect()
    }

    /// Pads a batch to its longest member: (ids, attention mask), both (b, t) u32.
    pub fn batch_tensors(&self, batch: &[&TokenizedText]) -> Result<(Tensor, Tensor), EncoderError> {
        let t = batch.iter().map(|x| x.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; batch.len() * t];
        let mut mask = vec![0u32; batch.len() * t];
        for (row, item) in batch.iter().enumerate() {
            ids[row * t..row * t + item.len()].copy_from_slice(&item.ids);
            mask[row * t..row * t + item.len()].fill(1);
        }
        let shape = (batch.len(), t);
        Ok((Tensor::from_vec(ids, shape, &self.device)?, Tensor::from_vec(mask, shape, &self.device)?))
    }

    /// Last hidden state (b, t, hidden) of a padded batch.
    pub fn forward(&self, batch: &[&TokenizedText], mode: ForwardMode) -> Result<Tensor, EncoderError> {
        let (ids, mask) = self.batch_tensors(batch)?;
        Ok(self.model.forward(&ids, &mask, mode)?)
    }

    /// Last hidden state (b, t, hidden) of a batch padded to its longest text, from the
    /// inference pass when this encoder has one (padding rows are zero), else from the
    /// candle model in inference mode. For callers that want a tensor (the baseline's
    /// classifier heads).
    pub fn hidden_states(&self, batch: &[&TokenizedText]) -> Result<Tensor, EncoderError> {
        if self.inference.is_none() {
            return self.forward(batch, ForwardMode::Inference);
        }
        let (dim, t) = (self.info.hidden_size, batch.iter().map(|x| x.len()).max().unwrap_or(0));
        let ids: Vec<&[u32]> = batch.iter().map(|x| x.ids.as_slice()).collect();
        let mut padded = vec![0f32; batch.len() * t * dim];
        for (row, rows) in self.forward_per_text(&ids)?.iter().enumerate() {
            padded[row * t * dim..row * t * dim + rows.len()].copy_from_slice(rows);
        }
        Ok(Tensor::from_vec(padded, (batch.len(), t, dim), &self.device)?)
    }

    /// The inference pass over texts given as token ids: per text, (tokens × hidden)
    /// rows; in an ensemble each token's row is the members' vectors side by side.
    fn forward_per_text(&self, ids: &[&[u32]]) -> Result<Vec<Vec<f32>>, EncoderError> {
        Ok(self.forward_per_text_tapped(ids)?.into_iter().map(|(rows, _)| rows).collect())
    }

    /// [`Encoder::forward_per_text`] with the states of [`Encoder::set_tap_layer`]
    /// (never set on an ensemble).
    fn forward_per_text_tapped(&self, ids: &[&[u32]]) -> Result<Vec<(Vec<f32>, Option<Vec<f32>>)>, EncoderError> {
        let model = self.inference.as_ref().expect("called on encoders loaded for inference only");
        if self.members.is_empty() {
            return Ok(model.forward_per_text_tapped(ids, self.tap)?);
        }
        let own = model.forward_per_text(ids)?;
        let theirs: Vec<Vec<Vec<f32>>> = self.members.iter().map(|m| m.forward_per_text(ids)).collect::<Result<_, _>>()?;
        let widths: Vec<usize> = std::iter::once(self.own_dim).chain(self.members.iter().map(|m| m.info.hidden_size)).collect();
        Ok(own
            .into_iter()
            .enumerate()
            .map(|(text, first)| {
                let parts: Vec<&[f32]> = std::iter::once(first.as_slice()).chain(theirs.iter().map(|t| t[text].as_slice())).collect();
                (ensemble::interleave(&parts, &widths), None)
            })
            .collect())
    }

    /// Encodes texts in batches of `batch_size`; the output keeps the input order. (The
    /// candle path groups texts by length so that little padding is computed; the
    /// inference path computes no padding at all.)
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Vec<EncodedText>, EncoderError> {
        let tokenized = self.tokenize_all(texts)?;
        self.encode_tokenized(tokenized, batch_size)
    }

    pub fn encode_tokenized(&self, tokenized: Vec<TokenizedText>, batch_size: usize) -> Result<Vec<EncodedText>, EncoderError> {
        let dim = self.info.hidden_size;
        let mut order: Vec<usize> = (0..tokenized.len()).collect();
        order.sort_by_key(|&i| tokenized[i].len());
        let mut hidden: Vec<Option<Vec<f32>>> = vec![None; tokenized.len()];
        let mut tapped: Vec<Option<Vec<f32>>> = vec![None; tokenized.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            if self.inference.is_some() {
                let ids: Vec<&[u32]> = chunk.iter().map(|&i| tokenized[i].ids.as_slice()).collect();
                for (&i, (rows, tap)) in chunk.iter().zip(self.forward_per_text_tapped(&ids)?) {
                    hidden[i] = Some(rows);
                    tapped[i] = tap;
                }
                continue;
            }
            let batch: Vec<&TokenizedText> = chunk.iter().map(|&i| &tokenized[i]).collect();
            let (ids, mask) = self.batch_tensors(&batch)?;
            let (out, tap) = self.model.forward_tapped(&ids, &mask, ForwardMode::Inference, self.tap)?;
            let t = out.dim(1)?;
            let flat = out.flatten_all()?.to_vec1::<f32>()?;
            let tap_flat = tap.map(|x| x.flatten_all()?.to_vec1::<f32>()).transpose()?;
            for (row, &i) in chunk.iter().enumerate() {
                let rows = row * t * dim..(row * t + tokenized[i].len()) * dim;
                hidden[i] = Some(flat[rows.clone()].to_vec());
                tapped[i] = tap_flat.as_ref().map(|x| x[rows].to_vec());
            }
        }
        let tap_layer = self.tap;
        Ok(tokenized
            .into_iter()
            .zip(hidden)
            .zip(tapped)
            .map(|((tokens, hidden), tapped)| EncodedText {
                tokens,
                hidden: hidden.unwrap_or_default(),
                dim,
                tapped: tap_layer.zip(tapped).map(|(layer, hidden)| Tapped { layer, hidden }),
            })
            .collect())
    }
}
