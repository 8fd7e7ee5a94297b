//! The inference encoder's matrix products, `x @ W^T` for a linear layer's weight `W`
//! (out x in, as stored), in the precision the user chose ([`Precision`]).
//!
//! - `F32`: the `gemm` crate (candle's own CPU matmul), weights as loaded. Exact up to
//!   summation order: the parity test against PyTorch holds at 1e-4.
//! - `Bf16`: weights rounded to bfloat16 once at load and packed in the tile layout of
//!   Intel AMX; activations rounded to bf16 per product; sums in f32. About 3
//!   significant digits per operand, so vectors move by about 1e-2 relative (the
//!   tolerance test in `tests/suite/encoder.rs` bounds it; BENCHMARKS.md gives the
//!   accuracy cost). Runs on AMX-BF16 tiles ([`amx`]) where the CPU has them, else on
//!   AVX512-BF16 vectors ([`avx512_bf16`], same packed weights, same rounded operands);
//!   asking for it on a CPU with neither is an error, not a silent fallback.

pub mod amx;
pub mod avx512_bf16;

use rayon::prelude::*;

/// Numeric precision of the encoder's matrix products at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout (the reference).
    #[default]
    F32,
    /// bf16 weights and activations in the matrix products, f32 sums and everything else.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether this machine can run the precision.
    pub fn is_supported(self) -> bool {
        match self {
            Precision::F32 => true,
            Precision::Bf16 => Bf16Kernel::detect().is_some(),
        }
    }
}

/// The instructions the bf16 products run on, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bf16Kernel {
    Amx,
    Avx512,
}

impl Bf16Kernel {
    fn detect() -> Option<Self> {
        if amx::available() {
            Some(Bf16Kernel::Amx)
        } else if avx512_bf16::available() {
            Some(Bf16Kernel::Avx512)
        } else {
            None
        }
    }

    /// Rows of C per kernel call (the kernels always cover 32 columns).
    fn block_rows(self) -> usize {
        match self {
            Bf16Kernel::Amx => 32,
            Bf16Kernel::Avx512 => avx512_bf16::ROWS,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision {other:?}; expected f32 or bf16")),
        }
    }
}

/// A linear layer's weight, ready for [`PackedWeight::matmul`].
#[derive(Debug, Clone)]
pub struct PackedWeight {
    out_dim: usize,
    in_dim: usize,
    data: WeightData,
}

#[derive(Debug, Clone)]
enum WeightData {
    /// (out, in) row-major, as stored in the model file, for the `gemm` crate; and, when
    /// `out` is a multiple of [`PANEL`], the same weights as panels for products of at
    /// most [`FEW_ROWS`] rows, where `gemm` is slow.
    F32 { w: Vec<f32>, panels: Option<Vec<f32>> },
    /// AMX B tiles: for each block of 16 outputs `nb` and each 32-deep block of inputs
    /// `kb`, one 16 x 32 tile at `(nb * k_blocks + kb) * 512` whose row `r` holds, for
    /// each output `j` of the block, the pair `W[j][kb*32 + 2r]`, `W[j][kb*32 + 2r + 1]`.
    /// (So each output block is `k / 2` consecutive rows of 32 bf16, one per k-pair: the
    /// AVX512-BF16 kernel's operand too.) With the kernel chosen when they were packed.
    Bf16 { packed: Vec<u16>, kernel: Bf16Kernel },
}

/// The bf16 nearest to `x` (round to nearest, ties to even); NaN stays NaN. Branch-free
/// so that loops over it vectorize.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x40) as u16;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

super::ops::multiversion! {
    /// `dst[i] = to_bf16(src[i])`.
    fn to_bf16_slice(src: &[f32], dst: &mut [u16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = to_bf16(s);
        }
    }
}

#[inline(always)]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

