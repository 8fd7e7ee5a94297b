//! AdamW with decoupled weight decay, a warmup + linear-decay learning rate, and
//! gradient clipping by global norm.
//!
//! Our own rather than `candle_nn::AdamW`: a checkpoint must hold the optimizer's
//! moments so that `--resume` continues the same run, and candle's keeps them private.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// AdamW's hyper-parameters (defaults as in BERT fine-tuning).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay: encoder layer `i` of `n` trains at
    /// `layer_decay^(n - 1 - i)` times the rate, the embeddings at `layer_decay^n`, all
    /// else (heads) at the full rate. 1: every weight at the same rate.
    #[serde(default = "no_layer_decay")]
    pub layer_decay: f64,
}

fn no_layer_decay() -> f64 {
    1.0
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, layer_decay: 1.0 }
    }
}

/// One trainable tensor and its two moment estimates (flat, in the tensor's order).
struct Slot {
    name: String,
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Biases and layer-norm weights are not decayed (as in BERT).
    decay: bool,
    /// This tensor's share of the learning rate (layer-wise decay).
    lr_scale: f64,
}

pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
    /// Steps taken so far (bias correction uses it).
    steps: u64,
}

/// Where a weight sits in a BERT encoder, from its name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Depth {
    Embeddings,
    Layer(usize),
    /// Heads and anything else outside the encoder.
    Top,
}

fn depth(name: &str) -> Depth {
    if let Some(i) = name.find("encoder.layer.") {
        let rest = &name[i + "encoder.layer.".len()..];
        if let Ok(n) = rest.split('.').next().unwrap_or("").parse() {
            return Depth::Layer(n);
        }
    }
    if name.starts_with("embeddings.") || name.contains(".embeddings.") {
        return Depth::Embeddings;
    }
    Depth::Top
}

/// Each name's learning-rate factor under layer-wise decay `decay`.
fn lr_scales<'a>(names: impl Iterator<Item = &'a str> + Clone, decay: f64) -> Vec<f64> {
    let layers = names.clone().filter_map(|n| match depth(n) {
        Depth::Layer(i) => Some(i + 1),
        _ => None,
    });
    let n = layers.max().unwrap_or(0) as i32;
    names
        .map(|name| match depth(name) {
            Depth::Layer(i) => decay.powi(n - 1 - i as i32),
            Depth::Embeddings => decay.powi(n),
            Depth::Top => 1.0,
        })
        .collect()
}

/// Whether a weight should be decayed: not biases, not layer norms.
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm"))
}

/// The AdamW update of one tensor, applied in place to its storage: one pass over
/// weights, gradient and moments, where the same update in tensor ops would allocate
/// a dozen temporaries the size of the model.
struct Update<'a> {
    grad: &'a [f32],
    moments: std::sync::Mutex<(&'a mut [f32], &'a mut [f32])>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    /// 1 / (1 - beta^t)
    correct1: f32,
    correct2: f32,
    eps: f32,
    /// 1 - lr × weight decay (1 for undecayed tensors).
    keep: f32,
    grad_scale: f32,
}

impl candle_core::InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<()> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("AdamW expects f32 weights");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW expects contiguous weights");
        };
        let theta = &mut data[start..end];
        let mut guard = self.moments.lock().expect("moments lock");
        let (m, v) = &mut *guard;
        if theta.len() != self.grad.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!("AdamW: weight, gradient and moments differ in size");
        }
        const CHUNK: usize = 1 << 14;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(self.grad.par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| {
                for i in 0..w.len() {
                    let g = g[i] * self.grad_scale;
                    m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g;
                    v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g * g;
                    let update = (m[i] * self.correct1) / ((v[i] * self.correct2).sqrt() + self.eps);
                    w[i] = w[i] * self.keep - self.lr * update;
                }
            });
        Ok(())
    }
}

