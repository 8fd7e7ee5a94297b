//! `nearspan serve`: the labeler over HTTP, with live example adding and a web
//! playground at `/`.
//!
//! Layered as text-embeddings-inference is: [`run`] turns the command-line arguments into
//! a [`State`] and a bound listener and calls [`serve`], which tests and the load test
//! also call in-process; [`batcher`] micro-batches parse requests through the encoder;
//! `routes` holds the handlers and the static playground; [`errors`] maps every failure
//! to a status and a JSON body; [`metrics`] renders Prometheus text.
//!
//! The index lives in an `RwLock`: parses read it, `POST /v1/examples` encodes the new
//! examples outside the lock, adds them under the write lock, and saves the index
//! atomically before it answers, so an acknowledged example survives a crash.

pub mod batcher;
pub mod errors;
pub mod loadtest;
pub mod metrics;
mod routes;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use nearspan_index::SpanIndex;

use crate::data::Example;
use crate::detector::SpanDetector;
use crate::scorer::SlotScorer;
use crate::encoder::Encoder;
use crate::labeler::{self, BuildConfig, Prediction, QueryConfig};
use batcher::{BatchConfig, Batcher, Process};
use errors::ServeError;
use metrics::{IndexGauges, Metrics};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::cli::ModelArg,
    /// The index to serve; examples added over HTTP are saved into it.
    #[arg(long)]
    pub index: PathBuf,
    /// Address to listen on; port 0 picks a free port. The first line printed is
    /// `listening on http://ADDR`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Writes (POST /v1/examples) need this key, in an `x-api-key` header or as
    /// `Authorization: Bearer KEY`; reads stay open. Without it, writes are open too.
    #[arg(long, env = "NEARSPAN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow cross-origin requests from this origin (repeatable; `*` for any). Off by default.
    #[arg(long)]
    pub cors_origin: Vec<String>,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub settings: crate::cli::QuerySettings,
}

/// Request limits and the batcher's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct Limits {
    /// Largest request body in bytes (413 above it).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most texts per parse request, and examples per examples request (413 above it).
    #[arg(long, default_value_t = 64)]
    pub max_texts: usize,
    /// Longest text in characters (422 above it).
    #[arg(long, default_value_t = 1000)]
    pub max_text_chars: usize,
    /// Most texts the batcher puts through the encoder at once.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Longest the batcher waits for more requests to join a batch, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub max_wait_ms: u64,
    /// Parse requests that may wait for the encoder; beyond it, 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 1 << 20, max_texts: 64, max_text_chars: 1000, max_batch: 32, max_wait_ms: 2, queue: 256 }
    }
}

impl Limits {
    /// Refuses limits that would make every request fail.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-texts", self.max_texts),
            ("--max-text-chars", self.max_text_chars),
            ("--max-batch", self.max_batch),
            ("--queue", self.queue),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.max_wait_ms > 60_000 {
            bail!("--max-wait-ms {} is more than a minute", self.max_wait_ms);
        }
        Ok(())
    }

    fn batch_config(&self) -> BatchConfig {
        BatchConfig { max_batch: self.max_batch, max_wait: Duration::from_millis(self.max_wait_ms), queue: self.queue }
    }
}

/// What a server needs besides its listener.
pub struct Options {
    pub limits: Limits,
    pub query: QueryConfig,
    /// The span detector that joins slot decisions (`--detector`), if any.
    pub detector: Option<Arc<SpanDetector>>,
    /// The slot scorer that makes them (`--scorer`), if any.
    pub scorer: Option<Arc<SlotScorer>>,
    pub api_key: Option<String>,
    pub cors_origins: Vec<String>,
}

/// The shared state of a running server.
pub struct State {
    encoder: Arc<Encoder>,
    index: Arc<RwLock<SpanIndex>>,
    index_path: PathBuf,
    build: BuildConfig,
    query: QueryConfig,
    limits: Limits,
    api_key: Option<String>,
    cors_origins: Vec<String>,
    metrics: Arc<Metrics>,
    batcher: Batcher,
    /// Serializes saves (one temp file at a time).
    save_lock: Mutex<()>,
    /// Bumped under the write lock at every change of the index.
    generation: AtomicU64,
    /// The generation last written to `index_path`.
    saved: AtomicU64,
}

fn read(index: &RwLock<SpanIndex>) -> RwLockReadGuard<'_, SpanIndex> {
    // A panic in a reader cannot leave the index half-written; a writer's panic is
    // caught by the generation check (the next save writes what is in memory).
    index.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(index: &RwLock<SpanIndex>) -> RwLockWriteGuard<'_, SpanIndex> {
    index.write().unwrap_or_else(PoisonError::into_inner)
}

/// Counts and label inventories of an index, as `GET /v1/index` reports them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IndexSummary {
    pub examples: usize,
    pub spans: usize,
}

