//! Rows that are one block repeated, stored once.
//!
//! The index has one dimension for spans and utterances; with start ⊕ end spans the
//! utterance vector is the sentence vector tiled twice (and scaled), so half of every
//! utterance row repeats the other half. For a query `q = q₁ ⊕ q₂` and a row `v ⊕ v`,
//! `q · (v ⊕ v) = (q₁ + q₂) · v`: exact search can fold the query and read half the bytes.

use super::exact::exact_search;
use crate::Neighbor;

/// The block of each row of a matrix whose rows are that block `copies` times.
pub(crate) struct TiledRows {
    copies: usize,
    width: usize,
    blocks: Vec<f32>,
}

impl TiledRows {
    /// The smallest tiling (2, 3 or 4 copies) that every row of `data` (`dim` wide)
    /// repeats exactly, bit for bit; `None` if there is none or `data` is empty.
    pub(crate) fn detect(data: &[f32], dim: usize) -> Option<TiledRows> {
        if dim == 0 || data.is_empty() || data.len() % dim != 0 {
            return None;
        }
        let copies = (2..=4).filter(|c| dim % c == 0).find(|&c| data.chunks_exact(dim).all(|row| is_tiled(row, c)))?;
        let width = dim / copies;
        let blocks = data.chunks_exact(dim).flat_map(|row| row[..width].iter().copied()).collect();
        Some(TiledRows { copies, width, blocks })
    }

    /// Appends a row; false (and nothing appended) if it is not tiled the same way.
    pub(crate) fn push(&mut self, row: &[f32]) -> bool {
        if row.len() != self.copies * self.width || !is_tiled(row, self.copies) {
            return false;
        }
        self.blocks.extend_from_slice(&row[..self.width]);
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.blocks.len() / self.width
    }

    /// [`exact_search`] of the full rows for `queries` (row-major, `copies × width`
    /// wide), reading only the blocks.
    pub(crate) fn search(&self, queries: &[f32], k: usize) -> Vec<Vec<Neighbor>> {
        let dim = self.copies * self.width;
        assert!(queries.len() % dim == 0, "query of {} floats is not a multiple of {dim}", queries.len());
        let folded: Vec<f32> = queries
            .chunks_exact(dim)
            .flat_map(|q| (0..self.width).map(move |i| (0..self.copies).map(|c| q[c * self.width + i]).sum::<f32>()))
            .collect();
        exact_search(&self.blocks, self.width, &folded, k)
    }
}

fn is_tiled(row: &[f32], copies: usize) -> bool {
    let width = row.len() / copies;
    let (first, rest) = row.split_at(width);
    rest.chunks_exact(width).all(|block| block.iter().zip(first).all(|(a, b)| a.to_bits() == b.to_bits()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_search_scores_like_the_full_rows() {
        let width = 20;
        let mut rnd = crate::backend::test_floats(9);
        let rows: Vec<f32> = (0..300).flat_map(|_| {
            let b: Vec<f32> = (0..width).map(|_| rnd()).collect();
            b.iter().chain(&b).copied().collect::<Vec<_>>()
        }).collect();
        let t = TiledRows::detect(&rows, 2 * width).expect("rows are tiled twice");
        assert_eq!((t.copies, t.len()), (2, 300));
        // queries need not be tiled
        let queries: Vec<f32> = (0..3 * 2 * width).map(|_| rnd()).collect();
        let want = exact_search(&rows, 2 * width, &queries, 5);
        let got = t.search(&queries, 5);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.iter().map(|n| n.id).collect::<Vec<_>>(), w.iter().map(|n| n.id).collect::<Vec<_>>());
            for (a, b) in g.iter().zip(w) {
                assert!((a.similarity - b.similarity).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rows_that_differ_in_one_bit_are_not_tiled() {
        let mut rows = vec![0.5f32, -1.0, 0.5, -1.0, 2.0, 3.0, 2.0, 3.0];
        let mut t = TiledRows::detect(&rows, 4).unwrap();
        assert!(!t.push(&[1.0, 2.0, 1.0, 2.5]));
        assert!(t.push(&[1.0, 2.0, 1.0, 2.0]));
        assert_eq!(t.len(), 3);
        rows[7] = f32::from_bits(3.0f32.to_bits() + 1);
        assert!(TiledRows::detect(&rows, 4).is_none());
        // three copies are found where two do not divide the row
        assert_eq!(TiledRows::detect(&[1.0, 2.0, 1.0, 2.0, 1.0, 2.0], 6).unwrap().copies, 3);
        assert!(TiledRows::detect(&[], 4).is_none());
    }
}
