use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use crate::backend::halves::SpanHalves;
use crate::backend::tiled::TiledRows;
use crate::backend::{new_backend, preferred_hnsw, AnnBackend, Vectors};
use crate::format::{self, Graph, Meta, GRAPH_IVF, GRAPH_NONE, GRAPH_USEARCH};
use crate::{
    BackendKind, EncoderInfo, ExampleId, ExampleRecord, HalvesPrecision, HnswParams, IndexError, LabelId, Neighbor,
    NewSpan, SearchParallelism, SpanRecord,
};

/// With [`BackendKind::Auto`], collections smaller than this are searched exactly.
///
/// Measured with `examples/ann_compare.rs` (384 dims, clustered, 2 cores): exact
/// single-query p50 is 0.03 ms at 10^3, 0.59 ms at 10^4, 12.9 ms at 10^5 (memory-bound);
/// USearch at ef=64 is 0.08 / 0.22 / 0.40 ms. Around 2·10^4 exact search still answers in
/// about a millisecond with perfect recall, no build time (USearch: 4.6 s per 10^4 on 2
/// cores) and no extra memory, so HNSW only pays above that.
pub const AUTO_EXACT_THRESHOLD: usize = 20_000;

/// The path named in errors from in-memory indexes.
fn memory_path() -> PathBuf {
    PathBuf::from("<memory>")
}

/// One searchable set of vectors (spans or utterances) and its search structure.
struct Collection {
    vectors: Vectors,
    backend: Box<dyn AnnBackend>,
}

impl Collection {
    fn add(&mut self, v: &[f32]) -> Result<u32, IndexError> {
        let id = self.vectors.len() as u32;
        self.vectors.push(v);
        self.backend.insert(id, v)
            .map(|_| id)
    }

    fn search(&self, q: &[f32], k: usize) -> Vec<Neighbor> {
        self.backend.search(&self.vectors, q, k)
    }

    fn kind(&self) -> BackendKind {
        self.backend.kind()
    }
}

/// Resolve `Auto` for a collection of `n` vectors and check the backend is compiled in.
fn resolve(requested: BackendKind, n: usize, path: &Path) -> Result<BackendKind, IndexError> {
    match requested {
        BackendKind::Auto if n < AUTO_EXACT_THRESHOLD => Ok(BackendKind::Exact),
        BackendKind::Auto => Ok(preferred_hnsw().unwrap_or(BackendKind::Exact)),
        k if k.is_available() => Ok(k),
        k => Err(IndexError::BackendUnavailable {
            path: path.to_path_buf(),
            requested: k,
            feature: k.feature().unwrap_or("?"),
        }),
    }
}

/// Build a backend of `kind` over all of `vectors`: restore `graph` if it is a USearch
/// graph of the right size, else insert every row (in parallel).
fn build_backend(
    kind: BackendKind,
    vectors: &Vectors,
    params: &HnswParams,
    graph: Graph<'_>,
    path: &Path,
) -> Result<Box<dyn AnnBackend>, IndexError> {
    #[cfg(feature = "usearch")]
    if kind == BackendKind::Usearch && graph.0 == GRAPH_USEARCH {
        if let Ok(b) = crate::backend::UsearchBackend::from_graph_bytes(graph.1, params) {
            if b.len() == vectors.len() {
                return Ok(Box::new(b));
            }
        }
        // A graph that does not load (e.g. a future USearch format) is only a cache:
        // fall through and rebuild it from the vectors.
    }
    if kind == BackendKind::Ivf && graph.0 == GRAPH_IVF {
        if let Some(ivf) = crate::backend::Ivf::from_bytes(graph.1, vectors.dim(), vectors.len()) {
            return Ok(Box::new(ivf));
        }
        // Lists that do not decode are only a cache, like a graph: cluster again.
    }
    let mut backend = new_backend(kind, vectors.dim(), params, vectors.len()).map_err(|k| {
        IndexError::BackendUnavailable { path: path.to_path_buf(), requested: k, feature: k.feature().unwrap_or("?") }
    })?;
    if !vectors.is_empty() {
        backend.insert_batch(0, vectors.as_slice(), vectors.dim())?;
    }
    Ok(backend)
}

