//! What limits the AMX bf16 kernel (`src/encoder/matmul/amx.rs`): `tdpbf16ps` alone, on
//! tiles already loaded, against the kernel's inner step (two A and two B tile loads
//! feeding four products) with every tile in L1. Prints GFLOP/s per core, the median of
//! several rounds (this host's speed swings between rounds). Not criterion: a probe of
//! the machine, not a regression guard. `cargo bench --bench amx_probe`; skipped where
//! the CPU or kernel gives no AMX-BF16.

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
fn main() {
    use nearspan::encoder::matmul::amx;
    use std::arch::asm;
    if !amx::available() {
        println!("amx_probe: no AMX-BF16 here, skipped");
        return;
    }
    const STEPS: u64 = 1_000_000;
    const FLOP_PER_PRODUCT: f64 = 16.0 * 16.0 * 32.0 * 2.0;
    // Four 1 KiB tiles' worth of bf16 ones, in L1 after the first step.
    let tiles = vec![0x3f80u16; 4 * 512];
    let p = tiles.as_ptr();
    let mut products_only = Vec::new();
    let mut with_loads = Vec::new();
    // SAFETY: `available` said yes; `configure` precedes every tile instruction and
    // `release` follows them; every load reads inside `tiles` (4 x 512 bf16, 64-byte rows).
    unsafe {
        amx::configure();
        for _round in 0..7 {
            asm!("tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm5, [{p} + {s}*1]",
                 "tileloadd tmm6, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                 "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                 p = in(reg) p, s = in(reg) 64usize, options(nostack, readonly));
            let t = Instant::now();
            for _ in 0..STEPS {
                asm!("tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                     "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
            }
            products_only.push(STEPS as f64 * 4.0 * FLOP_PER_PRODUCT / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            for _ in 0..STEPS {
                asm!("tileloadd tmm4, [{a0} + {s}*1]", "tileloadd tmm5, [{a1} + {s}*1]",
                     "tileloadd tmm6, [{b0} + {s}*1]", "tileloadd tmm7, [{b1} + {s}*1]",
                     "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                     "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
                     a0 = in(reg) p, a1 = in(reg) p.add(512), b0 = in(reg) p.add(1024), b1 = in(reg) p.add(1536),
                     s = in(reg) 64usize, options(nostack, readonly));
            }
            with_loads.push(STEPS as f64 * 4.0 * FLOP_PER_PRODUCT / t.elapsed().as_secs_f64() / 1e9);
        }
        amx::release();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    println!("amx_probe, one core, GFLOP/s (median of 7 rounds; the rounds in order)");
    println!("  tdpbf16ps alone:                   {:>6.0}   ({})", median(&mut products_only.clone()), fmt(&products_only));
    println!("  2 A + 2 B tile loads, 4 products:  {:>6.0}   ({})", median(&mut with_loads.clone()), fmt(&with_loads));
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("amx_probe: not an x86-64 CPU, skipped");
}
