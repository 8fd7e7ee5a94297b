//! Gradients reach every trainable weight, and one optimizer step moves each of them.

use candle_core::{Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use nearspan::encoder::TokenizedText;
use nearspan::train::{ForwardMode, TrainableEncoder};

use crate::common::model_dir;

/// A loss on the encoder output that depends on every position and every hidden unit.
fn toy_loss(t: &TrainableEncoder, texts: &[&str], mode: ForwardMode) -> Tensor {
    let tok: Vec<TokenizedText> = t.encoder.tokenize_all(texts).unwrap();
    let batch: Vec<&TokenizedText> = tok.iter().collect();
    let hidden = t.encoder.forward(&batch, mode).unwrap(); // (b, t, h)
    // Contrast the two sentences' mean vectors through a softmax (as the span loss does).
    let pooled = hidden.mean(1).unwrap(); // (b, h)
    let sims = pooled.matmul(&pooled.t().unwrap()).unwrap(); // (b, b)
    let logp = candle_nn::ops::log_softmax(&sims, D::Minus1).unwrap();
    (logp.sum_all().unwrap().neg().unwrap() + hidden.sqr().unwrap().mean_all().unwrap()).unwrap()
}

#[test]
fn every_encoder_weight_gets_a_gradient_and_moves_after_one_step() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let texts = ["book a table for two at seven", "play some jazz in the kitchen"];
    let loss = toy_loss(&t, &texts, ForwardMode::Train { dropout: 0.0 });
    let grads = loss.backward().unwrap();
    let vars = t.varmap.all_vars();
    let data = t.varmap.data().lock().unwrap();
    let names: Vec<(String, Tensor)> = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap())).collect();
    let missing = crate::common::weights_without_gradient(data.iter().map(|(k, v)| (k.as_str(), v)), &grads);
    drop(data);
    assert!(vars.len() >= 100, "expected all ~100 BERT tensors as variables, got {}", vars.len());
    assert!(missing.is_empty(), "weights without gradient: {missing:#?}");

    let mut opt = AdamW::new(vars, ParamsAdamW { lr: 1e-3, ..Default::default() }).unwrap();
    opt.step(&grads).unwrap();
    let mut unmoved = Vec::new();
    for (name, before) in &names {
        let after = t.varmap.data().lock().unwrap()[name].as_tensor().clone();
        let delta = (after - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        if !(delta > 0.0) && !crate::common::gradient_vanishes_exactly(name) {
            unmoved.push(name.clone());
        }
    }
    assert!(unmoved.is_empty(), "weights that did not move: {unmoved:?}");
}

/// The fused inference path has no backward: this is the trap the Train mode avoids.
#[test]
fn inference_mode_blocks_gradients_train_mode_does_not() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let texts = ["turn on the lights", "what is the weather"];
    let ln_weight = t.varmap.data().lock().unwrap()["encoder.layer.0.output.LayerNorm.weight"].clone();
    let g_inf = toy_loss(&t, &texts, ForwardMode::Inference).backward().unwrap();
    assert!(g_inf.get(ln_weight.as_tensor()).is_none(), "fused layer norm unexpectedly has a backward");
    let g_train = toy_loss(&t, &texts, ForwardMode::Train { dropout: 0.0 }).backward().unwrap();
    assert!(g_train.get(ln_weight.as_tensor()).is_some());
}

/// Train mode without dropout computes the same function as inference mode.
#[test]
fn train_mode_without_dropout_matches_inference() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let texts = ["set the thermostat to 21 degrees"];
    let a = toy_loss(&t, &texts, ForwardMode::Inference).to_scalar::<f32>().unwrap();
    let b = toy_loss(&t, &texts, ForwardMode::Train { dropout: 0.0 }).to_scalar::<f32>().unwrap();
    assert!((a - b).abs() < 1e-3 * a.abs().max(1.0), "{a} vs {b}");
}

/// The variables hold the real weights (not their zero initialisation).
#[test]
fn trainable_encoder_loads_the_same_weights_as_inference() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let text = "play daft punk in the living room";
    let a = &t.encoder.encode(&[text], 1).unwrap()[0];
    let b = &crate::common::encoder().encode(&[text], 1).unwrap()[0];
    let err = a.hidden.iter().zip(&b.hidden).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(err < 1e-5, "max abs diff {err}");
}

