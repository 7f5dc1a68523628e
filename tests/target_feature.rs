//! `#[target_feature]` functions as ifunc and static-call targets: a Rust
//! one through a closure given to `c_fn`, an `extern "C"` one through
//! `c_fn_unchecked` (no shim: the stub and the trampoline jump straight to
//! it). Each really uses its feature's instructions, is chosen exactly
//! when the snapshot has the feature, and computes what the portable
//! version does.

mod common;

use core::arch::x86_64::{
    __m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_setzero_si256, _mm256_storeu_si256,
};

use altpatch::cpu::{Feature, Features};
use altpatch::x86::{BranchKind, for_each_insn, rel_branch_of};
use iced_x86::{Mnemonic, Register};

// ------------------------------------------------- the implementations

fn sum_portable(v: &[u64]) -> u64 {
    v.iter().fold(0, |a, &x| a.wrapping_add(x))
}

/// Four lanes of 64-bit adds in a `ymm` register.
#[inline(never)]
#[target_feature(enable = "avx2")]
fn sum_avx2(v: &[u64]) -> u64 {
    let mut acc = _mm256_setzero_si256();
    let chunks = v.chunks_exact(4);
    let tail = sum_portable(chunks.remainder());
    for c in chunks {
        // SAFETY: `c` holds four `u64`s, 32 readable bytes; the load is
        // unaligned.
        acc = _mm256_add_epi64(acc, unsafe {
            _mm256_loadu_si256(c.as_ptr().cast::<__m256i>())
        });
    }
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 writable bytes; the store is unaligned.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast::<__m256i>(), acc) };
    sum_portable(&lanes).wrapping_add(tail)
}

/// Compiled to one `popcnt` (the baseline target has none).
#[target_feature(enable = "popcnt")]
extern "C" fn ones_popcnt(x: u64) -> u64 {
    x.count_ones() as u64
}

extern "C" fn ones_portable(x: u64) -> u64 {
    // Counted by hand, so this one certainly has no `popcnt`.
    let (mut x, mut n) = (x, 0);
    while x != 0 {
        x &= x - 1;
        n += 1;
    }
    n
}

// ---------------------------------------------------- the ifuncs

// A resolver with a name, so the test can call it with other snapshots;
// its signature names the slice-taking `extern "C"` type rustc warns about
// (the in-place form the docs show names none: tests/two_words.rs).
#[allow(improper_ctypes_definitions)]
fn pick_sum(f: &Features) -> extern "C" fn(&[u64]) -> u64 {
    if f.has(Feature::Avx2) {
        // SAFETY: returned only where the snapshot, hence the CPU, has
        // AVX2, the one feature `sum_avx2` enables.
        sum::c_fn(|v| unsafe { sum_avx2(v) })
    } else {
        sum::c_fn(sum_portable)
    }
}

altpatch::ifunc! {
    /// A slice argument and a Rust `#[target_feature]` implementation.
    fn sum(v: &[u64]) -> u64 = pick_sum;
}

fn pick_ones(f: &Features) -> extern "C" fn(u64) -> u64 {
    if f.has(Feature::Popcnt) {
        // SAFETY: returned only where the snapshot, hence the CPU, has
        // POPCNT, the one feature `ones_popcnt` enables.
        unsafe { ones::c_fn_unchecked(ones_popcnt) }
    } else {
        ones_portable
    }
}

altpatch::ifunc! {
    /// An `extern "C"` `#[target_feature]` implementation, no shim.
    fn ones(x: u64) -> u64 = pick_ones;
}

altpatch::static_call! {
    fn ones_sc(x: u64) -> u64 = ones_portable;
}

#[inline(never)]
fn call_ones(x: u64) -> u64 {
    ones(x)
}

// ------------------------------------------------------- helpers

fn addr<T>(f: T) -> usize {
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: `f` is a function pointer (checked: the size of one).
    unsafe { core::mem::transmute_copy::<T, usize>(&f) }
}

