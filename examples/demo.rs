//! What altpatch sees and does on this machine.
//!
//! ```text
//! cargo run --release --example demo              # features and a patch report
//! cargo run --release --example demo -- --dump-cpuid   # this CPU in the replay format
//! ALTPATCH=nomovbe,noavx2 cargo run --release --example demo
//! ALTPATCH_DEBUG=1 cargo run --release --example demo  # also print applied plans
//! ```

use std::process::ExitCode;
use std::time::Instant;

use altpatch::cpu::{self, Features, HostCpuid, Overrides};
use altpatch::retpoline::{self, Mode, Policy};
use altpatch::static_key::StaticFalseKey;
use altpatch::{
    Edit, Image, LinuxPoke, Plan, alternative, alternative_call, patch_point,
    static_branch_unlikely, static_call,
};

// Loops of indirect calls through `__x86_indirect_thunk_r11`, as
// retpoline-built code makes (shared with benches/retpoline.rs).
#[path = "demo/loaded.rs"]
mod loaded;
#[path = "../benches/support/retpoline_loops.rs"]
mod retpoline_loops;
#[path = "demo/trampolines.rs"]
mod trampolines;

/// Returns 1 until the demo rewrites the immediate of its `mov`.
#[inline(never)]
fn answer() -> u32 {
    let r: u32;
    // SAFETY: only moves an immediate into `r`.
    unsafe { core::arch::asm!(patch_point!("demo_answer"), "mov {0:e}, 1", out(reg) r) };
    r
}

/// Big-endian load: `mov` + `bswap`, or `movbe` where the CPU has it.
#[inline(never)]
fn load_be(p: &u32) -> u32 {
    let v: u32;
    // SAFETY: reads the u32 behind a valid reference.
    unsafe {
        alternative!(
            name: "demo::load_be",
            "mov {v:e}, [{p}]\nbswap {v:e}",
            [Movbe => "movbe {v:e}, [{p}]"],
            p = in(reg) p, v = out(reg) v,
            options(nostack, readonly, preserves_flags)
        )
    };
    v
}

/// Which vector extension the CPU offers, chosen by patching.
#[inline(never)]
fn vector_level() -> u32 {
    let r: u32;
    // SAFETY: moves an immediate only.
    unsafe {
        alternative!(
            name: "demo::vector_level",
            "xor {r:e}, {r:e}",
            [Sse4_2 => "mov {r:e}, 42", Avx2 => "mov {r:e}, 2", Avx512f => "mov {r:e}, 512"],
            r = out(reg) r,
            options(nomem, nostack)
        )
    };
    r
}

extern "C" fn popcount_portable(x: u64) -> u64 {
    let (mut x, mut n) = (x, 0);
    while x != 0 {
        x &= x - 1;
        n += 1;
    }
    n
}

extern "C" fn popcount_hw(x: u64) -> u64 {
    let n: u64;
    // SAFETY: only called where the CPU has popcnt (the alternative's
    // condition).
    unsafe {
        core::arch::asm!("popcnt {n}, {x}", x = in(reg) x, n = out(reg) n, options(pure, nomem, nostack))
    };
    n
}

/// A direct call to whichever popcount the CPU supports.
#[inline(never)]
fn popcount(x: u64) -> u64 {
    alternative_call!(name: "demo::popcount", fn(u64) -> u64; popcount_portable, [Popcnt => popcount_hw]; x)
}

extern "C" fn hash_portable(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
}

extern "C" fn hash_fast(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
}

static_call! {
    /// A hash whose implementation is chosen at start-up.
    fn demo_hash(x: u64) -> u64 = hash_portable;
}

static TRACE: StaticFalseKey = StaticFalseKey::new();

