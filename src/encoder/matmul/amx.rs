//! bf16 matrix products on Intel AMX (Advanced Matrix Extensions, Sapphire Rapids and
//! later): one `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 f32
//! accumulators, 16,384 flops per instruction, about 16x what AVX-512 f32 FMAs do per
//! cycle.
//!
//! Rust's AMX intrinsics are unstable, so the instructions are written as inline
//! assembly; the CPU check is CPUID (leaf 7: AMX-TILE and AMX-BF16) and Linux must grant
//! the process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`), once.
//!
//! Blocking: each call computes a 32 x 32 block of C (2 x 2 accumulator tiles, tmm0-3)
//! from two A tiles (tmm4-5) and two B tiles (tmm6-7) per 32-deep step of k, so every
//! tile loaded feeds two products. Both operands are packed as whole tiles beforehand
//! (weights once at load, activations per product), so each tile load reads one
//! contiguous KiB rather than 16 rows far apart.

use std::arch::asm;
use std::sync::OnceLock;

/// The tile configuration (`ldtilecfg` operand): palette 1, eight tiles of 16 rows x 64
/// bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Whether this CPU has AMX-BF16 and the kernel lets this process use it (asked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && request_tile_permission())
}

fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID exists on every x86-64 CPU; leaf 7 is valid when leaf 0 says so.
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return false;
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let (tile, bf16) = (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1);
        tile && bf16
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux (5.16+) gives the large
/// tile state to processes that ask; without it the first tile instruction faults.
fn request_tile_permission() -> bool {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        extern "C" {
            fn syscall(number: std::os::raw::c_long, ...) -> std::os::raw::c_long;
        }
        const SYS_ARCH_PRCTL: std::os::raw::c_long = 158;
        const ARCH_REQ_XCOMP_PERM: std::os::raw::c_long = 0x1023;
        const XFEATURE_XTILEDATA: std::os::raw::c_long = 18;
        // SAFETY: a plain syscall with integer arguments; failure is reported, not UB.
        unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    false
}

/// Loads the tile configuration on this thread; pair with [`release`].
///
/// # Safety
/// [`available`] must have returned true.
#[inline]
pub unsafe fn configure() {
    asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
}

/// Drops this thread's tile state, so the kernel need not save it on context switches.
///
/// # Safety
/// [`available`] must have returned true.
#[inline]
pub unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// C (32 x 32 f32 block, row stride `ldc` floats) = A (32 rows, `k_blocks * 32` deep) x B.
/// A is packed as tiles ([`super::pack_rows_amx`]): `a0` and `a1` (its rows 0..16 and
/// 16..32) each point at `k_blocks` consecutive 1 KiB tiles, so every tile load reads
/// one contiguous KiB; B likewise ([`super::pack_bf16`]): `b0` and `b1` are two column
/// blocks of 16.
///
/// # Safety
/// [`configure`] has run on this thread; every pointer covers what it is read or written
/// through: `a0`/`a1`/`b0`/`b1` `k_blocks * 512` bf16 each, `c` 32 rows x 32 f32.
#[inline]
pub unsafe fn block_32x32(
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    k_blocks: usize,
    c: *mut f32,
    ldc: usize,
) {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for kb in 0..k_blocks {
        let (pa0, pa1) = (a0.add(kb * 512), a1.add(kb * 512));
        let (pb0, pb1) = (b0.add(kb * 512), b1.add(kb * 512));
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) pa0, a1 = in(reg) pa1, b0 = in(reg) pb0, b1 = in(reg) pb1,
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    let c_stride = ldc * 4;
    let (c00, c01, c10, c11) = (c, c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
    asm!(
        "tilestored [{c00} + {s}*1], tmm0",
        "tilestored [{c01} + {s}*1], tmm1",
        "tilestored [{c10} + {s}*1], tmm2",
        "tilestored [{c11} + {s}*1], tmm3",
        c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, s = in(reg) c_stride,
        options(nostack),
    );
}
