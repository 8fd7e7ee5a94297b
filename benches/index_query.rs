//! `SpanIndex::search_spans` over 100,000 clustered 384-dim span vectors (the generator
//! of `nearspan bench hnsw`: 1,000 centres, noise 0.8, seed 42), exact and usearch with
//! the default HNSW parameters (M 16, efConstruction 128, ef 64): one query at a time
//! with k = 10, and `search_spans_batch` of 45 queries with k = 10, the labeler's call
//! for a median SNIPS utterance (45 candidate spans). And `search_spans_among` (the
//! `--prefilter` path): the same 45 queries among the spans of 64 examples of 50 spans.
//! And `search_spans_among_factored`, the `--prefilter` path with start ⊕ end spans:
//! 2,000 examples of 10 words (55 spans of width ≤ 10 each, 768 dims from random
//! 384-dim token vectors), one 10-word utterance's 55 spans among 64 examples.
//!
//! The usearch graph takes about a minute to build on 2 cores, so the index is saved to
//! `target/bench-cache/index_query_100k.nsi` and opened by later runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use nearspan::bench::hnsw::Clusters;
use nearspan_index::backend::exact::FactoredQueries;
use nearspan_index::{BackendKind, EncoderInfo, ExampleId, HnswParams, NewSpan, SearchParallelism, SpanIndex};

const N: usize = 100_000;
const BATCH: usize = 45;
const DATA: Clusters = Clusters { dim: 384, centres: 1000, noise: 0.8, seed: 42 };

fn encoder_info() -> EncoderInfo {
    let d = DATA;
    EncoderInfo {
        model_id: "synthetic-clusters".into(),
        revision: format!("n{N}-c{}-noise{}-seed{}", d.centres, d.noise, d.seed),
        pooling: "none".into(),
        max_width: 1,
        dim: d.dim as u32,
    }
}