impl State {
    /// Builds the state and starts the batcher; call it inside a tokio runtime.
    pub fn new(encoder: Encoder, index: SpanIndex, index_path: &Path, options: Options) -> Result<Arc<Self>, ServeError> {
        let build = labeler::build_config_of(&index)
            .map_err(|e| ServeError::Internal(format!("{}: {e}", index_path.display())))?;
        let encoder = Arc::new(encoder);
        let index = Arc::new(RwLock::new(index));
        let metrics = Arc::new(Metrics::default());
        let process = parse_process(encoder.clone(), index.clone(), build, options.query, (options.detector.clone(), options.scorer.clone()));
        let batcher = Batcher::start(options.limits.batch_config(), process, metrics.clone())?;
        Ok(Arc::new(Self {
            encoder,
            index,
            index_path: index_path.to_path_buf(),
            build,
            query: options.query,
            limits: options.limits,
            api_key: options.api_key.filter(|k| !k.is_empty()),
            cors_origins: options.cors_origins,
            metrics,
            batcher,
            save_lock: Mutex::new(()),
            generation: AtomicU64::new(0),
            saved: AtomicU64::new(0),
        }))
    }

    /// Adds labeled examples to the live index and saves it; returns the index's new size.
    /// Blocking: call it from `spawn_blocking`.
    pub fn add_examples(&self, examples: &[Example]) -> Result<IndexSummary, ServeError> {
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let encoded = self.encoder.encode(&texts, self.query.batch_size).map_err(labeler::LabelerError::from)?;
        {
            let mut index = write(&self.index);
            let added = labeler::add_encoded(&mut index, examples, &encoded, &self.build);
            self.generation.fetch_add(1, Ordering::SeqCst);
            added?;
        }
        self.metrics.examples_added(examples.len());
        self.save()?;
        Ok(self.summary())
    }

    /// Writes the index to its file (atomically) unless that already holds every change.
    pub fn save(&self) -> Result<(), ServeError> {
        let _one_at_a_time = self.save_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let index = read(&self.index);
        let generation = self.generation.load(Ordering::SeqCst);
        if generation == self.saved.load(Ordering::SeqCst) {
            return Ok(());
        }
        index.save(&self.index_path).map_err(ServeError::Save)?;
        self.saved.store(generation, Ordering::SeqCst);
        Ok(())
    }

    pub fn summary(&self) -> IndexSummary {
        let index = read(&self.index);
        IndexSummary { examples: index.n_examples(), spans: index.n_spans() }
    }

    fn gauges(&self) -> IndexGauges {
        let index = read(&self.index);
        IndexGauges { examples: index.n_examples(), spans: index.n_spans(), labels: index.n_labels() }
    }
}

/// The batcher's work: encode outside the index lock, retrieve and decide under it.
fn parse_process(
    encoder: Arc<Encoder>,
    index: Arc<RwLock<SpanIndex>>,
    build: BuildConfig,
    cfg: QueryConfig,
    (detector, scorer): (Option<Arc<SpanDetector>>, Option<Arc<SlotScorer>>),
) -> Process {
    Arc::new(move |texts: &[&str]| -> Result<Vec<Prediction>, ServeError> {
        let examples: Vec<Example> = texts.iter().map(|t| Example::from_text(t, None)).collect();
        let encoded = encoder.encode(texts, cfg.batch_size).map_err(labeler::LabelerError::from)?;
        let index = read(&index);
        let retrieved = labeler::retrieve_encoded(&index, &examples, &encoded, &build, &cfg, detector.as_deref());
        Ok(examples.iter().zip(&retrieved).map(|(ex, r)| labeler::decide_with(&index, ex, r, &cfg, scorer.as_deref())).collect())
    })
}

/// Why a server stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the index could not be saved at shutdown: {0}")]
    Save(ServeError),
    #[error("the final save did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Serves `state` on `listener` until `shutdown` resolves; then lets in-flight requests
/// finish and saves the index if it changed since its last save.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let app = routes::router(state.clone());
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    tokio::task::spawn_blocking(move || state.save()).await?.map_err(ServerError::Save)?;
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C). The handlers are installed when
/// this is called, not when it is first polled.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// `nearspan serve`.
pub fn run(a: ServeArgs, out: &mut dyn Write) -> Result<()> {
    let query = a.settings.config()?;
    a.limits.check()?;
    for origin in &a.cors_origin {
        routes::check_origin(origin)?;
    }
    let mut encoder = a.model.load()?;
    let mut index = crate::cli::open_index(&a.index, &encoder)?;
    // --ef, and with --prefilter the span halves built before the first request.
    a.settings.apply(&mut index);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    let detector = a.settings.load_detector(&mut encoder)?.map(Arc::new);
    let scorer = a.settings.load_scorer()?.map(Arc::new);
    let options = Options { limits: a.limits, query, detector, scorer, api_key: a.api_key, cors_origins: a.cors_origin };
    let result = rt.block_on(async {
        let shutdown = shutdown_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
        let state = State::new(encoder, index, &a.index, options)?;
        let listener = tokio::net::TcpListener::bind(&a.addr).await.with_context(|| format!("cannot listen on {}", a.addr))?;
        let addr = listener.local_addr()?;
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        serve(listener, state.clone(), shutdown).await?;
        anyhow::Ok(state.summary())
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let summary = result?;
    writeln!(out, "stopped; {} holds {} examples, {} spans", a.index.display(), summary.examples, summary.spans)?;
    Ok(())
}
