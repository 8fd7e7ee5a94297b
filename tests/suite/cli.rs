//! The `nearspan` binary as a user meets it: the index/query/eval workflow on the
//! smart-home examples, and bad input (exit code 2, the file and line on stderr,
//! nothing on stdout).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::{model_dir, shared};

fn example_file(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).join(name)
}

fn smarthome() -> PathBuf {
    example_file("smarthome.jsonl")
}

/// The default model as an absolute path (the binary runs in a temporary folder).
fn model() -> PathBuf {
    std::fs::canonicalize(model_dir()).expect("canonical model folder")
}

/// Runs the binary in `dir` with the default model.
fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nearspan"))
        .args(args)
        .current_dir(dir)
        .env("NEARSPAN_MODEL", model())
        .env_remove("RUST_LOG")
        .output()
        .expect("run the nearspan binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run_in(dir, args);
    assert!(o.status.success(), "nearspan {args:?} failed ({:?}): {}", o.status, stderr(&o));
    stdout(&o)
}

/// Asserts exit code 2, nothing on stdout, and a stderr naming every one of `parts`.
fn fails(dir: &Path, args: &[&str], parts: &[&str]) -> String {
    let o = run_in(dir, args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "nearspan {args:?}: expected exit code 2, got {:?}; stderr: {err}", o.status);
    assert!(o.stdout.is_empty(), "nearspan {args:?}: printed to stdout on error: {:?}", stdout(&o));
    for part in parts {
        assert!(err.contains(part), "nearspan {args:?}: stderr {err:?} lacks {part:?}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn n_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.trim().is_empty()).count()
}

/// `index build` of the smart-home examples into `dir/x.nsi`.
fn build_index(dir: &Path) -> PathBuf {
    let out = dir.join("x.nsi");
    let printed = ok(dir, &["index", "build", "--examples", s(&smarthome()), "--out", s(&out)]);
    assert!(printed.contains("x.nsi"), "build output {printed:?}");
    assert!(out.is_file());
    out
}

fn info(dir: &Path, index: &Path) -> Value {
    json(&ok(dir, &["index", "info", "--index", s(index)]))
}

#[test]
fn build_info_query_and_add() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let index = build_index(d);

    let i = info(d, &index);
    let n = n_lines(&smarthome()) as u64;
    assert_eq!(i["examples"], n, "{i}");
    // Written at the oldest version that holds it: 2, unless the backend is ivf (3).
    assert_eq!(i["format_version"], 2, "{i}");
    assert_eq!(i["hnsw"]["graph_precision"], "f32", "{i}");
    assert!(i["spans"].as_u64().unwrap() > n, "{i}");
    let labels: Vec<&str> = i["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    for l in ["device", "room", "artist", "city", "O"] {
        assert!(labels.contains(&l), "label {l} missing from {labels:?}");
    }

    // --json: one parseable line per text.
    let texts = ["turn on the kitchen lights", "what's the weather in Paris tomorrow"];
    let out = ok(d, &["query", "--index", s(&index), "--json", texts[0], texts[1]]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), texts.len(), "{out}");
    let preds: Vec<Value> = lines.iter().map(|l| json(l)).collect();
    for (p, t) in preds.iter().zip(texts) {
        assert_eq!(p["text"], t);
        assert!(p["intent"]["label"].is_string(), "{p}");
    }
    let slots = preds[0]["slots"].as_array().unwrap();
    assert!(
        slots.iter().any(|s| s["label"] == "device" && s["text"] == "lights"),
        "no device slot \"lights\" in {}",
        preds[0]
    );
    assert_eq!(preds[0]["intent"]["label"], "turn_on", "{}", preds[0]);

    // The table marks the slots in the text.
    let table = ok(d, &["query", "--index", s(&index), texts[0]]);
    assert!(table.contains("[lights](device)"), "{table}");
    assert!(table.contains("turn_on"), "{table}");

    // --format examples writes nearspan JSONL that reads back.
    let out = ok(d, &["query", "--index", s(&index), "--format", "examples", texts[0], texts[1]]);
    let path = d.join("predicted.jsonl");
    std::fs::write(&path, &out).unwrap();
    let back = nearspan::data::read_jsonl(&path)
        .unwrap_or_else(|e| panic!("--format examples output does not re-read: {e}\n{out}"));
    assert_eq!(back.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(), texts);
    assert!(back[0].spans.iter().any(|sp| sp.label == "device" && back[0].span_text(sp) == "lights"), "{out}");
    assert_eq!(back[0].intent.as_deref(), Some("turn_on"));

    // index add: only the new examples are added; the file grows in place.
    let more = d.join("more.jsonl");
    std::fs::write(
        &more,
        concat!(
            r#"{"text": "play some songs by Norah Jones", "intent": "play_music", "spans": [{"start": 19, "end": 30, "label": "artist"}]}"#,
            "\n\n",
            r#"{"text": "open the garage door", "intent": "open", "spans": [{"start": 9, "end": 20, "label": "device"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = ok(d, &["index", "add", "--index", s(&index), "--examples", s(&more)]);
    assert!(out.contains("added 2 examples"), "{out}");
    let after = info(d, &index);
    assert_eq!(after["examples"], n + 2, "{after}");
    assert!(after["spans"].as_u64() > i["spans"].as_u64(), "{after}");
    // The added intent is now answerable.
    let out = ok(d, &["query", "--index", s(&index), "--json", "open the garage door"]);
    assert_eq!(json(out.trim())["intent"]["label"], "open", "{out}");
}

#[test]
fn eval_scores_an_index_and_prediction_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let index = build_index(d);
    // Indexed examples label themselves.
    let report = json(&ok(d, &["eval", "--index", s(&index), "--data", s(&smarthome())]));
    assert_eq!(report["examples"], n_lines(&smarthome()) as u64, "{report}");
    let f1 = report["micro"]["f1"].as_f64().unwrap();
    assert!(f1 > 0.9 && f1 <= 1.0, "micro F1 {f1} on the indexed data: {report}");
    assert!(report["intent_accuracy"].as_f64().unwrap() > 0.9, "{report}");

    // Hand-computed: gold has 3 slots; predicted 4, of which 2 match.
    // P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7; intents 1 of 2 right; frames 1 of 2.
    let gold = d.join("gold.jsonl");
    let pred = d.join("pred.jsonl");
    std::fs::write(
        &gold,
        concat!(
            r#"{"text": "play the beatles now", "intent": "play", "spans": [{"start": 5, "end": 16, "label": "artist"}]}"#,
            "\n",
            r#"{"text": "weather in paris today", "intent": "weather", "spans": [{"start": 11, "end": 16, "label": "city"}, {"start": 17, "end": 22, "label": "date"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &pred,
        concat!(
            r#"{"text": "play the beatles now", "intent": "play", "spans": [{"start": 5, "end": 16, "label": "artist"}]}"#,
            "\n",
            r#"{"text": "weather in paris today", "intent": "other", "spans": [{"start": 0, "end": 7, "label": "city"}, {"start": 8, "end": 10, "label": "x"}, {"start": 11, "end": 16, "label": "city"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let r = json(&ok(d, &["eval", "--gold", s(&gold), "--pred", s(&pred)]));
    let close = |v: &Value, x: f64| (v.as_f64().unwrap() - x).abs() < 1e-9;
    assert!(close(&r["micro"]["precision"], 0.5), "{r}");
    assert!(close(&r["micro"]["recall"], 2.0 / 3.0), "{r}");
    assert!(close(&r["micro"]["f1"], 4.0 / 7.0), "{r}");
    assert_eq!(
        (&r["counts"]["tp"], &r["counts"]["fp"], &r["counts"]["fn"]),
        (&Value::from(2), &Value::from(2), &Value::from(1)),
        "{r}"
    );
    assert!(close(&r["intent_accuracy"], 0.5) && close(&r["frame_accuracy"], 0.5), "{r}");
    // "weather" and "in" touch no gold slot; "today" (date) is touched by nothing.
    let errors = &r["errors"];
    assert_eq!((&errors["spurious"], &errors["missed"], &errors["boundary"]), (&Value::from(2), &Value::from(1), &Value::from(0)), "{r}");
}

#[test]
fn bad_examples_are_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bad = d.join("bad.jsonl");
    std::fs::write(
        &bad,
        concat!(
            r#"{"text": "turn on the lamp", "intent": "turn_on", "spans": [{"start": 12, "end": 16, "label": "device"}]}"#,
            "\n",
            r#"{"text": "turn off the fan", "intent": "turn_off", "spans": [{"start": 13, "end": 17, "label": "device"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = d.join("bad.nsi");
    fails(d, &["index", "build", "--examples", s(&bad), "--out", s(&out)], &["bad.jsonl", "line 2"]);
    assert!(!out.exists(), "a failed build wrote {}", out.display());

    // Not JSON at all on line 2.
    std::fs::write(&bad, "{\"text\": \"turn on the lamp\"}\n{\"text\": \"oops\",\n").unwrap();
    fails(d, &["index", "build", "--examples", s(&bad), "--out", s(&out)], &["bad.jsonl", "line 2"]);

    let missing = d.join("missing.jsonl");
    fails(d, &["index", "build", "--examples", s(&missing), "--out", s(&out)], &["missing.jsonl"]);
    assert!(!out.exists());
}

#[test]
fn invalid_settings_fail_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("x.nsi");
    // With no model to load, only an argument error can be the answer.
    let o = Command::new(env!("CARGO_BIN_EXE_nearspan"))
        .args(["index", "build", "--examples", s(&smarthome()), "--out", s(&out), "--max-width", "0"])
        .env("NEARSPAN_MODEL", d.join("no-model-here"))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(o.stdout.is_empty());
    assert!(err.contains("--max-width") && err.contains('0'), "{err}");
    assert!(
        !err.contains("no-model-here") && !err.to_lowercase().contains("model"),
        "the model was loaded first: {err}"
    );
    assert!(!out.exists());
}

#[test]
fn damaged_and_foreign_index_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let index = build_index(d);
    let mut bytes = std::fs::read(&index).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let corrupt = d.join("corrupt.nsi");
    std::fs::write(&corrupt, &bytes).unwrap();
    fails(d, &["index", "info", "--index", s(&corrupt)], &["corrupt.nsi", "checksum"]);
    fails(d, &["query", "--index", s(&corrupt), "turn on the lights"], &["corrupt.nsi", "checksum"]);
    fails(d, &["index", "add", "--index", s(&corrupt), "--examples", s(&smarthome())], &["corrupt.nsi", "checksum"]);
    assert_eq!(std::fs::read(&corrupt).unwrap(), bytes, "a refused index was rewritten");

    let foreign = d.join("notes.txt");
    std::fs::write(&foreign, "these are not the vectors you are looking for\n").unwrap();
    fails(d, &["query", "--index", s(&foreign), "turn on the lights"], &["notes.txt", "not a nearspan index"]);
    fails(
        d,
        &["query", "--index", s(&smarthome()), "turn on the lights"],
        &["smarthome.jsonl", "not a nearspan index"],
    );
    fails(d, &["query", "--index", s(&d.join("absent.nsi")), "turn on the lights"], &["absent.nsi"]);
}

#[test]
fn data_stats_reads_snips_and_names_a_malformed_line() {
    let d = tempfile::tempdir().unwrap();
    let stats = json(&ok(d.path(), &["data", "stats", s(&shared("snips"))]));
    assert_eq!(stats["format"], "jointbert", "{stats}");
    let counts: Vec<(&str, u64)> = stats["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sp| (sp["name"].as_str().unwrap(), sp["examples"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts, [("train", 13084), ("dev", 700), ("test", 700)]);

    let split = d.path().join("train");
    std::fs::create_dir(&split).unwrap();
    std::fs::write(split.join("seq.in"), "play the beatles\nbook a table for two\nwhat is the weather\n").unwrap();
    std::fs::write(split.join("seq.out"), "O B-artist I-artist\nO O O B-count\nO O O O\n").unwrap();
    std::fs::write(split.join("label"), "PlayMusic\nBookRestaurant\nGetWeather\n").unwrap();
    fails(d.path(), &["data", "stats", s(d.path())], &["seq.out", "line 2", "tag count"]);
}

#[test]
fn help_exits_zero_for_every_command() {
    let d = tempfile::tempdir().unwrap();
    let commands: &[&[&str]] = &[
        &[],
        &["encode"],
        &["data"],
        &["data", "stats"],
        &["index"],
        &["index", "build"],
        &["index", "add"],
        &["index", "info"],
        &["query"],
        &["eval"],
        &["bench"],
        &["bench", "fewshot"],
        &["bench", "encoder"],
        &["bench", "train-step"],
        &["train", "detector"],
        &["train", "scorer"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = ok(d.path(), &args);
        assert!(out.contains("Usage:"), "nearspan {args:?}: {out}");
    }
    // A subcommand's help describes its own options.
    assert!(ok(d.path(), &["index", "build", "--help"]).contains("--max-width"));
    assert!(ok(d.path(), &["query", "--help"]).contains("--decoder"));
    assert!(ok(d.path(), &["query", "--help"]).contains("--detector-weight"));
}

/// Regression: library errors that quote their source were printed with the source
/// repeated (`absent.nsi: No such file or directory (os error 2): No such file or
/// directory (os error 2)`), and a missing examples file said "entity not found".
#[test]
fn error_messages_state_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let split = d.join("train");
    std::fs::create_dir(&split).unwrap();
    std::fs::write(split.join("seq.in"), "play the beatles\nbook a table for two\n").unwrap();
    std::fs::write(split.join("seq.out"), "O B-artist I-artist\nO O O B-count\n").unwrap();
    std::fs::write(split.join("label"), "PlayMusic\nBookRestaurant\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["index".into(), "info".into(), "--index".into(), s(&d.join("absent.nsi")).into()], "No such file"),
        (vec!["data".into(), "stats".into(), s(&d.join("absent.jsonl")).into()], "No such file"),
        (vec!["data".into(), "stats".into(), s(d).into()], "tag count"),
    ];
    for (args, cause) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = fails(d, &args, &[cause]);
        assert_eq!(err.matches(cause).count(), 1, "nearspan {args:?}: cause repeated: {err:?}");
    }
}

/// `train detector` fits a span detector on the smart-home examples, adapts it with
/// `--init`, and `query` / `eval` use it; a damaged or foreign detector file is refused
/// with its path named.
#[test]
fn train_scorer_on_held_out_examples_then_eval_and_query_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every other example indexed; the rest, which the index does not hold, fit the scorer.
    let lines: Vec<String> = std::fs::read_to_string(smarthome()).unwrap().lines().map(str::to_string).collect();
    let (indexed, held_out) = (d.join("indexed.jsonl"), d.join("held_out.jsonl"));
    std::fs::write(&indexed, lines.iter().step_by(2).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    std::fs::write(&held_out, lines.iter().skip(1).step_by(2).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let index = d.join("x.nsi");
    ok(d, &["index", "build", "--examples", s(&indexed), "--out", s(&index)]);
    let scorer = d.join("scorer.json");
    let printed = ok(d, &["train", "scorer", "--index", s(&index), "--data", s(&held_out), "--out", s(&scorer)]);
    assert!(printed.contains("slot scorer: 39 examples (0 left out") && printed.contains("scorer.json"), "{printed}");
    let fitted = json(&std::fs::read_to_string(&scorer).unwrap());
    assert_eq!(fitted["format"], "nearspan-slot-scorer/1");
    // eval with the scorer reaches the F1 that fitting printed for the same examples.
    let printed_f1: f64 = printed.split("slot F1 on them ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    let report = json(&ok(d, &["eval", "--index", s(&index), "--data", s(&held_out), "--scorer", s(&scorer)]));
    let f1 = 100.0 * report["micro"]["f1"].as_f64().unwrap();
    assert!((f1 - printed_f1).abs() < 0.01, "eval {f1} vs fitting's {printed_f1}");
    assert!(f1 > 50.0, "held-out smart-home slots with the scorer: {report}");
    // A scorer that calls nothing a slot removes every slot; the intent stays.
    let mut never = fitted.clone();
    never["min_logit"] = 1e6.into();
    let never_path = d.join("never.json");
    std::fs::write(&never_path, never.to_string()).unwrap();
    let out = json(ok(d, &["query", "--index", s(&index), "--scorer", s(&never_path), "--json", "turn off the bedroom lamp"]).trim());
    assert_eq!(out["slots"].as_array().unwrap().len(), 0, "{out}");
    assert_eq!(out["intent"]["label"], "turn_off", "{out}");

    // Indexed examples are left out of fitting; with nothing else it is refused, naming
    // the file, and nothing is written.
    let err = fails(d, &["train", "scorer", "--index", s(&index), "--data", s(&indexed), "--out", s(&d.join("y.json"))], &["indexed.jsonl", "all 39 of its examples are in the index"]);
    assert!(!d.join("y.json").exists(), "{err}");
    let mixed = d.join("mixed.jsonl");
    std::fs::write(&mixed, lines.iter().take(10).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let printed = ok(d, &["train", "scorer", "--index", s(&index), "--data", s(&mixed), "--out", s(&d.join("m.json"))]);
    assert!(printed.contains("slot scorer: 5 examples (5 left out"), "{printed}");
    fails(d, &["train", "scorer", "--index", s(&index), "--data", s(&held_out), "--scorer", s(&scorer), "--out", s(&d.join("y.json"))], &["--scorer"]);
    let broken = d.join("broken.json");
    std::fs::write(&broken, "{\"format\": \"nearspan-slot-scorer/1\"").unwrap();
    fails(d, &["query", "--index", s(&index), "--scorer", s(&broken), "x"], &["broken.json", "not a slot scorer"]);
    // A scorer fitted without a detector refuses one at query time, and the other way round.
    let det = d.join("det.json");
    ok(d, &["train", "detector", "--data", s(&indexed), "--epochs", "1", "--out", s(&det)]);
    fails(d, &["query", "--index", s(&index), "--scorer", s(&scorer), "--detector", s(&det), "x"], &["scorer.json", "without a span detector"]);
    let with_det = d.join("with_det.json");
    ok(d, &["train", "scorer", "--index", s(&index), "--data", s(&held_out), "--detector", s(&det), "--out", s(&with_det)]);
    assert_eq!(json(&std::fs::read_to_string(&with_det).unwrap())["with_detector"], true);
    fails(d, &["eval", "--index", s(&index), "--data", s(&held_out), "--scorer", s(&with_det)], &["with_det.json", "give it as --detector"]);
}

/// `bench fewshot --fit-scorer` on one fold of the real episodes (1 target episode, 3 dev
/// episodes): the chosen settings record the scorer, and `--dump-evidence` writes every
/// dev query span's evidence with its gold label.
#[test]
fn bench_fewshot_fits_a_scorer_on_dev_and_dumps_the_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (results, evidence) = (d.join("r.json"), d.join("ev.tsv"));
    let data = shared("snips_fewshot");
    let args = ["bench", "fewshot", "--data", s(&data), "--shots", "5", "--folds", "1", "--episodes", "1", "--dev-episodes", "3"];
    let mut with = args.to_vec();
    with.extend(["--fit-scorer", "--dump-evidence", s(&evidence), "--out", s(&results), "--key", "k"]);
    let printed = ok(d, &with);
    assert!(printed.contains("decided by the slot scorer fitted on dev"), "{printed}");
    let r = json(&std::fs::read_to_string(&results).unwrap());
    let chosen = &r["k"]["5shot"]["chosen_on_dev"]["GetWeather"]["scorer"];
    assert_eq!(chosen["weights"].as_array().unwrap().len(), 8, "{r}");
    assert!(chosen["min_logit"].is_number() && chosen["dev_f1"].as_f64().unwrap() > 0.0, "{r}");
    let text = std::fs::read_to_string(&evidence).unwrap();
    let (spans, gold): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| !l.contains("\tGOLD\t"));
    assert!(spans.iter().all(|l| l.split('\t').count() == 12), "{}", spans[0]);
    assert!(!gold.is_empty() && gold.iter().all(|l| l.starts_with("1\t")));
    // Every gold slot of the dump is also a candidate row that names its label.
    let first_gold: Vec<&str> = gold[0].split('\t').collect();
    let candidate = format!("\t{}\t{}\t", first_gold[4], first_gold[5]);
    assert!(spans.iter().any(|l| l.starts_with(&format!("{}\t", first_gold[..3].join("\t"))) && l.contains(&candidate) && l.ends_with(first_gold[6])));
    let mut no_tune = args.to_vec();
    no_tune.extend(["--fit-scorer", "--no-tune", "--out", s(&results)]);
    fails(d, &no_tune, &["--no-tune"]);
}

/// `bench fewshot --source-memory` on fold 7 (target SearchCreativeWork, dev
/// GetWeather) with a small SNIPS-format folder of BookRestaurant examples, whose city,
/// state and country slots the dev domain shares: each discount's dev F1 is printed, the
/// memory changes it, "no memory" (infinite discount) gives exactly the F1 of a run
/// without one, and the choice is recorded.
#[test]
fn bench_fewshot_source_memory_is_searched_apart_and_chosen_on_dev() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = shared("snips/train");
    let read = |f: &str| std::fs::read_to_string(train.join(f)).unwrap();
    let (words, tags, intents) = (read("seq.in"), read("seq.out"), read("label"));
    let mut rows: Vec<(&str, &str, &str)> = Vec::new();
    for ((w, t), i) in words.lines().zip(tags.lines()).zip(intents.lines()) {
        if i.trim() == "BookRestaurant" && t.contains("city") && rows.len() < 40 {
            rows.push((w, t, i));
        }
    }
    let memory = d.join("memory");
    std::fs::create_dir_all(memory.join("train")).unwrap();
    for (file, col) in [("seq.in", 0), ("seq.out", 1), ("label", 2)] {
        let text: String = rows.iter().map(|r| format!("{}\n", [r.0, r.1, r.2][col])).collect();
        std::fs::write(memory.join("train").join(file), text).unwrap();
    }
    let results = d.join("r.json");
    let data = shared("snips_fewshot");
    let args = ["bench", "fewshot", "--data", s(&data), "--shots", "5", "--folds", "7", "--episodes", "1", "--dev-episodes", "3", "--out", s(&results)];
    let dev_f1 = |printed: &str, what: &str| -> f64 {
        let line = printed.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what:?} in {printed}"));
        line.rsplit("F1 ").next().unwrap().split([' ', ',']).next().unwrap().parse().unwrap()
    };
    let without = ok(d, &args);
    let mut with = args.to_vec();
    with.extend(["--source-memory", s(&memory), "--key", "m"]);
    let printed = ok(d, &with);
    let plain = dev_f1(&without, "on dev GetWeather: F1");
    assert_eq!(dev_f1(&printed, "memory discount inf: F1"), plain, "{printed}");
    assert_ne!(dev_f1(&printed, "memory discount 0: F1"), plain, "the memory should change the evidence: {printed}");
    let r = json(&std::fs::read_to_string(&results).unwrap());
    let chosen = &r["m"]["5shot"]["chosen_on_dev"]["SearchCreativeWork"];
    assert!(chosen.get("memory_discount").is_some(), "{r}");
}

#[test]
fn train_detector_then_query_and_eval_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let index = build_index(d);
    let det = d.join("det.json");
    let printed = ok(d, &["train", "detector", "--data", s(&smarthome()), "--epochs", "3", "--out", s(&det)]);
    assert!(printed.contains("span detector:") && printed.contains("det.json"), "{printed}");
    let fitted = json(&std::fs::read_to_string(&det).unwrap());
    assert_eq!(fitted["hidden"], 8, "the default width");
    assert_eq!(fitted["w_width"].as_array().unwrap().len(), 8 * 10, "one row per width up to the default 10");
    assert_eq!(fitted["layer"], 3, "by default it reads the middle of the encoder's 6 layers");
    // The last layer: the file names no layer (as files from before the choice); asking
    // for all 6 layers by number is the same; a layer past the model's is refused.
    for (arg, name) in [("last", "last.json"), ("6", "six.json")] {
        ok(d, &["train", "detector", "--data", s(&smarthome()), "--epochs", "1", "--layer", arg, "--out", s(&d.join(name))]);
        let f = json(&std::fs::read_to_string(d.join(name)).unwrap());
        assert!(f.get("layer").is_none(), "--layer {arg}: {f}");
    }
    let two = json(&{
        ok(d, &["train", "detector", "--data", s(&smarthome()), "--epochs", "1", "--layer", "2", "--out", s(&d.join("two.json"))]);
        std::fs::read_to_string(d.join("two.json")).unwrap()
    });
    assert_eq!(two["layer"], 2);
    fails(d, &["train", "detector", "--data", s(&smarthome()), "--layer", "9", "--out", s(&d.join("x.json"))], &["layer 9", "6 layers"]);
    fails(d, &["train", "detector", "--data", s(&smarthome()), "--layer", "top", "--out", s(&d.join("x.json"))], &["\"top\" is not a layer"]);
    ok(d, &["query", "--index", s(&index), "--detector", s(&d.join("last.json")), "--json", "turn off the bedroom lamp"]);

    // An ensemble of 2 is one detector with both hidden layers; its first member is the
    // detector fitted above (same seed), so its first 8 output weights are halved.
    let ensemble = d.join("ensemble.json");
    let printed = ok(d, &["train", "detector", "--data", s(&smarthome()), "--epochs", "3", "--ensemble", "2", "--out", s(&ensemble)]);
    assert!(printed.contains("mean of 2"), "{printed}");
    let e = json(&std::fs::read_to_string(&ensemble).unwrap());
    assert_eq!(e["hidden"], 16);
    let (w1, w2) = (fitted["w_out"].as_array().unwrap(), e["w_out"].as_array().unwrap());
    for (a, b) in w1.iter().zip(w2) {
        assert!((a.as_f64().unwrap() / 2.0 - b.as_f64().unwrap()).abs() < 1e-6, "{a} / 2 against {b}");
    }
    assert_ne!(w2[0], w2[8], "the second member has its own seed");
    fails(d, &["train", "detector", "--data", s(&smarthome()), "--init", s(&det), "--ensemble", "2", "--out", s(&ensemble)], &["--ensemble", "--init"]);

    // Adapting keeps the shape and changes the weights.
    let adapted = d.join("adapted.json");
    ok(d, &["train", "detector", "--data", s(&smarthome()), "--init", s(&det), "--epochs", "2", "--batch", "4", "--hidden", "3", "--out", s(&adapted)]);
    let a = json(&std::fs::read_to_string(&adapted).unwrap());
    assert_eq!(a["hidden"], 8, "--init keeps the detector's own width");
    assert_eq!(a["layer"], 3, "--init keeps the detector's own layer");
    assert_ne!(a["w_out"], fitted["w_out"]);

    let out = ok(d, &["query", "--index", s(&index), "--detector", s(&adapted), "--json", "turn off the bedroom lamp"]);
    assert_eq!(json(out.trim())["intent"]["label"], "turn_off", "{out}");
    let report = json(&ok(d, &["eval", "--index", s(&index), "--data", s(&smarthome()), "--detector", s(&adapted), "--detector-weight", "0.2"]));
    assert!(report["micro"]["f1"].as_f64().unwrap() > 0.9, "indexed data with the detector: {report}");

    fails(d, &["query", "--index", s(&index), "--detector", s(&det), "--detector-weight", "3", "x"], &["--detector-weight 3"]);
    let broken = d.join("broken.json");
    std::fs::write(&broken, "{\"format\": \"nearspan-span-detector/1\", \"dim\": 384").unwrap();
    fails(d, &["query", "--index", s(&index), "--detector", s(&broken), "x"], &["broken.json", "not a span detector"]);
    let mut foreign = fitted.clone();
    foreign["dim"] = 768.into();
    std::fs::write(&broken, foreign.to_string()).unwrap();
    fails(d, &["eval", "--index", s(&index), "--data", s(&smarthome()), "--detector", s(&broken)], &["broken.json", "768-dim", "384"]);
    // Examples without a single slot: the error names the data file.
    let no_slots = d.join("no_slots.jsonl");
    std::fs::write(&no_slots, "{\"text\": \"hello there\", \"intent\": \"greet\"}\n").unwrap();
    fails(d, &["train", "detector", "--data", s(&no_slots), "--out", s(&d.join("x.json"))], &["no_slots.jsonl", "no training example has a candidate span that is a slot"]);
    assert!(!d.join("x.json").exists(), "nothing written on error");
}

#[test]
fn ensemble_folder_serves_wherever_a_model_folder_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (m, ens) = (model(), d.join("ens"));
    let printed = ok(d, &["ensemble", "--out", s(&ens), s(&m), s(&m)]);
    assert!(printed.contains("2 models, 768-dim"), "{printed}");
    fails(d, &["ensemble", "--out", s(&ens), s(&m), s(&m)], &["ens", "already holds ensemble.json"]);
    let (missing, ens2) = (d.join("nope"), d.join("ens2"));
    fails(d, &["ensemble", "--out", s(&ens2), s(&m), s(&missing)], &["nope", "cannot read"]);
    fails(d, &["ensemble", "--out", s(&ens2), s(&m)], &["required"]);
    assert!(!ens2.join("ensemble.json").exists());

    // Build and query with the ensemble. A model beside itself gives every span the same
    // cosine as the model alone, so the labels must be the single model's.
    let (single, doubled) = (build_index(d), d.join("ens.nsi"));
    ok(d, &["index", "build", "--model", s(&ens), "--examples", s(&smarthome()), "--out", s(&doubled)]);
    assert_eq!(info(d, &doubled)["encoder"]["dim"], 2 * info(d, &single)["encoder"]["dim"].as_u64().unwrap());
    let texts = ["turn on the kitchen lights", "play jazz in the living room", "what's the weather in Paris tomorrow"];
    let labels = |model: &[&str], index: &Path| -> Vec<(Value, Vec<(Value, Value)>)> {
        let args: Vec<&str> = ["query", "--index", s(index), "--json"].into_iter().chain(model.iter().copied()).chain(texts).collect();
        ok(d, &args)
            .lines()
            .map(|l| {
                let p = json(l);
                let slots = p["slots"].as_array().unwrap().iter().map(|s| (s["label"].clone(), s["text"].clone())).collect();
                (p["intent"]["label"].clone(), slots)
            })
            .collect()
    };
    let with_ensemble = labels(&["--model", s(&ens)], &doubled);
    assert_eq!(with_ensemble, labels(&[], &single));
    assert!(with_ensemble[0].1.iter().any(|(l, t)| l == "device" && t == "lights"), "{with_ensemble:?}");
    // The index knows which encoder wrote it: the single model cannot query it.
    fails(d, &["query", "--index", s(&doubled), "turn on the lights"], &["ens.nsi"]);
    // An ensemble gives the last layer only: a detector for it says so.
    let det = d.join("ens_det.json");
    fails(d, &["train", "detector", "--model", s(&ens), "--data", s(&smarthome()), "--epochs", "1", "--out", s(&det)], &["ensemble", "--layer last"]);
    ok(d, &["train", "detector", "--model", s(&ens), "--data", s(&smarthome()), "--epochs", "1", "--layer", "last", "--out", s(&det)]);
    assert_eq!(json(&std::fs::read_to_string(&det).unwrap())["dim"], 768);
}
