//! The index file format and the atomic save.
//!
//! ```text
//! offset size  field (little endian)
//! 0      8     magic "NSPANIDX"
//! 8      2     format_version (CURRENT_VERSION)
//! 10     2     reserved (0)
//! 12     4     dim
//! 16     4     n_spans
//! 20     4     n_labels
//! 24     32    encoder fingerprint: sha256(model id, revision, pooling, max_width)
//! 56     ..    body, a sequence of u64-length-prefixed sections:
//!                meta      bincode 2 (serde, `config::standard()`): encoder info, requested
//!                          backend, HNSW params, labels, example records, span records
//!                spans     n_spans * dim f32, row-major
//!                utts      n_examples * dim f32, row-major
//!                graph     u8 kind (0 none, 1 usearch, 2 ivf lists) + u64 len + bytes, for spans
//!                graph     the same, for utterances
//! end-4  4     crc32 (crc32fast) of every byte before it
//! ```
//! The vectors are raw f32 sections rather than bincode sequences so that reading 10^6
//! vectors is a bounds check and a copy. They are the source of truth: a graph is only
//! a cache, rebuilt from them when absent (hnsw_rs cannot serialize to a buffer) or when
//! it fails to load.
//!
//! Readers check, in order: magic (`NotAnIndex`), version (`UnsupportedVersion`; before
//! the checksum, since a future version may lay out its trailer differently), length and
//! checksum (`Corrupt`), then every section length against the bytes left before
//! allocating anything, and the header against the body.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::{BackendKind, EncoderInfo, ExampleRecord, HnswParams, IndexError, SpanRecord};

pub(crate) const MAGIC: &[u8; 8] = b"NSPANIDX";
/// The newest format version this build reads and writes. Version 2 added
/// `HnswParams::graph_precision` to the metadata (version 1 files read as f32 graphs);
/// version 3 added the `Ivf` backend and its lists section. A file is written at the
/// oldest version that can hold it (3 only for an IVF index), so builds that read
/// version 2 keep opening every other index.
pub const CURRENT_VERSION: u16 = 3;
/// The oldest format version this build reads.
pub const OLDEST_SUPPORTED_VERSION: u16 = 1;
pub(crate) const HEADER_LEN: usize = 56;
const TRAILER_LEN: usize = 4;
/// Upper bound on `dim`, rejecting absurd headers before any allocation.
const MAX_DIM: u32 = 1 << 16;
/// Upper bound on the bincode metadata section.
const META_LIMIT: usize = 1 << 32;

/// The version an index on `backend` is written at: the oldest that can hold it.
pub(crate) fn version_for(backend: BackendKind) -> u16 {
    if backend == BackendKind::Ivf {
        3
    } else {
        2
    }
}

pub(crate) const GRAPH_NONE: u8 = 0;
pub(crate) const GRAPH_USEARCH: u8 = 1;
pub(crate) const GRAPH_IVF: u8 = 2;

/// Everything but the vectors and graphs.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub encoder: EncoderInfo,
    pub backend: BackendKind,
    pub params: HnswParams,
    pub labels: Vec<String>,
    pub examples: Vec<ExampleRecord>,
    pub spans: Vec<SpanRecord>,
}

/// Version 1's metadata: the same but for [`HnswParams::graph_precision`].
#[derive(Debug, Deserialize)]
struct MetaV1 {
    encoder: EncoderInfo,
    backend: BackendKind,
    params: HnswParamsV1,
    labels: Vec<String>,
    examples: Vec<ExampleRecord>,
    spans: Vec<SpanRecord>,
}

#[derive(Debug, Deserialize)]
struct HnswParamsV1 {
    m: usize,
    ef_construction: usize,
    ef_search: usize,
    seed: u64,
}

impl From<MetaV1> for Meta {
    fn from(v1: MetaV1) -> Meta {
        let p = v1.params;
        Meta {
            encoder: v1.encoder,
            backend: v1.backend,
            params: HnswParams {
                m: p.m,
                ef_construction: p.ef_construction,
                ef_search: p.ef_search,
                seed: p.seed,
                graph_precision: crate::GraphPrecision::F32,
            },
            labels: v1.labels,
            examples: v1.examples,
            spans: v1.spans,
        }
    }
}

/// A graph section: its kind tag and bytes.
pub(crate) type Graph<'a> = (u8, &'a [u8]);

pub(crate) struct Decoded {
    pub meta: Meta,
    pub span_vectors: Vec<f32>,
    pub utt_vectors: Vec<f32>,
    /// The graph sections: kind tag and bytes.
    pub span_graph: (u8, Vec<u8>),
    pub utt_graph: (u8, Vec<u8>),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<META_LIMIT>()
}

