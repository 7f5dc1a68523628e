//! Live updates under load: threads call through 1000 distinct static-call
//! sites and 1000 static-branch sites while another thread re-targets the
//! call and flips the key 10 000 times each — with the default publication
//! (page swap), and in a child with the INT3 protocol. No crash, every result
//! from the old or the new target, every caller observed the new target and
//! the enabled branch, no writable and executable mapping at any sampled
//! instant; and all of it again in a child process under `PR_SET_MDWE`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use altpatch::static_key::StaticFalseKey;
use altpatch::{static_branch_unlikely, static_call};

extern "C" fn plus1(x: u64) -> u64 {
    x + 1
}

extern "C" fn plus2(x: u64) -> u64 {
    x + 2
}

static_call! {
    fn sc_stress(x: u64) -> u64 = plus1;
}

static K_STRESS: StaticFalseKey = StaticFalseKey::new();

macro_rules! rep10 {
    ($($t:tt)*) => {
        $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*;
    };
}

/// 1000 distinct call sites of the static call. Counts results from the new
/// target (`x + 2`) and results from neither target.
#[inline(never)]
fn thousand_calls(x: u64, new: &mut u64, bad: &mut u64) {
    rep10!(rep10!(rep10!({
        let r = sc_stress(x);
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
        if static_branch_unlikely!(K_STRESS) {
            *hits += 1;
        }
    })));
}

const CALLERS: usize = 4;
/// Updates per run: at most this many, fewer once `BUDGET` is spent (the
/// machines are shared and have two cores), never fewer than `MIN_UPDATES`.
const UPDATES: usize = 10_000;
const MIN_UPDATES: usize = 300;
const BUDGET: Duration = Duration::from_secs(10);

/// The stress runs of this binary, one at a time (each saturates the cores).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// W^X sampler: returns every `/proc/self/maps` line seen writable and
/// executable, and how many samples it took.
fn sampler(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, u64)> {
    std::thread::spawn(move || {
        let (mut bad, mut n) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            for l in maps.lines() {
                let perms = l.split_whitespace().nth(1).unwrap_or("");
                if perms.as_bytes().get(1) == Some(&b'w') && perms.as_bytes().get(2) == Some(&b'x')
                {
                    bad.push(l.to_string());
                }
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        (bad, n)
    })
}

fn stress() {
    // The generated sites, plus the check at the end of this function.
    let sites = sc_stress::static_call().site_count();
    assert!(sites >= 1000, "{sites} call sites");
    assert!(
        K_STRESS.site_count() >= 1000,
        "{} branch sites",
        K_STRESS.site_count()
    );
    let traps_before = altpatch::os::linux::emulated_traps();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let (mut new, mut bad, mut hits, mut rounds) = (0u64, 0u64, 0u64, 0u64);
                let x = 1000 + i as u64;
                while !stop.load(Ordering::Relaxed) {
                    thousand_calls(x, &mut new, &mut bad);
                    thousand_branches(&mut hits);
                    rounds += 1;
                }
                calls.fetch_add(rounds * 1000, Ordering::Relaxed);
                // Each caller must have run the new code, not merely
                // survived: results from the new target, the taken branch.
                assert!(
                    new > 0 && hits > 0,
                    "caller {i} never observed an update ({rounds} rounds)"
                );
                (new, bad, hits)
            })
        })
        .collect();
    let samples = sampler(stop.clone());

    let start = Instant::now();
    let watchdog = Duration::from_secs(600);
    let mut done = 0;
    while done < UPDATES && (done < MIN_UPDATES || start.elapsed() < BUDGET) {
        let target = if done % 2 == 0 { plus2 } else { plus1 };
        let r = sc_stress::update(target).unwrap();
        assert_eq!(r.inlined, sites);
        K_STRESS.toggle().unwrap();
        assert!(
            start.elapsed() < watchdog,
            "stress run exceeded {watchdog:?}"
        );
        done += 1;
    }
    let took = start.elapsed();
    // Let every caller run at least once more after the last update.
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let (mut new, mut bad, mut hits) = (0, 0, 0);
    for c in callers {
        let (n, b, h) = c.join().expect("a caller thread crashed");
        new += n;
        bad += b;
        hits += h;
    }
    let (wx, nsamples) = samples.join().unwrap();
    let traps = altpatch::os::linux::emulated_traps() - traps_before;
    eprintln!(
        "{done} re-targets + {done} key flips of 1000 sites each in {took:?} ({:?}); \
         {} calls ({new} to the new target), {hits} branch hits, {traps} traps emulated, \
         {nsamples} maps samples",
        altpatch::os::linux::live_publication(),
        calls.load(Ordering::Relaxed)
    );
    assert_eq!(bad, 0, "results from neither target");
    if altpatch::os::linux::live_publication() == altpatch::Publish::Remap {
        assert_eq!(traps, 0, "the page swap takes no trap");
    } else {
        assert!(
            traps > 0,
            "the INT3 protocol emulated nothing: no caller ran a site mid-update"
        );
    }
    assert!(wx.is_empty(), "writable+executable mappings: {wx:#?}");
    assert!(nsamples > 0);
    // Back where we started after an even number of flips and re-targets.
    if done % 2 == 1 {
        sc_stress::update(plus1).unwrap();
        K_STRESS.toggle().unwrap();
    }
    assert!(!K_STRESS.is_enabled());
    assert_eq!(sc_stress(5), 6);
}

/// The whole stress run, in this process, with the default publication.
#[test]
fn stress_calls_and_keys_under_load() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    stress();
}

/// Runs in a child process (see `stress_with_the_int3_protocol`).
#[test]
#[ignore = "run in a child process by stress_with_the_int3_protocol"]
fn int3_stress_child() {
    altpatch::os::linux::set_live_publication(altpatch::Publish::Live).unwrap();
    stress();
    println!("INT3-STRESS-OK");
}

#[test]
fn stress_with_the_int3_protocol() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Through /proc/self/mem, in place: the text stays the binary's.
    let env: &[(&str, &str)] = &[];
    let (ok, out) = common::run_child_test("int3_stress_child", env);
    assert!(ok && out.contains("INT3-STRESS-OK"), "child failed:\n{out}");
}

/// Runs in a child process (see `stress_under_mdwe`).
#[test]
#[ignore = "run in a child process by stress_under_mdwe"]
fn mdwe_stress_child() {
    const PR_SET_MDWE: libc::c_int = 65;
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(PR_SET_MDWE, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_MDWE: {}", std::io::Error::last_os_error());
    stress();
    println!("MDWE-STRESS-OK");
}

#[test]
fn stress_under_mdwe() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, out) = common::run_child_test("mdwe_stress_child", &[]);
    assert!(ok && out.contains("MDWE-STRESS-OK"), "child failed:\n{out}");
}
