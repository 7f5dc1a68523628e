//! Cost of an indirect call, side by side in one run: a direct call (the
//! baseline), a plain `call *%r11` (code built without retpolines), the
//! generic retpoline thunk, the thunk patched to `jmp *%r11`, the thunk
//! patched to `lfence; jmp *%r11`, and the call site inlined to
//! `call *%r11`. Each with one target every time (predictable) and with one
//! of four targets drawn at random (unpredictable: 64 000 random draws,
//! 1000 per iteration). Every variant is a loop
//! of 1000 calls in hand-written assembly (benches/support/retpoline_loops.rs),
//! patched with `altpatch::retpoline::apply` between the groups.

use std::hint::black_box;

use altpatch::retpoline::{self, Mode, Policy};
use altpatch::sites::Site;
use altpatch::{Image, LinuxPoke};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
use estimates::mean_ns;
#[path = "support/retpoline_loops.rs"]
mod loops;

const N: usize = 1000;
/// Windows of `N` indices the iterations cycle through.
const WINDOWS: usize = 64;

/// The inline loop's site, from this program's relocations.
fn inline_site() -> Site {
    let at = loops::inline_site();
    *altpatch::elf::current_sites()
        .expect("benches link with --emit-relocs")
        .iter()
        .find(|s| s.addr == at)
        .expect("the inline loop's call is a site")
}

/// Puts the thunks in `thunks` mode and the inline loop's site in `site`
/// mode (in place: nothing else runs the loops).
fn set_modes(thunks: Mode, site: Mode) {
    let image = Image::current();
    let policy = |mode| Policy::new(mode, "benchmark");
    let mut poke = LinuxPoke::new().expect("poke");
    // SAFETY: single-threaded benchmark; the site and thunks are idle.
    unsafe {
        retpoline::apply(&image, &[inline_site()], &policy(site), &mut poke).expect("site");
        retpoline::apply(&image, &[], &policy(thunks), &mut poke).expect("thunks");
    }
}

/// (name, loop, thunk mode, inline-site mode) in the order they run.
const VARIANTS: [(&str, loops::Loop, Mode, Mode); 6] = [
    (
        "direct",
        loops::rp_loop_direct,
        Mode::Generic,
        Mode::Generic,
    ),
    (
        "plain_indirect",
        loops::rp_loop_plain,
        Mode::Generic,
        Mode::Generic,
    ),
    (
        "generic_retpoline",
        loops::rp_loop_thunk,
        Mode::Generic,
        Mode::Generic,
    ),
    (
        "thunk_jmp_r11",
        loops::rp_loop_thunk,
        Mode::Plain,
        Mode::Generic,
    ),
    (
        "thunk_lfence_jmp_r11",
        loops::rp_loop_thunk,
        Mode::Lfence,
        Mode::Generic,
    ),
    (
        "inlined_call_r11",
        loops::rp_loop_inline,
        Mode::Generic,
        Mode::Plain,
    ),
];

fn bench(c: &mut Criterion) {
    for (group, predictable) in [("predictable", true), ("unpredictable", false)] {
        // Each iteration runs the next window of a long random sequence:
        // a predictor with long history could learn one repeated 1000-call
        // sequence, not 64 Ki of them.
        let idx = loops::indices(WINDOWS * N, predictable);
        let mut g = c.benchmark_group(format!("retpoline_{group}"));
        g.throughput(criterion::Throughput::Elements(N as u64));
        for (name, f, thunks, site) in VARIANTS {
            set_modes(thunks, site);
            let mut w = 0;
            // The direct loop ignores the table but makes the same loads.
            g.bench_function(name, |b| {
                b.iter(|| {
                    w = (w + 1) % WINDOWS;
                    loops::run(f, &idx[w * N..(w + 1) * N], black_box(1))
                })
            });
        }
        g.finish();
    }
    set_modes(Mode::Generic, Mode::Generic);
}

criterion_group!(benches, bench);

fn main() {
    // Every loop computes the same thing when the target is predictable.
    let idx = loops::indices(N, true);
    let want = loops::run(loops::rp_loop_direct, &idx, 1);
    for (name, f, thunks, site) in VARIANTS {
        set_modes(thunks, site);
        assert_eq!(loops::run(f, &idx, 1), want, "{name}");
    }
    let idx = loops::indices(N, false);
    let want = loops::run(loops::rp_loop_plain, &idx, 1);
    for (name, f, thunks, site) in &VARIANTS[1..] {
        set_modes(*thunks, *site);
        assert_eq!(loops::run(*f, &idx, 1), want, "{name}");
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    for group in ["predictable", "unpredictable"] {
        let id = |name: &str| format!("retpoline_{group}/{name}");
        let (Some(direct), Some(plain)) = (mean_ns(&id("direct")), mean_ns(&id("plain_indirect")))
        else {
            continue;
        };
        println!(
            "\n| {group} target | ns per call | vs direct | vs plain indirect |\n|---|---:|---:|---:|"
        );
        for (name, ..) in VARIANTS {
            if let Some(t) = mean_ns(&id(name)) {
                println!(
                    "| {name} | {:.3} | {:.3}x | {:.3}x |",
                    t / N as f64,
                    t / direct,
                    t / plain
                );
            }
        }
    }
}
