//! A hot loop of big-endian loads, four ways, in one run:
//!
//! * `patched`: an `alternative!` site (mov+bswap, movbe where the CPU has
//!   it), patched at start-up;
//! * `direct`: the same instruction (`movbe`, or mov+bswap without it)
//!   compiled directly;
//! * `runtime_check`: `is_x86_feature_detected!("movbe")` tested at every
//!   load, branching to either sequence;
//! * `fn_pointer`: a function chosen once at start-up, called through a
//!   pointer.
//!
//! After the run a table of ratios against `direct` is printed.

use std::hint::black_box;
use std::sync::OnceLock;

use altpatch::cpu::{Feature, Features};
use altpatch::{Image, LinuxPoke, alternative};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
use estimates::mean_ns;

const N: usize = 4096;

#[inline(always)]
fn load_patched(p: &u32) -> u32 {
    let v: u32;
    // SAFETY: reads the u32 behind a valid reference.
    unsafe {
        alternative!(
            "mov {v:e}, [{p}]\nbswap {v:e}",
            [Movbe => "movbe {v:e}, [{p}]"],
            p = in(reg) p, v = out(reg) v,
            options(nostack, readonly, preserves_flags)
        )
    };
    v
}

#[inline(always)]
fn load_movbe(p: &u32) -> u32 {
    let v: u32;
    // SAFETY: reads the u32 behind a valid reference; only called where the
    // CPU has movbe.
    unsafe {
        core::arch::asm!("movbe {v:e}, [{p}]", p = in(reg) p, v = out(reg) v,
            options(nostack, readonly, preserves_flags))
    };
    v
}

#[inline(always)]
fn load_bswap(p: &u32) -> u32 {
    let v: u32;
    // SAFETY: reads the u32 behind a valid reference.
    unsafe {
        core::arch::asm!("mov {v:e}, [{p}]", "bswap {v:e}", p = in(reg) p, v = out(reg) v,
            options(nostack, readonly, preserves_flags))
    };
    v
}

#[inline(never)]
fn sum_patched(xs: &[u32]) -> u32 {
    xs.iter().fold(0u32, |s, x| s.wrapping_add(load_patched(x)))
}

#[inline(never)]
fn sum_direct_movbe(xs: &[u32]) -> u32 {
    xs.iter().fold(0u32, |s, x| s.wrapping_add(load_movbe(x)))
}

#[inline(never)]
fn sum_direct_bswap(xs: &[u32]) -> u32 {
    xs.iter().fold(0u32, |s, x| s.wrapping_add(load_bswap(x)))
}

#[inline(never)]
fn sum_runtime_check(xs: &[u32]) -> u32 {
    xs.iter().fold(0u32, |s, x| {
        let v = if std::arch::is_x86_feature_detected!("movbe") {
            load_movbe(x)
        } else {
            load_bswap(x)
        };
        s.wrapping_add(v)
    })
}

#[inline(never)]
fn one_movbe(p: &u32) -> u32 {
    load_movbe(p)
}

#[inline(never)]
fn one_bswap(p: &u32) -> u32 {
    load_bswap(p)
}

static CHOSEN: OnceLock<fn(&u32) -> u32> = OnceLock::new();

#[inline(never)]
fn sum_fn_pointer(xs: &[u32]) -> u32 {
    let f = *CHOSEN.get().unwrap();
    xs.iter().fold(0u32, |s, x| s.wrapping_add(f(x)))
}

fn setup() -> bool {
    let features = Features::detect();
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: nothing runs the bench's alternative sites during start-up.
    let report = unsafe { altpatch::alternative::apply(&Image::current(), &features, &mut poke) }
        .expect("apply alternatives");
    eprintln!("{report}");
    let movbe = features.has(Feature::Movbe);
    CHOSEN.get_or_init(|| if movbe { one_movbe } else { one_bswap });
    movbe
}

fn bench(c: &mut Criterion) {
    let movbe = setup();
    let xs: Vec<u32> = (0..N as u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    let expect = sum_direct_bswap(&xs);
    assert_eq!(sum_patched(&xs), expect);
    assert_eq!(sum_runtime_check(&xs), expect);
    assert_eq!(sum_fn_pointer(&xs), expect);
    let direct: fn(&[u32]) -> u32 = if movbe {
        assert_eq!(sum_direct_movbe(&xs), expect);
        sum_direct_movbe
    } else {
        sum_direct_bswap
    };

    let mut g = c.benchmark_group("alternatives");
    g.throughput(criterion::Throughput::Elements(N as u64));
    g.bench_function("direct", |b| b.iter(|| direct(black_box(&xs))));
    g.bench_function("patched", |b| b.iter(|| sum_patched(black_box(&xs))));
    g.bench_function("runtime_check", |b| {
        b.iter(|| sum_runtime_check(black_box(&xs)))
    });
    g.bench_function("fn_pointer", |b| b.iter(|| sum_fn_pointer(black_box(&xs))));
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let Some(base) = mean_ns("alternatives/direct") else {
        return;
    };
    println!("\n| variant | ns per load | vs direct |\n|---|---:|---:|");
    for id in ["direct", "patched", "runtime_check", "fn_pointer"] {
        if let Some(t) = mean_ns(&format!("alternatives/{id}")) {
            println!("| {id} | {:.3} | {:.3}x |", t / N as f64, t / base);
        }
    }
}
