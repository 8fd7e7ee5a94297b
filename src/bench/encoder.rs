//! Encoder throughput and latency against the PyTorch peer: sentences/s, tokens/s and
//! per-batch latency of nearspan's candle encoder and of the reference stack (HF
//! transformers + PyTorch, `benches/peers/encoder_peer.py`), same model, same texts,
//! same batch sizes and thread count, measured one after the other in one invocation
//! (ours b1, peer b1, ours b32, peer b32) so both see the same machine.
//!
//! Our loop mirrors the peer's: the texts in file order (wrapping around) in batches of
//! B; per batch, tokenization + forward + masked mean pooling and L2 normalization
//! ([`Encoder::encode`] = `tokenize_all` + `encode_tokenized`, then
//! [`EncodedText::sentence_vector`]); W untimed batches, then batches until `--seconds`
//! have passed. Tokens are real tokens, [CLS]/[SEP] included, padding excluded.
//!
//! Threads: candle 0.11.1 on the CPU sizes its parallelism from the environment, read
//! lazily (`candle_core::utils`): the gemm matmuls split into `get_num_threads()` =
//! `$RAYON_NUM_THREADS` (else the physical core count) tasks on the *current* rayon
//! pool, and large element-wise ops run on a private barrier pool of
//! `$CANDLE_NUM_THREADS` (else `$RAYON_NUM_THREADS`) threads, created on first use. So
//! [`run`] sets both variables to `--threads` before the model loads, runs our loop
//! inside a local rayon pool of that size, and refuses to measure if any of the three
//! reports another count. The peer gets `torch.set_num_threads(T)` and
//! `OMP/MKL/RAYON_NUM_THREADS=T`.
//!
//! The machine may be shared: the 1-minute load average is recorded before each
//! measurement, and the CPU that *other* processes used during it (from /proc/stat,
//! minus our own and the peer's CPU time), so readers can judge the numbers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser as _;
use clap::Args;
use serde_json::{json, Value};

use crate::encoder::{EncodedText, Encoder, Precision};

#[derive(Debug, Args)]
pub struct EncoderBenchArgs {
    #[command(flatten)]
    pub model: crate::cli::ModelArg,
    /// Utterances, one per line (trimmed, blank lines skipped).
    /// Default: the SNIPS test set, ../shared/data/snips/test/seq.in.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// Batch sizes to measure, in order (repeat the flag or separate with commas).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32],
          value_parser = clap::value_parser!(u32).range(1..=4096).map(|v| v as usize))]
    pub batch: Vec<usize>,
    /// Threads for both implementations.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024).map(|v| v as usize))]
    pub threads: usize,
    /// Minimum timed seconds per measurement.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Untimed warm-up batches before each measurement.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Python of the venv holding torch and transformers (see benches/peers/README.md).
    #[arg(long, default_value = "/work/peers-venv/bin/python")]
    pub python: PathBuf,
    /// Precisions of nearspan's encoder to measure, each beside the same peer run
    /// (default: every precision this CPU supports; the global --precision is not used).
    #[arg(long, value_delimiter = ',')]
    pub precisions: Vec<Precision>,
    /// Measure nearspan only.
    #[arg(long)]
    pub no_peer: bool,
    /// The peer script.
    #[arg(long, default_value = "benches/peers/encoder_peer.py")]
    pub peer_script: PathBuf,
    /// Results file (overwritten).
    #[arg(long, default_value = "benches/results/encoder.json")]
    pub out: PathBuf,
}

