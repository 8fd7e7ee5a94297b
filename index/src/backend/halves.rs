//! Start ⊕ end span rows kept as their distinct halves, for the two-stage search.
//!
//! A start ⊕ end span vector is `s · (a ⊕ b)`: `a` the vector of its first sub-token,
//! `b` that of its last, `s` one over the norm of the pair. The spans of one example that
//! start at the same character share `a` (up to the scale), those that end at the same
//! character share `b`: an example of n words has about 5n candidate spans of width ≤ 10
//! but only n distinct first and n distinct last halves. Each row is then
//! `α · A ⊕ β · B`, with `A` and `B` the example's stored halves, so a query half is
//! scored once against each distinct half and each row costs two multiply-adds: about
//! 5× fewer multiply-adds and bytes read than scanning the rows themselves.
//!
//! Nothing here trusts the layout: [`SpanHalves::build`] checks every row against its
//! halves and gives up (the caller scans rows instead) when one does not match, as with
//! mean-pooled spans.
//!
//! The halves are kept in f32 or, by choice, in bf16 ([`HalvesPrecision`]): half the
//! memory, and half the bytes a search reads from it (measured 1–5% faster, since the
//! prefetch already hides most of the wait; BENCHMARKS.md). They are widened back to f32
//! (exactly) before the products, so the only difference is the rounding of the stored
//! halves.

use rayon::prelude::*;

use super::exact::{products, FactoredQueries};
use super::{prefetch, run_parts, TopK, PARALLEL_MIN_WORK};
use crate::{HalvesPrecision, Neighbor, SearchParallelism, SpanRecord};

/// Every example's span rows as distinct halves and per-row coefficients.
pub(crate) struct SpanHalves {
    half: usize,
    /// Distinct halves, `half` wide, row-major: per example its first halves, then its
    /// last halves.
    halves: Halves,
    examples: Vec<ExampleHalves>,
    /// Per span row, in span id order.
    rows: Vec<RowHalves>,
}

#[derive(Debug, Clone, Copy)]
struct ExampleHalves {
    /// Row of `halves` where the example's first halves begin.
    halves: u32,
    starts: u32,
    ends: u32,
    /// Span id of its first row; its rows are `rows..rows + n_rows`.
    rows: u32,
    n_rows: u32,
}

/// The distinct halves' elements in the chosen precision.
#[derive(Debug, Clone, PartialEq)]
enum Halves {
    F32(Vec<f32>),
    /// bf16 bit patterns (the high 16 bits of the nearest f32, ties to even).
    Bf16(Vec<u16>),
}

impl Halves {
    fn new(precision: HalvesPrecision) -> Halves {
        match precision {
            HalvesPrecision::F32 => Halves::F32(Vec::new()),
            HalvesPrecision::Bf16 => Halves::Bf16(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Halves::F32(v) => v.len(),
            Halves::Bf16(v) => v.len(),
        }
    }

    fn extend(&mut self, values: &[f32]) {
        match self {
            Halves::F32(v) => v.extend_from_slice(values),
            Halves::Bf16(v) => v.extend(values.iter().map(|&x| half::bf16::from_f32(x).to_bits())),
        }
    }

    /// The elements `range` as f32: borrowed, or widened into `widened` (exactly: a bf16
    /// is the high half of an f32's bits).
    #[inline(always)]
    fn f32s<'a>(&'a self, range: std::ops::Range<usize>, widened: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Halves::F32(v) => &v[range],
            Halves::Bf16(v) => {
                widened.clear();
                widened.extend(v[range].iter().map(|&b| f32::from_bits(u32::from(b) << 16)));
                widened
            }
        }
    }

    fn prefetch(&self, range: std::ops::Range<usize>) {
        match self {
            Halves::F32(v) => prefetch(&v[range]),
            Halves::Bf16(v) => prefetch(&v[range]),
        }
    }
}

/// Row = `alpha · first halves[start] ⊕ beta · last halves[end]` (example-local indices).
#[derive(Debug, Clone, Copy)]
struct RowHalves {
    start: u32,
    end: u32,
    alpha: f32,
    beta: f32,
}

/// One example's factoring: its distinct halves (first, then last), their counts, its rows.
type Factored = (Vec<f32>, u32, u32, Vec<RowHalves>);

