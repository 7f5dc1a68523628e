//! Ifuncs: `ifunc!` resolved lazily (once, under concurrent first calls)
//! and in place (direct call sites), per forced feature snapshot; IRELATIVE
//! tables processed once, refused when malformed or when a resolver returns
//! an address outside text; a GCC ifunc's PLT-bound call sites in a
//! dynamically linked program made direct; the C accessor and header.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use altpatch::cpu::{self, Feature, Features};
use altpatch::ifunc::{
    self, IrelativeEntry, IrelativeError, IrelativeTable, apply_plt_sites, process_irelative,
};
use altpatch::sites::{Site, SiteKind};
use altpatch::x86::BranchKind;
use altpatch::{Image, LinuxPoke};

// ---------------------------------------------------------------- ifunc!

extern "C" fn sum_avx2(x: u64) -> u64 {
    x + 1000
}

extern "C" fn sum_bmi2(x: u64) -> u64 {
    x + 2000
}

extern "C" fn sum_portable(x: u64) -> u64 {
    x
}

/// Every snapshot the resolver was given.
static SEEN: Mutex<Vec<Features>> = Mutex::new(Vec::new());

fn pick_sum(f: &Features) -> extern "C" fn(u64) -> u64 {
    SEEN.lock().unwrap().push(*f);
    // Slow on purpose: first callers pile up while it runs.
    std::thread::sleep(std::time::Duration::from_millis(50));
    if f.has(Feature::Avx2) {
        sum_avx2
    } else if f.has(Feature::Bmi2) {
        sum_bmi2
    } else {
        sum_portable
    }
}

altpatch::ifunc! {
    /// The ifunc under test.
    fn sum(x: u64) -> u64 = pick_sum;
}

/// Calls `sum` from several places, so the program has several call sites.
#[inline(never)]
fn call_sum_a(x: u64) -> u64 {
    sum(x)
}

#[inline(never)]
fn call_sum_b(x: u64) -> u64 {
    sum(x + 1) - 1
}

/// Run in a child per snapshot (ALTPATCH): eight threads make the first
/// calls together, then `init` rewrites the stub and call sites while they
/// keep calling.
#[test]
#[ignore = "run by forced_snapshots_choose_each_implementation in a child"]
fn child_resolve_concurrently_then_init() {
    let want: u64 = std::env::var("WANT").unwrap().parse().unwrap();
    assert_eq!(sum::ifunc().resolver_runs(), 0);
    assert!(sum::resolved().is_none());

    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let wrong = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (barrier, stop, calls, wrong) =
                (barrier.clone(), stop.clone(), calls.clone(), wrong.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Counted, not asserted: a panicking caller would leave
                    // the main thread waiting for calls that never come.
                    if call_sum_a(5) != want + 5 || call_sum_b(5) != want + 5 {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let wait_for = |n: usize| {
        let t = std::time::Instant::now();
        while calls.load(Ordering::Relaxed) < n {
            assert!(t.elapsed().as_secs() < 60, "callers stalled");
            std::thread::yield_now();
        }
    };
    wait_for(1000);
    // Resolved once, from the published snapshot (detected + ALTPATCH).
    assert_eq!(sum::ifunc().resolver_runs(), 1);
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0], cpu::published());
    assert_eq!(seen[0], Features::detect_with_env().unwrap());
    let chosen = sum::ifunc().resolved().unwrap();
    assert!(!sum::ifunc().is_applied());

    // In place, live, while the threads call.
    let report = ifunc::init().unwrap();
    wait_for(calls.load(Ordering::Relaxed) + 1000);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        assert!(h.join().unwrap() > 0);
    }
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a caller saw a wrong result"
    );
    assert!(sum::ifunc().is_applied());
    assert_eq!(
        sum::ifunc().resolver_runs(),
        1,
        "init does not resolve again"
    );
    let mine = report
        .ifuncs
        .ifuncs
        .iter()
        .find(|a| a.ifunc.name() == "sum")
        .unwrap();
    assert!(mine.was_resolved);
    assert_eq!(mine.chosen, chosen);

    // The stub (endbr64 first) jumps to the implementation; every call
    // site calls it.
    let stub = common::read(sum::ifunc().stub(), 16);
    assert_eq!(stub[..4], [0xf3, 0x0f, 0x1e, 0xfa]);
    assert_eq!(stub[4], 0xe9);
    assert_eq!(rel_target(sum::ifunc().stub() + 4, &stub[4..9]), chosen);
    assert_eq!(stub[9..12], [0x0f, 0xb9, 0xcc]);
    assert_eq!(stub[12..], [0xcc; 4]);
    let sites = ifunc::sites_of(altpatch::elf::current_sites().unwrap(), sum::ifunc());
    assert!(sites.len() >= 2, "{sites:?}");
    for s in &sites {
        let b = common::read(s.addr, 5);
        let op = if s.form == BranchKind::Jmp {
            0xe9
        } else {
            0xe8
        };
        assert_eq!(b[0], op, "{s:?}");
        assert_eq!(rel_target(s.addr, &b), chosen, "{s:?}");
    }
    assert_eq!(mine.update.inlined, sites.len());
    assert_eq!(call_sum_a(5), want + 5);
    println!("CHILD-OK chosen={chosen:#x} sites={}", sites.len());
}

