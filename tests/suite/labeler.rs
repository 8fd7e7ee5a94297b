//! `nearspan::labeler` through its library API, on the real model: adapting to a new
//! domain by adding examples, the justifications and the JSON shape of a prediction,
//! index persistence, the reserved `O` label and both decoders.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use nearspan::data::{char_slice, read_jsonl, segment_words, Example, LabeledSpan};
use nearspan::decode::Strategy;
use nearspan::encoder::SpanPooling;
use nearspan::labeler::{self, BuildConfig, LabelerError, Neighbour, Prediction, QueryConfig};
use nearspan::spans::candidate_spans;
use nearspan_index::{BackendKind, ExampleId, HnswParams, IndexError, SpanIndex};

use crate::common::encoder;

/// Tolerance on cosine similarities of normalized f32 vectors.
const EPS: f32 = 1e-5;

fn example_file(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).join(name)
}

fn smarthome() -> Vec<Example> {
    read_jsonl(&example_file("smarthome.jsonl")).expect("read examples/smarthome.jsonl")
}

fn smarthome_queries() -> Vec<String> {
    let text = std::fs::read_to_string(example_file("smarthome_queries.txt")).unwrap();
    let queries: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(String::from).collect();
    assert!(queries.len() >= 5, "examples/smarthome_queries.txt has only {} queries", queries.len());
    queries
}

/// A labeled example written in a test: each slot is given by its text (first occurrence).
fn labeled(text: &str, intent: &str, slots: &[(&str, &str)]) -> Example {
    let words = segment_words(text);
    let mut spans: Vec<LabeledSpan> = slots
        .iter()
        .map(|&(slot, label)| {
            let byte = text.find(slot).unwrap_or_else(|| panic!("{slot:?} not in {text:?}"));
            let start = text[..byte].chars().count();
            let end = start + slot.chars().count();
            let word_start = words.iter().position(|w| w.start == start).expect("slot starts on a word");
            let word_end = words.iter().position(|w| w.end == end).expect("slot ends on a word") + 1;
            LabeledSpan { label: label.to_string(), word_start, word_end, start, end }
        })
        .collect();
    spans.sort_by_key(|s| s.start);
    Example { text: text.to_string(), words, intent: Some(intent.to_string()), spans }
}

fn new_index(build: &BuildConfig) -> SpanIndex {
    SpanIndex::new(labeler::encoder_info(encoder(), build), BackendKind::Exact, HnswParams::default()).unwrap()
}

fn index_of(examples: &[Example], build: &BuildConfig) -> SpanIndex {
    let mut index = new_index(build);
    let ids = labeler::add_examples(encoder(), &mut index, examples, build, 32).unwrap();
    assert_eq!(ids.len(), examples.len());
    index
}

/// The index of every smart-home example, built once (default build settings).
fn full_index() -> &'static SpanIndex {
    static INDEX: OnceLock<SpanIndex> = OnceLock::new();
    INDEX.get_or_init(|| index_of(&smarthome(), &BuildConfig::default()))
}

fn label(index: &SpanIndex, texts: &[&str], cfg: &QueryConfig) -> Vec<Prediction> {
    let preds = labeler::label_texts(encoder(), index, texts, &BuildConfig::default(), cfg).unwrap();
    assert_eq!(preds.len(), texts.len());
    preds
}

fn slot_text<'a>(p: &'a Prediction, label: &str) -> Vec<&'a str> {
    p.slots.iter().filter(|s| s.label == label).map(|s| s.text.as_str()).collect()
}

fn intent(p: &Prediction) -> &str {
    p.intent.as_ref().map_or("", |i| i.label.as_str())
}

/// The number of spans `add_examples` indexes for `examples` with `build` (O spans on):
/// every candidate span, plus any gold span wider than the maximum width.
fn expected_spans(examples: &[Example], build: &BuildConfig) -> usize {
    assert!(build.index_o_spans);
    examples
        .iter()
        .map(|e| {
            let wide = e.spans.iter().filter(|s| s.word_end - s.word_start > build.max_width).count();
            candidate_spans(e.words.len(), build.max_width).len() + wide
        })
        .sum()
}

