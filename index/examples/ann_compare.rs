//! Compare exact search, hnsw_rs and USearch on the same clustered vectors as the index
//! grows: recall@1/@10 against exact, single-query latency p50/p99, build time, memory,
//! and (USearch) graph save/restore time. Writes JSON.
//!
//! ```text
//! cargo run --release -p nearspan-index --example ann_compare -- OUT.json \
//!     [--sizes 1000,10000,100000] [--dim 384] [--queries 1000] [--centres 1000] [--noise 0.8] \
//!     [--m 16] [--ef-construction 128] [--ef 16,32,64,128] [--backends exact,hnsw_rs,usearch]
//! ```
//! Vectors: `--centres` random unit centres plus gaussian noise of norm ≈ `--noise`,
//! normalized (real span vectors are clustered). Queries are drawn the same way and are
//! not in the index. Memory: USearch reports `memory_usage()`; for the Rust backends the
//! live-heap delta of a counting global allocator around the build.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use nearspan_index::backend::{exact::exact_search, new_backend, AnnBackend, Vectors};
use nearspan_index::{BackendKind, HnswParams, Neighbor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::json;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad value for {name}: {v}")))
        .unwrap_or(default)
}

fn list<T: std::str::FromStr>(args: &[String], name: &str, default: &str) -> Vec<T> {
    let s: String = arg(args, name, default.to_string());
    s.split(',').map(|x| x.trim().parse().unwrap_or_else(|_| panic!("bad {name}: {x}"))).collect()
}

