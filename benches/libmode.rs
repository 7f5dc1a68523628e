//! Library mode (issue 26): what an application's callers pay for a
//! library's `ifunc!` when the application cooperates in nothing — no
//! `init()`, no `--emit-relocs` — against the ways libraries dispatch
//! today, side by side in one run:
//!
//! * `direct`: a direct call of the implementation (the baseline);
//! * `ifunc_same_crate`: a call nothing recorded (more than six
//!   registers' worth, more than four floats, C code): `call <stub>`, the stub made a direct `jmp` when the object
//!   was loaded;
//! * `ifunc_other_crate`: what rustc emits for such a call in another
//!   crate: the stub's address loaded once, before the loop (the linker
//!   relaxes the GOT load into a `lea`), then `call *%reg`;
//! * `atomic_ptr`: `memchr`'s method, an `AtomicPtr` loaded and called
//!   every time (`mov slot(%rip), %rcx; call *%rcx`);
//! * `multiversion`: the `multiversion` crate's dispatch;
//! * `ifunc_init_relocs`: today's best with cooperation, `init()` with
//!   `--emit-relocs`: the call site rewritten to `call <impl>`;
//! * `ifunc_recorded`: the call `ifunc!`'s function makes in any crate
//!   where the C ABI passes its arguments in integer registers: `call
//!   <stub>` with its record, rewritten to `call <impl>` at load.
//!
//! Every variant is a loop of the same shape in assembly
//! (`support/aligned.rs`, checked before timing) calling the same target;
//! paired ratios against `direct`, instructions per call from callgrind.

