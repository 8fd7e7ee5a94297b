//! `nearspan::data`: readers on the real benchmark files, the BIO round trip, the JSONL
//! format, and one test per malformed input, each checking that the error names the file
//! and the line.

use std::path::{Path, PathBuf};

use nearspan::data::*;

/// A path under ../shared/data; fails (never skips) when the data is absent.
fn shared(rel: &str) -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")).join(rel);
    assert!(p.exists(), "{} is missing: these tests read the real data from ../shared/data", p.display());
    p
}

fn fewshot_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shot in [1, 5] {
        for fold in 1..=7 {
            out.push(shared(&format!("snips_fewshot/xval_snips_shot_{shot}_out_{fold}/test.json")));
        }
    }
    out
}

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Asserts the error message names `file` and contains every one of `parts`.
fn assert_err(err: impl std::fmt::Display, file: &str, parts: &[&str]) {
    let msg = err.to_string();
    assert!(msg.contains(file), "message {msg:?} does not name {file}");
    for part in parts {
        assert!(msg.contains(part), "message {msg:?} lacks {part:?}");
    }
}

fn words_of(e: &Example) -> Vec<&str> {
    (0..e.words.len()).map(|i| e.word_text(i)).collect()
}

// ---------- words and BIO ----------

#[test]
fn segment_words_splits_whitespace_and_punctuation() {
    let text = "Turn on the lights. it's 21.5°C, ¿qué?  café—now 官方";
    let e = Example::from_text(text, None);
    assert_eq!(
        words_of(&e),
        [
            "Turn", "on", "the", "lights", ".", "it", "'", "s", "21", ".", "5°C", ",", "¿", "qué", "?",
            "café", "—", "now", "官", "方"
        ]
    );
    assert!(segment_words("").is_empty());
    assert!(segment_words(" \t\n ").is_empty());
    // Offsets are characters: "é" is one.
    assert_eq!(segment_words("é b"), [Word { start: 0, end: 1 }, Word { start: 2, end: 3 }]);
}

#[test]
fn char_slice_counts_characters_and_clamps() {
    assert_eq!(char_slice("café au lait", 2, 4), "fé");
    assert_eq!(char_slice("abc", 1, 99), "bc");
    assert_eq!(char_slice("abc", 5, 2), "");
}

#[test]
fn from_words_builds_spans_and_back() {
    let e = Example::from_words(
        &["play", "the", "beatles", "on", "spotify"],
        &["O", "O", "B-artist", "O", "B-service"],
        Some("PlayMusic".into()),
    )
    .unwrap();
    assert_eq!(e.text, "play the beatles on spotify");
    assert_eq!(e.spans.len(), 2);
    assert_eq!(e.span_text(&e.spans[0]), "beatles");
    assert_eq!((e.spans[0].start, e.spans[0].end, e.spans[0].word_start, e.spans[0].word_end), (9, 16, 2, 3));
    assert_eq!(e.to_bio(), ["O", "O", "B-artist", "O", "B-service"]);
}

#[test]
fn adjacent_same_label_spans_stay_two() {
    let e = Example::from_words(&["a", "b", "c"], &["B-x", "B-x", "I-x"], None).unwrap();
    let got: Vec<_> = e.spans.iter().map(|s| (s.word_start, s.word_end, e.span_text(s))).collect();
    assert_eq!(got, [(0, 1, "a"), (1, 3, "b c")]);
    assert_eq!(e.to_bio(), ["B-x", "B-x", "I-x"]);
}

#[test]
fn inside_without_begin_is_rejected() {
    let err = Example::from_words(&["a", "b"], &["O", "I-artist"], None).unwrap_err();
    assert!(err.to_string().contains("I-artist follows O (IOB2 requires B- first)"), "{err}");
    assert_eq!(err.word(), Some(2));
    let err = Example::from_words(&["a", "b"], &["B-album", "I-artist"], None).unwrap_err();
    assert!(err.to_string().contains("I-artist follows B-album"), "{err}");
    assert!(Example::from_words(&["a"], &["I-x"], None).is_err());
}

