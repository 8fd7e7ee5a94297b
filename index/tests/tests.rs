//! Integration tests: one binary, a module per area, a temp dir per test.
//! Random data is seeded; every test prints its seed.

use nearspan_index::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

mod util {
    use super::*;

    pub fn enc(model: &str, dim: u32) -> EncoderInfo {
        EncoderInfo {
            model_id: model.into(),
            revision: "sha256:0123456789abcdef".into(),
            pooling: "mean".into(),
            max_width: 8,
            dim,
        }
    }

    pub fn normalize(v: &mut [f32]) {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= n);
    }

    /// `n` normalized vectors around `centres` random centres (gaussian noise, sigma `noise`).
    pub fn clustered(n: usize, dim: usize, centres: usize, noise: f32, rng: &mut StdRng) -> Vec<f32> {
        let g = Normal::new(0.0f32, 1.0).unwrap();
        let cs: Vec<Vec<f32>> = (0..centres)
            .map(|_| {
                let mut c: Vec<f32> = (0..dim).map(|_| g.sample(rng)).collect();
                normalize(&mut c);
                c
            })
            .collect();
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let c = &cs[rng.random_range(0..centres)];
            let mut v: Vec<f32> = c.iter().map(|x| x + noise * g.sample(rng) / (dim as f32).sqrt()).collect();
            normalize(&mut v);
            out.extend_from_slice(&v);
        }
        out
    }

    pub fn seeded(name: &str) -> StdRng {
        let seed = 0x5eed_0000 + name.bytes().map(|b| b as u64).sum::<u64>();
        println!("{name}: seed {seed}");
        StdRng::seed_from_u64(seed)
    }

    pub fn hnsw_kinds() -> Vec<BackendKind> {
        let mut v = Vec::new();
        if cfg!(feature = "hnsw-rs") {
            v.push(BackendKind::HnswRs);
        }
        if cfg!(feature = "usearch") {
            v.push(BackendKind::Usearch);
        }
        v
    }

    pub fn all_kinds() -> Vec<BackendKind> {
        let mut v = vec![BackendKind::Exact, BackendKind::Auto, BackendKind::Ivf];
        v.extend(hnsw_kinds());
        v
    }

    pub const LABELS: [&str; 4] = ["O", "city", "date", "airline"];

    /// An index of `n` examples with two spans each, vectors from `clustered`.
    pub fn build(kind: BackendKind, n: usize, dim: u32, rng: &mut StdRng) -> SpanIndex {
        let mut index = SpanIndex::new(enc("toy/encoder", dim), kind, HnswParams::default()).unwrap();
        let d = dim as usize;
        let vs = clustered(n * 3, d, 20, 0.5, rng);
        for i in 0..n {
            let text = format!("utterance number {i}");
            let row = |j: usize| &vs[(3 * i + j) * d..(3 * i + j + 1) * d];
            let spans = [
                (NewSpan { label: LABELS[i % 4], start: 0, end: 9, text: "utterance" }, row(1)),
                (NewSpan { label: LABELS[(i + 1) % 4], start: 17, end: 17 + format!("{i}").len() as u32, text: "num" }, row(2)),
            ];
            index.add_example(&text, Some(if i % 2 == 0 { "even" } else { "odd" }), row(0), &spans).unwrap();
        }
        index
    }
}

use util::*;

mod exact {
    use super::*;

    /// `SpanIndex` exact search against a naive loop, single and batch.
    #[test]
    fn exact_matches_naive() {
        let mut rng = seeded("exact_matches_naive");
        let dim = 48;
        let index = build(BackendKind::Exact, 1500, dim, &mut rng);
        assert_eq!(index.backend(), BackendKind::Exact);
        let queries = clustered(40, dim as usize, 20, 0.7, &mut rng);
        let batch = index.search_spans_batch(&queries, 7);
        for (qi, q) in queries.chunks_exact(dim as usize).enumerate() {
            let mut naive: Vec<(u32, f32)> = (0..index.n_spans() as u32)
                .map(|i| (i, index.span_vector(i).iter().zip(q).map(|(a, b)| a * b).sum()))
                .collect();
            naive.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let got = index.search_spans(q, 7);
            assert_eq!(got.len(), 7);
            // A batch this size is scored by matrix products, a single query by the
            // scanning kernels: the same neighbours, similarities equal up to rounding.
            assert_eq!(got.iter().map(|n| n.id).collect::<Vec<_>>(), batch[qi].iter().map(|n| n.id).collect::<Vec<_>>(), "query {qi}");
            for (a, b) in got.iter().zip(&batch[qi]) {
                assert!((a.similarity - b.similarity).abs() < 1e-6, "query {qi}: {a:?} alone, {b:?} in the batch");
            }
            for (g, w) in got.iter().zip(&naive) {
                assert!((g.similarity - w.1).abs() < 1e-5, "query {qi}: {g:?} vs {w:?}");
            }
            assert_eq!(got[0].id, naive[0].0);
            assert!(got.windows(2).all(|w| w[0].similarity >= w[1].similarity));
        }
        // k larger than the collection, and k = 0.
        assert_eq!(index.search_spans(&queries[..dim as usize], 10_000).len(), index.n_spans());
        assert!(index.search_spans(&queries[..dim as usize], 0).is_empty());
        assert_eq!(index.search_utterances(&queries[..dim as usize], 3).len(), 3);
    }