pub fn run(a: EncoderBenchArgs, out: &mut dyn Write) -> Result<()> {
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        bail!("--seconds must be a positive number, got {}", a.seconds);
    }
    let command = command_line();
    let load_at_start = super::loadavg_1min();
    pin_candle_threads(a.threads);

    let texts_path = match &a.texts {
        Some(p) => p.clone(),
        None => crate::paths::shared_data_dir().join("snips/test/seq.in"),
    };
    let texts = read_texts(&texts_path)?;
    let precisions = match a.precisions.as_slice() {
        [] => [Precision::F32, Precision::Bf16].into_iter().filter(|p| p.is_supported()).collect(),
        chosen => chosen.to_vec(),
    };
    let dir = a.model.dir()?;
    let encoders = precisions
        .iter()
        .map(|&p| Encoder::load_with_precision(&dir, p))
        .collect::<Result<Vec<_>, _>>()?;
    let encoder = &encoders[0];
    let peer = if a.no_peer { None } else { Some(Peer::new(&a, encoder, &texts_path)?) };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()
        .context("cannot start the benchmark's rayon thread pool")?;
    let threads = check_threads(&pool, a.threads)?;

    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut results = Vec::new();
    for &batch in &a.batch {
        // One row per precision, all beside the same peer run.
        let mut rows = Vec::new();
        for encoder in &encoders {
            let load = super::loadavg_1min();
            let cpu = CpuSample::now();
            let ours = pool.install(|| measure(encoder, &refs, batch, a.warmup, a.seconds))?;
            let mut ours = ours.to_json(a.threads, batch, encoder.precision());
            ours["loadavg_before"] = json!(load);
            ours["other_processes_cores_busy"] = json!(cpu.and_then(|c| c.others_busy()));
            rows.push(json!({ "batch": batch, "precision": encoder.precision().name(), "nearspan": ours }));
        }
        if let Some(peer) = &peer {
            let load = super::loadavg_1min();
            let cpu = CpuSample::now();
            let mut theirs = peer.measure(batch)?;
            theirs["loadavg_before"] = json!(load);
            theirs["other_processes_cores_busy"] = json!(cpu.and_then(|c| c.others_busy()));
            for row in &mut rows {
                row["throughput_ratio"] = ratio(row["nearspan"]["sentences_per_s"].as_f64(), theirs["sentences_per_s"].as_f64());
                row["latency_ratio"] = ratio(theirs["latency_ms_p50"].as_f64(), row["nearspan"]["latency_ms_p50"].as_f64());
                row["pytorch"] = theirs.clone();
            }
        }
        results.extend(rows);
    }

    let info = encoder.info();
    let report = json!({
        "machine": {
            "cpu": cpu_model(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "loadavg_before": load_at_start,
            "loadavg_after": super::loadavg_1min(),
        },
        "threads": a.threads,
        "thread_check": threads,
        "model": { "id": info.id, "dir": info.dir.display().to_string(), "weights_sha256": info.weights_sha256 },
        "texts": { "path": texts_path.display().to_string(), "count": texts.len() },
        "seconds": a.seconds,
        "warmup_batches": a.warmup,
        "nearspan_version": env!("CARGO_PKG_VERSION"),
        "results": results,
        "command": command,
    });
    write_table(out, &report)?;
    super::write_json(&a.out, &report)?;
    writeln!(out, "load1: 1-min load average before; others: cores busy with other processes during the measurement")?;
    writeln!(out, "wrote {}", a.out.display())?;
    Ok(())
}

/// Sets the variables candle reads for its thread counts; they are read lazily, so
/// this must run before the first tensor operation of the process.
pub(crate) fn pin_candle_threads(threads: usize) {
    // Edition 2021: `set_var` is safe; no other thread of ours is running yet.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
}

/// The thread counts candle will actually use; an error if any differs from `want`.
pub(crate) fn check_threads(pool: &rayon::ThreadPool, want: usize) -> Result<Value> {
    let gemm = candle_core::utils::get_num_threads();
    let elementwise = candle_core::utils::barrier_pool().n_workers() + 1; // + the calling thread
    let rayon_pool = pool.current_num_threads();
    if gemm != want || elementwise != want || rayon_pool != want {
        bail!(
            "candle would use {gemm} matmul / {elementwise} element-wise / {rayon_pool} rayon threads, not --threads {want}; \
             its pools were sized before the benchmark set RAYON_NUM_THREADS and CANDLE_NUM_THREADS"
        );
    }
    Ok(json!({ "candle_gemm": gemm, "candle_elementwise_pool": elementwise, "rayon_pool": rayon_pool }))
}

pub(crate) fn read_texts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the texts; pass --texts FILE (one utterance per line)", path.display()))?;
    let texts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if texts.is_empty() {
        bail!("{}: no texts (every line is blank)", path.display());
    }
    Ok(texts)
}

/// Our side of one measurement, in the peer's units.
struct Measurement {
    sentences: usize,
    tokens: usize,
    seconds: f64,
    forward_seconds: f64,
    latencies_ms: Vec<f64>,
}