fn clustered(n: usize, dim: usize, centres: &[Vec<f32>], noise: f32, rng: &mut StdRng) -> Vec<f32> {
    let g = Normal::new(0.0f32, noise / (dim as f32).sqrt()).unwrap();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = &centres[rng.random_range(0..centres.len())];
        let start = out.len();
        out.extend(c.iter().map(|x| x + g.sample(rng)));
        let v = &mut out[start..];
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Single-query latencies (ms) on the calling thread, and the results.
fn timed_queries(f: impl Fn(&[f32]) -> Vec<Neighbor>, queries: &[f32], dim: usize) -> (f64, f64, Vec<Vec<Neighbor>>) {
    let mut lat = Vec::new();
    let mut res = Vec::new();
    for q in queries.chunks_exact(dim) {
        let t = Instant::now();
        let r = f(q);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        res.push(r);
    }
    lat.sort_by(f64::total_cmp);
    (percentile(&lat, 0.5), percentile(&lat, 0.99), res)
}

fn recall(got: &[Vec<Neighbor>], truth: &[Vec<Neighbor>], k: usize) -> f64 {
    let mut hits = 0;
    for (g, t) in got.iter().zip(truth) {
        let want: Vec<u32> = t.iter().take(k).map(|n| n.id).collect();
        hits += g.iter().take(k).filter(|n| want.contains(&n.id)).count();
    }
    hits as f64 / (truth.len() * k) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out_path = args.first().filter(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| {
        eprintln!("usage: ann_compare OUT.json [--sizes 1000,10000,100000] [--dim 384] ...");
        std::process::exit(2)
    });
    let sizes: Vec<usize> = list(&args, "--sizes", "1000,10000,100000");
    let dim: usize = arg(&args, "--dim", 384);
    let nq: usize = arg(&args, "--queries", 1000);
    let n_centres: usize = arg(&args, "--centres", 1000);
    let noise: f32 = arg(&args, "--noise", 0.8);
    let efs: Vec<usize> = list(&args, "--ef", "16,32,64,128");
    let backends: Vec<String> = list(&args, "--backends", "exact,hnsw_rs,usearch");
    let params = HnswParams {
        m: arg(&args, "--m", 16),
        ef_construction: arg(&args, "--ef-construction", 128),
        ef_search: efs[0],
        seed: arg(&args, "--seed", 42),
        ..HnswParams::default()
    };
    let seed = params.seed;
    let threads = rayon::current_num_threads();
    eprintln!("seed {seed}, dim {dim}, {nq} queries, {threads} threads, params {params:?}");

    let mut rng = StdRng::seed_from_u64(seed);
    let g = Normal::new(0.0f32, 1.0).unwrap();
    let centres: Vec<Vec<f32>> = (0..n_centres)
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| g.sample(&mut rng)).collect();
            let n = c.iter().map(|x| x * x).sum::<f32>().sqrt();
            c.iter_mut().for_each(|x| *x /= n);
            c
        })
        .collect();
    let max_n = *sizes.iter().max().unwrap();
    let t = Instant::now();
    let all = clustered(max_n, dim, &centres, noise, &mut rng);
    let queries = clustered(nq, dim, &centres, noise, &mut rng);
    eprintln!("generated {max_n} vectors in {:.1}s", t.elapsed().as_secs_f64());

    let mut rows = Vec::new();
    let write = |rows: &Vec<serde_json::Value>| {
        let doc = json!({
            "dim": dim, "queries": nq, "centres": n_centres, "noise": noise, "seed": seed,
            "threads": threads, "m": params.m, "ef_construction": params.ef_construction, "results": rows,
        });
        std::fs::write(&out_path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    };
    for &n in &sizes {
        let data = &all[..n * dim];
        let vectors = Vectors::from_vec(dim, data.to_vec());
        // Ground truth, and the batch throughput of the blocked exact kernel.
        let t = Instant::now();
        let truth = exact_search(data, dim, &queries, 10);
        let batch_s = t.elapsed().as_secs_f64();
        let gflops = 2.0 * n as f64 * dim as f64 * nq as f64 / batch_s / 1e9;
        eprintln!("n={n}: exact batch of {nq} in {batch_s:.3}s = {gflops:.1} GFLOP/s");
        if backends.iter().any(|b| b == "exact") {
            let lat_q = &queries[..nq.min(if n >= 1_000_000 { 200 } else { 1000 }) * dim];
            let exact = nearspan_index::backend::Exact;
            let (p50, p99, _) = timed_queries(|q| exact.search(&vectors, q, 10), lat_q, dim);
            let row = json!({"backend": "exact", "n": n, "recall_at_1": 1.0, "recall_at_10": 1.0,
                "p50_ms": p50, "p99_ms": p99, "build_s": 0.0, "memory_bytes": n * dim * 4,
                "batch_gflops": gflops, "batch_s": batch_s});
            eprintln!("{row}");
            rows.push(row);
            write(&rows);
        }
        for name in backends.iter().filter(|b| *b != "exact") {
            let kind = match name.as_str() {
                "hnsw_rs" => BackendKind::HnswRs,
                "usearch" => BackendKind::Usearch,
                other => panic!("unknown backend {other}"),
            };
            let live0 = LIVE.load(Ordering::Relaxed);
            let t = Instant::now();
            let mut b: Box<dyn AnnBackend> = new_backend(kind, dim, &params, n).expect("backend compiled in");
            b.insert_batch(0, data, dim).unwrap();
            let build_s = t.elapsed().as_secs_f64();
            let heap_delta = (LIVE.load(Ordering::Relaxed) - live0).max(0) as usize;
            let memory = if kind == BackendKind::Usearch { b.memory_bytes() } else { heap_delta };
            // Open cost: USearch restores its stored graph; hnsw_rs rebuilds (= build_s).
            let (save_s, restore_s, graph_len) = match b.graph_bytes().unwrap() {
                Some(bytes) => {
                    let save_s = t.elapsed().as_secs_f64() - build_s;
                    let t2 = Instant::now();
                    #[cfg(feature = "usearch")]
                    let restored = nearspan_index::backend::UsearchBackend::from_graph_bytes(&bytes, &params).unwrap();
                    let restore_s = t2.elapsed().as_secs_f64();
                    #[cfg(feature = "usearch")]
                    drop(restored);
                    (save_s, restore_s, bytes.len())
                }
                None => (0.0, build_s, 0),
            };
            eprintln!("n={n} {name}: build {build_s:.2}s, memory {:.1} MB", memory as f64 / 1e6);
            for &ef in &efs {
                b.set_ef_search(ef);
                let (p50, p99, got) = timed_queries(|q| b.search(&vectors, q, 10), &queries, dim);
                let t = Instant::now();
                let _ = b.search_batch(&vectors, &queries, 10);
                let batch_qps = nq as f64 / t.elapsed().as_secs_f64();
                let row = json!({"backend": name, "n": n, "m": params.m, "ef_construction": params.ef_construction,
                    "ef_search": ef, "recall_at_1": recall(&got, &truth, 1), "recall_at_10": recall(&got, &truth, 10),
                    "p50_ms": p50, "p99_ms": p99, "batch_qps": batch_qps, "build_s": build_s,
                    "memory_bytes": memory, "heap_delta_bytes": heap_delta,
                    "graph_bytes": graph_len, "save_graph_s": save_s, "open_s": restore_s});
                eprintln!("{row}");
                rows.push(row);
                write(&rows);
            }
        }
    }
    write(&rows);
    eprintln!("wrote {out_path}");
}