    /// Search among chosen examples' spans equals a naive search of just those spans,
    /// with examples of 0 to 3 spans, before and after a save/load round trip (which
    /// rebuilds the example -> spans map), on every backend.
    #[test]
    fn search_among_examples_matches_naive() {
        let mut rng = seeded("search_among_examples_matches_naive");
        let dim = 16usize;
        let vs = clustered(400, dim, 10, 0.6, &mut rng);
        for kind in all_kinds() {
            let mut index = SpanIndex::new(enc("toy", dim as u32), kind, HnswParams::default()).unwrap();
            let mut next = 0;
            for i in 0..60 {
                let utt = vs[next * dim..(next + 1) * dim].to_vec();
                next += 1;
                let spans: Vec<(NewSpan<'_>, &[f32])> = (0..i % 4)
                    .map(|j| {
                        next += 1;
                        (NewSpan { label: LABELS[j], start: 0, end: 1, text: "x" }, &vs[(next - 1) * dim..next * dim])
                    })
                    .collect();
                index.add_example(&format!("u{i}"), None, &utt, &spans).unwrap();
            }
            let chosen = [ExampleId(3), ExampleId(0), ExampleId(57), ExampleId(59), ExampleId(4), ExampleId(1000)];
            let queries = clustered(5, dim, 10, 0.6, &mut rng);
            let reloaded = SpanIndex::from_bytes(&index.to_bytes().unwrap(), None).unwrap();
            for idx in [&index, &reloaded] {
                assert_eq!(idx.example_spans(ExampleId(0)), 0..0);
                assert_eq!(idx.example_spans(ExampleId(3)), 3..6);
                let got = idx.search_spans_among(&queries, 4, &chosen);
                let allowed: Vec<u32> = chosen[..5].iter().flat_map(|&e| idx.example_spans(e)).collect();
                assert_eq!(allowed.len(), 3 + 0 + 1 + 3 + 0);
                for (qi, q) in queries.chunks_exact(dim).enumerate() {
                    let mut naive: Vec<(u32, f32)> =
                        allowed.iter().map(|&i| (i, idx.span_vector(i).iter().zip(q).map(|(a, b)| a * b).sum())).collect();
                    naive.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    assert_eq!(got[qi].len(), 4, "{kind}");
                    for (g, w) in got[qi].iter().zip(&naive) {
                        assert_eq!(g.id, w.0, "{kind} query {qi}");
                        assert!((g.similarity - w.1).abs() < 1e-5);
                        assert!(chosen.contains(&idx.span(g.id).example));
                    }
                }
            }
        }
    }

    /// Adds an example of `words` words: start ⊕ end rows of every span of width ≤ 3 from
    /// random token vectors (normalized, as the index stores them) and the sentence
    /// vector tiled twice; `tile` false gives an untiled utterance vector instead.
    fn add_start_end_example(index: &mut SpanIndex, words: usize, tile: bool, rng: &mut StdRng) {
        let half = index.encoder().dim as usize / 2;
        // token vectors of unequal norms, as a transformer's are
        let mut tokens = clustered(words, half, 4, 0.7, rng);
        for t in tokens.chunks_exact_mut(half) {
            let scale: f32 = rng.random_range(0.5..2.0);
            t.iter_mut().for_each(|x| *x *= scale);
        }
        let mut rows: Vec<(u32, u32, Vec<f32>)> = Vec::new();
        for s in 0..words {
            for t in s + 1..=(s + 3).min(words) {
                let mut v: Vec<f32> = tokens[s * half..(s + 1) * half].iter().chain(&tokens[(t - 1) * half..t * half]).copied().collect();
                normalize(&mut v);
                rows.push((4 * s as u32, 4 * t as u32 - 1, v));
            }
        }
        let spans: Vec<(NewSpan<'_>, &[f32])> =
            rows.iter().map(|(a, b, v)| (NewSpan { label: LABELS[(*a as usize) % 4], start: *a, end: *b, text: "w" }, &v[..])).collect();
        let sentence = clustered(1, half, 4, 0.7, rng);
        let utt: Vec<f32> = if tile {
            sentence.iter().chain(&sentence).map(|x| x / 2f32.sqrt()).collect()
        } else {
            clustered(1, 2 * half, 4, 0.7, rng)
        };
        let n = index.n_examples();
        index.add_example(&format!("e{n}"), Some("i"), &utt, &spans).unwrap();
    }

    /// The factored span search (which keeps each example's distinct start and end
    /// halves) and the utterance search (which reads one copy of tiled rows) give the
    /// naive results, also for examples added after they were first used, after an
    /// example that breaks their layout, and after a reload.
    #[test]
    fn factored_and_tiled_searches_follow_added_examples() {
        let mut rng = seeded("factored_and_tiled_searches_follow_added_examples");
        let (dim, half) = (24usize, 12usize);
        let mut index = SpanIndex::new(enc("se", dim as u32), BackendKind::Exact, HnswParams::default()).unwrap();
        let firsts = clustered(3, half, 4, 0.7, &mut rng);
        let lasts = clustered(4, half, 4, 0.7, &mut rng);
        let pairs: Vec<(u32, u32, f32)> = (0..6).map(|p| ((p % 3) as u32, (p % 4) as u32, 0.7)).collect();
        let queries = backend::exact::FactoredQueries { firsts: &firsts, lasts: &lasts, pairs: &pairs };
        let utterance_queries = clustered(3, dim, 4, 0.7, &mut rng);
        let check = |idx: &SpanIndex, stage: &str| {
            let chosen: Vec<ExampleId> = (0..idx.n_examples() as u32).filter(|e| e % 3 != 1).map(ExampleId).collect();
            let split = idx.search_spans_among_factored(&queries, 5, &chosen, SearchParallelism::Split);
            assert_eq!(idx.search_spans_among_factored(&queries, 5, &chosen, SearchParallelism::Serial), split, "{stage}");
            let got = split;
            for (p, &(f, l, scale)) in pairs.iter().enumerate() {
                let q: Vec<f32> = firsts[f as usize * half..][..half].iter().chain(&lasts[l as usize * half..][..half]).map(|x| x * scale).collect();
                let mut naive: Vec<(u32, f32)> = chosen
                    .iter()
                    .flat_map(|&e| idx.example_spans(e))
                    .map(|i| (i, idx.span_vector(i).iter().zip(&q).map(|(a, b)| a * b).sum()))
                    .collect();
                naive.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                assert_eq!(got[p].len(), 5, "{stage}");
                for (g, w) in got[p].iter().zip(&naive) {
                    assert!((g.similarity - w.1).abs() < 1e-5, "{stage} pair {p}: {g:?} vs {w:?}");
                }
                assert_eq!(got[p][0].id, naive[0].0, "{stage} pair {p}");
            }
            let got = idx.search_utterances_batch(&utterance_queries, 4);
            for (qi, q) in utterance_queries.chunks_exact(dim).enumerate() {
                let mut naive: Vec<(u32, f32)> = (0..idx.n_examples() as u32)
                    .map(|e| (e, idx.utterance_vector(ExampleId(e)).iter().zip(q).map(|(a, b)| a * b).sum()))
                    .collect();
                naive.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let ids: Vec<u32> = got[qi].iter().map(|n| n.id).collect();
                assert_eq!(ids, naive[..4].iter().map(|w| w.0).collect::<Vec<_>>(), "{stage} utterance query {qi}");
            }
        };
        for i in 0..20 {
            add_start_end_example(&mut index, 1 + i % 6, true, &mut rng);
        }
        assert!(index.prepare_factored_search(), "start-end rows factor");
        check(&index, "built");
        for i in 0..10 {
            add_start_end_example(&mut index, 2 + i % 5, true, &mut rng);
        }
        check(&index, "grown");
        add_start_end_example(&mut index, 3, false, &mut rng);
        check(&index, "untiled utterance added");
        // an example whose rows share a start character but not a start half
        let rows = clustered(2, dim, 4, 0.7, &mut rng);
        let spans = [
            (NewSpan { label: "city", start: 0, end: 3, text: "a" }, &rows[..dim]),
            (NewSpan { label: "date", start: 0, end: 7, text: "b" }, &rows[dim..]),
        ];
        index.add_example("odd", None, &rows[..dim], &spans).unwrap();
        check(&index, "non-factoring rows added");
        assert!(!index.prepare_factored_search());
        let reloaded = SpanIndex::from_bytes(&index.to_bytes().unwrap(), None).unwrap();
        check(&reloaded, "reloaded");
    }

    #[test]
    fn empty_index_searches_return_nothing() {
        for kind in all_kinds() {
            let index = SpanIndex::new(enc("e", 8), kind, HnswParams::default()).unwrap();
            assert!(index.search_spans(&[0.0; 8], 5).is_empty(), "{kind}");
            assert!(index.search_utterances(&[0.0; 8], 5).is_empty(), "{kind}");
            assert!(index.search_spans_batch(&[0.0; 16], 5).iter().all(Vec::is_empty), "{kind}");
        }
    }

    #[test]
    fn payloads_and_labels() {
        let mut rng = seeded("payloads_and_labels");
        let index = build(BackendKind::Exact, 10, 8, &mut rng);
        assert_eq!(index.n_examples(), 10);
        assert_eq!(index.n_spans(), 20);
        assert_eq!(index.labels().collect::<Vec<_>>(), LABELS.to_vec());
        let s = index.span(3);
        assert_eq!(s.example, ExampleId(1));
        assert_eq!(index.label(s.label), "date");
        assert_eq!((s.start, s.end, s.text.as_str()), (17, 18, "num"));
        assert_eq!(index.example(ExampleId(1)).text, "utterance number 1");
        assert_eq!(index.example(ExampleId(1)).intent.as_deref(), Some("odd"));
        assert_eq!(index.label_id("city"), Some(LabelId(1)));
    }

    #[test]
    fn dimension_checked_on_add() {
        let mut index = SpanIndex::new(enc("e", 4), BackendKind::Exact, HnswParams::default()).unwrap();
        let e = index.add_example("x", None, &[1.0, 0.0, 0.0], &[]).unwrap_err();
        assert!(matches!(e, IndexError::DimensionMismatch { expected: 4, found: 3, .. }), "{e}");
        let span = (NewSpan { label: "a", start: 0, end: 1, text: "x" }, &[1.0f32, 0.0][..]);
        let e = index.add_example("x", None, &[1.0, 0.0, 0.0, 0.0], &[span]).unwrap_err();
        assert!(matches!(e, IndexError::DimensionMismatch { expected: 4, found: 2, .. }), "{e}");
        let bad = (NewSpan { label: "a", start: 2, end: 1, text: "x" }, &[1.0f32, 0.0, 0.0, 0.0][..]);
        let e = index.add_example("xyz", None, &[1.0, 0.0, 0.0, 0.0], &[bad]).unwrap_err();
        assert!(matches!(e, IndexError::InvalidSpan { .. }), "{e}");
        // Nothing was added by the failed calls.
        assert_eq!((index.n_examples(), index.n_spans(), index.n_labels()), (0, 0, 0));
    }

    #[cfg(not(feature = "hnsw-rs"))]
    #[test]
    fn missing_hnsw_rs_is_a_typed_error() {
        let e = SpanIndex::new(enc("e", 4), BackendKind::HnswRs, HnswParams::default()).unwrap_err();
        assert!(matches!(e, IndexError::BackendUnavailable { requested: BackendKind::HnswRs, .. }), "{e}");
        assert!(e.to_string().contains("hnsw-rs"), "{e}");
    }

    #[cfg(not(feature = "usearch"))]
    #[test]
    fn missing_usearch_is_a_typed_error_and_auto_is_exact() {
        let e = SpanIndex::new(enc("e", 4), BackendKind::Usearch, HnswParams::default()).unwrap_err();
        assert!(matches!(e, IndexError::BackendUnavailable { requested: BackendKind::Usearch, .. }), "{e}");
        let index = SpanIndex::new(enc("e", 4), BackendKind::Auto, HnswParams::default()).unwrap();
        assert_eq!(index.backend(), BackendKind::Exact);
    }
}

mod recall {
    #[allow(unused_imports)]
    use super::*;
    use nearspan_index::backend::{exact::exact_search, new_backend};

    /// recall@1 of `kind` against exact search on 20k clustered 64-dim vectors.
    fn recall_at_1(kind: BackendKind) -> f32 {
        let mut rng = seeded(&format!("recall_{kind}"));
        let (n, dim, nq) = (20_000, 64, 500);
        let data = clustered(n + nq, dim, 200, 0.6, &mut rng);
        let (data, queries) = data.split_at(n * dim);
        let vectors = nearspan_index::backend::Vectors::from_vec(dim, data.to_vec());
        let params = HnswParams::default();
        let mut b = new_backend(kind, dim, &params, n).unwrap();
        b.insert_batch(0, data, dim).unwrap();
        let got = b.search_batch(&vectors, queries, 1);
        let want = exact_search(data, dim, queries, 1);
        let hits = got.iter().zip(&want).filter(|(g, w)| !g.is_empty() && g[0].id == w[0].id).count();
        hits as f32 / nq as f32
    }

    #[cfg(feature = "hnsw-rs")]
    #[test]
    fn hnsw_rs_recall() {
        let recall = recall_at_1(BackendKind::HnswRs);
        println!("hnsw_rs recall@1 = {recall}");
        assert!(recall >= 0.95, "expected at least 0.95, got {recall}");
    }

    /// IVF with its defaults: 141 lists, 4 probed.
    #[test]
    fn ivf_recall() {
        let recall = recall_at_1(BackendKind::Ivf);
        println!("ivf recall@1 = {recall}");
        assert!(recall >= 0.95, "expected at least 0.95, got {recall}");
    }

    #[cfg(feature = "usearch")]
    #[test]
    fn usearch_recall() {
        let recall = recall_at_1(BackendKind::Usearch);
        println!("usearch recall@1 = {recall}");
        assert!(recall >= 0.95, "expected at least 0.95, got {recall}");
    }
}

mod format {
    use super::*;
    use std::fs;
    use std::path::Path;

    fn assert_same_contents(a: &SpanIndex, b: &SpanIndex) {
        assert_eq!(a.encoder(), b.encoder());
        assert_eq!((a.n_examples(), a.n_spans(), a.n_labels()), (b.n_examples(), b.n_spans(), b.n_labels()));
        assert_eq!(a.labels().collect::<Vec<_>>(), b.labels().collect::<Vec<_>>());
        for i in 0..a.n_spans() as u32 {
            assert_eq!(a.span(i), b.span(i));
            assert_eq!(a.span_vector(i), b.span_vector(i));
        }
        for i in 0..a.n_examples() as u32 {
            assert_eq!(a.example(ExampleId(i)), b.example(ExampleId(i)));
        }
        assert_eq!(a.params(), b.params());
        assert_eq!(a.backend(), b.backend());
    }

    /// Every stored span finds itself first.
    fn assert_self_search(index: &SpanIndex) {
        for i in (0..index.n_spans() as u32).step_by(7) {
            let hits = index.search_spans(index.span_vector(i), 1);
            assert_eq!(hits[0].id, i, "{}: span {i}", index.backend());
        }
    }

    #[test]
    fn roundtrip_every_backend() {
        let dir = tempfile::tempdir().unwrap();
        for kind in all_kinds() {
            let mut rng = seeded(&format!("roundtrip_{kind}"));
            let index = build(kind, 300, 16, &mut rng);
            let path = dir.path().join(format!("{kind}.nsi"));
            index.save(&path).unwrap();
            let opened = SpanIndex::open(&path, Some(index.encoder())).unwrap();
            assert_same_contents(&index, &opened);
            assert_self_search(&opened);
            let from_bytes = SpanIndex::from_bytes(&index.to_bytes().unwrap(), None).unwrap();
            assert_same_contents(&index, &from_bytes);
            // Saving what was opened gives the same bytes (hnsw_rs and exact store no graph;
            // usearch reserializes the graph it loaded).
            assert_eq!(opened.to_bytes().unwrap(), fs::read(&path).unwrap(), "{kind}");
        }
    }

    /// A trained IVF index (past `min_train_rows`, clustered from its codes as examples
    /// arrived) opens with the lists it was saved with, not re-clustered from the f32
    /// rows (which would give other lists and other bytes), and searches the same.
    #[test]
    fn ivf_lists_are_stored_not_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = seeded("ivf_lists_are_stored");
        let index = build(BackendKind::Ivf, 2500, 16, &mut rng);
        assert!(index.n_spans() >= nearspan_index::backend::IvfParams::default().min_train_rows());
        let path = dir.path().join("ivf.nsi");
        index.save(&path).unwrap();
        assert_eq!(nearspan_index::file_format_version(&path).unwrap(), 3);
        let opened = SpanIndex::open(&path, None).unwrap();
        assert_eq!(opened.to_bytes().unwrap(), fs::read(&path).unwrap());
        let q = index.span_vector(17).to_vec();
        assert_eq!(opened.search_spans(&q, 5), index.search_spans(&q, 5));
        // Damaged lists under a valid checksum are a cache miss: the index clusters again.
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        // Past the header, the metadata and both vector sections: the span lists' tag.
        let mut at = 56;
        for _ in 0..3 {
            at += 8 + u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        }
        assert_eq!(bytes[at], 2, "the span lists' section is tagged ivf");
        // Their first byte starts a varint; 0xfd announces 8 more bytes, so the rest no longer lines up.
        bytes[at + 9] = 0xfd;
        let crc = crc32(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let rebuilt = SpanIndex::from_bytes(&bytes, None).unwrap();
        assert_eq!(rebuilt.search_spans(&q, 1)[0].id, 17);
        assert_ne!(rebuilt.to_bytes().unwrap(), fs::read(&path).unwrap(), "re-clustered, so other lists");
    }

    fn saved(dir: &Path) -> (SpanIndex, std::path::PathBuf, Vec<u8>) {
        let mut rng = seeded("saved");
        let index = build(BackendKind::Exact, 20, 8, &mut rng);
        let path = dir.join("index.nsi");
        index.save(&path).unwrap();
        let bytes = fs::read(&path).unwrap();
        (index, path, bytes)
    }

    #[test]
    fn wrong_encoder_is_refused_with_readable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path, _) = saved(dir.path());
        let e = SpanIndex::open(&path, Some(&enc("other/model", 8))).unwrap_err();
        assert!(matches!(e, IndexError::EncoderMismatch { .. }), "{e}");
        let msg = e.to_string();
        println!("{msg}");
        assert!(msg.contains("toy/encoder") && msg.contains("other/model"), "{msg}");
        assert!(msg.contains("index.nsi"), "{msg}");
        // Same model, other revision: the message shows the revisions.
        let mut other = enc("toy/encoder", 8);
        other.revision = "sha256:ffff".into();
        let msg = SpanIndex::open(&path, Some(&other)).unwrap_err().to_string();
        assert!(msg.contains("sha256:0123") && msg.contains("sha256:ffff"), "{msg}");
        // Same fingerprint, different dim.
        let e = SpanIndex::open(&path, Some(&enc("toy/encoder", 16))).unwrap_err();
        assert!(matches!(e, IndexError::DimensionMismatch { expected: 8, found: 16, .. }), "{e}");
        // The right encoder opens.
        SpanIndex::open(&path, Some(&enc("toy/encoder", 8))).unwrap();
    }

