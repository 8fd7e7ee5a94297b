//! `nearspan bench hnsw`: single-query latency and recall@1 of the USearch HNSW backend
//! on N synthetic span-like vectors (default 10^6 × 384), against exact search.
//!
//! Data ([`Clusters`], the generator of `index/examples/ann_compare.rs`): `centres`
//! random unit centres (default 1,000); each vector is a centre plus gaussian noise of
//! norm ≈ `noise` (default 0.8), L2-normalized, because real span vectors are clustered.
//! Queries come from the same distribution on another seeded stream, so none is in the
//! index. Each block of 4,096 rows has its own ChaCha stream keyed by (seed, stream,
//! block): blocks are made in parallel, and the first N rows do not depend on how many
//! follow (the 10^5 index is a prefix of the 10^6 one).
//!
//! Measured, each query alone on the calling thread (as the labeler's per-span
//! searches run): p50/p99 latency at k = 1 and k = 10 for every `ef` asked, recall@1
//! and recall@10 against exact search, the build time, and the rate of exact search
//! (blocked dot products, [`exact_search`]) in GFLOP/s = 2·N·dim·Q / seconds. Search
//! goes through [`AnnBackend::search`] on a boxed backend, the call
//! `SpanIndex::search_spans` makes; the graph is built with `insert_batch`, which is
//! how `SpanIndex` builds a graph over existing vectors (in parallel).
//!
//! A 10^6 build takes about 20 minutes on 2 cores, so the graph is cached on disk and
//! a rerun with the same data and graph parameters loads it instead.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use nearspan_index::backend::{exact::exact_search, new_backend, AnnBackend, CodeKernel, Ivf, IvfParams, UsearchBackend, Vectors};
use nearspan_index::{BackendKind, GraphPrecision, HnswParams, Neighbor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Rows per generator stream: small enough to spread over the cores, large enough
/// that seeding a stream costs nothing.
const BLOCK_ROWS: usize = 4096;

/// The index size whose results also go to the top-level headline keys.
const HEADLINE_N: usize = 1_000_000;

#[derive(Debug, Args)]
pub struct HnswBenchArgs {
    /// Vectors in the index.
    #[arg(long, default_value_t = HEADLINE_N)]
    pub n: usize,
    /// Vector dimension (384: all-MiniLM-L6-v2 with mean pooling).
    #[arg(long, default_value_t = 384)]
    pub dim: usize,
    /// Queries timed one at a time (drawn like the index vectors, not in it).
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// Cluster centres of the generator.
    #[arg(long, default_value_t = 1000)]
    pub centres: usize,
    /// Norm of the gaussian noise added to a centre, before normalizing.
    #[arg(long, default_value_t = 0.8)]
    pub noise: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The structure measured: usearch (HNSW) or ivf (k-means lists of 8-bit codes,
    /// re-scored in f32; built in each run, never cached).
    #[arg(long, default_value = "usearch", value_parser = ["usearch", "ivf"])]
    pub backend: String,
    /// IVF: lists (k-means clusters); 0: the square root of --n.
    #[arg(long, default_value_t = 0)]
    pub lists: usize,
    /// IVF: lists scanned per query, the values to measure (comma-separated); the
    /// headline is the smallest whose recall@1 reaches --target-recall.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,6,8,16")]
    pub nprobe: Vec<usize>,
    /// IVF: candidates by 8-bit score re-scored in f32.
    #[arg(long, default_value_t = IvfParams::default().rerank)]
    pub rerank: usize,
    /// HNSW `M` (links per node).
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    /// HNSW `efConstruction`.
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// Precision of the graph's copy of the vectors: f32 or bf16 (half the memory traffic).
    #[arg(long, default_value = "f32")]
    pub graph_precision: GraphPrecision,
    /// `ef` values to measure (comma-separated); the headline is the smallest whose
    /// recall@1 reaches --target-recall.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,192,256,384,512")]
    pub ef: Vec<usize>,
    #[arg(long, default_value_t = 0.98)]
    pub target_recall: f64,
    /// Graph cache file (default: target/bench-cache/hnsw-<data and graph parameters>.usearch).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Build the graph even when the cache holds it, and overwrite the cache.
    #[arg(long)]
    pub rebuild: bool,
    /// Neither read nor write a cache.
    #[arg(long, conflicts_with_all = ["cache", "rebuild"])]
    pub no_cache: bool,
    /// Real span vectors instead of the synthetic clusters: the first N spans of this
    /// nearspan index (built with `--pooling mean` for 384 dimensions).
    #[arg(long, requires = "spans_queries", value_name = "INDEX")]
    pub spans_index: Option<PathBuf>,
    /// With --spans-index: queries are --queries spans spread evenly over this index
    /// (e.g. built from a test split, so that no query is in the searched index).
    #[arg(long, requires = "spans_index", value_name = "INDEX")]
    pub spans_queries: Option<PathBuf>,
    /// Results file: key `hnsw`, and `hnsw_1m_query_p50_us` / `hnsw_1m_recall_at_1` when N = 10^6
    /// (with --spans-index: `hnsw_spans`, `hnsw_1m_spans_query_p50_us`, `hnsw_1m_spans_recall_at_1`).
    #[arg(long, default_value = "benches/results/speed.json")]
    pub out: PathBuf,
}

/// Real span vectors: the first N spans of one index, queries spread over another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanSource {
    pub index: PathBuf,
    pub queries: PathBuf,
}

impl SpanSource {
    pub const DESCRIPTION: &'static str = "span vectors stored in nearspan indexes: the first n spans of `index`, \
        and `queries` spans spread evenly (span i * total / queries) over the `queries` index";

    /// The first `n` span vectors of the index and `nq` query vectors, both `dim` wide.
    fn load(&self, n: usize, nq: usize, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let open = |path: &Path| -> Result<nearspan_index::SpanIndex> {
            let index = nearspan_index::SpanIndex::open(path, None).with_context(|| format!("{}: cannot open the index", path.display()))?;
            ensure!(
                index.encoder().dim as usize == dim,
                "{}: span vectors have {} dimensions, the benchmark {dim} (--dim)",
                path.display(),
                index.encoder().dim
            );
            Ok(index)
        };
        let index = open(&self.index)?;
        ensure!(index.n_spans() >= n, "{}: holds {} spans, --n asks for {n}", self.index.display(), index.n_spans());
        let vectors = (0..n as u32).flat_map(|i| index.span_vector(i).iter().copied()).collect();
        drop(index);
        let queries = open(&self.queries)?;
        let total = queries.n_spans();
        ensure!(total >= nq, "{}: holds {total} spans, --queries asks for {nq}", self.queries.display());
        let picked = (0..nq).flat_map(|i| queries.span_vector((i * total / nq) as u32).iter().copied()).collect();
        Ok((vectors, picked))
    }
}

/// Clustered unit vectors, seeded (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Clusters {
    pub dim: usize,
    pub centres: usize,
    /// Norm of the noise vector (each coordinate has std `noise / sqrt(dim)`).
    pub noise: f64,
    pub seed: u64,
}

