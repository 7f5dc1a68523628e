//! Cost of an indirect call, side by side in one run: a direct call, a
//! plain `call *%r11` (code built without retpolines: the baseline), the
//! generic retpoline thunk, the thunk patched to `jmp *%r11`, the thunk
//! patched to `lfence; jmp *%r11`, the call site inlined to
//! `call *%r11`, and a `cs`-prefixed 6-byte site (GCC's and rustc's
//! `-mindirect-branch-cs-prefix`) inlined to `lfence; call *%r11`, which a
//! 5-byte site through `%r8`..`%r15` has no room for (it calls the thunk
//! patched to `lfence; jmp *%r11` instead). Each with one target every time (predictable) and with one
//! of four targets drawn at random (unpredictable: 64 000 random draws,
//! 1000 per iteration).
//!
//! Every variant is a loop of the same shape in hand-written assembly
//! (benches/support/retpoline_loops.rs: head 64-byte aligned, call at the
//! same offset, checked before timing), patched with
//! `altpatch::retpoline::apply` between variants, and measured with its
//! targets at three placements in their 64-byte blocks. Ratios are paired
//! against the plain indirect call at the same placement; instructions
//! per call are counted with callgrind when valgrind is installed.

use std::hint::black_box;

use altpatch::retpoline::{self, Mode, Policy};
use altpatch::sites::Site;
use altpatch::{Image, LinuxPoke};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
#[macro_use]
#[path = "support/aligned.rs"]
mod aligned;
#[path = "support/shape.rs"]
mod shape;
use aligned::{Placement, Row};
use shape::Shape;
#[path = "support/retpoline_loops.rs"]
mod loops;
use loops::OFFSETS;

const N: usize = 1000;
/// Windows of `N` indices the iterations cycle through.
const WINDOWS: usize = 64;

/// The inline loops' sites (5 bytes, and 6 with a `cs` prefix), from this
/// program's relocations.
fn inline_sites() -> [Site; 2] {
    let all = altpatch::elf::current_sites().expect("benches link with --emit-relocs");
    let at = |a: usize, len: u8| {
        *all.iter()
            .find(|s| s.addr == a && s.len == len)
            .expect("each inline loop's call is a site, prefix included")
    };
    [at(loops::inline_site(), 5), at(loops::cs_site(), 6)]
}

/// Puts the thunks in `thunks` mode and the inline loops' sites in `site`
/// mode (in place: nothing else runs the loops).
fn set_modes(thunks: Mode, site: Mode) {
    let image = Image::current();
    let policy = |mode| Policy::new(mode, "benchmark");
    let mut poke = LinuxPoke::new().expect("poke");
    // SAFETY: single-threaded benchmark; the sites and thunks are idle.
    unsafe {
        retpoline::apply(&image, &policy(site), &inline_sites(), &mut poke).expect("site");
        retpoline::apply(&image, &policy(thunks), &[], &mut poke).expect("thunks");
    }
}