#[test]
fn adding_examples_teaches_a_new_domain() {
    let build = BuildConfig::default();
    let all = smarthome();
    let without_music: Vec<Example> = all
        .iter()
        .filter(|e| e.intent.as_deref() != Some("play_music") && e.spans.iter().all(|s| s.label != "artist"))
        .cloned()
        .collect();
    assert!(without_music.len() < all.len() && !without_music.is_empty());
    let mut index = index_of(&without_music, &build);
    assert!(index.label_id("artist").is_none(), "no artist example was indexed");

    // Held-out utterances of the new domain. `taught`: artists named in the examples added
    // below, in other sentences; `unseen`: artists that no example names.
    let taught = [
        ("put on something by Pink Floyd", "Pink Floyd"),
        ("play Norah Jones in the bedroom", "Norah Jones"),
        ("I'd like to hear Queen", "Queen"),
        ("start Bruce Springsteen on the speaker", "Bruce Springsteen"),
    ];
    let unseen = [
        "play something by Adele",
        "put on some music by Coldplay",
        "I'd like to listen to Ed Sheeran",
        "play Elton John in the bedroom",
    ];
    let texts: Vec<&str> = taught.iter().map(|(t, _)| *t).chain(unseen).collect();
    let cfg = QueryConfig::default();

    for p in label(&index, &texts, &cfg) {
        assert!(
            slot_text(&p, "artist").is_empty(),
            "{:?}: artist predicted before any artist example: {:?}",
            p.text,
            p.slots
        );
        assert_ne!(intent(&p), "play_music", "{:?}: play_music predicted before any play_music example", p.text);
        assert!(p.intent.is_some(), "{:?}: the index has intents, so one is answered", p.text);
    }

    // Four labeled examples of the new domain, none of them from the file.
    let new = [
        labeled("play some songs by Norah Jones", "play_music", &[("Norah Jones", "artist")]),
        labeled(
            "put on Bruce Springsteen in the kitchen",
            "play_music",
            &[("Bruce Springsteen", "artist"), ("kitchen", "room")],
        ),
        labeled("I want to listen to Pink Floyd", "play_music", &[("Pink Floyd", "artist")]),
        labeled("can you play music by Queen", "play_music", &[("Queen", "artist")]),
    ];
    let (examples_before, spans_before) = (index.n_examples(), index.n_spans());
    let old_vectors: Vec<Vec<f32>> = (0..spans_before as u32).map(|i| index.span_vector(i).to_vec()).collect();
    let old_records: Vec<_> = (0..spans_before as u32).map(|i| index.span(i).clone()).collect();

    let ids = labeler::add_examples(encoder(), &mut index, &new, &build, 32).unwrap();

    assert_eq!(ids.len(), new.len());
    assert_eq!(index.n_examples(), examples_before + new.len());
    assert_eq!(index.n_spans(), spans_before + expected_spans(&new, &build), "only the new examples' spans are added");
    for i in 0..spans_before as u32 {
        assert_eq!(index.span(i), &old_records[i as usize], "span {i} of the old examples changed");
        assert_eq!(index.span_vector(i), &old_vectors[i as usize][..], "span {i} was re-encoded");
    }
    for (id, ex) in ids.iter().zip(&new) {
        assert_eq!(index.example(*id).text, ex.text);
        assert_eq!(index.example(*id).intent, ex.intent);
    }
    assert!(index.label_id("artist").is_some());

    let after = label(&index, &texts, &cfg);
    let report: Vec<_> = after.iter().map(|p| (&p.text, intent(p), slot_text(p, "artist"))).collect();
    let (after_taught, after_unseen) = after.split_at(taught.len());
    // The bar: at least 3 of the 4 `taught` utterances get exactly their artist span and
    // no other artist span, and at least 3 of 4 in each group get the play_music intent.
    let artists_found =
        taught.iter().zip(after_taught).filter(|((_, artist), p)| slot_text(p, "artist") == [*artist]).count();
    assert!(artists_found >= 3, "artist found exactly in {artists_found}/4: {report:?}");
    for (group, preds) in [("taught", after_taught), ("unseen", after_unseen)] {
        let music = preds.iter().filter(|p| intent(p) == "play_music").count();
        assert!(music >= 3, "{group}: play_music in {music}/4: {report:?}");
    }
    // The new slots are justified by the new examples.
    for p in after_taught {
        for s in p.slots.iter().filter(|s| s.label == "artist") {
            assert!(
                s.neighbours.iter().any(|n| n.label == "artist" && new.iter().any(|e| e.text == n.example)),
                "{:?}: {:?}",
                p.text,
                s.neighbours
            );
        }
    }
}