impl Clusters {
    pub const DESCRIPTION: &'static str = "centres: gaussian vectors, normalized; vector: a uniformly chosen centre \
        + gaussian noise of std noise/sqrt(dim) per coordinate, normalized; ChaCha12 (rand StdRng) streams \
        keyed by (seed, stream, block of 4096 rows): centres 0, index vectors 1, queries 2";

    /// The first `n` index vectors, row-major.
    pub fn index_vectors(&self, n: usize) -> Vec<f32> {
        self.rows(1, n)
    }

    /// `n` query vectors, from a stream the index vectors never use.
    pub fn queries(&self, n: usize) -> Vec<f32> {
        self.rows(2, n)
    }

    fn rng(&self, stream: u64, block: u64) -> StdRng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&stream.to_le_bytes());
        key[16..24].copy_from_slice(&block.to_le_bytes());
        StdRng::from_seed(key)
    }

    fn centre_vectors(&self) -> Vec<f32> {
        let mut rng = self.rng(0, 0);
        let g = Normal::new(0.0f32, 1.0).expect("unit normal");
        let mut c: Vec<f32> = (0..self.centres * self.dim).map(|_| g.sample(&mut rng)).collect();
        c.chunks_exact_mut(self.dim).for_each(normalize);
        c
    }

    fn rows(&self, stream: u64, n: usize) -> Vec<f32> {
        let (dim, centres) = (self.dim, self.centre_vectors());
        let g = Normal::new(0.0f32, (self.noise / (dim as f64).sqrt()) as f32).expect("noise checked non-negative");
        let mut out = vec![0f32; n * dim];
        out.par_chunks_mut(BLOCK_ROWS * dim).enumerate().for_each(|(b, block)| {
            let mut rng = self.rng(stream, b as u64);
            for v in block.chunks_exact_mut(dim) {
                let c = rng.random_range(0..self.centres);
                for (x, m) in v.iter_mut().zip(&centres[c * dim..(c + 1) * dim]) {
                    *x = m + g.sample(&mut rng);
                }
                normalize(v);
            }
        });
        out
    }
}

fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// What to measure; [`HnswBench::measure`] runs it.
#[derive(Debug, Clone)]
pub struct HnswBench {
    pub n: usize,
    pub queries: usize,
    pub data: Clusters,
    /// Real span vectors instead of `data` (whose `dim` still applies).
    pub spans: Option<SpanSource>,
    /// `m` and `ef_construction` are used; `ef_search` is replaced by each of `efs`.
    pub params: HnswParams,
    /// Measure IVF with these parameters instead of HNSW; `efs` then hold `nprobe` values.
    pub ivf: Option<IvfParams>,
    pub efs: Vec<usize>,
    pub target_recall: f64,
    /// Where the graph is cached (None: never cached).
    pub cache: Option<PathBuf>,
    /// Ignore (and overwrite) a cached graph.
    pub rebuild: bool,
}