/// Whether the first `len` bytes of the function at `at` hold an
/// instruction with this mnemonic.
fn has_insn(at: usize, len: usize, m: Mnemonic) -> bool {
    let mut found = false;
    for_each_insn(&common::read(at, len), at as u64, |i| {
        found |= i.mnemonic() == m;
        !found
    });
    found
}

/// Whether the first `len` bytes of the function at `at` use a `ymm`
/// register.
fn uses_ymm(at: usize, len: usize) -> bool {
    let mut found = false;
    for_each_insn(&common::read(at, len), at as u64, |i| {
        found |= (0..i.op_count()).any(|k| {
            let r = i.op_register(k) as u32;
            (Register::YMM0 as u32..=Register::YMM31 as u32).contains(&r)
        });
        !found
    });
    found
}

/// The target of the first `call`/`jmp rel32` in the first `len` bytes at
/// `at`.
fn first_branch(at: usize, len: usize) -> Option<usize> {
    let mut out = None;
    for_each_insn(&common::read(at, len), at as u64, |i| {
        if let Some(b) = rel_branch_of(i)
            && matches!(b.kind, BranchKind::Call | BranchKind::Jmp)
        {
            out = Some(b.target as usize);
        }
        out.is_none()
    });
    out
}

fn cpu() -> Features {
    Features::detect()
}

// --------------------------------------------------------- the tests

#[test]
fn the_implementations_use_their_features() {
    let popcnt = addr(ones_popcnt as unsafe extern "C" fn(u64) -> u64);
    assert!(has_insn(popcnt, 16, Mnemonic::Popcnt));
    assert!(!has_insn(
        addr(ones_portable as extern "C" fn(u64) -> u64),
        64,
        Mnemonic::Popcnt
    ));
    let avx2 = addr(sum_avx2 as unsafe fn(&[u64]) -> u64);
    assert!(uses_ymm(avx2, 256), "sum_avx2 has no ymm instruction");
}

#[test]
fn resolvers_choose_a_target_feature_function_exactly_when_the_snapshot_has_it() {
    let popcnt = addr(ones_popcnt as unsafe extern "C" fn(u64) -> u64);
    let portable = addr(ones_portable as extern "C" fn(u64) -> u64);
    let without = cpu().without(Feature::Popcnt);
    assert_eq!(addr(pick_ones(&without)), portable);
    if cpu().has(Feature::Popcnt) {
        // The function itself, not a shim around it.
        assert_eq!(addr(pick_ones(&cpu())), popcnt);
    }

    let avx2 = addr(sum_avx2 as unsafe fn(&[u64]) -> u64);
    let plain = pick_sum(&cpu().without(Feature::Avx2));
    assert_ne!(first_branch(addr(plain), 64), Some(avx2));
    if cpu().has(Feature::Avx2) {
        // A shim whose call or jump goes to `sum_avx2` (rustc cannot
        // inline code for another feature set into it).
        let chosen = pick_sum(&cpu());
        assert_ne!(addr(chosen), addr(plain));
        assert_eq!(first_branch(addr(chosen), 64), Some(avx2));
    }
}

