//! Search backends behind one trait. [`SpanIndex`](crate::SpanIndex) is the API to use;
//! this module is public for benchmarks (`examples/ann_compare.rs`) and for callers that
//! want a bare vector index without payloads.
//!
//! Every backend searches rows of a [`Vectors`] matrix that the caller owns: ids are row
//! numbers, assigned densely from 0. The exact backend reads the matrix directly; the HNSW
//! backends keep their own copy inside their graph and ignore it.

use std::collections::BinaryHeap;

use crate::{BackendKind, HnswParams, IndexError, Neighbor};

pub mod exact;
pub mod ivf;
pub(crate) mod halves;
pub(crate) mod tiled;
#[cfg(feature = "hnsw-rs")]
pub mod hnsw_rs;
#[cfg(feature = "usearch")]
pub mod usearch;

pub use exact::Exact;
pub use ivf::{CodeKernel, Ivf, IvfParams};
#[cfg(feature = "hnsw-rs")]
pub use self::hnsw_rs::HnswRsBackend;
#[cfg(feature = "usearch")]
pub use self::usearch::UsearchBackend;

/// A nearest-neighbour structure over the rows of a [`Vectors`] matrix.
pub trait AnnBackend: Send + Sync {
    /// The concrete kind (never `Auto`).
    fn kind(&self) -> BackendKind;
    /// Index row `id` (ids must arrive densely: 0, 1, 2, ...).
    fn insert(&mut self, id: u32, v: &[f32]) -> Result<(), IndexError>;
    /// Index rows `first_id..first_id + rows.len() / dim`; HNSW backends insert in parallel.
    fn insert_batch(&mut self, first_id: u32, rows: &[f32], dim: usize) -> Result<(), IndexError> {
        for (i, v) in rows.chunks_exact(dim).enumerate() {
            self.insert(first_id + i as u32, v)?;
        }
        Ok(())
    }
    /// The `k` rows most similar to `q`, best first.
    fn search(&self, data: &Vectors, q: &[f32], k: usize) -> Vec<Neighbor>;
    /// [`search`](AnnBackend::search) for each row of `queries` (`n * dim`, row-major).
    fn search_batch(&self, data: &Vectors, queries: &[f32], k: usize) -> Vec<Vec<Neighbor>> {
        use rayon::prelude::*;
        queries.par_chunks_exact(data.dim()).map(|q| self.search(data, q, k)).collect()
    }
    /// `ef` from the paper: the candidate list size while searching. No-op for `Exact`.
    fn set_ef_search(&mut self, _ef: usize) {}
    /// Approximate heap bytes held by the backend itself (graph plus its own vector copy),
    /// not counting the caller's [`Vectors`].
    fn memory_bytes(&self) -> usize;
    /// The serialized graph, for backends that can store it (USearch); `None` means
    /// "rebuild from the vectors on open".
    fn graph_bytes(&self) -> Result<Option<Vec<u8>>, IndexError> {
        Ok(None)
    }
}

/// A row-major matrix of `f32` vectors, stored contiguously.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vectors {
    dim: usize,
    data: Vec<f32>,
}

impl Vectors {
    pub fn new(dim: usize) -> Self {
        assert!(dim > 0, "vector dimension must be positive");
        Vectors { dim, data: Vec::new() }
    }
    /// Wrap `data` (`n * dim` floats, row-major).
    pub fn from_vec(dim: usize, data: Vec<f32>) -> Self {
        assert!(dim > 0 && data.len() % dim == 0, "data length {} is not a multiple of dim {dim}", data.len());
        Vectors { dim, data }
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }
    pub fn push(&mut self, v: &[f32]) {
        assert_eq!(v.len(), self.dim);
        self.data.extend_from_slice(v);
    }
    pub fn memory_bytes(&self) -> usize {
        self.data.capacity() * 4
    }
}

/// Create an empty backend of a concrete kind (`Auto` must be resolved first).
pub fn new_backend(
    kind: BackendKind,
    dim: usize,
    params: &HnswParams,
    capacity: usize,
) -> Result<Box<dyn AnnBackend>, BackendKind> {
    let _ = (dim, params, capacity);
    match kind {
        BackendKind::Exact => Ok(Box::new(Exact::default())),
        BackendKind::Ivf => Ok(Box::new(Ivf::new(dim, IvfParams::default()))),
        #[cfg(feature = "hnsw-rs")]
        BackendKind::HnswRs => Ok(Box::new(HnswRsBackend::new(params, capacity))),
        #[cfg(feature = "usearch")]
        BackendKind::Usearch => UsearchBackend::new(dim, params, capacity)
            .map(|b| Box::new(b) as Box<dyn AnnBackend>)
            .map_err(|_| BackendKind::Usearch),
        other => Err(other),
    }
}