/// Labeled span vectors and utterance vectors with their payloads. See the crate docs.
pub struct SpanIndex {
    encoder: EncoderInfo,
    requested: BackendKind,
    params: HnswParams,
    labels: Vec<String>,
    label_ids: HashMap<String, LabelId>,
    examples: Vec<ExampleRecord>,
    spans: Vec<SpanRecord>,
    /// The spans of example `i` are rows `span_offsets[i]..span_offsets[i + 1]`: spans are
    /// stored grouped by example, in example order.
    span_offsets: Vec<u32>,
    span_set: Collection,
    utt_set: Collection,
    /// The span rows as per-example distinct halves, for the factored two-stage search:
    /// built on first use (or by [`prepare_factored_search`](Self::prepare_factored_search)),
    /// grown by `add_example`; `None` inside when the rows are not start ⊕ end.
    span_halves: OnceLock<Option<SpanHalves>>,
    /// The precision `span_halves` is built in (a setting of this process, not stored).
    halves_precision: HalvesPrecision,
    /// With exact utterance search, the utterance rows' repeated block (utterance vectors
    /// are tiled to the span dimension): built on first use, grown by `add_example`.
    utt_tiles: OnceLock<Option<TiledRows>>,
}

impl std::fmt::Debug for SpanIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanIndex")
            .field("encoder", &self.encoder)
            .field("backend", &self.backend())
            .field("n_examples", &self.n_examples())
            .field("n_spans", &self.n_spans())
            .field("n_labels", &self.n_labels())
            .finish()
    }
}

impl SpanIndex {
    /// An empty in-memory index for vectors of `encoder.dim` dimensions.
    ///
    /// Fails with [`IndexError::BackendUnavailable`] if `backend` is not compiled in.
    pub fn new(encoder: EncoderInfo, backend: BackendKind, params: HnswParams) -> Result<Self, IndexError> {
        let dim = encoder.dim as usize;
        if dim == 0 {
            return Err(IndexError::DimensionMismatch { what: "encoder info".into(), expected: 1, found: 0 });
        }
        let empty = Vectors::new(dim);
        let kind = resolve(backend, 0, &memory_path())?;
        let span_set = Collection {
            backend: build_backend(kind, &empty, &params, (GRAPH_NONE, &[]), &memory_path())?,
            vectors: empty.clone(),
        };
        let utt_set = Collection {
            backend: build_backend(kind, &empty, &params, (GRAPH_NONE, &[]), &memory_path())?,
            vectors: empty,
        };
        Ok(SpanIndex {
            encoder,
            requested: backend,
            params,
            labels: Vec::new(),
            label_ids: HashMap::new(),
            examples: Vec::new(),
            spans: Vec::new(),
            span_offsets: vec![0],
            span_set,
            utt_set,
            span_halves: OnceLock::new(),
            halves_precision: HalvesPrecision::F32,
            utt_tiles: OnceLock::new(),
        })
    }

    fn check_dim(&self, what: impl FnOnce() -> String, v: &[f32]) -> Result<(), IndexError> {
        if v.len() != self.encoder.dim as usize {
            return Err(IndexError::DimensionMismatch { what: what(), expected: self.encoder.dim, found: v.len() });
        }
        Ok(())
    }