impl SpanHalves {
    /// Factors the span rows of every example (`offsets[e]..offsets[e + 1]`), grouping
    /// rows by their records' start and end characters, keeping the halves in `precision`.
    /// `None` when the dimension is odd or any row is not its group's halves times a
    /// scale (up to rounding).
    pub(crate) fn build(
        vectors: &[f32],
        dim: usize,
        spans: &[SpanRecord],
        offsets: &[u32],
        precision: HalvesPrecision,
    ) -> Option<SpanHalves> {
        if dim < 2 || dim % 2 != 0 || vectors.len() != spans.len() * dim || offsets.is_empty() {
            return None;
        }
        let parts: Vec<Factored> = offsets
            .par_windows(2)
            .map(|w| factor_example(vectors, dim, spans, w[0] as usize..w[1] as usize))
            .collect::<Option<_>>()?;
        let mut out = SpanHalves { half: dim / 2, halves: Halves::new(precision), examples: Vec::with_capacity(parts.len()), rows: Vec::with_capacity(spans.len()) };
        for (w, part) in offsets.windows(2).zip(parts) {
            out.append(w[0], part);
        }
        Some(out)
    }

    fn append(&mut self, first_row: u32, (halves, starts, ends, rows): Factored) {
        self.examples.push(ExampleHalves {
            halves: (self.halves.len() / self.half) as u32,
            starts,
            ends,
            rows: first_row,
            n_rows: rows.len() as u32,
        });
        self.halves.extend(&halves);
        self.rows.extend_from_slice(&rows);
    }

    /// Adds the example whose rows are `first_row..` of `vectors`/`spans` (the last one
    /// added to the index). False if its rows do not factor; then drop the whole structure.
    pub(crate) fn push_example(&mut self, vectors: &[f32], spans: &[SpanRecord], first_row: u32) -> bool {
        let dim = 2 * self.half;
        if first_row as usize != self.rows.len() || vectors.len() != spans.len() * dim {
            return false;
        }
        match factor_example(vectors, dim, spans, first_row as usize..spans.len()) {
            Some(part) => {
                self.append(first_row, part);
                true
            }
            None => false,
        }
    }

    /// The top `k` span rows of `examples` (indices, out-of-range ones skipped) for each
    /// factored query; ids are span ids. The same neighbours as scanning the rows, up to
    /// rounding. The examples are best visited nearest first: the heaps then fill with
    /// good rows early and later rows rarely enter them.
    pub(crate) fn search(
        &self,
        q: &FactoredQueries<'_>,
        examples: &[usize],
        k: usize,
        parallelism: SearchParallelism,
    ) -> Vec<Vec<Neighbor>> {
        let half = self.half;
        assert!(q.firsts.len() % half == 0 && q.lasts.len() % half == 0, "query halves are not {half} wide");
        let (nf, nl) = (q.firsts.len() / half, q.lasts.len() / half);
        assert!(q.pairs.iter().all(|&(f, l, _)| (f as usize) < nf && (l as usize) < nl), "pair out of range");
        let examples: Vec<usize> = examples.iter().copied().filter(|&e| e < self.examples.len()).collect();
        let run = |part: &[usize]| {
            let mut tops: Vec<TopK> = q.pairs.iter().map(|_| TopK::new(k)).collect();
            let mut scratch = Scratch { floors: vec![f32::NEG_INFINITY; q.pairs.len()], ..Scratch::default() };
            for (i, &e) in part.iter().enumerate() {
                if let Some(&next) = part.get(i + 1) {
                    self.prefetch_example(next);
                }
                self.score_example(e, q, &mut tops, &mut scratch);
            }
            tops
        };
        let work: usize = examples.iter().map(|&e| {
            let x = self.examples[e];
            (x.starts as usize * nf + x.ends as usize * nl) * half + x.n_rows as usize * q.pairs.len()
        }).sum();
        let tasks = if work < PARALLEL_MIN_WORK || parallelism == SearchParallelism::Serial { 1 } else { (rayon::current_num_threads().max(1) * 2).min(examples.len()) };
        let parts: Vec<&[usize]> =
            if tasks <= 1 { vec![&examples[..]] } else { examples.chunks(examples.len().div_ceil(tasks)).collect() };
        let tops = run_parts(&parts, |part| run(part));
        tops.into_iter().map(TopK::into_sorted).collect()
    }

