//! Brute-force search: every query is scored against every row.
//!
//! The rows live in one contiguous row-major `Vec<f32>`. A batch of at least
//! [`GEMM_MIN_QUERIES`] queries ([`exact_search`]) is scored by blocked matrix products
//! (the `gemm` crate, which packs both operands for its register tiles and keeps them in
//! cache), [`GEMM_QUERY_BLOCK`] queries against [`GEMM_ROW_BLOCK`] rows at a time, then
//! one pass over each block of scores keeps the top `k`. Fewer queries, and searches of
//! a few runs of rows ([`exact_search_ranges`], the two-stage search), are scanned with
//! small kernels instead, which read each row once and pack nothing: queries in groups
//! of 4 against rows in sub-blocks of [`ROW_BLOCK`] (≈200 KB at 384 dims, so a sub-block
//! stays in L2 while the queries pass over it), 4 queries × 2 rows at once with 8
//! accumulators of 8 (AVX2) or 16 (AVX-512) lanes, intrinsics when the CPU has them
//! (runtime-detected), else a portable version that LLVM vectorizes for the baseline
//! target. The two ways sum in different orders, so a similarity can differ in its last
//! bits between a small and a large batch; within each way a query scores the same in
//! any batch. Work is split over (query block × row chunk) pairs with rayon, so one query
//! still uses every core. Each task keeps a bounded heap per query; heaps are merged at
//! the end.

use rayon::prelude::*;

use super::{run_parts, AnnBackend, TopK, Vectors, PARALLEL_MIN_WORK};
use crate::{BackendKind, IndexError, Neighbor};

/// Queries per block of the scanning kernels.
pub const QUERY_BLOCK: usize = 16;
/// Rows per cache block of the scanning kernels.
pub const ROW_BLOCK: usize = 128;
/// Batches of at least this many queries are scored by matrix products: below it,
/// packing the rows costs more than the products save (one SNIPS utterance's search of
/// 13,084 utterance vectors took 1.3 ms longer that way).
pub const GEMM_MIN_QUERIES: usize = 8;
/// Smallest row chunk handed to one rayon task.
const MIN_CHUNK_ROWS: usize = 2048;
/// Queries per matrix product.
pub const GEMM_QUERY_BLOCK: usize = 64;
/// Rows per matrix product: the scores of one block (64 × 512 floats, 128 KB) stay in L2.
pub const GEMM_ROW_BLOCK: usize = 512;

/// The exact backend. It holds no state: it scans the caller's [`Vectors`].
#[derive(Debug, Default, Clone)]
pub struct Exact;

impl AnnBackend for Exact {
    fn kind(&self) -> BackendKind {
        BackendKind::Exact
    }
    fn insert(&mut self, _id: u32, _v: &[f32]) -> Result<(), IndexError> {
        Ok(())
    }
    fn insert_batch(&mut self, _first: u32, _rows: &[f32], _dim: usize) -> Result<(), IndexError> {
        Ok(())
    }
    fn search(&self, data: &Vectors, q: &[f32], k: usize) -> Vec<Neighbor> {
        exact_search(data.as_slice(), data.dim(), q, k).pop().unwrap_or_default()
    }
    fn search_batch(&self, data: &Vectors, queries: &[f32], k: usize) -> Vec<Vec<Neighbor>> {
        exact_search(data.as_slice(), data.dim(), queries, k)
    }
    fn memory_bytes(&self) -> usize {
        0
    }
}

/// Top-`k` rows of `data` (row-major, `dim` wide) by dot product, for each row of `queries`.
pub fn exact_search(data: &[f32], dim: usize, queries: &[f32], k: usize) -> Vec<Vec<Neighbor>> {
    assert!(dim > 0 && data.len() % dim == 0 && queries.len() % dim == 0);
    let n = data.len() / dim;
    let nq = queries.len() / dim;
    if nq == 0 {
        return Vec::new();
    }
    let k = k.min(n);
    let by_products = nq >= GEMM_MIN_QUERIES;
    let query_block = if by_products { GEMM_QUERY_BLOCK } else { QUERY_BLOCK };
    let q_blocks = nq.div_ceil(query_block);
    let threads = rayon::current_num_threads().max(1);
    let row_chunks = if n * dim * nq < PARALLEL_MIN_WORK {
        1
    } else {
        (threads * 2).div_ceil(q_blocks).clamp(1, n.div_ceil(MIN_CHUNK_ROWS).max(1))
    };
    let chunk_rows = n.div_ceil(row_chunks).max(1);
    let tasks: Vec<(usize, usize)> =
        (0..q_blocks).flat_map(|b| (0..row_chunks).map(move |c| (b, c))).collect();
    let run = |&(b, c): &(usize, usize)| {
        let q0 = b * query_block;
        let q1 = (q0 + query_block).min(nq);
        let r0 = (c * chunk_rows).min(n);
        let r1 = (r0 + chunk_rows).min(n);
        if by_products {
            product_scan_rows(&queries[q0 * dim..q1 * dim], data, dim, r0, r1, k)
        } else {
            scan_rows(&queries[q0 * dim..q1 * dim], data, dim, r0, r1, k)
        }
    };
    let partial: Vec<Vec<TopK>> = if tasks.len() == 1 {
        tasks.iter().map(run).collect()
    } else {
        tasks.par_iter().map(run).collect()
    };
    let mut out: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
    for (&(b, _), tops) in tasks.iter().zip(partial) {
        for (j, t) in tops.into_iter().enumerate() {
            out[b * query_block + j].merge(t);
        }
    }
    out.into_iter().map(TopK::into_sorted).collect()
}

