//! Hou et al. (2020) few-shot slot-tagging episodes:
//! `{domain: [{"support": part, "batch": part}, ...]}` where a part holds parallel lists
//! `seq_ins` (words), `seq_outs` (IOB2 tags) and `labels` (intents). `batch` is the query
//! set. The word-piece fields are skipped. These files are one JSON line, so errors name
//! the domain, episode and sentence instead of a line.

use std::path::Path;

use serde::Deserialize;

use super::json::{read_json, OrderedMap};
use super::{DataError, Episode, Example, Split};

#[derive(Deserialize)]
struct RawEpisode {
    support: RawPart,
    batch: RawPart,
}

#[derive(Deserialize)]
struct RawPart {
    seq_ins: Vec<Vec<String>>,
    seq_outs: Vec<Vec<String>>,
    #[serde(default)]
    labels: Vec<String>,
}

/// Reads one `test.json`: each domain with its episodes, in file order.
pub fn read_fewshot(path: &Path) -> Result<Vec<(String, Vec<Episode>)>, DataError> {
    let raw: OrderedMap<Vec<RawEpisode>> = read_json(path)?;
    raw.0
        .into_iter()
        .map(|(domain, episodes)| {
            let episodes = episodes
                .into_iter()
                .enumerate()
                .map(|(i, e)| convert_episode(path, &domain, i + 1, e))
                .collect::<Result<_, _>>()?;
            Ok((domain, episodes))
        })
        .collect()
}

/// Through [`super::load`]: all support sets, then all query sets, as two splits.
pub(crate) fn read_dataset(path: &Path) -> Result<Vec<Split>, DataError> {
    let (mut support, mut query) = (Vec::new(), Vec::new());
    for (_, episodes) in read_fewshot(path)? {
        for e in episodes {
            support.extend(e.support);
            query.extend(e.query);
        }
    }
    let split = |name: &str, examples| Split { name: name.into(), source: path.to_path_buf(), examples };
    Ok(vec![split("support", support), split("query", query)])
}

fn convert_episode(path: &Path, domain: &str, n: usize, e: RawEpisode) -> Result<Episode, DataError> {
    let place = |part: &str| format!("{domain} episode {n} {part}");
    Ok(Episode {
        support: convert_part(path, &place("support"), e.support)?,
        query: convert_part(path, &place("batch"), e.batch)?,
    })
}

fn convert_part(path: &Path, place: &str, part: RawPart) -> Result<Vec<Example>, DataError> {
    let n = part.seq_ins.len();
    let structure = |what: String| DataError::Structure { path: path.into(), place: place.into(), what };
    if part.seq_outs.len() != n {
        return Err(structure(format!("{n} seq_ins but {} seq_outs", part.seq_outs.len())));
    }
    if !part.labels.is_empty() && part.labels.len() != n {
        return Err(structure(format!("{n} seq_ins but {} labels", part.labels.len())));
    }
    let mut labels = part.labels.into_iter().map(Some).chain(std::iter::repeat(None));
    let mut out = Vec::with_capacity(n);
    for (k, (words, tags)) in part.seq_ins.iter().zip(&part.seq_outs).enumerate() {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        let example = Example::from_words(&words, &tags, labels.next().flatten()).map_err(|source| {
            DataError::BioAt { path: path.into(), place: format!("{place} sentence {}", k + 1), source }
        })?;
        out.push(example);
    }
    Ok(out)
}