/// The target of the `call`/`jmp rel32` in `b` at `at`.
fn rel_target(at: usize, b: &[u8]) -> usize {
    let d = i32::from_le_bytes(b[1..5].try_into().unwrap());
    (at + 5).wrapping_add(d as isize as usize)
}

#[test]
fn forced_snapshots_choose_each_implementation() {
    for (env, want) in [
        ("+avx2,+bmi2", 1000),
        ("noavx2,+bmi2", 2000),
        ("noavx2,nobmi2", 0),
    ] {
        // `startup=off`: the first calls resolve (nothing patches at load).
        let env = format!("startup=off,{env}");
        let (ok, out) = common::run_child_test(
            "child_resolve_concurrently_then_init",
            &[("ALTPATCH", &env), ("WANT", &want.to_string())],
        );
        assert!(ok && out.contains("CHILD-OK"), "ALTPATCH={env}:\n{out}");
    }
}

// ------------------------------------------- refusals of a single ifunc

// A stub made by hand (the `ifunc!` layout): `endbr64`, `jmp` to the lazy
// target, then the trampoline signature.
core::arch::global_asm!(
    r#"
    .pushsection .text.ifunc_test_stub,"ax",@progbits
    .globl ifunc_test_stub
ifunc_test_stub:
    endbr64
    jmp {lazy}
    .byte 0x0f, 0xb9, 0xcc
    .popsection
    "#,
    lazy = sym sum_portable,
    options(att_syntax)
);

unsafe extern "C" {
    fn ifunc_test_stub(x: u64) -> u64;
}

static NOT_CODE: [u8; 16] = [0; 16];

fn stub_addr() -> usize {
    ifunc_test_stub as *const () as usize
}

fn lazy_addr() -> usize {
    sum_portable as *const () as usize
}

fn resolve_to_data(_: &Features) -> usize {
    NOT_CODE.as_ptr() as usize
}

/// Not in any image's records: applied only by the test below.
static BAD: ifunc::Ifunc = ifunc::Ifunc::new("bad", stub_addr, lazy_addr, resolve_to_data);

#[test]
fn a_resolver_choosing_data_writes_nothing() {
    let image = Image::current();
    let before = common::read(stub_addr(), 12);
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: in place; nothing else runs the stub.
    let err = unsafe { BAD.apply_with(&Features::detect(), &image, &[], &mut poke) }.unwrap_err();
    assert!(
        matches!(err, ifunc::Error::OutsideText { name: "bad", addr } if addr == NOT_CODE.as_ptr() as usize),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("outside the image's text"),
        "{err}"
    );
    assert_eq!(common::read(stub_addr(), 12), before, "nothing written");
    assert!(!BAD.is_applied());
    // SAFETY: the stub still jumps to the portable implementation.
    assert_eq!(unsafe { ifunc_test_stub(9) }, 9);
}

// ------------------------------------------------------- IRELATIVE

static CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn resolve_good() -> usize {
    CALLS.fetch_add(1, Ordering::SeqCst);
    sum_bmi2 as *const () as usize
}

extern "C" fn resolve_to_heap() -> usize {
    CALLS.fetch_add(1, Ordering::SeqCst);
    Box::leak(Box::new(0u64)) as *mut u64 as usize
}

/// IRELATIVE tests share the call counter.
static SERIAL: Mutex<()> = Mutex::new(());

fn slots() -> &'static mut [usize; 4] {
    Box::leak(Box::new([0usize; 4]))
}

