//! Static calls, the Linux self-test shape: f(x) = x + 1, g(x) = x + 2,
//! none; through each, checking results and the bytes at the trampoline and
//! at every call site, out of line and inline. Each test has its own
//! static calls (tests run in parallel).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use altpatch::sites::{Site, SiteKind};
use altpatch::static_call::{
    ENDBR64, TRAMPOLINE_ALIGN, TRAMPOLINE_JMP, TRAMPOLINE_LEN, TRAMPOLINE_SIGNATURE,
};
use altpatch::x86::{self, BranchKind};
use altpatch::{Edit, Image, LinuxPoke, Plan, PlanError, static_call};
use common::read;

extern "C" fn f(x: u64) -> u64 {
    x + 1
}

extern "C" fn g(x: u64) -> u64 {
    x + 2
}

static_call! {
    /// Inline-updated in `inline_self_test`.
    fn sc_inline(x: u64) -> u64 = f;
}
static_call! {
    /// Only its trampoline is updated, in `out_of_line_self_test`.
    fn sc_outline(x: u64) -> u64 = f;
}
static_call! {
    fn sc_void(counter: &AtomicU64) = bump;
}
static_call! {
    fn sc_badsig(x: u64) -> u64 = f;
}
static_call! {
    fn sc_badsite(x: u64) -> u64 = f;
}

extern "C" fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

// `black_box` keeps each call a `call` (not a tail `jmp`) at any
// optimization level; tail sites are below, by hand.
#[inline(never)]
fn call_inline(x: u64) -> u64 {
    std::hint::black_box(sc_inline(x))
}

#[inline(never)]
fn call_outline(x: u64) -> u64 {
    std::hint::black_box(sc_outline(x))
}

#[inline(never)]
fn call_void(c: &AtomicU64) {
    sc_void(c);
    std::hint::black_box(());
}

#[inline(never)]
fn call_badsite(x: u64) -> u64 {
    std::hint::black_box(sc_badsite(x))
}

// Tail call sites, written by hand so they exist in an unoptimized build.
core::arch::global_asm!(
    ".pushsection .text.static_call_tails,\"ax\",@progbits",
    ".globl tail_inline",
    "tail_inline:",
    "jmp {inline}",
    ".globl tail_void",
    "tail_void:",
    "jmp {void}",
    ".popsection",
    inline = sym <sc_inline as altpatch::static_call::__TrampolineStub>::__altpatch_sc_tramp,
    void = sym <sc_void as altpatch::static_call::__TrampolineStub>::__altpatch_sc_tramp,
);

unsafe extern "C" {
    fn tail_inline(x: u64) -> u64;
    fn tail_void(c: &AtomicU64);
}

fn sites_of(tramp: usize) -> Vec<Site> {
    let all = altpatch::elf::current_sites().expect("tests are linked with --emit-relocs");
    altpatch::static_call::sites_of(all, tramp)
}

/// The trampoline's bytes: `endbr64`, a jmp to `to` (or `ret` + int3),
/// the signature and int3 padding to 16 bytes.
fn assert_trampoline(tramp: usize, to: Option<usize>) {
    let b = read(tramp, TRAMPOLINE_ALIGN);
    assert_eq!(b[..4], ENDBR64);
    assert_eq!(b[9..12], TRAMPOLINE_SIGNATURE);
    assert_eq!(b[12..], [0xcc; 4]);
    match to {
        Some(t) => assert_eq!(b[4..9], *x86::jmp_rel32(tramp + 4, t).unwrap()),
        None => assert_eq!(b[4..9], [0xc3, 0xcc, 0xcc, 0xcc, 0xcc]),
    }
}

/// Every site: a call/jmp to `to`, or for none a NOP / ret.
fn assert_sites(sites: &[Site], to: Option<usize>) {
    for s in sites {
        let b = read(s.addr, 5);
        match (to, s.form) {
            (Some(t), BranchKind::Call) => assert_eq!(b, *x86::call_rel32(s.addr, t).unwrap()),
            (Some(t), BranchKind::Jmp) => assert_eq!(b, *x86::jmp_rel32(s.addr, t).unwrap()),
            (None, BranchKind::Call) => assert_eq!(b, x86::NOP5),
            (None, BranchKind::Jmp) => assert_eq!(b, [0xc3, 0xcc, 0xcc, 0xcc, 0xcc]),
            other => panic!("unexpected site {other:?}"),
        }
    }
}

fn addr(f: extern "C" fn(u64) -> u64) -> usize {
    f as *const () as usize
}

