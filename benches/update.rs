//! Update latency: flipping a static key with 1, 100, 1000 and 10 000
//! sites and re-targeting a static call with 1000 call sites, live (other
//! threads may run the sites) with the default publication (the page swap,
//! staged as a fresh private mapping of the binary so it stays the file's
//! text) and with the INT3 protocol, and in place (no other thread); the
//! page swap staged as anonymous memory as before (what keeping the file
//! costs); against the `static-keys` crate's toggle of 1, 100 and 1000
//! sites, in one run. Then how long `enable()` blocks its caller while four
//! threads run the sites on this machine: median, 99th percentile, worst.

use std::hint::black_box;
use std::time::{Duration, Instant};

use altpatch::os::linux::{set_live_publication, stage_swaps_anonymously_for_benchmarks};
use altpatch::static_key::{KeyIndex, StaticFalseKey};
use altpatch::{Image, LinuxPoke, Publish, static_branch_unlikely, static_call};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
use estimates::mean_ns;

macro_rules! rep10 {
    ($($t:tt)*) => {
        $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*;
    };
}

static K1: StaticFalseKey = StaticFalseKey::new();
static K100: StaticFalseKey = StaticFalseKey::new();
static K1000: StaticFalseKey = StaticFalseKey::new();
static K10000: StaticFalseKey = StaticFalseKey::new();
static_keys::define_static_key_false!(SK1);
static_keys::define_static_key_false!(SK100);
static_keys::define_static_key_false!(SK1000);

#[inline(never)]
fn sites_1(n: &mut u64) {
    if static_branch_unlikely!(K1) {
        *n += 1;
    }
}

#[inline(never)]
fn sites_100(n: &mut u64) {
    rep10!(rep10!({
        if static_branch_unlikely!(K100) {
            *n += 1;
        }
    }));
}

#[inline(never)]
fn sites_1000(n: &mut u64) {
    rep10!(rep10!(rep10!({
        if static_branch_unlikely!(K1000) {
            *n += 1;
        }
    })));
}

#[inline(never)]
fn sites_10000(n: &mut u64) {
    rep10!(rep10!(rep10!(rep10!({
        if static_branch_unlikely!(K10000) {
            *n += 1;
        }
    }))));
}

#[inline(never)]
fn sk_sites_1(n: &mut u64) {
    if static_keys::static_branch_unlikely!(SK1) {
        *n += 1;
    }
}

#[inline(never)]
fn sk_sites_100(n: &mut u64) {
    rep10!(rep10!({
        if static_keys::static_branch_unlikely!(SK100) {
            *n += 1;
        }
    }));
}

#[inline(never)]
fn sk_sites_1000(n: &mut u64) {
    rep10!(rep10!(rep10!({
        if static_keys::static_branch_unlikely!(SK1000) {
            *n += 1;
        }
    })));
}

extern "C" fn one(x: u64) -> u64 {
    x + 1
}

extern "C" fn two(x: u64) -> u64 {
    x + 2
}

static_call! {
    fn sc_1000(x: u64) -> u64 = one;
}

#[inline(never)]
fn calls_1000(x: u64) -> u64 {
    let mut acc = 0u64;
    rep10!(rep10!(rep10!({
        acc = acc.wrapping_add(sc_1000(x));
    })));
    acc
}

/// Times `flip(i)` for iterations i = 0, 1, ... (alternating states).
fn flips(iters: u64, mut flip: impl FnMut(u64)) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        flip(i);
    }
    start.elapsed()
}

/// Runs `f` with the live publication set to `publish`, then restores
/// the default.
fn with_live<R>(publish: Publish, f: impl FnOnce() -> R) -> R {
    set_live_publication(publish).unwrap();
    let r = f();
    set_live_publication(Publish::Remap).unwrap();
    r
}