#[test]
fn irelative_entries_resolved_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::current();
    let s = slots();
    let entries = vec![
        IrelativeEntry::new(&raw mut s[0] as usize, resolve_good as *const () as usize),
        IrelativeEntry::new(&raw mut s[1] as usize, resolve_good as *const () as usize),
    ];
    let table = IrelativeTable::new(&entries, 0);
    let c0 = CALLS.load(Ordering::SeqCst);
    // SAFETY: the slots are ours; the resolvers follow the convention.
    let r = unsafe { process_irelative(&image, &cpu::published(), &table) }.unwrap();
    assert_eq!(CALLS.load(Ordering::SeqCst) - c0, 2);
    assert!(!r.already);
    assert_eq!(s[0], sum_bmi2 as *const () as usize);
    assert_eq!(s[1], sum_bmi2 as *const () as usize);
    // SAFETY: the slot holds a function of this type.
    let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(s[0]) };
    assert_eq!(f(1), 2001);
    // Again: no resolver runs.
    // SAFETY: as above.
    let r = unsafe { process_irelative(&image, &cpu::published(), &table) }.unwrap();
    assert!(r.already);
    assert_eq!(r.resolved.len(), 2);
    assert_eq!(CALLS.load(Ordering::SeqCst) - c0, 2);
}

#[test]
fn malformed_irelative_tables_write_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::current();
    let good = resolve_good as *const () as usize;
    let text = resolve_good as *const () as usize;
    let s = slots();
    let slot = &raw mut s[0] as usize;
    let ok = IrelativeEntry::new(&raw mut s[1] as usize, good);
    let cases: Vec<(IrelativeEntry, &str)> = vec![
        (
            IrelativeEntry {
                info: 8, // R_X86_64_RELATIVE
                ..IrelativeEntry::new(slot, good)
            },
            "not an R_X86_64_IRELATIVE",
        ),
        (
            IrelativeEntry {
                info: (3 << 32) | 37,
                ..IrelativeEntry::new(slot, good)
            },
            "names no symbol",
        ),
        (IrelativeEntry::new(slot + 4, good), "misaligned"),
        (IrelativeEntry::new(0, good), "null"),
        (IrelativeEntry::new(text & !7, good), "in the image's text"),
        (
            IrelativeEntry::new(slot, NOT_CODE.as_ptr() as usize),
            "resolver lies outside",
        ),
    ];
    for (bad, why) in cases {
        let entries = [ok, bad];
        let table = IrelativeTable::new(&entries, 0);
        let c0 = CALLS.load(Ordering::SeqCst);
        // SAFETY: refused before any resolver runs or slot is written.
        let err = unsafe { process_irelative(&image, &cpu::published(), &table) }.unwrap_err();
        assert!(
            matches!(err, IrelativeError::Malformed { index: 1, .. }),
            "{why}: {err:?}"
        );
        assert!(err.to_string().contains(why), "{why}: {err}");
        assert_eq!(CALLS.load(Ordering::SeqCst), c0, "{why}: no resolver ran");
        assert_eq!(*s, [0; 4], "{why}: nothing written");
    }
    // Bounds that are not whole entries.
    let base = NOT_CODE.as_ptr();
    // SAFETY: refused on the bounds alone.
    let e = unsafe { IrelativeTable::from_bounds(base, base.wrapping_add(30), 0) }.unwrap_err();
    assert!(matches!(e, IrelativeError::BadBounds { .. }), "{e:?}");
}

#[test]
fn a_c_style_resolver_returning_data_writes_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::current();
    let s = slots();
    let entries = [
        IrelativeEntry::new(&raw mut s[0] as usize, resolve_good as *const () as usize),
        IrelativeEntry::new(
            &raw mut s[1] as usize,
            resolve_to_heap as *const () as usize,
        ),
    ];
    let table = IrelativeTable::new(&entries, 0);
    // SAFETY: the slots are ours; nothing is written on this error.
    let err = unsafe { process_irelative(&image, &cpu::published(), &table) }.unwrap_err();
    assert!(
        matches!(err, IrelativeError::OutsideText { index: 1, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("outside the image's text"),
        "{err}"
    );
    assert_eq!(*s, [0; 4], "not even the good entry's slot");
}

#[test]
fn an_ifunc_site_with_unexpected_bytes_writes_nothing() {
    let image = Image::current();
    // A "site" of an ELF ifunc on bytes that are not a call.
    let at = sum_portable as *const () as usize;
    let before = common::read(at, 16);
    let site = Site {
        addr: at,
        len: 5,
        form: BranchKind::Call,
        kind: SiteKind::Ifunc,
        target: resolve_good as *const () as usize,
    };
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: refused during planning.
    let err = unsafe { apply_plt_sites(&image, &[site], None, &mut poke) }.unwrap_err();
    assert!(
        matches!(err, IrelativeError::BadSite { addr, .. } if addr == at),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("{at:#x}")), "{err}");
    assert_eq!(common::read(at, 16), before);
}

