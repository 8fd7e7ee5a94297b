//! Parity with the reference PyTorch implementation and the encoder's edge cases.

use nearspan::encoder::{sentence_vector, EncoderError, ForwardMode, TokenizedText};
use serde::Deserialize;

use crate::common::encoder;

#[derive(Deserialize)]
struct Fixture {
    sentences: Vec<FixtureSentence>,
}

#[derive(Deserialize)]
struct FixtureSentence {
    text: String,
    input_ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
    tokens: Vec<String>,
    last_hidden_state: Vec<Vec<f32>>,
    mean_pooled_normalized: Vec<f32>,
}

fn fixture() -> Fixture {
    let path = nearspan::paths::shared_fixtures_dir().join("minilm_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture parses")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn tokenization_matches_reference() {
    for s in fixture().sentences {
        let t = encoder().tokenize(&s.text).unwrap();
        assert_eq!(t.ids, s.input_ids, "{}", s.text);
        assert_eq!(t.tokens, s.tokens, "{}", s.text);
        assert_eq!(t.offsets, s.offsets, "{}", s.text);
    }
}

/// The fixture was made as one padded batch; so is this forward pass.
#[test]
fn hidden_states_and_pooled_vectors_match_reference_within_1e_4() {
    let fx = fixture();
    let texts: Vec<&str> = fx.sentences.iter().map(|s| s.text.as_str()).collect();
    let tokenized: Vec<TokenizedText> = encoder().tokenize_all(&texts).unwrap();
    let batch: Vec<&TokenizedText> = tokenized.iter().collect();
    let out = encoder().forward(&batch, ForwardMode::Inference).unwrap();
    let (_, t, dim) = out.dims3().unwrap();
    let flat = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    for (row, s) in fx.sentences.iter().enumerate() {
        let n = s.input_ids.len();
        let ours = &flat[row * t * dim..(row * t + n) * dim];
        let reference: Vec<f32> = s.last_hidden_state.concat();
        worst = worst.max(max_abs_diff(ours, &reference));
        let pooled = sentence_vector(ours, dim);
        worst = worst.max(max_abs_diff(&pooled, &s.mean_pooled_normalized));
    }
    assert!(worst <= 1e-4, "max abs error {worst} > 1e-4");
}

/// The inference path (`encode`: packed tokens, fused passes, f32) against the same
/// reference, texts batched unevenly so that packing several texts of different lengths
/// is exercised.
#[test]
fn inference_path_matches_reference_within_1e_4() {
    let fx = fixture();
    let texts: Vec<&str> = fx.sentences.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(encoder().precision(), nearspan::encoder::Precision::F32);
    let encoded = encoder().encode(&texts, 3).unwrap();
    let mut worst = 0f32;
    for (e, s) in encoded.iter().zip(&fx.sentences) {
        worst = worst.max(max_abs_diff(&e.hidden, &s.last_hidden_state.concat()));
        worst = worst.max(max_abs_diff(
            &e.sentence_vector(),
            &s.mean_pooled_normalized,
        ));
    }
    assert!(worst <= 1e-4, "max abs error {worst} > 1e-4");
}

/// bf16 products: every token vector and sentence vector of the fixture texts and of 200
/// SNIPS test utterances stays within the bounds below of f32 (cosine similarity of token
/// vectors, and of sentence vectors). Skipped where the CPU has neither AMX-BF16 nor AVX512-BF16.
#[test]
fn bf16_path_stays_within_tolerance_of_f32() {
    const TOKEN_COS_MIN: f32 = 0.9998; // measured worst: 0.99996 (1 - cos five times smaller)
    const SENTENCE_COS_MIN: f32 = 0.9999; // measured worst: 0.99998
    use nearspan::encoder::{Encoder, Precision};
    if !Precision::Bf16.is_supported() {
        eprintln!("bf16 not supported on this CPU: skipped");
        return;
    }
    let bf16 = Encoder::load_with_precision(&crate::common::model_dir(), Precision::Bf16).unwrap();
    assert_eq!(bf16.precision(), Precision::Bf16);
    let snips = std::fs::read_to_string(crate::common::shared("snips/test/seq.in")).unwrap();
    let fx = fixture();
    let mut texts: Vec<&str> = fx.sentences.iter().map(|s| s.text.as_str()).collect();
    texts.extend(snips.lines().take(200));
    let (a, b) = (
        encoder().encode(&texts, 32).unwrap(),
        bf16.encode(&texts, 32).unwrap(),
    );
    let cos = |x: &[f32], y: &[f32]| {
        let dot: f32 = x.iter().zip(y).map(|(a, b)| a * b).sum();
        dot / (x.iter().map(|v| v * v).sum::<f32>().sqrt()
            * y.iter().map(|v| v * v).sum::<f32>().sqrt())
    };
    let (mut worst_token, mut worst_sentence, mut sum_token, mut n) = (1f32, 1f32, 0f64, 0usize);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tokens, y.tokens);
        for i in 0..x.tokens.len() {
            let c = cos(x.token_vector(i), y.token_vector(i));
            worst_token = worst_token.min(c);
            sum_token += c as f64;
            n += 1;
        }
        worst_sentence = worst_sentence.min(cos(&x.sentence_vector(), &y.sentence_vector()));
    }
    eprintln!("bf16 vs f32: token cosine worst {worst_token} mean {}, sentence cosine worst {worst_sentence}", sum_token / n as f64);
    assert!(
        worst_token >= TOKEN_COS_MIN && worst_sentence >= SENTENCE_COS_MIN,
        "token {worst_token}, sentence {worst_sentence}"
    );
}

