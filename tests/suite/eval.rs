//! `nearspan::eval`: hand-computed scores, the equivalence with conlleval on real data,
//! and the file-level errors.

use std::path::{Path, PathBuf};

use nearspan::data::{load, spans_to_tags, Example, LabeledSpan};
use nearspan::eval::*;

fn ex(words: &str, tags: &str, intent: Option<&str>) -> Example {
    let words: Vec<&str> = words.split_whitespace().collect();
    let tags: Vec<&str> = tags.split_whitespace().collect();
    Example::from_words(&words, &tags, intent.map(String::from)).unwrap()
}

fn report(pairs: &[(Example, Example)]) -> EvalReport {
    let mut e = Evaluator::new();
    for (g, p) in pairs {
        e.add(g, p).unwrap();
    }
    e.report()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

fn assert_scores(s: Scores, p: f64, r: f64, f: f64) {
    assert!(close(s.precision, p) && close(s.recall, r) && close(s.f1, f), "{s:?} != ({p}, {r}, {f})");
}

fn counts(tp: usize, fp: usize, fn_: usize) -> SpanCounts {
    SpanCounts { tp, fp, fn_ }
}

#[test]
fn perfect_prediction_scores_one() {
    let g = ex("play the beatles now", "O O B-artist O", Some("play"));
    let r = report(&[(g.clone(), g)]);
    assert_scores(r.micro, 1.0, 1.0, 1.0);
    assert_eq!((r.intent_accuracy, r.frame_accuracy), (Some(1.0), 1.0));
}

#[test]
fn adjacent_same_label_spans_are_not_one_span() {
    // Gold: two spans "a", "b". Predicted: one span "a b". Nothing matches.
    let r = report(&[(ex("a b", "B-x B-x", None), ex("a b", "B-x I-x", None))]);
    assert_eq!(r.counts, counts(0, 1, 2));
    assert_scores(r.micro, 0.0, 0.0, 0.0);
    // Gold "a b c" = B-x B-x O, predicted only the first: P = 1, R = 1/2, F1 = 2/3.
    let r = report(&[(ex("a b c", "B-x B-x O", None), ex("a b c", "B-x O O", None))]);
    assert_eq!(r.counts, counts(1, 0, 1));
    assert_scores(r.micro, 1.0, 0.5, 2.0 / 3.0);
}

#[test]
fn wrong_label_is_a_false_positive_and_a_false_negative() {
    let r = report(&[(ex("in paris", "O B-city", None), ex("in paris", "O B-country", None))]);
    assert_eq!(r.counts, counts(0, 1, 1));
    let city = &r.per_label["city"];
    assert_eq!((city.counts, city.support), (counts(0, 0, 1), 1));
    let country = &r.per_label["country"];
    assert_eq!((country.counts, country.support), (counts(0, 1, 0), 0));
    assert_scores(country.scores, 0.0, 0.0, 0.0);
}

#[test]
fn boundary_error_counts_as_miss() {
    // Gold "new york city" (3 words), predicted "new york": fp 1, fn 1, plus one right span.
    let g = ex("to new york city today", "O B-city I-city I-city B-date", None);
    let p = ex("to new york city today", "O B-city I-city O B-date", None);
    let r = report(&[(g, p)]);
    assert_eq!(r.counts, counts(1, 1, 1));
    assert_scores(r.micro, 0.5, 0.5, 0.5);
    assert_scores(r.per_label["date"].scores, 1.0, 1.0, 1.0);
    assert_scores(r.per_label["city"].scores, 0.0, 0.0, 0.0);
}

#[test]
fn errors_are_sorted_by_kind() {
    // Gold: city "new york", date "today", artist "queen" (untouched below).
    let g = ex("new york today play queen", "B-city I-city B-date O B-artist", None);
    // "new" as city: boundary; "today" as city: wrong label; "play" as song: spurious;
    // "queen" is never touched: missed.
    let p = ex("new york today play queen", "B-city O B-city B-song O", None);
    let r = report(&[(g.clone(), p)]);
    assert_eq!(r.counts, counts(0, 3, 3));
    let want = ErrorCounts { wrong_label: 1, boundary: 1, boundary_and_label: 0, spurious: 1, missed: 1 };
    assert_eq!(r.errors, want);
    // "york today" as artist overlaps city and date, both other labels; city and date are
    // touched, so only "queen" is missed.
    let p = ex("new york today play queen", "O B-artist I-artist O O", None);
    let r = report(&[(g.clone(), p)]);
    assert_eq!(r.errors, ErrorCounts { boundary_and_label: 1, missed: 1, ..Default::default() });
    // A right prediction is no error of any kind.
    assert_eq!(report(&[(g.clone(), g)]).errors, ErrorCounts::default());
}

#[test]
fn empty_predictions_score_zero_not_nan() {
    let g = ex("a b c", "B-x O B-y", Some("i"));
    let p = ex("a b c", "O O O", Some("i"));
    let r = report(&[(g, p)]);
    assert_eq!(r.counts, counts(0, 0, 2));
    assert_scores(r.micro, 0.0, 0.0, 0.0);
    assert_eq!(r.frame_accuracy, 0.0);
    assert_eq!(r.intent_accuracy, Some(1.0));
    // Nothing gold, nothing predicted: all zero, and the empty slot set is an exact frame.
    let r = report(&[(ex("hi", "O", None), ex("hi", "O", None))]);
    assert_scores(r.micro, 0.0, 0.0, 0.0);
    assert_eq!((r.intent_accuracy, r.frame_accuracy), (None, 1.0));
    let r = Evaluator::new().report();
    assert_eq!((r.examples, r.frame_accuracy, r.intent_accuracy), (0, 0.0, None));
}

#[test]
fn frame_accuracy_needs_intent_and_every_slot() {
    let w = "turn on the kitchen lights";
    let gold_tags = "O O O B-room B-device";
    let pairs = [
        // intent right, slots right: a correct frame
        (ex(w, gold_tags, Some("on")), ex(w, gold_tags, Some("on"))),
        // intent wrong
        (ex(w, gold_tags, Some("on")), ex(w, gold_tags, Some("off"))),
        // a slot missing
        (ex(w, gold_tags, Some("on")), ex(w, "O O O O B-device", Some("on"))),
        // an extra slot
        (ex(w, gold_tags, Some("on")), ex(w, "B-x O O B-room B-device", Some("on"))),
        // no gold intent: judged on slots alone
        (ex(w, gold_tags, None), ex(w, gold_tags, Some("anything"))),
        // intent predicted as none
        (ex(w, gold_tags, Some("on")), ex(w, gold_tags, None)),
    ];
    let r = report(&pairs);
    assert_eq!(r.examples, 6);
    assert_eq!((r.frames_correct, r.intent_correct, r.intent_examples), (2, 3, 5));
    assert!(close(r.frame_accuracy, 2.0 / 6.0));
    assert!(close(r.intent_accuracy.unwrap(), 3.0 / 5.0));
    // 12 gold slots; one missed; one extra predicted.
    assert_eq!(r.counts, counts(11, 1, 1));
    assert_scores(r.micro, 11.0 / 12.0, 11.0 / 12.0, 11.0 / 12.0);
    assert_eq!(r.per_label["room"].support, 6);
}

#[test]
fn micro_sums_counts_over_examples_and_labels() {
    let pairs = [
        (ex("a b c d", "B-x I-x O B-y", None), ex("a b c d", "B-x I-x O B-y", None)), // tp x, tp y
        (ex("a b c d", "B-x O B-y O", None), ex("a b c d", "B-x B-y I-y O", None)),   // tp x, fp y, fn y
        (ex("a b", "O O", None), ex("a b", "B-z O", None)),                           // fp z
    ];
    let r = report(&pairs);
    assert_eq!(r.counts, counts(3, 2, 1));
    assert_scores(r.micro, 3.0 / 5.0, 3.0 / 4.0, 2.0 * 0.6 * 0.75 / 1.35);
    assert_eq!(r.per_label["x"].counts, counts(2, 0, 0));
    assert_eq!(r.per_label["y"].counts, counts(1, 1, 1));
    assert_eq!(r.per_label["z"].counts, counts(0, 1, 0));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["counts"]["fn"], 1);
    assert_eq!(json["per_label"]["y"]["f1"], 0.5);
}