#[test]
fn inline_self_test() {
    let tramp = sc_inline::static_call().trampoline();
    let sites = sites_of(tramp);
    assert!(
        sites.iter().any(|s| s.form == BranchKind::Call),
        "{sites:?}"
    );
    assert!(sites.iter().any(|s| s.form == BranchKind::Jmp), "{sites:?}");
    assert_eq!(sites.len(), sc_inline::static_call().site_count());
    let call = std::hint::black_box(call_inline as fn(u64) -> u64);
    // SAFETY: jumps through the trampoline to a fn(u64) -> u64.
    let tail = |x| unsafe { tail_inline(x) };

    // Initially: the default through the trampoline; sites call it.
    assert_eq!((call(1), tail(1)), (2, 2));
    // The declared default is reached through its C-ABI shim (the default
    // may be a Rust function); the shim is what the state reports.
    let default = sc_inline::static_call().target_addr().unwrap();
    assert_ne!(default, tramp);
    assert_trampoline(tramp, Some(default));
    assert_sites(&sites, Some(tramp));

    let r = sc_inline::update(g).unwrap();
    assert_eq!((r.inlined, r.via_trampoline), (sites.len(), 0));
    assert_eq!((call(1), tail(1)), (3, 3));
    assert_trampoline(tramp, Some(addr(g)));
    assert_sites(&sites, Some(addr(g)));
    assert_eq!(sc_inline::target().map(|t| t(10)), Some(12));

    sc_inline::update(f).unwrap();
    assert_eq!((call(1), tail(1)), (2, 2));
    assert_sites(&sites, Some(addr(f)));

    // Updating to the current target again writes nothing.
    let again = sc_inline::update(f).unwrap();
    assert_eq!(again.applied.written, 0);
}

#[test]
fn rust_functions_and_closures_are_targets_in_a_function_body() {
    struct Pair(u64, u64);
    fn first(p: &Pair) -> u64 {
        p.0
    }
    fn second(p: &Pair) -> u64 {
        p.1
    }
    static_call! {
        fn pick(p: &Pair) -> u64 = first;
    }
    #[inline(never)]
    fn call_pick(p: &Pair) -> u64 {
        pick(p)
    }
    let tramp = pick::static_call().trampoline();
    let sites = sites_of(tramp);
    assert!(!sites.is_empty(), "the call in call_pick is a site");
    let call = std::hint::black_box(call_pick as fn(&Pair) -> u64);
    assert_eq!(call(&Pair(1, 2)), 1);

    let r = pick::update_fn(second).unwrap();
    assert_eq!((r.inlined, r.via_trampoline), (sites.len(), 0));
    assert_eq!(call(&Pair(1, 2)), 2);
    // Sites and trampoline go straight to `second`'s C-ABI shim.
    let shim = pick::c_fn(second) as usize;
    assert_eq!(pick::static_call().target_addr(), Some(shim));
    assert_trampoline(tramp, Some(shim));
    assert_sites(&sites, Some(shim));

    pick::update_fn(|p: &Pair| p.0 * 10 + p.1).unwrap();
    assert_eq!(call(&Pair(1, 2)), 12);
    assert_eq!(pick::target().map(|f| f(&Pair(3, 4))), Some(34));
}

#[test]
fn out_of_line_self_test() {
    let tramp = sc_outline::static_call().trampoline();
    let sites = sites_of(tramp);
    assert!(!sites.is_empty());
    let image = Image::current();
    let mut poke = LinuxPoke::new().unwrap();
    let call = std::hint::black_box(call_outline as fn(u64) -> u64);
    assert_eq!(call(1), 2);
    // SAFETY: no other thread runs sc_outline now; only the trampoline is
    // written (no sites given).
    let r = unsafe { sc_outline::update_with(g, &image, &[], &mut poke) }.unwrap();
    assert!(r.trampoline && r.inlined == 0);
    assert_eq!(call(1), 3);
    assert_trampoline(tramp, Some(addr(g)));
    assert_sites(&sites, Some(tramp)); // still calling the trampoline
    // SAFETY: as above.
    unsafe { sc_outline::update_with(f, &image, &[], &mut poke) }.unwrap();
    assert_eq!(call(1), 2);
    assert_trampoline(tramp, Some(addr(f)));
    // The sites were never rewritten: an update that lists them now finds
    // them calling the trampoline, not the target, and inlines them.
    let r = sc_outline::update(g).unwrap();
    assert_eq!((r.inlined, r.via_trampoline), (sites.len(), 0));
    assert_eq!(call(1), 3);
    assert_sites(&sites, Some(addr(g)));
}

#[test]
fn none_makes_calls_no_ops() {
    let tramp = sc_void::static_call().trampoline();
    let sites = sites_of(tramp);
    assert!(sites.iter().any(|s| s.form == BranchKind::Jmp));
    let counter = AtomicU64::new(0);
    let call = std::hint::black_box(call_void as fn(&AtomicU64));
    let tail = |c: &AtomicU64| unsafe { tail_void(c) };
    call(&counter);
    tail(&counter);
    assert_eq!(counter.load(Ordering::Relaxed), 2);

    sc_void::set_none().unwrap();
    assert!(sc_void::target().is_none());
    call(&counter);
    tail(&counter);
    assert_eq!(counter.load(Ordering::Relaxed), 2, "calls must be no-ops");
    assert_trampoline(tramp, None);
    assert_sites(&sites, None);

    sc_void::update(bump).unwrap();
    call(&counter);
    tail(&counter);
    assert_eq!(counter.load(Ordering::Relaxed), 4);
    assert_sites(&sites, Some(bump as *const () as usize));
}