pub(crate) fn encode(
    meta: &Meta,
    span_vectors: &[f32],
    utt_vectors: &[f32],
    span_graph: Graph<'_>,
    utt_graph: Graph<'_>,
) -> Vec<u8> {
    let meta_bytes = bincode::serde::encode_to_vec(meta, bincode_config())
        .expect("encoding plain structs into a Vec cannot fail");
    let total = HEADER_LEN
        + 8 + meta_bytes.len()
        + 8 + span_vectors.len() * 4
        + 8 + utt_vectors.len() * 4
        + 2 * (1 + 8) + span_graph.1.len() + utt_graph.1.len()
        + TRAILER_LEN;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version_for(meta.backend).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&meta.encoder.dim.to_le_bytes());
    out.extend_from_slice(&(meta.spans.len() as u32).to_le_bytes());
    out.extend_from_slice(&(meta.labels.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta.encoder.fingerprint());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&meta_bytes);
    for vs in [span_vectors, utt_vectors] {
        out.extend_from_slice(&((vs.len() * 4) as u64).to_le_bytes());
        for x in vs {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    for (kind, bytes) in [span_graph, utt_graph] {
        out.push(kind);
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), total);
    out
}

/// Why a read stopped: the file's own bytes said something impossible, or reading failed.
enum Stop {
    Corrupt(String),
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Io(e)
    }
}

/// Reads the content (everything before the trailer) in order, hashing every byte read,
/// and knows how many bytes are left, so that no section is allocated beyond the file.
struct Reader<R> {
    src: R,
    left: u64,
    crc: crc32fast::Hasher,
}

impl<R: Read> Reader<R> {
    /// Whether `n` more bytes of content exist: asked before a section is allocated.
    fn ensure_left(&self, n: u64, what: &str) -> Result<(), Stop> {
        if n > self.left {
            return Err(Stop::Corrupt(format!("{what} section claims {n} bytes, {} left", self.left)));
        }
        Ok(())
    }
    /// Fills `buf` from the content, or says how short the content is.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), Stop> {
        self.ensure_left(buf.len() as u64, what)?;
        self.src.read_exact(buf)?;
        self.crc.update(buf);
        self.left -= buf.len() as u64;
        Ok(())
    }
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, Stop> {
        self.ensure_left(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.fill(&mut v, what)?;
        Ok(v)
    }
    fn u64(&mut self, what: &str) -> Result<u64, Stop> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
    fn u8(&mut self, what: &str) -> Result<u8, Stop> {
        let mut b = [0u8; 1];
        self.fill(&mut b, what)?;
        Ok(b[0])
    }
    /// A raw little-endian f32 section, read straight into the vector it becomes: the
    /// file's bytes are never held twice.
    fn f32s(&mut self, expected_len: u64, what: &str) -> Result<Vec<f32>, Stop> {
        let n = self.u64(what)?;
        if n != expected_len {
            return Err(Stop::Corrupt(format!("{what} section has {n} bytes, header implies {expected_len}")));
        }
        self.ensure_left(n, what)?;
        let mut v = vec![0f32; (n / 4) as usize];
        advise_huge_pages(bytemuck::cast_slice_mut(&mut v));
        self.fill(bytemuck::cast_slice_mut(&mut v), what)?;
        if cfg!(target_endian = "big") {
            for x in &mut v {
                *x = f32::from_bits(u32::from_le(x.to_bits()));
            }
        }
        Ok(v)
    }
    fn graph(&mut self, what: &str) -> Result<(u8, Vec<u8>), Stop> {
        let kind = self.u8(what)?;
        let n = self.u64(what)?;
        Ok((kind, self.bytes(n, what)?))
    }
    /// Hashes whatever content is left, unread until now.
    fn drain(&mut self) -> io::Result<()> {
        if self.left == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; self.left.min(1 << 20) as usize];
        while self.left > 0 {
            let n = self.left.min(buf.len() as u64) as usize;
            self.src.read_exact(&mut buf[..n])?;
            self.crc.update(&buf[..n]);
            self.left -= n as u64;
        }
        Ok(())
    }
}