#[test]
fn duplicate_predicted_spans_match_once() {
    let g = ex("a b", "B-x O", None);
    let mut p = g.clone();
    p.spans.push(p.spans[0].clone());
    let r = report(&[(g, p)]);
    assert_eq!(r.counts, counts(1, 1, 0));
}

#[test]
fn mismatched_texts_are_errors() {
    let mut e = Evaluator::new();
    e.add(&ex("a", "O", None), &ex("a", "O", None)).unwrap();
    let err = e.add(&ex("a b", "O O", None), &ex("a c", "O O", None)).unwrap_err().to_string();
    assert!(err.contains("example 2") && err.contains("\"a b\"") && err.contains("\"a c\""), "{err}");
    let g = Example::from_text("it's", None);
    let mut p = g.clone();
    p.words.pop();
    assert!(matches!(e.add(&g, &p), Err(EvalError::WordsMismatch { .. })));
    assert!(matches!(
        evaluate(std::slice::from_ref(&g), &[]),
        Err(EvalError::LengthMismatch { gold: 1, pred: 0 })
    ));
}

/// conlleval's chunk rules on tags: a chunk starts at B-, or at an I- whose type differs
/// from the previous tag's (including after O). Written independently of the library.
fn conlleval_chunks(tags: &[String]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize)> = None;
    for (i, t) in tags.iter().chain(std::iter::once(&"O".to_string())).enumerate() {
        let (kind, ty) = if t == "O" { ("O", "") } else { (&t[..1], &t[2..]) };
        let continues = kind == "I" && open.as_ref().is_some_and(|(o, _)| o == ty);
        if !continues {
            if let Some((o, s)) = open.take() {
                out.push((o, s, i));
            }
            if kind != "O" {
                open = Some((ty.to_string(), i));
            }
        }
    }
    out
}

