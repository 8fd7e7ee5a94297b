//! Training: the encoder with its weights as variables, so that gradients reach them.
//!
//! Forward passes for training must use [`ForwardMode::Train`]: candle-nn's fused
//! softmax and layer norm have no backward, and gradients would silently stop there.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use crate::encoder::{Encoder, EncoderError};

pub use crate::encoder::ForwardMode;

/// An encoder whose weights live in a [`VarMap`] (for the optimizer and for saving).
pub struct TrainableEncoder {
    pub encoder: Encoder,
    pub varmap: VarMap,
}

impl TrainableEncoder {
    /// Loads `dir` with every weight as a trainable variable.
    pub fn load(dir: &Path) -> Result<Self, EncoderError> {
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let encoder = Encoder::load_with(dir, vb)?;
        let weights = dir.join("model.safetensors");
        varmap.load(&weights).map_err(|source| EncoderError::Weights { path: weights.clone(), source })?;
        Ok(Self { encoder, varmap })
    }
}