/// The fused training ops compute the inference function token by token, padding
/// included: a batch of texts of different lengths, so the attention mask matters.
#[test]
fn train_mode_without_dropout_matches_inference_on_a_padded_batch() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let texts = ["play jazz", "add this song to my evening playlist called quiet hours", "what is the weather in paris"];
    let tok: Vec<TokenizedText> = t.encoder.tokenize_all(&texts).unwrap();
    let batch: Vec<&TokenizedText> = tok.iter().collect();
    let a = t.encoder.forward(&batch, ForwardMode::Inference).unwrap();
    let b = t.encoder.forward(&batch, ForwardMode::Train { dropout: 0.0 }).unwrap();
    assert_eq!(a.dims(), b.dims());
    // Compare the real tokens only (padding rows are computed but meaningless).
    for (row, item) in tok.iter().enumerate() {
        let (x, y) = (a.get(row).unwrap().narrow(0, 0, item.len()).unwrap(), b.get(row).unwrap().narrow(0, 0, item.len()).unwrap());
        let err = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-4, "text {row}: max abs diff {err}");
    }
}

/// The analytic gradients of the fused ops, through the whole model, against central
/// finite differences of the loss, for weights that each op's backward produces: the
/// word embeddings (index_select), a layer norm, the stacked query weights and value
/// bias (attention), the feed-forward bias (bias + GELU) and the output bias (bias +
/// dropout + residual). f32 and a step of 1e-2: agreement to a few percent is expected
/// where the gradient is large, so each check takes the largest entry of its tensor.
#[test]
fn train_mode_gradients_match_finite_differences() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let texts = ["book a table for two at seven", "play some jazz"];
    let mode = ForwardMode::Train { dropout: 0.0 };
    let grads = toy_loss(&t, &texts, mode).backward().unwrap();
    for name in [
        "embeddings.word_embeddings.weight",
        "encoder.layer.1.attention.output.LayerNorm.weight",
        "encoder.layer.2.attention.self.query.weight",
        "encoder.layer.3.attention.self.value.bias",
        "encoder.layer.4.intermediate.dense.bias",
        "encoder.layer.5.output.dense.bias",
    ] {
        let var = t.varmap.data().lock().unwrap()[name].clone();
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Skip the [PAD] row of the word embeddings (the first 384 entries): it only feeds
        // the padding positions, where the loss is too curved for a step of 1e-2.
        let skip = if name.starts_with("embeddings.word") { 384 } else { 0 };
        let (i, &gi) = g.iter().enumerate().skip(skip).max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let original = var.as_tensor().copy().unwrap();
        let h = 1e-2f32;
        let loss_at = |delta: f32| -> f32 {
            let mut w = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            w[i] += delta;
            var.set(&Tensor::from_vec(w, original.shape(), original.device()).unwrap()).unwrap();
            toy_loss(&t, &texts, mode).to_scalar::<f32>().unwrap()
        };
        let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h);
        var.set(&original).unwrap();
        assert!(
            (numeric - gi).abs() <= 0.05 * gi.abs() + 1e-3,
            "{name}[{i}]: analytic {gi}, finite differences {numeric}"
        );
    }
}

/// Dropout in training mode: each pass draws a new mask, and gradients still reach the
/// weights through it.
#[test]
fn train_mode_dropout_draws_new_masks_and_keeps_gradients() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let texts = ["turn off the kitchen lights", "remind me to call mom"];
    let mode = ForwardMode::Train { dropout: 0.1 };
    let (a, b) = (toy_loss(&t, &texts, mode), toy_loss(&t, &texts, mode));
    let clean = toy_loss(&t, &texts, ForwardMode::Train { dropout: 0.0 }).to_scalar::<f32>().unwrap();
    let (a_v, b_v) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert!(a_v != b_v && a_v != clean, "dropout did not change the loss: {a_v} {b_v} {clean}");
    let grads = a.backward().unwrap();
    let w = t.varmap.data().lock().unwrap()["encoder.layer.0.attention.self.query.weight"].clone();
    let norm = grads.get(w.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(norm > 0.0);
}