/// One `ef`'s results. Latencies in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct EfRow {
    pub ef: usize,
    pub recall_at_1: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub recall_at_10: f64,
    pub k10_p50_us: f64,
    pub k10_p99_us: f64,
}

/// Everything [`HnswBench::measure`] found.
#[derive(Debug, Clone, Serialize)]
pub struct HnswReport {
    pub n: usize,
    pub dim: usize,
    pub queries: usize,
    pub data: Clusters,
    /// Set when the vectors are real spans (then `data` holds only the dimension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spans: Option<SpanSource>,
    /// [`Clusters::DESCRIPTION`] or [`SpanSource::DESCRIPTION`]: how the data was made.
    pub generator: &'static str,
    pub backend: String,
    /// IVF only: its parameters and how many rows each list got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivf: Option<IvfSummary>,
    pub m: usize,
    pub ef_construction: usize,
    pub graph_precision: GraphPrecision,
    pub target_recall: f64,
    /// The smallest ef whose recall@1 reaches the target (None: none did).
    pub headline_ef: Option<usize>,
    pub per_ef: Vec<EfRow>,
    pub generate_s: f64,
    /// Build time of the graph (when loaded from the cache: of the run that built it).
    pub build_s: f64,
    pub build_threads: usize,
    /// Seconds to load the cached graph; None when it was built in this run.
    pub cache_load_s: Option<f64>,
    pub cache: Option<PathBuf>,
    pub graph_memory_bytes: usize,
    pub exact_s: f64,
    pub exact_gflops: f64,
    pub threads: usize,
}

impl HnswReport {
    /// The headline row: the smallest ef reaching the target, else the best recall.
    pub fn headline(&self) -> &EfRow {
        let best = || self.per_ef.iter().max_by(|a, b| a.recall_at_1.total_cmp(&b.recall_at_1));
        self.headline_ef.and_then(|ef| self.per_ef.iter().find(|r| r.ef == ef)).or_else(best).expect("at least one ef")
    }
}

/// What an IVF run used: `nprobe` is measured per row instead of `ef`.
#[derive(Debug, Clone, Serialize)]
pub struct IvfSummary {
    /// The 8-bit dot-product kernel (`NEARSPAN_IVF_KERNEL` picks a slower one).
    pub kernel: &'static str,
    pub lists: usize,
    pub rerank: usize,
    pub sample_per_list: usize,
    pub iterations: usize,
    pub seed: u64,
    pub smallest_list: usize,
    pub median_list: usize,
    pub largest_list: usize,
}

/// Identity of a cached graph: it is reused only if all of this matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheKey {
    n: usize,
    data: Clusters,
    m: usize,
    ef_construction: usize,
    /// Absent in caches written before graph precision existed: those are f32.
    #[serde(default)]
    graph_precision: GraphPrecision,
    /// sha256 of the first row of every generator block and of the last row: catches a
    /// generator whose output changed (e.g. a new `rand`) while the parameters did not.
    data_fingerprint: String,
    /// Absent for synthetic data (and in caches written before real spans existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spans: Option<SpanSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheHeader {
    key: CacheKey,
    build_s: f64,
    build_threads: usize,
}

const CACHE_MAGIC: &[u8; 8] = b"NSHNSWG1";

impl HnswBench {
    /// The cache file used when none is given: named after everything that shapes the graph.
    pub fn default_cache_path(&self) -> PathBuf {
        let d = &self.data;
        let precision = match self.params.graph_precision {
            GraphPrecision::F32 => "",
            GraphPrecision::Bf16 => "-bf16",
        };
        if let Some(s) = &self.spans {
            let stem = s.index.file_stem().map_or("index".into(), |x| x.to_string_lossy().into_owned());
            return PathBuf::from("target/bench-cache").join(format!(
                "hnsw-spans-{stem}-{}x{}-m{}-efc{}{precision}.usearch",
                self.n, d.dim, self.params.m, self.params.ef_construction
            ));
        }
        PathBuf::from("target/bench-cache").join(format!(
            "hnsw-{}x{}-c{}-noise{}-seed{}-m{}-efc{}{}.usearch",
            self.n,
            d.dim,
            d.centres,
            d.noise,
            d.seed,
            self.params.m,
            self.params.ef_construction,
            match self.params.graph_precision {
                GraphPrecision::F32 => "",
                GraphPrecision::Bf16 => "-bf16",
            }
        ))
    }