#[inline(never)]
extern "C" fn mix_bmi2(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

#[inline(never)]
extern "C" fn mix_portable(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

fn pick_mix(f: &Features) -> extern "C" fn(u64) -> u64 {
    if f.has(cpu::Feature::Bmi2) {
        mix_bmi2
    } else {
        mix_portable
    }
}

altpatch::ifunc! {
    /// A mixing step whose implementation a resolver picks once.
    fn demo_mix(x: u64) -> u64 = pick_mix;
}

/// 10 million calls of `f` (monomorphized: each caller's call is inlined
/// into the loop); the time per call.
fn time_calls(f: impl Fn(u64) -> u64) -> (f64, u64) {
    const N: u64 = 10_000_000;
    let t = Instant::now();
    let mut x = 1u64;
    for _ in 0..N {
        x = f(x);
    }
    // The result is observed before the clock is read, so the loop cannot
    // be moved past it (or dropped).
    let x = std::hint::black_box(x);
    (t.elapsed().as_nanos() as f64 / N as f64, x)
}

/// 10 million calls through the static call; the time per call.
#[inline(never)]
fn time_static_call() -> (f64, u64) {
    const N: u64 = 10_000_000;
    let t = Instant::now();
    let mut x = 1u64;
    for _ in 0..N {
        x = demo_hash(x);
    }
    (t.elapsed().as_nanos() as f64 / N as f64, x)
}

/// 10 million checks of the static key; the time per check.
#[inline(never)]
fn time_static_branch() -> (f64, u64) {
    const N: u64 = 10_000_000;
    let t = Instant::now();
    let mut hits = 0u64;
    for i in 0..N {
        if static_branch_unlikely!(TRACE) {
            hits = hits.wrapping_add(std::hint::black_box(i));
        }
    }
    (t.elapsed().as_nanos() as f64 / N as f64, hits)
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--dump-cpuid") {
        print!("{}", cpu::dump(&HostCpuid::new()));
        return ExitCode::SUCCESS;
    }

    println!("== CPU features");
    let detected = Features::detect();
    println!("detected:  {detected}");
    let overrides = match Overrides::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ALTPATCH: {e}");
            return ExitCode::from(2);
        }
    };
    let features = detected.with_overrides(&overrides);
    if !overrides.is_empty() {
        println!("overrides: {overrides} (from ALTPATCH)");
        println!("effective: {features}");
    }

    println!();
    println!("== Image");
    let image = Image::current();
    println!("{image:?}");

    println!();
    println!("== Writing text (W^X: no mapping is ever writable and executable)");
    writing_text();

    println!();
    println!("== Patching this program's own text");
    if let Err(e) = patch_answer(&image) {
        eprintln!("patching failed: {e}");
        return ExitCode::FAILURE;
    }

    println!();
    println!("== Compiler-generated sites (from this program's relocations)");
    match altpatch::elf::current_sites() {
        Ok(sites) => {
            let t = Instant::now();
            let again = altpatch::elf::current_sites().map(|s| s.len()).unwrap_or(0);
            println!(
                "{} sites (thunk calls, return thunks, static calls, ifuncs): this program \
                 is built without retpolines, so these are its static calls and the \
                 hand-written thunk calls of the retpoline section; a second lookup took {:?} \
                 ({again} sites, memoized)",
                sites.len(),
                t.elapsed()
            );
        }
        Err(e) => println!("{e}"),
    }

    println!();
    println!("== Alternatives chosen on this machine");
    if let Err(e) = alternatives(&image, &features) {
        eprintln!("alternatives failed: {e}");
        return ExitCode::FAILURE;
    }

    println!();
    println!("== Static call and static key, updated live");
    if let Err(e) = calls_and_keys() {
        eprintln!("static call / key update failed: {e}");
        return ExitCode::FAILURE;
    }

    println!();
    println!("== Ifuncs");
    if let Err(e) = ifuncs() {
        eprintln!("ifuncs failed: {e}");
        return ExitCode::FAILURE;
    }

    println!();
    println!("== Retpolines");
    if let Err(e) = retpolines(&image, &features, &overrides) {
        eprintln!("retpolines failed: {e}");
        return ExitCode::FAILURE;
    }

    println!();
    println!("== Shared objects loaded at run time, patched at load (retpoline sites per object)");
    if let Err(e) = loaded::run(&Policy::for_process(&features, &overrides)) {
        eprintln!("shared objects failed: {e}");
        return ExitCode::FAILURE;
    }

    println!();
    println!("== Trampolines: Rust closures as C function pointers, no code written");
    if let Err(e) = trampolines::run() {
        eprintln!("trampolines failed: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Which strategies this process may write its text with, which one is
/// used, and how live updates are published.
fn writing_text() {
    for (s, r) in altpatch::os::linux::strategies() {
        match r {
            Ok(()) if s.keeps_file_text() => println!("  {:<8} usable   ({s})", s.name()),
            Ok(()) => println!(
                "  {:<8} usable   ({s}; anonymous text only: a file's text stays the file's)",
                s.name()
            ),
            Err(why) => println!("  {:<8} refused  ({why})", s.name()),
        }
    }
    match altpatch::os::linux::strategy() {
        Ok(s) => println!(
            "in use: {s}; live updates publish by {} (no trap: threads may block \
             any signal); membarrier(SYNC_CORE): {}",
            match altpatch::os::linux::live_publication() {
                altpatch::Publish::Live => "the INT3 protocol",
                _ => "page swap",
            },
            if LinuxPoke::has_membarrier_sync_core() {
                "yes"
            } else {
                "no (TLB-shootdown fallback)"
            }
        ),
        Err(e) => println!("no strategy: {e}"),
    }
}

fn calls_and_keys() -> Result<(), Box<dyn std::error::Error>> {
    let (before, a) = time_static_call();
    let t = Instant::now();
    let report = demo_hash::update(hash_fast)?;
    let took = t.elapsed();
    let (after, b) = time_static_call();
    println!(
        "demo_hash: {:.2} ns/call through the trampoline, {:.2} ns/call after the update \
         ({} call sites made direct in {:?}, which includes reading the relocations once, \
         {}; results equal: {})",
        before,
        after,
        report.inlined,
        took,
        report.applied.via,
        a == b
    );
    let (off, _) = time_static_branch();
    let t = Instant::now();
    let r = TRACE.enable()?;
    let took = t.elapsed();
    let (on, hits) = time_static_branch();
    TRACE.disable()?;
    println!(
        "TRACE key: {:.2} ns/check while off (a NOP), {:.2} ns/check while on; \
         enabling rewrote {} sites in {:?} (live: {}); {} hits",
        off, on, r.written, took, r.via, hits
    );
    // The swapped page is still the binary's, for the tools outside.
    let image = Image::current();
    if let Some(site) = image
        .static_key_records()
        .iter()
        .find(|k| k.key() == TRACE.addr())
        .map(|k| k.site())
        && let Some(line) = std::fs::read_to_string("/proc/self/maps")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| maps_line_holds(l, site))
                    .map(String::from)
            })
    {
        println!(
            "  its page in /proc/self/maps after the swap: {line}\n  (still the binary at its \
             offset: a uprobe there keeps firing, perf and gdb name its symbols)"
        );
    }
    Ok(())
}

