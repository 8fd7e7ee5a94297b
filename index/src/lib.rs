//! `nearspan-index`: a nearest-neighbour index of L2-normalized `f32` vectors
//! with payloads, for the few-shot span labeler.
//!
//! A [`SpanIndex`] holds two collections that share one encoder:
//!
//! * **span vectors**, one per labeled span, with a [`SpanRecord`] payload
//!   (label, example, character offsets, span text), searched by
//!   [`SpanIndex::search_spans`];
//! * **utterance vectors**, one per example, with an [`ExampleRecord`] payload
//!   (text and optional intent), searched by [`SpanIndex::search_utterances`].
//!
//! Vectors must be L2-normalized, so cosine similarity is the dot product and
//! [`Neighbor::similarity`] lies in `[-1, 1]`.
//!
//! Search runs on one of four backends ([`BackendKind`]): brute force
//! (`Exact`, always available), inverted lists of 8-bit codes from k-means
//! (`Ivf`, always available, [`backend::ivf`]), and two HNSW graphs (Malkov &
//! Yashunin 2016, <https://arxiv.org/abs/1603.09320>): `hnsw_rs` (feature
//! `hnsw-rs`) and USearch (feature `usearch`). `Auto` uses exact search below
//! [`AUTO_EXACT_THRESHOLD`] vectors and the preferred HNSW backend above it.
//! Stored vectors are the source of truth; a graph or list set is a cache that
//! can always be rebuilt from them.
//!
//! # On-disk format (little endian)
//!
//! ```text
//! 0   8  magic "NSPANIDX"     8  2  format_version (2)   10  2  reserved (0)
//! 12  4  dim                  16 4  n_spans              20  4  n_labels
//! 24 32  encoder fingerprint: sha256(model id, revision, pooling, max_width)
//! 56 ..  body: u64-length-prefixed sections: metadata (bincode 2 + serde: encoder info,
//!        backend, HNSW params incl. graph precision since v2, labels, examples, spans),
//!        span vectors (raw f32),
//!        utterance vectors (raw f32), span graph, utterance graph (USearch only)
//! end-4  crc32 of everything before it
//! ```
//! Readers accept versions [`OLDEST_SUPPORTED_VERSION`]`..=`[`CURRENT_VERSION`].
//! [`SpanIndex::save`] is atomic (temp file in the same directory, fsync, rename, fsync
//! of the directory). `tests/data/index_v1.nsi` and `index_v2.nsi` are committed files of each
//! version that must stay readable.
//!
//! ```
//! use nearspan_index::*;
//! let enc = EncoderInfo { model_id: "toy".into(), revision: "0".into(),
//!                         pooling: "mean".into(), max_width: 4, dim: 2 };
//! let mut index = SpanIndex::new(enc, BackendKind::Exact, HnswParams::default()).unwrap();
//! let span = NewSpan { label: "city", start: 8, end: 13, text: "paris" };
//! let ex = index.add_example("fly to paris", Some("book_flight"), &[1.0, 0.0],
//!                            &[(span, &[0.6, 0.8][..])]).unwrap();
//! let hits = index.search_spans(&[0.6, 0.8], 1);
//! assert_eq!(hits[0].id, 0);
//! assert_eq!(index.label(index.span(hits[0].id).label), "city");
//! assert_eq!(index.example(ex).intent.as_deref(), Some("book_flight"));
//! ```

pub mod backend;
mod error;
mod format;
mod index;

pub use error::IndexError;
pub use format::{file_format_version, CURRENT_VERSION, OLDEST_SUPPORTED_VERSION};
pub use index::{IndexSummary, SpanIndex, AUTO_EXACT_THRESHOLD};

use serde::{Deserialize, Serialize};

/// Position of a span vector in the index (its row), as returned in [`Neighbor::id`]
/// by [`SpanIndex::search_spans`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SpanId(pub u32);

/// Position of an example (utterance) in the index, as returned in [`Neighbor::id`]
/// by [`SpanIndex::search_utterances`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExampleId(pub u32);

/// An interned label (`"O"`, the non-slot label, is an ordinary label here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LabelId(pub u32);

impl From<u32> for SpanId {
    fn from(v: u32) -> Self {
        SpanId(v)
    }
}
impl From<u32> for ExampleId {
    fn from(v: u32) -> Self {
        ExampleId(v)
    }
}

/// One search hit. Results are sorted by `similarity`, highest first; ties by `id`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbor {
    /// A [`SpanId`] or [`ExampleId`] value, depending on the search.
    pub id: u32,
    /// Cosine similarity (dot product of normalized vectors).
    pub similarity: f32,
}

/// Which search structure to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackendKind {
    /// Brute force: blocked dot products over one contiguous matrix, rayon-parallel. Always exact.
    Exact,
    /// HNSW graph from the `hnsw_rs` crate (feature `hnsw-rs`). Graph rebuilt from vectors on open.
    HnswRs,
    /// HNSW graph from USearch (feature `usearch`). Graph stored in the index file.
    Usearch,
    /// `Exact` below [`AUTO_EXACT_THRESHOLD`] vectors, else the preferred available HNSW backend.
    /// Re-resolved as the index grows and when it is opened.
    Auto,
    /// Inverted lists of 8-bit codes from k-means, re-scored in f32 ([`backend::ivf`]).
    /// Always built in; the lists are stored in the file (format v3). Last, so that the
    /// variants before it keep their numbers in existing index files.
    Ivf,
}

