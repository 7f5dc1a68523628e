//! Closure trampolines against their peers, in one run: per call, a direct
//! call (the baseline), a `Box<dyn Fn>` call, a call through an altpatch
//! trampoline closure and through a `libffi` crate closure (its bundled C
//! library); per closure, allocation + free for altpatch (typed closure and
//! raw trampoline, from a warm pool and from a fresh one that must map its
//! pages) and for libffi.

use std::hint::black_box;

use altpatch::trampoline::{Closure, Pool, Trampoline};
use criterion::{BatchSize, Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
use estimates::mean_ns;

/// Calls per measured loop.
const N: u64 = 1000;

static K: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(3);

/// The work every variant does per call: one multiply-add with the
/// captured (or, for the direct call, global) factor.
#[inline(never)]
extern "C" fn direct(x: u64) -> u64 {
    x.wrapping_mul(K.load(std::sync::atomic::Ordering::Relaxed))
        .wrapping_add(1)
}

#[inline(never)]
fn loop_direct(mut x: u64) -> u64 {
    for _ in 0..N {
        x = direct(x);
    }
    x
}

#[inline(never)]
fn loop_dyn(f: &dyn Fn(u64) -> u64, mut x: u64) -> u64 {
    for _ in 0..N {
        x = f(x);
    }
    x
}

#[inline(never)]
fn loop_c(f: unsafe extern "C" fn(u64) -> u64, mut x: u64) -> u64 {
    for _ in 0..N {
        // SAFETY: callers pass a live closure's code pointer.
        x = unsafe { f(x) };
    }
    x
}

#[inline(never)]
fn loop_ffi(f: &libffi::high::FnPtr1<'_, u64, u64>, mut x: u64) -> u64 {
    for _ in 0..N {
        // `call` is a plain call through the closure's code pointer.
        x = f.call(x);
    }
    x
}

fn bench(c: &mut Criterion) {
    let k = 3u64;
    let work = move |x: u64| x.wrapping_mul(k).wrapping_add(1);
    let boxed: Box<dyn Fn(u64) -> u64> = Box::new(work);
    let ours = Closure::<unsafe extern "C" fn(u64) -> u64>::new(work).unwrap();
    let ffi = libffi::high::Closure1::new(&work);
    let ffi_code = ffi.code_ptr();
    let want = loop_direct(1);
    assert_eq!(loop_dyn(&*boxed, 1), want);
    assert_eq!(loop_c(ours.code(), 1), want);
    assert_eq!(loop_ffi(ffi_code, 1), want);

    let mut g = c.benchmark_group("trampoline_call");
    g.throughput(criterion::Throughput::Elements(N));
    g.bench_function("direct", |b| b.iter(|| loop_direct(black_box(1))));
    g.bench_function("box_dyn_fn", |b| {
        b.iter(|| loop_dyn(black_box(&*boxed), black_box(1)))
    });
    g.bench_function("altpatch_closure", |b| {
        b.iter(|| loop_c(black_box(ours.code()), black_box(1)))
    });
    g.bench_function("libffi_closure", |b| {
        b.iter(|| loop_ffi(black_box(ffi_code), black_box(1)))
    });
    g.finish();

    let mut g = c.benchmark_group("trampoline_alloc");
    g.bench_function("altpatch_closure", |b| {
        b.iter(|| {
            let k = black_box(5u64);
            Closure::<unsafe extern "C" fn(u64) -> u64>::new(move |x: u64| x + k).unwrap()
        })
    });
    extern "C" fn target() {}
    g.bench_function("altpatch_raw", |b| {
        b.iter(|| Trampoline::new(target, black_box(std::ptr::null_mut())).unwrap())
    });
    g.bench_function("libffi_closure", |b| {
        b.iter(|| libffi::high::Closure1::new(black_box(&work)))
    });
    // From a fresh pool: 10 000 closures, including mapping their pages
    // (79 page pairs) and unmapping them when the pool drops.
    const FRESH: u64 = 10_000;
    g.throughput(criterion::Throughput::Elements(FRESH));
    g.bench_function("altpatch_closure_fresh_pool_10k", |b| {
        b.iter_batched(
            Pool::new,
            |pool| {
                let v: Vec<_> = (0..FRESH)
                    .map(|i| {
                        Closure::<unsafe extern "C" fn(u64) -> u64>::new_in(&pool, move |x: u64| {
                            x + i
                        })
                        .unwrap()
                    })
                    .collect();
                drop(v);
                pool
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);

/// `TRAMPOLINE_CALLS=<variant>` runs 1000 loops of that variant and exits:
/// a driver for `valgrind --tool=callgrind --toggle-collect='*loop_*'`,
/// which counts the instructions per call exactly (see BENCHMARKS.md).
fn count_driver(variant: &str) {
    let k = 3u64;
    let work = move |x: u64| x.wrapping_mul(k).wrapping_add(1);
    let boxed: Box<dyn Fn(u64) -> u64> = Box::new(work);
    let ours = Closure::<unsafe extern "C" fn(u64) -> u64>::new(work).unwrap();
    let ffi = libffi::high::Closure1::new(&work);
    let mut x = 1;
    for _ in 0..1000 {
        x = match variant {
            "direct" => loop_direct(black_box(x)),
            "box_dyn_fn" => loop_dyn(black_box(&*boxed), x),
            "altpatch_closure" => loop_c(black_box(ours.code()), x),
            "libffi_closure" => loop_ffi(black_box(ffi.code_ptr()), x),
            other => panic!("unknown variant {other}"),
        };
    }
    println!("{variant}: {x}");
}

fn main() {
    if let Ok(v) = std::env::var("TRAMPOLINE_CALLS") {
        count_driver(&v);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    if let Some(base) = mean_ns("trampoline_call/direct") {
        println!("\n| call | ns per call | vs direct | vs Box<dyn Fn> |\n|---|---:|---:|---:|");
        let dyn_ = mean_ns("trampoline_call/box_dyn_fn").unwrap_or(f64::NAN);
        for id in ["direct", "box_dyn_fn", "altpatch_closure", "libffi_closure"] {
            if let Some(t) = mean_ns(&format!("trampoline_call/{id}")) {
                println!(
                    "| {id} | {:.3} | {:.2}x | {:.2}x |",
                    t / N as f64,
                    t / base,
                    t / dyn_
                );
            }
        }
    }
    println!("\n| alloc + free | ns per closure |\n|---|---:|");
    for (id, per) in [
        ("altpatch_closure", 1.0),
        ("altpatch_raw", 1.0),
        ("libffi_closure", 1.0),
        ("altpatch_closure_fresh_pool_10k", 10_000.0),
    ] {
        if let Some(t) = mean_ns(&format!("trampoline_alloc/{id}")) {
            println!("| {id} | {:.1} |", t / per);
        }
    }
}