    #[test]
    fn flipped_byte_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path, bytes) = saved(dir.path());
        for at in [12, 20, 30, 60, bytes.len() / 2, bytes.len() - 5, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            fs::write(&path, &b).unwrap();
            let e = SpanIndex::open(&path, None).unwrap_err();
            assert!(matches!(e, IndexError::Corrupt { .. }), "byte {at}: {e}");
            assert!(e.to_string().contains("index.nsi"), "{e}");
            // Damage is reported as such, wherever it is, not as whatever the damaged
            // section then fails to parse as (the checksum is only known at the end).
            assert!(e.to_string().contains("checksum mismatch"), "byte {at}: {e}");
        }
    }

    /// The summary says what opening says, without the vectors, and still refuses a
    /// damaged file.
    #[test]
    fn summary_matches_the_opened_index_and_checks_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (index, path, bytes) = saved(dir.path());
        let s = SpanIndex::summary(&path).unwrap();
        let opened = SpanIndex::open(&path, None).unwrap();
        assert_eq!(s.format_version, 2, "an exact index is written at v2");
        assert_eq!(s.format_version, index.format_version());
        assert_eq!((s.n_examples, s.n_spans), (index.n_examples(), index.n_spans()));
        assert_eq!((s.n_examples, s.n_spans), (opened.n_examples(), opened.n_spans()));
        assert_eq!(s.labels, opened.labels().map(str::to_string).collect::<Vec<_>>());
        assert_eq!(s.encoder.fingerprint(), opened.encoder().fingerprint());
        assert_eq!(s.backend, opened.backend());
        assert_eq!(s.params.ef_search, opened.params().ef_search);
        let mut b = bytes.clone();
        let at = b.len() / 2;
        b[at] ^= 0x40;
        fs::write(&path, &b).unwrap();
        let e = SpanIndex::summary(&path).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch") && e.to_string().contains("index.nsi"), "{e}");
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(SpanIndex::summary(&path), Err(IndexError::Corrupt { .. })));
    }

    #[test]
    fn truncated_is_corrupt_or_not_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path, bytes) = saved(dir.path());
        for len in [0, 5, 9, 30, 59, bytes.len() / 2, bytes.len() - 1] {
            fs::write(&path, &bytes[..len]).unwrap();
            let e = SpanIndex::open(&path, None).unwrap_err();
            if len < 8 {
                assert!(matches!(e, IndexError::NotAnIndex { .. }), "len {len}: {e}");
            } else {
                assert!(matches!(e, IndexError::Corrupt { .. }), "len {len}: {e}");
            }
        }
    }

    #[test]
    fn bad_magic_is_not_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path, mut bytes) = saved(dir.path());
        bytes[0] = b'X';
        fs::write(&path, &bytes).unwrap();
        let e = SpanIndex::open(&path, None).unwrap_err();
        assert!(matches!(e, IndexError::NotAnIndex { .. }), "{e}");
        fs::write(&path, "{\"json\": true}\n").unwrap();
        let e = SpanIndex::open(&path, None).unwrap_err();
        assert!(matches!(e, IndexError::NotAnIndex { .. }), "{e}");
        let e = SpanIndex::open(&dir.path().join("missing.nsi"), None).unwrap_err();
        assert!(matches!(e, IndexError::Io { .. }) && e.to_string().contains("missing.nsi"), "{e}");
    }

    #[test]
    fn future_version_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path, mut bytes) = saved(dir.path());
        bytes[8..10].copy_from_slice(&99u16.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let e = SpanIndex::open(&path, None).unwrap_err();
        assert!(matches!(e, IndexError::UnsupportedVersion { found: 99, current: CURRENT_VERSION, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("v99") && msg.contains(&format!("v{CURRENT_VERSION}")), "{msg}");
        bytes[8..10].copy_from_slice(&0u16.to_le_bytes());
        let e = SpanIndex::from_bytes(&bytes, None).unwrap_err();
        assert!(matches!(e, IndexError::UnsupportedVersion { found: 0, .. }), "{e}");
    }

    /// A section length far beyond the file is rejected before allocating, even with a
    /// valid checksum.
    #[test]
    fn absurd_length_is_rejected() {
        let (index, ..) = saved(tempfile::tempdir().unwrap().path());
        let mut bytes = index.to_bytes().unwrap();
        bytes[56..64].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let n = bytes.len();
        let crc = crc32(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let e = SpanIndex::from_bytes(&bytes, None).unwrap_err();
        assert!(matches!(e, IndexError::Corrupt { .. }), "{e}");
        println!("{e}");
    }

    fn crc32(b: &[u8]) -> u32 {
        // Bitwise CRC-32 (IEEE), independent of the crate's implementation.
        let mut crc = !0u32;
        for &x in b {
            crc ^= x as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn save_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let (old, path, old_bytes) = saved(dir.path());
        // Replace with a bigger index; no temp file stays behind.
        let mut rng = seeded("save_replaces_atomically");
        let new = build(BackendKind::Exact, 40, 8, &mut rng);
        new.save(&path).unwrap();
        assert_eq!(SpanIndex::open(&path, None).unwrap().n_examples(), 40);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("index.nsi")]);
        // A save that fails at the rename (the target is a directory) leaves the target and
        // the directory as they were, and removes its temp file.
        old.save(&path).unwrap();
        let target_dir = dir.path().join("taken");
        fs::create_dir(&target_dir).unwrap();
        fs::write(target_dir.join("keep"), b"x").unwrap();
        let e = new.save(&target_dir).unwrap_err();
        assert!(matches!(e, IndexError::Io { .. }) && e.to_string().contains("taken"), "{e}");
        assert!(target_dir.join("keep").exists());
        assert_eq!(fs::read(&path).unwrap(), old_bytes);
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("index.nsi"), "taken".into()]);
    }
}

