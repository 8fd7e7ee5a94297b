//! Decoding: from scored candidate spans to one set of non-overlapping slots.
//!
//! Every candidate span is scored on its own (from its retrieved neighbours), so the
//! decisions are non-autoregressive; spans interact only through non-overlap, which
//! the decoder resolves. Two strategies, compared in BENCHMARKS.md:
//!
//! - [`Strategy::Greedy`]: take candidates by descending score, skipping any that
//!   overlaps one already taken (what a straightforward implementation does).
//! - [`Strategy::GreedyUniqueLabels`]: the same, also skipping a candidate whose label
//!   is already taken, so each label fills at most one slot per utterance. A prior, not
//!   a rule of language: nearly every SNIPS utterance obeys it (BENCHMARKS.md), a query
//!   such as "flights on monday or tuesday" does not. With a slot scorer, a span whose
//!   best label went to a better span is offered again with its second label
//!   ([`crate::labeler::decide_with`]).
//! - [`Strategy::BestAverage`]: the segmentation of the utterance (labeled spans plus
//!   single unlabeled words, each scored by its own similarity) whose *average*
//!   segment score is highest, found exactly by dynamic programming over
//!   (words covered, segments used). This is the objective of Yu et al. (2021), who
//!   approximate it with a beam search; the exact program costs O(n² · W) per
//!   utterance of n words, a few microseconds here.

use crate::spans::WordSpan;

/// A labeled candidate span and its score (a similarity in [-1, 1]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub span: WordSpan,
    pub label: u32,
    pub score: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Greedy,
    GreedyUniqueLabels,
    BestAverage,
}

impl Strategy {
    /// Whether candidates are taken best first (the greedy decoders), which is how a
    /// slot scorer's logits and the non-slot penalty rank them.
    pub fn is_greedy(self) -> bool {
        matches!(self, Strategy::Greedy | Strategy::GreedyUniqueLabels)
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "greedy" => Ok(Strategy::Greedy),
            "greedy-unique-labels" => Ok(Strategy::GreedyUniqueLabels),
            "best-average" => Ok(Strategy::BestAverage),
            other => {
                Err(format!("unknown decoder {other:?}; expected \"greedy\", \"greedy-unique-labels\" or \"best-average\""))
            }
        }
    }
}

/// Chooses non-overlapping candidates, returned sorted by start.
///
/// `word_scores[i]` is how well word `i` fits *no* slot (its best unlabeled-span
/// similarity, or the threshold when none is known); only `BestAverage` uses it.
///
/// ```
/// use nearspan::decode::{decode, Candidate, Strategy};
/// use nearspan::spans::WordSpan;
/// let c = |start, end, label, score| Candidate { span: WordSpan { start, end }, label, score };
/// // "black horse tavern" as one span beats its overlapping pieces.
/// let cands = [c(0, 3, 1, 0.9), c(0, 1, 2, 0.8), c(1, 3, 1, 0.85)];
/// let chosen = decode(&cands, &[0.5, 0.5, 0.5], Strategy::Greedy);
/// assert_eq!(chosen, [c(0, 3, 1, 0.9)]);
/// let chosen = decode(&cands, &[0.5, 0.5, 0.5], Strategy::BestAverage);
/// assert_eq!(chosen, [c(0, 3, 1, 0.9)]);
/// ```
pub fn decode(candidates: &[Candidate], word_scores: &[f32], strategy: Strategy) -> Vec<Candidate> {
    let mut chosen = match strategy {
        Strategy::Greedy => greedy(candidates, false),
        Strategy::GreedyUniqueLabels => greedy(candidates, true),
        Strategy::BestAverage => best_average(candidates, word_scores),
    };
    chosen.sort_by_key(|c| c.span.start);
    chosen
}

fn greedy(candidates: &[Candidate], unique_labels: bool) -> Vec<Candidate> {
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.span.cmp(&b.span)));
    let mut chosen: Vec<Candidate> = Vec::new();
    for c in order {
        let clashes = |k: &Candidate| k.span.overlaps(&c.span) || (unique_labels && k.label == c.label);
        if !chosen.iter().any(clashes) {
            chosen.push(*c);
        }
    }
    chosen
}