/// All vectors as spans of one example, added in one call: with `Auto` the index then
/// switches to usearch once, inserting every vector in parallel (span by span would
/// insert on one thread).
fn build(backend: BackendKind, vectors: &[f32]) -> SpanIndex {
    let mut index = SpanIndex::new(encoder_info(), backend, HnswParams::default()).unwrap();
    let labels: Vec<String> = (0..40).map(|i| format!("slot{i}")).collect();
    let spans: Vec<(NewSpan<'_>, &[f32])> = vectors
        .chunks_exact(DATA.dim)
        .enumerate()
        .map(|(i, v)| (NewSpan { label: &labels[i % labels.len()], start: 0, end: 0, text: "" }, v))
        .collect();
    index.add_example("synthetic", None, &vectors[..DATA.dim], &spans).unwrap();
    index
}

/// The vectors as examples of [`SPANS_PER_EXAMPLE`] spans each, exact search.
fn build_grouped(vectors: &[f32]) -> SpanIndex {
    let mut index = SpanIndex::new(encoder_info(), BackendKind::Exact, HnswParams::default()).unwrap();
    for (e, group) in vectors.chunks(SPANS_PER_EXAMPLE * DATA.dim).enumerate() {
        let spans: Vec<(NewSpan<'_>, &[f32])> = group
            .chunks_exact(DATA.dim)
            .map(|v| (NewSpan { label: "slot", start: 0, end: 0, text: "" }, v))
            .collect();
        index.add_example(&format!("example {e}"), None, &group[..DATA.dim], &spans).unwrap();
    }
    index
}

const SPANS_PER_EXAMPLE: usize = 50;
const PREFILTER: u32 = 64;

/// The cached usearch index if it holds these vectors, else a fresh build, saved.
fn usearch_index(vectors: &[f32]) -> SpanIndex {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-cache/index_query_100k.nsi");
    let same = |index: &SpanIndex| {
        index.n_spans() == N
            && index.span_vector(0) == &vectors[..DATA.dim]
            && index.span_vector(N as u32 - 1) == &vectors[(N - 1) * DATA.dim..]
    };
    if let Ok(index) = SpanIndex::open(&path, Some(&encoder_info())) {
        if same(&index) {
            return index;
        }
    }
    eprintln!("building the usearch index of {N} vectors (cached in {})", path.display());
    let index = build(BackendKind::Auto, vectors);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    index.save(&path).unwrap();
    index
}

/// Start ⊕ end span rows of 2,000 examples of 10 words, as the labeler indexes them,
/// and one 10-word query utterance's token vectors.
fn start_end_index() -> (SpanIndex, Vec<f32>) {
    let half = DATA.dim;
    let words = 10;
    let tokens = Clusters { dim: half, centres: 100, noise: 0.8, seed: 7 }.index_vectors(2000 * words + words);
    let info = EncoderInfo { pooling: "start-end".into(), max_width: 10, dim: 2 * half as u32, ..encoder_info() };
    let mut index = SpanIndex::new(info, BackendKind::Exact, HnswParams::default()).unwrap();
    for (e, t) in tokens.chunks_exact(words * half).take(2000).enumerate() {
        let mut rows: Vec<(u32, u32, Vec<f32>)> = Vec::new();
        for s in 0..words {
            for end in s + 1..=words {
                let v: Vec<f32> = t[s * half..(s + 1) * half].iter().chain(&t[(end - 1) * half..end * half]).map(|x| x / 2f32.sqrt()).collect();
                rows.push((s as u32, end as u32, v));
            }
        }
        let spans: Vec<(NewSpan<'_>, &[f32])> =
            rows.iter().map(|(a, b, v)| (NewSpan { label: "slot", start: *a, end: *b, text: "" }, &v[..])).collect();
        let utterance: Vec<f32> = t[..half].iter().chain(&t[..half]).copied().collect();
        index.add_example(&format!("example {e}"), None, &utterance, &spans).unwrap();
    }
    (index, tokens[2000 * words * half..].to_vec())
}

fn search(c: &mut Criterion) {
    let vectors = DATA.index_vectors(N);
    let queries = DATA.queries(200);
    let dim = DATA.dim;
    let exact = build(BackendKind::Exact, &vectors);
    let usearch = usearch_index(&vectors);
    assert_eq!(usearch.backend(), BackendKind::Usearch);

    let mut g = c.benchmark_group("index_query_100k");
    // Exact search over 10^5 rows takes milliseconds per query.
    g.sampling_mode(SamplingMode::Flat);
    for (name, index) in [("exact", &exact), ("usearch", &usearch)] {
        g.throughput(Throughput::Elements(1));
        let mut next = queries.chunks_exact(dim).cycle();
        g.bench_function(BenchmarkId::new("search_spans_k10", name), |b| {
            b.iter(|| index.search_spans(next.next().unwrap(), 10))
        });
        g.throughput(Throughput::Elements(BATCH as u64));
        let batch = &queries[..BATCH * dim];
        g.bench_function(BenchmarkId::new(format!("search_spans_batch{BATCH}_k10"), name), |b| {
            b.iter(|| index.search_spans_batch(batch, 10))
        });
    }
    let grouped = build_grouped(&vectors);
    // 64 examples spread over the index, as the nearest utterances would be.
    let chosen: Vec<ExampleId> = (0..PREFILTER).map(|i| ExampleId(i * 31 % grouped.n_examples() as u32)).collect();
    g.throughput(Throughput::Elements(BATCH as u64));
    let batch = &queries[..BATCH * dim];
    g.bench_function(BenchmarkId::new(format!("search_spans_among{PREFILTER}_batch{BATCH}_k10"), "exact"), |b| {
        b.iter(|| grouped.search_spans_among(batch, 10, &chosen))
    });
    drop(grouped);
    let (start_end, query_tokens) = start_end_index();
    assert!(start_end.prepare_factored_search());
    let pairs: Vec<(u32, u32, f32)> =
        (0..10u32).flat_map(|s| (s..10).map(move |e| (s, e, 1.0 / 2f32.sqrt()))).collect();
    let factored = FactoredQueries { firsts: &query_tokens, lasts: &query_tokens, pairs: &pairs };
    let chosen: Vec<ExampleId> = (0..PREFILTER).map(|i| ExampleId(i * 31 % 2000)).collect();
    g.throughput(Throughput::Elements(pairs.len() as u64));
    g.bench_function(BenchmarkId::new(format!("search_spans_among_factored{PREFILTER}_spans55_k10"), "halves"), |b| {
        b.iter(|| start_end.search_spans_among_factored(&factored, 10, &chosen, SearchParallelism::Split))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = search
}
criterion_main!(benches);