/// A trampoline without its signature, or without its `endbr64` (a NOP4
/// in its place: still runs, but is no indirect-branch target under CET),
/// is refused by name, and nothing is written.
#[test]
fn wrong_trampoline_layout_is_refused() {
    let tramp = sc_badsig::static_call().trampoline();
    let image = Image::current();
    let before = read(tramp, TRAMPOLINE_LEN);
    let sites = sites_of(tramp);
    let site_bytes: Vec<Vec<u8>> = sites.iter().map(|s| read(s.addr, 5)).collect();
    let mut poke = LinuxPoke::new().unwrap();
    for (at, bytes) in [
        (TRAMPOLINE_JMP + 5, &[0xcc, 0xcc, 0xcc][..]),
        (0, &[0x0f, 0x1f, 0x40, 0x00][..]),
    ] {
        let mut damaged = before.clone();
        damaged[at..at + bytes.len()].copy_from_slice(bytes);
        let mut plan = Plan::for_image(&image);
        plan.push(Edit::replace(tramp, &before, &damaged));
        // SAFETY: the signature is never executed, and a NOP4 does what the
        // endbr64 did; no other thread calls sc_badsig.
        unsafe { plan.apply(&mut poke) }.unwrap();

        let e = sc_badsig::update(g).unwrap_err();
        assert!(
            matches!(
                e,
                static_call::Error::BadTrampoline {
                    name: "sc_badsig",
                    addr,
                    found,
                } if addr == tramp && found[..] == damaged[..]
            ),
            "{e}"
        );
        assert!(e.to_string().contains("nothing written"), "{e}");
        assert!(e.to_string().contains("endbr64"), "{e}");
        assert_eq!(e.site(), Some(tramp));
        assert_eq!(read(tramp, TRAMPOLINE_LEN), damaged);
        let after: Vec<Vec<u8>> = sites.iter().map(|s| read(s.addr, 5)).collect();
        assert_eq!(after, site_bytes);
        assert_eq!(sc_badsig(1), 2);
        // SAFETY: as above.
        unsafe { plan.undo(&mut poke) }.unwrap();
    }
    sc_badsig::update(g).unwrap();
    assert_eq!(sc_badsig(1), 3);
}

#[test]
fn unexpected_bytes_at_a_site_are_refused() {
    let tramp = sc_badsite::static_call().trampoline();
    let sites = sites_of(tramp);
    let site = sites
        .iter()
        .find(|s| s.form == BranchKind::Call)
        .unwrap()
        .addr;
    let image = Image::current();
    // Someone else turned the site into a NOP.
    let mut other = Plan::for_image(&image);
    other.push(Edit::new(site, altpatch::Expect::Call(tramp), x86::NOP5));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: one call replaced by another; no other thread runs it.
    unsafe { other.apply(&mut poke) }.unwrap();
    let tramp_before = read(tramp, TRAMPOLINE_LEN);

    let e = sc_badsite::update(g).unwrap_err();
    match &e {
        static_call::Error::Plan(PlanError::Unexpected { addr, .. }) => assert_eq!(*addr, site),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        read(tramp, TRAMPOLINE_LEN),
        tramp_before,
        "the trampoline changed"
    );
    assert_eq!(read(site, 5), x86::NOP5);
    // SAFETY: as above.
    unsafe { other.undo(&mut poke) }.unwrap();
    sc_badsite::update(g).unwrap();
    assert_eq!(call_badsite(1), 3);
    assert!(sites.iter().all(|s| s.kind == SiteKind::StaticCall));
}

/// Every trampoline is 16-byte aligned, so its 12 bytes (`endbr64`,
/// `jmp rel32` and the signature) sit in one 64-byte fetch block: one
/// whose `jmp` straddled two blocks cost calls through it ~25 %
/// (benches/calls.rs). And it starts with `endbr64`, never rewritten.
#[test]
fn trampolines_are_16_byte_aligned_and_start_with_endbr64() {
    for tramp in [
        sc_inline::static_call().trampoline(),
        sc_outline::static_call().trampoline(),
        sc_void::static_call().trampoline(),
        sc_badsig::static_call().trampoline(),
        sc_badsite::static_call().trampoline(),
    ] {
        // (Other tests rewrite these trampolines concurrently: only their
        // place and first instruction are checked here.)
        assert_eq!(tramp % TRAMPOLINE_ALIGN, 0, "{tramp:#x}");
        assert_eq!(read(tramp, 4), ENDBR64, "{tramp:#x}");
    }
}
