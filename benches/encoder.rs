//! `Encoder::encode` (tokenize, BERT forward, pooling) on SNIPS test utterances: one
//! utterance alone (the latency of a single query) and a batch of 32 (the labeler's
//! default batch size). `nearspan bench encoder` measures the same against PyTorch;
//! this is the quick regression check.

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

fn encode(c: &mut Criterion) {
    let Some(encoder) = common::encoder() else { return };
    let utterances = common::snips_test();
    let mut g = c.benchmark_group("encoder");
    // One encode of 32 takes a few hundred milliseconds on 2 cores: a fixed iteration
    // count per sample and criterion's smallest sample count keep the run short.
    g.sampling_mode(SamplingMode::Flat);
    for n in [1usize, 32] {
        let texts: Vec<&str> = utterances.iter().take(n).map(String::as_str).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("encode_{n}"), |b| b.iter(|| encoder.encode(&texts, n).unwrap()));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = encode
}
criterion_main!(benches);
