//! `nearspan serve` as a client meets it: the real binary on a free loopback port over
//! the smart-home index, spoken to over HTTP. The API and its errors, overload, the
//! key, CORS, a SIGKILL in the middle of a stream of writes, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::model_dir;

fn model() -> PathBuf {
    std::fs::canonicalize(model_dir()).expect("canonical model folder")
}

/// The smart-home index, built once per test binary; tests work on copies.
fn base_index() -> &'static Path {
    static INDEX: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &INDEX
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("smarthome.nsi");
            let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/smarthome.jsonl");
            let o = Command::new(env!("CARGO_BIN_EXE_nearspan"))
                .args(["index", "build", "--examples", examples, "--out"])
                .arg(&path)
                .env("NEARSPAN_MODEL", model())
                .output()
                .unwrap();
            assert!(o.status.success(), "index build: {}", String::from_utf8_lossy(&o.stderr));
            (dir, path)
        })
        .1
}

/// A copy of the smart-home index in a fresh folder.
fn fresh_index() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.nsi");
    std::fs::copy(base_index(), &path).unwrap();
    (dir, path)
}

struct Server {
    child: Child,
    url: String,
    stdout: BufReader<ChildStdout>,
}

impl Server {
    /// Starts `nearspan serve` on port 0 and reads the address it prints first.
    fn start(index: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nearspan"))
            .args(["serve", "--addr", "127.0.0.1:0", "--index"])
            .arg(index)
            .args(extra)
            .env("NEARSPAN_MODEL", model())
            .env_remove("NEARSPAN_API_KEY")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nearspan serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("first line {line:?}")).to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        Server { child, url, stdout }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// An answer: status, headers we look at, body as JSON (or as a string when it is not).
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut r = r.expect("HTTP request");
    let headers = r.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    Answer { status: r.status().as_u16(), headers, text: r.body_mut().read_to_string().unwrap() }
}

fn get(url: &str) -> Answer {
    answer(agent().get(url).call())
}

fn post(url: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = agent().post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    answer(req.send(body))
}

fn parse(s: &Server, texts: &[&str]) -> Vec<Value> {
    let a = post(&s.at("/v1/parse"), &json!({ "texts": texts }).to_string(), &[]);
    assert_eq!(a.status, 200, "{}", a.text);
    a.json()["results"].as_array().unwrap().clone()
}

