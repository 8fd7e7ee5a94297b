//! The fine-tuned baseline (`nearspan::train::baseline`) on the real model: gradients reach
//! every weight (encoder and heads), a tiny training run overfits and its saved folder
//! loads back to the same predictions, heads can be replaced for a new label set, and
//! bad folders and labels are clear errors.

use std::time::Instant;

use candle_core::Tensor;
use nearspan::data::Example;
use nearspan::encoder::Encoder;
use nearspan::labeler::Prediction;
use nearspan::train::baseline::{JointLabels, JointModel, JointObjective, LABELS_FILE};
use nearspan::train::optim::{AdamW, AdamWConfig};
use nearspan::train::rng::Rng;
use nearspan::train::{self, Objective, Observer, RunPaths, StepReport, TrainConfig, TrainableEncoder};

use crate::common::{encoder, model_dir};

fn ex(text: &str, tags: &[&str], intent: &str) -> Example {
    let words: Vec<&str> = text.split(' ').collect();
    Example::from_words(&words, tags, Some(intent.to_string())).unwrap()
}

/// Two intents, two slot labels (one of them with a two-word slot), short texts: one
/// batch of 8. At lr 1e-3 the loss falls from ~2.3 to ~0.01 in about 8 steps.
fn tiny() -> Vec<Example> {
    vec![
        ex("play adele", &["O", "B-artist"], "play_music"),
        ex("play some coldplay", &["O", "O", "B-artist"], "play_music"),
        ex("put on metallica please", &["O", "O", "B-artist", "O"], "play_music"),
        ex("play music by queen", &["O", "O", "O", "B-artist"], "play_music"),
        ex("wake me at seven", &["O", "O", "O", "B-time"], "set_alarm"),
        ex("set an alarm for noon", &["O", "O", "O", "O", "B-time"], "set_alarm"),
        ex("alarm at six thirty", &["O", "O", "B-time", "I-time"], "set_alarm"),
        ex("wake me up at five", &["O", "O", "O", "O", "B-time"], "set_alarm"),
    ]
}