    /// Add one example: its utterance vector and its labeled spans with their vectors.
    /// Works on an opened index and with every backend (HNSW graphs grow in place).
    ///
    /// All vectors must be L2-normalized and `encoder.dim` long (else
    /// [`IndexError::DimensionMismatch`], and nothing is added).
    pub fn add_example(
        &mut self,
        text: &str,
        intent: Option<&str>,
        utterance_vector: &[f32],
        spans: &[(NewSpan<'_>, &[f32])],
    ) -> Result<ExampleId, IndexError> {
        self.check_dim(|| format!("utterance vector of {text:?}"), utterance_vector)?;
        for (s, v) in spans {
            self.check_dim(|| format!("span vector of {:?} in {text:?}", s.text), v)?;
            if s.start > s.end {
                return Err(IndexError::InvalidSpan { start: s.start, end: s.end, example_text: text.into() });
            }
        }
        let example = ExampleId(self.examples.len() as u32);
        self.examples.push(ExampleRecord { text: text.to_string(), intent: intent.map(str::to_string) });
        self.utt_set.add(utterance_vector)?;
        for (s, v) in spans {
            let label = self.intern(s.label);
            self.spans.push(SpanRecord { example, label, start: s.start, end: s.end, text: s.text.to_string() });
            self.span_set.add(v)?;
        }
        self.span_offsets.push(self.spans.len() as u32);
        if let Some(Some(tiles)) = self.utt_tiles.get_mut() {
            if !tiles.push(utterance_vector) {
                self.utt_tiles = OnceLock::from(None);
            }
        }
        if let Some(Some(halves)) = self.span_halves.get_mut() {
            let first = self.span_offsets[example.0 as usize];
            if !halves.push_example(self.span_set.vectors.as_slice(), &self.spans, first) {
                self.span_halves = OnceLock::from(None);
            }
        }
        self.maybe_upgrade()?;
        Ok(example)
    }

    fn intern(&mut self, label: &str) -> LabelId {
        if let Some(&id) = self.label_ids.get(label) {
            return id;
        }
        let id = LabelId(self.labels.len() as u32);
        self.labels.push(label.to_string());
        self.label_ids.insert(label.to_string(), id);
        id
    }

    /// With `Auto`, switch a collection that has grown past the threshold to HNSW.
    fn maybe_upgrade(&mut self) -> Result<(), IndexError> {
        if self.requested != BackendKind::Auto {
            return Ok(());
        }
        for set in [&mut self.span_set, &mut self.utt_set] {
            let want = resolve(BackendKind::Auto, set.vectors.len(), &memory_path())?;
            if want != set.kind() {
                set.backend = build_backend(want, &set.vectors, &self.params, (GRAPH_NONE, &[]), &memory_path())?;
            }
        }
        Ok(())
    }

    fn assert_query(&self, len: usize) {
        assert!(
            len % self.encoder.dim as usize == 0,
            "query of {len} floats is not a multiple of the index dimension {}",
            self.encoder.dim
        );
    }

    /// The `k` span vectors most similar to `query`, best first; `Neighbor::id` is a
    /// span id for [`span`](Self::span). Panics if `query.len() != dim`.
    pub fn search_spans(&self, query: &[f32], k: usize) -> Vec<Neighbor> {
        assert_eq!(query.len(), self.encoder.dim as usize, "query dimension");
        self.span_set.search(query, k)
    }

    /// [`search_spans`](Self::search_spans) for `queries.len() / dim` queries stored
    /// row-major. Exact: blocked matrix product, parallel over query blocks and row
    /// chunks; HNSW: parallel over queries.
    pub fn search_spans_batch(&self, queries: &[f32], k: usize) -> Vec<Vec<Neighbor>> {
        self.assert_query(queries.len());
        self.span_set.backend.search_batch(&self.span_set.vectors, queries, k)
    }

    /// [`search_spans_batch`](Self::search_spans_batch) restricted to the spans of
    /// `examples`, searched exactly (their rows are scanned in place). With the examples
    /// nearest the whole utterance this is a two-stage search that needs no span graph
    /// (`nearspan query --prefilter`). Unknown example ids are ignored.
    pub fn search_spans_among(&self, queries: &[f32], k: usize, examples: &[ExampleId]) -> Vec<Vec<Neighbor>> {
        let ranges: Vec<std::ops::Range<u32>> =
            examples.iter().filter(|e| (e.0 as usize) < self.examples.len()).map(|&e| self.example_spans(e)).collect();
        self.search_spans_in(queries, k, &ranges)
    }

    /// [`search_spans_among`](Self::search_spans_among) for start ⊕ end queries in
    /// factored form ([`FactoredQueries`](crate::backend::exact::FactoredQueries)): the
    /// same neighbours up to rounding. When the index's span rows are start ⊕ end too,
    /// each example's distinct halves are scored once and each row costs two
    /// multiply-adds ([`prepare_factored_search`](Self::prepare_factored_search));
    /// otherwise the rows are scanned. Examples are best given nearest first (as the
    /// utterance search returns them). Panics if the index dimension is odd or a pair is
    /// out of range.
    pub fn search_spans_among_factored(
        &self,
        queries: &crate::backend::exact::FactoredQueries<'_>,
        k: usize,
        examples: &[ExampleId],
        parallelism: SearchParallelism,
    ) -> Vec<Vec<Neighbor>> {
        let examples = examples.iter().filter(|e| (e.0 as usize) < self.examples.len());
        if let Some(halves) = self.span_halves() {
            let ids: Vec<usize> = examples.map(|e| e.0 as usize).collect();
            return halves.search(queries, &ids, k, parallelism);
        }
        let ranges: Vec<std::ops::Range<usize>> = examples
            .map(|&e| {
                let r = self.example_spans(e);
                r.start as usize..r.end as usize
            })
            .collect();
        crate::backend::exact::factored_search_ranges(self.span_set.vectors.as_slice(), self.encoder.dim as usize, queries, &ranges, k)
    }

    /// Every span, searched exactly, for start ⊕ end queries in factored form: the same
    /// neighbours as [`search_spans_batch`](Self::search_spans_batch) on an exact index
    /// up to rounding, at a fraction of the work when the rows factor too (each
    /// example's distinct halves scored once, two multiply-adds per row).
    pub fn search_spans_factored(
        &self,
        queries: &crate::backend::exact::FactoredQueries<'_>,
        k: usize,
        parallelism: SearchParallelism,
    ) -> Vec<Vec<Neighbor>> {
        if let Some(halves) = self.span_halves() {
            let all: Vec<usize> = (0..self.examples.len()).collect();
            return halves.search(queries, &all, k, parallelism);
        }
        // Rows that do not factor: every row is one contiguous run.
        let all = 0..self.spans.len();
        crate::backend::exact::factored_search_ranges(self.span_set.vectors.as_slice(), self.encoder.dim as usize, queries, std::slice::from_ref(&all), k)
    }

    /// Builds what [`search_spans_among_factored`](Self::search_spans_among_factored)
    /// searches fastest: each example's span rows as their distinct start and end halves
    /// (about 5× fewer multiply-adds and bytes than the rows; for all of SNIPS train
    /// about a fifth of the span vectors' memory, built in about a second). Otherwise
    /// the first factored search builds it. Returns false when the rows are not
    /// start ⊕ end (then factored searches scan the rows).
    pub fn prepare_factored_search(&self) -> bool {
        self.span_halves().is_some()
    }

    /// Keeps the factored search's halves in `precision` from now on (f32 unless set):
    /// bf16 reads half the bytes per search, at about 1e-3 error in each similarity.
    /// Halves already built in another precision are dropped and built again on use.
    pub fn set_halves_precision(&mut self, precision: HalvesPrecision) {
        if precision != self.halves_precision {
            self.halves_precision = precision;
            self.span_halves = OnceLock::new();
        }
    }

    fn span_halves(&self) -> Option<&SpanHalves> {
        self.span_halves
            .get_or_init(|| {
                let (vectors, dim) = (self.span_set.vectors.as_slice(), self.encoder.dim as usize);
                SpanHalves::build(vectors, dim, &self.spans, &self.span_offsets, self.halves_precision)
            })
            .as_ref()
    }

    /// Exact search among the spans whose ids lie in `ranges` (half-open; ids past the
    /// end are ignored). For choosing spans more finely than by example.
    pub fn search_spans_in(&self, queries: &[f32], k: usize, ranges: &[std::ops::Range<u32>]) -> Vec<Vec<Neighbor>> {
        self.assert_query(queries.len());
        let n = self.spans.len();
        let ranges: Vec<std::ops::Range<usize>> = ranges
            .iter()
            .map(|r| {
                let start = (r.start as usize).min(n);
                start..(r.end as usize).clamp(start, n)
            })
            .collect();
        crate::backend::exact::exact_search_ranges(self.span_set.vectors.as_slice(), self.encoder.dim as usize, queries, &ranges, k)
    }

    /// The span ids of example `id`'s spans. Panics if out of range.
    pub fn example_spans(&self, id: ExampleId) -> std::ops::Range<u32> {
        let i = id.0 as usize;
        self.span_offsets[i]..self.span_offsets[i + 1]
    }

    /// The `k` examples whose utterance vectors are most similar to `query`;
    /// `Neighbor::id` is an [`ExampleId`] value.
    pub fn search_utterances(&self, query: &[f32], k: usize) -> Vec<Neighbor> {
        assert_eq!(query.len(), self.encoder.dim as usize, "query dimension");
        self.search_utterances_batch(query, k).pop().unwrap_or_default()
    }

    /// [`search_utterances`](Self::search_utterances) for `queries.len() / dim` queries
    /// stored row-major: exact search reads the utterance vectors once for all of them,
    /// and only one copy of each when they are tiled (as with start ⊕ end spans).
    pub fn search_utterances_batch(&self, queries: &[f32], k: usize) -> Vec<Vec<Neighbor>> {
        self.assert_query(queries.len());
        if let Some(tiles) = self.utterance_tiles() {
            return tiles.search(queries, k);
        }
        self.utt_set.backend.search_batch(&self.utt_set.vectors, queries, k)
    }

    fn utterance_tiles(&self) -> Option<&TiledRows> {
        if self.utt_set.kind() != BackendKind::Exact || self.utt_set.vectors.is_empty() {
            return None;
        }
        self.utt_tiles
            .get_or_init(|| TiledRows::detect(self.utt_set.vectors.as_slice(), self.encoder.dim as usize))
            .as_ref()
            .filter(|t| t.len() == self.utt_set.vectors.len())
    }

    /// Set `ef` (search candidate list size) on both collections' HNSW graphs.
    pub fn set_ef_search(&mut self, ef: usize) {
        self.params.ef_search = ef;
        self.span_set.backend.set_ef_search(ef);
        self.utt_set.backend.set_ef_search(ef);
    }

    /// The payload of span `id` (a [`Neighbor::id`] from a span search). Panics if out of range.
    pub fn span(&self, id: u32) -> &SpanRecord {
        &self.spans[id as usize]
    }

    /// The stored vector of span `id`.
    pub fn span_vector(&self, id: u32) -> &[f32] {
        self.span_set.vectors.row(id as usize)
    }

    /// The stored utterance vector of example `id`. Panics if out of range.
    pub fn utterance_vector(&self, id: ExampleId) -> &[f32] {
        self.utt_set.vectors.row(id.0 as usize)
    }

    pub fn example(&self, id: ExampleId) -> &ExampleRecord {
        &self.examples[id.0 as usize]
    }

    pub fn label(&self, id: LabelId) -> &str {
        &self.labels[id.0 as usize]
    }

    /// The id of `label`, if any span carries it.
    pub fn label_id(&self, label: &str) -> Option<LabelId> {
        self.label_ids.get(label).copied()
    }

    /// All labels, in [`LabelId`] order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.labels.iter().map(String::as_str)
    }

    pub fn n_examples(&self) -> usize {
        self.examples.len()
    }
    pub fn n_spans(&self) -> usize {
        self.spans.len()
    }
    pub fn n_labels(&self) -> usize {
        self.labels.len()
    }
    pub fn encoder(&self) -> &EncoderInfo {
        &self.encoder
    }
    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    /// The backend searching spans, resolved (never `Auto`).
    pub fn backend(&self) -> BackendKind {
        self.span_set.kind()
    }

    /// The format version [`save`](Self::save) writes this index at: 3 on the IVF
    /// backend, else 2 (which builds before IVF also read).
    pub fn format_version(&self) -> u16 {
        format::version_for(self.requested)
    }

    /// Serialize to the on-disk format (see [`save`](Self::save)).
    pub fn to_bytes(&self) -> Result<Vec<u8>, IndexError> {
        let meta = Meta {
            encoder: self.encoder.clone(),
            backend: self.requested,
            params: self.params,
            labels: self.labels.clone(),
            examples: self.examples.clone(),
            spans: self.spans.clone(),
        };
        let span_graph = self.span_set.backend.graph_bytes()?;
        let utt_graph = self.utt_set.backend.graph_bytes()?;
        let tag = |g: &Option<Vec<u8>>, kind: BackendKind| match (g, kind) {
            (None, _) => GRAPH_NONE,
            (Some(_), BackendKind::Ivf) => GRAPH_IVF,
            (Some(_), _) => GRAPH_USEARCH,
        };
        Ok(format::encode(
            &meta,
            self.span_set.vectors.as_slice(),
            self.utt_set.vectors.as_slice(),
            (tag(&span_graph, self.span_set.kind()), span_graph.as_deref().unwrap_or(&[])),
            (tag(&utt_graph, self.utt_set.kind()), utt_graph.as_deref().unwrap_or(&[])),
        ))
    }

    /// Write the index to `path` atomically: a temp file in the same directory is written,
    /// fsynced and renamed over `path`, then the directory is fsynced. A failure or crash
    /// at any point leaves any previous index at `path` intact.
    ///
    /// The file holds a 56-byte header (magic `NSPANIDX`, format version, dim, counts,
    /// encoder fingerprint), the records and vectors, the USearch graph when that is the
    /// backend (an hnsw_rs graph is rebuilt on open), and a CRC32 trailer.
    pub fn save(&self, path: &Path) -> Result<(), IndexError> {
        let bytes = self.to_bytes()?;
        format::atomic_write(path, |f| f.write_all(&bytes))
    }

    /// Open an index saved by [`save`](Self::save). With `expected`, refuse an index built
    /// by another encoder ([`IndexError::EncoderMismatch`]) or of another dimension.
    pub fn open(path: &Path, expected: Option<&EncoderInfo>) -> Result<SpanIndex, IndexError> {
        let (file, len) = open_file(path)?;
        let d = format::decode_from(file, len, path)?;
        Self::load(d, expected, path)
    }

    /// What an index file holds, from its header and metadata alone: the vectors and
    /// graphs are read only to verify the checksum, not kept, so this takes little
    /// memory and time next to [`open`](Self::open).
    pub fn summary(path: &Path) -> Result<IndexSummary, IndexError> {
        let (file, len) = open_file(path)?;
        let (format_version, meta) = format::read_meta_from(file, len, path)?;
        Ok(IndexSummary {
            format_version,
            backend: resolve(meta.backend, meta.spans.len(), path)?,
            n_examples: meta.examples.len(),
            n_spans: meta.spans.len(),
            encoder: meta.encoder,
            params: meta.params,
            labels: meta.labels,
        })
    }

    /// [`open`](Self::open) from bytes produced by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8], expected: Option<&EncoderInfo>) -> Result<SpanIndex, IndexError> {
        let path = memory_path();
        let d = format::decode_from(bytes, bytes.len() as u64, &path)?;
        Self::load(d, expected, &path)
    }