/// Top-`k` rows by dot product for each row of `queries`, among the rows of `data` that
/// lie in `ranges` (half-open row ranges; ids stay global). For searching a subset that
/// is a few contiguous runs of rows, such as the spans of chosen examples, without
/// copying it. Every query passes over each row block while it is in cache, so the rows
/// are read from memory once; large searches split the rows (not the queries) between
/// rayon tasks and merge their heaps.
pub fn exact_search_ranges(
    data: &[f32],
    dim: usize,
    queries: &[f32],
    ranges: &[std::ops::Range<usize>],
    k: usize,
) -> Vec<Vec<Neighbor>> {
    assert!(dim > 0 && data.len() % dim == 0 && queries.len() % dim == 0);
    let n = data.len() / dim;
    assert!(ranges.iter().all(|r| r.start <= r.end && r.end <= n), "row range out of bounds");
    let nq = queries.len() / dim;
    let rows: usize = ranges.iter().map(|r| r.len()).sum();
    let run = |part: &[std::ops::Range<usize>]| {
        let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
        for r in part {
            scan(&mut tops, queries, data, dim, r.start, r.end);
        }
        tops
    };
    let tasks = if rows * dim * nq < PARALLEL_MIN_WORK {
        1
    } else {
        (rayon::current_num_threads().max(1) * 2).min(rows.div_ceil(ROW_BLOCK))
    };
    let parts = if tasks <= 1 { vec![ranges.to_vec()] } else { split_rows(ranges, rows.div_ceil(tasks)) };
    let tops = run_parts(&parts, |part| run(part));
    tops.into_iter().map(TopK::into_sorted).collect()
}

/// `ranges` cut into consecutive parts of about `per_part` rows each.
fn split_rows(ranges: &[std::ops::Range<usize>], per_part: usize) -> Vec<Vec<std::ops::Range<usize>>> {
    let per_part = per_part.max(1);
    let mut parts = vec![Vec::new()];
    let mut filled = 0;
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            if filled == per_part {
                parts.push(Vec::new());
                filled = 0;
            }
            let e = r.end.min(s + per_part - filled);
            parts.last_mut().expect("never empty").push(s..e);
            filled += e - s;
            s = e;
        }
    }
    parts
}

/// Queries whose vectors are two halves, each shared by many queries: query `p` of
/// `pairs = (f, l, scale)` is `scale * (firsts[f] ⊕ lasts[l])`. Candidate spans pooled
/// start ⊕ end are such queries: an utterance of n words has ~5n spans but only n start
/// and n end vectors.
pub struct FactoredQueries<'a> {
    /// Start halves, `dim / 2` wide, row-major.
    pub firsts: &'a [f32],
    /// End halves, `dim / 2` wide, row-major.
    pub lasts: &'a [f32],
    /// Per query: (row of `firsts`, row of `lasts`, scale).
    pub pairs: &'a [(u32, u32, f32)],
}

/// [`exact_search_ranges`] for [`FactoredQueries`]: every row's halves are scored against
/// each distinct start and end half once, and a query's score is the scaled sum of its
/// two halves' scores, so the multiply-adds per row drop from `queries × dim` to
/// `(starts + ends) × dim / 2` (about 4× fewer for SNIPS utterances). The scores equal
/// those of the concatenated vectors up to rounding.
pub fn factored_search_ranges(
    data: &[f32],
    dim: usize,
    queries: &FactoredQueries<'_>,
    ranges: &[std::ops::Range<usize>],
    k: usize,
) -> Vec<Vec<Neighbor>> {
    assert!(dim > 0 && dim % 2 == 0 && data.len() % dim == 0);
    let half = dim / 2;
    assert!(queries.firsts.len() % half == 0 && queries.lasts.len() % half == 0);
    let (nf, nl) = (queries.firsts.len() / half, queries.lasts.len() / half);
    assert!(queries.pairs.iter().all(|&(f, l, _)| (f as usize) < nf && (l as usize) < nl), "pair out of range");
    let n = data.len() / dim;
    assert!(ranges.iter().all(|r| r.start <= r.end && r.end <= n), "row range out of bounds");
    let rows: usize = ranges.iter().map(|r| r.len()).sum();
    let run = |part: &[std::ops::Range<usize>]| {
        let mut tops: Vec<TopK> = queries.pairs.iter().map(|_| TopK::new(k)).collect();
        for r in part {
            factored_scan(&mut tops, queries, data, dim, r.start, r.end);
        }
        tops
    };
    let tasks = if rows * (nf + nl) * half < PARALLEL_MIN_WORK {
        1
    } else {
        (rayon::current_num_threads().max(1) * 2).min(rows.div_ceil(ROW_BLOCK))
    };
    let parts = if tasks <= 1 { vec![ranges.to_vec()] } else { split_rows(ranges, rows.div_ceil(tasks)) };
    let tops = run_parts(&parts, |part| run(part));
    tops.into_iter().map(TopK::into_sorted).collect()
}

