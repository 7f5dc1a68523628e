//! Arguments and results C has no type for, two-register ones above all
//! (`&[T]`, `&str`, `&dyn Trait`, `(u64, u64)`, `u128`), through all three
//! macros: `ifunc!`, `static_call!` and `alternative_call!` (whose `asm!`
//! places every word by hand), before and after their sites are patched.
//! The crate denies warnings here: none of the documented forms makes
//! rustc warn in user code.

#![deny(warnings)]

use altpatch::alternative_call;
use altpatch::cpu::{Feature, Features};
use altpatch::{Image, LinuxPoke};

trait Shape {
    fn area(&self) -> u64;
}

struct Square(u64);

impl Shape for Square {
    fn area(&self) -> u64 {
        self.0 * self.0
    }
}

fn count(bytes: &[u8], needle: u8) -> usize {
    bytes.iter().filter(|&&b| b == needle).count()
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn span(range: (u64, u64)) -> u64 {
    range.1 - range.0
}

fn high(x: u128) -> u64 {
    (x >> 64) as u64
}

fn area(s: &dyn Shape) -> u64 {
    s.area()
}

fn tail(bytes: &[u8]) -> &[u8] {
    &bytes[1..]
}

fn swap(p: (u64, u64)) -> (u64, u64) {
    (p.1, p.0)
}

const TEXT: &[u8] = b"a banana in a cabana";

// ------------------------------------------------------------- ifunc!

altpatch::ifunc! {
    fn if_count(bytes: &[u8], needle: u8) -> usize = |_| if_count::c_fn(count);
}
altpatch::ifunc! {
    fn if_words(s: &str) -> usize = |_| if_words::c_fn(words);
}
altpatch::ifunc! {
    fn if_mixed(range: (u64, u64), x: u128, s: &dyn Shape) -> u64 = |_| {
        if_mixed::c_fn(|r, x, s| span(r) + high(x) + area(s))
    };
}
altpatch::ifunc! {
    fn if_tail(bytes: &[u8]) -> &[u8] = |features| {
        if features.has(Feature::Sse3) {
            if_tail::c_fn(tail)
        } else {
            if_tail::c_fn(|b| b)
        }
    };
}

#[inline(never)]
fn ifunc_calls() -> (usize, usize, u64, Vec<u8>) {
    (
        if_count(TEXT, b'a'),
        if_words("one two  three"),
        if_mixed((3, 10), 5u128 << 64 | 1, &Square(4)),
        if_tail(b"xyz").to_vec(),
    )
}

#[test]
fn ifuncs_pass_and_return_two_words() {
    let want = (8, 3, 7 + 5 + 16, b"yz".to_vec());
    assert_eq!(ifunc_calls(), want);
    // Stubs and call sites made direct, live: the same words arrive.
    altpatch::ifunc::init().unwrap();
    assert!(if_mixed::ifunc().is_applied());
    assert_eq!(ifunc_calls(), want);
}

// -------------------------------------------------------- static_call!

altpatch::static_call! {
    fn sc_count(bytes: &[u8], needle: u8) -> usize = count;
}
altpatch::static_call! {
    fn sc_pair(p: (u64, u64)) -> (u64, u64) = swap;
}
fn area_high(s: &dyn Shape, x: u128) -> u64 {
    area(s) + high(x)
}

altpatch::static_call! {
    fn sc_area(s: &dyn Shape, x: u128) -> u64 = area_high;
}

#[test]
fn static_calls_pass_and_return_two_words() {
    assert_eq!(sc_count(TEXT, b'n'), 4);
    assert_eq!(sc_pair((1, 2)), (2, 1));
    assert_eq!(sc_area(&Square(3), 2u128 << 64), 11);
    sc_count::update_fn(|b: &[u8], n: u8| b.len() - count(b, n)).unwrap();
    sc_pair::update_fn(|p: (u64, u64)| (p.0 + p.1, p.0 * p.1)).unwrap();
    sc_area::update_fn(|s: &dyn Shape, x: u128| area(s) * 2 + x as u64).unwrap();
    assert_eq!(sc_count(TEXT, b'n'), TEXT.len() - 4);
    assert_eq!(sc_pair((3, 4)), (7, 12));
    assert_eq!(sc_area(&Square(3), 2u128 << 64 | 5), 23);
}

// --------------------------------------------------- alternative_call!

/// An `extern "C"` function taking a slice, called directly: its
/// definition is the user's, so is the lint it draws.
#[allow(improper_ctypes_definitions)]
extern "C" fn count_c(bytes: &[u8], needle: u8) -> usize {
    count(bytes, needle) + 1000
}

#[target_feature(enable = "avx2")]
fn count_avx2(bytes: &[u8], needle: u8) -> usize {
    count(bytes, needle) + 2000
}

#[inline(never)]
fn ac_count(bytes: &[u8], needle: u8) -> usize {
    alternative_call!(fn(&[u8], u8) -> usize; |b, n| count(b, n), [always => count_c]; bytes, needle)
}

#[inline(never)]
fn ac_avx2(bytes: &[u8], needle: u8) -> usize {
    alternative_call!(
        fn(&[u8], u8) -> usize;
        |b, n| count(b, n),
        // SAFETY: patched in only where the CPU has AVX2, the one feature
        // `count_avx2` enables.
        [Avx2 => |b, n| unsafe { count_avx2(b, n) }];
        bytes, needle
    )
}

/// Six registers: `&str` (2), `(u64, u64)` (2), `i8` (1) and `bool` (1).
#[inline(never)]
fn ac_six(s: &str, p: (u64, u64), x: i8, neg: bool) -> i64 {
    alternative_call!(
        name: "two_words::six",
        fn(&str, (u64, u64), i8, bool) -> i64;
        |s: &str, p: (u64, u64), x: i8, neg: bool| {
            let v = words(s) as i64 + span(p) as i64 + x as i64;
            if neg { -v } else { v }
        },
        [always => |s: &str, p: (u64, u64), x: i8, neg: bool| {
            let v = 100 * (words(s) as i64 + span(p) as i64 + x as i64);
            if neg { -v } else { v }
        }];
        s, p, x, neg
    )
}

#[inline(never)]
fn ac_u128(x: u128, y: u64) -> u128 {
    alternative_call!(fn(u128, u64) -> u128; |x, y| x + y as u128, [always => |x, y| x * y as u128]; x, y)
}

#[inline(never)]
fn ac_returns(bytes: &[u8]) -> &[u8] {
    alternative_call!(fn(&[u8]) -> &[u8]; |b| b, [always => tail_shim]; bytes)
}

#[allow(improper_ctypes_definitions)]
extern "C" fn tail_shim(bytes: &[u8]) -> &[u8] {
    tail(bytes)
}

#[inline(never)]
fn ac_pair(p: (u64, u64), s: &dyn Shape) -> (u64, u64) {
    alternative_call!(fn((u64, u64), &dyn Shape) -> (u64, u64); |p, _| p, [always => |p, s: &dyn Shape| (swap(p).0, area(s))]; p, s)
}

#[inline(never)]
fn ac_unit(out: &mut u64, v: &[u64]) {
    alternative_call!(fn(&mut u64, &[u64]); |o: &mut u64, v: &[u64]| *o = v.iter().sum(), [always => |o: &mut u64, v: &[u64]| *o = v.iter().product()]; out, v)
}

#[test]
fn alternative_calls_pass_and_return_two_words() {
    // Until patched: every default.
    assert_eq!(ac_count(TEXT, b'a'), 8);
    assert_eq!(ac_avx2(TEXT, b'a'), 8);
    assert_eq!(ac_six("a b c", (10, 15), -3, false), 5);
    assert_eq!(ac_six("a b c", (10, 15), -100, true), 92);
    assert_eq!(ac_u128(u128::MAX - 5, 5), u128::MAX);
    assert_eq!(ac_returns(b"xyz"), b"xyz");
    assert_eq!(ac_pair((1, 2), &Square(5)), (1, 2));
    let mut out = 0;
    ac_unit(&mut out, &[2, 3, 4]);
    assert_eq!(out, 9);

    let features = Features::detect();
    let mut poke = LinuxPoke::running().unwrap();
    // SAFETY: the poke publishes by page swap, safe while other threads
    // run; only this test runs these sites.
    unsafe { altpatch::alternative::apply(&Image::current(), &features, &mut poke) }.unwrap();

    assert_eq!(ac_count(TEXT, b'a'), 1008);
    let avx2 = if features.has(Feature::Avx2) { 2008 } else { 8 };
    assert_eq!(ac_avx2(TEXT, b'a'), avx2);
    assert_eq!(ac_six("a b c", (10, 15), -3, false), 500);
    assert_eq!(ac_six("a b c", (10, 15), -100, true), 9200);
    assert_eq!(ac_u128(1 << 100, 3), 3 << 100);
    assert_eq!(ac_returns(b"xyz"), b"yz");
    assert_eq!(ac_pair((1, 2), &Square(5)), (2, 25));
    ac_unit(&mut out, &[2, 3, 4]);
    assert_eq!(out, 24);

    // The site is a direct call to the chosen function itself.
    let at = Image::current().patch_point("two_words::six").unwrap();
    let b = altpatch::x86::rel_branch(&read(at, 5), at as u64).unwrap();
    assert_eq!(b.kind, altpatch::x86::BranchKind::Call);
    let count_c = count_c as extern "C" fn(&[u8], u8) -> usize as *const () as usize;
    let sites: Vec<usize> = Image::current()
        .alternatives()
        .iter()
        .map(|r| r.site())
        .filter(|&s| {
            altpatch::x86::rel_branch(&read(s, 5), s as u64)
                .is_some_and(|b| b.target as usize == count_c)
        })
        .collect();
    assert_eq!(sites.len(), 1, "ac_count's site calls count_c directly");
}

fn read(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: addresses of this binary's text, which stays mapped.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}