    fn check(&self) -> Result<()> {
        let d = &self.data;
        ensure!(self.n > 0 && self.queries > 0, "--n and --queries must be positive");
        ensure!(self.n <= u32::MAX as usize, "--n {} exceeds the index's u32 ids", self.n);
        ensure!(d.dim > 0 && d.centres > 0, "--dim and --centres must be positive");
        ensure!(d.noise.is_finite() && d.noise >= 0.0, "--noise must be a non-negative number, got {}", d.noise);
        ensure!(!self.efs.is_empty() && !self.efs.contains(&0), "--ef (--nprobe with ivf) needs at least one positive value, none zero");
        ensure!(self.params.m >= 2 && self.params.ef_construction > 0, "--m must be at least 2, --ef-construction positive");
        Ok(())
    }

    /// Generates the data, builds or loads the graph, runs exact search for the ground
    /// truth and times every ef. Progress goes to `log`.
    pub fn measure(&self, log: &mut dyn Write) -> Result<HnswReport> {
        self.check()?;
        let (n, dim, nq) = (self.n, self.data.dim, self.queries);
        let t = Instant::now();
        let (vectors, queries) = match &self.spans {
            Some(s) => s.load(n, nq, dim)?,
            None => (self.data.index_vectors(n), self.data.queries(nq)),
        };
        let vectors = Vectors::from_vec(dim, vectors);
        let generate_s = t.elapsed().as_secs_f64();
        writeln!(log, "{} {n} + {nq} vectors of {dim} dims in {generate_s:.1} s", if self.spans.is_some() { "read" } else { "generated" })?;

        let (mut backend, build_s, build_threads, cache_load_s, ivf) = match self.ivf {
            Some(params) => {
                let t = Instant::now();
                let ivf = Ivf::build(&vectors, params)?;
                let build_s = t.elapsed().as_secs_f64();
                let mut sizes = ivf.list_sizes();
                sizes.sort_unstable();
                writeln!(log, "built {} IVF lists in {build_s:.1} s (rows per list {}..{})", sizes.len(), sizes[0], sizes[sizes.len() - 1])?;
                let summary = IvfSummary {
                    kernel: CodeKernel::get().name(),
                    lists: sizes.len(),
                    rerank: params.rerank,
                    sample_per_list: params.sample_per_list,
                    iterations: params.iterations,
                    seed: params.seed,
                    smallest_list: sizes[0],
                    median_list: sizes[sizes.len() / 2],
                    largest_list: sizes[sizes.len() - 1],
                };
                (Box::new(ivf) as Box<dyn AnnBackend>, build_s, rayon::current_num_threads(), None, Some(summary))
            }
            None => {
                let (backend, header, load_s) = self.graph(&vectors, log)?;
                (backend, header.build_s, header.build_threads, load_s, None)
            }
        };

        let t = Instant::now();
        let truth = exact_search(vectors.as_slice(), dim, &queries, 10);
        let exact_s = t.elapsed().as_secs_f64();
        let exact_gflops = 2.0 * n as f64 * dim as f64 * nq as f64 / exact_s / 1e9;
        writeln!(log, "exact search, {nq} queries: {exact_s:.2} s, {exact_gflops:.1} GFLOP/s")?;

        let mut rows = Vec::new();
        for &ef in &self.efs {
            backend.set_ef_search(ef);
            let (lat1, got1) = time_queries(backend.as_ref(), &vectors, &queries, 1);
            let (lat10, got10) = time_queries(backend.as_ref(), &vectors, &queries, 10);
            rows.push(EfRow {
                ef,
                recall_at_1: recall(&got1, &truth, 1),
                p50_us: super::percentile(&lat1, 50.0),
                p99_us: super::percentile(&lat1, 99.0),
                recall_at_10: recall(&got10, &truth, 10),
                k10_p50_us: super::percentile(&lat10, 50.0),
                k10_p99_us: super::percentile(&lat10, 99.0),
            });
        }
        let headline_ef = rows.iter().filter(|r| r.recall_at_1 >= self.target_recall).map(|r| r.ef).min();
        Ok(HnswReport {
            n,
            dim,
            queries: nq,
            data: self.data,
            spans: self.spans.clone(),
            generator: if self.spans.is_some() { SpanSource::DESCRIPTION } else { Clusters::DESCRIPTION },
            backend: backend.kind().to_string(),
            ivf,
            m: self.params.m,
            ef_construction: self.params.ef_construction,
            graph_precision: self.params.graph_precision,
            target_recall: self.target_recall,
            headline_ef,
            per_ef: rows,
            generate_s,
            build_s,
            build_threads,
            cache_load_s,
            cache: self.cache.clone(),
            graph_memory_bytes: backend.memory_bytes(),
            exact_s,
            exact_gflops,
            threads: rayon::current_num_threads(),
        })
    }