/// Whether the `/proc/self/maps` line `l` covers `addr`.
fn maps_line_holds(l: &str, addr: usize) -> bool {
    let Some((a, b)) = l.split_whitespace().next().and_then(|r| r.split_once('-')) else {
        return false;
    };
    let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
        return false;
    };
    (a..b).contains(&addr)
}

/// Resolves this program's ifuncs in place and measures a call before
/// (the lazy path) and after (a direct call).
fn ifuncs() -> Result<(), Box<dyn std::error::Error>> {
    let direct = time_calls(|x| mix_portable(x)).0;
    let pointer = std::hint::black_box(mix_portable as extern "C" fn(u64) -> u64);
    let through_pointer = time_calls(|x| pointer(x)).0;
    let (lazy, a) = time_calls(demo_mix);
    let t = Instant::now();
    let report = altpatch::ifunc::init()?;
    let took = t.elapsed();
    print!("{report}");
    let (after, b) = time_calls(demo_mix);
    println!(
        "demo_mix: {lazy:.2} ns/call before (lazy: stub, jmp, load, indirect jump), \
         {after:.2} ns/call after; a direct call costs {direct:.2} ns, a call through a \
         function pointer {through_pointer:.2} ns; resolved once ({} resolver run), \
         rewritten in {took:?}; results equal: {}",
        demo_mix::ifunc().resolver_runs(),
        a == b
    );
    Ok(())
}