mod live {
    use super::*;

    /// Add examples to an opened index and find them, for every backend.
    #[test]
    fn add_after_open_every_backend() {
        let dir = tempfile::tempdir().unwrap();
        for kind in all_kinds() {
            let mut rng = seeded(&format!("add_after_open_{kind}"));
            let path = dir.path().join(format!("{kind}.nsi"));
            build(kind, 200, 16, &mut rng).save(&path).unwrap();
            let mut index = SpanIndex::open(&path, None).unwrap();
            let fresh = clustered(30, 16, 3, 0.3, &mut rng);
            let mut new_ids = Vec::new();
            for (i, v) in fresh.chunks_exact(16).enumerate() {
                let spans = [(NewSpan { label: "new_label", start: 0, end: 3, text: "new" }, v)];
                let ex = index.add_example(&format!("new {i}"), None, v, &spans).unwrap();
                new_ids.push((ex, index.n_spans() as u32 - 1));
            }
            assert_eq!(index.n_examples(), 230);
            for ((ex, span), v) in new_ids.iter().zip(fresh.chunks_exact(16)) {
                let hit = index.search_spans(v, 1)[0];
                assert_eq!(hit.id, *span, "{kind}");
                assert!((hit.similarity - 1.0).abs() < 1e-4, "{kind}: {hit:?}");
                assert_eq!(index.label(index.span(hit.id).label), "new_label");
                assert_eq!(index.search_utterances(v, 1)[0].id, ex.0, "{kind}");
            }
            index.save(&path).unwrap();
            let again = SpanIndex::open(&path, None).unwrap();
            assert_eq!(again.n_spans(), 430);
            let (ex, span) = new_ids[7];
            assert_eq!(again.search_spans(again.span_vector(span), 1)[0].id, span, "{kind}");
            assert_eq!(again.example(ex).text, "new 7");
        }
    }

