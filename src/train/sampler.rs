//! Batch plans: which training examples go into each step of an epoch.
//!
//! The batch-softmax objective needs, for every label in a batch, at least one *other*
//! member of that label to compare against. [`label_batches`] guarantees it: a batch is
//! filled group by group, `per_label` examples of one label at a time.

use std::collections::BTreeMap;

use super::rng::Rng;

/// Plans one epoch of `ceil(n / batch_size)` batches for examples that each carry one
/// or more group keys (their slot labels; an example with none, its intent). Each batch
/// is filled with `per_label` distinct examples of one group at a time, groups visited
/// in a shuffled cycle, so every group drawn has at least `min(per_label, group size)`
/// members; batches hold at least `batch_size` examples (a few more when the last group
/// added overshoots).
pub fn label_batches(groups_of: &[Vec<String>], batch_size: usize, per_label: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let n = groups_of.len();
    if n == 0 {
        return Vec::new();
    }
    let batch_size = batch_size.clamp(1, n);
    let per_label = per_label.max(2);
    let mut members: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, gs) in groups_of.iter().enumerate() {
        for g in gs {
            members.entry(g.as_str()).or_default().push(i);
        }
    }
    let mut pools: Vec<(Vec<usize>, usize)> = members.into_values().map(|mut v| {
        rng.shuffle(&mut v);
        (v, 0)
    }).collect();
    let mut order: Vec<usize> = (0..pools.len()).collect();
    rng.shuffle(&mut order);
    let mut cursor = 0;
    let steps = n.div_ceil(batch_size);
    let mut in_batch = vec![false; n];
    let mut plan = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut batch: Vec<usize> = Vec::with_capacity(batch_size + per_label);
        let mut tries = 0;
        while batch.len() < batch_size && tries < 4 * pools.len() + 4 {
            tries += 1;
            if cursor == order.len() {
                rng.shuffle(&mut order);
                cursor = 0;
            }
            let (pool, next) = &mut pools[order[cursor]];
            cursor += 1;
            let mut taken = 0;
            for _ in 0..pool.len() {
                if taken == per_label {
                    break;
                }
                let i = pool[*next];
                *next = (*next + 1) % pool.len();
                if !in_batch[i] {
                    in_batch[i] = true;
                    batch.push(i);
                    taken += 1;
                }
            }
        }
        for &i in &batch {
            in_batch[i] = false;
        }
        plan.push(batch);
    }
    plan
}

/// Plans one epoch of shuffled batches covering every example once (the baseline).
pub fn shuffled_batches(n: usize, batch_size: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    idx.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn groups(spec: &[&[&str]]) -> Vec<Vec<String>> {
        spec.iter().map(|gs| gs.iter().map(|s| s.to_string()).collect()).collect()
    }

    #[test]
    fn every_group_in_a_batch_has_at_least_two_members_when_it_can() {
        // 6 labels of 10 examples each, one rare label with 2 examples.
        let mut spec: Vec<Vec<String>> = Vec::new();
        for l in 0..6 {
            for _ in 0..10 {
                spec.push(vec![format!("L{l}")]);
            }
        }
        spec.push(vec!["rare".into()]);
        spec.push(vec!["rare".into(), "L0".into()]);
        let plan = label_batches(&spec, 8, 4, &mut Rng::new(5));
        assert_eq!(plan.len(), spec.len().div_ceil(8));
        for batch in &plan {
            assert!(batch.len() >= 8, "{batch:?}");
            let mut seen = batch.clone();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), batch.len(), "duplicate example in {batch:?}");
            let mut count: HashMap<&str, usize> = HashMap::new();
            for &i in batch {
                for g in &spec[i] {
                    *count.entry(g).or_default() += 1;
                }
            }
            // A label drawn for the batch brings at least two members; a label can be
            // alone only when it rode along on an example drawn for another label.
            for (g, c) in count {
                if c == 1 {
                    let carrier = batch.iter().find(|&&i| spec[i].iter().any(|x| x == g)).unwrap();
                    assert!(spec[*carrier].len() > 1, "label {g} alone in {batch:?}");
                }
            }
        }
    }

    #[test]
    fn same_seed_same_plan() {
        let spec = groups(&[&["a"], &["a"], &["b"], &["b"], &["c"], &["c"]]);
        assert_eq!(label_batches(&spec, 4, 2, &mut Rng::new(1)), label_batches(&spec, 4, 2, &mut Rng::new(1)));
    }

    #[test]
    fn shuffled_batches_cover_everything_once() {
        let plan = shuffled_batches(10, 4, &mut Rng::new(2));
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let mut all: Vec<usize> = plan.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