fn check_neighbours(what: &str, neighbours: &[Neighbour]) {
    for n in neighbours {
        assert_eq!(
            n.text,
            char_slice(&n.example, n.start, n.end),
            "{what}: neighbour text is not example[start..end]: {n:?}"
        );
        assert!(n.start < n.end && n.end <= n.example.chars().count(), "{what}: bad offsets {n:?}");
        assert!((-1.0 - EPS..=1.0 + EPS).contains(&n.similarity), "{what}: similarity outside [-1, 1]: {n:?}");
    }
    for w in neighbours.windows(2) {
        assert!(w[0].similarity >= w[1].similarity, "{what}: neighbours not sorted by similarity: {neighbours:?}");
    }
}

#[test]
fn every_decision_is_justified_by_its_neighbours() {
    let queries = smarthome_queries();
    let texts: Vec<&str> = queries.iter().map(String::as_str).collect();
    let cfg = QueryConfig::default();
    let preds = label(full_index(), &texts, &cfg);
    let n_slots: usize = preds.iter().map(|p| p.slots.len()).sum();
    assert!(n_slots >= texts.len(), "only {n_slots} slots predicted in {} smart-home queries", texts.len());

    for p in &preds {
        for s in &p.slots {
            let what = format!("{:?} slot {:?} ({})", p.text, s.text, s.label);
            assert_eq!(s.text, char_slice(&p.text, s.start, s.end), "{what}: text is not text[start..end]");
            assert!(s.score >= cfg.threshold && s.score <= 1.0 + EPS, "{what}: score {} below the threshold", s.score);
            assert!(
                !s.neighbours.is_empty() && s.neighbours.len() <= cfg.explain,
                "{what}: {} neighbours",
                s.neighbours.len()
            );
            let support: Vec<&Neighbour> = s.neighbours.iter().filter(|n| n.label == s.label).collect();
            assert!(!support.is_empty(), "{what}: no neighbour with the slot's label: {:?}", s.neighbours);
            assert!(
                support.iter().any(|n| (n.similarity - s.score).abs() < EPS),
                "{what}: score {} is not a supporting neighbour's similarity: {:?}",
                s.score,
                s.neighbours
            );
            assert!(s.neighbours.iter().all(|n| n.label != labeler::O_LABEL), "{what}: an O span shown as a reason");
            check_neighbours(&what, &s.neighbours);
        }
        let i = p.intent.as_ref().unwrap_or_else(|| panic!("{:?}: no intent", p.text));
        let what = format!("{:?} intent {}", p.text, i.label);
        assert!(
            !i.neighbours.is_empty() && i.neighbours.len() <= cfg.explain,
            "{what}: {} neighbours",
            i.neighbours.len()
        );
        assert!(
            i.neighbours.iter().any(|n| n.label == i.label),
            "{what}: no neighbour with the intent: {:?}",
            i.neighbours
        );
        assert!((i.neighbours[0].similarity - i.score).abs() < EPS, "{what}: max score {} != best neighbour", i.score);
        for n in &i.neighbours {
            assert_eq!(n.text, n.example, "{what}: an intent neighbour is a whole example");
        }
        check_neighbours(&what, &i.neighbours);
    }
}

fn keys(v: &serde_json::Value) -> BTreeSet<&str> {
    v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().map(String::as_str).collect()
}

fn set<'a>(k: &[&'a str]) -> BTreeSet<&'a str> {
    k.iter().copied().collect()
}