impl PackedWeight {
    /// Packs `w` (out_dim x in_dim, row-major). Bf16 needs both sizes to be multiples of
    /// 32 (every BERT size is); other shapes stay in f32.
    pub fn new(w: Vec<f32>, out_dim: usize, in_dim: usize, precision: Precision) -> Self {
        assert_eq!(w.len(), out_dim * in_dim, "weight size");
        let bf16_kernel = Bf16Kernel::detect().filter(|_| out_dim % 32 == 0 && in_dim % 32 == 0);
        let data = match (precision, bf16_kernel) {
            (Precision::Bf16, Some(kernel)) => WeightData::Bf16 { packed: pack_bf16(&w, out_dim, in_dim), kernel },
            _ => {
                let panels = (out_dim % PANEL == 0).then(|| pack_panels(&w, out_dim, in_dim));
                WeightData::F32 { w, panels }
            }
        };
        Self {
            out_dim,
            in_dim,
            data,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// `out (rows x out_dim) = x (rows x in_dim) @ W^T`, split over the rayon pool.
    pub fn matmul(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(
            x.len() >= rows * self.in_dim && out.len() >= rows * self.out_dim,
            "matmul: buffers too small"
        );
        if rows == 0 {
            return;
        }
        match &self.data {
            WeightData::F32 { panels: Some(panels), .. } if rows <= FEW_ROWS => {
                matmul_panels(panels, x, rows, self.in_dim, self.out_dim, out)
            }
            WeightData::F32 { w, .. } => super::ops::gemm_f32(
                (rows, self.out_dim, self.in_dim),
                (&mut out[..rows * self.out_dim], self.out_dim, 1),
                (&x[..rows * self.in_dim], self.in_dim, 1),
                (w, 1, self.in_dim),
                false,
            ),
            WeightData::Bf16 { packed, kernel } => matmul_bf16(*kernel, packed, x, rows, self.in_dim, self.out_dim, out),
        }
    }
}

/// Columns per f32 panel: two AVX-512 vectors.
const PANEL: usize = 32;

/// Up to this many rows, f32 products use the panel kernel: one text of a dozen tokens
/// ran 1.5–3x faster through it than through `gemm` (whose packing costs more than the
/// product at that size), while at 390 rows `gemm` was 2–3x faster.
const FEW_ROWS: usize = 16;

/// `W` (n x k) as panels of [`PANEL`] outputs, each k rows of PANEL weights, so that the
/// kernel reads one contiguous stream per panel.
fn pack_panels(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut panels = vec![0f32; n * k];
    for p in 0..n / PANEL {
        for kk in 0..k {
            for j in 0..PANEL {
                panels[(p * k + kk) * PANEL + j] = w[(p * PANEL + j) * k + kk];
            }
        }
    }
    panels
}

/// Rows per f32 kernel call.
const ROWS: usize = 4;

super::ops::multiversion! {
    /// `out[r][0..PANEL] = x[r] . panel` for ROWS rows of `x` (row stride k) against one
    /// panel (k x PANEL), accumulating in ROWS x PANEL registers (8 AVX-512 vectors).
    fn panel_rows(x: &[f32], k: usize, panel: &[f32], out: &mut [[f32; PANEL]; ROWS]) {
        let mut acc = [[0f32; PANEL]; ROWS];
        for (kk, w) in panel.chunks_exact(PANEL).enumerate().take(k) {
            for r in 0..ROWS {
                let xv = x[r * k + kk];
                for l in 0..PANEL {
                    acc[r][l] += xv * w[l];
                }
            }
        }
        *out = acc;
    }
}

fn matmul_panels(panels: &[f32], x: &[f32], rows: usize, k: usize, n: usize, out: &mut [f32]) {
    let padded = rows.next_multiple_of(ROWS);
    let mut xp;
    let x = if padded == rows {
        &x[..rows * k]
    } else {
        xp = vec![0f32; padded * k];
        xp[..rows * k].copy_from_slice(&x[..rows * k]);
        &xp[..]
    };
    let n_panels = n / PANEL;
    let tasks = rayon::current_num_threads().clamp(1, n_panels);
    let per_task = n_panels.div_ceil(tasks);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..n_panels).into_par_iter().step_by(per_task).for_each(move |first| {
        let out_ptr = out_ptr;
        let mut block = [[0f32; PANEL]; ROWS];
        for p in first..(first + per_task).min(n_panels) {
            let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
            for m0 in (0..padded).step_by(ROWS) {
                panel_rows(&x[m0 * k..(m0 + ROWS) * k], k, panel, &mut block);
                for (r, vals) in block.iter().enumerate().take(rows.saturating_sub(m0)) {
                    // SAFETY: row m0 + r < rows and columns p*PANEL.. < n: inside `out`,
                    // and each task writes only its own panels' columns.
                    unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), out_ptr.0.add((m0 + r) * n + p * PANEL), PANEL) };
                }
            }
        }
    });
}