/// Asserts an error answer: status, error_type, and the field (and limit) it names.
fn assert_error(a: &Answer, status: u16, error_type: &str, field: Option<&str>, limit: Option<u64>) {
    assert_eq!(a.status, status, "{}", a.text);
    let body = a.json();
    assert_eq!(body["error_type"], error_type, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    if let Some(f) = field {
        assert_eq!(body["field"], f, "{body}");
        assert!(body["error"].as_str().unwrap().contains(f), "the message should name {f}: {body}");
    }
    if let Some(l) = limit {
        assert_eq!(body["limit"], l, "{body}");
        assert!(body["error"].as_str().unwrap().contains(&l.to_string()), "the message should name {l}: {body}");
    }
}

fn slots(p: &Value) -> Vec<(String, String)> {
    p["slots"].as_array().unwrap().iter().map(|s| (s["text"].as_str().unwrap().into(), s["label"].as_str().unwrap().into())).collect()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

fn example_texts(index: &Path) -> Vec<String> {
    let index = nearspan_index::SpanIndex::open(index, None).expect("the index opens");
    (0..index.n_examples()).map(|i| index.example(nearspan_index::ExampleId(i as u32)).text.clone()).collect()
}

const COLOUR_EXAMPLE: &str =
    r#"{"text": "make the hallway light sky blue", "intent": "set_colour", "spans": [{"start": 23, "end": 31, "label": "colour"}]}"#;

#[test]
fn api_parses_adds_examples_and_reports() {
    let (_dir, index) = fresh_index();
    let s = Server::start(&index, &["--api-key", "s3cret", "--max-body-bytes", "4096", "--max-texts", "8", "--max-text-chars", "200"]);

    // Parse: the README's query JSON, one result per text, in order.
    let results = parse(&s, &["turn on the bedroom lamp", "play some Fleetwood Mac in the dining room"]);
    assert_eq!(results.len(), 2);
    let p = &results[0];
    assert_eq!(p["text"], "turn on the bedroom lamp");
    assert_eq!(p["intent"]["label"], "turn_on");
    assert!(p["intent"]["score"].as_f64().unwrap() > 0.5);
    assert_eq!(slots(p), [("bedroom".into(), "room".into()), ("lamp".into(), "device".into())]);
    let n = &p["slots"][1]["neighbours"][0];
    for key in ["example", "text", "start", "end", "label", "similarity"] {
        assert!(!n[key].is_null(), "neighbour lacks {key}: {n}");
    }
    assert_eq!(results[1]["intent"]["label"], "play_music");

    // Index info, health, the playground.
    let info = get(&s.at("/v1/index")).json();
    assert_eq!(info["examples"], 78);
    assert!(info["labels"].as_array().unwrap().contains(&json!("room")));
    assert_eq!(info["encoder"]["model"], "all-minilm-l6-v2");
    assert_eq!(info["intents"]["turn_on"], 13);
    assert_eq!(get(&s.at("/healthz")).json()["status"], "ok");
    let page = get(&s.at("/"));
    assert_eq!(page.status, 200);
    assert!(page.text.contains("<script src=\"/app.js\"") && page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'self'"));
    for asset in ["/app.js", "/style.css"] {
        let a = get(&s.at(asset));
        assert_eq!(a.status, 200, "{asset}");
        assert!(!a.text.contains("http://") && !a.text.contains("https://"), "{asset} loads something from elsewhere");
    }

    // Writes need the key (either header); reads do not.
    let body = format!(r#"{{"examples": [{COLOUR_EXAMPLE}]}}"#);
    assert_error(&post(&s.at("/v1/examples"), &body, &[]), 401, "unauthorized", None, None);
    assert_error(&post(&s.at("/v1/examples"), &body, &[("x-api-key", "wrong")]), 401, "unauthorized", None, None);
    let before = parse(&s, &["make the hallway light sky blue"]);
    assert_ne!(before[0]["intent"]["label"], "set_colour");
    let added = post(&s.at("/v1/examples"), &body, &[("x-api-key", "s3cret")]);
    assert_eq!(added.status, 200, "{}", added.text);
    assert_eq!(added.json()["added"], 1);
    assert_eq!(added.json()["examples"], 79);
    // Persisted before the answer, and the next parse uses it.
    assert!(example_texts(&index).contains(&"make the hallway light sky blue".to_string()));
    let after = parse(&s, &["make the hallway light sky blue"]);
    assert_eq!(after[0]["intent"]["label"], "set_colour");
    assert!(slots(&after[0]).contains(&("sky blue".into(), "colour".into())), "{}", after[0]);
    let bearer = post(&s.at("/v1/examples"), r#"{"examples": [{"text": "paint the office sky blue", "spans": [{"start": 17, "end": 25, "label": "colour"}]}]}"#, &[("authorization", "Bearer s3cret")]);
    assert_eq!(bearer.status, 200, "{}", bearer.text);
    let info = get(&s.at("/v1/index")).json();
    assert_eq!(info["examples"], 80);
    assert_eq!(info["intents"]["set_colour"], 1);
    assert!(info["slot_labels"].as_array().unwrap().contains(&json!("colour")));

    // Errors: JSON, naming the field and the limit.
    let parse_url = s.at("/v1/parse");
    assert_error(&post(&parse_url, r#"{"texts": ["#, &[]), 400, "malformed_json", Some("body"), None);
    assert_error(&post(&parse_url, &format!(r#"{{"texts": ["{}"]}}"#, "a ".repeat(3000)), &[]), 413, "payload_too_large", Some("body"), Some(4096));
    let nine = json!({ "texts": vec!["turn it on"; 9] }).to_string();
    assert_error(&post(&parse_url, &nine, &[]), 413, "payload_too_large", Some("texts"), Some(8));
    let long = json!({ "texts": ["ok", "x".repeat(201)] }).to_string();
    assert_error(&post(&parse_url, &long, &[]), 422, "validation", Some("texts[1]"), Some(200));
    assert_error(&post(&parse_url, r#"{"txts": ["a"]}"#, &[]), 422, "validation", Some("txts"), None);
    assert_error(&post(&parse_url, r#"{}"#, &[]), 422, "validation", Some("texts"), None);
    assert_error(&post(&parse_url, r#"{"texts": ["a", 3]}"#, &[]), 422, "validation", Some("texts[1]"), None);
    assert_error(&post(&parse_url, r#"{"texts": ["  "]}"#, &[]), 422, "validation", Some("texts[0]"), None);
    let key = [("x-api-key", "s3cret")];
    let ex_url = s.at("/v1/examples");
    let outside = r#"{"examples": [{"text": "turn it on", "spans": [{"start": 5, "end": 40, "label": "device"}]}]}"#;
    let a = post(&ex_url, outside, &key);
    assert_error(&a, 422, "validation", Some("examples[0]"), None);
    assert!(a.json()["error"].as_str().unwrap().contains("outside the text"), "{}", a.text);
    let typo = r#"{"examples": [{"text": "turn it on"}, {"text": "turn it on", "spams": []}]}"#;
    assert_error(&post(&ex_url, typo, &key), 422, "validation", Some("examples[1]"), None);
    let reserved = r#"{"examples": [{"text": "turn it on", "spans": [{"start": 5, "end": 7, "label": "O"}]}]}"#;
    assert_error(&post(&ex_url, reserved, &key), 422, "validation", Some("examples[0].spans"), None);
    let mid_word = r#"{"examples": [{"text": "turn it on", "spans": [{"start": 1, "end": 4, "label": "x"}]}]}"#;
    assert_error(&post(&ex_url, mid_word, &key), 422, "validation", Some("examples[0]"), None);
    assert_eq!(get(&s.at("/v1/index")).json()["examples"], 80, "a refused request added something");
    assert_error(&get(&s.at("/nowhere")), 404, "not_found", None, None);

    // CORS is off unless asked for.
    let a = answer(agent().get(&s.at("/v1/index")).header("origin", "http://elsewhere.test").call());
    assert!(a.header("access-control-allow-origin").is_none(), "{:?}", a.headers);

    // Metrics: Prometheus text with requests, latencies, batch sizes and the index size.
    let m = get(&s.at("/metrics"));
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    assert!(metric(&m.text, r#"nearspan_http_requests_total{route="/v1/parse",status="200"}"#).unwrap() >= 3.0, "{}", m.text);
    assert_eq!(metric(&m.text, r#"nearspan_http_requests_total{route="/v1/examples",status="401"}"#), Some(2.0));
    assert!(metric(&m.text, r#"nearspan_http_request_duration_seconds_count{route="/v1/parse"}"#).unwrap() >= 3.0);
    assert!(m.text.contains(r#"nearspan_http_request_duration_seconds_bucket{route="/v1/parse",le="+Inf"}"#));
    assert!(metric(&m.text, "nearspan_batch_size_texts_sum").unwrap() >= 4.0);
    assert_eq!(metric(&m.text, "nearspan_index_examples"), Some(80.0));
    assert_eq!(metric(&m.text, "nearspan_examples_added_total"), Some(2.0));
    assert!(metric(&m.text, "nearspan_index_spans").unwrap() > 2000.0);
}

/// With `--prefilter 1` every slot's neighbours come from the one example nearest the
/// whole utterance, also for an example added while serving (the index's span halves
/// grow with it).
#[test]
fn prefilter_takes_neighbours_from_the_nearest_example_also_after_an_add() {
    let (_dir, index) = fresh_index();
    let s = Server::start(&index, &["--api-key", "k", "--prefilter", "1"]);
    let text = "make the hallway light sky blue";
    let sources = |p: &Value| -> Vec<String> {
        p["slots"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|slot| slot["neighbours"].as_array().unwrap().iter().map(|n| n["example"].as_str().unwrap().to_string()))
            .collect()
    };
    let before = sources(&parse(&s, &[text])[0]);
    assert!(before.iter().all(|e| e == &before[0]), "{before:?}");
    let added = post(&s.at("/v1/examples"), &format!(r#"{{"examples": [{COLOUR_EXAMPLE}]}}"#), &[("x-api-key", "k")]);
    assert_eq!(added.status, 200, "{}", added.text);
    let after = parse(&s, &[text]);
    assert!(slots(&after[0]).contains(&("sky blue".into(), "colour".into())), "{}", after[0]);
    let sources = sources(&after[0]);
    assert!(sources.iter().all(|e| e == text), "{sources:?}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let (_dir, index) = fresh_index();
    let s = Server::start(&index, &["--queue", "1", "--max-batch", "8", "--max-wait-ms", "0", "--max-text-chars", "2000"]);
    // Eight-text requests of long texts keep the encoder busy; a queue of one overflows.
    let text = "please set the thermostat in the upstairs guest bedroom to twenty one degrees ".repeat(5);
    let body = json!({ "texts": vec![text.trim(); 8] }).to_string();
    let n = 12;
    let barrier = Arc::new(Barrier::new(n));
    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let (barrier, url, body) = (barrier.clone(), s.at("/v1/parse"), body.clone());
                scope.spawn(move || {
                    barrier.wait();
                    post(&url, &body, &[])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(!refused.is_empty(), "no request was refused: {:?}", answers.iter().map(|a| a.status).collect::<Vec<_>>());
    for a in &refused {
        assert_error(a, 503, "overloaded", None, Some(1));
        assert_eq!(a.header("retry-after"), Some("1"));
    }
    for a in answers.iter().filter(|a| a.status != 503) {
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["results"].as_array().unwrap().len(), 8);
    }
    let m = get(&s.at("/metrics")).text;
    assert_eq!(metric(&m, "nearspan_queue_rejected_total"), Some(refused.len() as f64));
}

#[test]
fn sigkill_during_a_stream_of_examples_loses_no_acknowledged_one() {
    let (_dir, index) = fresh_index();
    let mut s = Server::start(&index, &[]);
    let url = s.at("/v1/examples");
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (acknowledged, count, stop) = (acknowledged.clone(), count.clone(), stop.clone());
        move || {
            let agent = agent();
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let text = format!("turn on the lamp number {i}");
                let body = json!({"examples": [{"text": text, "intent": "turn_on", "spans": [{"start": 12, "end": 16, "label": "device"}]}]});
                match agent.post(&url).header("content-type", "application/json").send(body.to_string()) {
                    Ok(r) if r.status() == 200 => {
                        acknowledged.lock().unwrap().push(text);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => panic!("example {i}: HTTP {}", r.status()),
                    Err(_) => break, // the server is gone
                }
            }
        }
    });
    let t0 = Instant::now();
    while count.load(Ordering::SeqCst) < 8 {
        assert!(t0.elapsed() < Duration::from_secs(60), "too slow to acknowledge 8 examples");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.child.kill().unwrap(); // SIGKILL, while the stream goes on
    s.child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 8);

    // The file opens and holds every acknowledged example (at most the one in flight more).
    let texts = example_texts(&index);
    for t in &acknowledged {
        assert!(texts.contains(t), "acknowledged {t:?} is not in the index");
    }
    assert!(texts.len() == 78 + acknowledged.len() || texts.len() == 79 + acknowledged.len(), "{} examples", texts.len());

    // A restarted server serves it, and uses the examples.
    let s = Server::start(&index, &[]);
    assert_eq!(get(&s.at("/v1/index")).json()["examples"], texts.len());
    let last = acknowledged.last().unwrap();
    let p = &parse(&s, &[last])[0];
    assert_eq!(p["intent"]["neighbours"][0]["example"], last.as_str());
    assert!(p["intent"]["neighbours"][0]["similarity"].as_f64().unwrap() > 0.999);
}

#[test]
fn sigterm_finishes_in_flight_requests_and_saves() {
    let (_dir, index) = fresh_index();
    let mut s = Server::start(&index, &["--cors-origin", "http://playground.test"]);
    // CORS when asked for.
    let a = answer(agent().get(&s.at("/healthz")).header("origin", "http://playground.test").call());
    assert_eq!(a.header("access-control-allow-origin"), Some("http://playground.test"));
    let a = answer(agent().get(&s.at("/healthz")).header("origin", "http://elsewhere.test").call());
    assert!(a.header("access-control-allow-origin").is_none());

    let added = post(&s.at("/v1/examples"), &format!(r#"{{"examples": [{COLOUR_EXAMPLE}]}}"#), &[]);
    assert_eq!(added.status, 200, "{}", added.text);

    // A slow parse is in flight when SIGTERM arrives; it still gets its answer.
    let texts: Vec<String> = (0..64).map(|i| format!("set the thermostat in room {i} to {} degrees, please, and then turn on every lamp in the house", i % 30)).collect();
    let in_flight = std::thread::spawn({
        let url = s.at("/v1/parse");
        let body = json!({ "texts": texts }).to_string();
        move || post(&url, &body, &[])
    });
    let t0 = Instant::now();
    loop {
        let m = get(&s.at("/metrics")).text;
        if metric(&m, r#"nearspan_http_requests_in_flight{route="/v1/parse"}"#) == Some(1.0) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the parse never showed as in flight");
        if in_flight.is_finished() {
            break; // answered before we saw it: SIGTERM now still checks the exit
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let a = in_flight.join().unwrap();
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["results"].as_array().unwrap().len(), 64);

    let t0 = Instant::now();
    let exit = loop {
        if let Some(exit) = s.child.try_wait().unwrap() {
            break exit;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut s.stdout, &mut rest).unwrap();
    assert!(rest.contains("stopped;") && rest.contains("79 examples"), "{rest:?}");
    assert!(example_texts(&index).contains(&"make the hallway light sky blue".to_string()));
}

/// `serve --detector` puts the detector into every parse: one that calls no span a slot
/// (a bias of −50), weighted 2, removes all slots the same server finds without it.
#[test]
fn serve_uses_the_span_detector() {
    let (dir, index) = fresh_index();
    let det = dir.path().join("never.json");
    let detector = serde_json::json!({
        "format": "nearspan-span-detector/1", "dim": 384, "hidden": 1, "max_width": 10, "scale": 1.0,
        "w_tokens": vec![0.0; 4 * 384], "w_width": vec![0.0; 10], "b_hidden": [0.0], "w_out": [0.0], "b_out": -50.0
    });
    std::fs::write(&det, detector.to_string()).unwrap();
    let text = "turn on the kitchen lights";
    let plain = Server::start(&index, &[]);
    assert!(!slots(&parse(&plain, &[text])[0]).is_empty(), "without a detector the example labels itself");
    drop(plain);
    let with = Server::start(&index, &["--detector", det.to_str().unwrap(), "--detector-weight", "2"]);
    let p = &parse(&with, &[text])[0];
    assert!(slots(p).is_empty(), "{p}");
    assert_eq!(p["intent"]["label"], "turn_on", "the intent does not depend on the detector: {p}");
}

/// `serve --scorer`: the slot scorer makes the slot decisions (one that keeps nothing
/// removes every slot, the intent stays; one that keeps every span finds slots).
#[test]
fn serve_uses_the_slot_scorer() {
    let (dir, index) = fresh_index();
    let path = dir.path().join("never.json");
    let scorer = serde_json::json!({
        "format": "nearspan-slot-scorer/1", "mean": vec![0.0; 8], "std": vec![1.0; 8], "w": vec![0.0; 8], "b": 0.0,
        "min_logit": 100.0, "with_detector": false
    });
    std::fs::write(&path, scorer.to_string()).unwrap();
    let text = "turn on the kitchen lights";
    let with = Server::start(&index, &["--scorer", path.to_str().unwrap()]);
    let p = &parse(&with, &[text])[0];
    assert!(slots(p).is_empty(), "{p}");
    assert_eq!(p["intent"]["label"], "turn_on", "the intent does not depend on the scorer: {p}");
    drop(with);
    let mut keep_all = scorer.clone();
    keep_all["min_logit"] = (-100.0).into();
    std::fs::write(&path, keep_all.to_string()).unwrap();
    let with = Server::start(&index, &["--scorer", path.to_str().unwrap()]);
    assert!(!slots(&parse(&with, &[text])[0]).is_empty(), "a scorer that keeps every span finds slots");
}
