//! CET in a process. Every entry the crate hands out starts with `endbr64`
//! (trampolines, ifunc stubs, closure trampolines); and under a user
//! shadow stack the INT3 protocol's `SIGTRAP` handler never emulates a
//! `call`: it waits and restarts the site.
//!
//! This machine has no CET, so the shadow-stack path runs under
//! `force_shadow_stack_for_tests(true)`, in child processes (the mode and
//! the live publication are process-wide): four threads call through 1000
//! static-call sites while another re-targets them; every trap at a call
//! site is restarted, none emulated, every result is right, and the run
//! ends (a watchdog aborts a hang). The same run without the forced mode
//! emulates them, so the counts tell the two paths apart. Static-key sites
//! (`jmp` / NOP) are still emulated under the forced mode.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use altpatch::os::linux::{
    emulated_traps, force_shadow_stack_for_tests, restarted_traps, set_live_publication,
    shadow_stack_enabled,
};
use altpatch::static_key::StaticFalseKey;
use altpatch::trampoline::Closure;
use altpatch::x86::ENDBR64;
use altpatch::{Publish, static_branch_unlikely, static_call};

extern "C" fn plus1(x: u64) -> u64 {
    x + 1
}

extern "C" fn plus2(x: u64) -> u64 {
    x + 2
}

static_call! {
    fn sc_cet(x: u64) -> u64 = plus1;
}

altpatch::ifunc! {
    fn if_cet(x: u64) -> u64 = pick;
}

fn pick(_: &altpatch::cpu::Features) -> extern "C" fn(u64) -> u64 {
    plus2
}

static K_CET: StaticFalseKey = StaticFalseKey::new();

macro_rules! rep10 {
    ($($t:tt)*) => {
        $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*;
    };
}

/// 1000 distinct call sites of the static call: counts results from the
/// new target (`x + 2`) and from neither.
#[inline(never)]
fn thousand_calls(x: u64, new: &mut u64, bad: &mut u64) {
    rep10!(rep10!(rep10!({
        let r = sc_cet(x);
        if r == x + 2 {
            *new += 1;
        } else if r != x + 1 {
            *bad += 1;
        }
    })));
}

/// 1000 distinct sites of the key.
#[inline(never)]
fn thousand_branches(hits: &mut u64) {
    rep10!(rep10!(rep10!({
        if static_branch_unlikely!(K_CET) {
            *hits += 1;
        }
    })));
}

fn read(addr: usize, len: usize) -> Vec<u8> {
    common::read(addr, len)
}

/// Every code address the crate hands out that may be called indirectly
/// starts with `endbr64`: a static-call trampoline, an ifunc stub (before
/// and after they are updated) and a closure trampoline.
#[test]
fn every_indirect_entry_starts_with_endbr64() {
    let tramp = sc_cet::static_call().trampoline();
    let stub = if_cet::ifunc().stub();
    let closure = Closure::<unsafe extern "C" fn(u64) -> u64>::new(|x| x * 7).unwrap();
    let entries = [tramp, stub, closure.as_ptr() as usize];
    for at in entries {
        assert_eq!(read(at, 4), ENDBR64, "{at:#x}");
    }
    // Called indirectly, through the address itself.
    // SAFETY: each address is a C-ABI fn(u64) -> u64.
    let call = |at: usize| unsafe { std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(at) };
    assert_eq!(call(tramp)(1), 2);
    assert_eq!(call(stub)(1), 3);
    assert_eq!(call(closure.as_ptr() as usize)(1), 7);
}

const CALLERS: usize = 4;
const MIN_UPDATES: usize = 200;
const MAX_UPDATES: usize = 5000;
const BUDGET: Duration = Duration::from_secs(6);

/// Aborts the process if the test is still running after `limit`: a
/// handler that waited forever would otherwise hang the run.
fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("HANG: still running after {limit:?}");
        std::process::abort();
    });
}

/// Callers run `work` in a loop while `update` runs at least
/// `MIN_UPDATES` times (more while the budget lasts). Returns the
/// updates done, and the traps emulated and restarted meanwhile.
fn storm(work: fn(u64) -> (u64, u64), mut update: impl FnMut(usize)) -> (usize, usize, usize) {
    let (emulated, restarted) = (emulated_traps(), restarted_traps());
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut seen, mut bad, mut rounds) = (0, 0, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let (s, b) = work(1000 + i as u64);
                    seen += s;
                    bad += b;
                    rounds += 1;
                }
                assert_eq!(bad, 0, "caller {i}: results from neither target");
                assert!(
                    seen > 0,
                    "caller {i} never observed an update ({rounds} rounds)"
                );
            })
        })
        .collect();
    let start = Instant::now();
    let mut done = 0;
    while done < MAX_UPDATES && (done < MIN_UPDATES || start.elapsed() < BUDGET) {
        update(done);
        done += 1;
    }
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().expect("a caller thread failed");
    }
    (
        done,
        emulated_traps() - emulated,
        restarted_traps() - restarted,
    )
}