/// An encoder set to keep an earlier layer's states gives them beside the last hidden
/// state: after every layer they are the last state itself; after 3 of 6 they differ from
/// it, and the packed inference pass and the candle model agree on them; no tap, no
/// states; a layer the model does not have is an error naming it.
#[test]
fn tapped_layer_states_agree_between_both_passes() {
    use nearspan::encoder::Encoder;
    let fx = fixture();
    let texts: Vec<&str> = fx.sentences.iter().map(|s| s.text.as_str()).collect();
    let mut enc = Encoder::load(&crate::common::model_dir()).unwrap();
    assert!(enc.encode(&texts[..1], 1).unwrap()[0].tapped.is_none());
    enc.set_tap_layer(Some(6)).unwrap();
    for e in enc.encode(&texts, 3).unwrap() {
        let t = e.tapped.as_ref().expect("tapped states");
        assert_eq!((t.layer, &t.hidden), (6, &e.hidden));
    }
    enc.set_tap_layer(Some(3)).unwrap();
    let encoded = enc.encode(&texts, 3).unwrap();
    let tokenized: Vec<TokenizedText> = enc.tokenize_all(&texts).unwrap();
    let batch: Vec<&TokenizedText> = tokenized.iter().collect();
    let (ids, mask) = enc.batch_tensors(&batch).unwrap();
    let (_, tapped) = enc.model().forward_tapped(&ids, &mask, ForwardMode::Inference, Some(3)).unwrap();
    let tapped = tapped.expect("the candle pass keeps layer 3 too");
    let (_, t, dim) = tapped.dims3().unwrap();
    let flat = tapped.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    for (row, e) in encoded.iter().enumerate() {
        let tap = e.tapped.as_ref().expect("tapped states");
        assert_eq!((tap.layer, tap.hidden.len()), (3, e.hidden.len()));
        assert!(max_abs_diff(&tap.hidden, &e.hidden) > 0.1, "layer 3 should not be the last layer");
        let n = e.tokens.len();
        worst = worst.max(max_abs_diff(&tap.hidden, &flat[row * t * dim..(row * t + n) * dim]));
    }
    assert!(worst <= 1e-4, "packed and candle layer-3 states differ by {worst}");
    let err = enc.set_tap_layer(Some(7)).unwrap_err().to_string();
    assert!(err.contains("layer 7") && err.contains("6 layers"), "{err}");
}

/// Length-sorted batching (`encode`) must give the same vectors as one text at a time.
#[test]
fn batching_and_padding_do_not_change_vectors() {
    let fx = fixture();
    let texts: Vec<&str> = fx.sentences.iter().map(|s| s.text.as_str()).collect();
    let batched = encoder().encode(&texts, 3).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let single = &encoder().encode(&[text], 1).unwrap()[0];
        let err = max_abs_diff(&batched[i].hidden, &single.hidden);
        assert!(err < 1e-4, "text {i}: {err}");
        assert_eq!(batched[i].tokens, single.tokens);
    }
}

#[test]
fn over_long_input_is_an_error_naming_the_text_not_a_panic() {
    let long = "word ".repeat(600);
    let err = encoder().encode(&["short", &long], 8).unwrap_err();
    assert!(matches!(err, EncoderError::TooLong { index: 1, max: 512, .. }), "{err}");
    assert!(err.to_string().contains("at most 512"), "{err}");
}

#[test]
fn empty_text_encodes_to_cls_sep() {
    let out = encoder().encode(&[""], 1).unwrap();
    assert_eq!(out[0].tokens.tokens, ["[CLS]", "[SEP]"]);
    assert_eq!(out[0].hidden.len(), 2 * out[0].dim);
}