use altpatch::cpu::Features;
use altpatch::{Image, LinuxPoke};
use criterion::{Criterion, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
#[macro_use]
#[path = "support/aligned.rs"]
mod aligned;
use aligned::{Loop, N, Placement, Target, direct, target};

fn pick(_: &Features) -> Target {
    target(0)
}

altpatch::ifunc! {
    /// The library's function: made direct at load.
    fn lib_fn(x: u64) -> u64 = pick;
}

altpatch::ifunc! {
    /// The same with its call sites rewritten by `apply_with` (relocations).
    fn lib_fn_relocs(x: u64) -> u64 = pick;
}

altpatch::ifunc! {
    /// The same called from a recorded call, rewritten at load.
    fn lib_fn_recorded(x: u64) -> u64 = pick;
}

/// The `AtomicPtr` of `memchr`'s method, set before the loops run.
static mut ATOMIC_PTR: usize = 0;

core::arch::global_asm!(
    call_loop!("lib_same_crate", "call {stub}"),
    call_loop!("lib_atomic_ptr", "mov {slot}(%rip), %rcx\ncall *%rcx"),
    call_loop!("lib_init_relocs", "call {relocs}"),
    call_loop!("lib_multiversion", "call {mv}"),
    // What `ifunc!`'s function assembles in the caller (`ifunc/call.rs`).
    call_loop!(
        "lib_recorded",
        concat!(
            "2: call {recorded}\n.pushsection ",
            altpatch::__altpatch_section!(call),
            ",\"aR\",@progbits\n.balign 4\n.long 2b - .\n.long {recorded} - .\n.popsection"
        )
    ),
    // The other crate's shape: the stub's address in a callee-saved
    // register, loaded once before the loop.
    ".pushsection .text.bench_loops,\"ax\",@progbits",
    ".balign 64",
    asm_fn_label!("lib_other_crate"),
    "push %rbx",
    "push %r13",
    "sub $8, %rsp",
    "mov %rsi, %rbx",
    "mov %rdi, %rax",
    "lea {stub}(%rip), %r13",
    ".balign 64",
    "1:",
    "mov %rax, %rdi",
    "call *%r13",
    "dec %rbx",
    "jnz 1b",
    "add $8, %rsp",
    "pop %r13",
    "pop %rbx",
    "ret",
    ".size lib_other_crate, . - lib_other_crate",
    ".popsection",
    stub = sym <lib_fn as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    relocs = sym <lib_fn_relocs as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    recorded = sym <lib_fn_recorded as altpatch::ifunc::__IfuncStub>::__altpatch_ifunc_stub,
    slot = sym ATOMIC_PTR,
    mv = sym aligned::multiversion_step,
    options(att_syntax)
);

unsafe extern "C" {
    fn lib_same_crate(x: u64, n: u64) -> u64;
    fn lib_other_crate(x: u64, n: u64) -> u64;
    fn lib_atomic_ptr(x: u64, n: u64) -> u64;
    fn lib_init_relocs(x: u64, n: u64) -> u64;
    fn lib_multiversion(x: u64, n: u64) -> u64;
    fn lib_recorded(x: u64, n: u64) -> u64;
}

const VARIANTS: [(&str, Placement); 7] = [
    ("direct", Placement::Uncontrolled),
    ("ifunc_same_crate", Placement::Uncontrolled),
    ("ifunc_other_crate", Placement::Uncontrolled),
    ("atomic_ptr", Placement::Uncontrolled),
    ("multiversion", Placement::Uncontrolled),
    ("ifunc_init_relocs", Placement::Uncontrolled),
    ("ifunc_recorded", Placement::Uncontrolled),
];

fn prepare(name: &str, _off: usize) -> Loop {
    match name {
        "direct" => direct(0),
        "ifunc_same_crate" => lib_same_crate,
        "ifunc_other_crate" => lib_other_crate,
        "atomic_ptr" => {
            // SAFETY: a plain store while no loop runs.
            unsafe { ATOMIC_PTR = target(0) as usize };
            lib_atomic_ptr
        }
        "multiversion" => lib_multiversion,
        "ifunc_recorded" => lib_recorded,
        "ifunc_init_relocs" => {
            let ifunc = lib_fn_relocs::ifunc();
            let image = Image::current();
            let sites = altpatch::elf::current_sites().expect("link with --emit-relocs");
            let mine = altpatch::ifunc::sites_of(sites, ifunc);
            if !mine.is_empty() && !mine_direct(&mine) {
                let mut poke = LinuxPoke::new().expect("poke");
                // SAFETY: in place; nothing runs the loops during set-up.
                unsafe { ifunc.apply_with(&Features::detect(), &image, sites, &mut poke) }
                    .expect("apply");
            }
            lib_init_relocs
        }
        other => panic!("unknown variant {other}"),
    }
}

/// Whether every site in `sites` already calls the target directly.
fn mine_direct(sites: &[altpatch::sites::Site]) -> bool {
    let to = target(0) as usize;
    sites.iter().all(|s| call_target(s.addr) == Some(to))
}

/// The target of the `call rel32` at `at`, if it is one.
fn call_target(at: usize) -> Option<usize> {
    // SAFETY: a call site of this program's text: 5 readable bytes.
    let b = unsafe { std::slice::from_raw_parts(at as *const u8, 5) };
    let rel = i32::from_le_bytes(b[1..5].try_into().unwrap());
    (b[0] == 0xe8).then(|| (at + 5).wrapping_add(rel as isize as usize))
}

/// The target of the `jmp` after the stub's `endbr64`.
fn stub_jmp(stub: usize) -> usize {
    // SAFETY: a stub of this program: 16 bytes of text.
    let b = unsafe { std::slice::from_raw_parts(stub as *const u8, 9) };
    assert_eq!(b[..5], [0xf3, 0x0f, 0x1e, 0xfa, 0xe9], "endbr64; jmp rel32");
    let rel = i32::from_le_bytes(b[5..9].try_into().unwrap());
    (stub + 9).wrapping_add(rel as isize as usize)
}

/// Results of every variant, and what the library mode promises before
/// timing: the stub made a direct `jmp` to the target at load (no call
/// from here), the relocation-rewritten site a direct call.
fn check() -> String {
    let startup = altpatch::ifunc::startup();
    for (name, _) in VARIANTS {
        assert_eq!(
            aligned::run(prepare(name, 0)),
            aligned::expected(),
            "{name}"
        );
    }
    let stub = lib_fn::ifunc().stub();
    let direct_stub = stub_jmp(stub) == target(0) as usize;
    assert!(
        direct_stub || !matches!(startup, altpatch::ifunc::Startup::Applied { .. }),
        "patched at load, yet the stub does not jump to the target"
    );
    let sites = altpatch::elf::current_sites().expect("relocations");
    let mine = altpatch::ifunc::sites_of(sites, lib_fn_relocs::ifunc());
    assert!(
        mine_direct(&mine),
        "the relocated site is not a direct call"
    );
    let recorded = lib_fn_recorded::ifunc().recorded_calls();
    let recorded_direct = recorded
        .iter()
        .all(|&s| call_target(s) == Some(target(0) as usize));
    assert!(
        recorded_direct || !matches!(startup, altpatch::ifunc::Startup::Applied { .. }),
        "patched at load, yet a recorded call does not call the target"
    );
    format!(
        "startup: {startup:?}; the stub jumps straight to the target: {direct_stub}; {} \
         relocated site(s) direct; {} recorded call(s), direct: {recorded_direct}",
        mine.len(),
        recorded.len()
    )
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("libmode");
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
        aligned::run(f);
        // SAFETY: as in `aligned::run`.
        println!("{v}: {}", aligned::counted(&|x| unsafe { f(x, N) }));
        return;
    }
    println!("{}", check());
    benches();
    Criterion::default().configure_from_args().final_summary();
    let rows = aligned::rows(&VARIANTS, |name, off| {
        let (b, f) = (direct(0), prepare(name, off));
        aligned::paired_ratio(&|| aligned::run(b), &|| aligned::run(f))
    });
    aligned::print_table("libmode", "direct", &rows);
}