#[test]
fn prediction_json_has_the_documented_shape() {
    let p = &label(full_index(), &["turn on the kitchen lights"], &QueryConfig::default())[0];
    assert!(!p.slots.is_empty(), "no slot in {p:?}");
    let v = serde_json::to_value(p).unwrap();
    assert_eq!(keys(&v), set(&["text", "intent", "slots"]));
    assert_eq!(v["text"], "turn on the kitchen lights");

    let neighbour_keys = set(&["example", "text", "start", "end", "label", "similarity"]);
    let intent = &v["intent"];
    assert_eq!(keys(intent), set(&["label", "score", "neighbours"]));
    assert!(intent["label"].is_string() && intent["score"].is_number());
    let ns = intent["neighbours"].as_array().unwrap();
    assert!(!ns.is_empty());
    ns.iter().for_each(|n| assert_eq!(keys(n), neighbour_keys));

    let slots = v["slots"].as_array().unwrap();
    assert_eq!(slots.len(), p.slots.len());
    for s in slots {
        assert_eq!(keys(s), set(&["start", "end", "text", "label", "score", "neighbours"]));
        assert!(
            s["start"].is_u64()
                && s["end"].is_u64()
                && s["text"].is_string()
                && s["label"].is_string()
                && s["score"].is_number()
        );
        let ns = s["neighbours"].as_array().unwrap();
        assert!(!ns.is_empty());
        for n in ns {
            assert_eq!(keys(n), neighbour_keys);
            assert!(n["example"].is_string() && n["text"].is_string() && n["label"].is_string());
            assert!(n["start"].is_u64() && n["end"].is_u64() && n["similarity"].is_number());
        }
    }
    // And it reads back as the same prediction (except the skipped word indices).
    let back: Prediction = serde_json::from_value(v).unwrap();
    assert_eq!(back.text, p.text);
    assert_eq!(back.intent, p.intent);
    assert_eq!(
        back.slots.iter().map(|s| (s.start, s.end, &s.label)).collect::<Vec<_>>(),
        p.slots.iter().map(|s| (s.start, s.end, &s.label)).collect::<Vec<_>>()
    );
}

#[test]
fn saved_index_gives_the_same_predictions_and_refuses_another_encoder() {
    let build = BuildConfig::default();
    let index = full_index();
    let queries = smarthome_queries();
    let texts: Vec<&str> = queries.iter().map(String::as_str).collect();
    let cfg = QueryConfig::default();
    let before = label(index, &texts, &cfg);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smarthome.nsi");
    index.save(&path).unwrap();
    let opened = SpanIndex::open(&path, Some(&labeler::encoder_info(encoder(), &build))).unwrap();
    assert_eq!(
        (opened.n_examples(), opened.n_spans(), opened.n_labels()),
        (index.n_examples(), index.n_spans(), index.n_labels())
    );
    assert_eq!(opened.labels().collect::<Vec<_>>(), index.labels().collect::<Vec<_>>());
    assert_eq!(labeler::build_config_of(&opened).unwrap(), build);
    let after = label(&opened, &texts, &cfg);
    assert_eq!(after, before, "predictions changed after a save/open round trip");

    let other_pooling = match build.pooling {
        SpanPooling::Mean => SpanPooling::StartEnd,
        SpanPooling::StartEnd | SpanPooling::StartEndMean => SpanPooling::Mean,
    };
    let other = BuildConfig { pooling: other_pooling, ..build };
    match SpanIndex::open(&path, Some(&labeler::encoder_info(encoder(), &other))) {
        Err(IndexError::EncoderMismatch { .. }) => {}
        other => panic!("opening an index with another pooling: expected EncoderMismatch, got {other:?}"),
    }
    let wider = BuildConfig { max_width: build.max_width + 1, ..build };
    assert!(matches!(
        SpanIndex::open(&path, Some(&labeler::encoder_info(encoder(), &wider))),
        Err(IndexError::EncoderMismatch { .. })
    ));
}

#[test]
fn the_o_label_is_reserved() {
    let build = BuildConfig::default();
    let mut index = new_index(&build);
    let ok = labeled("turn on the lamp", "turn_on", &[("lamp", "device")]);
    let bad = labeled("turn on the fan in the attic", "turn_on", &[("fan", "device"), ("attic", "O")]);
    match labeler::add_examples(encoder(), &mut index, &[ok.clone(), bad], &build, 32) {
        Err(LabelerError::ReservedLabel { index: 1, text, start, end }) => {
            assert_eq!((text.as_str(), start, end), ("turn on the fan in the attic", 23, 28));
        }
        other => panic!("expected ReservedLabel for example 1, got {other:?}"),
    }
    assert_eq!((index.n_examples(), index.n_spans()), (0, 0), "a rejected batch adds nothing");
    // The valid example alone is accepted.
    labeler::add_examples(encoder(), &mut index, &[ok], &build, 32).unwrap();
    assert_eq!(index.n_examples(), 1);
}

