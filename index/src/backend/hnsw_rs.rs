//! HNSW from the [`hnsw_rs`](https://docs.rs/hnsw_rs) crate.
//!
//! Distance is `1 - dot` with our own AVX2 dot product ([`DotDistance`]): the crate's
//! `DistDot` uses a scalar loop without the `simdeez_f` feature and asserts
//! `1 - dot >= 0`, which rounding breaks for a vector and itself.
//!
//! `hnsw_rs` can only dump its graph to a pair of files, not to a buffer, so the index
//! file does not store this graph: [`SpanIndex::open`](crate::SpanIndex::open) rebuilds
//! it from the stored vectors with a parallel insert (open time is measured in
//! `examples/ann_compare.rs`).

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use super::{exact::dot_product, sort_hits, AnnBackend, Vectors};
use crate::{BackendKind, HnswParams, IndexError, Neighbor};

/// `1 - <a, b>`, clamped at 0, for L2-normalized vectors.
#[derive(Debug, Clone, Copy, Default)]
pub struct DotDistance;

impl Distance<f32> for DotDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot_product(a, b)).max(0.0)
    }
}

/// Largest number of layers `hnsw_rs` supports.
const MAX_LAYERS: usize = 16;

pub struct HnswRsBackend {
    graph: Hnsw<'static, f32, DotDistance>,
    ef_search: usize,
    m: usize,
    len: usize,
    dim: usize,
}

impl HnswRsBackend {
    pub fn new(params: &HnswParams, capacity: usize) -> Self {
        // hnsw_rs stores neighbour counts in a u8 and exits the process above 256.
        let m = params.m.clamp(2, 128);
        let graph = Hnsw::new(m, capacity.max(1024), MAX_LAYERS, params.ef_construction.max(m), DotDistance);
        HnswRsBackend { graph, ef_search: params.ef_search.max(1), m, len: 0, dim: 0 }
    }
}

impl AnnBackend for HnswRsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::HnswRs
    }
    fn insert(&mut self, id: u32, v: &[f32]) -> Result<(), IndexError> {
        self.graph.insert_slice((v, id as usize));
        self.len += 1;
        self.dim = v.len();
        Ok(())
    }
    fn insert_batch(&mut self, first_id: u32, rows: &[f32], dim: usize) -> Result<(), IndexError> {
        let items: Vec<(&[f32], usize)> =
            rows.chunks_exact(dim).enumerate().map(|(i, v)| (v, first_id as usize + i)).collect();
        self.graph.parallel_insert_slice(&items);
        self.len += items.len();
        self.dim = dim;
        Ok(())
    }
    fn search(&self, _data: &Vectors, q: &[f32], k: usize) -> Vec<Neighbor> {
        if self.len == 0 || k == 0 {
            return Vec::new();
        }
        let hits = self
            .graph
            .search(q, k, self.ef_search.max(k))
            .into_iter()
            .map(|n| Neighbor { id: n.d_id as u32, similarity: 1.0 - n.distance })
            .collect();
        sort_hits(hits, k)
    }
    fn set_ef_search(&mut self, ef: usize) {
        self.ef_search = ef.max(1);
    }
    /// Estimate: per point, its vector, a `Point` header and `Arc`, and per kept edge a
    /// 16-byte `PointWithOrder` in an `Arc` (+16) plus an 8-byte pointer; layer 0 keeps
    /// up to `2M` edges, upper layers (1/M of points) up to `M`.
    fn memory_bytes(&self) -> usize {
        let per_point = self.dim * 4 + 96 + (2 * self.m + self.m / 2) * (16 + 16 + 8);
        self.len * per_point
    }
}
