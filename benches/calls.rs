//! Per-call cost, side by side in one run: a direct call (the baseline), an
//! inline static call, a static call through its trampoline, a function
//! pointer in an `AtomicPtr`, the `multiversion` crate's dispatch; and a
//! static branch, an `AtomicBool` check and the `static-keys` crate's
//! branch.
//!
//! Every call variant is a loop of the same shape in assembly
//! (`support/aligned.rs`: head and call at fixed places in a 64-byte block,
//! checked before timing) ending in the same target, measured with the
//! target at three placements; instructions per call are counted with
//! callgrind when valgrind is installed.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use altpatch::static_key::StaticFalseKey;
use altpatch::{Image, LinuxPoke, static_branch_unlikely, static_call};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
#[macro_use]
#[path = "support/aligned.rs"]
mod aligned;
#[path = "support/shape.rs"]
mod shape;
use aligned::{Loop, N, Placement, direct, target};
use shape::Shape;

extern "C" fn unused_default(x: u64) -> u64 {
    x ^ 0x5a
}

static_call! {
    fn sc_inline(x: u64) -> u64 = unused_default;
}
static_call! {
    fn sc_tramp(x: u64) -> u64 = unused_default;
}

/// The pointer the `fn_pointer` loop calls through (`call *PTR(%rip)`,
/// what a load of an `AtomicPtr` and an indirect call compile to).
static PTR: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

core::arch::global_asm!(
    call_loop!("calls_static_call_inline", "call {inline}"),
    call_loop!("calls_static_call_trampoline", "call {tramp}"),
    call_loop!("calls_fn_pointer", "call *{ptr}(%rip)"),
    call_loop!("calls_multiversion", "call {mv}"),
    inline = sym <sc_inline as altpatch::static_call::__TrampolineStub>::__altpatch_sc_tramp,
    tramp = sym <sc_tramp as altpatch::static_call::__TrampolineStub>::__altpatch_sc_tramp,
    ptr = sym PTR,
    mv = sym aligned::multiversion_step,
    options(att_syntax)
);

unsafe extern "C" {
    fn calls_static_call_inline(x: u64, n: u64) -> u64;
    fn calls_static_call_trampoline(x: u64, n: u64) -> u64;
    fn calls_fn_pointer(x: u64, n: u64) -> u64;
    fn calls_multiversion(x: u64, n: u64) -> u64;
}

/// Points the variant `name` at the target `off` bytes into its block and
/// returns its loop.
fn prepare(name: &str, off: usize) -> Loop {
    let t = target(off);
    match name {
        "direct" => direct(off),
        "static_call_inline" => {
            // The trampoline and every call site now call the target.
            let r = sc_inline::update(t).expect("inline update");
            assert!(r.inlined >= 1, "no inline site: link with --emit-relocs");
            calls_static_call_inline
        }
        "static_call_trampoline" => {
            let image = Image::current();
            let mut poke = LinuxPoke::new().expect("poke");
            // SAFETY: nothing runs sc_tramp during set-up; no site is
            // passed, so only the trampoline changes.
            unsafe { sc_tramp::update_with(t, &image, &[], &mut poke) }.expect("trampoline");
            calls_static_call_trampoline
        }
        "fn_pointer" => {
            PTR.store(t as *mut (), Ordering::Release);
            calls_fn_pointer
        }
        "multiversion" => calls_multiversion,
        other => panic!("unknown variant {other}"),
    }
}

/// The call variants, and whether the target's placement is ours.
const CALLS: [(&str, Placement); 5] = [
    ("direct", Placement::Aligned),
    ("static_call_inline", Placement::Aligned),
    ("static_call_trampoline", Placement::Aligned),
    ("fn_pointer", Placement::Aligned),
    // The crate's own clone and dispatcher, placed by the compiler.
    ("multiversion", Placement::Uncontrolled),
];

/// Checks results and loop shapes at every placement: after patching,
/// the inline site *is* the direct loop's call; and the trampoline the
/// trampoline variant calls is `endbr64; jmp <target>` in one block.
fn check() -> String {
    let line = shape::check_call_variants(&CALLS.map(|(n, _)| n), 1, prepare);
    let mut tramp_line = String::new();
    for off in aligned::OFFSETS {
        prepare("static_call_trampoline", off);
        let tramp = sc_tramp::static_call().trampoline();
        tramp_line =
            shape::check_trampoline("static_call_trampoline", tramp, Some(target(off) as usize));
    }
    format!("{line}\n{tramp_line} (jmp to each placement's target)")
}

