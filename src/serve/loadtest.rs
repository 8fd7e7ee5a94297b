//! `nearspan bench serve-load`: a load test of `POST /v1/parse`, bounded in time.
//!
//! `--clients` threads each keep one keep-alive connection and send requests back to back
//! for `--seconds`; every non-200 answer, transport error or malformed body counts as an
//! error. Reports p50/p90/p99 latency and throughput, and merges them into
//! `benches/results/serve_load.json` (key `serve_load`). Without `--url`, it starts a
//! server in-process on 127.0.0.1 over `--index`. Only loopback targets are accepted.

use std::io::Write;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::{Limits, Options, State};

/// The default utterances: the smart-home queries of the demo.
const DEFAULT_TEXTS: &str = include_str!("../../examples/smarthome_queries.txt");

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// A running server's base URL, e.g. http://127.0.0.1:8080 (loopback only).
    #[arg(long, conflicts_with = "index", required_unless_present = "index")]
    pub url: Option<String>,
    /// Start a server in-process over this index (on 127.0.0.1, any free port).
    #[arg(long)]
    pub index: Option<PathBuf>,
    #[command(flatten)]
    pub model: crate::cli::ModelArg,
    /// Concurrent clients (one thread and one connection each).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// How long to send for.
    #[arg(long, default_value_t = 30.0)]
    pub seconds: f64,
    /// Utterances to send, one per line (default: examples/smarthome_queries.txt, built in).
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// Texts per request.
    #[arg(long, default_value_t = 1)]
    pub texts_per_request: usize,
    /// The JSON file the results are merged into.
    #[arg(long, default_value = "benches/results/serve_load.json")]
    pub out: PathBuf,
    /// Limits of the in-process server (ignored with --url).
    #[command(flatten)]
    pub limits: Limits,
}

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

/// Fails unless every address `url`'s host resolves to is a loopback address.
fn check_loopback(url: &str) -> Result<()> {
    let uri: ureq::http::Uri = url.parse().with_context(|| format!("--url {url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url {url:?}: only http:// is supported");
    }
    let host = uri.host().context("--url has no host")?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let addrs: Vec<_> = (host, port).to_socket_addrs().with_context(|| format!("cannot resolve {host}"))?.collect();
    if addrs.is_empty() || !addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!("--url {url:?} is not a loopback address; the load test only targets this machine");
    }
    Ok(())
}

fn client(url: &str, bodies: &[String], offset: usize, deadline: Instant) -> ClientLog {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut log = ClientLog::default();
    let mut i = offset;
    while Instant::now() < deadline {
        let body = &bodies[i % bodies.len()];
        i += 1;
        let start = Instant::now();
        let outcome = agent
            .post(url)
            .header("content-type", "application/json")
            .send(body.as_str())
            .map_err(|e| e.to_string())
            .and_then(|mut r| {
                let status = r.status();
                let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
                if status != 200 {
                    return Err(format!("HTTP {status}: {text}"));
                }
                if !text.starts_with("{\"results\":[") {
                    return Err(format!("unexpected body: {text}"));
                }
                Ok(())
            });
        let elapsed = start.elapsed();
        match outcome {
            Ok(()) => log.latencies.push(elapsed),
            Err(e) => {
                log.errors += 1;
                log.first_error.get_or_insert(e);
            }
        }
    }
    log
}