    fn load(d: format::Decoded, expected: Option<&EncoderInfo>, path: &Path) -> Result<SpanIndex, IndexError> {
        let meta = d.meta;
        if let Some(exp) = expected {
            if exp.fingerprint() != meta.encoder.fingerprint() {
                return Err(IndexError::EncoderMismatch {
                    path: path.to_path_buf(),
                    built: meta.encoder.describe(exp),
                    loaded: exp.describe(&meta.encoder),
                    built_id: meta.encoder.model_id.clone(),
                });
            }
            if exp.dim != meta.encoder.dim {
                return Err(IndexError::DimensionMismatch {
                    what: format!("{} (encoder {})", path.display(), exp.model_id),
                    expected: meta.encoder.dim,
                    found: exp.dim as usize,
                });
            }
        }
        let dim = meta.encoder.dim as usize;
        let collection = |data: Vec<f32>, graph: Graph<'_>| -> Result<Collection, IndexError> {
            let vectors = Vectors::from_vec(dim, data);
            let kind = resolve(meta.backend, vectors.len(), path)?;
            let backend = build_backend(kind, &vectors, &meta.params, graph, path)?;
            Ok(Collection { vectors, backend })
        };
        let span_set = collection(d.span_vectors, (d.span_graph.0, &d.span_graph.1))?;
        let utt_set = collection(d.utt_vectors, (d.utt_graph.0, &d.utt_graph.1))?;
        let label_ids = meta.labels.iter().enumerate().map(|(i, l)| (l.clone(), LabelId(i as u32))).collect();
        let span_offsets = span_offsets(&meta.spans, meta.examples.len())
            .map_err(|detail| IndexError::Corrupt { path: path.to_path_buf(), detail })?;
        Ok(SpanIndex {
            encoder: meta.encoder,
            requested: meta.backend,
            params: meta.params,
            labels: meta.labels,
            label_ids,
            examples: meta.examples,
            spans: meta.spans,
            span_offsets,
            span_set,
            utt_set,
            span_halves: OnceLock::new(),
            halves_precision: HalvesPrecision::F32,
            utt_tiles: OnceLock::new(),
        })
    }
}