    /// Asks the CPU to start loading example `e`'s halves and row coefficients: the
    /// examples a query scores are scattered over the index, so each would otherwise
    /// begin with a wait for memory (measured: BENCHMARKS.md, "Two-stage search").
    fn prefetch_example(&self, e: usize) {
        let x = self.examples[e];
        self.halves.prefetch(self.halves_of(x));
        prefetch(self.rows_of(x));
    }

    /// Where an example's distinct halves lie in `halves` (elements): its `starts` first
    /// halves, then its `ends` last ones.
    fn halves_of(&self, x: ExampleHalves) -> std::ops::Range<usize> {
        let h0 = x.halves as usize * self.half;
        h0..h0 + (x.starts + x.ends) as usize * self.half
    }

    /// An example's per-row coefficients.
    fn rows_of(&self, x: ExampleHalves) -> &[RowHalves] {
        &self.rows[x.rows as usize..(x.rows + x.n_rows) as usize]
    }

    /// Scores example `e`'s rows for every query pair into `tops`.
    ///
    /// The query halves' products with the example's halves come first; then, per
    /// distinct half, the products of every pair, scaled (`by_start`, `by_end`: pairs
    /// contiguous), so each row scores all pairs as one vectorizable `α·g + β·h`.
    fn score_example(&self, e: usize, q: &FactoredQueries<'_>, tops: &mut [TopK], w: &mut Scratch) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { self.score_example_avx512(e, q, tops, w) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { self.score_example_avx2(e, q, tops, w) };
            }
        }
        self.score_example_impl(e, q, tops, w)
    }

    /// [`score_example`](Self::score_example) compiled so that its per-row loop uses
    /// 16-lane vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn score_example_avx512(&self, e: usize, q: &FactoredQueries<'_>, tops: &mut [TopK], w: &mut Scratch) {
        self.score_example_impl(e, q, tops, w)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn score_example_avx2(&self, e: usize, q: &FactoredQueries<'_>, tops: &mut [TopK], w: &mut Scratch) {
        self.score_example_impl(e, q, tops, w)
    }

    #[inline(always)]
    fn score_example_impl(&self, e: usize, q: &FactoredQueries<'_>, tops: &mut [TopK], w: &mut Scratch) {
        let x = self.examples[e];
        let (half, ns, ne, np) = (self.half, x.starts as usize, x.ends as usize, q.pairs.len());
        let (starts, ends) = self.halves.f32s(self.halves_of(x), &mut w.widened).split_at(ns * half);
        refill(&mut w.first, q.firsts.len() / half * ns);
        products(q.firsts, starts, half, &mut w.first);
        refill(&mut w.last, q.lasts.len() / half * ne);
        products(q.lasts, ends, half, &mut w.last);
        refill(&mut w.by_start, ns * np);
        refill(&mut w.by_end, ne * np);
        for (p, &(f, l, scale)) in q.pairs.iter().enumerate() {
            let (f, l) = (f as usize, l as usize);
            for j in 0..ns {
                w.by_start[j * np + p] = scale * w.first[f * ns + j];
            }
            for j in 0..ne {
                w.by_end[j * np + p] = scale * w.last[l * ne + j];
            }
        }
        refill(&mut w.scores, np);
        for (i, r) in self.rows_of(x).iter().enumerate() {
            let g = &w.by_start[r.start as usize * np..][..np];
            let h = &w.by_end[r.end as usize * np..][..np];
            for ((s, g), h) in w.scores.iter_mut().zip(g).zip(h) {
                *s = r.alpha * g + r.beta * h;
            }
            // Which pairs this row enters, 64 at a time as a bit mask (a vector compare),
            // so that only those are visited: most rows enter few heaps or none. A pair's
            // floor only moves when that pair takes a row, so the mask stays exact.
            for c0 in (0..np).step_by(64) {
                let c1 = (c0 + 64).min(np);
                let mut enters = 0u64;
                for (b, (s, f)) in w.scores[c0..c1].iter().zip(&w.floors[c0..c1]).enumerate() {
                    enters |= u64::from(s >= f) << b;
                }
                while enters != 0 {
                    let p = c0 + enters.trailing_zeros() as usize;
                    enters &= enters - 1;
                    let top = &mut tops[p];
                    top.push(w.scores[p], x.rows + i as u32);
                    w.floors[p] = top.floor;
                }
            }
        }
    }
}