/// The HNSW backend `Auto` picks above the exact threshold, if any is compiled in.
/// USearch wins when both are: it builds faster, searches faster at equal recall, uses
/// less memory and stores its graph in the file (see `examples/ann_compare.rs`).
pub fn preferred_hnsw() -> Option<BackendKind> {
    if cfg!(feature = "usearch") {
        Some(BackendKind::Usearch)
    } else if cfg!(feature = "hnsw-rs") {
        Some(BackendKind::HnswRs)
    } else {
        None
    }
}

/// Prefetches every cache line of `data` (a hint: no effect on results; nothing on
/// other architectures).
pub(crate) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (p, bytes) = (data.as_ptr() as *const i8, std::mem::size_of_val(data));
        for offset in (0..bytes).step_by(64) {
            // SAFETY: SSE is part of x86_64; the address lies inside `data`, and a
            // prefetch never faults anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Below this many multiply-adds an exact search runs on the calling thread.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Runs `run` on every part of a search (in parallel when there are several) and merges
/// the parts' per-query top-k lists. `parts` is never empty: callers pass one part for
/// a serial search.
pub(crate) fn run_parts<P: Sync>(parts: &[P], run: impl Fn(&P) -> Vec<TopK> + Sync) -> Vec<TopK> {
    use rayon::prelude::*;
    match parts {
        [one] => run(one),
        _ => parts
            .par_iter()
            .map(&run)
            .reduce_with(|mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.merge(y);
                }
                a
            })
            .unwrap_or_default(),
    }
}

/// Entry of a bounded top-k heap; ordered so that the heap's maximum is the *worst* kept hit
/// (lowest similarity, then highest id).
#[derive(Clone, Copy)]
struct Worst(f32, u32);
impl PartialEq for Worst {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}

/// A bounded heap keeping the `k` best `(similarity, id)` pairs.
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
    /// Similarity of the worst kept hit once the heap is full (else -inf): a cheap pre-check.
    floor: f32,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK { k, heap: BinaryHeap::with_capacity(k + 1), floor: f32::NEG_INFINITY }
    }
    #[inline]
    pub(crate) fn push(&mut self, sim: f32, id: u32) {
        if sim < self.floor || self.k == 0 {
            return;
        }
        let e = Worst(sim, id);
        if self.heap.len() < self.k {
            self.heap.push(e);
        } else if let Some(mut top) = self.heap.peek_mut() {
            if e < *top {
                *top = e;
            } else {
                return;
            }
        }
        if self.heap.len() == self.k {
            self.floor = self.heap.peek().map_or(f32::NEG_INFINITY, |w| w.0);
        }
    }
    pub(crate) fn merge(&mut self, other: TopK) {
        for w in other.heap {
            self.push(w.0, w.1);
        }
    }
    pub(crate) fn into_sorted(self) -> Vec<Neighbor> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|w| Neighbor { id: w.1, similarity: w.0 })
            .collect()
    }
}

/// Sort hits best first (ties by id) and keep `k`.
#[cfg(any(feature = "hnsw-rs", feature = "usearch"))]
pub(crate) fn sort_hits(mut v: Vec<Neighbor>, k: usize) -> Vec<Neighbor> {
    v.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then(a.id.cmp(&b.id)));
    v.truncate(k);
    v
}

/// Seeded uniform floats in [-0.5, 0.5) (xorshift) for the backends' tests.
#[cfg(test)]
pub(crate) fn test_floats(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_best_sorted() {
        let mut t = TopK::new(3);
        for (i, s) in [0.1f32, 0.9, 0.5, 0.7, 0.3, 0.9].iter().enumerate() {
            t.push(*s, i as u32);
        }
        let ids: Vec<u32> = t.into_sorted().iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![1, 5, 3]);
    }

    #[test]
    fn topk_zero_and_merge() {
        let mut t = TopK::new(0);
        t.push(1.0, 0);
        assert!(t.into_sorted().is_empty());
        let mut a = TopK::new(2);
        a.push(0.2, 0);
        let mut b = TopK::new(2);
        b.push(0.8, 1);
        b.push(0.5, 2);
        a.merge(b);
        let ids: Vec<u32> = a.into_sorted().iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![1, 2]);
    }
}