impl AdamW {
    /// `vars`: (name, variable), e.g. from a `VarMap`; names key the saved state.
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let scales = lr_scales(vars.iter().map(|(name, _)| name.as_str()), config.layer_decay);
        let slots = vars
            .into_iter()
            .zip(scales)
            .map(|((name, var), lr_scale)| {
                let n = var.as_tensor().elem_count();
                Slot { decay: decays(&name), name, m: vec![0.0; n], v: vec![0.0; n], var, lr_scale }
            })
            .collect();
        Ok(Self { slots, config, steps: 0 })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update at learning rate `lr`, the gradients first clipped to a global L2
    /// norm of at most `max_norm` (0: no clipping). Variables without a gradient this
    /// step are left alone. Returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64, max_norm: f64) -> Result<f64> {
        let flat: Vec<Option<Vec<f32>>> = self
            .slots
            .iter()
            .map(|s| grads.get(s.var.as_tensor()).map(|g| g.flatten_all()?.to_vec1::<f32>()).transpose())
            .collect::<Result<_>>()?;
        let norm = flat.iter().flatten().map(|g| g.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>()).sum::<f64>().sqrt();
        let grad_scale = clip_scale(norm, max_norm);
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        for (s, g) in self.slots.iter_mut().zip(&flat) {
            let Some(g) = g else { continue };
            let lr = lr * s.lr_scale;
            let op = Update {
                grad: g,
                moments: std::sync::Mutex::new((&mut s.m, &mut s.v)),
                lr: lr as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                correct1: (1.0 / (1.0 - c.beta1.powi(t))) as f32,
                correct2: (1.0 / (1.0 - c.beta2.powi(t))) as f32,
                eps: c.eps as f32,
                keep: if s.decay { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 },
                grad_scale: grad_scale as f32,
            };
            s.var.as_tensor().inplace_op1(&op)?;
        }
        Ok(norm)
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`), for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            let shape = s.var.as_tensor().shape().clone();
            let dev = s.var.as_tensor().device();
            out.insert(format!("m.{}", s.name), Tensor::from_slice(&s.m, shape.clone(), dev)?);
            out.insert(format!("v.{}", s.name), Tensor::from_slice(&s.v, shape, dev)?);
        }
        Ok(out)
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors) after `steps` steps.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, steps: u64) -> std::result::Result<(), String> {
        for s in &mut self.slots {
            let dims = s.var.as_tensor().dims().to_vec();
            for (key, dst) in [(format!("m.{}", s.name), &mut s.m), (format!("v.{}", s.name), &mut s.v)] {
                let t = tensors.remove(&key).ok_or_else(|| format!("optimizer state has no tensor {key}"))?;
                if t.dims() != dims.as_slice() {
                    return Err(format!("optimizer tensor {key} has shape {:?}, the model needs {dims:?}", t.dims()));
                }
                *dst = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| format!("optimizer tensor {key}: {e}"))?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Learning rate: linear warmup from 0 to `peak` over `warmup` steps, then linear
/// decay to 0 at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// The rate for step `step` (0-based: the first update uses `lr(0)`).
    pub fn lr(&self, step: u64) -> f64 {
        let s = step as f64 + 1.0;
        if step < self.warmup {
            return self.peak * s / self.warmup as f64;
        }
        let left = self.total.saturating_sub(self.warmup).max(1) as f64;
        self.peak * ((self.total as f64 - step as f64) / left).clamp(0.0, 1.0)
    }
}

/// The factor that brings the gradient norm to at most `max_norm` (1.0 when it already is).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let s = Schedule { peak: 1.0, warmup: 4, total: 12 };
        let lrs: Vec<f64> = (0..12).map(|i| s.lr(i)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!((lrs[4] - 1.0).abs() < 1e-12);
        assert!(lrs.windows(2).skip(4).all(|w| w[1] < w[0]), "{lrs:?}");
        assert!(lrs[11] > 0.0 && s.lr(12) == 0.0);
    }

    #[test]
    fn layer_decay_scales_the_rate_by_depth() {
        let names = [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.1.output.dense.bias",
            "encoder.layer.2.output.LayerNorm.weight",
            "slot_head.weight",
        ];
        let got = lr_scales(names.iter().copied(), 0.5);
        assert_eq!(got, [0.125, 0.25, 0.5, 1.0, 1.0]);
        assert!(lr_scales(names.iter().copied(), 1.0).iter().all(|&x| x == 1.0));
        // Layer numbers are read as numbers: layer 10 is above layer 9.
        let deep = ["encoder.layer.9.x", "encoder.layer.10.x", "encoder.layer.11.x"];
        assert_eq!(lr_scales(deep.iter().copied(), 0.5), [0.25, 0.5, 1.0]);
    }

    /// With layer decay d, the first AdamW step of a lower layer moves it d times as far
    /// as the layer above (the first step's size is the rate, whatever the gradient).
    #[test]
    fn layer_decay_moves_lower_layers_less() {
        let dev = Device::Cpu;
        let low = Var::new(&[1.0f32], &dev).unwrap();
        let high = Var::new(&[1.0f32], &dev).unwrap();
        let cfg = AdamWConfig { weight_decay: 0.0, layer_decay: 0.5, ..Default::default() };
        let vars = vec![("encoder.layer.0.w.weight".into(), low.clone()), ("encoder.layer.1.w.weight".into(), high.clone())];
        let mut opt = AdamW::new(vars, cfg).unwrap();
        let loss = (low.as_tensor() + high.as_tensor()).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 0.1, 0.0).unwrap();
        let moved = |v: &Var| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((moved(&high) - 0.1).abs() < 1e-5, "{}", moved(&high));
        assert!((moved(&low) - 0.05).abs() < 1e-5, "{}", moved(&low));
    }

    #[test]
    fn clip_scale_only_shrinks() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_scale(4.0, 0.0), 1.0);
    }

    /// Against AdamW written out by hand for two steps of a scalar problem.
    #[test]
    fn adamw_matches_the_formula() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let b = Var::new(&[0.5f32], &dev).unwrap();
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())], cfg).unwrap();
        let (mut m, mut v, mut x) = ([0f64; 2], [0f64; 2], [1.0f64, -2.0]);
        for step in 1..=2 {
            // loss = sum(w^2) + 3 b
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() + (b.as_tensor() * 3.0).unwrap().sum_all().unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1, 0.0).unwrap();
            for i in 0..2 {
                let g = 2.0 * x[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let upd = (m[i] / (1.0 - 0.9f64.powi(step))) / ((v[i] / (1.0 - 0.999f64.powi(step))).sqrt() + 1e-8);
                x[i] = x[i] * (1.0 - 0.1 * 0.1) - 0.1 * upd;
            }
        }
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - x[i]).abs() < 1e-5, "{got:?} vs {x:?}");
        }
        // The bias is not decayed: two Adam steps of size lr on a constant gradient.
        let bb = b.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((bb - (0.5 - 0.2)).abs() < 1e-5, "{bb}");
    }

    #[test]
    fn state_round_trips_and_rejects_a_wrong_shape() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
        let grads = w.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(&grads, 0.01, 0.0).unwrap();
        let saved = opt.state_tensors().unwrap();
        let mut other = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
        other.load_state(saved.clone(), 1).unwrap();
        assert_eq!(other.state_tensors().unwrap()["m.w"].to_vec1::<f32>().unwrap(), saved["m.w"].to_vec1::<f32>().unwrap());
        let mut bad = saved;
        bad.insert("v.w".into(), Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap());
        assert!(other.load_state(bad, 1).unwrap_err().contains("v.w"));
    }
}