/// Per-task buffers of [`SpanHalves::search`], reused across examples.
#[derive(Default)]
struct Scratch {
    first: Vec<f32>,
    last: Vec<f32>,
    by_start: Vec<f32>,
    by_end: Vec<f32>,
    scores: Vec<f32>,
    /// `tops[p].floor`, contiguous.
    floors: Vec<f32>,
    /// An example's bf16 halves widened to f32.
    widened: Vec<f32>,
}

fn refill(v: &mut Vec<f32>, len: usize) {
    v.clear();
    v.resize(len, 0.0);
}

/// Factors the rows `rows` (one example's) or `None` if one does not match its halves.
fn factor_example(vectors: &[f32], dim: usize, spans: &[SpanRecord], rows: std::ops::Range<usize>) -> Option<Factored> {
    let half = dim / 2;
    let (starts, start_of) = side(vectors, dim, 0, rows.clone(), |r| spans[r].start)?;
    let (ends, end_of) = side(vectors, dim, half, rows, |r| spans[r].end)?;
    let (ns, ne) = ((starts.len() / half) as u32, (ends.len() / half) as u32);
    let mut halves = starts;
    halves.extend_from_slice(&ends);
    let rows = start_of.into_iter().zip(end_of).map(|((start, alpha), (end, beta))| RowHalves { start, end, alpha, beta }).collect();
    Some((halves, ns, ne, rows))
}