#[test]
fn bad_tags_and_words_are_rejected() {
    for tag in ["B-", "X-y", "b-x", "", "OO"] {
        assert!(
            matches!(Example::from_words(&["a"], &[tag], None), Err(BioError::BadTag { .. })),
            "{tag:?} accepted"
        );
    }
    assert_eq!(
        Example::from_words(&["a", "b"], &["O"], None).unwrap_err().to_string(),
        "tag count 1 != word count 2"
    );
    assert!(matches!(Example::from_words(&["a b"], &["O"], None), Err(BioError::BadWord { .. })));
    assert!(matches!(Example::from_words(&[""], &["O"], None), Err(BioError::BadWord { .. })));
}

#[test]
fn format_names_round_trip() {
    for f in Format::ALL {
        assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
    }
    assert_eq!("JointBERT".parse::<Format>().unwrap(), Format::JointBert);
    let err = "csv".parse::<Format>().unwrap_err().to_string();
    assert!(err.contains("csv") && err.contains("jointbert, fewshot, clinc, conll, jsonl"), "{err}");
}

// ---------- real data ----------

fn split_sizes(d: &Dataset) -> Vec<(&str, usize)> {
    d.splits.iter().map(|s| (s.name.as_str(), s.examples.len())).collect()
}

#[test]
fn jointbert_atis_and_snips_load_with_published_counts() {
    let atis = load(&shared("atis"), None).unwrap();
    assert_eq!(atis.format, Format::JointBert);
    assert_eq!(split_sizes(&atis), [("train", 4478), ("dev", 500), ("test", 893)]);
    let multi =
        atis.splits[0].examples.iter().filter(|e| e.intent.as_deref().is_some_and(|i| i.contains('#')));
    assert!(multi.count() > 0, "ATIS multi-intent labels such as atis_flight#atis_airfare must be kept");
    let snips = load(&shared("snips"), None).unwrap();
    assert_eq!(split_sizes(&snips), [("train", 13084), ("dev", 700), ("test", 700)]);
    // A split folder alone is one split.
    let dev = load(&shared("snips/dev"), None).unwrap();
    assert_eq!(split_sizes(&dev), [("dev", 700)]);
}

#[test]
fn conll_loads_with_published_counts() {
    let d = load(&shared("conll2003"), None).unwrap();
    assert_eq!(d.format, Format::Conll);
    assert_eq!(split_sizes(&d), [("train", 14041), ("valid", 3250), ("test", 3453)]);
    let tokens: Vec<usize> =
        d.splits.iter().map(|s| s.examples.iter().map(|e| e.words.len()).sum()).collect();
    assert_eq!(tokens, [203_621, 51_362, 46_435]);
    assert!(d.splits.iter().all(|s| s.examples.iter().all(|e| e.intent.is_none())));
    let one = load(&shared("conll2003/valid.txt"), None).unwrap();
    assert_eq!(split_sizes(&one), [("valid", 3250)]);
}

#[test]
fn clinc_loads_with_published_counts() {
    let path = shared("clinc150/data_full.json");
    assert_eq!(detect_format(&path).unwrap(), Format::Clinc);
    let d = load(&path, None).unwrap();
    assert_eq!(
        split_sizes(&d),
        [
            ("train", 15000),
            ("val", 3000),
            ("test", 4500),
            ("oos_train", 100),
            ("oos_val", 100),
            ("oos_test", 1000)
        ]
    );
    let intents: std::collections::BTreeSet<_> =
        d.splits[0].examples.iter().filter_map(|e| e.intent.clone()).collect();
    assert_eq!(intents.len(), 150);
    assert!(d.splits.iter().all(|s| s.examples.iter().all(|e| e.spans.is_empty() && !e.words.is_empty())));
}