impl Measurement {
    fn to_json(&self, threads: usize, batch: usize, precision: Precision) -> Value {
        let mut lat = self.latencies_ms.clone();
        lat.sort_by(f64::total_cmp);
        json!({
            "impl": format!("nearspan (packed tokens, {} products, cpu)", precision.name()),
            "precision": precision.name(),
            "threads": threads,
            "batch": batch,
            "sentences": self.sentences,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "sentences_per_s": round(self.sentences as f64 / self.seconds, 2),
            "tokens_per_s": round(self.tokens as f64 / self.seconds, 1),
            "latency_ms_p50": round(super::percentile(&lat, 50.0), 3),
            "latency_ms_p99": round(super::percentile(&lat, 99.0), 3),
            "forward_sentences_per_s": round(self.sentences as f64 / self.forward_seconds, 2),
            "batches": lat.len(),
        })
    }
}

/// The peer's loop on our encoder. "Forward" here is `encode_tokenized`: padding into
/// tensors, the model, and copying each text's hidden rows out (tokenization and
/// pooling left out), the closest match to the peer's timed `model(**enc)`.
fn measure(encoder: &Encoder, texts: &[&str], batch: usize, warmup: usize, seconds: f64) -> Result<Measurement> {
    let mut pos = 0;
    let mut next_batch = || -> Vec<&str> {
        let b: Vec<&str> = (0..batch).map(|k| texts[(pos + k) % texts.len()]).collect();
        pos = (pos + batch) % texts.len();
        b
    };
    // Returns (real tokens, forward seconds).
    let encode = |b: &[&str]| -> Result<(usize, f64)> {
        let tokenized = encoder.tokenize_all(b)?;
        let tokens = tokenized.iter().map(|t| t.len()).sum();
        let f0 = Instant::now();
        let encoded = encoder.encode_tokenized(tokenized, batch)?;
        let forward = f0.elapsed().as_secs_f64();
        let vectors: Vec<Vec<f32>> = encoded.iter().map(EncodedText::sentence_vector).collect();
        std::hint::black_box(vectors);
        Ok((tokens, forward))
    };

    for _ in 0..warmup {
        encode(&next_batch())?;
    }
    let mut m = Measurement { sentences: 0, tokens: 0, seconds: 0.0, forward_seconds: 0.0, latencies_ms: Vec::new() };
    let start = Instant::now();
    loop {
        let b = next_batch();
        let b0 = Instant::now();
        let (tokens, forward) = encode(&b)?;
        let b1 = Instant::now();
        m.latencies_ms.push((b1 - b0).as_secs_f64() * 1e3);
        m.sentences += batch;
        m.tokens += tokens;
        m.forward_seconds += forward;
        if (b1 - start).as_secs_f64() >= seconds {
            break;
        }
    }
    m.seconds = start.elapsed().as_secs_f64();
    Ok(m)
}

/// The PyTorch peer, run as a subprocess per batch size.
struct Peer {
    python: PathBuf,
    script: PathBuf,
    model: PathBuf,
    texts: PathBuf,
    threads: usize,
    warmup: usize,
    seconds: f64,
}

impl Peer {
    fn new(a: &EncoderBenchArgs, encoder: &Encoder, texts: &Path) -> Result<Self> {
        let script = resolve_script(&a.peer_script)?;
        if !a.python.is_file() {
            bail!(
                "{}: no such python; create the peer venv (benches/peers/README.md), pass --python, or --no-peer",
                a.python.display()
            );
        }
        let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        Ok(Self {
            python: a.python.clone(),
            script,
            model: abs(&encoder.info().dir),
            texts: abs(texts),
            threads: a.threads,
            warmup: a.warmup,
            seconds: a.seconds,
        })
    }

    fn measure(&self, batch: usize) -> Result<Value> {
        let t = self.threads.to_string();
        let output = Command::new(&self.python)
            .arg(&self.script)
            .arg("--model")
            .arg(&self.model)
            .arg("--texts")
            .arg(&self.texts)
            .args(["--batch", &batch.to_string(), "--threads", &t, "--warmup", &self.warmup.to_string()])
            .args(["--seconds", &self.seconds.to_string()])
            .env("OMP_NUM_THREADS", &t)
            .env("MKL_NUM_THREADS", &t)
            .env("RAYON_NUM_THREADS", &t)
            .output()
            .with_context(|| format!("{}: cannot start the peer", self.python.display()))?;
        peer_json(&self.script, &output, &format!("at batch {batch}"))
    }
}

/// The JSON object on the last `{`-line of a finished peer's stdout; an error with the
/// tail of its stderr when it failed. `during` says which measurement, for the message.
pub(crate) fn peer_json(script: &Path, output: &std::process::Output, during: &str) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!(
            "{} failed ({}) {during}:\n{}\n(check the venv per benches/peers/README.md, or pass --no-peer)",
            script.display(),
            output.status,
            tail.join("\n")
        );
    }
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).with_context(|| {
        format!("{}: printed no JSON line {during}; stdout was {stdout:?}", script.display())
    })?;
    serde_json::from_str(line).with_context(|| format!("{}: bad JSON line {line:?}", script.display()))
}

