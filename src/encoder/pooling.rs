//! Pooling token vectors into sentence and span vectors.

use std::ops::Range;

/// How a span's vector is made from its sub-token vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpanPooling {
    /// Mean of the span's sub-token vectors (dimension = hidden size).
    Mean,
    /// First sub-token vector ⊕ last sub-token vector (dimension = 2 × hidden size),
    /// as in the Retriever paper's code.
    StartEnd,
    /// First ⊕ last ⊕ mean of the span's sub-token vectors (dimension = 3 × hidden size).
    StartEndMean,
}

impl SpanPooling {
    pub fn dim(self, hidden: usize) -> usize {
        match self {
            SpanPooling::Mean => hidden,
            SpanPooling::StartEnd => 2 * hidden,
            SpanPooling::StartEndMean => 3 * hidden,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SpanPooling::Mean => "mean",
            SpanPooling::StartEnd => "start-end",
            SpanPooling::StartEndMean => "start-end-mean",
        }
    }
}

impl std::str::FromStr for SpanPooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(SpanPooling::Mean),
            "start-end" => Ok(SpanPooling::StartEnd),
            "start-end-mean" => Ok(SpanPooling::StartEndMean),
            other => Err(format!("unknown pooling {other:?}; expected \"start-end\", \"mean\" or \"start-end-mean\"")),
        }
    }
}

/// Sentence vector: mean over all tokens ([CLS] and [SEP] included, padding excluded),
/// then L2-normalized, exactly as sentence-transformers' `Pooling(mode_mean_tokens)` +
/// `Normalize` for all-MiniLM-L6-v2. `hidden` is (tokens × dim), row-major.
pub fn sentence_vector(hidden: &[f32], dim: usize) -> Vec<f32> {
    let n = hidden.len() / dim;
    let mut out = vec![0f32; dim];
    mean_rows_into(hidden, dim, 0..n, &mut out);
    normalize(&mut out);
    out
}

/// Writes the pooled, L2-normalized vector of the tokens `tokens` into `out`
/// (`out.len() == pooling.dim(dim)`). An empty token range gives a zero vector.
pub fn span_vector_into(hidden: &[f32], dim: usize, tokens: Range<usize>, pooling: SpanPooling, out: &mut [f32]) {
    out.fill(0.0);
    if tokens.is_empty() {
        return;
    }
    match pooling {
        SpanPooling::Mean => mean_rows_into(hidden, dim, tokens, out),
        SpanPooling::StartEnd => {
            let (first, last) = (tokens.start, tokens.end - 1);
            out[..dim].copy_from_slice(&hidden[first * dim..(first + 1) * dim]);
            out[dim..].copy_from_slice(&hidden[last * dim..(last + 1) * dim]);
        }
        SpanPooling::StartEndMean => {
            let (first, last) = (tokens.start, tokens.end - 1);
            out[..dim].copy_from_slice(&hidden[first * dim..(first + 1) * dim]);
            out[dim..2 * dim].copy_from_slice(&hidden[last * dim..(last + 1) * dim]);
            mean_rows_into(hidden, dim, tokens, &mut out[2 * dim..]);
        }
    }
    normalize(out);
}

fn mean_rows_into(hidden: &[f32], dim: usize, rows: Range<usize>, out: &mut [f32]) {
    let n = rows.len().max(1) as f32;
    for r in rows {
        for (o, x) in out.iter_mut().zip(&hidden[r * dim..(r + 1) * dim]) {
            *o += x;
        }
    }
    for o in out.iter_mut() {
        *o /= n;
    }
}

/// Scales `v` to unit length (left as is when it is all zeros).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_span_vector_is_normalized_mean() {
        // 3 tokens of dim 2.
        let hidden = [1.0, 0.0, 3.0, 4.0, 0.0, 2.0];
        let mut out = [0.0; 2];
        span_vector_into(&hidden, 2, 1..3, SpanPooling::Mean, &mut out);
        // mean of (3,4),(0,2) = (1.5,3) → /|.|
        let n = (1.5f32 * 1.5 + 9.0).sqrt();
        assert!((out[0] - 1.5 / n).abs() < 1e-6 && (out[1] - 3.0 / n).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn start_end_concatenates_first_and_last() {
        let hidden = [1.0, 0.0, 3.0, 4.0, 0.0, 2.0];
        let mut out = [0.0; 4];
        span_vector_into(&hidden, 2, 0..3, SpanPooling::StartEnd, &mut out);
        let n = (1.0f32 + 4.0).sqrt();
        let want = [1.0 / n, 0.0, 0.0, 2.0 / n];
        assert!(out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{out:?}");
    }

    #[test]
    fn start_end_mean_appends_the_mean() {
        let hidden = [1.0, 0.0, 3.0, 4.0, 0.0, 2.0];
        let mut out = [0.0; 6];
        span_vector_into(&hidden, 2, 0..3, SpanPooling::StartEndMean, &mut out);
        // (1,0) ⊕ (0,2) ⊕ mean (4/3, 2) → normalized.
        let raw = [1.0f32, 0.0, 0.0, 2.0, 4.0 / 3.0, 2.0];
        let n = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(out.iter().zip(raw).all(|(a, b)| (a - b / n).abs() < 1e-6), "{out:?}");
        assert_eq!(SpanPooling::StartEndMean.dim(2), 6);
        assert_eq!("start-end-mean".parse::<SpanPooling>(), Ok(SpanPooling::StartEndMean));
    }

    #[test]
    fn empty_span_is_zero() {
        let mut out = [9.0; 2];
        span_vector_into(&[1.0, 2.0], 2, 1..1, SpanPooling::Mean, &mut out);
        assert_eq!(out, [0.0, 0.0]);
    }
}
