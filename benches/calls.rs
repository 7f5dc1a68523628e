//! Per-call cost, side by side in one run: a direct call (the baseline), an
//! inline static call, a static call through its trampoline, a function
//! pointer in an `AtomicPtr`, the `multiversion` crate's dispatch; and a
//! static branch, an `AtomicBool` check and the `static-keys` crate's
//! branch. Each variant is a loop of 1000 calls in its own function.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use altpatch::static_key::StaticFalseKey;
use altpatch::{Image, LinuxPoke, static_branch_unlikely, static_call};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
use estimates::mean_ns;
#[path = "support/steps.rs"]
mod steps;
use steps::{N, loop_direct, loop_multiversion, step, step_other};

static_call! {
    fn sc_inline(x: u64) -> u64 = step_other;
}
static_call! {
    fn sc_tramp(x: u64) -> u64 = step_other;
}

static PTR: AtomicPtr<()> = AtomicPtr::new(step as *mut ());

#[inline(never)]
fn loop_inline(mut x: u64) -> u64 {
    for _ in 0..N {
        x = sc_inline(x);
    }
    x
}

#[inline(never)]
fn loop_trampoline(mut x: u64) -> u64 {
    for _ in 0..N {
        x = sc_tramp(x);
    }
    x
}

#[inline(never)]
fn loop_atomic_ptr(mut x: u64) -> u64 {
    for _ in 0..N {
        // SAFETY: PTR always holds `step`, an extern "C" fn(u64) -> u64.
        let f: extern "C" fn(u64) -> u64 =
            unsafe { std::mem::transmute(PTR.load(Ordering::Acquire)) };
        x = f(x);
    }
    x
}

static KEY: StaticFalseKey = StaticFalseKey::new();
static FLAG: AtomicBool = AtomicBool::new(false);
static_keys::define_static_key_false!(SK);

#[inline(never)]
fn slow(x: u64) -> u64 {
    black_box(x ^ 0x55)
}

#[inline(never)]
fn loop_static_branch(mut x: u64) -> u64 {
    for _ in 0..N {
        if static_branch_unlikely!(KEY) {
            x = slow(x);
        }
        x = x.wrapping_add(black_box(1));
    }
    x
}

#[inline(never)]
fn loop_atomic_bool(mut x: u64) -> u64 {
    for _ in 0..N {
        if FLAG.load(Ordering::Relaxed) {
            x = slow(x);
        }
        x = x.wrapping_add(black_box(1));
    }
    x
}

#[inline(never)]
fn loop_static_keys_crate(mut x: u64) -> u64 {
    for _ in 0..N {
        if static_keys::static_branch_unlikely!(SK) {
            x = slow(x);
        }
        x = x.wrapping_add(black_box(1));
    }
    x
}

fn setup() {
    static_keys::global_init();
    // Inline: the trampoline and every call site now call `step` directly.
    let r = sc_inline::update(step).expect("inline update");
    assert!(
        r.inlined >= 1,
        "no inline site: is the bench linked with --emit-relocs?"
    );
    // Through the trampoline only.
    let image = Image::current();
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: nothing runs sc_tramp during set-up.
    unsafe { sc_tramp::update_with(step, &image, &[], &mut poke) }.unwrap();
    let want = loop_direct(1);
    assert_eq!(loop_inline(1), want);
    assert_eq!(loop_trampoline(1), want);
    assert_eq!(loop_atomic_ptr(1), want);
    assert_eq!(loop_multiversion(1), want);
}

fn bench(c: &mut Criterion) {
    setup();
    let mut g = c.benchmark_group("calls");
    g.throughput(criterion::Throughput::Elements(N));
    g.bench_function("direct", |b| b.iter(|| loop_direct(black_box(1))));
    g.bench_function("static_call_inline", |b| {
        b.iter(|| loop_inline(black_box(1)))
    });
    g.bench_function("static_call_trampoline", |b| {
        b.iter(|| loop_trampoline(black_box(1)))
    });
    g.bench_function("atomic_fn_pointer", |b| {
        b.iter(|| loop_atomic_ptr(black_box(1)))
    });
    g.bench_function("multiversion", |b| {
        b.iter(|| loop_multiversion(black_box(1)))
    });
    g.finish();
    let mut g = c.benchmark_group("branches");
    g.throughput(criterion::Throughput::Elements(N));
    g.bench_function("static_branch", |b| {
        b.iter(|| loop_static_branch(black_box(1)))
    });
    g.bench_function("atomic_bool", |b| b.iter(|| loop_atomic_bool(black_box(1))));
    g.bench_function("static_keys_crate", |b| {
        b.iter(|| loop_static_keys_crate(black_box(1)))
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    for (group, base, ids) in [
        (
            "calls",
            "direct",
            &[
                "direct",
                "static_call_inline",
                "static_call_trampoline",
                "atomic_fn_pointer",
                "multiversion",
            ][..],
        ),
        (
            "branches",
            "atomic_bool",
            &["static_branch", "atomic_bool", "static_keys_crate"][..],
        ),
    ] {
        let Some(b) = mean_ns(&format!("{group}/{base}")) else {
            continue;
        };
        println!("\n| {group} | ns per call | vs {base} |\n|---|---:|---:|");
        for id in ids {
            if let Some(t) = mean_ns(&format!("{group}/{id}")) {
                println!("| {id} | {:.3} | {:.3}x |", t / N as f64, t / b);
            }
        }
    }
}