#[test]
fn fewshot_loads_with_published_counts() {
    // (domain, 1-shot support, 5-shot support) from shared/data/snips_fewshot/SOURCE.md.
    let table = [
        ("GetWeather", 646, 2941),
        ("PlayMusic", 742, 3293),
        ("AddToPlaylist", 305, 1357),
        ("RateBook", 453, 2011),
        ("SearchScreeningEvent", 421, 1867),
        ("BookRestaurant", 941, 4266),
        ("SearchCreativeWork", 120, 646),
    ];
    for (k, path) in fewshot_files().iter().enumerate() {
        let (shot, (domain, s1, s5)) = (if k < 7 { 1 } else { 5 }, table[k % 7]);
        assert_eq!(detect_format(path).unwrap(), Format::FewShot, "{}", path.display());
        let domains = read_fewshot(path).unwrap();
        assert_eq!(domains.len(), 1);
        assert_eq!(domains[0].0, domain);
        let episodes = &domains[0].1;
        assert_eq!(episodes.len(), 100);
        let per_query = if shot == 1 { 20 } else { 10 };
        assert!(episodes.iter().all(|e| e.query.len() == per_query));
        let support: usize = episodes.iter().map(|e| e.support.len()).sum();
        assert_eq!(support, if shot == 1 { s1 } else { s5 }, "{}", path.display());
        let d = load(path, None).unwrap();
        assert_eq!(split_sizes(&d), [("support", support), ("query", 100 * per_query)]);
    }
}

/// The tags as written in the files, read here without the library.
fn raw_jointbert_tags(split_dir: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(split_dir.join("seq.out")).unwrap();
    text.lines().map(|l| l.split_whitespace().map(String::from).collect()).collect()
}

fn raw_conll_tags(file: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = vec![Vec::new()];
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols.first() {
            None => out.push(Vec::new()),
            Some(&"-DOCSTART-") => {}
            Some(_) => out.last_mut().unwrap().push(cols[cols.len() - 1].to_string()),
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn raw_fewshot_tags(file: &Path) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    let (mut support, mut query) = (Vec::new(), Vec::new());
    let tags = |part: &serde_json::Value| -> Vec<Vec<String>> {
        serde_json::from_value(part["seq_outs"].clone()).unwrap()
    };
    for episodes in v.as_object().unwrap().values() {
        for e in episodes.as_array().unwrap() {
            support.extend(tags(&e["support"]));
            query.extend(tags(&e["batch"]));
        }
    }
    (support, query)
}

/// tags → spans → tags gives back the file's tags, line for line.
fn assert_round_trip(what: &str, examples: &[Example], raw: &[Vec<String>]) {
    assert_eq!(examples.len(), raw.len(), "{what}: example count");
    for (i, (e, tags)) in examples.iter().zip(raw).enumerate() {
        assert_eq!(&e.to_bio(), tags, "{what}: sentence {}", i + 1);
        let again = spans_to_tags(e.words.len(), &tags_to_spans(tags, &e.words).unwrap());
        assert_eq!(&again, tags, "{what}: sentence {}", i + 1);
    }
}

#[test]
fn bio_round_trip_is_lossless_on_every_shipped_file() {
    let mut checked = 0;
    for name in ["atis", "snips"] {
        for split in load(&shared(name), None).unwrap().splits {
            assert_round_trip(
                &format!("{name}/{}", split.name),
                &split.examples,
                &raw_jointbert_tags(&split.source),
            );
            checked += split.examples.len();
        }
    }
    for split in load(&shared("conll2003"), None).unwrap().splits {
        assert_round_trip(&format!("conll/{}", split.name), &split.examples, &raw_conll_tags(&split.source));
        checked += split.examples.len();
    }
    for path in fewshot_files() {
        let d = load(&path, None).unwrap();
        let (support, query) = raw_fewshot_tags(&path);
        assert_round_trip(&format!("{} support", path.display()), &d.splits[0].examples, &support);
        assert_round_trip(&format!("{} query", path.display()), &d.splits[1].examples, &query);
        checked += support.len() + query.len();
    }
    // ATIS 5871 + SNIPS 14484 + CoNLL 20744 + few-shot 20009 support and 21000 query sentences.
    assert_eq!(checked, 82_108);
}

#[test]
fn words_keep_the_file_tokens() {
    let split = load(&shared("snips/test"), None).unwrap().splits.remove(0);
    let raw = std::fs::read_to_string(shared("snips/test/seq.in")).unwrap();
    for (e, line) in split.examples.iter().zip(raw.lines()) {
        let want: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words_of(e), want);
        assert_eq!(e.text, want.join(" "));
    }
}

