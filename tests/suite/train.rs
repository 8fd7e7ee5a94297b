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
    drop(data);
    assert!(vars.len() >= 100, "expected all ~100 BERT tensors as variables, got {}", vars.len());
    let mut missing = Vec::new();
    for (name, _) in &names {
        let var = t.varmap.data().lock().unwrap()[name].clone();
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                // The position rows beyond the input length legitimately get zero; check the whole tensor.
                if !(norm > 0.0) {
                    missing.push(format!("{name}: zero gradient"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "weights without gradient: {missing:#?}");

    let mut opt = AdamW::new(vars, ParamsAdamW { lr: 1e-3, ..Default::default() }).unwrap();
    opt.step(&grads).unwrap();
    let mut unmoved = Vec::new();
    for (name, before) in &names {
        let after = t.varmap.data().lock().unwrap()[name].as_tensor().clone();
        let delta = (after - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        if !(delta > 0.0) {
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