    /// The HNSW graph: loaded from the cache when it holds one for this data and these
    /// parameters, else built (and cached). Also returns the cache's load time.
    fn graph(&self, vectors: &Vectors, log: &mut dyn Write) -> Result<(Box<dyn AnnBackend>, CacheHeader, Option<f64>)> {
        let n = vectors.len();
        let key = CacheKey {
            n,
            data: self.data,
            m: self.params.m,
            ef_construction: self.params.ef_construction,
            graph_precision: self.params.graph_precision,
            data_fingerprint: fingerprint(vectors),
            spans: self.spans.clone(),
        };
        let cached = match &self.cache {
            Some(path) if !self.rebuild => load_graph(path, &key, &self.params)?,
            _ => None,
        };
        Ok(match cached {
            Some((backend, header, load_s)) => {
                writeln!(log, "loaded the graph from {} in {load_s:.1} s (built in {:.1} s)", self.cache.as_ref().unwrap().display(), header.build_s)?;
                (backend, header, Some(load_s))
            }
            None => {
                let (backend, build_s) = self.build(vectors, log)?;
                let header = CacheHeader { key, build_s, build_threads: rayon::current_num_threads() };
                if let Some(path) = &self.cache {
                    save_graph(path, &header, backend.as_ref())?;
                    writeln!(log, "cached the graph in {}", path.display())?;
                }
                (backend, header, None)
            }
        })
    }

    /// Inserts all rows with `insert_batch` (parallel), in chunks so that progress shows.
    fn build(&self, vectors: &Vectors, log: &mut dyn Write) -> Result<(Box<dyn AnnBackend>, f64)> {
        let (n, dim) = (vectors.len(), vectors.dim());
        let mut backend = new_backend(BackendKind::Usearch, dim, &self.params, n)
            .map_err(|k| anyhow::anyhow!("the {k} backend is not compiled in; build nearspan-index with feature usearch"))?;
        let chunk = (n / 20).max(10_000);
        let t = Instant::now();
        for first in (0..n).step_by(chunk) {
            let rows = &vectors.as_slice()[first * dim..(first + chunk).min(n) * dim];
            backend.insert_batch(first as u32, rows, dim)?;
            let done = (first + chunk).min(n);
            writeln!(log, "  built {done}/{n} ({:.1} s)", t.elapsed().as_secs_f64())?;
        }
        Ok((backend, t.elapsed().as_secs_f64()))
    }
}

/// Latencies (µs) of each query alone, after a few untimed ones, and the results.
fn time_queries(backend: &dyn AnnBackend, data: &Vectors, queries: &[f32], k: usize) -> (Vec<f64>, Vec<Vec<Neighbor>>) {
    for q in queries.chunks_exact(data.dim()).take(20) {
        std::hint::black_box(backend.search(data, q, k));
    }
    let mut lat = Vec::with_capacity(queries.len() / data.dim());
    let mut got = Vec::with_capacity(lat.capacity());
    for q in queries.chunks_exact(data.dim()) {
        let t = Instant::now();
        let hits = backend.search(data, q, k);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        got.push(hits);
    }
    lat.sort_by(f64::total_cmp);
    (lat, got)
}

/// Fraction of the true top `k` found in the returned top `k`. A returned row counts
/// if it is among the true top `k` or exactly as similar as the true `k`-th (real spans
/// hold exact duplicates, e.g. a repeated sentence, which tie in any order).
fn recall(got: &[Vec<Neighbor>], truth: &[Vec<Neighbor>], k: usize) -> f64 {
    let hits: usize = got
        .iter()
        .zip(truth)
        .map(|(g, t)| {
            let want = &t[..k.min(t.len())];
            let kth = want.last().map_or(f32::INFINITY, |w| w.similarity);
            g.iter().take(k).filter(|h| want.iter().any(|w| w.id == h.id) || h.similarity >= kth).count()
        })
        .sum();
    let total: usize = truth.iter().map(|t| k.min(t.len())).sum();
    hits as f64 / total.max(1) as f64
}