/// One side (`offset` 0: first halves, `half`: last halves) of an example's rows: the
/// distinct halves (the largest row of each group sharing `key`) and per row its group
/// and scale. `None` if a row is not its group's half times its scale.
fn side(
    vectors: &[f32],
    dim: usize,
    offset: usize,
    rows: std::ops::Range<usize>,
    key: impl Fn(usize) -> u32,
) -> Option<(Vec<f32>, Vec<(u32, f32)>)> {
    let half = dim / 2;
    let part = |r: usize| &vectors[r * dim + offset..r * dim + offset + half];
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let (mut keys, mut reps, mut rep_norms) = (Vec::<u32>::new(), Vec::<usize>::new(), Vec::<f32>::new());
    let mut group_of = Vec::with_capacity(rows.len());
    for r in rows.clone() {
        let (k, n) = (key(r), norm(part(r)));
        let g = match keys.iter().position(|&x| x == k) {
            Some(g) => g,
            None => {
                keys.push(k);
                reps.push(r);
                rep_norms.push(n);
                keys.len() - 1
            }
        };
        if n > rep_norms[g] {
            reps[g] = r;
            rep_norms[g] = n;
        }
        group_of.push((g, n));
    }
    let mut coefs = Vec::with_capacity(group_of.len());
    for (r, (g, n)) in rows.zip(group_of) {
        let scale = if rep_norms[g] > 0.0 { n / rep_norms[g] } else { 0.0 };
        // Rounding leaves each element within a few ulps of the row's norm; rows of
        // different tokens differ by orders of magnitude more.
        let tol = 1e-5 * n;
        if part(r).iter().zip(part(reps[g])).any(|(x, y)| (x - scale * y).abs() > tol) {
            return None;
        }
        coefs.push((g as u32, scale));
    }
    Some((reps.iter().flat_map(|&r| part(r).iter().copied()).collect(), coefs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::exact::factored_search_ranges;
    use crate::{ExampleId, LabelId};

    fn record(example: u32, start: u32, end: u32) -> SpanRecord {
        SpanRecord { example: ExampleId(example), label: LabelId(0), start, end, text: String::new() }
    }

    /// Examples of `words[e]` words, every span of width ≤ 4 pooled start ⊕ end from
    /// random token vectors and normalized, as the index stores them.
    fn start_end_rows(words: &[usize], half: usize, rnd: &mut impl FnMut() -> f32) -> (Vec<f32>, Vec<SpanRecord>, Vec<u32>) {
        start_end_rows_scaled(words, half, rnd, true)
    }

    /// [`start_end_rows`], normalized or not (then every row is its two token vectors).
    fn start_end_rows_scaled(
        words: &[usize],
        half: usize,
        rnd: &mut impl FnMut() -> f32,
        normalize: bool,
    ) -> (Vec<f32>, Vec<SpanRecord>, Vec<u32>) {
        let (mut vectors, mut spans, mut offsets) = (Vec::new(), Vec::new(), vec![0u32]);
        for (e, &n) in words.iter().enumerate() {
            let tokens: Vec<Vec<f32>> = (0..n).map(|_| (0..half).map(|_| rnd()).collect()).collect();
            for s in 0..n {
                for t in s + 1..=(s + 4).min(n) {
                    let row: Vec<f32> = tokens[s].iter().chain(&tokens[t - 1]).copied().collect();
                    let norm = if normalize { row.iter().map(|x| x * x).sum::<f32>().sqrt() } else { 1.0 };
                    vectors.extend(row.iter().map(|x| x / norm));
                    spans.push(record(e as u32, 10 * s as u32, 10 * t as u32 - 1));
                }
            }
            offsets.push(spans.len() as u32);
        }
        (vectors, spans, offsets)
    }

    #[test]
    fn halves_search_finds_what_the_row_scan_finds() {
        let mut rnd = crate::backend::test_floats(11);
        // 1,000 examples at 96 dims: enough work for the parallel path
        let half = 48;
        let words: Vec<usize> = (0..1000).map(|i| 1 + i % 9).collect();
        let (vectors, spans, offsets) = start_end_rows(&words, half, &mut rnd);
        let h = SpanHalves::build(&vectors, 2 * half, &spans, &offsets, HalvesPrecision::F32).expect("start-end rows factor");
        assert!(h.halves.len() < vectors.len() / 2, "fewer halves than rows");
        let (nf, nl) = (5, 4);
        let firsts: Vec<f32> = (0..nf * half).map(|_| rnd()).collect();
        let lasts: Vec<f32> = (0..nl * half).map(|_| rnd()).collect();
        // 17 pairs, and 150: more than the 64 that a row's entry mask holds at once
        for n_pairs in [17, 150] {
            let pairs: Vec<(u32, u32, f32)> =
                (0..n_pairs).map(|p| ((p % nf) as u32, (p * 3 % nl) as u32, 0.5 + (p % 17) as f32 / 10.0)).collect();
            let q = FactoredQueries { firsts: &firsts, lasts: &lasts, pairs: &pairs };
            // a few examples (serial path) and all of them (parallel path), unknown ids skipped
            for chosen in [vec![3usize, 17, 250, 9999], (0..1000).collect()] {
                let ranges: Vec<std::ops::Range<usize>> = chosen
                    .iter()
                    .filter(|&&e| e < 1000)
                    .map(|&e| offsets[e] as usize..offsets[e + 1] as usize)
                    .collect();
                let want = factored_search_ranges(&vectors, 2 * half, &q, &ranges, 7);
                let got = h.search(&q, &chosen, 7, SearchParallelism::Split);
                // on one thread: the same neighbours (the heaps merge exactly)
                assert_eq!(h.search(&q, &chosen, 7, SearchParallelism::Serial), got, "{n_pairs} pairs");
                assert_eq!(got.len(), pairs.len());
                for (p, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.len(), w.len());
                    for (a, b) in g.iter().zip(w) {
                        assert!((a.similarity - b.similarity).abs() < 1e-5, "{n_pairs} pairs, query {p}: {a:?} vs {b:?}");
                    }
                    assert_eq!(g[0].id, w[0].id, "{n_pairs} pairs, query {p}");
                }
            }
        }
    }

    /// Bf16 halves widen back exactly: halves that bf16 holds exactly (rows left
    /// unnormalized, so each stored half is a token vector) search exactly as in f32;
    /// rounded halves move each similarity by at most about 1e-3 of its norms.
    #[test]
    fn bf16_halves_search_like_f32_halves() {
        let mut rnd = crate::backend::test_floats(21);
        let half = 40;
        let words: Vec<usize> = (0..300).map(|i| 1 + i % 11).collect();
        let (vectors, spans, offsets) = start_end_rows(&words, half, &mut rnd);
        // token vectors that bf16 holds exactly, rows left unnormalized (alpha = beta = 1)
        let mut rounded = || half::bf16::from_f32(rnd()).to_f32();
        let (exact, exact_spans, exact_offsets) = start_end_rows_scaled(&words, half, &mut rounded, false);
        assert_eq!((&exact_spans, &exact_offsets), (&spans, &offsets));
        let (nf, nl) = (3, 4);
        let firsts: Vec<f32> = (0..nf * half).map(|_| rnd()).collect();
        let lasts: Vec<f32> = (0..nl * half).map(|_| rnd()).collect();
        let pairs: Vec<(u32, u32, f32)> = (0..12).map(|p| ((p % nf) as u32, (p % nl) as u32, 0.7 + p as f32 / 20.0)).collect();
        let q = FactoredQueries { firsts: &firsts, lasts: &lasts, pairs: &pairs };
        let chosen: Vec<usize> = (0..300).collect();
        let build = |v: &[f32], p| SpanHalves::build(v, 2 * half, &spans, &offsets, p).expect("rows factor");
        let (f32_exact, bf16_exact) = (build(&exact, HalvesPrecision::F32), build(&exact, HalvesPrecision::Bf16));
        assert!(matches!(bf16_exact.halves, Halves::Bf16(_)) && bf16_exact.halves.len() == f32_exact.halves.len());
        let (want, got) = (f32_exact.search(&q, &chosen, 9, SearchParallelism::Split), bf16_exact.search(&q, &chosen, 9, SearchParallelism::Split));
        assert_eq!(got, want, "bf16-exact halves");
        // normalized rows: the halves themselves are rounded
        let (want, got) = (build(&vectors, HalvesPrecision::F32).search(&q, &chosen, 9, SearchParallelism::Split), build(&vectors, HalvesPrecision::Bf16).search(&q, &chosen, 9, SearchParallelism::Split));
        let qnorm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let bound = 1.3 * 4e-3 * (qnorm(&firsts).max(qnorm(&lasts)));
        let mut moved = false;
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(w) {
                assert!((a.similarity - b.similarity).abs() <= bound, "{a:?} vs {b:?} (bound {bound})");
                moved |= a.similarity != b.similarity;
            }
        }
        assert!(moved, "rounded halves should move some similarity");
    }

    #[test]
    fn rows_that_are_not_start_end_do_not_factor() {
        let mut rnd = crate::backend::test_floats(5);
        let (mut vectors, spans, offsets) = start_end_rows(&[4, 6], 8, &mut rnd);
        assert!(SpanHalves::build(&vectors, 16, &spans, &offsets, HalvesPrecision::F32).is_some());
        // one element of one row's first half changed: that row no longer shares its half
        vectors[16 * 3 + 2] += 0.01;
        assert!(SpanHalves::build(&vectors, 16, &spans, &offsets, HalvesPrecision::F32).is_none());
        // odd dimensions never factor
        assert!(SpanHalves::build(&vectors[..15 * spans.len()], 15, &spans, &offsets, HalvesPrecision::F32).is_none());
    }

    #[test]
    fn pushing_examples_matches_building_at_once() {
        let mut rnd = crate::backend::test_floats(3);
        let (vectors, spans, offsets) = start_end_rows(&[3, 7, 2], 12, &mut rnd);
        let all = SpanHalves::build(&vectors, 24, &spans, &offsets, HalvesPrecision::F32).unwrap();
        let mut grown = SpanHalves::build(&vectors[..offsets[1] as usize * 24], 24, &spans[..offsets[1] as usize], &offsets[..2], HalvesPrecision::F32).unwrap();
        for e in 1..3 {
            let end = offsets[e + 1] as usize;
            assert!(grown.push_example(&vectors[..end * 24], &spans[..end], offsets[e]));
        }
        assert_eq!(grown.halves, all.halves);
        assert_eq!(grown.examples.len(), 3);
        assert_eq!(grown.rows.len(), all.rows.len());
        // a row out of order is refused
        assert!(!grown.push_example(&vectors, &spans, 0));
    }
}
