use std::path::PathBuf;

use crate::BackendKind;

/// Everything that can go wrong building, saving or opening a [`SpanIndex`](crate::SpanIndex).
///
/// File errors name the file (`<memory>` for [`SpanIndex::from_bytes`](crate::SpanIndex::from_bytes))
/// and say what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    #[error("{}: not a nearspan index (bad magic bytes); pass the file written by `nearspan index build`", .path.display())]
    NotAnIndex { path: PathBuf },

    #[error("{}: format v{found}, this build reads v{oldest}..=v{current}; rebuild with `nearspan index build`", .path.display())]
    UnsupportedVersion { path: PathBuf, found: u16, oldest: u16, current: u16 },

    #[error("{}: corrupted index ({detail}); the file was truncated or damaged, rebuild it or restore a copy", .path.display())]
    Corrupt { path: PathBuf, detail: String },

    #[error("{}: index built with encoder {built}, loaded {loaded}; pass --model {built_id} or rebuild", .path.display())]
    EncoderMismatch { path: PathBuf, built: String, loaded: String, built_id: String },

    #[error("{what}: vector has {found} dimensions, the encoder's are {expected}")]
    DimensionMismatch { what: String, expected: u32, found: usize },

    #[error("span {start}..{end} of example {example_text:?}: start is after end")]
    InvalidSpan { start: u32, end: u32, example_text: String },

    #[error("{}: backend {requested} is not in this build; enable cargo feature `{feature}` or rebuild the index with --backend exact", .path.display())]
    BackendUnavailable { path: PathBuf, requested: BackendKind, feature: &'static str },

    #[error("{backend} backend: {message}")]
    Backend { backend: BackendKind, message: String },

    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl IndexError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        IndexError::Io { path: path.to_path_buf(), source }
    }
}
