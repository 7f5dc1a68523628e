//! A hot loop of big-endian loads, four ways, in one run:
//!
//! * `patched`: the whole loop is one `alternative!` site (mov+bswap,
//!   `movbe` where the CPU has it), patched at start-up;
//! * `direct`: the same loop with `movbe` (or mov+bswap without it)
//!   assembled directly;
//! * `runtime_check`: `is_x86_feature_detected!("movbe")` tested at every
//!   load, branching to either sequence (compiled Rust);
//! * `fn_pointer`: a function chosen once at start-up, called through a
//!   pointer per load (compiled Rust).
//!
//! `patched` and `direct` are measured with their loop head at three
//! placements in a 64-byte block (+0, +16, +32), and after patching they
//! are checked to be the same instructions. Ratios are paired against
//! `direct` at the same placement; instructions per load are counted with
//! callgrind when valgrind is installed.

use std::hint::black_box;
use std::sync::OnceLock;

use altpatch::cpu::{Feature, Features};
use altpatch::{Image, LinuxPoke, alternative};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
#[macro_use]
#[path = "support/aligned.rs"]
mod aligned;
#[path = "support/shape.rs"]
mod shape;
use aligned::{N, OFFSETS, Placement};
use shape::Shape;

/// A loop over `xs`, summing their big-endian values.
type Sum = fn(&[u32]) -> u32;

/// NOPs to `OFF` bytes into the next 64-byte block, and a zeroed `%eax`
/// (the sum): the loop that follows starts there, as the compiler has
/// nothing left to put between the padding and the loop.
#[inline(always)]
fn zero_at_block<const OFF: usize>() -> u32 {
    let s: u32;
    // SAFETY: only zeroes %eax and pads with NOPs.
    unsafe {
        core::arch::asm!(
            "xor eax, eax", ".p2align 6", ".skip {off}, 0x90",
            off = const OFF, out("eax") s, options(nomem, nostack)
        )
    };
    s
}

/// `$patched` (the loop as an `alternative!` site) and `$direct` (the
/// `movbe` loop), their heads `$off` bytes into a 64-byte block.
macro_rules! loops_at {
    ($patched:ident, $direct:ident, $off:literal) => {
        #[inline(never)]
        fn $patched(xs: &[u32]) -> u32 {
            assert!(!xs.is_empty());
            let s0 = zero_at_block::<$off>();
            let s: u32;
            // SAFETY: the loop reads `xs.len()` (≥ 1) u32s from `xs` and clobbers only
            // the declared registers and flags; both sequences compute the
            // same sum.
            unsafe {
                alternative!(
                    "2: mov ecx, [rdi]\nbswap ecx\nadd eax, ecx\nadd rdi, 4\ndec rsi\njnz 2b",
                    [Movbe => "2: movbe ecx, [rdi]\nadd eax, ecx\nadd rdi, 4\ndec rsi\njnz 2b"],
                    inout("rdi") xs.as_ptr() => _, inout("rsi") xs.len() => _,
                    inout("eax") s0 => s, out("ecx") _, options(nostack, readonly)
                )
            };
            s
        }

        #[inline(never)]
        fn $direct(xs: &[u32]) -> u32 {
            assert!(!xs.is_empty());
            let s0 = zero_at_block::<$off>();
            let s: u32;
            // SAFETY: as for the patched loop; only run where the CPU has
            // movbe.
            unsafe {
                core::arch::asm!(
                    "2: movbe ecx, [rdi]\nadd eax, ecx\nadd rdi, 4\ndec rsi\njnz 2b",
                    inout("rdi") xs.as_ptr() => _, inout("rsi") xs.len() => _,
                    inout("eax") s0 => s, out("ecx") _, options(nostack, readonly)
                )
            };
            s
        }
    };
}
loops_at!(patched_0, direct_0, 0);
loops_at!(patched_16, direct_16, 16);
loops_at!(patched_32, direct_32, 32);

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

fn reference(xs: &[u32]) -> u32 {
    xs.iter().fold(0u32, |s, x| s.wrapping_add(x.swap_bytes()))
}

/// The variant `name` at placement `off`.
fn variant(name: &str, off: usize) -> Sum {
    match (name, off) {
        ("direct", 0) => direct_0,
        ("direct", 16) => direct_16,
        ("direct", _) => direct_32,
        ("patched", 0) => patched_0,
        ("patched", 16) => patched_16,
        ("patched", _) => patched_32,
        ("runtime_check", _) => sum_runtime_check,
        ("fn_pointer", _) => sum_fn_pointer,
        (other, _) => panic!("unknown variant {other}"),
    }
}

const VARIANTS: [(&str, Placement); 4] = [
    ("direct", Placement::Aligned),
    ("patched", Placement::Aligned),
    ("runtime_check", Placement::Uncontrolled),
    ("fn_pointer", Placement::Uncontrolled),
];

/// Patches every alternative of this program; `None` (nothing to compare
/// against: the direct loop needs movbe) without movbe.
fn setup() -> Option<()> {
    let features = Features::detect();
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: nothing runs the bench's alternative sites during start-up.
    unsafe { altpatch::alternative::apply(&Image::current(), &features, &mut poke) }
        .expect("apply alternatives");
    let movbe = features.has(Feature::Movbe);
    CHOSEN.get_or_init(|| if movbe { one_movbe } else { one_bswap });
    movbe.then_some(())
}

fn data() -> Vec<u32> {
    (0..N as u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect()
}

/// Results, placement and, after patching, identity with the direct loop.
fn check(xs: &[u32]) -> String {
    let want = reference(xs);
    for (name, placement) in &VARIANTS {
        for &off in placement.offsets() {
            assert_eq!(variant(name, off)(xs), want, "{name} at +{off}");
        }
    }
    for off in OFFSETS {
        let direct = Shape::of("direct", variant("direct", off) as usize);
        let patched = Shape::of("patched", variant("patched", off) as usize);
        assert_eq!(direct.head() % 64, off, "direct loop head at +{off}");
        direct.assert_same_loop(&patched);
    }
    "loop shape checked: patched = direct (movbe) at +0, +16, +32 of a 64-byte block".into()
}

fn bench(c: &mut Criterion) {
    let xs = data();
    let mut g = c.benchmark_group("alternatives");
    g.throughput(criterion::Throughput::Elements(N));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(2));
    for (name, placement) in &VARIANTS {
        for &off in placement.offsets() {
            let f = variant(name, off);
            g.bench_function(placement.id(name, off), |b| b.iter(|| f(black_box(&xs))));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    if setup().is_none() {
        println!("this CPU has no movbe: nothing to compare the patched loop with");
        return;
    }
    let xs = data();
    if let Some(v) = aligned::count_request() {
        let f = variant(&v, 0);
        black_box(f(&xs));
        println!(
            "{v}: {}",
            aligned::counted(&|x| f(black_box(&xs)) as u64 ^ x)
        );
        return;
    }
    println!("{}", check(&xs));
    benches();
    Criterion::default().configure_from_args().final_summary();
    let rows = aligned::rows(&VARIANTS, |name, off| {
        let (b, f) = (variant("direct", off), variant(name, off));
        aligned::paired_ratio(&|| b(black_box(&xs)) as u64, &|| f(black_box(&xs)) as u64)
    });
    aligned::print_table("alternatives", "direct", &rows);
}
