//! Per-call cost of an ifunc, side by side in one run: a direct call (the
//! baseline), an `ifunc!` resolved in place (its call sites rewritten to
//! `call <impl>`), an `ifunc!` whose call sites nothing rewrote (`call
//! <stub>`: the stub made a direct `jmp` when the program was loaded; with
//! `ALTPATCH=startup=off`, the lazy path: stub, `jmp`, load, indirect
//! jump), a GOT/PLT-style call (`call *slot(%rip)`,
//! what a dynamically linked program's ifunc calls cost), and the
//! `multiversion` crate's dispatch.
//!
//! Every variant is a loop of the same shape in assembly
//! (`support/aligned.rs`, checked before timing) whose implementation is
//! the same target, measured with the target at three placements (an ifunc
//! per placement: an ifunc resolves once); instructions per call are
//! counted with callgrind when valgrind is installed.

use altpatch::cpu::Features;
use altpatch::{Image, LinuxPoke};
use criterion::{Criterion, criterion_group};
use std::sync::atomic::{AtomicBool, Ordering};

#[path = "support/estimates.rs"]
mod estimates;
#[macro_use]
#[path = "support/aligned.rs"]
mod aligned;
#[path = "support/shape.rs"]
mod shape;
use aligned::{Loop, N, Placement, Target, direct, target};

/// An ifunc resolved in place and one left lazy, both resolving to the
/// target at `$off`.
macro_rules! ifuncs_at {
    ($pick:ident, $resolved:ident, $lazy:ident, $off:literal) => {
        fn $pick(_: &Features) -> Target {
            target($off)
        }
        altpatch::ifunc! {
            fn $resolved(x: u64) -> u64 = $pick;
        }
        altpatch::ifunc! {
            fn $lazy(x: u64) -> u64 = $pick;
        }
    };
}
ifuncs_at!(pick_0, resolved_0, lazy_0, 0);
ifuncs_at!(pick_16, resolved_16, lazy_16, 16);
ifuncs_at!(pick_32, resolved_32, lazy_32, 32);

/// The GOT slot of a `-fno-plt`-style call.
static mut GOT_SLOT: usize = 0;

core::arch::global_asm!(
    call_loop!("ifunc_resolved_0", "call {r0}"),
    call_loop!("ifunc_resolved_16", "call {r16}"),
    call_loop!("ifunc_resolved_32", "call {r32}"),
    call_loop!("ifunc_lazy_0", "call {l0}"),
    call_loop!("ifunc_lazy_16", "call {l16}"),
    call_loop!("ifunc_lazy_32", "call {l32}"),
    call_loop!("ifunc_got", "call *{slot}(%rip)"),
    call_loop!("ifunc_multiversion", "call {mv}"),
    r0 = sym <resolved_0 as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    r16 = sym <resolved_16 as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    r32 = sym <resolved_32 as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    l0 = sym <lazy_0 as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    l16 = sym <lazy_16 as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    l32 = sym <lazy_32 as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    slot = sym GOT_SLOT,
    mv = sym aligned::multiversion_step,
    options(att_syntax)
);

unsafe extern "C" {
    fn ifunc_resolved_0(x: u64, n: u64) -> u64;
    fn ifunc_resolved_16(x: u64, n: u64) -> u64;
    fn ifunc_resolved_32(x: u64, n: u64) -> u64;
    fn ifunc_lazy_0(x: u64, n: u64) -> u64;
    fn ifunc_lazy_16(x: u64, n: u64) -> u64;
    fn ifunc_lazy_32(x: u64, n: u64) -> u64;
    fn ifunc_got(x: u64, n: u64) -> u64;
    fn ifunc_multiversion(x: u64, n: u64) -> u64;
}