    /// `Auto` starts exact and moves to HNSW once a collection reaches the threshold.
    #[cfg(any(feature = "hnsw-rs", feature = "usearch"))]
    #[test]
    fn auto_upgrades_past_threshold() {
        let mut rng = seeded("auto_upgrades_past_threshold");
        let dim = 8;
        let mut index = SpanIndex::new(enc("e", dim as u32), BackendKind::Auto, HnswParams::default()).unwrap();
        assert_eq!(index.backend(), BackendKind::Exact);
        let n = AUTO_EXACT_THRESHOLD / 2 + 1;
        let vs = clustered(n * 2, dim, 50, 0.5, &mut rng);
        for (i, pair) in vs.chunks_exact(2 * dim).enumerate() {
            let (a, b) = pair.split_at(dim);
            let spans = [(NewSpan { label: "x", start: 0, end: 1, text: "x" }, a), (NewSpan { label: "y", start: 1, end: 2, text: "y" }, b)];
            index.add_example("t", None, a, &spans).unwrap();
            if index.n_spans() < AUTO_EXACT_THRESHOLD {
                assert_eq!(index.backend(), BackendKind::Exact, "after {i}");
            }
        }
        assert_ne!(index.backend(), BackendKind::Exact);
        let bytes = index.to_bytes().unwrap();
        let opened = SpanIndex::from_bytes(&bytes, None).unwrap();
        assert_eq!(opened.backend(), index.backend());
        let hit = opened.search_spans(opened.span_vector(1234), 1)[0];
        assert!((hit.similarity - 1.0).abs() < 1e-4);
    }