#[test]
fn both_decoders_give_non_overlapping_slots() {
    let queries = smarthome_queries();
    let texts: Vec<&str> = queries.iter().map(String::as_str).collect();
    for strategy in [Strategy::Greedy, Strategy::BestAverage] {
        let cfg = QueryConfig { strategy, ..QueryConfig::default() };
        let preds = label(full_index(), &texts, &cfg);
        let n_slots: usize = preds.iter().map(|p| p.slots.len()).sum();
        assert!(n_slots >= texts.len() / 2, "{strategy:?}: only {n_slots} slots in {} queries", texts.len());
        for p in &preds {
            for s in &p.slots {
                assert!(s.start < s.end && s.words.0 < s.words.1, "{strategy:?}: empty slot {s:?}");
            }
            for w in p.slots.windows(2) {
                assert!(
                    w[0].end <= w[1].start,
                    "{strategy:?}: {:?}: slots {:?} and {:?} overlap or are unsorted",
                    p.text,
                    w[0].text,
                    w[1].text
                );
                assert!(w[0].words.1 <= w[1].words.0, "{strategy:?}: {:?}: word spans overlap", p.text);
            }
        }
    }
}

/// `prefilter` searches spans only among the examples nearest the utterance: with every
/// example allowed it decides exactly as the full search; with 3 allowed, every slot's
/// neighbours come from the 3 nearest utterances.
#[test]
fn prefilter_searches_only_the_nearest_examples_spans() {
    let queries = smarthome_queries();
    let texts: Vec<&str> = queries.iter().map(String::as_str).collect();
    let index = full_index();
    let full = label(index, &texts, &QueryConfig::default());
    let all = label(index, &texts, &QueryConfig { prefilter: Some(index.n_examples()), ..QueryConfig::default() });
    for (f, a) in full.iter().zip(&all) {
        assert_eq!(f.intent, a.intent, "{}", f.text);
        let slots = |p: &Prediction| p.slots.iter().map(|s| (s.words, s.label.clone())).collect::<Vec<_>>();
        assert_eq!(slots(f), slots(a), "{}", f.text);
        for (x, y) in f.slots.iter().zip(&a.slots) {
            assert!((x.score - y.score).abs() < 1e-5, "{}: {} vs {}", f.text, x.score, y.score);
        }
    }
    let cfg = QueryConfig { prefilter: Some(3), explain: 10, ..QueryConfig::default() };
    let examples: Vec<Example> = texts.iter().map(|t| Example::from_text(t, None)).collect();
    let retrieved = labeler::retrieve(encoder(), index, &examples, &BuildConfig::default(), &cfg, None).unwrap();
    let mut checked = 0;
    for (ex, r) in examples.iter().zip(&retrieved) {
        let nearest: Vec<&str> = r.utterances.iter().take(3).map(|&(id, _)| index.example(ExampleId(id)).text.as_str()).collect();
        let p = labeler::decide(index, ex, r, &cfg);
        for s in &p.slots {
            for n in &s.neighbours {
                assert!(nearest.contains(&n.example.as_str()), "{}: neighbour {:?} not among {nearest:?}", ex.text, n.example);
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no slot neighbours to check");
}

/// The factored start ⊕ end form (used by `prefilter`) stands for exactly the vectors
/// `span_vectors` pools.
#[test]
fn factored_spans_rebuild_the_start_end_vectors() {
    let texts = smarthome_queries();
    let examples: Vec<Example> = texts.iter().map(|t| Example::from_text(t, None)).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoded = encoder().encode(&refs, 8).unwrap();
    for (ex, enc) in examples.iter().zip(&encoded) {
        let spans = candidate_spans(ex.words.len(), 10);
        let sv = nearspan::spans::span_vectors(enc, &ex.words, spans.clone(), SpanPooling::StartEnd);
        let f = nearspan::spans::factored_span_vectors(enc, &ex.words, spans);
        assert_eq!(f.spans, sv.spans);
        let d = enc.dim;
        assert!(f.firsts.len() / d <= ex.words.len() && f.lasts.len() / d <= ex.words.len());
        for (i, &(a, b, scale)) in f.pairs.iter().enumerate() {
            let (a, b) = (a as usize, b as usize);
            let rebuilt: Vec<f32> = f.firsts[a * d..(a + 1) * d].iter().chain(&f.lasts[b * d..(b + 1) * d]).map(|x| x * scale).collect();
            for (x, y) in rebuilt.iter().zip(sv.vector(i)) {
                assert!((x - y).abs() < 1e-6, "{}: span {i}", ex.text);
            }
        }
    }
}