/// The peer script as given, else relative to the repository (when run from elsewhere).
pub(crate) fn resolve_script(p: &Path) -> Result<PathBuf> {
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join(p);
    if p.is_relative() && in_repo.is_file() {
        return Ok(in_repo);
    }
    bail!("{}: peer script not found; pass --peer-script or --no-peer", p.display())
}

pub(crate) fn ratio(num: Option<f64>, den: Option<f64>) -> Value {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => json!(round(n / d, 3)),
        _ => Value::Null,
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// CPU time counters at one instant, to tell how much of the machine other processes
/// took during a measurement: the load average lags by a minute and counts our own
/// previous measurement, this does neither.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    /// All CPUs together, clock ticks: (busy, total) from the `cpu` line of /proc/stat.
    busy: u64,
    total: u64,
    /// This process and its waited-for children (the peer), clock ticks.
    ours: u64,
}

impl CpuSample {
    pub(crate) fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> =
            stat.lines().next()?.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesized command name: utime, stime, cutime, cstime are 14..=17.
        let rest: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let ours = (11..=14).map(|i| rest.get(i)?.parse::<u64>().ok()).sum::<Option<u64>>()?;
        Some(Self { busy: total - idle, total, ours })
    }

    /// Cores' worth of CPU that other processes used since `self`, on average.
    pub(crate) fn others_busy(self) -> Option<f64> {
        let now = Self::now()?;
        let cores = std::thread::available_parallelism().ok()?.get() as f64;
        let wall = (now.total - self.total) as f64 / cores;
        let others = (now.busy - self.busy) as f64 - (now.ours - self.ours) as f64;
        (wall > 0.0).then(|| round((others / wall).max(0.0), 2))
    }
}


pub(crate) fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// This process's command line, shell-quoted where needed.
pub(crate) fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c)) {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_table(out: &mut dyn Write, report: &Value) -> Result<()> {
    let fmt = |v: &Value, d: usize| v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.d$}"));
    writeln!(
        out,
        "encoder throughput, {} threads, {} ({} cores), load before {}",
        report["threads"],
        report["machine"]["cpu"].as_str().unwrap_or("?"),
        report["machine"]["cores"],
        fmt(&report["machine"]["loadavg_before"], 2)
    )?;
    writeln!(
        out,
        "{:>5}  {:<14}  {:>9}  {:>9}  {:>8}  {:>8}  {:>11}  {:>6}  {:>7}",
        "batch", "impl", "sent/s", "tok/s", "p50 ms", "p99 ms", "fwd sent/s", "load1", "others"
    )?;
    let rows = report["results"].as_array().map_or(&[][..], Vec::as_slice);
    for (i, row) in rows.iter().enumerate() {
        let batch = row["batch"].as_u64().unwrap_or(0);
        // The peer's line once per batch, after its last precision.
        let last_of_batch = rows.get(i + 1).is_none_or(|next| next["batch"] != row["batch"]);
        let ours = format!("nearspan {}", row["precision"].as_str().unwrap_or("f32"));
        for (name, key) in [(ours.as_str(), "nearspan"), ("pytorch", "pytorch")] {
            let r = &row[key];
            if r.is_null() || (key == "pytorch" && !last_of_batch) {
                continue;
            }
            writeln!(
                out,
                "{:>5}  {:<14}  {:>9}  {:>9}  {:>8}  {:>8}  {:>11}  {:>6}  {:>7}",
                batch,
                name,
                fmt(&r["sentences_per_s"], 1),
                fmt(&r["tokens_per_s"], 0),
                fmt(&r["latency_ms_p50"], 2),
                fmt(&r["latency_ms_p99"], 2),
                fmt(&r["forward_sentences_per_s"], 1),
                fmt(&r["loadavg_before"], 2),
                fmt(&r["other_processes_cores_busy"], 2),
            )?;
        }
        if !row["throughput_ratio"].is_null() {
            writeln!(
                out,
                "{:>5}  nearspan {}/pytorch: throughput x{}, p50 latency x{} (>1: nearspan faster)",
                batch,
                row["precision"].as_str().unwrap_or("f32"),
                fmt(&row["throughput_ratio"], 2),
                fmt(&row["latency_ratio"], 2)
            )?;
        }
    }
    Ok(())
}