/// Resolves (and, for `resolved_*`, applies in place) the variant `name`
/// at placement `off`; returns its loop.
fn prepare(name: &str, off: usize) -> Loop {
    let (resolved, lazy, lp, ll): (
        &'static altpatch::ifunc::Ifunc,
        &altpatch::ifunc::Ifunc,
        Loop,
        Loop,
    ) = match off {
        0 => (
            resolved_0::ifunc(),
            lazy_0::ifunc(),
            ifunc_resolved_0,
            ifunc_lazy_0,
        ),
        16 => (
            resolved_16::ifunc(),
            lazy_16::ifunc(),
            ifunc_resolved_16,
            ifunc_lazy_16,
        ),
        _ => (
            resolved_32::ifunc(),
            lazy_32::ifunc(),
            ifunc_resolved_32,
            ifunc_lazy_32,
        ),
    };
    match name {
        "direct" => direct(off),
        "ifunc_resolved" => {
            // Its stub may already be direct (patched at load); its call
            // sites are rewritten here, once per placement.
            static REWRITTEN: [AtomicBool; 3] = [const { AtomicBool::new(false) }; 3];
            if !REWRITTEN[off / 16].swap(true, Ordering::Relaxed) {
                let image = Image::current();
                let sites = altpatch::elf::current_sites().expect("link with --emit-relocs");
                let mine = altpatch::ifunc::sites_of(sites, resolved);
                assert!(!mine.is_empty(), "no call site of the resolved ifunc");
                let mut poke = LinuxPoke::new().expect("poke");
                // SAFETY: in place; nothing runs the ifunc during set-up.
                // Only this ifunc: the lazy ones must stay lazy.
                let r =
                    unsafe { resolved.apply_with(&Features::detect(), &image, sites, &mut poke) }
                        .expect("apply");
                assert_eq!(r.update.inlined, mine.len());
            }
            lp
        }
        "ifunc_lazy" => {
            // Patched at load (its stub a direct `jmp`) unless start-up is
            // off: then the lazy path.
            let at_load = matches!(
                altpatch::ifunc::startup(),
                altpatch::ifunc::Startup::Applied { .. }
            );
            assert_eq!(lazy.is_applied(), at_load);
            ll
        }
        "got_plt_indirect" => {
            // SAFETY: a plain store while no loop runs.
            unsafe { GOT_SLOT = target(off) as usize };
            ifunc_got
        }
        "multiversion" => ifunc_multiversion,
        other => panic!("unknown variant {other}"),
    }
}

const VARIANTS: [(&str, Placement); 5] = [
    ("direct", Placement::Aligned),
    ("ifunc_resolved", Placement::Aligned),
    ("ifunc_lazy", Placement::Aligned),
    ("got_plt_indirect", Placement::Aligned),
    ("multiversion", Placement::Uncontrolled),
];

/// Checks results and loop shapes at every placement: applied, the
/// ifunc's call site *is* the direct loop's call.
fn check() -> String {
    let mut line = shape::check_call_variants(&VARIANTS.map(|(n, _)| n), 1, prepare);
    assert_eq!(lazy_0::ifunc().resolver_runs(), 1);
    line = format!("{line}\nifunc_lazy: {:?}", altpatch::ifunc::startup());
    // The lazy path starts at the stub: `endbr64; jmp <lazy>`.
    for stub in [lazy_0::ifunc(), lazy_16::ifunc(), lazy_32::ifunc()].map(|i| i.stub()) {
        line = format!(
            "{line}\n{}",
            shape::check_trampoline("ifunc_lazy stub", stub, None)
        );
    }
    line
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ifunc");
    g.throughput(criterion::Throughput::Elements(N));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(2));
    for (name, placement) in &VARIANTS {
        for &off in placement.offsets() {
            let f = prepare(name, off);
            g.bench_function(placement.id(name, off), |b| b.iter(|| aligned::run(f)));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    if let Some(v) = aligned::count_request() {
        let f = prepare(&v, 0);
        // Once, after patching (valgrind translates code when first run);
        // this also resolves the lazy ifunc.
        aligned::run(f);
        // SAFETY: as in `aligned::run`.
        println!("{v}: {}", aligned::counted(&|x| unsafe { f(x, N) }));
        return;
    }
    println!("{}", check());
    benches();
    Criterion::default().configure_from_args().final_summary();
    let rows = aligned::rows(&VARIANTS, |name, off| {
        let (b, f) = (direct(off), prepare(name, off));
        aligned::paired_ratio(&|| aligned::run(b), &|| aligned::run(f))
    });
    aligned::print_table("ifunc", "direct", &rows);
}
