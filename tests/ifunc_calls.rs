//! The calls `ifunc!`'s function records in its callers (`ifunc/call.rs`):
//! a direct `call <stub>` with a record wherever the C ABI passes the
//! arguments and the result in integer registers, rewritten to `call
//! <impl>` with no relocation; rustc's own call for other signatures.

use altpatch::cpu::Features;

fn sum_portable(v: &[u64]) -> u64 {
    v.iter().sum()
}

altpatch::ifunc! {
    fn sum(v: &[u64]) -> u64 = |_| sum::c_fn(sum_portable);
}

altpatch::ifunc! {
    fn halve(x: f64) -> f64 = |_| halve::c_fn(|x: f64| x / 2.0);
}

fn seven(a: &[u8], b: &[u8], c: &[u8], d: u8) -> usize {
    a.len() + b.len() + c.len() + d as usize
}

altpatch::ifunc! {
    // Seven registers' worth of arguments: rustc's own call.
    fn wide(a: &[u8], b: &[u8], c: &[u8], d: u8) -> usize = |_| wide::c_fn(seven);
}

altpatch::ifunc! {
    // No result, three words: `rdx` carries an argument in.
    fn store(at: &mut [u64], value: u64) = |_| store::c_fn(|at: &mut [u64], v: u64| at.fill(v));
}

#[inline(never)]
fn sum_caller(v: &[u64]) -> u64 {
    sum(v)
}

/// The target of the `call rel32` at `at`, if it is one.
fn call_target(at: usize) -> Option<usize> {
    // SAFETY: a recorded call: 5 bytes of this program's text.
    let b = unsafe { std::slice::from_raw_parts(at as *const u8, 5) };
    let rel = i32::from_le_bytes(b[1..5].try_into().unwrap());
    (b[0] == 0xe8).then(|| (at + 5).wrapping_add(rel as isize as usize))
}

#[test]
fn recorded_calls_become_direct_calls_of_the_implementation() {
    let v = [1u64, 2, 3, 4];
    assert_eq!(sum_caller(&v), 10);
    let sites = sum::ifunc().recorded_calls();
    assert!(!sites.is_empty(), "no recorded call of sum");
    let stub = sum::ifunc().stub();
    let chosen = sum::resolve_with(&Features::detect()) as usize;
    // Before `init`: each calls the stub, or the implementation if the
    // program was patched at load (start-up on).
    for &s in &sites {
        let to = call_target(s);
        assert!(to == Some(stub) || to == Some(chosen), "{s:#x}: {to:x?}");
    }
    let report = altpatch::ifunc::init().expect("init");
    assert!(sum::ifunc().is_applied(), "{report}");
    for &s in &sites {
        assert_eq!(call_target(s), Some(chosen), "recorded call at {s:#x}");
    }
    assert_eq!(sum_caller(&v), 10);
    assert_eq!(sum(&[5, 6]), 11);

    // Two-register results and arguments past `rdx`, no result.
    let mut buf = [0u64; 3];
    store(&mut buf, 9);
    assert_eq!(buf, [9; 3]);
    assert!(!store::ifunc().recorded_calls().is_empty());
    for s in store::ifunc().recorded_calls() {
        assert_eq!(call_target(s), Some(store::resolved().unwrap() as usize));
    }
}

#[test]
fn other_signatures_keep_rustcs_call_and_work() {
    assert_eq!(halve(3.0), 1.5);
    assert!(
        halve::ifunc().recorded_calls().is_empty(),
        "a float ifunc recorded a call"
    );
    let x = [1u8, 2];
    // (Unoptimized builds may keep the recorded forms in the branch not
    // taken: unreachable `call <stub>`s, rewritten harmlessly.)
    assert_eq!(wide(&x, &x, &x, 1), 7);
}
