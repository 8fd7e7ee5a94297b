//! Inverted-file search (IVF): the rows are split by k-means into lists, each list is
//! stored contiguously as 8-bit codes, and a query scores the list centroids, scans the
//! `nprobe` closest lists and re-scores its best `rerank` candidates exactly in f32.
//!
//! Why beside HNSW: at 10⁶ rows an HNSW walk reads every vector it visits from a random
//! place in memory, thousands per query; a list is read front to back, which the
//! hardware prefetcher can stream, and its codes are a quarter of the f32 bytes
//! (BENCHMARKS.md, "IVF at 10⁶": 11× faster than HNSW at recall 0.985 on clustered
//! vectors, about 1.5× on real span vectors). On clustered data (span vectors of one label lie close together) the
//! true neighbours sit in the query's few closest lists.
//!
//! Codes: each row is scaled by its own largest magnitude to integers in −127..=127 and
//! stored offset by 128 as `u8`, padded to a multiple of 64 bytes; the query is scaled
//! the same way to `i8`. Their dot product runs on AVX512-VNNI (`vpdpbusd`, 64
//! multiply-adds an instruction) when the CPU has it (runtime-detected), else on AVX2
//! (`vpmaddwd` on codes widened to 16 bits), else on a portable loop. The 8-bit scores only choose candidates: every similarity returned is
//! the f32 dot product with the caller's row.
//!
//! Training: spherical k-means (unit centroids, dot-product assignment) on a seeded
//! sample, seeded by k-means++; the assignments are exact searches by matrix products
//! ([`exact_search`]). A first insert of at least [`IvfParams::min_train_rows`] rows (a
//! build over existing vectors, or an index being opened) trains on those rows. Rows
//! inserted one by one before there are that many go to one list, which every query
//! scans, and the insert that reaches the threshold clusters all of them from their
//! codes. Later rows join their closest list, and once the rows are 4 times as many as
//! when the lists were last made, they are all clustered again from their codes (so
//! an index that grows one example at a time keeps about √n lists). An index
//! file stores the lists ([`AnnBackend::graph_bytes`]), so opening one does not
//! cluster again.

use rayon::prelude::*;

use super::exact::{exact_search, products};
use super::{prefetch, AnnBackend, TopK, Vectors};
use crate::{BackendKind, IndexError, Neighbor};

/// Bytes of a code row are padded to a multiple of this (one AVX-512 register).
const CODE_ALIGN: usize = 64;

/// How the lists are made and searched.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IvfParams {
    /// Number of lists; 0: the square root of the rows at training time.
    pub lists: usize,
    /// Lists scanned per query (the search's breadth, like HNSW's `ef`).
    pub nprobe: usize,
    /// Candidates, by 8-bit score, re-scored in f32 (at least `k` are).
    pub rerank: usize,
    /// Rows sampled per list to train k-means.
    pub sample_per_list: usize,
    /// Lloyd iterations after the k-means++ seeding.
    pub iterations: usize,
    pub seed: u64,
}

impl Default for IvfParams {
    fn default() -> Self {
        IvfParams { lists: 0, nprobe: 4, rerank: 32, sample_per_list: 64, iterations: 8, seed: 42 }
    }
}

impl IvfParams {
    /// Rows needed before clustering: fewer are searched as one list.
    pub fn min_train_rows(&self) -> usize {
        if self.lists == 0 {
            4096
        } else {
            (self.lists * 8).max(4096)
        }
    }

    fn lists_for(&self, n: usize) -> usize {
        let lists = if self.lists == 0 { (n as f64).sqrt().round() as usize } else { self.lists };
        lists.clamp(1, n.max(1))
    }
}

/// One list: its rows' ids, 8-bit codes (`width` bytes each) and scales.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct List {
    ids: Vec<u32>,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// The IVF backend. See the module docs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ivf {
    params: IvfParams,
    dim: usize,
    /// Bytes per code row: `dim` rounded up to [`CODE_ALIGN`].
    width: usize,
    /// Unit centroids, `lists.len()` × `dim`; empty until trained (then `lists` has one list).
    centroids: Vec<f32>,
    /// The centroids as 8-bit codes (a quarter of the bytes, so they stay in cache),
    /// which choose the lists to probe. No ids: code row `i` is list `i`'s centroid.
    centroid_codes: List,
    lists: Vec<List>,
    len: usize,
    /// Rows when the lists were last made (0: never).
    clustered_at: usize,
}