/// Named copies of every variable's current value.
fn snapshot(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var, Tensor)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone(), v.as_tensor().copy().unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn every_weight_and_both_heads_get_a_gradient_and_move_after_one_step() {
    let t = TrainableEncoder::load(&model_dir()).unwrap();
    let examples = tiny();
    let model = JointModel::new(&t.encoder, &t.varmap, JointLabels::from_examples(&examples)).unwrap();
    let objective = JointObjective::new(&model, examples, 8, 0.0).unwrap();
    let (loss, tokens) = objective.loss(&[0, 4, 6], &mut Rng::new(1)).unwrap();
    assert!(tokens > 0);
    assert!(loss.to_scalar::<f32>().unwrap() > 0.0);
    let grads = loss.backward().unwrap();

    let vars = snapshot(&t.varmap);
    let names: Vec<&str> = vars.iter().map(|v| v.0.as_str()).collect();
    for head in ["intent_classifier.weight", "intent_classifier.bias", "slot_classifier.weight", "slot_classifier.bias"] {
        assert!(names.contains(&head), "{head} is not a variable of the encoder's VarMap: {names:?}");
    }
    assert!(vars.len() >= 104, "expected ~100 encoder tensors and 4 head tensors, got {}", vars.len());
    let missing = crate::common::weights_without_gradient(vars.iter().map(|(n, v, _)| (n.as_str(), v)), &grads);
    assert!(missing.is_empty(), "weights without gradient: {missing:#?}");

    let named: Vec<(String, candle_core::Var)> = vars.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect();
    let mut opt = AdamW::new(named, AdamWConfig::default()).unwrap();
    opt.step(&grads, 1e-3, 1.0).unwrap();
    let unmoved: Vec<&str> = vars
        .iter()
        .filter(|(name, var, before)| {
            let delta = (var.as_tensor() - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            !(delta > 0.0) && !crate::common::gradient_vanishes_exactly(name)
        })
        .map(|v| v.0.as_str())
        .collect();
    assert!(unmoved.is_empty(), "weights that did not move: {unmoved:?}");
}

/// Records every step's loss.
#[derive(Default)]
struct Losses(Vec<f32>);

impl Observer for Losses {
    fn step(&mut self, r: &StepReport) {
        self.0.push(r.loss);
    }
}

/// (intent, [(label, word_start, word_end)]) of each prediction.
fn frames(preds: &[Prediction]) -> Vec<(String, Vec<(String, usize, usize)>)> {
    preds
        .iter()
        .map(|p| {
            let intent = p.intent.as_ref().map(|i| i.label.clone()).unwrap_or_default();
            (intent, p.slots.iter().map(|s| (s.label.clone(), s.words.0, s.words.1)).collect())
        })
        .collect()
}

fn gold_frames(examples: &[Example]) -> Vec<(String, Vec<(String, usize, usize)>)> {
    examples
        .iter()
        .map(|e| {
            let intent = e.intent.clone().unwrap_or_default();
            (intent, e.spans.iter().map(|s| (s.label.clone(), s.word_start, s.word_end)).collect())
        })
        .collect()
}

#[test]
fn tiny_run_overfits_and_the_saved_folder_predicts_the_same() {
    let started = Instant::now();
    let base = model_dir();
    let t = TrainableEncoder::load(&base).unwrap();
    let examples = tiny();
    let model = JointModel::new(&t.encoder, &t.varmap, JointLabels::from_examples(&examples)).unwrap();
    let objective = JointObjective::new(&model, examples.clone(), 8, 0.1).unwrap();
    let out = tempfile::tempdir().unwrap();
    let paths = RunPaths { base_dir: &base, out: out.path() };
    let config = TrainConfig { max_steps: Some(12), lr: 1e-3, checkpoint_every: 0, ..Default::default() };
    let mut losses = Losses::default();
    let summary = train::train(
        &objective,
        &t.varmap,
        &paths,
        &config,
        objective.settings_json(),
        objective.data_fingerprint(),
        vec![(LABELS_FILE, model.labels_json())],
        &mut |_| Ok(None),
        &mut losses,
        false,
    )
    .unwrap();
    assert_eq!(summary.state.step, 12);
    let l = &losses.0;
    assert_eq!(l.len(), 12);
    let first = l[..3].iter().sum::<f32>() / 3.0;
    let last = l[l.len() - 3..].iter().sum::<f32>() / 3.0;
    assert!(last < 0.25 * first, "the loss did not drop: {l:?}");

    let preds = model.predict(&examples, 4).unwrap();
    assert_eq!(frames(&preds), gold_frames(&examples), "losses {l:?}");
    for (p, e) in preds.iter().zip(&examples) {
        assert_eq!(p.text, e.text);
        let intent = p.intent.as_ref().unwrap();
        assert!(intent.score > 0.5 && intent.score <= 1.0, "{intent:?}");
        assert!(intent.neighbours.is_empty());
        for s in &p.slots {
            assert!(s.score > 0.5 && s.score <= 1.0, "{s:?}");
            assert_eq!(s.text, e.text.split(' ').collect::<Vec<_>>()[s.words.0..s.words.1].join(" "));
        }
    }

    let dir = out.path().join("model");
    assert!(dir.join(LABELS_FILE).is_file());
    let saved = Encoder::load(&dir).unwrap();
    let loaded = JointModel::load(&saved, &dir).unwrap();
    assert_eq!(loaded.labels(), model.labels());
    let again = loaded.predict(&examples, 3).unwrap();
    assert_eq!(frames(&again), frames(&preds));
    for (a, b) in again.iter().zip(&preds) {
        let (ia, ib) = (a.intent.as_ref().unwrap().score, b.intent.as_ref().unwrap().score);
        assert!((ia - ib).abs() < 1e-4, "{ia} vs {ib}");
        for (x, y) in a.slots.iter().zip(&b.slots) {
            assert!((x.score - y.score).abs() < 1e-4, "{x:?} vs {y:?}");
        }
    }
    eprintln!("baseline tiny run: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn new_heads_replace_the_old_ones_whatever_their_shape() {
    let enc = encoder();
    let varmap = candle_nn::VarMap::new();
    let labels = |intents: &[&str], slots: &[&str]| JointLabels {
        intents: intents.iter().map(|s| s.to_string()).collect(),
        slots: slots.iter().map(|s| s.to_string()).collect(),
    };
    let shape = |name: &str| varmap.data().lock().unwrap()[name].as_tensor().dims().to_vec();
    let a = JointModel::new(enc, &varmap, labels(&["a", "b"], &["x"])).unwrap();
    assert_eq!(shape("intent_classifier.weight"), [2, 384]);
    assert_eq!(shape("slot_classifier.weight"), [3, 384]);
    assert_eq!(a.labels().slots, ["x"]);
    let b = JointModel::with_new_heads(enc, &varmap, labels(&["a", "b", "c"], &["x", "y"])).unwrap();
    assert_eq!(shape("intent_classifier.weight"), [3, 384]);
    assert_eq!(shape("intent_classifier.bias"), [3]);
    assert_eq!(shape("slot_classifier.weight"), [5, 384]);
    assert_eq!(varmap.all_vars().len(), 4);
    // The new model predicts with its own label set.
    let p = b.predict(&[Example::from_text("wake me at seven", None)], 8).unwrap();
    assert!(["a", "b", "c"].contains(&p[0].intent.as_ref().unwrap().label.as_str()));
    // Slot-only labels: no intent head, no intent prediction.
    let c = JointModel::with_new_heads(enc, &varmap, labels(&[], &["x"])).unwrap();
    assert!(!varmap.data().lock().unwrap().contains_key("intent_classifier.weight"));
    assert!(c.predict(&[Example::from_text("hello there", None)], 8).unwrap()[0].intent.is_none());
}

#[test]
fn loading_a_folder_that_is_not_a_baseline_is_a_clear_error() {
    let enc = encoder();
    let err = JointModel::load(enc, &model_dir()).err().expect("an encoder-only folder is not a baseline").to_string();
    assert!(err.contains(LABELS_FILE) && err.contains("not a fine-tuned baseline"), "{err}");

    // Labels but no head tensors: the base model's files with a labels file beside them.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::os::unix::fs::symlink(model_dir().join(f).canonicalize().unwrap(), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join(LABELS_FILE), r#"{"intents": ["a"], "slots": ["x"]}"#).unwrap();
    let err = JointModel::load(enc, dir.path()).err().expect("no head tensors").to_string();
    assert!(err.contains("intent_classifier.weight") && err.contains("not a fine-tuned baseline"), "{err}");

    // A labels file that is not one.
    std::fs::write(dir.path().join(LABELS_FILE), r#"{"intent": ["a"]}"#).unwrap();
    let err = JointModel::load(enc, dir.path()).err().expect("bad labels file").to_string();
    assert!(err.contains(LABELS_FILE), "{err}");
}

#[test]
fn unknown_labels_at_objective_construction_are_named() {
    let enc = encoder();
    let varmap = candle_nn::VarMap::new();
    let examples = tiny();
    let model = JointModel::new(enc, &varmap, JointLabels::from_examples(&examples[..4])).unwrap();
    // Example 4 has the intent set_alarm and the slot label time, which examples 0..4 lack.
    let err = JointObjective::new(&model, examples.clone(), 8, 0.1).err().expect("unknown intent").to_string();
    assert!(err.contains("example 4") && err.contains("\"set_alarm\""), "{err}");
    let mut relabeled = examples[4].clone();
    relabeled.intent = Some("play_music".into());
    let err = JointObjective::new(&model, vec![examples[0].clone(), relabeled], 8, 0.1).err().expect("unknown slot").to_string();
    assert!(err.contains("example 1") && err.contains("\"time\""), "{err}");
    assert!(JointObjective::new(&model, examples[..4].to_vec(), 8, 0.1).is_ok());
    assert!(JointObjective::new(&model, Vec::new(), 8, 0.1).is_err());
}