#[test]
fn words_align_to_their_sub_tokens() {
    let text = "add step to me to the 50 clásicos playlist";
    let words = nearspan::data::segment_words(text);
    let t = encoder().tokenize(text).unwrap();
    let ranges = t.align_words(&words);
    assert_eq!(ranges.len(), words.len());
    // Every non-special token belongs to exactly one word, in order.
    let covered: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
    assert_eq!(covered, (1..t.len() - 1).collect::<Vec<_>>());
    assert!(ranges.iter().all(|r| !r.is_empty()));
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = nearspan::encoder::Encoder::load(dir.path()).err().expect("must fail");
    assert!(err.to_string().contains("missing config.json"), "{err}");
}

/// A second model that differs from the default one: its last layer norm's scale doubled,
/// so every token vector changes.
fn altered_model(dir: &std::path::Path) {
    let src = crate::common::model_dir();
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut weights = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let key = weights.keys().find(|k| k.ends_with("layer.5.output.LayerNorm.weight")).expect("last layer norm").clone();
    let doubled = (weights[&key].clone() * 2.0).unwrap();
    weights.insert(key, doubled);
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
}

#[test]
fn ensemble_puts_its_members_token_vectors_side_by_side() {
    use nearspan::encoder::{ensemble::Manifest, Encoder};
    let tmp = tempfile::tempdir().unwrap();
    let (other_dir, ens_dir) = (tmp.path().join("other"), tmp.path().join("ens"));
    altered_model(&other_dir);
    // A relative member path is read from the ensemble folder.
    Manifest::new(vec![crate::common::model_dir().canonicalize().unwrap(), "../other".into()]).write(&ens_dir).unwrap();
    let ens = Encoder::load(&ens_dir).unwrap();
    let (a, b) = (encoder(), Encoder::load(&other_dir).unwrap());
    assert_eq!((ens.n_models(), ens.info().hidden_size), (2, 768));
    assert_ne!(ens.info().weights_sha256, a.info().weights_sha256);
    let texts = ["play some jazz by miles davis", "", "book a table for two at eight"];
    let (e, x, y) = (ens.encode(&texts, 2).unwrap(), a.encode(&texts, 2).unwrap(), b.encode(&texts, 2).unwrap());
    for ((e, x), y) in e.iter().zip(&x).zip(&y) {
        assert_eq!(e.dim, 768);
        assert_eq!(e.tokens.ids, x.tokens.ids);
        for t in 0..x.tokens.len() {
            let v = e.token_vector(t);
            assert_eq!(&v[..384], x.token_vector(t), "first member's half, token {t}");
            assert_eq!(&v[384..], y.token_vector(t), "second member's half, token {t}");
            assert_ne!(&v[..384], &v[384..]);
        }
    }
}

#[test]
fn ensemble_refuses_mismatched_tokenizers_and_training() {
    use nearspan::encoder::{ensemble::Manifest, Encoder};
    let tmp = tempfile::tempdir().unwrap();
    let (other_dir, ens_dir) = (tmp.path().join("other"), tmp.path().join("ens"));
    altered_model(&other_dir);
    Manifest::new(vec![crate::common::model_dir().canonicalize().unwrap(), other_dir.clone(), tmp.path().join("gone")]).write(&ens_dir).unwrap();
    let err = Encoder::load(&ens_dir).err().expect("a missing member is refused");
    assert!(err.to_string().contains("ensemble.json") && err.to_string().contains("gone: no such folder"), "{err}");
    Manifest::new(vec![crate::common::model_dir().canonicalize().unwrap(), other_dir.clone()]).write(&ens_dir).unwrap();
    let vb = candle_nn::VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu);
    let err = Encoder::load_with(&ens_dir, vb).err().expect("training an ensemble is refused");
    assert!(matches!(err, EncoderError::EnsembleNotTrainable { .. }) && err.to_string().contains("ens"), "{err}");
    // Another vocabulary: one more token at the end of the tokenizer file.
    let tok = std::fs::read_to_string(other_dir.join("tokenizer.json")).unwrap();
    assert!(tok.contains("\"[PAD]\":0"));
    std::fs::write(other_dir.join("tokenizer.json"), tok.replacen("\"[PAD]\":0", "\"[PAD]\":0,\"zzzextra\":999999", 1)).unwrap();
    let err = Encoder::load(&ens_dir).err().expect("different tokenizers are refused");
    assert!(err.to_string().contains("different tokenizers") && err.to_string().contains("ensemble.json"), "{err}");
}