static KEY: StaticFalseKey = StaticFalseKey::new();
static FLAG: AtomicBool = AtomicBool::new(false);
static_keys::define_static_key_false!(SK);

#[inline(never)]
fn slow(x: u64) -> u64 {
    black_box(x ^ 0x55)
}

/// NOPs up to the next 64-byte block: what follows (the loop set-up, then
/// the loop) starts at the same place in every branch loop.
#[inline(always)]
fn block_start() {
    // SAFETY: only padding; no register, memory or flag changes.
    unsafe { core::arch::asm!(".p2align 6", options(nomem, nostack, preserves_flags)) };
}

#[inline(never)]
fn loop_static_branch(mut x: u64) -> u64 {
    block_start();
    for _ in 0..N {
        if static_branch_unlikely!(KEY) {
            x = slow(x);
        }
        x = aligned::reference(x);
    }
    x
}

#[inline(never)]
fn loop_atomic_bool(mut x: u64) -> u64 {
    block_start();
    for _ in 0..N {
        if FLAG.load(Ordering::Relaxed) {
            x = slow(x);
        }
        x = aligned::reference(x);
    }
    x
}

#[inline(never)]
fn loop_static_keys_crate(mut x: u64) -> u64 {
    block_start();
    for _ in 0..N {
        if static_keys::static_branch_unlikely!(SK) {
            x = slow(x);
        }
        x = aligned::reference(x);
    }
    x
}

/// The branch variants (compiled Rust loops: their placement is the
/// compiler's).
/// A compiled loop of `N` checks.
type BranchLoop = fn(u64) -> u64;

const BRANCHES: [(&str, BranchLoop); 3] = [
    ("static_branch", loop_static_branch),
    ("atomic_bool", loop_atomic_bool),
    ("static_keys_crate", loop_static_keys_crate),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("calls");
    g.throughput(criterion::Throughput::Elements(N));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(2));
    for (name, placement) in &CALLS {
        for &off in placement.offsets() {
            let f = prepare(name, off);
            g.bench_function(placement.id(name, off), |b| b.iter(|| aligned::run(f)));
        }
    }
    g.finish();
    let mut g = c.benchmark_group("branches");
    g.throughput(criterion::Throughput::Elements(N));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(2));
    for (name, f) in BRANCHES {
        g.bench_function(Placement::Uncontrolled.id(name, 0), |b| {
            b.iter(|| f(black_box(1)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);

/// The counting child: one variant, `REPS` loops, nothing else.
fn count(variant: &str) {
    let x = if let Some((_, f)) = BRANCHES.iter().find(|(n, _)| *n == variant) {
        aligned::counted(&|x| f(x))
    } else {
        let f = prepare(variant, 0);
        // Once, after patching (valgrind translates code when first run).
        aligned::run(f);
        // SAFETY: as in `aligned::run`.
        aligned::counted(&|x| unsafe { f(x, N) })
    };
    println!("{variant}: {x}");
}

fn main() {
    static_keys::global_init();
    // A flag no code stores is a constant to the compiler: its check would
    // be folded away (then nothing is measured).
    FLAG.store(black_box(false), Ordering::Relaxed);
    if let Some(v) = aligned::count_request() {
        count(&v);
        return;
    }
    println!("{}", check());
    for (_, f) in BRANCHES {
        assert_eq!(f(1), aligned::expected());
    }
    let shape = |(name, f): (&str, BranchLoop)| Shape::of(name, f as usize);
    let [sb, ab, sk] = BRANCHES.map(shape);
    // The two static branches compile to the same loop, at the same place
    // in its block as the flag's.
    sb.assert_same_loop(&sk);
    assert_eq!(sb.head() % 64, ab.head() % 64, "branch loop heads");
    println!(
        "branch loops checked: heads at +{} of a 64-byte block",
        sb.head() % 64
    );
    benches();
    Criterion::default().configure_from_args().final_summary();
    let rows = aligned::rows(&CALLS, |name, off| {
        let (b, f) = (direct(off), prepare(name, off));
        aligned::paired_ratio(&|| aligned::run(b), &|| aligned::run(f))
    });
    aligned::print_table("calls", "direct", &rows);
    let base = BRANCHES[1].1;
    let branches = BRANCHES.map(|(n, _)| (n, Placement::Uncontrolled));
    let rows = aligned::rows(&branches, |name, _| {
        let f = BRANCHES.iter().find(|(n, _)| *n == name).unwrap().1;
        aligned::paired_ratio(&|| base(black_box(1)), &|| f(black_box(1)))
    });
    aligned::print_table("branches", "atomic_bool", &rows);
}