/// Exact maximum-average segmentation. `best[i][s]`: highest score sum covering words
/// `0..i` with exactly `s` segments, with a back-pointer to rebuild the choice.
fn best_average(candidates: &[Candidate], word_scores: &[f32]) -> Vec<Candidate> {
    let n = word_scores.len();
    if n == 0 {
        return Vec::new();
    }
    let mut ending_at: Vec<Vec<&Candidate>> = vec![Vec::new(); n + 1];
    for c in candidates.iter().filter(|c| c.span.end <= n && c.span.start < c.span.end) {
        ending_at[c.span.end].push(c);
    }
    const NONE: f32 = f32::NEG_INFINITY;
    // back[i][s] = (previous end, Some(candidate) or None for an unlabeled word)
    let mut best = vec![vec![NONE; n + 1]; n + 1];
    let mut back: Vec<Vec<(usize, Option<usize>)>> = vec![vec![(0, None); n + 1]; n + 1];
    best[0][0] = 0.0;
    for i in 1..=n {
        for s in 1..=i {
            let mut top = NONE;
            let mut from = (0, None);
            let plain = best[i - 1][s - 1];
            if plain > NONE {
                top = plain + word_scores[i - 1];
                from = (i - 1, None);
            }
            for (ci, c) in ending_at[i].iter().enumerate() {
                let prev = best[c.span.start][s - 1];
                if prev > NONE && prev + c.score > top {
                    top = prev + c.score;
                    from = (c.span.start, Some(ci));
                }
            }
            best[i][s] = top;
            back[i][s] = from;
        }
    }
    let (mut s, _) = (1..=n)
        .map(|s| (s, best[n][s] / s as f32))
        .filter(|(_, avg)| avg.is_finite())
        .fold((n, NONE), |acc, x| if x.1 > acc.1 { x } else { acc });
    let mut out = Vec::new();
    let mut i = n;
    while i > 0 && s > 0 {
        let (prev, cand) = back[i][s];
        if let Some(ci) = cand {
            out.push(*ending_at[i][ci]);
        }
        i = prev;
        s -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(start: usize, end: usize, label: u32, score: f32) -> Candidate {
        Candidate { span: WordSpan { start, end }, label, score }
    }

    #[test]
    fn empty_inputs_give_nothing() {
        assert!(decode(&[], &[], Strategy::BestAverage).is_empty());
        assert!(decode(&[], &[0.3, 0.2], Strategy::BestAverage).is_empty());
        assert!(decode(&[], &[0.3], Strategy::Greedy).is_empty());
    }

    #[test]
    fn greedy_keeps_disjoint_spans_in_order() {
        let out = decode(&[c(2, 3, 1, 0.7), c(0, 1, 2, 0.9), c(0, 3, 3, 0.8)], &[0.0; 3], Strategy::Greedy);
        assert_eq!(out, [c(0, 1, 2, 0.9), c(2, 3, 1, 0.7)]);
    }

    #[test]
    fn unique_labels_leave_a_taken_label_to_its_best_span() {
        // Two disjoint "city" spans; the weaker one gives way, a "state" span stays.
        let cands = [c(0, 1, 1, 0.9), c(2, 3, 1, 0.8), c(4, 5, 2, 0.7), c(2, 4, 2, 0.6)];
        let plain = decode(&cands, &[], Strategy::Greedy);
        assert_eq!(plain, [c(0, 1, 1, 0.9), c(2, 3, 1, 0.8), c(4, 5, 2, 0.7)]);
        let unique = decode(&cands, &[], Strategy::GreedyUniqueLabels);
        assert_eq!(unique, [c(0, 1, 1, 0.9), c(4, 5, 2, 0.7)]);
        // The decoder does not relabel the span that lost only its label to the taken one
        // (a span's other labels come as candidates of their own: with a slot scorer,
        // `decide_with` offers its second), and a lower-ranked span of a free label that
        // overlaps nothing chosen is taken.
        let unique = decode(&[c(0, 1, 1, 0.9), c(2, 3, 1, 0.8), c(2, 4, 2, 0.6)], &[], Strategy::GreedyUniqueLabels);
        assert_eq!(unique, [c(0, 1, 1, 0.9), c(2, 4, 2, 0.6)]);
    }

    #[test]
    fn decoder_names_parse_and_a_wrong_one_lists_them() {
        assert_eq!("greedy-unique-labels".parse::<Strategy>(), Ok(Strategy::GreedyUniqueLabels));
        assert!(Strategy::GreedyUniqueLabels.is_greedy() && !Strategy::BestAverage.is_greedy());
        let err = "unique".parse::<Strategy>().unwrap_err();
        assert!(err.contains("greedy-unique-labels") && err.contains("best-average"), "{err}");
    }

    #[test]
    fn best_average_skips_a_span_weaker_than_the_words_it_covers() {
        // Words fit "no slot" at 0.9 each; a 0.6 slot would lower the average.
        let out = decode(&[c(1, 2, 1, 0.6)], &[0.9, 0.9, 0.9], Strategy::BestAverage);
        assert!(out.is_empty(), "{out:?}");
        // ... but a 0.95 slot raises it.
        let out = decode(&[c(1, 2, 1, 0.95)], &[0.9, 0.9, 0.9], Strategy::BestAverage);
        assert_eq!(out, [c(1, 2, 1, 0.95)]);
    }

    /// Brute force over all subsets of non-overlapping candidates agrees with the DP.
    #[test]
    fn best_average_matches_brute_force() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32) / (1u64 << 31) as f32
        };
        for _ in 0..200 {
            let n = 1 + (rnd() * 6.0) as usize;
            let words: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let mut cands = Vec::new();
            for s in 0..n {
                for e in s + 1..=n.min(s + 3) {
                    if rnd() < 0.5 {
                        cands.push(c(s, e, (rnd() * 3.0) as u32, rnd()));
                    }
                }
            }
            let avg = |chosen: &[Candidate]| {
                let covered: usize = chosen.iter().map(|c| c.span.width()).sum();
                let mut sum: f32 = chosen.iter().map(|c| c.score).sum();
                for (i, w) in words.iter().enumerate() {
                    if !chosen.iter().any(|c| c.span.start <= i && i < c.span.end) {
                        sum += w;
                    }
                }
                sum / (chosen.len() + n - covered) as f32
            };
            let mut brute = f32::NEG_INFINITY;
            for mask in 0u32..(1 << cands.len()) {
                let pick: Vec<Candidate> =
                    cands.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, c)| *c).collect();
                let disjoint = pick.iter().enumerate().all(|(i, a)| pick[i + 1..].iter().all(|b| !a.span.overlaps(&b.span)));
                if disjoint {
                    brute = brute.max(avg(&pick));
                }
            }
            let dp = decode(&cands, &words, Strategy::BestAverage);
            assert!((avg(&dp) - brute).abs() < 1e-5, "dp {} brute {brute} {cands:?} {words:?}", avg(&dp));
        }
    }
}
