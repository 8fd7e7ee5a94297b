//! HNSW from [USearch](https://github.com/unum-cloud/usearch) (C++, built by `build.rs`).
//!
//! Metric: inner product on normalized `f32` vectors (USearch's `ip` distance is
//! `1 - dot`). The graph (with USearch's own copy of the vectors) is stored in the index
//! file via `save_to_buffer`, so opening does not rebuild it. Capacity is reserved ahead of
//! inserts, doubling, because USearch refuses `add` beyond its reserved capacity.

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use super::{sort_hits, AnnBackend, Vectors};
use crate::{BackendKind, GraphPrecision, HnswParams, IndexError, Neighbor};

pub struct UsearchBackend {
    index: Index,
}

fn err(e: impl std::fmt::Display) -> IndexError {
    IndexError::Backend { backend: BackendKind::Usearch, message: e.to_string() }
}

/// Thread slots to reserve: USearch keeps per-thread scratch space, one per concurrent call.
fn threads() -> usize {
    rayon::current_num_threads().max(std::thread::available_parallelism().map_or(1, |n| n.get())) + 1
}

impl UsearchBackend {
    pub fn new(dim: usize, params: &HnswParams, capacity: usize) -> Result<Self, IndexError> {
        let options = IndexOptions {
            dimensions: dim,
            metric: MetricKind::IP,
            quantization: match params.graph_precision {
                GraphPrecision::F32 => ScalarKind::F32,
                GraphPrecision::Bf16 => ScalarKind::BF16,
            },
            connectivity: params.m,
            expansion_add: params.ef_construction,
            expansion_search: params.ef_search,
            multi: false,
        };
        let index = Index::new(&options).map_err(err)?;
        index.reserve_capacity_and_threads(capacity.max(1024), threads()).map_err(err)?;
        Ok(UsearchBackend { index })
    }

    /// Restore a graph saved by [`AnnBackend::graph_bytes`].
    pub fn from_graph_bytes(bytes: &[u8], params: &HnswParams) -> Result<Self, IndexError> {
        let index = Index::restore_from_buffer(bytes).map_err(err)?;
        index.change_expansion_search(params.ef_search);
        index.reserve_capacity_and_threads(index.size().max(1024), threads()).map_err(err)?;
        Ok(UsearchBackend { index })
    }

    pub fn len(&self) -> usize {
        self.index.size()
    }

    fn ensure_capacity(&self, extra: usize) -> Result<(), IndexError> {
        let need = self.index.size() + extra;
        if need > self.index.capacity() {
            let cap = need.max(self.index.capacity() * 2);
            self.index.reserve_capacity_and_threads(cap, threads()).map_err(err)?;
        }
        Ok(())
    }
}

impl AnnBackend for UsearchBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Usearch
    }
    fn insert(&mut self, id: u32, v: &[f32]) -> Result<(), IndexError> {
        self.ensure_capacity(1)?;
        self.index.add(id as u64, v).map_err(err)
    }
    fn insert_batch(&mut self, first_id: u32, rows: &[f32], dim: usize) -> Result<(), IndexError> {
        use rayon::prelude::*;
        self.ensure_capacity(rows.len() / dim)?;
        let index = &self.index;
        rows.par_chunks_exact(dim)
            .enumerate()
            .try_for_each(|(i, v)| index.add(first_id as u64 + i as u64, v).map_err(err))
    }
    fn search(&self, _data: &Vectors, q: &[f32], k: usize) -> Vec<Neighbor> {
        if k == 0 || self.index.size() == 0 {
            return Vec::new();
        }
        // Errors here mean a wrong query length, which SpanIndex already checked.
        let m = self.index.search(q, k).expect("usearch search failed");
        let hits = m
            .keys
            .iter()
            .zip(&m.distances)
            .map(|(&key, &d)| Neighbor { id: key as u32, similarity: 1.0 - d })
            .collect();
        sort_hits(hits, k)
    }
    fn set_ef_search(&mut self, ef: usize) {
        // `&mut self`: no search can run concurrently with this change.
        self.index.change_expansion_search(ef.max(1));
    }
    fn memory_bytes(&self) -> usize {
        self.index.memory_usage()
    }
    fn graph_bytes(&self) -> Result<Option<Vec<u8>>, IndexError> {
        let mut buf = vec![0u8; self.index.serialized_length()];
        self.index.save_to_buffer(&mut buf).map_err(err)?;
        Ok(Some(buf))
    }
}