fn factored_scan(tops: &mut [TopK], q: &FactoredQueries<'_>, data: &[f32], dim: usize, r0: usize, r1: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { factored_scan_avx512(tops, q, data, dim, r0, r1) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { factored_scan_avx2(tops, q, data, dim, r0, r1) };
        }
    }
    factored_scan_impl::<Portable>(tops, q, data, dim, r0, r1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn factored_scan_avx512(tops: &mut [TopK], q: &FactoredQueries<'_>, data: &[f32], dim: usize, r0: usize, r1: usize) {
    factored_scan_impl::<avx512::Avx512>(tops, q, data, dim, r0, r1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn factored_scan_avx2(tops: &mut [TopK], q: &FactoredQueries<'_>, data: &[f32], dim: usize, r0: usize, r1: usize) {
    factored_scan_impl::<avx2::Avx2>(tops, q, data, dim, r0, r1)
}

/// Scores of the `vectors` (row-major, `half` wide) against the halves at `offset` of
/// rows `i` and `i + 1` (`two` false: only row `i`): `out[2 * v]`, `out[2 * v + 1]`.
#[inline(always)]
fn half_scores<K: Kernels>(vectors: &[f32], half: usize, data: &[f32], dim: usize, i: usize, two: bool, offset: usize, out: &mut [f32]) {
    let nv = vectors.len() / half;
    let a = &data[i * dim + offset..i * dim + offset + half];
    let j = if two { i + 1 } else { i };
    let b = &data[j * dim + offset..j * dim + offset + half];
    let v = |x: usize| &vectors[x * half..(x + 1) * half];
    let mut g = 0;
    while g < nv {
        let m = (nv - g).min(4);
        let d = K::k4x2([v(g), v(g + 1.min(m - 1)), v(g + 2.min(m - 1)), v(g + 3.min(m - 1))], a, b);
        for (x, dx) in d.iter().enumerate().take(m) {
            out[2 * (g + x)] = dx[0];
            out[2 * (g + x) + 1] = dx[1];
        }
        g += m;
    }
}

#[inline(always)]
fn factored_scan_impl<K: Kernels>(tops: &mut [TopK], q: &FactoredQueries<'_>, data: &[f32], dim: usize, r0: usize, r1: usize) {
    let half = dim / 2;
    let mut first = vec![0f32; 2 * (q.firsts.len() / half)];
    let mut last = vec![0f32; 2 * (q.lasts.len() / half)];
    let mut i = r0;
    while i < r1 {
        let two = i + 1 < r1;
        half_scores::<K>(q.firsts, half, data, dim, i, two, 0, &mut first);
        half_scores::<K>(q.lasts, half, data, dim, i, two, half, &mut last);
        for (top, &(f, l, scale)) in tops.iter_mut().zip(q.pairs) {
            let (f, l) = (2 * f as usize, 2 * l as usize);
            top.push(scale * (first[f] + last[l]), i as u32);
            if two {
                top.push(scale * (first[f + 1] + last[l + 1]), (i + 1) as u32);
            }
        }
        i += 2;
    }
}

/// All dot products of `queries` with `rows` (both row-major, `width` wide):
/// `out[i * rows + j] = queries[i] · rows[j]`. The small products of the factored span
/// search ([`SpanHalves`](super::halves::SpanHalves)), runtime-dispatched like the scans.
pub(crate) fn products(queries: &[f32], rows: &[f32], width: usize, out: &mut [f32]) {
    assert!(width > 0 && queries.len() % width == 0 && rows.len() % width == 0);
    assert_eq!(out.len(), queries.len() / width * (rows.len() / width), "output size");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { products_avx512(queries, rows, width, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { products_avx2(queries, rows, width, out) };
        }
    }
    products_impl::<Portable>(queries, rows, width, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn products_avx512(queries: &[f32], rows: &[f32], width: usize, out: &mut [f32]) {
    products_impl::<avx512::Avx512>(queries, rows, width, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products_avx2(queries: &[f32], rows: &[f32], width: usize, out: &mut [f32]) {
    products_impl::<avx2::Avx2>(queries, rows, width, out)
}

#[inline(always)]
fn products_impl<K: Kernels>(queries: &[f32], rows: &[f32], width: usize, out: &mut [f32]) {
    let (nq, nr) = (queries.len() / width, rows.len() / width);
    let q = |x: usize| &queries[x * width..(x + 1) * width];
    let r = |x: usize| &rows[x * width..(x + 1) * width];
    // Blocks of 4 × 4; a short block repeats its last query or row and drops the copies.
    let mut j = 0;
    while j < nr {
        let mr = (nr - j).min(4);
        let rs = [r(j), r(j + 1.min(mr - 1)), r(j + 2.min(mr - 1)), r(j + 3.min(mr - 1))];
        let mut i = 0;
        while i < nq {
            let m = (nq - i).min(4);
            let d = K::k4x4([q(i), q(i + 1.min(m - 1)), q(i + 2.min(m - 1)), q(i + 3.min(m - 1))], rs);
            for (x, dx) in d.iter().enumerate().take(m) {
                out[(i + x) * nr + j..][..mr].copy_from_slice(&dx[..mr]);
            }
            i += m;
        }
        j += mr;
    }
}

/// The top `k` of rows `r0..r1` for each query, by matrix products: the scores of the queries against
/// [`GEMM_ROW_BLOCK`] rows at a time, then one pass over them that skips a query's run of
/// 16 scores when none reaches its heap's floor.
fn product_scan_rows(queries: &[f32], data: &[f32], dim: usize, r0: usize, r1: usize, k: usize) -> Vec<TopK> {
    if queries.len() == dim {
        // `gemm` takes another path for a single row, whose sums round differently (the
        // last block of a batch can be one query): as two rows it scores as in any block.
        let mut tops = product_scan_rows(&[queries, queries].concat(), data, dim, r0, r1, k);
        tops.truncate(1);
        return tops;
    }
    let m = queries.len() / dim;
    let mut tops: Vec<TopK> = (0..m).map(|_| TopK::new(k)).collect();
    let mut scores = vec![0f32; m * GEMM_ROW_BLOCK];
    let mut s = r0;
    while s < r1 {
        let e = (s + GEMM_ROW_BLOCK).min(r1);
        let nr = e - s;
        let rows = &data[s * dim..e * dim];
        let out = &mut scores[..m * nr];
        assert!(queries.len() == m * dim && rows.len() == nr * dim && out.len() == m * nr);
        // SAFETY: out is m × nr row-major (strides nr, 1); queries m × dim (dim, 1); the
        // rows read as dim × nr (strides 1, dim): every index reached lies inside its
        // slice (lengths asserted above), and `out` is a unique borrow, so it overlaps
        // neither operand.
        unsafe {
            gemm::gemm(
                m, nr, dim,
                out.as_mut_ptr(), 1, nr as isize, false,
                queries.as_ptr(), 1, dim as isize,
                rows.as_ptr(), dim as isize, 1,
                0.0, 1.0, // out = queries · rowsᵀ (out is not read)
                false, false, false,
                gemm::Parallelism::None,
            );
        }
        for (top, row) in tops.iter_mut().zip(out.chunks_exact(nr)) {
            for (c, run) in row.chunks(16).enumerate() {
                let floor = top.floor;
                let mut any = false;
                for &x in run {
                    any |= x >= floor;
                }
                if any {
                    for (j, &x) in run.iter().enumerate() {
                        top.push(x, (s + c * 16 + j) as u32);
                    }
                }
            }
        }
        s = e;
    }
    tops
}

/// Score `queries` against rows `r0..r1`, keeping the top `k` per query.
fn scan_rows(queries: &[f32], data: &[f32], dim: usize, r0: usize, r1: usize, k: usize) -> Vec<TopK> {
    let mut tops: Vec<TopK> = (0..queries.len() / dim).map(|_| TopK::new(k)).collect();
    scan(&mut tops, queries, data, dim, r0, r1);
    tops
}

/// Score `queries` against rows `r0..r1` into `tops` (one heap per query).
fn scan(tops: &mut [TopK], queries: &[f32], data: &[f32], dim: usize, r0: usize, r1: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features `scan_avx512` is compiled for.
            return unsafe { scan_avx512(tops, queries, data, dim, r0, r1) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features `scan_avx2` is compiled for.
            return unsafe { scan_avx2(tops, queries, data, dim, r0, r1) };
        }
    }
    scan_impl::<Portable>(tops, queries, data, dim, r0, r1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scan_avx512(tops: &mut [TopK], queries: &[f32], data: &[f32], dim: usize, r0: usize, r1: usize) {
    scan_impl::<avx512::Avx512>(tops, queries, data, dim, r0, r1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_avx2(tops: &mut [TopK], queries: &[f32], data: &[f32], dim: usize, r0: usize, r1: usize) {
    scan_impl::<avx2::Avx2>(tops, queries, data, dim, r0, r1)
}

/// The kernels `scan_impl` and `products_impl` need, so that the AVX2 and AVX-512 paths
/// can use intrinsics.
trait Kernels {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    fn k1x4(q: &[f32], r: [&[f32]; 4]) -> [f32; 4];
    fn k4x2(q: [&[f32]; 4], a: &[f32], b: &[f32]) -> [[f32; 2]; 4];
    /// Four queries against four rows, `out[i][j] = q[i] · r[j]`. Two [`k4x2`](Self::k4x2)
    /// unless a kernel set has a better one.
    #[inline(always)]
    fn k4x4(q: [&[f32]; 4], r: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let (a, b) = (Self::k4x2(q, r[0], r[1]), Self::k4x2(q, r[2], r[3]));
        std::array::from_fn(|i| [a[i][0], a[i][1], b[i][0], b[i][1]])
    }
}

/// Portable kernels (LLVM vectorizes them for the baseline target).
struct Portable;
impl Kernels for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
    #[inline(always)]
    fn k1x4(q: &[f32], r: [&[f32]; 4]) -> [f32; 4] {
        k1x4(q, r)
    }
    #[inline(always)]
    fn k4x2(q: [&[f32]; 4], a: &[f32], b: &[f32]) -> [[f32; 2]; 4] {
        k4x2(q, a, b)
    }
}

#[inline(always)]
fn scan_impl<K: Kernels>(tops: &mut [TopK], queries: &[f32], data: &[f32], dim: usize, r0: usize, r1: usize) {
    let nq = queries.len() / dim;
    debug_assert_eq!(tops.len(), nq);
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let query = |i: usize| &queries[i * dim..(i + 1) * dim];
    let mut s = r0;
    while s < r1 {
        let e = (s + ROW_BLOCK).min(r1);
        let mut g = 0;
        while g < nq {
            let m = (nq - g).min(4);
            if m == 1 {
                let q = query(g);
                let top = &mut tops[g];
                let mut i = s;
                while i + 4 <= e {
                    let d = K::k1x4(q, [row(i), row(i + 1), row(i + 2), row(i + 3)]);
                    for (j, x) in d.into_iter().enumerate() {
                        top.push(x, (i + j) as u32);
                    }
                    i += 4;
                }
                while i < e {
                    top.push(K::dot(q, row(i)), i as u32);
                    i += 1;
                }
            } else {
                // Pad a short group by repeating its last query; padded scores are dropped.
                let qs = [query(g), query(g + 1.min(m - 1)), query(g + 2.min(m - 1)), query(g + 3.min(m - 1))];
                let mut i = s;
                while i < e {
                    let two = i + 1 < e;
                    let d = K::k4x2(qs, row(i), row(if two { i + 1 } else { i }));
                    for (j, dj) in d.iter().enumerate().take(m) {
                        tops[g + j].push(dj[0], i as u32);
                        if two {
                            tops[g + j].push(dj[1], (i + 1) as u32);
                        }
                    }
                    i += 2;
                }
            }
            g += m;
        }
        s = e;
    }
}

#[inline(always)]
fn madd(a: f32, b: f32, c: f32) -> f32 {
    // Not `mul_add`: without the `fma` target feature that is a libm call.
    a * b + c
}

#[inline(always)]
fn hsum(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Dot product with 8 independent lanes (vectorizes; the tail is scalar).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0f32; 8]; 2];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[0][l] = madd(x[l], y[l], acc[0][l]);
            acc[1][l] = madd(x[l + 8], y[l + 8], acc[1][l]);
        }
    }
    let mut s = hsum(&acc[0]) + hsum(&acc[1]);
    for (x, y) in ta.iter().zip(tb) {
        s = madd(*x, *y, s);
    }
    s
}

/// One query against four rows.
#[inline(always)]
fn k1x4(q: &[f32], r: [&[f32]; 4]) -> [f32; 4] {
    let n = q.len();
    let (r0, r1, r2, r3) = (&r[0][..n], &r[1][..n], &r[2][..n], &r[3][..n]);
    let mut acc = [[0f32; 8]; 4];
    let body = n / 8 * 8;
    for ((((x, a), b), c), d) in q[..body]
        .chunks_exact(8)
        .zip(r0[..body].chunks_exact(8))
        .zip(r1[..body].chunks_exact(8))
        .zip(r2[..body].chunks_exact(8))
        .zip(r3[..body].chunks_exact(8))
    {
        for l in 0..8 {
            acc[0][l] = madd(x[l], a[l], acc[0][l]);
            acc[1][l] = madd(x[l], b[l], acc[1][l]);
            acc[2][l] = madd(x[l], c[l], acc[2][l]);
            acc[3][l] = madd(x[l], d[l], acc[3][l]);
        }
    }
    let mut out = [hsum(&acc[0]), hsum(&acc[1]), hsum(&acc[2]), hsum(&acc[3])];
    for i in body..n {
        out[0] = madd(q[i], r0[i], out[0]);
        out[1] = madd(q[i], r1[i], out[1]);
        out[2] = madd(q[i], r2[i], out[2]);
        out[3] = madd(q[i], r3[i], out[3]);
    }
    out
}

/// Four queries against two rows: 8 accumulators, 6 loads per 8 FMAs.
#[inline(always)]
fn k4x2(q: [&[f32]; 4], a: &[f32], b: &[f32]) -> [[f32; 2]; 4] {
    let n = a.len();
    let (q0, q1, q2, q3, b) = (&q[0][..n], &q[1][..n], &q[2][..n], &q[3][..n], &b[..n]);
    let mut acc = [[[0f32; 8]; 2]; 4];
    let body = n / 8 * 8;
    for (((((ra, rb), x0), x1), x2), x3) in a[..body]
        .chunks_exact(8)
        .zip(b[..body].chunks_exact(8))
        .zip(q0[..body].chunks_exact(8))
        .zip(q1[..body].chunks_exact(8))
        .zip(q2[..body].chunks_exact(8))
        .zip(q3[..body].chunks_exact(8))
    {
        for l in 0..8 {
            acc[0][0][l] = madd(x0[l], ra[l], acc[0][0][l]);
            acc[0][1][l] = madd(x0[l], rb[l], acc[0][1][l]);
            acc[1][0][l] = madd(x1[l], ra[l], acc[1][0][l]);
            acc[1][1][l] = madd(x1[l], rb[l], acc[1][1][l]);
            acc[2][0][l] = madd(x2[l], ra[l], acc[2][0][l]);
            acc[2][1][l] = madd(x2[l], rb[l], acc[2][1][l]);
            acc[3][0][l] = madd(x3[l], ra[l], acc[3][0][l]);
            acc[3][1][l] = madd(x3[l], rb[l], acc[3][1][l]);
        }
    }
    let qs = [q0, q1, q2, q3];
    let mut out = [[0f32; 2]; 4];
    for j in 0..4 {
        out[j][0] = hsum(&acc[j][0]);
        out[j][1] = hsum(&acc[j][1]);
        for i in body..n {
            out[j][0] = madd(qs[j][i], a[i], out[j][0]);
            out[j][1] = madd(qs[j][i], b[i], out[j][1]);
        }
    }
    out
}

/// Dot product used by the HNSW distance functions (runtime-dispatched to AVX2+FMA).
#[inline]
pub fn dot_product(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports avx2 and fma.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    <avx2::Avx2 as Kernels>::dot(a, b)
}

/// AVX2 + FMA kernels with intrinsics: LLVM's auto-vectorizer picked 128-bit vectors for
/// the portable kernels even with AVX2 enabled. Only called from `#[target_feature]`
/// functions, after runtime detection.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    pub struct Avx2;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    impl super::Kernels for Avx2 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let body = n / 16 * 16;
            // SAFETY: loads stay below `body <= n`; the caller checked avx2 and fma.
            unsafe {
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                let (mut x, mut y) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i < body {
                    x = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), x);
                    y = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), y);
                    i += 16;
                }
                let mut s = hsum(_mm256_add_ps(x, y));
                for j in body..n {
                    s += a[j] * b[j];
                }
                s
            }
        }

        #[inline(always)]
        fn k1x4(q: &[f32], r: [&[f32]; 4]) -> [f32; 4] {
            let n = q.len();
            assert!(r.iter().all(|x| x.len() >= n));
            let body = n / 8 * 8;
            // SAFETY: every row is at least `n` long (asserted); loads stay below `body`.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i < body {
                    let x = _mm256_loadu_ps(q.as_ptr().add(i));
                    for j in 0..4 {
                        acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(r[j].as_ptr().add(i)), acc[j]);
                    }
                    i += 8;
                }
                let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
                for i in body..n {
                    for j in 0..4 {
                        out[j] += q[i] * r[j][i];
                    }
                }
                out
            }
        }

        #[inline(always)]
        fn k4x2(q: [&[f32]; 4], a: &[f32], b: &[f32]) -> [[f32; 2]; 4] {
            let n = a.len();
            assert!(b.len() >= n && q.iter().all(|x| x.len() >= n));
            let body = n / 8 * 8;
            // SAFETY: all slices are at least `n` long (asserted); loads stay below `body`.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                let mut i = 0;
                while i < body {
                    let ra = _mm256_loadu_ps(a.as_ptr().add(i));
                    let rb = _mm256_loadu_ps(b.as_ptr().add(i));
                    for j in 0..4 {
                        let x = _mm256_loadu_ps(q[j].as_ptr().add(i));
                        acc[j][0] = _mm256_fmadd_ps(x, ra, acc[j][0]);
                        acc[j][1] = _mm256_fmadd_ps(x, rb, acc[j][1]);
                    }
                    i += 8;
                }
                let mut out = [[0f32; 2]; 4];
                for j in 0..4 {
                    out[j] = [hsum(acc[j][0]), hsum(acc[j][1])];
                    for i in body..n {
                        out[j][0] += q[j][i] * a[i];
                        out[j][1] += q[j][i] * b[i];
                    }
                }
                out
            }
        }
    }
}

