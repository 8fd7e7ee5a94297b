//! bf16 matrix products with AVX512-BF16 (`vdpbf16ps`), for CPUs that have it but no AMX
//! (AMD Zen 4 and later, Intel Cooper Lake). One `vdpbf16ps` on 512-bit registers
//! multiplies 16 pairs of bf16 products into 16 f32 sums: 64 flops per instruction, twice
//! what an f32 FMA does, and half the bytes of weights and activations to move.
//!
//! It reads the weights in the same packed layout as the AMX kernel
//! ([`super::pack_bf16`]): for a block of 16 outputs, k-pair `p` is one 64-byte vector
//! holding, for each output `j`, `W[j][2p]` and `W[j][2p + 1]`, exactly the operand
//! `vdpbf16ps` wants against a broadcast of the activation pair `x[r][2p]`, `x[r][2p+1]`.
//! So one packed copy serves both kernels.
//!
//! Blocking: each call computes [`ROWS`] rows x 32 columns (two 16-output blocks), held in
//! 2 x ROWS accumulator registers; per k-pair it loads the two weight vectors once and
//! broadcasts one 32-bit activation pair per row, so every weight load feeds ROWS
//! products and every broadcast two.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of the output block each kernel call computes (24 of the 32 vector registers
/// hold accumulators).
pub const ROWS: usize = 12;

/// Whether this CPU has AVX-512 F and BF16 (std caches the CPUID check).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// C (ROWS x 32 f32, row stride `ldc` floats) = A (ROWS rows of bf16, row stride `lda`
/// elements, `2 * pairs` deep) x B (two 16-output blocks of packed weights, `b0` and `b1`,
/// each `pairs` vectors of 32 bf16).
///
/// # Safety
/// [`available`] returned true; `lda` is even (so every activation pair is one aligned
/// 32-bit word within its row); every pointer covers what is read or written through it:
/// `a` ROWS rows x `2 * pairs` bf16, `b0`/`b1` `pairs * 32` bf16 each, `c` ROWS rows x 32
/// f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn block_rows_x32(
    a: *const u16,
    lda: usize,
    b0: *const u16,
    b1: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    for p in 0..pairs {
        // SAFETY (this block): p < pairs, so both weight vectors and the activation pairs
        // of every row lie inside the ranges the caller guarantees.
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(p * 32) as *const _));
        let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(p * 32) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = (a.add(r * lda + 2 * p) as *const i32).read_unaligned();
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * ldc), acc[0]);
        _mm512_storeu_ps(c.add(r * ldc + 16), acc[1]);
    }
}

/// Never called: [`available`] is false off x86-64.
///
/// # Safety
/// Unreachable.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn block_rows_x32(_: *const u16, _: usize, _: *const u16, _: *const u16, _: usize, _: *mut f32, _: usize) {
    unreachable!("AVX512-BF16 kernel called off x86-64")
}
