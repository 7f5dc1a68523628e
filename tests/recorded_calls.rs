//! The calls `ifunc!`'s and `static_call!`'s functions record in their
//! callers (`static_call/recorded.rs`): a direct `call <stub>` with a
//! record wherever the C ABI passes the arguments and the result in
//! registers (integers, pointers and slices in general-purpose ones, up to
//! four `f32`/`f64` in SSE ones), rewritten with no relocation (`call
//! <impl>` by an ifunc's `init`, `call <target>` by a static call's
//! update, live); rustc's own call for other signatures.

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

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

altpatch::ifunc! {
    // Integer arguments, a float result (`xmm0`).
    fn dot(a: &[f32], b: &[f32]) -> f32 = |_| dot::c_fn(dot_portable);
}

fn mix_portable(k: f32, v: &[f64], scale: f64, bias: i32, last: f32) -> f64 {
    v.iter().sum::<f64>() * scale * f64::from(k) + f64::from(bias) + f64::from(last)
}

altpatch::ifunc! {
    // Both classes interleaved: `k`, `scale`, `last` in xmm0-2, `v` and
    // `bias` in rdi, rsi, rdx.
    fn mix(k: f32, v: &[f64], scale: f64, bias: i32, last: f32) -> f64 =
        |_| mix::c_fn(mix_portable);
}

fn five_portable(a: f64, b: f64, c: f64, d: f64, e: f64) -> f64 {
    a + 2.0 * b + 3.0 * c + 4.0 * d + 5.0 * e
}

altpatch::ifunc! {
    // Five floats, one more than a recorded call passes: rustc's call.
    fn five(a: f64, b: f64, c: f64, d: f64, e: f64) -> f64 =
        |_| five::c_fn(five_portable);
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
fn float_signatures_are_recorded_and_pass_each_class_in_its_registers() {
    let a = [1.0f32, 2.0, 3.0];
    let b = [4.0f32, 5.0, 6.0];
    let v = [1.0f64, 2.0, 3.5];
    let check = || {
        assert_eq!(halve(3.0), 1.5);
        assert_eq!(dot(&a, &b), 32.0);
        assert_eq!(mix(2.0, &v, 0.5, -3, 0.25), 6.5 - 3.0 + 0.25);
    };
    check();
    let calls = [
        ("halve", halve::ifunc().recorded_calls()),
        ("dot", dot::ifunc().recorded_calls()),
        ("mix", mix::ifunc().recorded_calls()),
    ];
    for (name, sites) in &calls {
        assert!(!sites.is_empty(), "no recorded call of {name}");
    }
    let report = altpatch::ifunc::init().expect("init");
    let chosen = [
        halve::resolved().map(|f| f as usize),
        dot::resolved().map(|f| f as usize),
        mix::resolved().map(|f| f as usize),
    ];
    for ((name, sites), chosen) in calls.iter().zip(chosen) {
        let chosen = chosen.unwrap_or_else(|| panic!("{name} unresolved: {report}"));
        for &s in sites {
            assert_eq!(call_target(s), Some(chosen), "{name}'s call at {s:#x}");
        }
    }
    // The same results through the direct calls.
    check();
}

#[test]
fn other_signatures_keep_rustcs_call_and_work() {
    assert_eq!(five(1.0, 1.0, 1.0, 1.0, 1.0), 15.0);
    let x = [1u8, 2];
    assert_eq!(wide(&x, &x, &x, 1), 7);
    // Unoptimized builds keep the recorded forms in the branch not taken
    // (unreachable `call <stub>`s, rewritten harmlessly); optimized ones
    // record nothing for these.
    if !cfg!(debug_assertions) {
        assert!(five::ifunc().recorded_calls().is_empty());
        assert!(wide::ifunc().recorded_calls().is_empty());
    }
}

extern "C" fn add_one(a: u64, b: u64) -> u64 {
    a + b + 1
}
extern "C" fn add_two(a: u64, b: u64) -> u64 {
    a + b + 2
}

altpatch::static_call! {
    fn total(a: u64, b: u64) -> u64 = add_one;
}

#[inline(never)]
fn total_caller(v: &[u64]) -> u64 {
    total(v[0] + v[1], v[2])
}

#[test]
fn a_static_calls_recorded_calls_follow_its_updates_while_threads_call_them() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let v = [1u64, 2, 3];
    assert_eq!(total_caller(&v), 7);
    let sites = total::static_call().recorded_calls();
    assert!(!sites.is_empty(), "no recorded call of total");
    let tramp = total::static_call().trampoline();
    for &s in &sites {
        assert_eq!(call_target(s), Some(tramp), "before any update: {s:#x}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let seen_two = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, seen_two) = (stop.clone(), seen_two.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = total_caller(&[1, 2, 3]);
                    assert!(r == 7 || r == 8, "total = {r}");
                    if r == 8 {
                        seen_two.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let report = total::update(add_two).expect("update");
    assert!(report.inlined >= sites.len(), "{report:?}");
    for &s in &sites {
        assert_eq!(
            call_target(s),
            Some(add_two as *const () as usize),
            "after the update: {s:#x}"
        );
    }
    let start = std::time::Instant::now();
    while seen_two.load(Ordering::Relaxed) < 1000 && start.elapsed().as_secs() < 10 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().expect("a caller failed");
    }
    assert!(
        seen_two.load(Ordering::Relaxed) >= 1000,
        "the callers never saw the update"
    );
    assert_eq!(total_caller(&v), 8);
    total::update(add_one).expect("update back");
    for &s in &sites {
        assert_eq!(
            call_target(s),
            Some(add_one as *const () as usize),
            "back: {s:#x}"
        );
    }
    assert_eq!(total_caller(&v), 7);
}

extern "C" fn scale_by(x: f64, k: f32) -> f64 {
    x * f64::from(k)
}
extern "C" fn scale_plus(x: f64, k: f32) -> f64 {
    x + f64::from(k)
}

altpatch::static_call! {
    fn scale(x: f64, k: f32) -> f64 = scale_by;
}

#[test]
fn a_static_call_with_floats_records_its_calls_and_they_follow_updates() {
    assert_eq!(scale(3.0, 2.0), 6.0);
    let sites = scale::static_call().recorded_calls();
    assert!(!sites.is_empty(), "no recorded call of scale");
    scale::update(scale_plus).expect("update");
    for &s in &sites {
        assert_eq!(
            call_target(s),
            Some(scale_plus as *const () as usize),
            "{s:#x}"
        );
    }
    assert_eq!(scale(3.0, 2.0), 5.0);
    scale::update(scale_by).expect("update back");
    assert_eq!(scale(3.0, 2.0), 6.0);
}