    /// A bf16 USearch graph: it survives save and open (precision included), finds the
    /// exact nearest neighbour for nearly every query, and its similarities stay within
    /// bf16's rounding of the exact ones.
    #[cfg(feature = "usearch")]
    #[test]
    fn bf16_graph_round_trips_and_stays_close_to_exact() {
        let mut rng = seeded("bf16_graph");
        let (dim, n) = (64, 3000);
        let params = HnswParams { graph_precision: GraphPrecision::Bf16, ..HnswParams::default() };
        let mut index = SpanIndex::new(enc("e", dim as u32), BackendKind::Usearch, params).unwrap();
        let vs = clustered(n, dim, 30, 0.5, &mut rng);
        let spans: Vec<_> = vs.chunks_exact(dim).map(|v| (NewSpan { label: "x", start: 0, end: 1, text: "x" }, v)).collect();
        index.add_example("t", None, &vs[..dim], &spans).unwrap();
        let opened = SpanIndex::from_bytes(&index.to_bytes().unwrap(), None).unwrap();
        assert_eq!(opened.params().graph_precision, GraphPrecision::Bf16);
        let queries = clustered(200, dim, 30, 0.5, &mut rng);
        let (mut found, mut worst) = (0, 0f32);
        for q in queries.chunks_exact(dim) {
            let exact = nearspan_index::backend::exact::exact_search(&vs, dim, q, 1)[0][0];
            let hit = opened.search_spans(q, 1)[0];
            found += usize::from(hit.id == exact.id);
            let truth: f32 = q.iter().zip(opened.span_vector(hit.id)).map(|(a, b)| a * b).sum();
            worst = worst.max((hit.similarity - truth).abs());
        }
        assert!(found >= 190, "recall@1 {found}/200");
        assert!(worst < 1e-2, "similarity error {worst}");
    }
}