#[test]
fn stats_report_widths_and_counts() {
    let d = load(&shared("snips"), None).unwrap();
    let s = stats(&d);
    let train = &s.splits[0];
    assert_eq!((train.name.as_str(), train.examples), ("train", 13084));
    assert_eq!(train.intents.len(), 7);
    assert_eq!(train.intents.values().sum::<usize>(), 13084);
    assert_eq!(train.slot_labels.values().sum::<usize>(), train.spans);
    let cov = &train.width_coverage;
    assert_eq!(cov.len(), COVERAGE_MAX_WIDTH);
    assert!(cov.windows(2).all(|w| w[0].fraction <= w[1].fraction));
    assert!(cov[0].fraction > 0.3 && cov[11].fraction > 0.99, "{cov:?}");
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["splits"][0]["width_coverage"][0]["max_width"], 1);

    let small = Dataset {
        format: Format::Jsonl,
        splits: vec![Split {
            name: "x".into(),
            source: "x.jsonl".into(),
            examples: vec![
                Example::from_words(&["a", "b", "c"], &["B-x", "I-x", "B-y"], Some("i".into())).unwrap(),
                Example::from_words(&["d"], &["O"], None).unwrap(),
            ],
        }],
    };
    let s = &stats(&small).splits[0];
    assert_eq!((s.examples, s.spans, s.max_span_width, s.examples_with_intent, s.words), (2, 2, 2, 1, 4));
    assert_eq!((s.examples_with_a_repeated_label, s.repeated_label_spans), (0, 0));
    assert_eq!((s.width_coverage[0].spans, s.width_coverage[0].fraction), (1, 0.5));
    assert_eq!(s.width_coverage[1].fraction, 1.0);

    // "from oslo to rome via paris": three cities, two beyond the first.
    let trip = Example::from_words(&["from", "oslo", "to", "rome", "via", "paris", "at", "9"], &["O", "B-city", "O", "B-city", "O", "B-city", "O", "B-time"], None).unwrap();
    let one = |examples| Dataset { format: Format::Jsonl, splits: vec![Split { name: "x".into(), source: "x.jsonl".into(), examples }] };
    let s = &stats(&one(vec![trip.clone(), trip])).splits[0];
    assert_eq!((s.examples_with_a_repeated_label, s.repeated_label_spans), (2, 4));
}

// ---------- JSONL ----------

#[test]
fn jsonl_reads_offsets_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let content = "{\"text\": \"Turn on the café lights.\", \"intent\": \"turn_on\", \"spans\": [{\"start\": 17, \"end\": 23, \"label\": \"device\"}, {\"start\": 12, \"end\": 16, \"label\": \"room\"}]}\n\
                   \n\
                   {\"text\": \"hello\"}\n   \n{\"text\": \"what's up\", \"intent\": null, \"spans\": []}";
    let path = write(dir.path(), "a.jsonl", content.as_bytes());
    let examples = read_jsonl(&path).unwrap();
    assert_eq!(examples.len(), 3);
    let e = &examples[0];
    let spans: Vec<_> =
        e.spans.iter().map(|s| (e.span_text(s), s.label.as_str(), s.word_start, s.word_end)).collect();
    assert_eq!(spans, [("café", "room", 3, 4), ("lights", "device", 4, 5)], "sorted by start");
    assert_eq!(e.to_bio(), ["O", "O", "O", "B-room", "B-device", "O"]);
    assert_eq!((examples[1].intent.as_deref(), examples[1].spans.len()), (None, 0));

    let mut out = Vec::new();
    write_jsonl(&mut out, &examples).unwrap();
    let back = read_jsonl(&write(dir.path(), "b.jsonl", &out)).unwrap();
    assert_eq!(back, examples);
    assert_eq!(detect_format(&path).unwrap(), Format::Jsonl);
    let d = load(&path, None).unwrap();
    assert_eq!(split_sizes(&d), [("a", 3)]);
}

