//! Fused CPU kernels with an analytic backward, for the training forward pass
//! ([`super::ForwardMode::Train`]).
//!
//! Why: candle-nn's fused `layer_norm` and `softmax_last_dim` have no backward (gradients
//! silently stop there), and the differentiable compositions (`layer_norm_slow`,
//! `ops::softmax`, `ops::dropout`, the attention's head split and merge, `gelu_erf`'s
//! backward) cost 5 to 11 tensor ops each in the forward pass and as many again in the
//! backward pass, where candle adds every gradient into a freshly zeroed tensor. Each op
//! here is one pass forward and one pass backward over memory, with its gradients
//! written out directly:
//!
//! - [`linear`]: `x @ w^T`, whose backward writes the weight gradient in the weight's own
//!   layout (candle's `matmul(&w.t())` adds it through a strided copy).
//! - [`layer_norm`]: `(x - mean) / sqrt(var + eps) * w + b` over the last dimension;
//!   gradients for `x`, `w` and `b` (candle's `CustomOp3` backward returns all three).
//! - [`attention`]: multi-head self-attention from the stacked query/key/value
//!   projections (bias, head split, scaled and masked softmax, dropout on the
//!   probabilities, the product with the values, head merge); the backward pass
//!   recomputes the probabilities instead of storing them.
//! - [`softmax_last_dim`]: `dx = y * (g - sum(g * y))`.
//! - [`gelu_erf`] and [`bias_gelu`] (with the preceding linear layer's bias folded in):
//!   the exact erf GELU, whose derivative `Phi(x) + x phi(x)` shares one `exp` with the
//!   value.
//! - [`dropout`] and [`bias_dropout_add`] (a linear layer's bias, dropout and the residual
//!   sum): the keep mask is a hash of a per-call seed and the element index, so the
//!   backward pass regenerates it instead of storing it.
//!
//! Every op wants f32 on the CPU and makes its inputs contiguous (a no-op when they are).
//! The work is split over the rayon pool by rows (by sequence for the attention). The
//! inner loops are written to vectorize (no bounds checks, sums in 16 lanes, `exp` and
//! `erf` as branch-free polynomials with relative error about 2e-7, see [`exp_f32`]),
//! and [`multiversion!`] compiles each kernel for AVX-512, AVX2 + FMA and the baseline,
//! chosen at run time. The values agree with candle's composed ops to about 1e-6 (the
//! tests below check forward values to 1e-5 and gradients to 1e-4 relative).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------
// Shared helpers.