mod compat {
    use super::*;
    use std::path::PathBuf;

    fn data_path(version: u16) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/index_v{version}.nsi"))
    }

    const FIXTURE_PARAMS: HnswParams =
        HnswParams { m: 8, ef_construction: 32, ef_search: 16, seed: 7, graph_precision: GraphPrecision::F32 };

    /// The fixture: toy 4-dim vectors, three examples, exact backend.
    fn fixture() -> SpanIndex {
        fixture_with(BackendKind::Exact)
    }

    /// The fixture's examples on another backend (v3's file holds it on `Ivf`).
    fn fixture_with(backend: BackendKind) -> SpanIndex {
        let encoder = EncoderInfo {
            model_id: "nearspan/toy-encoder".into(),
            revision: "sha256:00000000".into(),
            pooling: "mean".into(),
            max_width: 4,
            dim: 4,
        };
        let mut index = SpanIndex::new(encoder, backend, FIXTURE_PARAMS).unwrap();
        let s = |x: f32, y: f32, z: f32, w: f32| {
            let mut v = vec![x, y, z, w];
            normalize(&mut v);
            v
        };
        let (u0, a, b) = (s(1., 0., 0., 0.), s(0., 1., 0., 0.), s(0., 0., 1., 0.));
        index
            .add_example(
                "fly from boston to denver",
                Some("book_flight"),
                &u0,
                &[
                    (NewSpan { label: "from_city", start: 9, end: 15, text: "boston" }, &a),
                    (NewSpan { label: "to_city", start: 19, end: 25, text: "denver" }, &b),
                ],
            )
            .unwrap();
        let (u1, c) = (s(1., 0.2, 0., 0.), s(0., 0.9, 0.1, 0.));
        index
            .add_example(
                "flights to paris",
                Some("book_flight"),
                &u1,
                &[(NewSpan { label: "to_city", start: 11, end: 16, text: "paris" }, &c)],
            )
            .unwrap();
        let (u2, d) = (s(0., 0., 0., 1.), s(0.1, 0., 0., 1.));
        index
            .add_example("what is the weather", None, &u2, &[(NewSpan { label: "O", start: 0, end: 4, text: "what" }, &d)])
            .unwrap();
        index
    }

    /// Write the committed file of the current version:
    /// `cargo test --release -p nearspan-index -- --ignored write_compat_current`.
    /// Only together with a format version bump, keeping the older files.
    #[test]
    #[ignore]
    fn write_compat_current() {
        fixture_with(BackendKind::Ivf).save(&data_path(CURRENT_VERSION)).unwrap();
    }

    /// The header's version is readable on its own, and a non-index file is refused.
    #[test]
    fn file_format_version_reads_the_header() {
        assert_eq!(file_format_version(&data_path(1)).unwrap(), 1);
        assert_eq!(file_format_version(&data_path(2)).unwrap(), 2);
        assert_eq!(file_format_version(&data_path(3)).unwrap(), 3);
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, "hello, not an index").unwrap();
        assert!(matches!(file_format_version(&other), Err(IndexError::NotAnIndex { .. })));
        let short = dir.path().join("short.nsi");
        std::fs::write(&short, b"NSPANIDX\x01").unwrap();
        assert!(matches!(file_format_version(&short), Err(IndexError::Corrupt { .. })));
    }

    /// Every committed format version stays readable forever; v1 (before graph
    /// precision existed) reads as an f32 graph, v3 holds the IVF backend's lists.
    #[test]
    fn compat_v1_v2_and_v3() {
        for (version, backend) in [(1, BackendKind::Exact), (2, BackendKind::Exact), (3, BackendKind::Ivf)] {
            let index = SpanIndex::open(&data_path(version), None).unwrap_or_else(|e| panic!("index_v{version}.nsi must open: {e}"));
            check_fixture(&index, backend);
        }
    }

    fn check_fixture(index: &SpanIndex, backend: BackendKind) {
        assert_eq!(index.encoder().model_id, "nearspan/toy-encoder");
        assert_eq!(index.encoder().dim, 4);
        assert_eq!(index.backend(), backend);
        assert_eq!((index.n_examples(), index.n_spans(), index.n_labels()), (3, 4, 3));
        assert_eq!(index.labels().collect::<Vec<_>>(), ["from_city", "to_city", "O"]);
        assert_eq!(index.params(), &FIXTURE_PARAMS);
        let s = index.span(1);
        assert_eq!((index.label(s.label), s.start, s.end, s.text.as_str(), s.example), ("to_city", 19, 25, "denver", ExampleId(0)));
        assert_eq!(index.example(ExampleId(2)).text, "what is the weather");
        assert_eq!(index.example(ExampleId(2)).intent, None);
        assert_eq!(index.example(ExampleId(1)).intent.as_deref(), Some("book_flight"));
        let hits = index.search_spans(&[0.0, 1.0, 0.0, 0.0], 2);
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), vec![0, 2]);
        assert!((hits[0].similarity - 1.0).abs() < 1e-6);
        assert_eq!(index.search_utterances(&[0.0, 0.0, 0.0, 1.0], 1)[0].id, 2);
    }

    /// This build still writes exactly v2 for an index without IVF, and exactly v3 for
    /// one with it: if this fails, the format changed. Bump `CURRENT_VERSION`, keep the
    /// committed files and add one for the new version.
    #[test]
    fn writer_still_produces_v2_bytes_and_v3_for_ivf() {
        assert_eq!(CURRENT_VERSION, 3);
        let committed = std::fs::read(data_path(2)).unwrap();
        assert_eq!(fixture().to_bytes().unwrap(), committed);
        assert!(committed.len() < 4096, "fixture is {} bytes", committed.len());
        let committed = std::fs::read(data_path(3)).unwrap();
        assert_eq!(fixture_with(BackendKind::Ivf).to_bytes().unwrap(), committed);
        assert!(committed.len() < 4096, "fixture is {} bytes", committed.len());
    }
}