fn fingerprint(v: &Vectors) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for i in (0..v.len()).step_by(BLOCK_ROWS).chain([v.len() - 1]) {
        v.row(i).iter().for_each(|x| h.update(x.to_le_bytes()));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Cache file: magic, u64 header length, header JSON, u64 graph length, USearch graph
/// bytes. Written atomically, so an interrupted 20-minute build leaves no half file.
fn save_graph(path: &Path, header: &CacheHeader, backend: &dyn AnnBackend) -> Result<()> {
    let graph = backend.graph_bytes()?.context("the usearch backend did not serialize its graph")?;
    let head = serde_json::to_vec(header)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    // Same directory as the target, so the rename cannot cross file systems.
    let tmp = path.with_extension("usearch.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(CACHE_MAGIC)?;
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        f.write_all(&(graph.len() as u64).to_le_bytes())?;
        f.write_all(&graph)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().with_context(|| format!("{}: cannot write the graph cache", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))
}

/// The cached graph at `path` if it exists; an error if it is for other data or damaged.
fn load_graph(path: &Path, key: &CacheKey, params: &HnswParams) -> Result<Option<(Box<dyn AnnBackend>, CacheHeader, f64)>> {
    let t = Instant::now();
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot open the graph cache", path.display())),
    };
    let hint = "pass --rebuild to overwrite it, or another --cache";
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut rest = &bytes[..];
    let mut take = |len: usize| -> Result<&[u8]> {
        ensure!(rest.len() >= len, "{}: truncated graph cache; {hint}", path.display());
        let (head, tail) = rest.split_at(len);
        rest = tail;
        Ok(head)
    };
    ensure!(take(8)? == CACHE_MAGIC, "{}: not a nearspan graph cache; {hint}", path.display());
    let head_len = u64::from_le_bytes(take(8)?.try_into()?) as usize;
    let header: CacheHeader = serde_json::from_slice(take(head_len)?)
        .with_context(|| format!("{}: unreadable cache header; {hint}", path.display()))?;
    if header.key != *key {
        bail!("{}: cached graph is for {:?}, this run needs {:?}; {hint}", path.display(), header.key, key);
    }
    let graph_len = u64::from_le_bytes(take(8)?.try_into()?) as usize;
    let graph = take(graph_len)?;
    let backend = UsearchBackend::from_graph_bytes(graph, params)
        .with_context(|| format!("{}: USearch cannot restore the cached graph; {hint}", path.display()))?;
    ensure!(backend.len() == key.n, "{}: cached graph holds {} vectors, expected {}; {hint}", path.display(), backend.len(), key.n);
    Ok(Some((Box::new(backend), header, t.elapsed().as_secs_f64())))
}

pub fn run(a: HnswBenchArgs, out: &mut dyn Write) -> Result<()> {
    let load_before = super::loadavg_1min();
    let mut bench = HnswBench {
        n: a.n,
        queries: a.queries,
        data: Clusters { dim: a.dim, centres: a.centres, noise: a.noise, seed: a.seed },
        spans: a.spans_index.clone().zip(a.spans_queries.clone()).map(|(index, queries)| SpanSource { index, queries }),
        params: HnswParams {
            m: a.m,
            ef_construction: a.ef_construction,
            ef_search: a.ef[0],
            graph_precision: a.graph_precision,
            ..HnswParams::default()
        },
        ivf: (a.backend == "ivf").then_some(IvfParams { lists: a.lists, rerank: a.rerank, ..IvfParams::default() }),
        efs: if a.backend == "ivf" { a.nprobe.clone() } else { a.ef.clone() },
        target_recall: a.target_recall,
        cache: None,
        rebuild: a.rebuild,
    };
    if !a.no_cache && bench.ivf.is_none() {
        bench.cache = Some(a.cache.clone().unwrap_or_else(|| bench.default_cache_path()));
    }
    let report = bench.measure(out)?;
    write_table(out, &report)?;

    let mut detail = serde_json::to_value(&report)?;
    detail["headline"] = serde_json::to_value(report.headline())?;
    detail["command"] = super::encoder::command_line().into();
    detail["loadavg_1min_before"] = load_before.into();
    detail["loadavg_1min_after"] = super::loadavg_1min().into();
    let (key, headline) = match (&report.spans, &report.ivf) {
        (Some(_), None) => ("hnsw_spans", "hnsw_1m_spans"),
        (None, None) => ("hnsw", "hnsw_1m"),
        (Some(_), Some(_)) => ("ivf_spans", "ivf_1m_spans"),
        (None, Some(_)) => ("ivf", "ivf_1m"),
    };
    if report.ivf.is_some() {
        // The rows' breadth is nprobe, not ef: name it so in the results.
        let o = detail.as_object_mut().expect("a report is an object");
        let rows = o.get_mut("per_ef").and_then(|v| v.as_array_mut()).into_iter().flatten();
        for row in rows.filter_map(|r| r.as_object_mut()) {
            let v = row.remove("ef").unwrap_or_default();
            row.insert("nprobe".into(), v);
        }
        if let Some(h) = o.get_mut("headline").and_then(|v| v.as_object_mut()) {
            let v = h.remove("ef").unwrap_or_default();
            h.insert("nprobe".into(), v);
        }
        for (from, to) in [("per_ef", "per_nprobe"), ("headline_ef", "headline_nprobe")] {
            let v = o.remove(from).unwrap_or_default();
            o.insert(to.into(), v);
        }
        for unused in ["m", "ef_construction", "graph_precision", "cache", "cache_load_s"] {
            o.remove(unused);
        }
    }
    super::merge_result(&a.out, &[key], detail)?;
    if report.n == HEADLINE_N {
        let h = report.headline();
        super::merge_result(&a.out, &[&format!("{headline}_query_p50_us")], h.p50_us.into())?;
        super::merge_result(&a.out, &[&format!("{headline}_recall_at_1")], h.recall_at_1.into())?;
    }
    writeln!(out, "wrote {}", a.out.display())?;
    Ok(())
}

fn write_table(out: &mut dyn Write, r: &HnswReport) -> Result<()> {
    let d = &r.data;
    let data = match &r.spans {
        Some(s) => format!("spans of {}, queries from {}", s.index.display(), s.queries.display()),
        None => format!("{} centres, noise {}, seed {}", d.centres, d.noise, d.seed),
    };
    let (structure, breadth) = match &r.ivf {
        Some(v) => (format!("IVF ({} kernel), {} lists (rows per list {}..{}, median {}), {} re-scored", v.kernel, v.lists, v.smallest_list, v.largest_list, v.median_list, v.rerank), "nprobe"),
        None => (format!("usearch HNSW, M = {}, efConstruction = {}", r.m, r.ef_construction), "ef"),
    };
    writeln!(out, "{structure}; n = {}, dim {}, {data}; {} queries, one at a time", r.n, r.dim, r.queries)?;
    writeln!(
        out,
        "build {:.1} s ({} threads{}); exact search {:.1} GFLOP/s",
        r.build_s,
        r.build_threads,
        r.cache_load_s.map_or(String::new(), |s| format!(", loaded from cache in {s:.1} s")),
        r.exact_gflops
    )?;
    writeln!(out, "{:>6}  {:>8}  {:>8}  {:>8}  {:>9}  {:>10}  {:>10}", breadth, "recall@1", "p50 µs", "p99 µs", "recall@10", "k=10 p50", "k=10 p99")?;
    for row in &r.per_ef {
        writeln!(
            out,
            "{:>6}  {:>8.3}  {:>8.1}  {:>8.1}  {:>9.3}  {:>10.1}  {:>10.1}",
            row.ef, row.recall_at_1, row.p50_us, row.p99_us, row.recall_at_10, row.k10_p50_us, row.k10_p99_us
        )?;
    }
    let h = r.headline();
    match r.headline_ef {
        Some(ef) => writeln!(out, "headline: {breadth} = {ef} is the smallest with recall@1 >= {}: p50 {:.1} µs (recall@1 {:.3})", r.target_recall, h.p50_us, h.recall_at_1)?,
        None => writeln!(out, "headline: no {breadth} reached recall@1 {}; best {breadth} = {}: recall@1 {:.3}, p50 {:.1} µs; try larger values", r.target_recall, h.ef, h.recall_at_1, h.p50_us)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Clusters {
        Clusters { dim: 16, centres: 10, noise: 0.5, seed: 7 }
    }

    #[test]
    fn hnsw_generator_is_seeded_unit_and_prefix_stable() {
        let d = data();
        let big = d.index_vectors(BLOCK_ROWS + 10);
        let small = d.index_vectors(100);
        assert_eq!(&big[..small.len()], &small[..]);
        assert_eq!(d.index_vectors(100), small);
        for v in big.chunks_exact(d.dim) {
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        assert_ne!(d.queries(100), small);
    }

    #[test]
    fn recall_counts_exact_ties_with_the_kth_as_found() {
        let n = |id: u32, similarity: f32| Neighbor { id, similarity };
        let truth = vec![vec![n(1, 0.9), n(2, 0.8)]];
        // id 7 ties with the true 2nd: found; id 8 is less similar: missed
        assert_eq!(recall(&[vec![n(1, 0.9), n(7, 0.8)]], &truth, 2), 1.0);
        assert_eq!(recall(&[vec![n(1, 0.9), n(8, 0.7)]], &truth, 2), 0.5);
        assert_eq!(recall(&[vec![n(2, 0.8)]], &truth, 1), 0.0);
    }

    /// Real-span mode: the first N spans of one index, queries from another, their own
    /// cache key; too few spans is an error naming the file.
    #[test]
    fn hnsw_bench_reads_span_vectors_from_indexes() {
        use nearspan_index::{EncoderInfo, NewSpan, SpanIndex};
        let dir = tempfile::tempdir().unwrap();
        let d = data();
        let write = |name: &str, rows: Vec<f32>| {
            let info = EncoderInfo { model_id: "t".into(), revision: "0".into(), pooling: "mean".into(), max_width: 4, dim: d.dim as u32 };
            let mut index = SpanIndex::new(info, BackendKind::Exact, HnswParams::default()).unwrap();
            for ex in rows.chunks(d.dim * 10) {
                let spans: Vec<(NewSpan<'_>, &[f32])> =
                    ex.chunks_exact(d.dim).map(|v| (NewSpan { label: "x", start: 0, end: 1, text: "a" }, v)).collect();
                index.add_example("a", None, &ex[..d.dim], &spans).unwrap();
            }
            let path = dir.path().join(name);
            index.save(&path).unwrap();
            path
        };
        let source = SpanSource { index: write("train.nsi", d.index_vectors(2500)), queries: write("test.nsi", d.queries(400)) };
        let bench = HnswBench {
            n: 2000,
            queries: 40,
            data: d,
            spans: Some(source.clone()),
            params: HnswParams::default(),
            ivf: None,
            efs: vec![64],
            target_recall: 0.9,
            cache: Some(dir.path().join("g.usearch")),
            rebuild: false,
        };
        let r = bench.measure(&mut std::io::sink()).unwrap();
        assert_eq!((r.spans.as_ref(), r.generator), (Some(&source), SpanSource::DESCRIPTION));
        assert!(r.per_ef[0].recall_at_1 >= 0.9, "recall@1 {}", r.per_ef[0].recall_at_1);
        // the synthetic data of the same shape must not reuse this graph
        let err = HnswBench { spans: None, ..bench.clone() }.measure(&mut std::io::sink()).unwrap_err().to_string();
        assert!(err.contains("--rebuild"), "{err}");
        let err = HnswBench { n: 3000, cache: None, ..bench }.measure(&mut std::io::sink()).unwrap_err();
        assert!(format!("{err:#}").contains("train.nsi: holds 2500 spans, --n asks for 3000"), "{err:#}");
    }

    #[test]
    fn hnsw_bench_cli_takes_an_ef_list() {
        use clap::Parser;
        use crate::cli::{BenchCommand, Cli, Command};
        let cli = Cli::try_parse_from(["nearspan", "bench", "hnsw", "--n", "1000", "--ef", "16,32"]).unwrap();
        let Command::Bench(BenchCommand::Hnsw(a)) = cli.command else { panic!("not bench hnsw") };
        assert_eq!((a.n, a.ef), (1000, vec![16, 32]));
        assert!(Cli::try_parse_from(["nearspan", "bench", "hnsw", "--no-cache", "--rebuild"]).is_err());
    }

    #[test]
    fn hnsw_bench_measures_and_reuses_its_cache() {
        let dir = tempfile::tempdir().unwrap();
        let bench = HnswBench {
            n: 2000,
            queries: 50,
            data: data(),
            spans: None,
            params: HnswParams::default(),
            ivf: None,
            efs: vec![8, 64],
            target_recall: 0.9,
            cache: Some(dir.path().join("g.usearch")),
            rebuild: false,
        };
        let first = bench.measure(&mut std::io::sink()).unwrap();
        assert!(first.cache_load_s.is_none());
        let r = first.per_ef.iter().find(|r| r.ef == 64).unwrap().recall_at_1;
        assert!(r >= 0.9, "expected recall@1 >= 0.9 at ef 64, got {r}");
        let second = bench.measure(&mut std::io::sink()).unwrap();
        assert!(second.cache_load_s.is_some());
        assert_eq!(second.build_s, first.build_s);
        // Another seed must not reuse the cached graph.
        let other = HnswBench { data: Clusters { seed: 8, ..data() }, ..bench.clone() };
        let err = other.measure(&mut std::io::sink()).unwrap_err().to_string();
        assert!(err.contains("--rebuild"), "{err}");
    }

    /// The IVF run: lists trained, nprobe per row, all lists probed is exact, and the
    /// results name nprobe (not ef) and go to the `ivf` keys.
    #[test]
    fn ivf_bench_measures_nprobe_and_writes_its_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("speed.json");
        let args = |extra: &[&str]| {
            use clap::Parser;
            use crate::cli::{BenchCommand, Cli, Command};
            let base = ["nearspan", "bench", "hnsw", "--backend", "ivf", "--n", "6000", "--queries", "60", "--centres", "40"];
            let out = ["--out", out.to_str().unwrap()];
            let cli = Cli::try_parse_from(base.iter().chain(extra).chain(&out)).unwrap();
            let Command::Bench(BenchCommand::Hnsw(a)) = cli.command else { panic!("not bench hnsw") };
            a
        };
        let a = args(&["--nprobe", "1,4,77", "--lists", "77"]);
        assert_eq!((a.backend.as_str(), a.nprobe.clone(), a.lists), ("ivf", vec![1, 4, 77], 77));
        run(a, &mut std::io::sink()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let ivf = &json["ivf"];
        assert_eq!(ivf["backend"], "ivf");
        assert_eq!(ivf["ivf"]["lists"], 77);
        let rows = ivf["per_nprobe"].as_array().unwrap();
        assert_eq!(rows.iter().map(|r| r["nprobe"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 4, 77]);
        assert_eq!(rows[2]["recall_at_1"], 1.0, "probing every list is exact");
        assert!(rows[1]["recall_at_1"].as_f64().unwrap() >= 0.9, "{}", rows[1]);
        assert_eq!(ivf["headline"]["nprobe"], ivf["headline_nprobe"]);
        assert!(ivf.get("per_ef").is_none() && ivf.get("m").is_none() && json.get("hnsw").is_none());
        assert!(cli_rejects(&["--backend", "faiss"]));
    }

    fn cli_rejects(extra: &[&str]) -> bool {
        use clap::Parser;
        crate::cli::Cli::try_parse_from(["nearspan", "bench", "hnsw"].iter().chain(extra)).is_err()
    }
}