/// The rows grow this many times over before the lists are made again.
const RECLUSTER_GROWTH: usize = 4;

impl Ivf {
    /// An empty, untrained index.
    pub fn new(dim: usize, params: IvfParams) -> Self {
        assert!(dim > 0, "vector dimension must be positive");
        Ivf { params, dim, width: dim.next_multiple_of(CODE_ALIGN), centroids: Vec::new(), centroid_codes: List::default(), lists: vec![List::default()], len: 0, clustered_at: 0 }
    }

    /// Clusters all rows of `data`: [`AnnBackend::insert_batch`] on an empty index.
    pub fn build(data: &Vectors, params: IvfParams) -> Result<Self, IndexError> {
        let mut ivf = Ivf::new(data.dim(), params);
        ivf.insert_batch(0, data.as_slice(), data.dim())?;
        Ok(ivf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Restores lists saved by [`AnnBackend::graph_bytes`] for `n` rows of `dim`
    /// dimensions. `None` when the bytes do not decode or do not describe such rows (every
    /// id in range, every list's codes and scales the length of its ids): the caller then
    /// rebuilds from the vectors, which are the source of truth.
    pub fn from_bytes(bytes: &[u8], dim: usize, n: usize) -> Option<Ivf> {
        let config = bincode::config::standard().with_limit::<{ 1 << 40 }>();
        let (ivf, used): (Ivf, usize) = bincode::serde::decode_from_slice(bytes, config).ok()?;
        let lists_ok = ivf.lists.iter().all(|l| {
            l.codes.len() == l.ids.len() * ivf.width && l.scales.len() == l.ids.len() && l.ids.iter().all(|&id| (id as usize) < n)
        });
        let shape_ok = ivf.dim == dim
            && ivf.width == dim.next_multiple_of(CODE_ALIGN)
            && ivf.len == n
            && ivf.lists.iter().map(|l| l.ids.len()).sum::<usize>() == n
            && !ivf.lists.is_empty()
            && if ivf.is_trained() {
                ivf.centroids.len() == ivf.lists.len() * dim
                    && ivf.centroid_codes.codes.len() == ivf.lists.len() * ivf.width
                    && ivf.centroid_codes.scales.len() == ivf.lists.len()
            } else {
                ivf.lists.len() == 1
            };
        (used == bytes.len() && lists_ok && shape_ok).then_some(ivf)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of lists (1 until trained).
    pub fn lists(&self) -> usize {
        self.lists.len()
    }

    pub fn is_trained(&self) -> bool {
        !self.centroids.is_empty()
    }

    /// Sizes of the lists: how even k-means split the rows.
    pub fn list_sizes(&self) -> Vec<usize> {
        self.lists.iter().map(|l| l.ids.len()).collect()
    }

    pub fn set_nprobe(&mut self, nprobe: usize) {
        self.params.nprobe = nprobe.max(1);
    }

    fn set_centroids(&mut self, centroids: Vec<f32>) {
        let mut codes = List::default();
        for c in centroids.chunks_exact(self.dim) {
            let (code, scale) = quantize(c, self.width);
            codes.codes.extend_from_slice(&code);
            codes.scales.push(scale);
        }
        self.centroids = centroids;
        self.centroid_codes = codes;
    }

    /// Appends rows `first_id..` (`rows` row-major) to their closest lists.
    fn assign_all(&mut self, rows: &[f32], first_id: u32) {
        let dim = self.dim;
        let closest: Vec<usize> = if self.is_trained() {
            exact_search(&self.centroids, dim, rows, 1).into_iter().map(|h| h.first().map_or(0, |n| n.id as usize)).collect()
        } else {
            vec![0; rows.len() / dim]
        };
        if self.lists.len() != self.centroids.len() / dim && self.is_trained() {
            self.lists = vec![List::default(); self.centroids.len() / dim];
        }
        let width = self.width;
        let coded: Vec<(Vec<u8>, f32)> = rows.par_chunks_exact(dim).map(|v| quantize(v, width)).collect();
        for (i, ((codes, scale), list)) in coded.into_iter().zip(closest).enumerate() {
            let l = &mut self.lists[list];
            l.ids.push(first_id + i as u32);
            l.codes.extend_from_slice(&codes);
            l.scales.push(scale);
        }
        self.len += rows.len() / dim;
    }

    /// Clusters the rows held so far, from their codes (the f32 rows are the caller's).
    fn train_from_codes(&mut self) {
        let (dim, width) = (self.dim, self.width);
        // Ids are dense from 0 (`insert_batch` checks), so row `id` goes to place `id`.
        let mut rows = vec![0f32; self.len * dim];
        for l in std::mem::take(&mut self.lists) {
            for ((&id, &scale), code) in l.ids.iter().zip(&l.scales).zip(l.codes.chunks_exact(width)) {
                let row = &mut rows[id as usize * dim..(id as usize + 1) * dim];
                for (x, &c) in row.iter_mut().zip(code) {
                    *x = (c as i32 - 128) as f32 * scale;
                }
            }
        }
        self.set_centroids(train(&rows, dim, self.params.lists_for(self.len), &self.params));
        self.clustered_at = self.len;
        self.len = 0;
        self.assign_all(&rows, 0);
    }

    /// The lists a query scans: its `nprobe` closest centroids (all lists when untrained).
    fn probes(&self, query: &QueryCodes, dots: &mut Vec<i32>, scores: &mut Vec<f32>) -> Vec<usize> {
        let n_lists = self.lists.len();
        if !self.is_trained() || self.params.nprobe >= n_lists {
            return (0..n_lists).collect();
        }
        query.score(&self.centroid_codes, self.width, dots, scores);
        let mut order: Vec<usize> = (0..n_lists).collect();
        let p = self.params.nprobe;
        order.select_nth_unstable_by(p - 1, |&a, &b| scores[b].total_cmp(&scores[a]));
        order.truncate(p);
        order
    }
}

impl AnnBackend for Ivf {
    fn kind(&self) -> BackendKind {
        BackendKind::Ivf
    }
    fn insert(&mut self, id: u32, v: &[f32]) -> Result<(), IndexError> {
        self.insert_batch(id, v, v.len())
    }
    fn insert_batch(&mut self, first_id: u32, rows: &[f32], dim: usize) -> Result<(), IndexError> {
        if dim != self.dim || !rows.len().is_multiple_of(dim) {
            let found = if dim != self.dim { dim } else { rows.len() % dim };
            return Err(IndexError::DimensionMismatch { what: format!("row {first_id}"), expected: self.dim as u32, found });
        }
        if first_id as usize != self.len {
            return Err(IndexError::Backend { backend: BackendKind::Ivf, message: format!("row {first_id} inserted after {} rows: ids must be dense", self.len) });
        }
        let n = rows.len() / dim;
        if self.len == 0 && n >= self.params.min_train_rows() {
            // Enough rows at once (building over existing vectors): train on them in f32.
            self.set_centroids(train(rows, dim, self.params.lists_for(n), &self.params));
            self.clustered_at = n;
        }
        self.assign_all(rows, first_id);
        let grown = self.is_trained() && self.len >= RECLUSTER_GROWTH * self.clustered_at;
        if grown || (!self.is_trained() && self.len >= self.params.min_train_rows()) {
            self.train_from_codes();
        }
        Ok(())
    }
    fn search(&self, data: &Vectors, q: &[f32], k: usize) -> Vec<Neighbor> {
        if k == 0 || self.len == 0 {
            return Vec::new();
        }
        let query = QueryCodes::new(q, self.width);
        let mut candidates = TopK::new(self.params.rerank.max(k));
        let (mut dots, mut scores) = (Vec::new(), Vec::new());
        for list in self.probes(&query, &mut dots, &mut scores) {
            let l = &self.lists[list];
            query.score(l, self.width, &mut dots, &mut scores);
            for (&sim, &id) in scores.iter().zip(&l.ids) {
                candidates.push(sim, id);
            }
        }
        // The candidates' f32 rows lie anywhere in memory: ask for all of them before
        // reading any, so that their misses overlap.
        let candidates = candidates.into_sorted();
        candidates.iter().for_each(|c| prefetch(data.row(c.id as usize)));
        let mut exact = TopK::new(k);
        for c in candidates {
            exact.push(dot(q, data.row(c.id as usize)), c.id);
        }
        exact.into_sorted()
    }
    /// The lists scanned per query (`nprobe`): IVF's counterpart of `ef`.
    fn set_ef_search(&mut self, ef: usize) {
        self.set_nprobe(ef);
    }
    /// The lists, codes and centroids (bincode), so that opening an index does not
    /// cluster again; [`Ivf::from_bytes`] reads them back.
    fn graph_bytes(&self) -> Result<Option<Vec<u8>>, IndexError> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map(Some)
            .map_err(|e| IndexError::Backend { backend: BackendKind::Ivf, message: e.to_string() })
    }
    fn memory_bytes(&self) -> usize {
        self.centroids.capacity() * 4
            + self.centroid_codes.codes.capacity()
            + self.centroid_codes.scales.capacity() * 4
            + self.lists.iter().map(|l| l.ids.capacity() * 4 + l.codes.capacity() + l.scales.capacity() * 4).sum::<usize>()
    }
}

/// Unit centroids of `rows` by spherical k-means: k-means++ seeding on a seeded sample,
/// then `params.iterations` Lloyd steps on it.
fn train(rows: &[f32], dim: usize, lists: usize, params: &IvfParams) -> Vec<f32> {
    let n = rows.len() / dim;
    let mut rng = SplitMix(params.seed);
    // The sample: a seeded partial shuffle of the row numbers.
    let m = (lists * params.sample_per_list.max(1)).min(n);
    let mut picks: Vec<usize> = (0..n).collect();
    for i in 0..m {
        let j = i + rng.below(n - i);
        picks.swap(i, j);
    }
    picks.truncate(m);
    picks.sort_unstable();
    let sample: Vec<f32> = picks.iter().flat_map(|&i| rows[i * dim..(i + 1) * dim].iter().copied()).collect();
    let row = |i: usize| &sample[i * dim..(i + 1) * dim];

    // k-means++: each next centre drawn with probability ∝ squared distance to the
    // closest chosen one (2 − 2·dot for unit rows).
    let mut centroids = Vec::with_capacity(lists * dim);
    let mut best = vec![f32::NEG_INFINITY; m];
    let mut chosen = rng.below(m);
    let mut dots = vec![0f32; m];
    for c in 0..lists {
        centroids.extend_from_slice(row(chosen));
        if c + 1 == lists {
            break;
        }
        let centre = row(chosen).to_vec();
        dots.par_chunks_mut(1024).enumerate().for_each(|(b, out)| {
            let first = b * 1024;
            products(&centre, &sample[first * dim..(first + out.len()) * dim], dim, out);
        });
        let mut total = 0f64;
        for (b, &d) in best.iter_mut().zip(&dots) {
            *b = b.max(d);
            total += (1.0 - *b).max(0.0) as f64;
        }
        chosen = if total <= 0.0 {
            rng.below(m)
        } else {
            let mut target = rng.unit() * total;
            let mut pick = m - 1;
            for (i, &b) in best.iter().enumerate() {
                target -= (1.0 - b).max(0.0) as f64;
                if target < 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
    }
    centroids.chunks_exact_mut(dim).for_each(normalize);

    for _ in 0..params.iterations {
        let assigned = exact_search(&centroids, dim, &sample, 1);
        let mut sums = vec![0f32; lists * dim];
        let mut counts = vec![0usize; lists];
        let mut fit = Vec::with_capacity(m);
        for (i, hits) in assigned.iter().enumerate() {
            let Some(h) = hits.first() else { continue };
            let c = h.id as usize;
            counts[c] += 1;
            sums[c * dim..(c + 1) * dim].iter_mut().zip(row(i)).for_each(|(s, x)| *s += x);
            fit.push((h.similarity, i));
        }
        // Empty lists restart at the sample rows farthest from their centroids.
        fit.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let mut misfits = fit.into_iter().map(|(_, i)| i);
        for c in 0..lists {
            let centre = &mut centroids[c * dim..(c + 1) * dim];
            match if counts[c] == 0 { misfits.next() } else { None } {
                Some(i) => centre.copy_from_slice(row(i)),
                None => centre.copy_from_slice(&sums[c * dim..(c + 1) * dim]),
            }
            normalize(centre);
        }
    }
    centroids
}

fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The row's codes (offset by 128, padded with 128 to `width`) and scale.
fn quantize(v: &[f32], width: usize) -> (Vec<u8>, f32) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 };
    let mut codes = vec![128u8; width];
    for (c, &x) in codes.iter_mut().zip(v) {
        *c = ((x / scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
    }
    (codes, scale)
}

/// A query as 8-bit values: `values` (padded with 0 to the code width), its scale, and
/// the sum of its values, which removes the codes' offset of 128 from their products.
struct QueryCodes {
    values: Vec<i8>,
    scale: f32,
    sum: i32,
}

impl QueryCodes {
    fn new(q: &[f32], width: usize) -> Self {
        let (codes, scale) = quantize(q, width);
        let values: Vec<i8> = codes.iter().map(|&c| (c as i32 - 128) as i8).collect();
        let sum = values.iter().map(|&v| v as i32).sum();
        QueryCodes { values, scale, sum }
    }

    /// The approximate similarity to a row from `code_dots`' product and the row's scale.
    #[inline]
    fn similarity(&self, code_dot: i32, row_scale: f32) -> f32 {
        (code_dot - 128 * self.sum) as f32 * row_scale * self.scale
    }

    /// Approximate similarities to every row of `list`, into `out`.
    fn score(&self, list: &List, width: usize, dots: &mut Vec<i32>, out: &mut Vec<f32>) {
        dots.clear();
        dots.resize(list.scales.len(), 0);
        code_dots(&self.values, &list.codes, width, dots);
        out.clear();
        out.extend(dots.iter().zip(&list.scales).map(|(&d, &s)| self.similarity(d, s)));
    }
}

/// `out[r]` = the dot product of `query` with code row `r` of `codes` (`width` bytes each).
fn code_dots(query: &[i8], codes: &[u8], width: usize, out: &mut [i32]) {
    debug_assert!(width.is_multiple_of(CODE_ALIGN) && query.len() == width && codes.len() == out.len() * width);
    match CodeKernel::get() {
        // SAFETY: `get` picks a kernel only when the CPU has its features, and every row
        // is `width` bytes, a multiple of 64 (checked above in debug builds, by
        // construction in `quantize`), so whole registers of 64 or 16 bytes are read.
        #[cfg(target_arch = "x86_64")]
        CodeKernel::Vnni => unsafe { code_dots_vnni(query, codes, width, out) },
        #[cfg(target_arch = "x86_64")]
        CodeKernel::Avx2 => unsafe { code_dots_avx2(query, codes, width, out) },
        _ => code_dots_portable(query, codes, width, out),
    }
}

/// Which 8-bit dot-product kernel this CPU runs: the fastest it has, or the one named by
/// `NEARSPAN_IVF_KERNEL` (`vnni`, `avx2`, `portable`) when it has that one, so that the
/// slower kernels can be measured on a machine with the fast one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKernel {
    Vnni,
    Avx2,
    Portable,
}

impl CodeKernel {
    pub fn name(self) -> &'static str {
        match self {
            CodeKernel::Vnni => "avx512-vnni",
            CodeKernel::Avx2 => "avx2",
            CodeKernel::Portable => "portable",
        }
    }

    /// The kernel in use (decided once per process).
    pub fn get() -> CodeKernel {
        static KERNEL: std::sync::OnceLock<CodeKernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let has = |k: CodeKernel| k.supported();
            let asked = match std::env::var("NEARSPAN_IVF_KERNEL").as_deref() {
                Ok("vnni") => Some(CodeKernel::Vnni),
                Ok("avx2") => Some(CodeKernel::Avx2),
                Ok("portable") => Some(CodeKernel::Portable),
                _ => None,
            };
            asked.filter(|&k| has(k)).unwrap_or_else(|| {
                [CodeKernel::Vnni, CodeKernel::Avx2].into_iter().find(|&k| has(k)).unwrap_or(CodeKernel::Portable)
            })
        })
    }

    fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            CodeKernel::Vnni => std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw"),
            #[cfg(target_arch = "x86_64")]
            CodeKernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            CodeKernel::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

fn code_dots_portable(query: &[i8], codes: &[u8], width: usize, out: &mut [i32]) {
    for (o, row) in out.iter_mut().zip(codes.chunks_exact(width)) {
        *o = row.iter().zip(query).map(|(&c, &x)| c as i32 * x as i32).sum();
    }
}

/// AVX2 without VNNI: 16 codes at a time widened to `i16`, multiplied by the query's
/// `i16` and summed in pairs into `i32` (`vpmaddwd`; 255 × 127 × 2 cannot overflow).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn code_dots_avx2(query: &[i8], codes: &[u8], width: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    let q: Vec<__m256i> =
        query.chunks_exact(16).map(|c| _mm256_cvtepi8_epi16(_mm_loadu_si128(c.as_ptr() as *const __m128i))).collect();
    for (o, row) in out.iter_mut().zip(codes.chunks_exact(width)) {
        let mut acc = _mm256_setzero_si256();
        for (c, qv) in row.chunks_exact(16).zip(&q) {
            let x = _mm256_cvtepu8_epi16(_mm_loadu_si128(c.as_ptr() as *const __m128i));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, *qv));
        }
        let half = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
        let pairs = _mm_add_epi32(half, _mm_shuffle_epi32::<0b01_00_11_10>(half));
        *o = _mm_cvtsi128_si32(_mm_add_epi32(pairs, _mm_shuffle_epi32::<0b10_11_00_01>(pairs)));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn code_dots_vnni(query: &[i8], codes: &[u8], width: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    let chunks = width / CODE_ALIGN;
    let q = query.as_ptr();
    let rows = out.len();
    let mut r = 0;
    // Four rows at a time: four independent accumulators keep the VNNI unit busy.
    while r + 4 <= rows {
        let base = codes.as_ptr().add(r * width);
        let (mut a0, mut a1, mut a2, mut a3) = (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
        for c in 0..chunks {
            let qv = _mm512_loadu_si512(q.add(c * CODE_ALIGN) as *const _);
            let at = |row: usize| _mm512_loadu_si512(base.add(row * width + c * CODE_ALIGN) as *const _);
            a0 = _mm512_dpbusd_epi32(a0, at(0), qv);
            a1 = _mm512_dpbusd_epi32(a1, at(1), qv);
            a2 = _mm512_dpbusd_epi32(a2, at(2), qv);
            a3 = _mm512_dpbusd_epi32(a3, at(3), qv);
        }
        out[r] = _mm512_reduce_add_epi32(a0);
        out[r + 1] = _mm512_reduce_add_epi32(a1);
        out[r + 2] = _mm512_reduce_add_epi32(a2);
        out[r + 3] = _mm512_reduce_add_epi32(a3);
        r += 4;
    }
    while r < rows {
        let base = codes.as_ptr().add(r * width);
        let mut a = _mm512_setzero_si512();
        for c in 0..chunks {
            let qv = _mm512_loadu_si512(q.add(c * CODE_ALIGN) as *const _);
            a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(base.add(c * CODE_ALIGN) as *const _), qv);
        }
        out[r] = _mm512_reduce_add_epi32(a);
        r += 1;
    }
}