/// An index file, buffered for the small reads between its sections, and its length.
fn open_file(path: &Path) -> Result<(std::io::BufReader<std::fs::File>, u64), IndexError> {
    let file = std::fs::File::open(path).map_err(|e| IndexError::io(path, e))?;
    let len = file.metadata().map_err(|e| IndexError::io(path, e))?.len();
    Ok((std::io::BufReader::with_capacity(1 << 16, file), len))
}

/// An index file's description without its vectors ([`SpanIndex::summary`]).
#[derive(Debug, Clone)]
pub struct IndexSummary {
    /// The format version the file was written in.
    pub format_version: u16,
    pub encoder: EncoderInfo,
    /// The span backend [`SpanIndex::open`] would give it (never `Auto`).
    pub backend: BackendKind,
    pub params: HnswParams,
    /// Label names, in id order.
    pub labels: Vec<String>,
    pub n_examples: usize,
    pub n_spans: usize,
}

/// Where each example's spans start, from span records that must be grouped by example
/// in example order (as [`SpanIndex::add_example`] writes them).
fn span_offsets(spans: &[SpanRecord], n_examples: usize) -> Result<Vec<u32>, String> {
    let mut offsets = Vec::with_capacity(n_examples + 1);
    offsets.push(0u32);
    for (i, s) in spans.iter().enumerate() {
        let e = s.example.0 as usize;
        if e + 1 < offsets.len() {
            return Err(format!("span {i} belongs to example {e}, which an earlier span already passed"));
        }
        while offsets.len() <= e {
            offsets.push(i as u32);
        }
    }
    while offsets.len() <= n_examples {
        offsets.push(spans.len() as u32);
    }
    Ok(offsets)
}