/// Nanoseconds per call of `f` over `idx` (best of 7 runs of 2000 loops).
fn ns_per_call(f: retpoline_loops::Loop, idx: &[u32]) -> f64 {
    (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..2000 {
                std::hint::black_box(retpoline_loops::run(f, idx, 1));
            }
            t.elapsed().as_nanos() as f64 / (2000 * idx.len()) as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Chooses this machine's retpoline mode, applies it live to this
/// program's thunk sites and the thunks, and measures an indirect call
/// before and after; then, for comparison only, every mode.
fn retpolines(
    image: &Image<'_>,
    features: &Features,
    overrides: &Overrides,
) -> Result<(), Box<dyn std::error::Error>> {
    use retpoline_loops::{rp_loop_plain, rp_loop_thunk};
    let idx = retpoline_loops::indices(1000, true);
    let plain = ns_per_call(rp_loop_plain, &idx);
    let before = ns_per_call(rp_loop_thunk, &idx);
    let sites = altpatch::elf::current_sites()?;
    let policy = Policy::for_process(features, overrides);
    let mut poke = LinuxPoke::running()?;
    let t = Instant::now();
    // SAFETY: a poke for running code (page swap); from the original sites
    // every mode is one instruction for one.
    let report = unsafe { retpoline::apply(image, &policy, sites, &mut poke) }?;
    let took = t.elapsed();
    print!("{report}");
    let after = ns_per_call(rp_loop_thunk, &idx);
    println!(
        "indirect call (same target every time): {before:.2} ns through the retpoline before, \
         {after:.2} ns after applying `{}` in {took:?}; a plain `call *%r11` costs {plain:.2} ns",
        policy.mode
    );

    // Every mode, for comparison (in place: this thread alone runs the
    // loops), then the chosen one again.
    let mut poke = LinuxPoke::new()?;
    let mut line = String::from("each mode on this machine:");
    for mode in [Mode::Generic, Mode::Lfence, Mode::Plain] {
        let p = Policy::new(mode, "comparison");
        // SAFETY: in place, single-threaded, the loops idle.
        unsafe { retpoline::apply(image, &p, sites, &mut poke) }?;
        line += &format!(" {mode} {:.2} ns", ns_per_call(rp_loop_thunk, &idx));
    }
    // SAFETY: as above.
    unsafe { retpoline::apply(image, &policy, sites, &mut poke) }?;
    println!("{line} (see the module docs of altpatch::retpoline for what each protects)");
    Ok(())
}

fn alternatives(image: &Image<'_>, features: &Features) -> Result<(), Box<dyn std::error::Error>> {
    let x = 0x1122_3344u32;
    let before = (load_be(&x), vector_level(), popcount(0xff));
    let (plan, _) = altpatch::alternative::plan(image, features)?;
    println!("plan:\n{plan}");
    let mut poke = LinuxPoke::new()?;
    let t = Instant::now();
    // SAFETY: no other thread runs this program's alternative sites now.
    let report = unsafe { altpatch::alternative::apply(image, features, &mut poke) }?;
    let took = t.elapsed();
    print!("{report}");
    println!("applied in {took:?}");
    let after = (load_be(&x), vector_level(), popcount(0xff));
    println!("load_be(0x11223344): {:#x} -> {:#x}", before.0, after.0);
    println!(
        "vector_level():      {} -> {} (0 none, 42 sse4.2, 2 avx2, 512 avx512f)",
        before.1, after.1
    );
    println!("popcount(0xff):      {} -> {}", before.2, after.2);
    if before.0 != after.0 || before.2 != after.2 {
        return Err("an alternative changed a result it must preserve".into());
    }
    Ok(())
}

fn patch_answer(image: &Image<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let f = std::hint::black_box(answer as fn() -> u32);
    let at = image
        .patch_point("demo_answer")
        .ok_or("patch point demo_answer not recorded")?;
    let mut old = [0u8; 5];
    // SAFETY: the point is inside this program's readable text.
    unsafe { core::ptr::copy_nonoverlapping(at as *const u8, old.as_mut_ptr(), 5) };
    let mut new = old;
    new[1..5].copy_from_slice(&2u32.to_le_bytes());

    let mut plan = Plan::for_image(image);
    plan.push(
        Edit::replace(at, &old, &new)
            .site("demo::answer")
            .reason("return 2 instead of 1"),
    );
    let mut poke = LinuxPoke::new()?;
    plan.validate(&poke)?;
    println!("dry run:\n{plan}");

    let before = f();
    let t = Instant::now();
    // SAFETY: one `mov` replaced by one `mov`; no other thread runs `answer`.
    let report = unsafe { plan.apply(&mut poke) }?;
    let first = t.elapsed();
    let after = f();
    let t = Instant::now();
    // SAFETY: as above.
    unsafe { plan.undo(&mut poke) }?;
    let undo = t.elapsed();
    let undone = f();
    println!("applied: {report}");
    println!("answer(): before={before} after={after} after undo={undone}");
    println!("first apply {first:?} (checks the page is text), undo {undo:?}");
    if (before, after, undone) != (1, 2, 1) {
        return Err("the patch did not take effect".into());
    }
    Ok(())
}
