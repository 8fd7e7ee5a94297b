//! nearspan: few-shot, retrieval-based span labeling.
//!
//! The pipeline, one module per stage: [`encoder`] turns text into token vectors,
//! [`spans`] enumerates candidate spans and pools their vectors, the `nearspan-index`
//! crate retrieves labeled neighbours, [`decode`] picks non-overlapping slots,
//! [`eval`] scores predictions against gold data read by [`data`].
pub mod data;
pub mod eval;
pub mod encoder;
pub mod paths;
pub mod train;
pub mod spans;
pub mod decode;
pub mod detector;
pub mod scorer;
pub mod labeler;
pub mod cli;
pub mod bench;
#[cfg(feature = "server")]
pub mod serve;
