//! The call target and baselines shared by the per-call benches
//! (`calls`, `ifunc`; included with `#[path]`): a small `extern "C"`
//! function, a twin with the same body, loops of `N` direct and
//! `multiversion` calls.
#![allow(dead_code)]

use std::hint::black_box;

use multiversion::multiversion;

/// Calls per loop.
pub const N: u64 = 1000;

/// The call target.
#[inline(never)]
pub extern "C" fn step(x: u64) -> u64 {
    black_box(x.wrapping_mul(3).wrapping_add(1))
}

/// The same function at another address (a default to move away from).
#[inline(never)]
pub extern "C" fn step_other(x: u64) -> u64 {
    black_box(x.wrapping_mul(3).wrapping_add(1))
}

#[multiversion(targets("x86_64+avx2+bmi2", "x86_64+sse4.2"))]
fn mv_step(x: u64) -> u64 {
    black_box(x.wrapping_mul(3).wrapping_add(1))
}

/// `N` direct calls of `step`: the baseline.
#[inline(never)]
pub fn loop_direct(mut x: u64) -> u64 {
    for _ in 0..N {
        x = step(x);
    }
    x
}

/// `N` calls through the `multiversion` crate's dispatch.
#[inline(never)]
pub fn loop_multiversion(mut x: u64) -> u64 {
    for _ in 0..N {
        x = mv_step(x);
    }
    x
}
