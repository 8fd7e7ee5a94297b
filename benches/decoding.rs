//! `decode::decode`, greedy and best-average, on candidate sets shaped like the
//! labeler's: one candidate (best slot label, score) per span of up to 10 words, for
//! utterances of 9 words (the SNIPS test median: 45 spans) and 24 words (the longest:
//! 195 spans). Every span is kept, the most the labeler's threshold lets through.
//! Labels and scores are seeded random: the decoders' work depends on the spans, not
//! on the values (best-average is O(n² · W), greedy sorts the candidates).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nearspan::decode::{decode, Candidate, Strategy};
use nearspan::spans::{candidate_spans, DEFAULT_MAX_WIDTH};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// SNIPS has 39 slot labels.
const LABELS: u32 = 39;

fn candidates(n_words: usize, seed: u64) -> (Vec<Candidate>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let cands = candidate_spans(n_words, DEFAULT_MAX_WIDTH)
        .into_iter()
        .map(|span| Candidate { span, label: rng.random_range(0..LABELS), score: rng.random_range(0.3..0.95) })
        .collect();
    let word_scores = (0..n_words).map(|_| rng.random_range(0.3..0.9)).collect();
    (cands, word_scores)
}

fn decoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("decoding");
    for n_words in [9usize, 24] {
        let (cands, word_scores) = candidates(n_words, 42);
        for strategy in [Strategy::Greedy, Strategy::BestAverage] {
            let id = BenchmarkId::new(format!("{strategy:?}"), format!("{n_words}w_{}spans", cands.len()));
            g.bench_function(id, |b| b.iter(|| decode(&cands, &word_scores, strategy)));
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_secs(1));
    targets = decoding
}
criterion_main!(benches);