#[test]
fn jsonl_written_from_pretokenized_data_reads_back_with_same_offsets() {
    let split = load(&shared("atis/test"), None).unwrap().splits.remove(0);
    let mut out = Vec::new();
    write_jsonl(&mut out, &split.examples).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let back = read_jsonl(&write(dir.path(), "atis.jsonl", &out)).unwrap();
    assert_eq!(back.len(), split.examples.len());
    for (a, b) in split.examples.iter().zip(&back) {
        let key = |e: &Example| e.spans.iter().map(|s| (s.start, s.end, s.label.clone())).collect::<Vec<_>>();
        assert_eq!((&a.text, &a.intent, key(a)), (&b.text, &b.intent, key(b)));
    }
}

/// One bad line among good ones: the error names the file and that line.
fn jsonl_error(bad_line: &str, line: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut content = String::new();
    for _ in 1..line {
        content.push_str("{\"text\": \"turn on the lights\"}\n");
    }
    content.push_str(bad_line);
    content.push('\n');
    let path = write(dir.path(), "bad.jsonl", content.as_bytes());
    read_jsonl(&path).unwrap_err().to_string()
}

#[test]
fn jsonl_malformed_lines_name_file_and_line() {
    let cases: &[(&str, usize, &[&str])] = &[
        (r#"{"intent": "x"}"#, 4, &["missing field `text`"]),
        (r#"{"text": "a b", "spams": []}"#, 2, &["unknown field `spams`"]),
        (
            r#"{"text": "a b", "spans": [{"start": 0, "end": 1, "lable": "x"}]}"#,
            3,
            &["unknown field `lable`"],
        ),
        (
            r#"{"text": "turn on the kitchen lights", "spans": [{"start": 10, "end": 40, "label": "x"}]}"#,
            7,
            &["span 10..40 is outside the text (26 chars)"],
        ),
        (
            r#"{"text": "turn on the kitchen", "spans": [{"start": 0, "end": 7, "label": "a"}, {"start": 5, "end": 11, "label": "b"}]}"#,
            3,
            &["spans 0..7 and 5..11 overlap"],
        ),
        (
            r#"{"text": "turn on the lights", "spans": [{"start": 2, "end": 7, "label": "x"}]}"#,
            9,
            &["span 2..7", "does not start on a word boundary"],
        ),
        (
            r#"{"text": "turn on the lights", "spans": [{"start": 0, "end": 6, "label": "x"}]}"#,
            1,
            &["does not end on a word boundary"],
        ),
        (
            r#"{"text": "turn on", "spans": [{"start": 3, "end": 3, "label": "x"}]}"#,
            2,
            &["span 3..3 is empty"],
        ),
        (r#"{"text": "turn on", "spans": [{"start": 0, "end": 4, "label": " "}]}"#, 2, &["empty label"]),
        (
            r#"{"text": "turn on", "spans": [{"start": 0, "end": 4, "label": "a"}, {"start": 0, "end": 4, "label": "a"}]}"#,
            5,
            &["overlap"],
        ),
        (r#"{"text": "unterminated"#, 6, &["EOF"]),
        (r#"["text"]"#, 2, &["expected a JSON object"]),
        (r#"{"text": 5}"#, 2, &["invalid type"]),
    ];
    for (bad, line, parts) in cases {
        let msg = jsonl_error(bad, *line);
        assert_err(&msg, "bad.jsonl", &[&format!("line {line}")]);
        for p in *parts {
            assert!(msg.contains(p), "{bad}: {msg:?} lacks {p:?}");
        }
    }
}

#[test]
fn jsonl_invalid_utf8_names_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "latin1.jsonl", b"{\"text\": \"ok\"}\n\n{\"text\": \"caf\xe9\"}\n");
    assert_err(read_jsonl(&path).unwrap_err(), "latin1.jsonl", &["line 3: invalid UTF-8"]);
}

#[test]
fn jsonl_accepts_crlf_and_bom() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        write(dir.path(), "win.jsonl", "\u{feff}{\"text\": \"a b\"}\r\n{\"text\": \"c\"}\r\n".as_bytes());
    let e = read_jsonl(&path).unwrap();
    assert_eq!((e[0].text.as_str(), e[1].text.as_str()), ("a b", "c"));
}

// ---------- malformed JointBERT / CoNLL / few-shot ----------

fn jointbert_dir(seq_in: &str, seq_out: &str, label: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "seq.in", seq_in.as_bytes());
    write(dir.path(), "seq.out", seq_out.as_bytes());
    write(dir.path(), "label", label.as_bytes());
    dir
}

#[test]
fn jointbert_tag_count_mismatch_names_line() {
    let dir = jointbert_dir("a b \nc d e f \n", "O O \nO O O \n", "x\ny\n");
    let err = load(dir.path(), Some(Format::JointBert)).unwrap_err();
    assert_err(err, "seq.out", &["line 2: tag count 3 != word count 4"]);
}

#[test]
fn jointbert_inside_after_outside_names_line() {
    let dir = jointbert_dir("a\nb\nc\nd\ne f\n", "O\nO\nO\nO\nO I-artist\n", "x\nx\nx\nx\nx\n");
    let err = load(dir.path(), None).unwrap_err();
    assert_err(err, "seq.out", &["line 5: I-artist follows O (IOB2 requires B- first)"]);
}

#[test]
fn jointbert_line_count_mismatch_names_both_files() {
    let dir = jointbert_dir("a\nb\n", "O\nO\n", "x\n");
    let err = load(dir.path(), None).unwrap_err().to_string();
    assert!(err.contains("seq.in: 2 lines") && err.contains("label: 1 lines"), "{err}");
}

#[test]
fn jointbert_invalid_utf8_and_empty_lines_name_line() {
    let dir = jointbert_dir("a\nb\n", "O\nO\n", "x\n");
    write(dir.path(), "seq.in", b"a\nb\xff\n");
    write(dir.path(), "label", b"x\ny\n");
    assert_err(load(dir.path(), None).unwrap_err(), "seq.in", &["line 2: invalid UTF-8"]);
    let dir = jointbert_dir("a\n  \n", "O\n\n", "x\ny\n");
    assert_err(load(dir.path(), None).unwrap_err(), "seq.in", &["line 2", "empty utterance"]);
    let dir = jointbert_dir("a\nb\n", "O\nO\n", "x\n \n");
    assert_err(load(dir.path(), None).unwrap_err(), "label", &["line 2", "empty intent"]);
}

#[test]
fn jointbert_root_with_split_folders() {
    let root = tempfile::tempdir().unwrap();
    for name in ["test", "train", "extra"] {
        let d = root.path().join(name);
        std::fs::create_dir(&d).unwrap();
        write(&d, "seq.in", b"play x \n");
        write(&d, "seq.out", b"O B-a \n");
        write(&d, "label", b"Play\n");
    }
    let d = load(root.path(), None).unwrap();
    assert_eq!(split_sizes(&d), [("train", 1), ("test", 1), ("extra", 1)]);
}

#[test]
fn conll_tag_error_names_the_token_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\nsaid VBD B-VP O\nBlackburn NNP B-NP I-PER\n";
    let path = write(dir.path(), "train.txt", text.as_bytes());
    assert_err(load(&path, None).unwrap_err(), "train.txt", &["line 8: I-PER follows O"]);
    let path = write(dir.path(), "cols.txt", b"EU B-ORG\n\nlonely\n");
    assert_err(load(&path, None).unwrap_err(), "cols.txt", &["line 3", "got 1"]);
    let path = write(dir.path(), "two.txt", b"EU B-ORG\nrejects O\n\n\n\nGerman B-MISC\n");
    let d = load(&path, None).unwrap();
    assert_eq!(split_sizes(&d), [("two", 2)]);
}

#[test]
fn fewshot_structure_errors_name_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"seq_ins": [["a"]], "seq_outs": [["O"]], "labels": ["X"]}"#;
    let bad_count = r#"{"seq_ins": [["a"], ["b"]], "seq_outs": [["O"]], "labels": ["X", "X"]}"#;
    let bad_tag =
        r#"{"seq_ins": [["a"], ["b", "c"]], "seq_outs": [["O"], ["O", "I-x"]], "labels": ["X", "X"]}"#;
    let file = |support: &str, batch: &str| {
        format!(
            r#"{{"Dom": [{{"support": {ok}, "batch": {ok}}}, {{"support": {support}, "batch": {batch}}}]}}"#
        )
    };
    let path = write(dir.path(), "test.json", file(ok, bad_count).as_bytes());
    assert_err(
        read_fewshot(&path).unwrap_err(),
        "test.json",
        &["Dom episode 2 batch", "2 seq_ins but 1 seq_outs"],
    );
    let path = write(dir.path(), "test.json", file(bad_tag, ok).as_bytes());
    assert_err(
        read_fewshot(&path).unwrap_err(),
        "test.json",
        &["Dom episode 2 support sentence 2", "I-x follows O"],
    );
    let path = write(dir.path(), "test.json", b"{\"Dom\": [\n{\"support\": 3}]}");
    assert_err(read_fewshot(&path).unwrap_err(), "test.json", &["line 2"]);
}