/// `W` (n x k) rounded to bf16 in the layout of [`WeightData::Bf16`]: AMX B tiles, which
/// are also the AVX512-BF16 kernel's weight vectors.
fn pack_bf16(w: &[f32], n: usize, k: usize) -> Vec<u16> {
    let k_blocks = k / 32;
    let mut packed = vec![0u16; n * k];
    for nb in 0..n / 16 {
        for kb in 0..k_blocks {
            let tile = &mut packed[(nb * k_blocks + kb) * 512..][..512];
            for r in 0..16 {
                for j in 0..16 {
                    let row = &w[(nb * 16 + j) * k + kb * 32 + 2 * r..];
                    tile[r * 32 + 2 * j] = to_bf16(row[0]);
                    tile[r * 32 + 2 * j + 1] = to_bf16(row[1]);
                }
            }
        }
    }
    packed
}

/// A raw pointer that rayon tasks may share: each task writes a disjoint set of columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint column blocks of the output (see `matmul_amx`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `x` (rows x k, f32) rounded to bf16 as AMX A tiles: for each block of 16 rows `rb`
/// and each 32-deep block `kb`, one 16 x 32 tile at `(rb * k_blocks + kb) * 512`, row
/// `r` holding `x[rb*16 + r][kb*32..kb*32 + 32]`; rows past `rows` are zero up to
/// `padded` (a multiple of 16). A tile load then reads one contiguous KiB instead of
/// 16 rows 2k bytes apart: about 13% faster products in the medians of an A/B run here
/// (BENCHMARKS.md, `amx_packing_ab.json`).
fn pack_rows_amx(x: &[f32], rows: usize, k: usize, padded: usize) -> Vec<u16> {
    let k_blocks = k / 32;
    let mut a = vec![0u16; padded * k];
    a.par_chunks_mut(16 * k).enumerate().for_each(|(rb, block)| {
        for r in 0..16.min(rows.saturating_sub(rb * 16)) {
            let src = &x[(rb * 16 + r) * k..][..k];
            for kb in 0..k_blocks {
                to_bf16_slice(&src[kb * 32..kb * 32 + 32], &mut block[kb * 512 + r * 32..][..32]);
            }
        }
    });
    a
}

