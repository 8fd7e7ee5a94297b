//! Training runs end to end: the retriever objective reaches every weight, a killed run
//! resumes to exactly the weights of an uninterrupted one, and bad resumes are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use nearspan::train::retriever::{LabelScope, RetrieverLoss, RetrieverObjective};
use nearspan::train::rng::Rng;
use nearspan::train::{Objective, TrainableEncoder};

use crate::common::model_dir;

fn smarthome() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/smarthome.jsonl"))
}

#[test]
fn retriever_loss_reaches_every_encoder_weight() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let examples = nearspan::data::read_jsonl(&smarthome()).unwrap();
    // With `O` spans as anchors (the default) and as competitors only.
    for o_anchors in [true, false] {
        let loss_cfg = RetrieverLoss { dropout: 0.0, o_anchors, ..Default::default() };
        let objective = RetrieverObjective::new(&t.encoder, examples.clone(), loss_cfg, 8).unwrap();
        let plan = objective.plan_epoch(&mut Rng::new(1));
        let (loss, tokens) = objective.loss(&plan[0], &mut Rng::new(2)).unwrap();
        assert!(tokens > 0);
        let value = loss.to_scalar::<f32>().unwrap();
        assert!(value.is_finite() && value > 0.0, "loss {value} (o_anchors {o_anchors})");
        let grads = loss.backward().unwrap();
        let data = t.varmap.data().lock().unwrap();
        assert!(data.len() >= 100);
        let without = crate::common::weights_without_gradient(data.iter().map(|(k, v)| (k.as_str(), v)), &grads);
        assert!(without.is_empty(), "weights without gradient (o_anchors {o_anchors}): {without:?}");
    }
}

#[test]
fn label_scope_intent_splits_a_shared_slot_name_per_intent() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let examples = nearspan::data::read_jsonl(&smarthome()).unwrap();
    let labels = |label_scope| {
        let loss_cfg = RetrieverLoss { label_scope, ..Default::default() };
        RetrieverObjective::new(&t.encoder, examples.clone(), loss_cfg, 8).unwrap().slot_labels()
    };
    // smarthome: 7 slot names; room in 4 intents, device in 5, time in 3; plus O.
    assert_eq!(labels(LabelScope::Shared), 8);
    assert_eq!(labels(LabelScope::Intent), 8 + 3 + 4 + 2);
}

#[test]
fn layer_decay_outside_its_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "1.5", "NaN"] {
        let out = train_cmd(&dir.path().join("run"), &["--layer-decay", bad]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--layer-decay must be in (0, 1]"), "{bad}: {err}");
    }
}

fn train_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nearspan"));
    c.args(["train", "retriever", "--data"])
        .arg(smarthome())
        .arg("--out")
        .arg(out)
        .args(["--max-steps", "6", "--batch-size", "8", "--dropout", "0.1", "--lr", "1e-4", "--seed", "3"])
        .args(extra)
        .env("NEARSPAN_MODEL", std::fs::canonicalize(model_dir()).unwrap())
        .env_remove("RUST_LOG");
    c
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap()
}

/// Largest difference over the tensors both hold (at least all ~100 of the encoder's).
fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    let common: Vec<&String> = a.keys().filter(|k| b.contains_key(*k)).collect();
    assert!(common.len() >= 100, "only {} tensors in common", common.len());
    common
        .into_iter()
        .map(|k| (&a[k] - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
        .fold(0.0, f32::max)
}

/// With dropout on: masks are seeded per step, so they too are the same after a resume.
#[test]
fn killed_training_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    let whole = train_cmd(&a, &["--checkpoint-every", "0"]).output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));

    // Kill -9 the second run as soon as it has written its first checkpoint.
    let mut child = train_cmd(&b, &["--checkpoint-every", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let latest = b.join("checkpoints/latest");
    let started = Instant::now();
    while !latest.exists() {
        assert!(child.try_wait().unwrap().is_none(), "training ended before its first checkpoint");
        assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = std::fs::read_to_string(&latest).unwrap();
    assert_ne!(killed_at.trim(), "step-0000006", "the run finished before it was killed; nothing was resumed");
    assert!(!b.join("model").exists() || killed_at.trim() != "step-0000006");

    // Starting over in the same folder is refused; resuming with other settings too.
    let again = train_cmd(&b, &["--checkpoint-every", "1"]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"), "{}", String::from_utf8_lossy(&again.stderr));
    let other = train_cmd(&b, &["--checkpoint-every", "1", "--resume", "--scale", "10"]).output().unwrap();
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("cannot resume"), "{}", String::from_utf8_lossy(&other.stderr));

    let resumed = train_cmd(&b, &["--checkpoint-every", "1", "--resume"]).output().unwrap();
    let said = String::from_utf8_lossy(&resumed.stdout).into_owned();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(said.contains("resumed at step"), "{said}");

    let diff = max_diff(&weights(&a.join("model")), &weights(&b.join("model")));
    assert!(diff < 1e-5, "resumed weights differ from the uninterrupted run's by {diff}");
    // And training did change them.
    let base = candle_core::safetensors::load(model_dir().join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let moved = max_diff(&base, &weights(&a.join("model")));
    assert!(moved > 1e-4, "weights did not move ({moved})");
    // Only the newest two checkpoints are kept.
    let kept = std::fs::read_dir(b.join("checkpoints")).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
    assert_eq!(kept, 2);
}