/// A variant: its loop (`None`: the direct loop of the placement), thunk
/// mode, inline-site mode.
type Variant = (&'static str, Option<loops::Loop>, Mode, Mode);

const VARIANTS: [Variant; 7] = [
    ("direct", None, Mode::Generic, Mode::Generic),
    (
        "plain_indirect",
        Some(loops::rp_loop_plain),
        Mode::Generic,
        Mode::Generic,
    ),
    (
        "generic_retpoline",
        Some(loops::rp_loop_thunk),
        Mode::Generic,
        Mode::Generic,
    ),
    (
        "thunk_jmp_r11",
        Some(loops::rp_loop_thunk),
        Mode::Plain,
        Mode::Generic,
    ),
    (
        "thunk_lfence_jmp_r11",
        Some(loops::rp_loop_thunk),
        Mode::Lfence,
        Mode::Generic,
    ),
    (
        "inlined_call_r11",
        Some(loops::rp_loop_inline),
        Mode::Generic,
        Mode::Plain,
    ),
    (
        "cs_site_lfence_call_r11",
        Some(loops::rp_loop_cs),
        Mode::Generic,
        Mode::Lfence,
    ),
];

/// Sets the modes of `v` and returns its loop at placement `off`.
fn prepare(v: &Variant, off: usize) -> loops::Loop {
    set_modes(v.2, v.3);
    v.1.unwrap_or(loops::direct(off))
}

/// Results at every placement, and the loop shapes (before patching, when
/// the inline loop's call is still the thunk call).
fn check() -> String {
    set_modes(Mode::Generic, Mode::Generic);
    let shape = |name, f: loops::Loop| Shape::of(name, f as usize);
    let base = shape("plain", loops::rp_loop_plain);
    let others = [
        shape("direct_0", loops::direct(0)),
        shape("direct_16", loops::direct(16)),
        shape("direct_32", loops::direct(32)),
        shape("thunk", loops::rp_loop_thunk),
        shape("inline", loops::rp_loop_inline),
        shape("cs", loops::rp_loop_cs),
    ];
    let line = shape::check_loops(&base, &others.iter().collect::<Vec<_>>());
    for predictable in [true, false] {
        let idx = loops::indices(N, predictable);
        for off in OFFSETS {
            let want = idx.iter().fold(1, |x, &k| loops::reference(k, x));
            for v in &VARIANTS {
                if v.1.is_none() && !predictable {
                    continue; // the direct loop always calls target 0
                }
                let f = prepare(v, off);
                assert_eq!(loops::run_at(f, off, &idx, 1), want, "{} at +{off}", v.0);
            }
        }
    }
    set_modes(Mode::Generic, Mode::Generic);
    line
}

fn bench(c: &mut Criterion) {
    for (group, predictable) in [("predictable", true), ("unpredictable", false)] {
        // Each iteration runs the next window of a long random sequence:
        // a predictor with long history could learn one repeated 1000-call
        // sequence, not 64 Ki of them.
        let idx = loops::indices(WINDOWS * N, predictable);
        let mut g = c.benchmark_group(format!("retpoline_{group}"));
        g.throughput(criterion::Throughput::Elements(N as u64));
        g.warm_up_time(std::time::Duration::from_millis(500));
        g.measurement_time(std::time::Duration::from_secs(2));
        for v in &VARIANTS {
            for off in OFFSETS {
                let f = prepare(v, off);
                let mut w = 0;
                // The direct loop ignores the table but makes the same loads.
                g.bench_function(Placement::Aligned.id(v.0, off), |b| {
                    b.iter(|| {
                        w = (w + 1) % WINDOWS;
                        loops::run_at(f, off, &idx[w * N..(w + 1) * N], black_box(1))
                    })
                });
            }
        }
        g.finish();
    }
    set_modes(Mode::Generic, Mode::Generic);
}

criterion_group!(benches, bench);

fn main() {
    if let Some(name) = aligned::count_request() {
        let v = VARIANTS.iter().find(|v| v.0 == name).expect("variant");
        let f = prepare(v, 0);
        let idx = loops::indices(N, true);
        black_box(loops::run(f, &idx, 1));
        println!("{name}: {}", aligned::counted(&|x| loops::run(f, &idx, x)));
        return;
    }
    println!("{}", check());
    benches();
    Criterion::default().configure_from_args().final_summary();
    let counts = aligned::instructions_per_call(&VARIANTS.map(|v| v.0));
    for (group, predictable) in [("predictable", true), ("unpredictable", false)] {
        let all = loops::indices(WINDOWS * N, predictable);
        let idx = &all;
        let timed = |f: loops::Loop, off: usize| {
            let mut w = 0;
            move || {
                w = (w + 1) % WINDOWS;
                loops::run_at(f, off, &idx[w * N..(w + 1) * N], black_box(1))
            }
        };
        let rows: Vec<Row> = VARIANTS
            .iter()
            .zip(&counts)
            .map(|(v, count)| Row {
                name: v.0,
                placement: Placement::Aligned,
                ratios: OFFSETS
                    .iter()
                    .map(|&off| {
                        let f = prepare(v, off);
                        let base = std::cell::RefCell::new(timed(loops::rp_loop_plain, off));
                        let this = std::cell::RefCell::new(timed(f, off));
                        aligned::paired_ratio(&|| base.borrow_mut()(), &|| this.borrow_mut()())
                    })
                    .collect(),
                count: *count,
            })
            .collect();
        aligned::print_table(&format!("retpoline_{group}"), "plain_indirect", &rows);
    }
    set_modes(Mode::Generic, Mode::Generic);
}