/// Defines `fn $name(args) -> ret` whose body is compiled three times: for AVX-512 (F
/// and VL), for AVX2 + FMA, and for the baseline the crate is built for (SSE2 on
/// x86-64); the first the CPU supports runs (std caches the feature check). The body
/// should call `#[inline(always)]` kernels so that they are compiled inside each copy.
/// (Rust does not contract `a * b + c` into an FMA, so all three compute the same
/// rounding per element; only the lane order of the 16-lane sums can differ.)
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU has every feature `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `v3`.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body
        }
    };
}

pub(crate) use multiversion;

/// The f32 data of a contiguous CPU input.
fn data<'a>(op: &'static str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let all = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => bail!("{op}: expects f32, got {:?}", candle_core::backend::BackendStorage::dtype(other)),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => bail!("{op}: expects a contiguous input"),
    }
}

/// (rows, width) of a tensor seen as rows of its last dimension.
fn rows_of(op: &'static str, l: &Layout) -> Result<(usize, usize)> {
    let n = match l.dims().last() {
        Some(&n) if n > 0 => n,
        _ => bail!("{op}: expects a non-empty last dimension, got shape {:?}", l.dims()),
    };
    Ok((l.shape().elem_count() / n, n))
}

/// Rows per rayon task: a few tasks per thread, each at least `MIN_TASK_ELEMS`
/// elements, so that small tensors are not split into tasks cheaper than scheduling.
fn rows_per_task(rows: usize, width: usize) -> usize {
    const MIN_TASK_ELEMS: usize = 16 * 1024;
    let tasks = 4 * rayon::current_num_threads().max(1);
    rows.div_ceil(tasks).max(MIN_TASK_ELEMS.div_ceil(width.max(1))).max(1)
}

/// Runs `f(first_row, out_rows)` over blocks of rows of `out` (rows of `width`) in parallel.
pub(crate) fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let block = rows_per_task(out.len() / width.max(1), width);
    out.par_chunks_mut(block * width).enumerate().for_each(|(i, chunk)| f(i * block, chunk));
}

/// Like [`par_rows`] over blocks of `block` rows, summing the `acc_len` partial sums that
/// each block accumulates with `f(first_row, out_rows, partial)` (for bias and weight
/// gradients, which sum over rows).
fn par_rows_sum(
    out: &mut [f32],
    width: usize,
    block: usize,
    acc_len: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    out.par_chunks_mut(block * width)
        .enumerate()
        .map(|(i, chunk)| {
            let mut acc = vec![0f32; acc_len];
            f(i * block, chunk, &mut acc);
            acc
        })
        .reduce(
            || vec![0f32; acc_len],
            |mut a, b| {
                add_assign(&mut a, &b);
                a
            },
        )
}

fn f32_out(v: Vec<f32>, shape: &Shape) -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(v), shape.clone()))
}

/// Splits a packed backward output (`len` elements of the first gradient, then vectors
/// of `tails` lengths) into views.
fn unpack(packed: &Tensor, first: &Shape, tails: &[usize]) -> Result<Vec<Tensor>> {
    let len = first.elem_count();
    let mut out = vec![packed.narrow(0, 0, len)?.reshape(first)?];
    let mut at = len;
    for &n in tails {
        out.push(packed.narrow(0, at, n)?);
        at += n;
    }
    Ok(out)
}

// Vectorizable building blocks: every loop runs over slices of one known length, and
// reductions keep 16 partial sums (a strict left-to-right sum would not vectorize).

#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder().iter().sum::<f32>();
    for c in chunks {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Dot product with sixteen running sums, so the compiler can vectorize it.
#[inline(always)]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let y = &y[..x.len()];
    let mut acc = [0f32; 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let rest: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..16 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for k in 0..16 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    acc.iter().copied().fold(rest, f32::max)
}

#[inline(always)]
fn add_assign(y: &mut [f32], x: &[f32]) {
    let x = &x[..y.len()];
    for (y, x) in y.iter_mut().zip(x) {
        *y += x;
    }
}

/// `exp(x)` without a libm call, so that loops over it vectorize: `2^n * p(r)` with
/// `n = round(x / ln 2)` and Cephes' degree-6 polynomial on `|r| <= ln(2)/2`; relative
/// error about 2e-7. Below -87 the result is exactly 0 (as `exp` underflows for masked
/// attention scores): tiny or subnormal values there would make later products
/// subnormal, which the CPU computes a hundred times slower. Above 88 it saturates at
/// 1.7e38.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4; // ln 2 in two parts (Cephes C1, C2)
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2^n from its bits: n + 127 lands in the low mantissa bits of n + 127 + 2^23.
    let e = y * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if underflow {
        0.0
    } else {
        e
    }
}

/// `1 - erf(z)` for `z >= 0` as `poly(t) * exp(-z^2)`, `t = 1 / (1 + p z)`: Abramowitz &
/// Stegun 7.1.26, absolute error <= 1.5e-7. Takes `exp(-z^2)` so callers can share it.
#[inline(always)]
fn erfc_nonneg(z: f32, exp_neg_z2: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    poly * exp_neg_z2
}

/// `(Phi(x), phi(x))`: the standard normal CDF and density, sharing one `exp`.
/// `Phi` is computed without cancellation on both sides of 0.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let e = exp_f32(-0.5 * x * x); // = exp(-z^2) for z = |x| / sqrt(2)
    let half_tail = 0.5 * erfc_nonneg(x.abs() * std::f32::consts::FRAC_1_SQRT_2, e);
    let cdf = if x < 0.0 { half_tail } else { 1.0 - half_tail };
    (cdf, FRAC_1_SQRT_2PI * e)
}

// ---------------------------------------------------------------------------------------
// Linear layer (without its bias, which the ops that follow add).

/// `x @ w^T` for `x` (rows, in) and a weight `w` (out, in) as stored, with a backward:
/// `dx = g @ w` and `dw = g^T @ x`, each one gemm call writing it in its own layout.
/// Candle's `x.matmul(&w.t())` computes the same values, but its backward produces the
/// weight gradient transposed and then adds it into a zeroed gradient of `w` through a
/// strided, scalar copy (the `Transpose` node), for every weight of every layer.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((_, k), (_, wk)) = (x.dims2()?, w.dims2()?);
    if k != wk {
        bail!("linear: x {:?} and weight {:?} disagree on the input size", x.dims(), w.dims());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearNoBias)
}

struct LinearNoBias;

/// `dst (m x n) = lhs (m x k) @ rhs (k x n)`, each matrix given as (data, row stride,
/// column stride); on candle's matmul thread count, or on this thread for `serial`.
/// Panics if a stride reaches past its slice (the borrows already rule out overlap).
pub(crate) fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (&mut [f32], usize, usize),
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    serial: bool,
) {
    let fits = |len: usize, rows: usize, cols: usize, rs: usize, cs: usize| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
    };
    assert!(
        fits(dst.len(), m, n, dst_rs, dst_cs) && fits(lhs.len(), m, k, lhs_rs, lhs_cs) && fits(rhs.len(), k, n, rhs_rs, rhs_cs),
        "gemm_f32: a matrix reaches past its data"
    );
    let threads = if serial { 1 } else { candle_core::utils::get_num_threads() };
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: every element each stride reaches is inside its slice (checked above), and
    // `dst` is borrowed mutably, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), dst_cs as isize, dst_rs as isize, false,
            lhs.as_ptr(), lhs_cs as isize, lhs_rs as isize,
            rhs.as_ptr(), rhs_cs as isize, rhs_rs as isize,
            0.0, 1.0, // dst = 0 * dst + 1 * lhs @ rhs (dst is not read)
            false, false, false,
            parallelism,
        )
    }
}

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "nearspan-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?);
        let (m, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        let mut y = vec![0f32; m * n];
        // w (n x k) read as w^T: k x n with strides (1, k).
        gemm_f32((m, n, k), (&mut y, n, 1), (x, k, 1), (w, 1, k), false);
        f32_out(y, &Shape::from((m, n)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearNoBiasBwd)?;
        let mut g = unpack(&packed, x.shape(), &[w.elem_count()])?.into_iter();
        let dx = g.next();
        Ok((dx, g.next().map(|dw| dw.reshape(w.shape())).transpose()?))
    }
}

/// Backward kernel of [`LinearNoBias`] on (x, w, grad): `dx`, then `dw`, packed.
struct LinearNoBiasBwd;

impl CustomOp3 for LinearNoBiasBwd {
    fn name(&self) -> &'static str {
        "nearspan-linear-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, data(self.name(), s3, l3)?);
        let (m, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        let mut out = vec![0f32; m * k + n * k];
        let (dx, dw) = out.split_at_mut(m * k);
        // g (m x n), w (n x k), x (m x k); g^T has strides (1, n).
        gemm_f32((m, k, n), (dx, k, 1), (g, n, 1), (w, k, 1), false);
        gemm_f32((n, k, m), (dw, k, 1), (g, 1, n), (x, k, 1), false);
        let len = out.len();
        f32_out(out, &Shape::from(len))
    }
}

// ---------------------------------------------------------------------------------------
// Layer norm.

/// Layer norm over the last dimension with a backward for `x`, `weight` and `bias`:
/// the same function as `candle_nn::ops::layer_norm_slow` (mean, then the variance of
/// the deviations, in f32), one pass over the rows.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [n] || bias.dims() != [n] {
        bail!("layer_norm: weight {:?} and bias {:?} must be ({n},)", weight.dims(), bias.dims());
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

/// Mean and `1 / sqrt(var + eps)` of one row.
#[inline(always)]
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    for c in chunks {
        for k in 0..16 {
            acc[k] += (c[k] - mean) * (c[k] - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + rest) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    /// Layer norm of the rows of `x` into `y` (rows of `w.len()`).
    pub(crate) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
        let n = w.len();
        let b = &b[..n];
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let (mean, rstd) = row_stats(xr, eps);
            for (((y, x), w), b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        }
    }
}

multiversion! {
    /// Backward of [`layer_norm_rows`]: with `xh = (x - mean) * rstd` and `gh = g * w`,
    /// `dx = rstd * (gh - mean(gh) - xh * mean(gh * xh))`; `acc` (`2n`) gathers
    /// `dw = sum(g * xh)` and `db = sum(g)` over the rows.
    fn layer_norm_bwd_rows(x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32], acc: &mut [f32], eps: f32) {
        let n = w.len();
        let (dw, db) = acc.split_at_mut(n);
        let (dw, db) = (&mut dw[..n], &mut db[..n]);
        let (mut xh, mut gh) = (vec![0f32; n], vec![0f32; n]);
        for ((xr, gr), dxr) in x.chunks_exact(n).zip(g.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
            let (mean, rstd) = row_stats(xr, eps);
            let (xh, gh, gr, w) = (&mut xh[..n], &mut gh[..n], &gr[..n], &w[..n]);
            for j in 0..n {
                xh[j] = (xr[j] - mean) * rstd;
                gh[j] = gr[j] * w[j];
                dw[j] += gr[j] * xh[j];
                db[j] += gr[j];
            }
            let (a, c) = (sum(gh) / n as f32, dot(gh, xh) / n as f32);
            for ((d, gh), xh) in dxr.iter_mut().zip(gh.iter()).zip(xh.iter()) {
                *d = rstd * (gh - a - xh * c);
            }
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "nearspan-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, data(self.name(), s3, l3)?);
        let (_, n) = rows_of(self.name(), l1)?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, n, |row0, out| layer_norm_rows(&x[row0 * n..row0 * n + out.len()], w, b, out, self.eps));
        f32_out(y, l1.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.dim(0)?;
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let mut g = unpack(&packed, x.shape(), &[n, n])?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

/// Backward kernel of [`LayerNorm`] on (x, w, grad): `dx`, then `dw`, then `db`, packed.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "nearspan-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, data(self.name(), s3, l3)?);
        let (rows, n) = rows_of(self.name(), l1)?;
        let mut out = vec![0f32; x.len() + 2 * n];
        let (dx, tail) = out.split_at_mut(x.len());
        let sums = par_rows_sum(dx, n, rows_per_task(rows, n), 2 * n, |row0, dx, acc| {
            let span = row0 * n..row0 * n + dx.len();
            layer_norm_bwd_rows(&x[span.clone()], w, &g[span], dx, acc, self.eps)
        });
        tail.copy_from_slice(&sums);
        let len = out.len();
        f32_out(out, &Shape::from(len))
    }
}

// ---------------------------------------------------------------------------------------
// Softmax.

/// Softmax over the last dimension, with a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

/// `y = softmax(y)` in place.
#[inline(always)]
fn softmax_in_place(y: &mut [f32]) {
    let m = max(y);
    for v in y.iter_mut() {
        *v = exp_f32(*v - m);
    }
    let inv = 1.0 / sum(y);
    y.iter_mut().for_each(|v| *v *= inv);
}

multiversion! {
    fn softmax_rows(x: &[f32], y: &mut [f32], n: usize) {
        y.copy_from_slice(&x[..y.len()]);
        y.chunks_exact_mut(n).for_each(softmax_in_place);
    }
}

multiversion! {
    /// `dx = y * (g - sum(g * y))` per row; `dx` holds `g` on entry.
    fn softmax_bwd_rows(y: &[f32], dx: &mut [f32], n: usize) {
        for (yr, gr) in y.chunks_exact(n).zip(dx.chunks_exact_mut(n)) {
            let d = dot(gr, yr);
            for (g, y) in gr.iter_mut().zip(yr) {
                *g = y * (*g - d);
            }
        }
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "nearspan-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(self.name(), s, l)?;
        let (_, n) = rows_of(self.name(), l)?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, n, |row0, out| softmax_rows(&x[row0 * n..], out, n));
        f32_out(y, l.shape())
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

/// Backward kernel of [`Softmax`] on (y, grad).
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "nearspan-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?);
        let (_, n) = rows_of(self.name(), l1)?;
        let mut dx = g.to_vec();
        par_rows(&mut dx, n, |row0, out| softmax_bwd_rows(&y[row0 * n..], out, n));
        f32_out(dx, l1.shape())
    }
}

// ---------------------------------------------------------------------------------------
// GELU (exact, erf form).

/// `x * Phi(x)`, the erf GELU (Hugging Face's `"gelu"`), with a backward.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
    x.contiguous()?.apply_op2(&zeros, BiasGelu { bias_grad: false })
}

/// `gelu_erf(x + bias)` with `bias` over the last dimension: a linear layer's bias and
/// its activation in one pass; gradients for both.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if bias.dims() != [n] {
        bail!("bias_gelu: bias {:?} must be ({n},)", bias.dims());
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGelu { bias_grad: true })
}

struct BiasGelu {
    /// False for [`gelu_erf`], whose zero bias is not a variable.
    bias_grad: bool,
}

multiversion! {
    pub(crate) fn gelu_rows(x: &[f32], b: &[f32], y: &mut [f32]) {
        let n = b.len();
        for (yr, xr) in y.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            for ((y, x), b) in yr.iter_mut().zip(xr).zip(b) {
                let v = x + b;
                *y = v * normal_cdf_pdf(v).0;
            }
        }
    }
}

multiversion! {
    /// `dx = g * (Phi(v) + v phi(v))` for `v = x + b`; `acc` gathers `sum(dx)` over rows.
    fn gelu_bwd_rows(x: &[f32], b: &[f32], dx: &mut [f32], acc: &mut [f32]) {
        let n = b.len();
        let acc = &mut acc[..n];
        for (dr, xr) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            for (((d, x), b), a) in dr.iter_mut().zip(xr).zip(b).zip(acc.iter_mut()) {
                let v = x + b;
                let (cdf, pdf) = normal_cdf_pdf(v);
                *d *= cdf + v * pdf;
                *a += *d;
            }
        }
    }
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "nearspan-bias-gelu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?);
        let (_, n) = rows_of(self.name(), l1)?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, n, |row0, out| gelu_rows(&x[row0 * n..row0 * n + out.len()], b, out));
        f32_out(y, l1.shape())
    }

    fn bwd(&self, x: &Tensor, bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(bias, &grad.contiguous()?, &BiasGeluBwd)?;
        let mut g = unpack(&packed, x.shape(), &[bias.elem_count()])?.into_iter();
        let dx = g.next();
        Ok((dx, if self.bias_grad { g.next() } else { None }))
    }
}

/// Backward kernel of [`BiasGelu`] on (x, bias, grad): `dx`, then `dbias`, packed.
struct BiasGeluBwd;

impl CustomOp3 for BiasGeluBwd {
    fn name(&self) -> &'static str {
        "nearspan-bias-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, b, g) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, data(self.name(), s3, l3)?);
        let (rows, n) = rows_of(self.name(), l1)?;
        let mut out = vec![0f32; x.len() + n];
        let (dx, tail) = out.split_at_mut(x.len());
        dx.copy_from_slice(g);
        let sums = par_rows_sum(dx, n, rows_per_task(rows, n), n, |row0, dx, acc| {
            gelu_bwd_rows(&x[row0 * n..row0 * n + dx.len()], b, dx, acc)
        });
        tail.copy_from_slice(&sums);
        let len = out.len();
        f32_out(out, &Shape::from(len))
    }
}

// ---------------------------------------------------------------------------------------
// Dropout.

/// Per-process dropout seed; each dropout call takes the next value.
static DROPOUT_SEED: AtomicU64 = AtomicU64::new(0);

/// Makes the following dropout masks a function of `seed` (and of the order of the
/// calls): for reproducible training runs. Without it the masks start from a seed taken
/// from the clock.
pub fn set_dropout_seed(seed: u64) {
    DROPOUT_SEED.store(splitmix64(seed) | 1, Ordering::Relaxed);
}

fn next_seed() -> u64 {
    if DROPOUT_SEED.load(Ordering::Relaxed) == 0 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let _ = DROPOUT_SEED.compare_exchange(0, splitmix64(now) | 1, Ordering::Relaxed, Ordering::Relaxed);
    }
    splitmix64(DROPOUT_SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 32-bit finalizer of MurmurHash3: a bijection with good avalanche, vectorizable.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// An inverted-dropout mask: element `i` is kept when the top 24 bits of a hash of
/// `(seed, i)` are at or above `p * 2^24`, and kept values are scaled by `1 / (1 - p)`.
/// Regenerating the mask from the seed is what lets the backward pass skip storing it.
#[derive(Clone, Copy, Debug)]
struct Dropout {
    seed: u64,
    threshold: u32,
    scale: f32,
}

impl Dropout {
    /// `None` for `p == 0`.
    fn new(p: f32) -> Result<Option<Self>> {
        if !(0.0..1.0).contains(&p) {
            bail!("dropout probability must be in [0, 1), got {p}");
        }
        if p == 0.0 {
            return Ok(None);
        }
        Ok(Some(Self { seed: next_seed(), threshold: (p as f64 * (1u64 << 24) as f64) as u32, scale: 1.0 / (1.0 - p) }))
    }

    /// Multiplies `v` (elements `first..first + v.len()` of the tensor) by the mask.
    #[inline(always)]
    fn apply(&self, first: usize, v: &mut [f32]) {
        let (s0, s1) = (self.seed as u32, (self.seed >> 32) as u32);
        let first = first as u32; // tensors past 2^32 elements would repeat the mask
        for (i, x) in v.iter_mut().enumerate() {
            let h = fmix32(fmix32(first.wrapping_add(i as u32) ^ s0) ^ s1);
            *x = if (h >> 8) >= self.threshold { *x * self.scale } else { 0.0 };
        }
    }
}

multiversion! {
    fn dropout_rows(d: &Dropout, first: usize, v: &mut [f32]) {
        d.apply(first, v)
    }
}

/// Inverted dropout with probability `p` (identity for 0), with a backward that
/// regenerates the mask.
pub fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    match Dropout::new(p)? {
        None => Ok(x.clone()),
        Some(d) => x.contiguous()?.apply_op1(d),
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "nearspan-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = data(self.name(), s, l)?.to_vec();
        par_rows(&mut y, 1, |first, out| dropout_rows(self, first, out));
        f32_out(y, l.shape())
    }

    /// The same mask on the gradient.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// `dropout(x + bias, p) + residual`: a linear layer's bias, the dropout on its output
/// and the residual connection in one pass (`x` and `residual` of the same shape, `bias`
/// over the last dimension). Gradients: `dx = mask(g)`, `dbias = sum(dx)` over rows,
/// `dresidual = g`.
pub fn bias_dropout_add(x: &Tensor, bias: &Tensor, residual: &Tensor, p: f32) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if bias.dims() != [n] || residual.dims() != x.dims() {
        bail!("bias_dropout_add: bias {:?} must be ({n},) and residual {:?} like x {:?}", bias.dims(), residual.dims(), x.dims());
    }
    x.contiguous()?.apply_op3(&bias.contiguous()?, &residual.contiguous()?, BiasDropoutAdd(Dropout::new(p)?))
}

struct BiasDropoutAdd(Option<Dropout>);

multiversion! {
    /// `y = dropout(x + b) + r` for the rows starting at element `first`.
    fn bias_dropout_add_rows(d: Option<&Dropout>, first: usize, x: &[f32], b: &[f32], r: &[f32], y: &mut [f32]) {
        let n = b.len();
        for (yr, xr) in y.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            for ((y, x), b) in yr.iter_mut().zip(xr).zip(b) {
                *y = x + b;
            }
        }
        if let Some(d) = d {
            d.apply(first, y);
        }
        add_assign(y, r);
    }
}

multiversion! {
    /// `dx = mask(g)` in place; `acc` gathers `sum(dx)` over rows.
    fn masked_column_sums(d: Option<&Dropout>, first: usize, dx: &mut [f32], acc: &mut [f32]) {
        if let Some(d) = d {
            d.apply(first, dx);
        }
        for row in dx.chunks_exact(acc.len()) {
            add_assign(acc, row);
        }
    }
}

impl CustomOp3 for BiasDropoutAdd {
    fn name(&self) -> &'static str {
        "nearspan-bias-dropout-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, b, r) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, data(self.name(), s3, l3)?);
        let (_, n) = rows_of(self.name(), l1)?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, n, |row0, out| {
            let span = row0 * n..row0 * n + out.len();
            bias_dropout_add_rows(self.0.as_ref(), span.start, &x[span.clone()], b, &r[span], out)
        });
        f32_out(y, l1.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let packed = grad.apply_op1_no_bwd(&BiasDropoutAddBwd(self.0, bias.elem_count()))?;
        let mut g = unpack(&packed, x.shape(), &[bias.elem_count()])?.into_iter();
        Ok((g.next(), g.next(), Some(grad)))
    }
}

/// Backward kernel of [`BiasDropoutAdd`] on grad: the masked gradient, then its column
/// sums (the bias gradient), packed.
struct BiasDropoutAddBwd(Option<Dropout>, usize);

impl CustomOp1 for BiasDropoutAddBwd {
    fn name(&self) -> &'static str {
        "nearspan-bias-dropout-add-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = data(self.name(), s, l)?;
        let n = self.1;
        let mut out = vec![0f32; g.len() + n];
        let (dx, tail) = out.split_at_mut(g.len());
        dx.copy_from_slice(g);
        let sums = par_rows_sum(dx, n, rows_per_task(g.len() / n, n), n, |row0, dx, acc| {
            masked_column_sums(self.0.as_ref(), row0 * n, dx, acc)
        });
        tail.copy_from_slice(&sums);
        let len = out.len();
        f32_out(out, &Shape::from(len))
    }
}

// ---------------------------------------------------------------------------------------
// Self-attention.

/// Multi-head self-attention of a batch of `b` sequences of `seq_len` tokens, from the
/// output of one matmul with the query, key and value weights stacked: `qkv` is
/// `(b * seq_len, 3 * hidden)` (queries, then keys, then values, each `heads` blocks of
/// `hidden / heads`), without their biases, which `bias` (`3 * hidden`) adds here.
/// Per sequence and head: `dropout(softmax(q k^T / sqrt(d) + mask_bias)) v`, where
/// `mask_bias` (`b * seq_len` elements, e.g. `(b, 1, 1, seq_len)`) is added to the
/// scores of every query of its sequence and gets no gradient. Returns the heads side by
/// side, `(b * seq_len, hidden)`, as the output projection takes them.
///
/// One op instead of the bias adds, three head splits (transpose + copy), two batched
/// matmuls of `b * heads` tiny matrices, scale, mask, softmax, dropout and the head
/// merge (transpose + copy), and their backward passes. Sequences run in parallel; the
/// backward pass recomputes the probabilities.
pub fn attention(qkv: &Tensor, bias: &Tensor, mask_bias: &Tensor, seq_len: usize, heads: usize, dropout: f32) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    if seq_len == 0 || rows % seq_len != 0 || heads == 0 || width % (3 * heads) != 0 {
        bail!("attention: qkv {:?} is not (b * {seq_len}, 3 * hidden) with hidden a multiple of {heads} heads", qkv.dims());
    }
    if bias.dims() != [width] || mask_bias.elem_count() != rows {
        bail!("attention: bias {:?} must be ({width},) and the mask {:?} have {rows} elements", bias.dims(), mask_bias.dims());
    }
    let head_dim = width / 3 / heads;
    let mask = Arc::new(mask_bias.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
    let op = Attention {
        seq: seq_len,
        heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        mask,
        dropout: Dropout::new(dropout)?,
    };
    qkv.contiguous()?.apply_op2(&bias.contiguous()?, op)
}

#[derive(Clone)]
struct Attention {
    seq: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    /// `(b, seq)` additive mask on the keys.
    mask: Arc<Vec<f32>>,
    /// On the probabilities, indexed as a `(b, heads, seq, seq)` tensor.
    dropout: Option<Dropout>,
}

impl Attention {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// One sequence's rows of qkv (`seq x 3 hidden`) with the bias added.
    fn biased(&self, x: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut xb = x[..self.seq * 3 * self.hidden()].to_vec();
        for row in xb.chunks_exact_mut(bias.len()) {
            add_assign(row, bias);
        }
        xb
    }

    /// `s (seq x seq) = q k^T` for head `h` of the biased rows `xb`.
    fn scores(&self, xb: &[f32], h: usize, s: &mut [f32]) {
        let (t, d, hid) = (self.seq, self.head_dim, self.hidden());
        let w = 3 * hid;
        // q and k are t x d blocks of xb (rows w apart); k^T is read with strides (1, w).
        gemm_f32((t, t, d), (s, t, 1), (&xb[h * d..], w, 1), (&xb[hid + h * d..], 1, w), true);
    }

    /// Turns the scores of sequence `b` into probabilities, in place, row by row.
    #[inline(always)]
    fn softmax_rows(&self, b: usize, s: &mut [f32]) {
        let t = self.seq;
        let mask = &self.mask[b * t..(b + 1) * t];
        for row in s.chunks_exact_mut(t) {
            for (v, m) in row.iter_mut().zip(mask) {
                *v = *v * self.scale + m;
            }
            softmax_in_place(row);
        }
    }

    /// Index of probability `(b, h, 0, 0)` in the dropout mask.
    fn mask_index(&self, b: usize, h: usize) -> usize {
        (b * self.heads + h) * self.seq * self.seq
    }
}

multiversion! {
    fn attention_softmax_rows(op: &Attention, b: usize, s: &mut [f32]) {
        op.softmax_rows(b, s)
    }
}

multiversion! {
    /// `dS = P (dP M - rowsum(dP M P)) * scale` in place of `dp`, and `pm = P M`.
    fn attention_softmax_bwd_rows(op: &Attention, p: &[f32], pm: &mut [f32], dp: &mut [f32]) {
        let t = op.seq;
        for ((p, pm), dp) in p.chunks_exact(t).zip(pm.chunks_exact_mut(t)).zip(dp.chunks_exact_mut(t)) {
            // pm holds the keep factors M on entry.
            for ((dp, m), p) in dp.iter_mut().zip(pm.iter_mut()).zip(p) {
                *dp *= *m;
                *m *= p;
            }
            let rowdot = dot(dp, p);
            for (dp, p) in dp.iter_mut().zip(p) {
                *dp = p * (*dp - rowdot) * op.scale;
            }
        }
    }
}

/// Forward pass of sequence `b`: `x` its `seq` rows of qkv, `out` its `seq` rows of context.
fn attention_seq(op: &Attention, b: usize, x: &[f32], bias: &[f32], out: &mut [f32]) {
    let (t, d, hid) = (op.seq, op.head_dim, op.hidden());
    let xb = op.biased(x, bias);
    let mut p = vec![0f32; t * t];
    for h in 0..op.heads {
        op.scores(&xb, h, &mut p);
        attention_softmax_rows(op, b, &mut p);
        if let Some(drop) = &op.dropout {
            dropout_rows(drop, op.mask_index(b, h), &mut p);
        }
        // p is t x t; v is a t x d block of xb; the output block is t x d, rows hid apart.
        gemm_f32((t, d, t), (&mut out[h * d..], hid, 1), (&p, t, 1), (&xb[2 * hid + h * d..], 3 * hid, 1), true);
    }
}

/// Backward pass of sequence `b`: per head, with `P` recomputed, `M` the dropout factors
/// and `dO` the output gradient: `dV = (P M)^T dO`, `dP = (dO V^T) M`,
/// `dS = P (dP - rowsum(dP P)) / sqrt(d)`, `dQ = dS K`, `dK = dS^T Q`, written into the
/// sequence's rows of `dx` (`3 * hidden` wide); `acc` gathers the column sums of `dx`.
fn attention_bwd_seq(op: &Attention, b: usize, x: &[f32], bias: &[f32], g: &[f32], dx: &mut [f32], acc: &mut [f32]) {
    let (t, d, hid) = (op.seq, op.head_dim, op.hidden());
    let w = 3 * hid;
    let xb = op.biased(x, bias);
    let (mut p, mut pm, mut dp) = (vec![0f32; t * t], vec![0f32; t * t], vec![0f32; t * t]);
    for h in 0..op.heads {
        op.scores(&xb, h, &mut p);
        attention_softmax_rows(op, b, &mut p);
        pm.fill(1.0);
        if let Some(drop) = &op.dropout {
            dropout_rows(drop, op.mask_index(b, h), &mut pm);
        }
        let (q, k, v) = (&xb[h * d..], &xb[hid + h * d..], &xb[2 * hid + h * d..]);
        let go = &g[h * d..];
        // Each operand is a t x t matrix or a t x d block of a row-major buffer, given by
        // its row and column strides; the products go to column blocks of dx.
        gemm_f32((t, t, d), (&mut dp, t, 1), (go, hid, 1), (v, 1, w), true); // dO V^T
        attention_softmax_bwd_rows(op, &p, &mut pm, &mut dp);
        gemm_f32((t, d, t), (&mut dx[2 * hid + h * d..], w, 1), (&pm, 1, t), (go, hid, 1), true); // (P M)^T dO
        gemm_f32((t, d, t), (&mut dx[h * d..], w, 1), (&dp, t, 1), (k, w, 1), true); // dS K
        gemm_f32((t, d, t), (&mut dx[hid + h * d..], w, 1), (&dp, 1, t), (q, w, 1), true); // dS^T Q
    }
    for row in dx.chunks_exact(w) {
        add_assign(acc, row);
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "nearspan-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?);
        let (t, hid) = (self.seq, self.hidden());
        let rows = x.len() / (3 * hid);
        let mut out = vec![0f32; rows * hid];
        out.par_chunks_mut(t * hid)
            .enumerate()
            .for_each(|(b, out)| attention_seq(self, b, &x[b * t * 3 * hid..(b + 1) * t * 3 * hid], bias, out));
        f32_out(out, &Shape::from((rows, hid)))
    }

    fn bwd(&self, qkv: &Tensor, bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = qkv.apply_op3_no_bwd(bias, &grad.contiguous()?, &AttentionBwd(self.clone()))?;
        let mut g = unpack(&packed, qkv.shape(), &[bias.elem_count()])?.into_iter();
        Ok((g.next(), g.next()))
    }
}

/// Backward kernel of [`Attention`] on (qkv, bias, grad): `dqkv`, then `dbias`, packed.
struct AttentionBwd(Attention);

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "nearspan-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let (x, bias, g) = (data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, data(self.name(), s3, l3)?);
        let (t, hid) = (op.seq, op.hidden());
        let w = 3 * hid;
        let mut out = vec![0f32; x.len() + w];
        let (dx, tail) = out.split_at_mut(x.len());
        let dbias = par_rows_sum(dx, w, t, w, |row0, dx, acc| {
            let b = row0 / t;
            attention_bwd_seq(op, b, &x[row0 * w..row0 * w + dx.len()], bias, &g[row0 * hid..(row0 + t) * hid], dx, acc)
        });
        tail.copy_from_slice(&dbias);
        let len = out.len();
        f32_out(out, &Shape::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn rand(shape: &[usize], scale: f64) -> Tensor {
        (Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap() * scale).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// A loss with a different weight per output element, so that the gradient is not
    /// uniform (a plain sum would hide errors in softmax and layer-norm backward passes,
    /// whose gradient of a constant is 0).
    fn weighted_sum(y: &Tensor, w: &Tensor) -> Tensor {
        (y * w).unwrap().sum_all().unwrap()
    }

    /// `ours` and `reference` agree on `vars` to `fwd_tol`, and so do the gradients of
    /// the same weighted loss of each, to `tol` relative to the largest gradient.
    fn assert_same(
        vars: &[Var],
        ours: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
        fwd_tol: f32,
        tol: f32,
    ) {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (y1, y2) = (ours(&ts), reference(&ts));
        let d = max_diff(&y1, &y2);
        assert!(d <= fwd_tol, "forward differs by {d}");
        let w = rand(y1.dims(), 1.0);
        let (g1, g2) = (weighted_sum(&y1, &w).backward().unwrap(), weighted_sum(&y2, &w).backward().unwrap());
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (g1.get(v.as_tensor()).expect("our grad"), g2.get(v.as_tensor()).expect("reference grad"));
            let d = max_diff(a, b);
            let scale = max_abs(b).max(1e-3);
            assert!(d <= tol * scale, "gradient of input {i} differs by {d} (max {scale})");
        }
    }

    #[test]
    fn exp_and_erf_approximations_are_accurate() {
        let (mut worst_exp, mut worst_erf) = (0f64, 0f64);
        for i in -8000..=8000 {
            let x = i as f32 * 0.01; // -80 .. 80
            let e = exp_f32(x) as f64;
            worst_exp = worst_exp.max(((e - (x as f64).exp()) / (x as f64).exp()).abs());
            let z = i as f32 * 0.001; // -8 .. 8
            let a = z.abs();
            let erf = (1.0 - erfc_nonneg(a, exp_f32(-a * a))).copysign(z);
            worst_erf = worst_erf.max((erf as f64 - candle_core::cpu::erf::erf_f64(z as f64)).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
        assert_eq!(exp_f32(-1e4), 0.0);
        assert!(exp_f32(-87.0) > 1e-38 && exp_f32(-87.0).is_normal());
        assert_eq!(exp_f32(1e4), exp_f32(88.0));
    }

    #[test]
    fn reductions_match_sequential_sums() {
        let x: Vec<f32> = (0..53).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let y: Vec<f32> = (0..53).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
        assert_eq!(sum(&x), x.iter().sum::<f32>());
        assert_eq!(dot(&x, &y), x.iter().zip(&y).map(|(a, b)| a * b).sum::<f32>());
        assert_eq!(max(&x), 5.0);
        assert_eq!(max(&x[..3]), x[..3].iter().copied().fold(f32::NEG_INFINITY, f32::max));
    }

    #[test]
    fn layer_norm_matches_the_composed_version() {
        let x = Var::from_tensor(&(rand(&[3, 7, 384], 2.0) + 0.5).unwrap()).unwrap();
        let w = Var::from_tensor(&(rand(&[384], 0.3) + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&rand(&[384], 0.3)).unwrap();
        assert_same(
            &[x, w, b],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-12).unwrap(),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-12).unwrap(),
            1e-5,
            1e-4,
        );
    }

    #[test]
    fn softmax_matches_the_composed_version() {
        let x = Var::from_tensor(&rand(&[4, 3, 5, 24], 3.0)).unwrap();
        assert_same(
            &[x],
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
            1e-6,
            1e-4,
        );
    }

    #[test]
    fn gelu_matches_candles_gelu_erf() {
        let x = Var::from_tensor(&rand(&[5, 64], 3.0)).unwrap();
        assert_same(&[x], |t| gelu_erf(&t[0]).unwrap(), |t| t[0].gelu_erf().unwrap(), 1e-5, 1e-4);
        // Including the far tails, where Phi is computed without cancellation.
        let x = Tensor::new(&[-12f32, -6.0, -3.0, -1e-4, 0.0, 1e-4, 3.0, 6.0, 12.0], &Device::Cpu).unwrap();
        assert!(max_diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()) <= 1e-5);
    }

    #[test]
    fn bias_gelu_matches_add_then_gelu() {
        let x = Var::from_tensor(&rand(&[6, 40], 2.0)).unwrap();
        let b = Var::from_tensor(&rand(&[40], 1.0)).unwrap();
        assert_same(
            &[x, b],
            |t| bias_gelu(&t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_add(&t[1]).unwrap().gelu_erf().unwrap(),
            1e-5,
            1e-4,
        );
    }

    #[test]
    fn dropout_masks_scale_and_backward_agree() {
        let x = Var::from_tensor(&(rand(&[200, 300], 1.0).abs().unwrap() + 0.1).unwrap()).unwrap();
        let y = dropout(x.as_tensor(), 0.1).unwrap();
        let (xv, yv) = (x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let dropped = yv.iter().filter(|&&v| v == 0.0).count() as f64 / yv.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped fraction {dropped}");
        for (a, b) in xv.iter().zip(&yv) {
            assert!(*b == 0.0 || (b - a / 0.9).abs() <= 1e-6 * b.abs());
        }
        // The gradient of sum(y * w) is w on the kept elements, scaled, and 0 elsewhere.
        let w = rand(y.dims(), 1.0);
        let g = weighted_sum(&y, &w).backward().unwrap();
        let expected = ((&y / x.as_tensor()).unwrap() * &w).unwrap();
        assert!(max_diff(g.get(x.as_tensor()).unwrap(), &expected) < 1e-5);
        // Two calls draw two masks.
        let y2 = dropout(x.as_tensor(), 0.1).unwrap();
        assert!(max_diff(&y, &y2) > 0.0);
        assert_eq!(dropout(x.as_tensor(), 0.0).unwrap().id(), x.as_tensor().id());
        assert!(dropout(x.as_tensor(), 1.0).is_err());
    }

    #[test]
    fn dropout_masks_are_a_function_of_seed_and_index() {
        // The backward pass and the parallel blocks (each starting at its own `first`)
        // must regenerate exactly the forward mask.
        let d = Dropout { seed: 0x1234_5678_9abc_def0, threshold: (0.3 * (1u32 << 24) as f32) as u32, scale: 1.0 / 0.7 };
        let mut whole = vec![1f32; 1000];
        d.apply(0, &mut whole);
        let mut parts = vec![1f32; 1000];
        let (a, b) = parts.split_at_mut(377);
        d.apply(0, a);
        d.apply(377, b);
        assert_eq!(whole, parts);
        let other = Dropout { seed: 99, ..d };
        let mut again = vec![1f32; 1000];
        other.apply(0, &mut again);
        assert_ne!(whole, again);
        let dropped = whole.iter().filter(|&&v| v == 0.0).count();
        assert!((250..350).contains(&dropped), "{dropped} of 1000 dropped at p = 0.3");
    }

    #[test]
    fn bias_dropout_add_matches_the_composed_version_without_dropout_and_masks_with_it() {
        let x = Var::from_tensor(&rand(&[4, 5, 32], 1.0)).unwrap();
        let b = Var::from_tensor(&rand(&[32], 1.0)).unwrap();
        let r = Var::from_tensor(&rand(&[4, 5, 32], 1.0)).unwrap();
        assert_same(
            &[x.clone(), b.clone(), r.clone()],
            |t| bias_dropout_add(&t[0], &t[1], &t[2], 0.0).unwrap(),
            |t| (t[0].broadcast_add(&t[1]).unwrap() + &t[2]).unwrap(),
            1e-6,
            1e-5,
        );
        // With dropout: y - residual is (x + b) masked; gradients follow that mask.
        let y = bias_dropout_add(x.as_tensor(), b.as_tensor(), r.as_tensor(), 0.5).unwrap();
        let kept = (&y - r.as_tensor()).unwrap().ne(0f32).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let dropped = 1.0 - kept.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((dropped - 0.5).abs() < 0.1, "dropped fraction {dropped}");
        let reference =
            ((x.as_tensor().broadcast_add(b.as_tensor()).unwrap() * (&kept * 2.0).unwrap()).unwrap() + r.as_tensor()).unwrap();
        assert!(max_diff(&y, &reference) < 1e-5);
        let w = rand(y.dims(), 1.0);
        let (g1, g2) = (weighted_sum(&y, &w).backward().unwrap(), weighted_sum(&reference, &w).backward().unwrap());
        for v in [&x, &b, &r] {
            let (a, e) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(max_diff(a, e) <= 1e-5 * max_abs(e).max(1.0), "{}", max_diff(a, e));
        }
    }

    /// The attention of [`attention`] written with candle's differentiable ops.
    fn composed_attention(qkv: &Tensor, bias: &Tensor, mask: &Tensor, t: usize, heads: usize, keep: Option<&Tensor>) -> Tensor {
        let (rows, w) = qkv.dims2().unwrap();
        let (b, hid) = (rows / t, w / 3);
        let d = hid / heads;
        let x = qkv.broadcast_add(bias).unwrap();
        let split = |i: usize| {
            x.narrow(1, i * hid, hid).unwrap().reshape((b, t, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let mut p = candle_nn::ops::softmax(&scores.broadcast_add(&mask.reshape((b, 1, 1, t)).unwrap()).unwrap(), D::Minus1).unwrap();
        if let Some(keep) = keep {
            p = (p * keep).unwrap();
        }
        p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((rows, hid)).unwrap()
    }

    fn padding_mask(b: usize, t: usize) -> Tensor {
        // Sequence s has t - s real tokens (at least one), then padding.
        let m: Vec<f32> = (0..b * t).map(|i| if i % t < t - (i / t).min(t - 1) { 0.0 } else { -10_000.0 }).collect();
        Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn attention_matches_the_composed_version() {
        // 24 keys and 32 dimensions as in MiniLM, 3 sequences for the parallel split.
        let (b, t, heads, d) = (3, 24, 2, 32);
        let qkv = Var::from_tensor(&rand(&[b * t, 3 * heads * d], 1.0)).unwrap();
        let bias = Var::from_tensor(&rand(&[3 * heads * d], 0.5)).unwrap();
        let mask = padding_mask(b, t);
        assert_same(
            &[qkv, bias],
            |x| attention(&x[0], &x[1], &mask, t, heads, 0.0).unwrap(),
            |x| composed_attention(&x[0], &x[1], &mask, t, heads, None),
            1e-5,
            1e-4,
        );
    }

    #[test]
    fn attention_dropout_matches_the_composed_version_with_the_same_mask() {
        let (b, t, heads, d) = (2, 7, 3, 5);
        let qkv = Var::from_tensor(&rand(&[b * t, 3 * heads * d], 1.0)).unwrap();
        let bias = Var::from_tensor(&rand(&[3 * heads * d], 0.5)).unwrap();
        let mask = padding_mask(b, t);
        let drop = Dropout::new(0.3).unwrap().unwrap();
        // The keep factors of every probability, as the op draws them.
        let mut keep = vec![1f32; b * heads * t * t];
        drop.apply(0, &mut keep);
        assert!(keep.iter().any(|&k| k == 0.0) && keep.iter().any(|&k| k > 1.0));
        let keep = Tensor::from_vec(keep, (b, heads, t, t), &Device::Cpu).unwrap();
        let op = Attention {
            seq: t,
            heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            mask: Arc::new(mask.flatten_all().unwrap().to_vec1().unwrap()),
            dropout: Some(drop),
        };
        assert_same(
            &[qkv, bias],
            |x| x[0].apply_op2(&x[1], op.clone()).unwrap(),
            |x| composed_attention(&x[0], &x[1], &mask, t, heads, Some(&keep)),
            1e-5,
            1e-4,
        );
    }

    #[test]
    fn linear_matches_matmul_with_the_transposed_weight() {
        let x = Var::from_tensor(&rand(&[37, 24], 1.0)).unwrap();
        let w = Var::from_tensor(&rand(&[19, 24], 1.0)).unwrap();
        assert_same(&[x, w], |t| linear(&t[0], &t[1]).unwrap(), |t| t[0].matmul(&t[1].t().unwrap()).unwrap(), 1e-5, 1e-5);
    }

    /// Timing, not a check: `cargo test --release --lib ops::tests::speed -- --ignored --nocapture`
    /// (with `RAYON_NUM_THREADS=1` for one thread). Fastest of 30 runs of forward + backward
    /// on MiniLM's shapes (32 x 24 tokens, hidden 384, 12 heads, intermediate 1536).
    #[test]
    #[ignore]
    fn speed() {
        fn best(f: impl Fn()) -> f64 {
            (0..30)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        }
        let (b, t, heads, hid) = (32, 24, 12, 384);
        let qkv = Var::from_tensor(&rand(&[b * t, 3 * hid], 1.0)).unwrap();
        let bias = Var::from_tensor(&rand(&[3 * hid], 0.5)).unwrap();
        let mask = padding_mask(b, t);
        let w = rand(&[b * t, hid], 1.0);
        let run = |f: &dyn Fn() -> Tensor| {
            let g = weighted_sum(&f(), &w).backward().unwrap();
            std::hint::black_box(g);
        };
        let ours = best(|| run(&|| attention(qkv.as_tensor(), bias.as_tensor(), &mask, t, heads, 0.1).unwrap()));
        let composed = best(|| {
            run(&|| {
                let keep = candle_nn::ops::dropout(&Tensor::ones((b, heads, t, t), candle_core::DType::F32, &Device::Cpu).unwrap(), 0.1).unwrap();
                composed_attention(qkv.as_tensor(), bias.as_tensor(), &mask, t, heads, Some(&keep))
            })
        });
        println!("attention fwd+bwd: ours {ours:.2} ms, composed {composed:.2} ms");
        let x = Var::from_tensor(&rand(&[b * t, hid], 1.0)).unwrap();
        let (lw, lb) = (Var::from_tensor(&rand(&[hid], 1.0)).unwrap(), Var::from_tensor(&rand(&[hid], 1.0)).unwrap());
        let ours = best(|| run(&|| layer_norm(x.as_tensor(), lw.as_tensor(), lb.as_tensor(), 1e-12).unwrap()));
        let composed = best(|| run(&|| candle_nn::ops::layer_norm_slow(x.as_tensor(), lw.as_tensor(), lb.as_tensor(), 1e-12).unwrap()));
        println!("layer norm fwd+bwd: ours {ours:.2} ms, composed {composed:.2} ms");
        let xi = Var::from_tensor(&rand(&[b * t, 4 * hid], 1.0)).unwrap();
        let bi = Var::from_tensor(&rand(&[4 * hid], 1.0)).unwrap();
        let wi = rand(&[b * t, 4 * hid], 1.0);
        let runi = |f: &dyn Fn() -> Tensor| std::hint::black_box(weighted_sum(&f(), &wi).backward().unwrap());
        let ours = best(|| { runi(&|| bias_gelu(xi.as_tensor(), bi.as_tensor()).unwrap()); });
        let composed = best(|| { runi(&|| xi.as_tensor().broadcast_add(bi.as_tensor()).unwrap().gelu_erf().unwrap()); });
        let loss_only = best(|| { runi(&|| (xi.as_tensor() * 1.0).unwrap()); });
        let fwd = best(|| { std::hint::black_box(bias_gelu(xi.as_tensor(), bi.as_tensor()).unwrap()); });
        println!("bias + gelu fwd+bwd: ours {ours:.2} ms, composed {composed:.2} ms (the loss alone {loss_only:.2} ms; our forward alone {fwd:.2} ms)");
        let r = Var::from_tensor(&rand(&[b * t, hid], 1.0)).unwrap();
        let ours = best(|| run(&|| bias_dropout_add(x.as_tensor(), lb.as_tensor(), r.as_tensor(), 0.1).unwrap()));
        let composed = best(|| {
            run(&|| (candle_nn::ops::dropout(&x.as_tensor().broadcast_add(lb.as_tensor()).unwrap(), 0.1).unwrap() + r.as_tensor()).unwrap())
        });
        println!("bias + dropout + residual fwd+bwd: ours {ours:.2} ms, composed {composed:.2} ms");
        let wt = Var::from_tensor(&rand(&[4 * hid, hid], 1.0)).unwrap();
        let ours = best(|| { runi(&|| linear(x.as_tensor(), wt.as_tensor()).unwrap()); });
        let composed = best(|| { runi(&|| x.as_tensor().matmul(&wt.as_tensor().t().unwrap()).unwrap()); });
        println!("linear 384 -> 1536 fwd+bwd: ours {ours:.2} ms, composed {composed:.2} ms");
    }
}