#[test]
fn detection_of_unknown_inputs_explains() {
    let dir = tempfile::tempdir().unwrap();
    assert_err(detect_format(dir.path()).unwrap_err(), &dir.path().display().to_string(), &["pass one of"]);
    let csv = write(dir.path(), "x.csv", b"a,b\n");
    assert_err(detect_format(&csv).unwrap_err(), "x.csv", &["extension"]);
    let json = write(dir.path(), "x.json", br#"{"a": [1, 2]}"#);
    assert_err(detect_format(&json).unwrap_err(), "x.json", &["neither CLINC150"]);
    let json = write(dir.path(), "y.json", b"[1, 2]");
    assert_err(detect_format(&json).unwrap_err(), "y.json", &["cannot tell the dataset format"]);
    assert!(matches!(detect_format(&dir.path().join("nope.jsonl")), Err(DataError::Io { .. })));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(load(empty.path(), Some(Format::Conll)), Err(DataError::NoSplits { .. })));
}

// ---------- the example domain ----------

#[test]
fn smarthome_example_domain_is_valid_and_balanced() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/smarthome.jsonl"));
    let d = load(path, None).unwrap();
    let s = &stats(&d).splits[0];
    assert!(s.examples >= 60, "{} examples", s.examples);
    assert_eq!(s.examples_with_intent, s.examples, "every example has an intent");
    assert!((5..=6).contains(&s.intents.len()), "{:?}", s.intents);
    assert!(s.intents.values().all(|&n| n >= 8), "{:?}", s.intents);
    assert!((5..=7).contains(&s.slot_labels.len()), "{:?}", s.slot_labels);
    assert!(s.slot_labels.values().all(|&n| n >= 5), "{:?}", s.slot_labels);

    let queries = std::fs::read_to_string(path.with_file_name("smarthome_queries.txt")).unwrap();
    let labeled: std::collections::HashSet<String> =
        d.splits[0].examples.iter().map(|e| e.text.to_lowercase()).collect();
    let queries: Vec<&str> = queries.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(queries.len() >= 8);
    for q in queries {
        assert!(!labeled.contains(&q.to_lowercase()), "query {q:?} is also a labeled example");
    }
}
