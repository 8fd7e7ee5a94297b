//! One integration-test binary (linking candle once), a module per area.

#[path = "suite/common.rs"]
mod common;
#[path = "suite/encoder.rs"]
mod encoder;
#[path = "suite/train.rs"]
mod train;
#[path = "suite/baseline.rs"]
mod baseline;
#[path = "suite/training.rs"]
mod training;
#[path = "suite/data.rs"]
mod data;
#[path = "suite/eval.rs"]
mod eval;
#[path = "suite/labeler.rs"]
mod labeler;
#[path = "suite/cli.rs"]
mod cli;
#[cfg(feature = "server")]
#[path = "suite/serve.rs"]
mod serve;