/// f32 dot product in 16 independent lanes (vectorized by the compiler).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A small seeded generator (SplitMix64) for the sample and the k-means++ draws.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_floats;
    use super::*;

    /// `clusters` random unit centres, `per` rows each: centre + uniform noise, normalized,
    /// rows of one cluster not adjacent (row i belongs to cluster i % clusters). The
    /// index rows, then query rows: the last `queries` of each cluster's rows.
    fn clustered_with_queries(dim: usize, clusters: usize, per: usize, noise: f32, queries: usize) -> (Vectors, Vectors) {
        let all = clustered(dim, clusters, per + queries, noise, 11);
        let split = clusters * per * dim;
        (Vectors::from_vec(dim, all.as_slice()[..split].to_vec()), Vectors::from_vec(dim, all.as_slice()[split..].to_vec()))
    }

    fn clustered(dim: usize, clusters: usize, per: usize, noise: f32, seed: u64) -> Vectors {
        let mut r = test_floats(seed);
        let mut centres: Vec<f32> = (0..clusters * dim).map(|_| r()).collect();
        centres.chunks_exact_mut(dim).for_each(normalize);
        let mut data = Vec::with_capacity(clusters * per * dim);
        for i in 0..clusters * per {
            let c = &centres[(i % clusters) * dim..][..dim];
            let mut v: Vec<f32> = c.iter().map(|x| x + noise * r()).collect();
            normalize(&mut v);
            data.extend(v);
        }
        Vectors::from_vec(dim, data)
    }

    fn params() -> IvfParams {
        IvfParams { lists: 16, nprobe: 16, ..IvfParams::default() }
    }

    #[test]
    fn every_code_dot_kernel_agrees() {
        let width = 128;
        let mut r = test_floats(7);
        let random_query: Vec<i8> = (0..width).map(|_| (r() * 254.0) as i8).collect();
        let random_codes: Vec<u8> = (0..width * 7).map(|_| ((r() + 0.5) * 255.0) as u8).collect();
        // Random values, and the extremes: every code 255 against 127 and against -128.
        let cases = [(random_query, random_codes), (vec![127; width], vec![255; width * 3]), (vec![-128; width], vec![255; width * 3])];
        for (query, codes) in &cases {
            let want: Vec<i32> =
                codes.chunks_exact(width).map(|row| row.iter().zip(query).map(|(&c, &q)| c as i32 * q as i32).sum()).collect();
            let mut got = vec![0i32; want.len()];
            code_dots(query, codes, width, &mut got);
            assert_eq!(got, want, "the dispatched kernel");
            code_dots_portable(query, codes, width, &mut got);
            assert_eq!(got, want, "portable");
            #[cfg(target_arch = "x86_64")]
            {
                if CodeKernel::Avx2.supported() {
                    got.fill(0);
                    // SAFETY: the CPU has AVX2; rows are `width` (a multiple of 64) bytes.
                    unsafe { code_dots_avx2(query, codes, width, &mut got) };
                    assert_eq!(got, want, "avx2");
                }
                if CodeKernel::Vnni.supported() {
                    got.fill(0);
                    // SAFETY: as above, for AVX512-VNNI.
                    unsafe { code_dots_vnni(query, codes, width, &mut got) };
                    assert_eq!(got, want, "avx512-vnni");
                }
            }
        }
    }

    #[test]
    fn codes_round_trip_within_half_a_step() {
        let mut r = test_floats(3);
        let v: Vec<f32> = (0..100).map(|_| r()).collect();
        let (codes, scale) = quantize(&v, 128);
        assert_eq!(codes.len(), 128);
        assert!(codes[100..].iter().all(|&c| c == 128), "padding must read as zero");
        for (x, &c) in v.iter().zip(&codes) {
            let back = (c as i32 - 128) as f32 * scale;
            assert!((x - back).abs() <= scale * 0.5 + 1e-6, "{x} came back as {back}");
        }
    }

    #[test]
    fn approximate_similarities_are_close_to_the_f32_ones() {
        let (data, queries) = clustered_with_queries(100, 4, 50, 0.6, 2);
        let ivf = Ivf::new(100, IvfParams::default());
        let mut list = List::default();
        for v in data.as_slice().chunks_exact(100) {
            let (codes, scale) = quantize(v, ivf.width);
            list.codes.extend(codes);
            list.scales.push(scale);
        }
        let (mut dots, mut got) = (Vec::new(), Vec::new());
        // Queries as drawn, and shifted to all-positive values (whose 8-bit values have a
        // large sum, so a wrong offset correction would show).
        let shifted = queries.as_slice().chunks_exact(100).map(|q| {
            let mut v: Vec<f32> = q.iter().map(|x| x.abs() + 0.05).collect();
            normalize(&mut v);
            v
        });
        for q in queries.as_slice().chunks_exact(100).map(|q| q.to_vec()).chain(shifted) {
            QueryCodes::new(&q, ivf.width).score(&list, ivf.width, &mut dots, &mut got);
            for (i, g) in got.iter().enumerate() {
                let want = dot(&q, data.row(i));
                assert!((g - want).abs() < 0.005, "row {i}: {g} against {want}");
            }
        }
    }

    #[test]
    fn probing_every_list_finds_the_exact_neighbours() {
        let (data, queries) = clustered_with_queries(48, 20, 300, 0.6, 3);
        let ivf = Ivf::build(&data, params()).unwrap();
        assert!(ivf.is_trained());
        assert_eq!(ivf.lists(), 16);
        assert_eq!(ivf.list_sizes().iter().sum::<usize>(), data.len());
        let truth = exact_search(data.as_slice(), 48, queries.as_slice(), 5);
        for (i, want) in truth.iter().enumerate() {
            let got = ivf.search(&data, queries.row(i), 5);
            let ids = |v: &[Neighbor]| v.iter().map(|n| n.id).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(want), "query {i}");
            for (g, w) in got.iter().zip(want) {
                assert!((g.similarity - w.similarity).abs() < 1e-5, "similarities are the f32 ones");
            }
        }
    }

    #[test]
    fn one_probe_finds_most_neighbours_of_clustered_rows() {
        let (data, queries) = clustered_with_queries(48, 16, 400, 0.3, 10);
        let mut ivf = Ivf::build(&data, params()).unwrap();
        ivf.set_nprobe(1);
        let truth = exact_search(data.as_slice(), 48, queries.as_slice(), 1);
        let found = (0..queries.len()).filter(|&i| ivf.search(&data, queries.row(i), 1)[0].id == truth[i][0].id).count();
        assert!(found as f64 >= 0.95 * queries.len() as f64, "recall@1 {found}/{}", queries.len());
        // The probe must matter: a list holds about one cluster, not everything.
        let largest = *ivf.list_sizes().iter().max().unwrap();
        assert!(largest < data.len() / 4, "largest list {largest} of {}", data.len());
    }

    #[test]
    fn rows_inserted_one_by_one_are_clustered_once_there_are_enough() {
        let data = clustered(32, 10, 500, 0.6, 6);
        let p = IvfParams { lists: 8, nprobe: 8, ..IvfParams::default() };
        let mut ivf = Ivf::new(32, p);
        let min = p.min_train_rows();
        for (i, v) in data.as_slice().chunks_exact(32).enumerate() {
            ivf.insert(i as u32, v).unwrap();
            assert_eq!(ivf.is_trained(), i + 1 >= min, "after {} rows", i + 1);
        }
        assert_eq!(ivf.lists(), 8);
        assert_eq!(ivf.len(), data.len());
        let mut ids: Vec<u32> = ivf.lists.iter().flat_map(|l| l.ids.iter().copied()).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..data.len() as u32).collect::<Vec<_>>(), "every row in exactly one list");
        let q = data.row(123);
        assert_eq!(ivf.search(&data, q, 1)[0].id, 123);
    }

    #[test]
    fn lists_are_made_again_as_rows_grow_fourfold() {
        let data = clustered(8, 30, 600, 0.5, 9);
        let mut ivf = Ivf::new(8, IvfParams::default());
        let min = IvfParams::default().min_train_rows();
        let mut lists_seen = Vec::new();
        for (i, v) in data.as_slice().chunks_exact(8).enumerate() {
            ivf.insert(i as u32, v).unwrap();
            if i + 1 == min || i + 1 == 4 * min - 1 || i + 1 == 4 * min {
                lists_seen.push((i + 1, ivf.lists(), ivf.clustered_at));
            }
        }
        // √4096 = 64 lists at the threshold, unchanged until the rows are 4 times as
        // many, then √16384 = 128.
        assert_eq!(lists_seen, vec![(min, 64, min), (4 * min - 1, 64, min), (4 * min, 128, 4 * min)]);
        assert_eq!(ivf.list_sizes().iter().sum::<usize>(), data.len());
        assert_eq!(ivf.search(&data, data.row(5000), 1)[0].id, 5000);
    }

    #[test]
    fn small_untrained_index_searches_everything() {
        let data = clustered(16, 4, 25, 0.6, 8);
        let ivf = Ivf::build(&data, IvfParams { nprobe: 1, ..IvfParams::default() }).unwrap();
        assert!(!ivf.is_trained());
        let want = exact_search(data.as_slice(), 16, data.row(42), 3);
        let got = ivf.search(&data, data.row(42), 3);
        assert_eq!(got.iter().map(|n| n.id).collect::<Vec<_>>(), want[0].iter().map(|n| n.id).collect::<Vec<_>>());
        assert!(ivf.search(&data, data.row(0), 0).is_empty());
        assert!(Ivf::new(16, IvfParams::default()).search(&data, data.row(0), 3).is_empty());
    }

    #[test]
    fn bad_inserts_are_errors() {
        let mut ivf = Ivf::new(8, IvfParams::default());
        assert!(matches!(ivf.insert(0, &[0.5; 7]), Err(IndexError::DimensionMismatch { expected: 8, found: 7, .. })));
        assert!(matches!(ivf.insert(3, &[0.5; 8]), Err(IndexError::Backend { .. })), "ids must be dense");
        ivf.insert(0, &[0.5; 8]).unwrap();
        assert_eq!(ivf.len(), 1);
    }
}