/// AVX-512 kernels: the same blocking as [`avx2`] with 16-lane vectors, half the
/// instructions per multiply-add. Only called from `#[target_feature(enable = "avx512f")]`
/// functions, after runtime detection.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub struct Avx512;

    /// The lane sums of 16 vectors: lane `i` of the result is the sum of `v[i]`'s lanes.
    /// Pairs are folded level by level (32-bit, 64-bit, then 128-bit halves), 15
    /// additions and 30 shuffles in all.
    #[inline(always)]
    unsafe fn reduce16(v: [__m512; 16]) -> __m512 {
        // After this level each 128-bit lane of t[k] holds [v2k: 2 partials, v2k+1: 2] interleaved.
        let t: [__m512; 8] = std::array::from_fn(|k| {
            let (a, b) = (v[2 * k], v[2 * k + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Each 128-bit lane of u[k] holds one partial of v[4k], v[4k+1], v[4k+2], v[4k+3].
        let u: [__m512; 4] = std::array::from_fn(|k| {
            let (a, b) = (_mm512_castps_pd(t[2 * k]), _mm512_castps_pd(t[2 * k + 1]));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
        });
        // Fold the four 128-bit lanes: first pairs of u, then the two halves.
        let w0 = _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(u[0], u[1]), _mm512_shuffle_f32x4::<0b11_10_11_10>(u[0], u[1]));
        let w1 = _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(u[2], u[3]), _mm512_shuffle_f32x4::<0b11_10_11_10>(u[2], u[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(w0, w1), _mm512_shuffle_f32x4::<0b11_01_11_01>(w0, w1))
    }

    impl super::Kernels for Avx512 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let body = n / 32 * 32;
            // SAFETY: loads stay below `body <= n`; the caller checked avx512f.
            unsafe {
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                let (mut x, mut y) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let mut i = 0;
                while i < body {
                    x = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), x);
                    y = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), y);
                    i += 32;
                }
                let mut s = _mm512_reduce_add_ps(_mm512_add_ps(x, y));
                for j in body..n {
                    s += a[j] * b[j];
                }
                s
            }
        }

        #[inline(always)]
        fn k1x4(q: &[f32], r: [&[f32]; 4]) -> [f32; 4] {
            let n = q.len();
            assert!(r.iter().all(|x| x.len() >= n));
            let body = n / 16 * 16;
            // SAFETY: every row is at least `n` long (asserted); loads stay below `body`.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i < body {
                    let x = _mm512_loadu_ps(q.as_ptr().add(i));
                    for j in 0..4 {
                        acc[j] = _mm512_fmadd_ps(x, _mm512_loadu_ps(r[j].as_ptr().add(i)), acc[j]);
                    }
                    i += 16;
                }
                let mut out = [0f32; 4];
                for j in 0..4 {
                    out[j] = _mm512_reduce_add_ps(acc[j]);
                    for i in body..n {
                        out[j] += q[i] * r[j][i];
                    }
                }
                out
            }
        }

        /// 16 accumulators, 8 loads per 16 FMAs, and one transposing reduction for all 16
        /// sums instead of 16 separate horizontal ones (the rows of the factored search
        /// are 192 wide: 12 steps, so the reduction is a large share).
        #[inline(always)]
        fn k4x4(q: [&[f32]; 4], r: [&[f32]; 4]) -> [[f32; 4]; 4] {
            let n = q[0].len();
            assert!(q.iter().chain(&r).all(|x| x.len() >= n));
            let body = n / 16 * 16;
            // SAFETY: all slices are at least `n` long (asserted); loads stay below `body`.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut i = 0;
                while i < body {
                    let rv: [__m512; 4] = std::array::from_fn(|b| _mm512_loadu_ps(r[b].as_ptr().add(i)));
                    for a in 0..4 {
                        let x = _mm512_loadu_ps(q[a].as_ptr().add(i));
                        for b in 0..4 {
                            acc[a * 4 + b] = _mm512_fmadd_ps(x, rv[b], acc[a * 4 + b]);
                        }
                    }
                    i += 16;
                }
                let mut sums = [0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(acc));
                std::array::from_fn(|a| {
                    std::array::from_fn(|b| {
                        let mut s = sums[a * 4 + b];
                        for i in body..n {
                            s += q[a][i] * r[b][i];
                        }
                        s
                    })
                })
            }
        }

        #[inline(always)]
        fn k4x2(q: [&[f32]; 4], a: &[f32], b: &[f32]) -> [[f32; 2]; 4] {
            let n = a.len();
            assert!(b.len() >= n && q.iter().all(|x| x.len() >= n));
            let body = n / 16 * 16;
            // SAFETY: all slices are at least `n` long (asserted); loads stay below `body`.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; 4];
                let mut i = 0;
                while i < body {
                    let ra = _mm512_loadu_ps(a.as_ptr().add(i));
                    let rb = _mm512_loadu_ps(b.as_ptr().add(i));
                    for j in 0..4 {
                        let x = _mm512_loadu_ps(q[j].as_ptr().add(i));
                        acc[j][0] = _mm512_fmadd_ps(x, ra, acc[j][0]);
                        acc[j][1] = _mm512_fmadd_ps(x, rb, acc[j][1]);
                    }
                    i += 16;
                }
                let mut out = [[0f32; 2]; 4];
                for j in 0..4 {
                    out[j] = [_mm512_reduce_add_ps(acc[j][0]), _mm512_reduce_add_ps(acc[j][1])];
                    for i in body..n {
                        out[j][0] += q[j][i] * a[i];
                        out[j][1] += q[j][i] * b[i];
                    }
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(data: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> = data
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, r)| (i as u32, r.iter().zip(q).map(|(a, b)| a * b).sum()))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(k);
        v
    }

    /// Odd sizes exercise every padding path: dims not a multiple of 8, query groups of
    /// 1-3, odd row counts, row counts below and above the parallel threshold.
    #[test]
    fn matches_naive_on_odd_shapes() {
        let mut rnd = crate::backend::test_floats(12345);
        for &(n, dim, nq) in &[(1, 3, 1), (7, 13, 2), (300, 37, 5), (5000, 64, 19), (20_001, 24, 3)] {
            let data: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
            let qs: Vec<f32> = (0..nq * dim).map(|_| rnd()).collect();
            let got = exact_search(&data, dim, &qs, 5);
            assert_eq!(got.len(), nq);
            for (qi, hits) in got.iter().enumerate() {
                let want = naive(&data, dim, &qs[qi * dim..(qi + 1) * dim], 5);
                assert_eq!(hits.len(), want.len());
                for (h, w) in hits.iter().zip(&want) {
                    assert!((h.similarity - w.1).abs() < 1e-4, "n={n} dim={dim}: {h:?} vs {w:?}");
                }
                assert_eq!(hits[0].id, want[0].0, "n={n} dim={dim} q={qi}");
            }
        }
    }

    /// Searching a few row ranges equals searching a copy of just those rows, with ids
    /// mapped back to the full matrix; large enough to take the parallel path too.
    #[test]
    fn range_search_matches_naive_on_the_subset() {
        let mut rnd = crate::backend::test_floats(99);
        for &(n, dim, nq) in &[(50, 13, 3), (40_000, 40, 33)] {
            let data: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
            let qs: Vec<f32> = (0..nq * dim).map(|_| rnd()).collect();
            let ranges = [3..9, 9..9, 20..n / 2, n - 5..n];
            let ids: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
            let subset: Vec<f32> = ids.iter().flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied()).collect();
            let got = exact_search_ranges(&data, dim, &qs, &ranges, 4);
            assert_eq!(got.len(), nq);
            for (qi, hits) in got.iter().enumerate() {
                let want = naive(&subset, dim, &qs[qi * dim..(qi + 1) * dim], 4);
                assert_eq!(hits.len(), 4);
                for (h, w) in hits.iter().zip(&want) {
                    assert_eq!(h.id as usize, ids[w.0 as usize], "n={n} q={qi}");
                    assert!((h.similarity - w.1).abs() < 1e-4);
                }
            }
        }
        assert!(exact_search_ranges(&[1.0, 0.0], 2, &[1.0, 0.0], &[], 3)[0].is_empty());
    }

    /// Factored queries score like their concatenated vectors, on both the serial and
    /// the parallel path, with odd half widths and odd row counts.
    #[test]
    fn factored_search_matches_concatenated_queries() {
        let mut rnd = crate::backend::test_floats(7);
        for &(n, dim, nf, nl) in &[(31, 26, 3, 5), (30_001, 48, 7, 6)] {
            let half = dim / 2;
            let data: Vec<f32> = (0..n * dim).map(|_| rnd()).collect();
            let firsts: Vec<f32> = (0..nf * half).map(|_| rnd()).collect();
            let lasts: Vec<f32> = (0..nl * half).map(|_| rnd()).collect();
            let pairs: Vec<(u32, u32, f32)> =
                (0..23).map(|p| ((p % nf) as u32, (p * 5 % nl) as u32, 0.5 + p as f32 / 10.0)).collect();
            let concat: Vec<f32> = pairs
                .iter()
                .flat_map(|&(f, l, sc)| {
                    let (f, l) = (f as usize, l as usize);
                    firsts[f * half..(f + 1) * half].iter().chain(&lasts[l * half..(l + 1) * half]).map(move |x| x * sc).collect::<Vec<_>>()
                })
                .collect();
            let ranges = [0..n / 3, n / 2..n];
            let want = exact_search_ranges(&data, dim, &concat, &ranges, 6);
            let q = FactoredQueries { firsts: &firsts, lasts: &lasts, pairs: &pairs };
            let got = factored_search_ranges(&data, dim, &q, &ranges, 6);
            assert_eq!(got.len(), pairs.len());
            for (p, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), 6);
                for (a, b) in g.iter().zip(w) {
                    assert!((a.similarity - b.similarity).abs() < 1e-4, "n={n} query {p}: {a:?} vs {b:?}");
                }
                assert_eq!(g[0].id, w[0].id, "n={n} query {p}");
            }
        }
    }

    #[test]
    fn split_rows_keeps_every_row_once() {
        let ranges = [0..5, 7..7, 10..23, 30..31];
        for per in [1, 3, 4, 19, 100] {
            let parts = split_rows(&ranges, per);
            let rows: Vec<usize> = parts.iter().flatten().flat_map(|r| r.clone()).collect();
            let want: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(rows, want, "per {per}");
            assert!(parts.iter().all(|p| p.iter().map(|r| r.len()).sum::<usize>() <= per), "per {per}");
        }
    }

    /// Every kernel set this CPU can run (portable, AVX2, AVX-512) scores odd shapes like
    /// the naive loop, whichever one `scan` picks at run time.
    #[test]
    fn every_kernel_set_matches_naive() {
        let (n, dim, nq) = (37, 45, 7);
        let data: Vec<f32> = (0..n * dim).map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0).collect();
        let qs: Vec<f32> = (0..nq * dim).map(|i| (i * 53 % 97) as f32 / 48.0 - 1.0).collect();
        let fresh = || (0..nq).map(|_| TopK::new(n)).collect::<Vec<TopK>>();
        let mut runs: Vec<(&str, Vec<TopK>)> = Vec::new();
        let mut t = fresh();
        scan_impl::<Portable>(&mut t, &qs, &data, dim, 0, n);
        runs.push(("portable", t));
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                let mut t = fresh();
                // SAFETY: checked just above.
                unsafe { scan_avx2(&mut t, &qs, &data, dim, 0, n) };
                runs.push(("avx2", t));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut t = fresh();
                // SAFETY: checked just above.
                unsafe { scan_avx512(&mut t, &qs, &data, dim, 0, n) };
                runs.push(("avx512", t));
            }
        }
        for (name, tops) in runs {
            for (qi, top) in tops.into_iter().enumerate() {
                let got = top.into_sorted();
                let want = naive(&data, dim, &qs[qi * dim..(qi + 1) * dim], n);
                assert_eq!(got.len(), n, "{name}");
                for (g, w) in got.iter().zip(&want) {
                    assert!((g.similarity - w.1).abs() < 1e-3, "{name} query {qi}: {g:?} vs {w:?}");
                }
            }
        }
    }

    /// The small products of the factored search, with every kernel set this CPU can
    /// run, on shapes that leave partial 4 × 4 blocks and a width that is not a multiple
    /// of the vector length.
    #[test]
    fn products_match_naive_with_every_kernel_set() {
        let mut rnd = crate::backend::test_floats(777);
        for &(nq, nr, width) in &[(1, 1, 5), (3, 5, 17), (4, 4, 16), (9, 11, 192), (6, 2, 33)] {
            let qs: Vec<f32> = (0..nq * width).map(|_| rnd()).collect();
            let rows: Vec<f32> = (0..nr * width).map(|_| rnd()).collect();
            let want: Vec<f32> = (0..nq * nr)
                .map(|x| (0..width).map(|d| qs[x / nr * width + d] * rows[x % nr * width + d]).sum())
                .collect();
            let mut runs: Vec<(&str, Vec<f32>)> = Vec::new();
            let mut out = vec![f32::NAN; nq * nr];
            products_impl::<Portable>(&qs, &rows, width, &mut out);
            runs.push(("portable", out));
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    let mut out = vec![f32::NAN; nq * nr];
                    // SAFETY: checked just above.
                    unsafe { products_avx2(&qs, &rows, width, &mut out) };
                    runs.push(("avx2", out));
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    let mut out = vec![f32::NAN; nq * nr];
                    // SAFETY: checked just above.
                    unsafe { products_avx512(&qs, &rows, width, &mut out) };
                    runs.push(("avx512", out));
                }
            }
            for (name, got) in runs {
                for (x, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() < 1e-4, "{name} {nq}x{nr}x{width} at {x}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn dot_product_matches_scalar() {
        let a: Vec<f32> = (0..389).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..389).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot_product(&a, &b) - want).abs() < 1e-3);
    }
}