/// Asks Linux to back `buf` (large and not yet touched) with 2 MiB pages where it can:
/// filling a 2 GB section through 4 KiB pages costs half a million page faults, which
/// took more time than reading the file (`perf record` of opening SNIPS train's index).
/// Advice only: where it is refused or unavailable nothing changes.
fn advise_huge_pages(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        let start = buf.as_mut_ptr() as usize;
        let (first, last) = (start.next_multiple_of(HUGE), (start + buf.len()) / HUGE * HUGE);
        if last > first {
            // SAFETY: [first, last) lies inside `buf`, which we own; MADV_HUGEPAGE changes
            // how the range is backed, never its contents, and its result is only advice.
            unsafe { madvise(first as *mut std::ffi::c_void, last - first, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Decodes an index of `len` bytes from `src`, reading it once, front to back: each
/// vector section goes straight into its vector, so opening a file needs about its size
/// in memory, not twice that.
///
/// The checks come in the documented order: magic, version, length, then the checksum
/// before anything else is reported. The checksum is only known at the end, so when the
/// body does not parse, the rest is read and hashed first: a damaged file says
/// "checksum mismatch", and a body that is wrong under a valid checksum (written wrong,
/// not damaged) says what is wrong with it.
pub(crate) fn decode_from(src: impl Read, len: u64, path: &Path) -> Result<Decoded, IndexError> {
    read_checked(src, len, path, |r, header, version| {
        let meta = decode_meta(r, header, version)?;
        decode_sections(r, meta, header)
    })
}

/// The header and metadata of an index of `len` bytes from `src`, the rest read only to
/// check the checksum (nothing of it is kept): what `nearspan index info` needs.
pub(crate) fn read_meta_from(src: impl Read, len: u64, path: &Path) -> Result<(u16, Meta), IndexError> {
    read_checked(src, len, path, |r, header, version| Ok((version, decode_meta(r, header, version)?)))
}

/// The checks shared by every read: header, then `body` over the content, then the
/// checksum, which wins over whatever `body` found (see [`decode_from`]).
fn read_checked<R: Read, T>(
    mut src: R,
    len: u64,
    path: &Path,
    body: impl FnOnce(&mut Reader<R>, &[u8; HEADER_LEN], u16) -> Result<T, Stop>,
) -> Result<T, IndexError> {
    let corrupt = |detail: String| IndexError::Corrupt { path: path.to_path_buf(), detail };
    let mut header = [0u8; HEADER_LEN];
    let got = (len as usize).min(HEADER_LEN);
    src.read_exact(&mut header[..got]).map_err(|e| IndexError::io(path, e))?;
    if got < MAGIC.len() || &header[..MAGIC.len()] != MAGIC {
        return Err(IndexError::NotAnIndex { path: path.to_path_buf() });
    }
    if got < 10 {
        return Err(corrupt(format!("truncated: {len} bytes")));
    }
    let version = u16_at(&header, 8);
    if !(OLDEST_SUPPORTED_VERSION..=CURRENT_VERSION).contains(&version) {
        return Err(IndexError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            oldest: OLDEST_SUPPORTED_VERSION,
            current: CURRENT_VERSION,
        });
    }
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(corrupt(format!("truncated: {len} bytes, the header alone is {HEADER_LEN}")));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    let mut r = Reader { src, left: len - (HEADER_LEN + TRAILER_LEN) as u64, crc };
    let body = match body(&mut r, &header, version) {
        Ok(t) => Ok(t),
        Err(Stop::Corrupt(detail)) => Err(detail),
        Err(Stop::Io(e)) => return Err(IndexError::io(path, e)),
    };
    r.drain().map_err(|e| IndexError::io(path, e))?;
    let mut trailer = [0u8; TRAILER_LEN];
    r.src.read_exact(&mut trailer).map_err(|e| IndexError::io(path, e))?;
    let stored = u32::from_le_bytes(trailer);
    let computed = r.crc.finalize();
    if stored != computed {
        return Err(corrupt(format!("checksum mismatch: stored {stored:08x}, computed {computed:08x}")));
    }
    body.map_err(corrupt)
}

/// The metadata section, checked against the header.
fn decode_meta<R: Read>(r: &mut Reader<R>, header: &[u8; HEADER_LEN], version: u16) -> Result<Meta, Stop> {
    let dim = u32_at(header, 12);
    let n_spans = u32_at(header, 16);
    let n_labels = u32_at(header, 20);
    let fingerprint: [u8; 32] = header[24..56].try_into().unwrap();
    if dim == 0 || dim > MAX_DIM {
        return Err(Stop::Corrupt(format!("dimension {dim} outside 1..={MAX_DIM}")));
    }
    let meta_len = r.u64("metadata")?;
    let meta_bytes = r.bytes(meta_len, "metadata")?;
    let (meta, used): (Meta, usize) = if version == 1 {
        bincode::serde::decode_from_slice::<MetaV1, _>(&meta_bytes, bincode_config()).map(|(m, used)| (m.into(), used))
    } else {
        bincode::serde::decode_from_slice(&meta_bytes, bincode_config())
    }
    .map_err(|e| Stop::Corrupt(format!("metadata: {e}")))?;
    if used != meta_bytes.len() {
        return Err(Stop::Corrupt(format!("metadata: {} trailing bytes", meta_bytes.len() - used)));
    }
    if meta.encoder.dim != dim || meta.spans.len() as u64 != n_spans as u64 || meta.labels.len() as u64 != n_labels as u64 {
        return Err(Stop::Corrupt(format!(
            "header says dim {dim}, {n_spans} spans, {n_labels} labels; body has dim {}, {} spans, {} labels",
            meta.encoder.dim,
            meta.spans.len(),
            meta.labels.len()
        )));
    }
    if meta.encoder.fingerprint() != fingerprint {
        return Err(Stop::Corrupt("encoder fingerprint in the header does not match the body".into()));
    }
    let n_examples = meta.examples.len() as u64;
    if n_examples > u32::MAX as u64 {
        return Err(Stop::Corrupt(format!("{n_examples} examples")));
    }
    for s in &meta.spans {
        if s.label.0 >= n_labels || s.example.0 as u64 >= n_examples || s.start > s.end {
            return Err(Stop::Corrupt(format!("span record {s:?} out of range")));
        }
    }
    Ok(meta)
}

/// The vector and graph sections after the metadata.
fn decode_sections<R: Read>(r: &mut Reader<R>, meta: Meta, header: &[u8; HEADER_LEN]) -> Result<Decoded, Stop> {
    let (dim, n_spans, n_examples) = (u32_at(header, 12) as u64, meta.spans.len() as u64, meta.examples.len() as u64);
    let span_vectors = r.f32s(n_spans * dim * 4, "span vectors")?;
    let utt_vectors = r.f32s(n_examples * dim * 4, "utterance vectors")?;
    let span_graph = r.graph("span graph")?;
    let utt_graph = r.graph("utterance graph")?;
    if r.left != 0 {
        return Err(Stop::Corrupt(format!("{} unexpected bytes after the last section", r.left)));
    }
    Ok(Decoded { meta, span_vectors, utt_vectors, span_graph, utt_graph })
}

/// Where [`atomic_write`] puts its temporary file for `path`.
///
/// It must be in the *same directory* as the target: `rename(2)` is atomic only within one
/// filesystem, and a temp file elsewhere (`/tmp` is often a tmpfs) would make the final
/// move a copy that a crash can leave half-written. The name is hidden and unique per
/// process and call, so concurrent saves never share a temp file.
pub(crate) fn temp_path_for(path: &Path) -> Result<PathBuf, IndexError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        IndexError::io(path, io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.tmp.{}.{n}", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(tmp))
}

/// Replace `path` with what `write` produces, atomically: write a temp file in the same
/// directory, fsync it, rename it over `path`, fsync the directory (so the rename itself
/// survives a power loss). A failure or crash at any point leaves the old file intact;
/// on failure the temp file is removed.
pub(crate) fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), IndexError> {
    let tmp = temp_path_for(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| IndexError::io(&tmp, e))?;
    let result = (|| {
        write(&mut file)?;
        file.flush()?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_parent_dir(path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(IndexError::io(path, e));
    }
    Ok(())
}

fn sync_parent_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_is_in_the_target_directory() {
        let p = Path::new("/some/dir/index.nsi");
        let t = temp_path_for(p).unwrap();
        assert_eq!(t.parent(), p.parent());
        assert_ne!(t, p);
    }

    /// A write that fails midway leaves the old file byte-for-byte intact and no temp file.
    #[test]
    fn failed_write_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.nsi");
        fs::write(&path, b"old contents").unwrap();
        let err = atomic_write(&path, |f| {
            f.write_all(b"half of the new")?;
            Err(io::Error::other("disk full (simulated)"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(err.to_string().contains("index.nsi"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old contents");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("index.nsi")]);

        atomic_write(&path, |f| f.write_all(b"new")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

/// The format version written in the header of the index file at `path`, read without
/// loading the rest (for `nearspan index info`, which reports the file's own version).
pub fn file_format_version(path: &Path) -> Result<u16, IndexError> {
    use std::io::Read;
    let mut head = [0u8; 10];
    let mut file = std::fs::File::open(path).map_err(|e| IndexError::io(path, e))?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(|e| IndexError::io(path, e))? {
            0 => break,
            n => filled += n,
        }
    }
    if filled < MAGIC.len() || &head[..MAGIC.len()] != MAGIC {
        return Err(IndexError::NotAnIndex { path: path.to_path_buf() });
    }
    if filled < head.len() {
        return Err(IndexError::Corrupt { path: path.to_path_buf(), detail: format!("truncated: {filled} bytes") });
    }
    Ok(u16_at(&head, 8))
}