#[test]
fn target_feature_implementations_compute_what_the_portable_ones_do() {
    let on_cpu = cpu();
    let v: Vec<u64> = (0..1000u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    for n in [0, 1, 3, 4, 5, 7, 8, 63, 64, 65, 999, 1000] {
        let want = sum_portable(&v[..n]);
        assert_eq!(sum(&v[..n]), want, "n = {n}");
        if on_cpu.has(Feature::Avx2) {
            // SAFETY: this CPU has AVX2.
            assert_eq!(unsafe { sum_avx2(&v[..n]) }, want, "n = {n}");
        }
    }
    for x in [0u64, 1, 0b1011, u64::MAX, 1 << 63, 0x0123_4567_89ab_cdef] {
        assert_eq!(ones(x), x.count_ones() as u64);
        assert_eq!(call_ones(x), x.count_ones() as u64);
        assert_eq!(ones_portable(x), x.count_ones() as u64);
    }
    // Resolved from the published snapshot (the detected one: this test
    // sets no ALTPATCH): the CPU's features decide.
    let published = altpatch::cpu::published();
    let chosen = ones::resolved().map(addr).unwrap();
    if published.has(Feature::Popcnt) {
        assert_eq!(
            chosen,
            addr(ones_popcnt as unsafe extern "C" fn(u64) -> u64)
        );
    } else {
        assert_eq!(chosen, addr(ones_portable as extern "C" fn(u64) -> u64));
    }
}

/// In a child (see below): the lazy resolution and `init` with the
/// snapshot `ALTPATCH` leaves; the stub ends up jumping straight to the
/// chosen function.
#[test]
#[ignore = "run by removing_the_feature_keeps_the_resolver_from_choosing_it in a child"]
fn child_resolve_and_init() {
    let want = std::env::var("WANT").unwrap();
    let popcnt = addr(ones_popcnt as unsafe extern "C" fn(u64) -> u64);
    let portable = addr(ones_portable as extern "C" fn(u64) -> u64);
    let expect = if want == "popcnt" { popcnt } else { portable };
    assert_eq!(call_ones(0b1011), 3);
    assert_eq!(ones::resolved().map(addr), Some(expect));
    altpatch::ifunc::init().unwrap();
    assert!(ones::ifunc().is_applied());
    let stub = ones::ifunc().stub();
    assert_eq!(first_branch(stub, 16), Some(expect), "the stub's jmp");
    let sites = altpatch::ifunc::sites_of(altpatch::elf::current_sites().unwrap(), ones::ifunc());
    assert!(!sites.is_empty(), "call_ones calls the stub");
    for s in sites {
        assert_eq!(first_branch(s.addr, 5), Some(expect), "{s:?}");
    }
    assert_eq!(call_ones(0b1011), 3);
    assert_eq!(call_ones(u64::MAX), 64);
    println!("CHILD-OK {want}");
}

#[test]
fn removing_the_feature_keeps_the_resolver_from_choosing_it() {
    let mut runs = vec![("nopopcnt", "portable")];
    if cpu().has(Feature::Popcnt) {
        runs.push(("", "popcnt"));
    }
    for (env, want) in runs {
        let (ok, out) = common::run_child_test(
            "child_resolve_and_init",
            &[("ALTPATCH", env), ("WANT", want)],
        );
        assert!(
            ok && out.contains(&format!("CHILD-OK {want}")),
            "ALTPATCH={env}:\n{out}"
        );
    }
}

#[test]
fn a_static_call_updated_to_target_feature_functions() {
    assert_eq!(ones_sc(0b111), 3);
    if !cpu().has(Feature::Popcnt) {
        return;
    }
    let tramp = ones_sc::static_call().trampoline();
    // SAFETY: this CPU has POPCNT, the one feature `ones_popcnt` enables.
    ones_sc::update(unsafe { ones_sc::c_fn_unchecked(ones_popcnt) }).unwrap();
    let popcnt = addr(ones_popcnt as unsafe extern "C" fn(u64) -> u64);
    assert_eq!(
        first_branch(tramp, 16),
        Some(popcnt),
        "the trampoline's jmp"
    );
    assert_eq!(ones_sc::target().map(addr), Some(popcnt));
    assert_eq!(ones_sc(0b1011), 3);
    assert_eq!(ones_sc(u64::MAX), 64);

    // A Rust one, through a closure (a C-ABI shim around it).
    #[target_feature(enable = "popcnt")]
    fn ones_rust(x: u64) -> u64 {
        x.count_ones() as u64 + 100
    }
    // SAFETY: as above, for `ones_rust`.
    ones_sc::update_fn(|x| unsafe { ones_rust(x) }).unwrap();
    assert_eq!(ones_sc(0b1011), 103);
    ones_sc::update(ones_portable).unwrap();
    assert_eq!(ones_sc(0b1011), 3);
}