// ----------------------------------------------- GCC ifunc, dynamic

fn fixture() -> std::path::PathBuf {
    common::build_fixture("sites", true).join("ifunc")
}

#[test]
fn gcc_ifunc_plt_call_sites_made_direct() {
    for (env, has_sse42) in [(None, None), (Some("nosse4_2"), Some(false))] {
        let mut cmd = std::process::Command::new(fixture());
        if let Some(e) = env {
            cmd.env("ALTPATCH", e);
        } else {
            cmd.env_remove("ALTPATCH");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        let sse42 = text
            .lines()
            .find_map(|l| l.strip_prefix("sse4_2 "))
            .map(|v| v == "true")
            .unwrap();
        if let Some(h) = has_sse42 {
            assert_eq!(sse42, h, "the loader-time resolver saw ALTPATCH: {text}");
        }
        // pick_twice(1) = pick(1) + pick(2).
        let want = if sse42 { 1 + 4200 + 2 + 4200 } else { 3 };
        assert!(text.contains(&format!("before {want}\n")), "{text}");
        assert!(text.contains(&format!("after {want}\n")), "{text}");
        assert!(
            text.contains("ELF ifunc call sites: 2 made direct"),
            "{text}"
        );
        assert!(text.contains("again 0 2"), "idempotent: {text}");
        let rewritten: Vec<(usize, usize)> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("rewritten ")?.split(' ');
                let a = usize::from_str_radix(w.next()?.trim_start_matches("0x"), 16).ok()?;
                let c = usize::from_str_radix(w.next()?.trim_start_matches("0x"), 16).ok()?;
                Some((a, c))
            })
            .collect();
        assert_eq!(rewritten.len(), 2);
        let impls: HashSet<usize> = rewritten.iter().map(|r| r.1).collect();
        assert_eq!(impls.len(), 1, "both sites reach the one implementation");
        for line in text.lines().filter(|l| l.starts_with("site-after ")) {
            let w: Vec<&str> = line.split(' ').collect();
            let addr = usize::from_str_radix(w[1].trim_start_matches("0x"), 16).unwrap();
            let bytes: Vec<u8> = (0..w[3].len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&w[3][i..i + 2], 16).unwrap())
                .collect();
            let (_, chosen) = rewritten.iter().find(|r| r.0 == addr).unwrap();
            assert_eq!(bytes[0], 0xe8, "{line}");
            assert_eq!(rel_target(addr, &bytes), *chosen, "{line}");
        }
    }
}

// ---------------------------------------------------- the C side

#[test]
fn c_accessor_reads_the_published_snapshot() {
    let f = cpu::published();
    for &feature in Feature::ALL {
        assert_eq!(
            cpu::altpatch_cpu_has(feature as u32) != 0,
            f.has(feature),
            "{feature}"
        );
    }
    assert_eq!(cpu::altpatch_cpu_has(63), 0);
    assert_eq!(cpu::altpatch_cpu_features(), f.bits());
    // Publishing another snapshot now is refused.
    let other = f.with(Feature::Rdpid).without(Feature::Sse3);
    if other != f {
        let e = cpu::publish(other).unwrap_err();
        assert_eq!(e.published, f);
    }
}

#[test]
fn the_c_header_matches_the_feature_numbers() {
    let header =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/altpatch.h"))
            .unwrap();
    let defined: Vec<(String, u32)> = header
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("#define ALTPATCH_CPU_")?.split(' ');
            Some((w.next()?.to_lowercase(), w.next()?.parse().ok()?))
        })
        .collect();
    assert_eq!(defined.len(), Feature::ALL.len());
    for &f in Feature::ALL {
        assert!(
            defined.contains(&(f.name().to_string(), f as u32)),
            "{} = {} missing from include/altpatch.h",
            f.name(),
            f as u32
        );
    }
}

/// Ifunc stubs are static-call trampolines: 16-byte aligned like them,
/// starting with `endbr64`.
#[test]
fn stubs_are_16_byte_aligned_and_start_with_endbr64() {
    let stub = sum::ifunc().stub();
    assert_eq!(stub % 16, 0, "{stub:#x}");
    assert_eq!(common::read(stub, 4), altpatch::x86::ENDBR64);
}
