//! `Encoder::encode` (tokenize, BERT forward, pooling) on SNIPS test utterances: one
//! utterance alone (the latency of a single query) and a batch of 32 (the labeler's
//! default batch size). `nearspan bench encoder` measures the same against PyTorch;
//! this is the quick regression check.

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use nearspan::encoder::{Encoder, Precision};

fn encode(c: &mut Criterion) {
    let Some(encoder) = common::encoder() else { return };
    let utterances = common::snips_test();
    // The bf16 path where the CPU has AMX or AVX512-BF16 (`--precision bf16`).
    let bf16 = Precision::Bf16
        .is_supported()
        .then(|| Encoder::load_with_precision(&encoder.info().dir, Precision::Bf16).expect("bf16 encoder"));
    let mut g = c.benchmark_group("encoder");
    // A fixed iteration count per sample and criterion's smallest sample count keep the
    // run short on 2 cores.
    g.sampling_mode(SamplingMode::Flat);
    for (name, encoder) in [("f32", Some(&encoder)), ("bf16", bf16.as_ref())] {
        let Some(encoder) = encoder else { continue };
        for n in [1usize, 32] {
            let texts: Vec<&str> = utterances.iter().take(n).map(String::as_str).collect();
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("encode_{n}_{name}"), |b| b.iter(|| encoder.encode(&texts, n).unwrap()));
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = encode
}
criterion_main!(benches);