/// Runs `update`, again if it was refused because a thread had `SIGTRAP`
/// blocked at that instant: a caller still inside the handler (which runs
/// with every signal blocked), preempted there on a loaded machine for
/// longer than the poke's check waits. Nothing was written then. A thread
/// stuck in the handler would fail every retry (and hang the join: the
/// watchdog).
fn retry_refusals(mut update: impl FnMut() -> Result<(), altpatch::Error>) {
    for attempt in 0.. {
        match update() {
            Ok(()) => return,
            Err(e) if attempt < 20 && e.to_string().contains("blocks SIGTRAP") => {
                REFUSALS.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("{e}"),
        }
    }
}

static REFUSALS: AtomicUsize = AtomicUsize::new(0);

fn calls(x: u64) -> (u64, u64) {
    let (mut new, mut bad) = (0, 0);
    thousand_calls(x, &mut new, &mut bad);
    (new, bad)
}

fn branches(_: u64) -> (u64, u64) {
    let mut hits = 0;
    thousand_branches(&mut hits);
    (hits, 0)
}

/// Re-targets the static call under calling threads with the INT3
/// protocol; returns (updates, emulated, restarted).
fn call_storm() -> (usize, usize, usize) {
    set_live_publication(Publish::Live).unwrap();
    assert!(sc_cet::static_call().site_count() >= 1000);
    // Inline the sites before any caller runs: from now on the callers run
    // only call sites (never the trampoline, whose `jmp` an update also
    // rewrites), so every trap below is at a `call`.
    let r = sc_cet::update(plus1).unwrap();
    assert_eq!(r.inlined, sc_cet::static_call().site_count());
    let out = storm(calls, |i| {
        let target = if i % 2 == 0 { plus2 } else { plus1 };
        retry_refusals(|| {
            sc_cet::update(target)
                .map(drop)
                .map_err(altpatch::Error::from)
        });
    });
    sc_cet::update(plus1).unwrap();
    assert_eq!(sc_cet(5), 6);
    out
}

#[test]
#[ignore = "run in a child process by forced_shadow_stack_restarts_calls_and_emulates_branches"]
fn forced_shadow_stack_child() {
    watchdog(Duration::from_secs(240));
    force_shadow_stack_for_tests(true);
    assert!(shadow_stack_enabled());
    let (done, emulated, restarted) = call_storm();
    eprintln!(
        "calls: {done} updates, {emulated} traps emulated, {restarted} restarted, {} refusals",
        REFUSALS.load(Ordering::Relaxed)
    );
    assert_eq!(emulated, 0, "a call site was emulated under a shadow stack");
    assert!(
        restarted > 0,
        "no caller hit a call site mid-update in {done} updates"
    );
    // Static-key sites (jmp <-> NOP) touch no stack: still emulated.
    let (done, emulated, _) = storm(branches, |_| {
        retry_refusals(|| K_CET.toggle().map(drop).map_err(altpatch::Error::from));
    });
    eprintln!(
        "branches: {done} flips, {emulated} traps emulated; {} refusals in all",
        REFUSALS.load(Ordering::Relaxed)
    );
    assert!(emulated > 0, "no key site emulated in {done} flips");
    if K_CET.is_enabled() {
        K_CET.toggle().unwrap();
    }
    println!("CET-FORCED-OK");
}

#[test]
#[ignore = "run in a child process by forced_shadow_stack_restarts_calls_and_emulates_branches"]
fn no_shadow_stack_child() {
    watchdog(Duration::from_secs(240));
    assert!(!shadow_stack_enabled(), "this machine has a shadow stack");
    let (done, emulated, restarted) = call_storm();
    eprintln!("calls: {done} updates, {emulated} traps emulated, {restarted} restarted");
    assert!(emulated > 0, "no call site emulated in {done} updates");
    println!("CET-OFF-OK");
}

/// The same storm of call-site updates, with the shadow stack forced on
/// (restarted, never emulated) and off (emulated).
#[test]
fn forced_shadow_stack_restarts_calls_and_emulates_branches() {
    if shadow_stack_enabled() {
        eprintln!(
            "skipped: this machine runs with a real shadow stack (the forced mode is for machines without)"
        );
        return;
    }
    let (ok, out) = common::run_child_test("forced_shadow_stack_child", &[]);
    assert!(ok && out.contains("CET-FORCED-OK"), "child failed:\n{out}");
    let (ok, out) = common::run_child_test("no_shadow_stack_child", &[]);
    assert!(ok && out.contains("CET-OFF-OK"), "child failed:\n{out}");
}

/// The status query answers plainly on any machine, and the forced mode
/// only adds to it.
#[test]
fn shadow_stack_status_is_a_plain_answer() {
    let real = shadow_stack_enabled();
    // This machine (and CI's) has no CET: the kernel says so.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.contains(" user_shstk") {
        assert!(!real);
    }
}