impl BackendKind {
    /// Whether this build can run the backend (`Exact` and `Auto` always can).
    pub fn is_available(self) -> bool {
        match self {
            BackendKind::Exact | BackendKind::Auto | BackendKind::Ivf => true,
            BackendKind::HnswRs => cfg!(feature = "hnsw-rs"),
            BackendKind::Usearch => cfg!(feature = "usearch"),
        }
    }

    /// The cargo feature that provides this backend, if any.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            BackendKind::HnswRs => Some("hnsw-rs"),
            BackendKind::Usearch => Some("usearch"),
            _ => None,
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Exact => "exact",
            BackendKind::HnswRs => "hnsw_rs",
            BackendKind::Usearch => "usearch",
            BackendKind::Auto => "auto",
            BackendKind::Ivf => "ivf",
        })
    }
}

/// HNSW parameters, named as in the paper (Malkov & Yashunin, <https://arxiv.org/abs/1603.09320>).
/// Ignored by the exact backend (but stored, so a later switch to HNSW uses them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// `M`: links per node on layers above 0 (layer 0 keeps `2 * M`). Memory grows linearly with it.
    pub m: usize,
    /// `efConstruction`: size of the dynamic candidate list while inserting.
    pub ef_construction: usize,
    /// `ef`: size of the dynamic candidate list while searching (at least `k` is used).
    /// Change it after building with [`SpanIndex::set_ef_search`].
    pub ef_search: usize,
    /// Recorded for reproducibility. Both libraries currently draw node levels from their
    /// own fixed-seed generators, so sequential builds are reproducible whatever this is;
    /// parallel builds (graph rebuilt on open, Auto upgrade) are not bit-reproducible.
    pub seed: u64,
    /// Precision of the graph's own copy of the vectors (USearch only; the stored vectors
    /// and exact search stay f32). Bf16 halves the graph's memory and, since HNSW search
    /// is bound by fetching vectors from memory, about halves search time, at about 1e-3
    /// error in each similarity (BENCHMARKS.md: recall and F1 with each).
    pub graph_precision: GraphPrecision,
}

/// See [`HnswParams::graph_precision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphPrecision {
    #[default]
    F32,
    Bf16,
}

impl std::fmt::Display for GraphPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GraphPrecision::F32 => "f32",
            GraphPrecision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for GraphPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(GraphPrecision::F32),
            "bf16" => Ok(GraphPrecision::Bf16),
            other => Err(format!("unknown graph precision {other:?}; expected f32 or bf16")),
        }
    }
}

/// Whether one factored span search may split its work across rayon's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchParallelism {
    /// Split a large search across the pool: for one query at a time.
    Split,
    /// Run on the calling thread: for a caller that already runs searches side by side
    /// (one per utterance of a batch), where splitting would only add work, since each
    /// part fills its own top-k heaps from empty and they are merged after.
    Serial,
}

/// Precision of the span halves kept in memory for the factored two-stage search
/// ([`SpanIndex::set_halves_precision`]); never stored in the file. Bf16 halves their
/// memory and the bytes a search reads (a little faster), at about 1e-3 error in each
/// similarity (the query side and the sums stay f32; BENCHMARKS.md gives the speed and
/// the accuracy cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HalvesPrecision {
    #[default]
    F32,
    Bf16,
}

impl std::fmt::Display for HalvesPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HalvesPrecision::F32 => "f32",
            HalvesPrecision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for HalvesPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(HalvesPrecision::F32),
            "bf16" => Ok(HalvesPrecision::Bf16),
            other => Err(format!("unknown halves precision {other:?}; expected f32 or bf16")),
        }
    }
}

impl Default for HnswParams {
    /// `M = 16, efConstruction = 128, ef = 64`: recall@1 >= 0.98 on clustered
    /// 384-dim vectors up to 10^5 (see `examples/ann_compare.rs`).
    fn default() -> Self {
        HnswParams { m: 16, ef_construction: 128, ef_search: 64, seed: 0x5eed, graph_precision: GraphPrecision::F32 }
    }
}

/// Identifies the encoder whose vectors the index holds. [`SpanIndex::open`] refuses an
/// index built by another encoder: its vectors would load fine but give wrong answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderInfo {
    /// Human-readable model id, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub model_id: String,
    /// Weights revision, e.g. the sha256 of the safetensors file.
    pub revision: String,
    /// Span pooling, e.g. `mean`.
    pub pooling: String,
    /// Maximum span width, in tokens.
    pub max_width: u32,
    /// Vector dimension.
    pub dim: u32,
}

impl EncoderInfo {
    /// `sha256(model_id, revision, pooling, max_width)`, each string length-prefixed
    /// (u64 LE) so that field boundaries cannot shift. Stored at byte 24 of the file.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for s in [&self.model_id, &self.revision, &self.pooling] {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        h.update(self.max_width.to_le_bytes());
        h.finalize().into()
    }

    /// Short human-readable description used in error messages.
    pub(crate) fn describe(&self, other: &EncoderInfo) -> String {
        if self.model_id != other.model_id {
            self.model_id.clone()
        } else {
            let rev: String = self.revision.chars().take(12).collect();
            format!(
                "{} (revision {rev}, pooling {}, max width {})",
                self.model_id, self.pooling, self.max_width
            )
        }
    }
}

/// Payload of a span vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanRecord {
    pub example: ExampleId,
    pub label: LabelId,
    /// Char offset of the span start in the example text (half-open `start..end`).
    pub start: u32,
    pub end: u32,
    pub text: String,
}

/// Payload of an utterance vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExampleRecord {
    pub text: String,
    pub intent: Option<String>,
}

/// A span to add with [`SpanIndex::add_example`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewSpan<'a> {
    pub label: &'a str,
    pub start: u32,
    pub end: u32,
    pub text: &'a str,
}
