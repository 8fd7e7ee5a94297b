//! Slot scorer: a learned decision rule on a candidate span's retrieval evidence.
//!
//! The hand-set rule ([`crate::labeler::decide`]) keeps a span when its best slot
//! similarity clears a threshold and beats the non-slot similarity by a margin, and ranks
//! spans by a fixed mix of the two; four numbers, chosen on dev episodes. This is a
//! logistic regression on the same evidence and a little more (how far the second label
//! is behind, the span detector's logit), fitted on labeled utterances decoded against
//! their own index (for few-shot, the dev domain's episodes, where the hand-set rule is
//! chosen too); its logit says whether the span, with its best label, is a correct slot.
//! Greedy decoding then keeps non-overlapping spans by logit above
//! [`SlotScorer::min_logit`].
//!
//! It is linear and sees only the span's own evidence on purpose: a rule fitted on one
//! domain is used on another. A network with the neighbouring spans' evidence, the
//! span's width and its place in the utterance fitted the dev domain better and
//! transferred worse than the hand-set rule (BENCHMARKS.md, "A learned decision rule").

use std::path::Path;

use nearspan_index::SpanIndex;

use crate::data::Example;
use crate::detector::{logistic_loss, sigmoid, Adam};
use crate::labeler::{Retrieved, SpanEvidence};
use crate::spans::WordSpan;

/// Evidence per span: best slot similarity s, non-slot similarity o (0 when none was
/// retrieved) and whether there was one, s − o, the margin over the second label and
/// whether there was one, the detector's logit z (0 without a detector) and σ(z).
pub const N_FEATURES: usize = 8;

const FORMAT: &str = "nearspan-slot-scorer/1";

#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    #[error("{path}: cannot read the slot scorer: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not a slot scorer: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{path}: cannot write the slot scorer: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("no candidate span of the fitting data has a slot label to score")]
    NoCandidates,
    #[error("the fitting data has no correct slot among its candidates, so there is nothing to learn")]
    NoPositives,
}

/// `logit = w · (x − mean) / std + b` over [`features`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlotScorer {
    format: String,
    pub mean: [f32; N_FEATURES],
    pub std: [f32; N_FEATURES],
    pub w: [f32; N_FEATURES],
    pub b: f32,
    /// Spans scoring below this logit are never slots (chosen after fitting).
    pub min_logit: f32,
    /// Whether it was fitted with a span detector's logits: its weights for them mean
    /// nothing without one, and one it never saw would be ignored.
    pub with_detector: bool,
}

/// Lowest logits tried when [`SlotScorer::min_logit`] is chosen on labeled data.
pub const MIN_LOGIT_GRID: [f32; 8] = [-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0];

/// Fitting settings: full-batch Adam on the mean logistic loss with L2 weight decay.
#[derive(Debug, Clone, Copy)]
pub struct ScorerFit {
    pub epochs: usize,
    pub lr: f32,
    pub weight_decay: f32,
}

impl Default for ScorerFit {
    fn default() -> Self {
        Self { epochs: 300, lr: 1e-2, weight_decay: 1e-4 }
    }
}

/// One labeled utterance's evidence: what was retrieved for it and its gold slots
/// (word span, label id in the index it was retrieved from; slots whose label the index
/// lacks can never be found, so they are left out).
pub struct Labeled<'a> {
    pub retrieved: &'a Retrieved,
    pub gold: Vec<(WordSpan, u32)>,
}

impl<'a> Labeled<'a> {
    /// `gold`'s slots in the label ids of `index`, beside what was retrieved for it there.
    pub fn new(retrieved: &'a Retrieved, gold: &Example, index: &SpanIndex) -> Self {
        let gold = gold.spans.iter().filter_map(|s| Some((s.words(), index.label_id(&s.label)?.0))).collect();
        Labeled { retrieved, gold }
    }
}

/// The features of one span, `None` when it has no slot label to score.
pub fn features(e: &SpanEvidence) -> Option<[f32; N_FEATURES]> {
    features_as(e, 0)
}

