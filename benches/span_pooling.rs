//! Span vectors of one encoded utterance (`spans::span_vectors`: word-to-token
//! alignment, then one pooled, normalized vector per candidate span), for each pooling.
//! The utterances are real SNIPS test ones encoded by the real model: the median length
//! (9 words, 45 candidate spans of up to 10 words) and the longest (24 words, 195 spans).

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nearspan::data::Example;
use nearspan::encoder::SpanPooling;
use nearspan::spans::{candidate_spans, span_vectors, DEFAULT_MAX_WIDTH};

fn pooling(c: &mut Criterion) {
    let Some(encoder) = common::encoder() else { return };
    let mut utterances: Vec<Example> = common::snips_test().iter().map(|t| Example::from_text(t, None)).collect();
    utterances.sort_by_key(|e| e.words.len());
    let picks = [("median", &utterances[utterances.len() / 2]), ("longest", &utterances[utterances.len() - 1])];
    let mut g = c.benchmark_group("span_pooling");
    for (name, ex) in picks {
        let encoded = encoder.encode(&[ex.text.as_str()], 1).unwrap().remove(0);
        let n_spans = candidate_spans(ex.words.len(), DEFAULT_MAX_WIDTH).len();
        g.throughput(Throughput::Elements(n_spans as u64));
        for pooling in [SpanPooling::StartEnd, SpanPooling::Mean, SpanPooling::StartEndMean] {
            let id = BenchmarkId::new(pooling.name(), format!("{name}_{}w_{n_spans}spans", ex.words.len()));
            g.bench_with_input(id, &encoded, |b, enc| {
                b.iter(|| span_vectors(enc, &ex.words, candidate_spans(ex.words.len(), DEFAULT_MAX_WIDTH), pooling))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_secs(1));
    targets = pooling
}
criterion_main!(benches);