/// Deterministic damage to gold spans: drop some, relabel some, shorten some.
fn perturb(e: &Example, k: usize) -> Example {
    let mut spans: Vec<LabeledSpan> = Vec::new();
    for (j, s) in e.spans.iter().enumerate() {
        let mut s = s.clone();
        match (k + j) % 7 {
            0 => continue,
            1 => s.label = format!("{}_other", s.label),
            2 if s.word_end - s.word_start > 1 => {
                s.word_end -= 1;
                s.end = e.words[s.word_end - 1].end;
            }
            3 if j == 0 && s.word_start > 0 => {
                s.word_start -= 1;
                s.start = e.words[s.word_start].start;
            }
            _ => {}
        }
        spans.push(s);
    }
    Example { spans, intent: None, ..e.clone() }
}

#[test]
fn strict_scores_equal_conlleval_on_snips_test() {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/snips/test"));
    assert!(path.exists(), "{} is missing: these tests read the real data", path.display());
    let gold = load(&path, None).unwrap().splits.remove(0).examples;
    let pred: Vec<Example> = gold.iter().enumerate().map(|(k, e)| perturb(e, k)).collect();
    let r = evaluate(&gold, &pred).unwrap();

    let (mut correct, mut n_pred, mut n_gold) = (0, 0, 0);
    for (g, p) in gold.iter().zip(&pred) {
        let gc = conlleval_chunks(&g.to_bio());
        let pc = conlleval_chunks(&spans_to_tags(p.words.len(), &p.spans));
        correct += pc.iter().filter(|c| gc.contains(c)).count();
        n_pred += pc.len();
        n_gold += gc.len();
    }
    assert_eq!(
        (r.counts.tp, r.counts.tp + r.counts.fp, r.counts.tp + r.counts.fn_),
        (correct, n_pred, n_gold)
    );
    assert!(r.micro.f1 > 0.3 && r.micro.f1 < 0.9, "perturbation too weak or too strong: {:?}", r.micro);
    assert_eq!(r.intent_accuracy, Some(0.0));

    let perfect = evaluate(&gold, &gold).unwrap();
    assert_scores(perfect.micro, 1.0, 1.0, 1.0);
    assert_eq!((perfect.intent_accuracy, perfect.frame_accuracy), (Some(1.0), 1.0));
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn evaluate_files_scores_line_aligned_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let gold = write(
        dir.path(),
        "gold.jsonl",
        "{\"text\": \"turn on the lamp\", \"intent\": \"on\", \"spans\": [{\"start\": 12, \"end\": 16, \"label\": \"device\"}]}\n\
         {\"text\": \"play adele\", \"intent\": \"play\", \"spans\": [{\"start\": 5, \"end\": 10, \"label\": \"artist\"}]}\n",
    );
    let pred = write(
        dir.path(),
        "pred.jsonl",
        "{\"text\": \"turn on the lamp\", \"intent\": \"on\", \"spans\": [{\"start\": 12, \"end\": 16, \"label\": \"device\"}]}\n\n\
         {\"text\": \"play adele\", \"intent\": \"play\"}\n",
    );
    let r = evaluate_files(&gold, &pred).unwrap();
    assert_eq!(r.counts, counts(1, 0, 1));
    assert_eq!((r.intent_accuracy, r.frame_accuracy), (Some(1.0), 0.5));
}

#[test]
fn evaluate_files_names_files_and_lines_on_misalignment() {
    let dir = tempfile::tempdir().unwrap();
    let gold = write(dir.path(), "gold.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n");
    let short = write(dir.path(), "short.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
    let err = evaluate_files(&gold, &short).unwrap_err().to_string();
    assert!(err.contains("gold.jsonl: 3 examples") && err.contains("short.jsonl: 2"), "{err}");
    let swapped =
        write(dir.path(), "swapped.jsonl", "{\"text\": \"a\"}\n\n{\"text\": \"c\"}\n{\"text\": \"b\"}\n");
    let err = evaluate_files(&gold, &swapped).unwrap_err().to_string();
    assert!(err.contains("gold.jsonl: line 2") && err.contains("swapped.jsonl: line 3"), "{err}");
    let broken = write(dir.path(), "broken.jsonl", "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n");
    let err = evaluate_files(&gold, &broken).unwrap_err().to_string();
    assert!(err.contains("broken.jsonl: line 2"), "{err}");
}