/// The features of one span read as if its `rank`-th label (0: its best) were the one
/// to score: that label's similarity, and the margin over the best of the others (below
/// zero for any rank but 0). `None` when it has no such label.
pub fn features_as(e: &SpanEvidence, rank: usize) -> Option<[f32; N_FEATURES]> {
    let &(_, s, _) = e.by_label.get(rank)?;
    let o = e.o_score.unwrap_or(0.0);
    let second = e.by_label.get(if rank == 0 { 1 } else { 0 }).map(|x| x.1);
    let z = e.slotness.map_or(0.0, |z| if z.is_nan() { 0.0 } else { z.clamp(-30.0, 30.0) });
    let present = |x: bool| if x { 1.0 } else { 0.0 };
    Some([s, o, present(e.o_score.is_some()), s - o, s - second.unwrap_or(s), present(second.is_some()), z, sigmoid(z)])
}

impl SlotScorer {
    /// The scorer's logit for one feature row.
    pub fn logit(&self, x: &[f32; N_FEATURES]) -> f32 {
        self.b + (0..N_FEATURES).map(|k| self.w[k] * (x[k] - self.mean[k]) / self.std[k]).sum::<f32>()
    }

    /// Logit of every scorable span of `r` (position in `r.spans`, logit).
    pub fn score(&self, r: &Retrieved) -> Vec<(usize, f32)> {
        r.spans.iter().enumerate().filter_map(|(i, e)| Some((i, self.logit(&features(e)?)))).collect()
    }

    /// Fits a scorer on labeled utterances: a span's target is 1 when its boundaries
    /// are a gold slot's and its best label is that slot's label.
    pub fn fit(data: &[Labeled], cfg: &ScorerFit) -> Result<SlotScorer, ScorerError> {
        let mut rows: Vec<([f32; N_FEATURES], f32)> = Vec::new();
        for u in data {
            for e in &u.retrieved.spans {
                if let Some(x) = features(e) {
                    let correct = u.gold.contains(&(e.span, e.by_label[0].0));
                    rows.push((x, if correct { 1.0 } else { 0.0 }));
                }
            }
        }
        if rows.is_empty() {
            return Err(ScorerError::NoCandidates);
        }
        if !rows.iter().any(|r| r.1 > 0.5) {
            return Err(ScorerError::NoPositives);
        }
        let n = rows.len() as f32;
        let mean: [f32; N_FEATURES] = std::array::from_fn(|k| rows.iter().map(|r| r.0[k]).sum::<f32>() / n);
        let std: [f32; N_FEATURES] =
            std::array::from_fn(|k| (rows.iter().map(|r| (r.0[k] - mean[k]).powi(2)).sum::<f32>() / n).sqrt() + 1e-6);
        // Zero weights and the base rate's logit: the loss is convex, so the start
        // only changes how many steps it takes.
        let rate = rows.iter().filter(|r| r.1 > 0.5).count() as f32 / n;
        let with_detector = data.iter().flat_map(|u| &u.retrieved.spans).any(|e| e.slotness.is_some());
        let b = (rate / (1.0 - rate).max(1e-6)).ln();
        let mut s = SlotScorer { format: FORMAT.into(), mean, std, w: [0.0; N_FEATURES], b, min_logit: 0.0, with_detector };
        let mut adam = Adam::new(N_FEATURES + 1, cfg.lr);
        for _ in 0..cfg.epochs {
            let mut grad = s.gradient(&rows);
            // Mean loss gradient plus L2 decay (PyTorch's Adam(weight_decay) adds it the same way).
            for (g, p) in grad.iter_mut().zip(s.w.iter().chain([&s.b])) {
                *g += cfg.weight_decay * p;
            }
            adam.step(s.params_mut(), &grad, 1.0);
        }
        Ok(s)
    }

    /// Sets [`SlotScorer::min_logit`] to the value of [`MIN_LOGIT_GRID`] with the best
    /// `f1` (the first on ties) and returns that F1.
    pub fn choose_min_logit<E>(&mut self, mut f1: impl FnMut(&SlotScorer) -> Result<f64, E>) -> Result<f64, E> {
        let mut best = (f64::NEG_INFINITY, MIN_LOGIT_GRID[0]);
        for t in MIN_LOGIT_GRID {
            self.min_logit = t;
            let f = f1(self)?;
            if f > best.0 {
                best = (f, t);
            }
        }
        self.min_logit = best.1;
        Ok(best.0)
    }