/// `out = x @ W^T` with `W` packed by [`pack_bf16`], on `kernel`, which this CPU has
/// (the tests run each one): x is rounded to bf16 (rows padded with zeros to the kernel's
/// block; as tiles for AMX, see [`pack_rows_amx`]), then each rayon task computes a run
/// of 32-column blocks, row block by row block so that the row block's A stays in the
/// L1 cache while the task's weights stream from L2.
fn matmul_bf16(kernel: Bf16Kernel, b: &[u16], x: &[f32], rows: usize, k: usize, n: usize, out: &mut [f32]) {
    let block_rows = kernel.block_rows();
    let k_blocks = k / 32;
    let padded = rows.next_multiple_of(block_rows);
    let a = match kernel {
        Bf16Kernel::Amx => pack_rows_amx(x, rows, k, padded),
        Bf16Kernel::Avx512 => {
            // A in bf16, row-major, zero rows below `rows` so the last block reads defined values.
            let mut a = vec![0u16; padded * k];
            a[..rows * k]
                .par_chunks_mut(64 * k)
                .zip(x[..rows * k].par_chunks(64 * k))
                .for_each(|(a, x)| to_bf16_slice(x, a));
            a
        }
    };
    let column_pairs = n / 32;
    let tasks = rayon::current_num_threads().clamp(1, column_pairs);
    let per_task = column_pairs.div_ceil(tasks);
    let out_ptr = SharedOut(out.as_mut_ptr());
    let a = &a;
    (0..column_pairs)
        .into_par_iter()
        .step_by(per_task)
        .for_each(move |first| {
            let out_ptr = out_ptr;
            let mut edge = [0f32; 32 * 32];
            // SAFETY: the kernel was detected on this CPU (`PackedWeight::new` keeps the one
            // `Bf16Kernel::detect` returned; the tests pass only available ones); every pointer stays
            // inside its buffer: A has `padded` rows of k (k even; for AMX, `padded / 16`
            // row blocks of `k_blocks` tiles), B has n/16 column blocks of `k_blocks`
            // tiles, C rows below `rows` go to `edge` (32 x 32 >= block_rows x 32).
            unsafe {
                if kernel == Bf16Kernel::Amx {
                    amx::configure();
                }
                for m0 in (0..padded).step_by(block_rows) {
                    let whole = m0 + block_rows <= rows;
                    for pair in first..(first + per_task).min(column_pairs) {
                        let b0 = b.as_ptr().add(2 * pair * k_blocks * 512);
                        let b1 = b0.add(k_blocks * 512);
                        let (c, ldc) = if whole {
                            (out_ptr.0.add(m0 * n + pair * 32), n)
                        } else {
                            (edge.as_mut_ptr(), 32)
                        };
                        match kernel {
                            Bf16Kernel::Amx => {
                                let a0 = a.as_ptr().add(m0 * k);
                                amx::block_32x32(a0, a0.add(16 * k), b0, b1, k_blocks, c, ldc)
                            }
                            Bf16Kernel::Avx512 => avx512_bf16::block_rows_x32(a.as_ptr().add(m0 * k), k, b0, b1, k / 2, c, ldc),
                        }
                        if !whole {
                            for r in 0..rows - m0 {
                                std::ptr::copy_nonoverlapping(
                                    edge.as_ptr().add(r * 32),
                                    out_ptr.0.add((m0 + r) * n + pair * 32),
                                    32,
                                );
                            }
                        }
                    }
                }
                if kernel == Bf16Kernel::Amx {
                    amx::release();
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize, round: bool) -> Vec<f32> {
        let r = |v: f32| if round { from_bf16(to_bf16(v)) } else { v };
        let mut out = vec![0f32; rows * n];
        for i in 0..rows {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| r(x[i * k + p]) as f64 * r(w[j * k + p]) as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }

    #[test]
    fn f32_matmul_matches_a_plain_loop() {
        // gemm (48 outputs: no panels), the panel kernel (few rows, 1 to 16, some not a
        // multiple of its 4-row step), and gemm again past 16 rows.
        for &(rows, k, n) in &[(7, 64, 48), (1, 64, 96), (7, 64, 96), (13, 96, 64), (16, 32, 32), (40, 64, 64)] {
            let (x, w) = (rand(rows * k, 1 + rows as u64), rand(n * k, 2));
            let mut out = vec![f32::NAN; rows * n];
            PackedWeight::new(w.clone(), n, k, Precision::F32).matmul(&x, rows, &mut out);
            let want = reference(&x, &w, rows, k, n, false);
            let err = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{rows}x{k}x{n}: {err}");
        }
    }

    /// Each bf16 kernel this CPU has (AMX tiles, AVX512-BF16 vectors) equals the exact
    /// product of the bf16-rounded operands (up to f32 summation order), for row counts
    /// below, at and past either kernel's row block, and for shapes that are not square.
    /// Skipped where neither kernel runs.
    #[test]
    fn bf16_matmul_is_the_exact_product_of_the_rounded_operands() {
        let kernels: Vec<Bf16Kernel> = [
            amx::available().then_some(Bf16Kernel::Amx),
            avx512_bf16::available().then_some(Bf16Kernel::Avx512),
        ]
        .into_iter()
        .flatten()
        .collect();
        if kernels.is_empty() {
            eprintln!("no AMX-BF16 or AVX512-BF16 here: skipped");
            return;
        }
        for kernel in kernels {
            for &(rows, k, n) in &[
                (1, 32, 32),
                (5, 384, 64),
                (12, 64, 32),
                (13, 64, 64),
                (32, 64, 96),
                (45, 128, 32),
                (70, 96, 160),
            ] {
                let (x, w) = (rand(rows * k, rows as u64), rand(n * k, 7 + n as u64));
                let packed = pack_bf16(&w, n, k);
                let mut out = vec![f32::NAN; rows * n];
                matmul_bf16(kernel, &packed, &x, rows, k, n, &mut out);
                let want = reference(&x, &w, rows, k, n, true);
                let err = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 1e-4, "{kernel:?} {rows}x{k}x{n}: {err}");
            }
        }
        // And through the public entry point, with the kernel it picks.
        let (rows, k, n) = (17, 64, 64);
        let (x, w) = (rand(rows * k, 3), rand(n * k, 4));
        let mut out = vec![f32::NAN; rows * n];
        PackedWeight::new(w.clone(), n, k, Precision::Bf16).matmul(&x, rows, &mut out);
        let want = reference(&x, &w, rows, k, n, true);
        assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4));
    }
}
