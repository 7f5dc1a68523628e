//! Per-call cost of an ifunc, side by side in one run: a direct call (the
//! baseline), an `ifunc!` resolved in place (its call sites rewritten to
//! `call <impl>`), an `ifunc!` before resolution (the lazy path: stub,
//! `jmp`, load, indirect jump), a GOT/PLT-style call (`call *slot(%rip)`,
//! what a dynamically linked program's ifunc calls cost), and the
//! `multiversion` crate's dispatch. Each variant is a loop of 1000 calls in
//! its own function.

use std::hint::black_box;

use altpatch::cpu::{Feature, Features};
use altpatch::{Image, LinuxPoke};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
use estimates::mean_ns;
#[path = "support/steps.rs"]
mod steps;
use steps::{N, loop_direct, loop_multiversion, step, step_other};

fn pick(f: &Features) -> extern "C" fn(u64) -> u64 {
    // Both candidates compute the same; the choice only has to be made.
    if f.has(Feature::Sse4_2) {
        step
    } else {
        step_other
    }
}

altpatch::ifunc! {
    fn resolved_step(x: u64) -> u64 = pick;
}

altpatch::ifunc! {
    fn lazy_step(x: u64) -> u64 = pick;
}

/// The GOT slot of a `-fno-plt`-style call.
#[unsafe(no_mangle)]
static mut BENCH_GOT_SLOT: usize = 0;

#[inline(never)]
fn loop_resolved(mut x: u64) -> u64 {
    for _ in 0..N {
        x = resolved_step(x);
    }
    x
}

#[inline(never)]
fn loop_lazy(mut x: u64) -> u64 {
    for _ in 0..N {
        x = lazy_step(x);
    }
    x
}

#[inline(never)]
fn loop_got(mut x: u64) -> u64 {
    for _ in 0..N {
        // SAFETY: the slot holds `step` (set in `setup`); the call follows
        // the C ABI with its clobbers declared.
        unsafe {
            core::arch::asm!(
                "call qword ptr [rip + BENCH_GOT_SLOT]",
                inout("rdi") x => _,
                out("rax") x,
                clobber_abi("C"),
            )
        };
    }
    x
}

fn setup() {
    let image = Image::current();
    let sites = altpatch::elf::current_sites().expect("benches link with --emit-relocs");
    let mine = altpatch::ifunc::sites_of(sites, &resolved_step::KEY);
    assert!(!mine.is_empty(), "no call site of resolved_step");
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: in place; nothing runs the ifunc during set-up. Only this
    // ifunc: `lazy_step` must stay on its lazy path.
    let r = unsafe { resolved_step::KEY.apply_with(&Features::detect(), &image, sites, &mut poke) }
        .unwrap();
    assert_eq!(r.update.inlined, mine.len());
    // SAFETY: a plain store before any reader.
    unsafe { BENCH_GOT_SLOT = step as *const () as usize };
    let want = loop_direct(1);
    assert_eq!(loop_resolved(1), want);
    assert_eq!(loop_lazy(1), want);
    assert!(!lazy_step::KEY.is_applied() && lazy_step::KEY.resolver_runs() == 1);
    assert_eq!(loop_got(1), want);
    assert_eq!(loop_multiversion(1), want);
}

/// A loop of `N` calls.
type Loop = fn(u64) -> u64;

const VARIANTS: [(&str, Loop); 5] = [
    ("direct", loop_direct),
    ("ifunc_resolved", loop_resolved),
    ("ifunc_lazy", loop_lazy),
    ("got_plt_indirect", loop_got),
    ("multiversion", loop_multiversion),
];

fn bench(c: &mut Criterion) {
    setup();
    let mut g = c.benchmark_group("ifunc");
    g.throughput(criterion::Throughput::Elements(N));
    for (name, f) in VARIANTS {
        g.bench_function(name, |b| b.iter(|| f(black_box(1))));
    }
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let Some(base) = mean_ns("ifunc/direct") else {
        return;
    };
    println!("\n| ifunc | ns per call | vs direct |\n|---|---:|---:|");
    for (name, _) in VARIANTS {
        if let Some(t) = mean_ns(&format!("ifunc/{name}")) {
            println!("| {name} | {:.3} | {:.3}x |", t / N as f64, t / base);
        }
    }
}