    /// Reads a scorer written by [`SlotScorer::save`], naming the file and the field
    /// that is wrong.
    pub fn load(path: &Path) -> Result<SlotScorer, ScorerError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScorerError::Read { path: shown.clone(), source })?;
        let s: SlotScorer = serde_json::from_str(&text).map_err(|source| ScorerError::Parse { path: shown.clone(), source })?;
        let invalid = |reason: String| ScorerError::Invalid { path: shown.clone(), reason };
        if s.format != FORMAT {
            return Err(invalid(format!("format {:?}, expected {FORMAT:?}", s.format)));
        }
        let numbers = s.mean.iter().chain(&s.w).chain([&s.b, &s.min_logit]);
        if !numbers.chain(&s.std).all(|x| x.is_finite()) {
            return Err(invalid("a number is not finite".into()));
        }
        if !s.std.iter().all(|&x| x > 0.0) {
            return Err(invalid("field std: every entry must be positive".into()));
        }
        Ok(s)
    }

    /// Writes the scorer as JSON through a temporary file and a rename.
    pub fn save(&self, path: &Path) -> Result<(), ScorerError> {
        let shown = path.display().to_string();
        let json = serde_json::to_string_pretty(self).map_err(|source| ScorerError::Parse { path: shown.clone(), source })?;
        crate::train::checkpoint::write_file_atomic(path, json.as_bytes())
            .map_err(|e| ScorerError::Write { path: shown, source: std::io::Error::other(e.to_string()) })
    }

    /// Mean logistic loss over feature rows.
    pub fn loss(&self, rows: &[([f32; N_FEATURES], f32)]) -> f64 {
        rows.iter().map(|(x, y)| logistic_loss(self.logit(x), *y) as f64).sum::<f64>() / rows.len().max(1) as f64
    }

    /// Gradient of [`SlotScorer::loss`], laid out as [`SlotScorer::params_mut`].
    fn gradient(&self, rows: &[([f32; N_FEATURES], f32)]) -> Vec<f32> {
        let mut grad = vec![0f32; N_FEATURES + 1];
        for (x, y) in rows {
            let dz = sigmoid(self.logit(x)) - y;
            for k in 0..N_FEATURES {
                grad[k] += dz * (x[k] - self.mean[k]) / self.std[k];
            }
            grad[N_FEATURES] += dz;
        }
        let n = rows.len().max(1) as f32;
        grad.iter_mut().for_each(|g| *g /= n);
        grad
    }

    fn params_mut(&mut self) -> impl Iterator<Item = &mut f32> {
        self.w.iter_mut().chain(std::iter::once(&mut self.b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::rng::Rng;

    fn evidence(start: usize, end: usize, s: f32, o: f32, z: f32) -> SpanEvidence {
        SpanEvidence { span: WordSpan { start, end }, by_label: vec![(1, s, 0)], o_score: Some(o), slotness: Some(z), memory: Vec::new() }
    }

    /// Finite differences of the mean loss agree with the hand-written gradient.
    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = Rng::new(3);
        let rows: Vec<([f32; N_FEATURES], f32)> =
            (0..6).map(|i| (std::array::from_fn(|_| rng.unit() * 2.0 - 1.0), (i % 2) as f32)).collect();
        let mut s = SlotScorer {
            format: FORMAT.into(),
            mean: [0.1; N_FEATURES],
            std: [0.9; N_FEATURES],
            w: std::array::from_fn(|_| rng.unit() - 0.5),
            b: 0.2,
            min_logit: 0.0,
            with_detector: true,
        };
        let grad = s.gradient(&rows);
        for j in 0..=N_FEATURES {
            let h = 1e-2f32;
            let nudge = |s: &mut SlotScorer, by: f32| *s.params_mut().nth(j).unwrap() += by;
            nudge(&mut s, h);
            let up = s.loss(&rows);
            nudge(&mut s, -2.0 * h);
            let down = s.loss(&rows);
            nudge(&mut s, h);
            let numeric = (up - down) / (2.0 * h as f64);
            assert!((numeric - grad[j] as f64).abs() < 1e-3 * (1.0 + numeric.abs()), "param {j}: {numeric} vs {}", grad[j]);
        }
    }

    /// A rule no threshold on the similarity can express (the detector alone decides)
    /// is learned from examples and carries to new ones.
    #[test]
    fn fitting_learns_a_rule_that_carries_to_new_spans() {
        let mut rng = Rng::new(11);
        let mut utterance = || {
            let spans = (0..8)
                .map(|i| {
                    let z = rng.unit() * 8.0 - 4.0;
                    evidence(i, i + 1, 0.5 + 0.4 * rng.unit(), 0.5 + 0.4 * rng.unit(), z)
                })
                .collect();
            Retrieved { spans, utterances: vec![] }
        };
        let gold = |r: &Retrieved| -> Vec<(WordSpan, u32)> {
            r.spans.iter().filter(|e| e.slotness.unwrap() > 0.0).map(|e| (e.span, 1)).collect()
        };
        let train: Vec<Retrieved> = (0..50).map(|_| utterance()).collect();
        let data: Vec<Labeled> = train.iter().map(|r| Labeled { retrieved: r, gold: gold(r) }).collect();
        let s = SlotScorer::fit(&data, &ScorerFit::default()).unwrap();
        let (mut right, mut total) = (0, 0);
        for _ in 0..20 {
            let r = utterance();
            let g = gold(&r);
            for (i, logit) in s.score(&r) {
                right += ((logit > 0.0) == g.iter().any(|x| x.0 == r.spans[i].span)) as usize;
                total += 1;
            }
        }
        assert!(right * 100 >= total * 95, "{right} of {total} new spans right");
    }

    #[test]
    fn save_and_load_round_trip_and_bad_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scorer.json");
        let r = Retrieved { spans: vec![evidence(0, 1, 0.9, 0.2, 3.0), evidence(1, 2, 0.4, 0.8, -3.0)], utterances: vec![] };
        let data = [Labeled { retrieved: &r, gold: vec![(WordSpan { start: 0, end: 1 }, 1)] }];
        let mut s = SlotScorer::fit(&data, &ScorerFit::default()).unwrap();
        s.min_logit = -1.5;
        s.save(&path).unwrap();
        assert_eq!(SlotScorer::load(&path).unwrap(), s);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut negative_std: serde_json::Value = serde_json::from_str(&text).unwrap();
        negative_std["std"][2] = serde_json::json!(-1.0);
        let broken = [
            (text.replace("nearspan-slot-scorer/1", "nearspan-slot-scorer/9"), "format"),
            (negative_std.to_string(), "field std"),
            (text.replace("\"w\"", "\"weights\""), "not a slot scorer"),
        ];
        for (content, expected) in broken {
            std::fs::write(&path, content).unwrap();
            let err = SlotScorer::load(&path).unwrap_err().to_string();
            assert!(err.contains("scorer.json") && err.contains(expected), "{err}");
        }
        let missing = SlotScorer::load(&dir.path().join("none.json")).unwrap_err().to_string();
        assert!(missing.contains("none.json"), "{missing}");
    }

    #[test]
    fn fitting_without_a_correct_slot_is_an_error() {
        let r = Retrieved { spans: vec![evidence(0, 1, 0.8, 0.5, 0.0)], utterances: vec![] };
        let data = [Labeled { retrieved: &r, gold: vec![] }];
        assert!(matches!(SlotScorer::fit(&data, &ScorerFit::default()), Err(ScorerError::NoPositives)));
        let empty = Retrieved { spans: vec![], utterances: vec![] };
        let data = [Labeled { retrieved: &empty, gold: vec![] }];
        assert!(matches!(SlotScorer::fit(&data, &ScorerFit::default()), Err(ScorerError::NoCandidates)));
    }
}