fn bench(c: &mut Criterion) {
    static_keys::global_init();
    let image = Image::current();
    let index = KeyIndex::new(&image);
    println!(
        "text written by: {}",
        altpatch::os::linux::strategy().unwrap()
    );
    // Warm up: check counts, touch every page once.
    for (k, n) in [(&K1, 1), (&K100, 100), (&K1000, 1000), (&K10000, 10_000)] {
        assert_eq!(k.site_count(), n);
        k.enable().unwrap();
        k.disable().unwrap();
    }
    assert!(sc_1000::static_call().site_count() >= 1000);
    sc_1000::update(two).unwrap();
    sc_1000::update(one).unwrap();
    let mut sink = 0;
    sites_1(&mut sink);
    sites_100(&mut sink);
    sites_1000(&mut sink);
    sites_10000(&mut sink);
    sk_sites_1(&mut sink);
    sk_sites_100(&mut sink);
    sk_sites_1000(&mut sink);
    black_box((sink, calls_1000(1)));

    let mut g = c.benchmark_group("update");
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
    for (name, key) in [
        ("1", &K1),
        ("100", &K100),
        ("1000", &K1000),
        ("10000", &K10000),
    ] {
        g.bench_function(format!("key_swap/{name}"), |b| {
            b.iter_custom(|iters| {
                flips(iters, |_| {
                    key.toggle().unwrap();
                })
            })
        });
        g.bench_function(format!("key_int3/{name}"), |b| {
            b.iter_custom(|iters| {
                with_live(Publish::Live, || {
                    flips(iters, |_| {
                        key.toggle().unwrap();
                    })
                })
            })
        });
        g.bench_function(format!("key_in_place/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut poke = LinuxPoke::new().unwrap();
                flips(iters, |i| {
                    // SAFETY: no other thread runs the bench's key sites.
                    unsafe { key.set_with(i % 2 == 0, &image, &index, &mut poke) }.unwrap();
                })
            })
        });
        if key.is_enabled() {
            key.disable().unwrap();
        }
    }
    // The page swap staged as anonymous memory, as before it stayed the
    // file's (unknown to uprobes, perf and debuggers): the baseline of the
    // file-backed swap, measured in the same run.
    for (name, key) in [("1", &K1), ("100", &K100), ("1000", &K1000)] {
        g.bench_function(format!("key_swap_anonymous/{name}"), |b| {
            b.iter_custom(|iters| {
                stage_swaps_anonymously_for_benchmarks(true);
                let t = flips(iters, |_| {
                    key.toggle().unwrap();
                });
                stage_swaps_anonymously_for_benchmarks(false);
                t
            })
        });
        if key.is_enabled() {
            key.disable().unwrap();
        }
    }
    let retarget = |i: u64| {
        sc_1000::update(if i.is_multiple_of(2) { two } else { one }).unwrap();
    };
    g.bench_function("static_call_swap/1000", |b| {
        b.iter_custom(|iters| flips(iters, retarget))
    });
    g.bench_function("static_call_int3/1000", |b| {
        b.iter_custom(|iters| with_live(Publish::Live, || flips(iters, retarget)))
    });
    macro_rules! sk_bench {
        ($name:literal, $key:ident) => {
            g.bench_function(concat!("static_keys_crate/", $name), |b| {
                b.iter_custom(|iters| {
                    flips(iters, |i| {
                        // SAFETY: the crate's contract: no concurrent
                        // modification.
                        unsafe {
                            if i % 2 == 0 {
                                $key.enable()
                            } else {
                                $key.disable()
                            }
                        }
                    })
                })
            });
        };
    }
    sk_bench!("1", SK1);
    sk_bench!("100", SK100);
    sk_bench!("1000", SK1000);
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let us = |id: &str| mean_ns(&format!("update/{}", id.replace('/', "_"))).map(|t| t / 1000.0);
    println!(
        "\n| update | sites | µs per update | vs 1 site (same mode) | static-keys time / this time (same sites) |\n|---|---:|---:|---:|---:|"
    );
    for mode in [
        "key_swap",
        "key_swap_anonymous",
        "key_int3",
        "key_in_place",
        "static_keys_crate",
    ] {
        let one = us(&format!("{mode}/1"));
        for n in ["1", "100", "1000", "10000"] {
            let (Some(t), Some(o)) = (us(&format!("{mode}/{n}")), one) else {
                continue;
            };
            let vs_sk = us(&format!("static_keys_crate/{n}"))
                .map(|s| format!("{:.1}x", s / t))
                .unwrap_or_default();
            println!("| {mode} | {n} | {t:.2} | {:.2}x | {vs_sk} |", t / o);
        }
    }
    for id in ["static_call_swap/1000", "static_call_int3/1000"] {
        if let Some(t) = us(id) {
            println!("| {id} | 1000 | {t:.2} | | |");
        }
    }
    println!(
        "\n| sites | file-backed swap µs | anonymous swap µs | file-backed / anonymous (goal <= 1.2) |\n|---:|---:|---:|---:|"
    );
    for n in ["1", "100", "1000"] {
        if let (Some(f), Some(a)) = (
            us(&format!("key_swap/{n}")),
            us(&format!("key_swap_anonymous/{n}")),
        ) {
            println!("| {n} | {f:.2} | {a:.2} | {:.2}x |", f / a);
        }
    }
    paired();
    blocking();
}

/// The file-backed and the anonymous swap timed alternately, 50 updates of
/// one then 50 of the other, 4000 of each: medians, which the machine's
/// drift and noise (a shared VM) move far less than the means above.
fn paired() {
    println!(
        "\n| sites | file-backed swap, median µs | anonymous swap, median µs | ratio |\n|---:|---:|---:|---:|"
    );
    for (n, key) in [(1, &K1), (100, &K100), (1000, &K1000)] {
        let (mut file, mut anon) = (Vec::new(), Vec::new());
        for round in 0..160 {
            let anonymous = round % 2 == 1;
            stage_swaps_anonymously_for_benchmarks(anonymous);
            let out = if anonymous { &mut anon } else { &mut file };
            for _ in 0..50 {
                let start = Instant::now();
                key.toggle().unwrap();
                out.push(start.elapsed());
            }
        }
        stage_swaps_anonymously_for_benchmarks(false);
        if key.is_enabled() {
            key.disable().unwrap();
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort_unstable();
            v[v.len() / 2].as_secs_f64() * 1e6
        };
        let (f, a) = (median(&mut file), median(&mut anon));
        println!("| {n} | {f:.1} | {a:.1} | {:.2}x |", f / a);
    }
}

/// How long `enable()`/`disable()` of a 1000-site key blocks its caller
/// while four threads call through the sites (the page swap, the default):
/// 2000 updates, each timed alone.
fn blocking() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sites_1000(&mut n);
                }
                n
            })
        })
        .collect();
    let mut t: Vec<Duration> = (0..2000)
        .map(|_| {
            let start = Instant::now();
            K1000.toggle().unwrap();
            start.elapsed()
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let hits: u64 = threads.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(hits > 0, "the callers never saw the key enabled");
    t.sort_unstable();
    let at = |q: f64| t[((t.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!(
        "\nenable/disable of 1000 sites with 4 threads running them: median {:.0} µs, p99 {:.0} µs, worst {:.0} µs ({} updates)",
        at(0.5),
        at(0.99),
        at(1.0),
        t.len()
    );
}