/// Runs the clients against `base` (no trailing slash) and returns the report.
fn drive(base: &str, a: &LoadArgs, texts: &[String]) -> Result<serde_json::Value> {
    let per = a.texts_per_request.max(1);
    let bodies: Vec<String> = (0..texts.len())
        .map(|i| {
            let chunk: Vec<&String> = (0..per).map(|j| &texts[(i + j) % texts.len()]).collect();
            json!({ "texts": chunk }).to_string()
        })
        .collect();
    let url = format!("{base}/v1/parse");
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let logs: Vec<ClientLog> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..a.clients).map(|c| scope.spawn({
            let (url, bodies) = (&url, &bodies);
            move || client(url, bodies, c, deadline)
        })).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| ClientLog { errors: 1, first_error: Some("client thread panicked".into()), ..Default::default() })).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = logs.iter().flat_map(|l| l.latencies.iter().map(|d| d.as_secs_f64() * 1000.0)).collect();
    latencies.sort_by(f64::total_cmp);
    let errors: usize = logs.iter().map(|l| l.errors).sum();
    let ok = latencies.len();
    let mean = if ok == 0 { 0.0 } else { latencies.iter().sum::<f64>() / ok as f64 };
    let percentile = crate::bench::percentile;
    Ok(json!({
        "clients": a.clients,
        "seconds": a.seconds,
        "wall_seconds": wall,
        "texts_per_request": per,
        "requests_ok": ok,
        "errors": errors,
        "first_error": logs.iter().find_map(|l| l.first_error.clone()),
        "throughput_rps": ok as f64 / wall,
        "throughput_texts_per_s": (ok * per) as f64 / wall,
        "latency_ms": {
            "p50": percentile(&latencies, 50.0),
            "p90": percentile(&latencies, 90.0),
            "p99": percentile(&latencies, 99.0),
            "max": latencies.last().copied().unwrap_or(0.0),
            "mean": mean,
        },
    }))
}

/// `nearspan bench serve-load`.
pub fn run(a: LoadArgs, out: &mut dyn Write) -> Result<()> {
    if a.clients == 0 || !(a.seconds > 0.0 && a.seconds <= 3600.0) {
        bail!("--clients must be at least 1 and --seconds in (0, 3600]");
    }
    let texts: Vec<String> = match &a.texts {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?,
        None => DEFAULT_TEXTS.to_string(),
    }
    .lines()
    .map(str::trim)
    .filter(|l| !l.is_empty())
    .map(str::to_string)
    .collect();
    if texts.is_empty() {
        bail!("no texts to send");
    }
    let mut report = match (&a.url, &a.index) {
        (Some(url), _) => {
            check_loopback(url)?;
            let mut r = drive(url.trim_end_matches('/'), &a, &texts)?;
            r["server"] = json!({"url": url});
            r
        }
        (None, Some(index_path)) => {
            a.limits.check()?;
            let encoder = a.model.load()?;
            let index = crate::cli::open_index(index_path, &encoder)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let options = Options { limits: a.limits, query: crate::labeler::QueryConfig::default(), detector: None, scorer: None, api_key: None, cors_origins: Vec::new() };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (state, listener) = rt.block_on(async {
                let state = State::new(encoder, index, index_path, options)?;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                anyhow::Ok((state, listener))
            })?;
            let addr = listener.local_addr()?;
            let server = rt.spawn(super::serve(listener, Arc::clone(&state), async move {
                let _ = stopped.await;
            }));
            let result = drive(&format!("http://{addr}"), &a, &texts);
            let _ = stop.send(());
            rt.block_on(server).context("server task")??;
            rt.shutdown_timeout(Duration::from_secs(5));
            let mut r = result?;
            r["server"] = json!({
                "in_process": true,
                "index": index_path,
                "max_batch": a.limits.max_batch,
                "max_wait_ms": a.limits.max_wait_ms,
                "queue": a.limits.queue,
            });
            r
        }
        (None, None) => bail!("pass --url URL or --index INDEX"),
    };
    report["cpus"] = json!(std::thread::available_parallelism().map_or(0, |n| n.get()));
    report["command"] = json!(std::env::args().collect::<Vec<_>>().join(" "));
    writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    crate::bench::merge_result(&a.out, &["serve_load"], report.clone())?;
    let errors = report["errors"].as_u64().unwrap_or(0);
    if errors > 0 {
        bail!("{errors} requests failed; first: {}", report["first_error"]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(check_loopback("http://127.0.0.1:8080").is_ok());
        assert!(check_loopback("http://[::1]:8080").is_ok());
        assert!(check_loopback("http://10.0.0.1:8080").is_err());
        assert!(check_loopback("https://127.0.0.1:8080").is_err());
    }

}