/// A query's neighbours and similarities do not depend on the batch it comes in (the
/// server batches requests), bit for bit, among batches scored the same way: alone or
/// with fewer than `GEMM_MIN_QUERIES` others (the scanning kernels), or in any larger
/// batch (matrix products), whichever block of the batch it falls in.
#[test]
fn exact_search_is_the_same_in_any_batch_of_a_kind() {
    use nearspan_index::backend::exact::{GEMM_MIN_QUERIES, GEMM_QUERY_BLOCK};
    let mut rng = seeded("exact_search_batch_invariance");
    let dim = 384usize;
    let index = build(BackendKind::Exact, 3000, dim as u32, &mut rng);
    // One more than a whole block: the last block holds a single query.
    let n = GEMM_QUERY_BLOCK + 1;
    let queries = clustered(n, dim, 20, 0.7, &mut rng);
    let big = index.search_spans_batch(&queries, 7);
    let small = index.search_spans_batch(&queries[..(GEMM_MIN_QUERIES - 1) * dim], 7);
    for qi in (0..n).step_by(5).chain([n - 1]) {
        let q = &queries[qi * dim..(qi + 1) * dim];
        let alone = index.search_spans(q, 7);
        if qi < GEMM_MIN_QUERIES - 1 {
            assert_eq!(alone, small[qi], "alone and in a small batch, query {qi}");
        }
        for m in [2, GEMM_MIN_QUERIES - 1] {
            let repeated: Vec<f32> = (0..m).flat_map(|_| q.iter().copied()).collect();
            assert_eq!(index.search_spans_batch(&repeated, 7)[m - 1], alone, "{m} copies, query {qi}");
        }
        for m in [GEMM_MIN_QUERIES, 17] {
            let repeated: Vec<f32> = (0..m).flat_map(|_| q.iter().copied()).collect();
            assert_eq!(index.search_spans_batch(&repeated, 7)[m - 1], big[qi], "{m} copies, query {qi}");
        }
    }
}
