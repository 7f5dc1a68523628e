//! The Linux text poke: W^X at every instant, MDWE, other threads running
//! through the text while it is patched, fork.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use altpatch::{Edit, LinuxPoke, Plan, Publish, patch_point};
use common::*;

/// A flip between all-NOP5 and all-jmp over the given pad's sites.
fn flip_plan(pad: Pad, every: usize) -> Plan {
    let mut plan = Plan::for_image(&image());
    for i in (0..UNITS).step_by(every) {
        plan.push(Edit::replace(pad.site(i), &NOP5, &JMP0).site(format!("s{i}")));
    }
    plan
}

/// Parses `/proc/self/maps` into (start, end, perms).
fn maps() -> Vec<(usize, usize, String)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_ascii_whitespace();
            let (a, b) = it.next()?.split_once('-')?;
            let perms = it.next()?.to_string();
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
                perms,
            ))
        })
        .collect()
}

/// Writable shared mappings of a file that is also mapped executable.
fn writable_aliases() -> Vec<String> {
    let lines = std::fs::read_to_string("/proc/self/maps").unwrap();
    let field = |l: &str, i: usize| l.split_ascii_whitespace().nth(i).unwrap_or("").to_string();
    let exec: Vec<(String, String)> = lines
        .lines()
        .filter(|l| field(l, 1).as_bytes().get(2) == Some(&b'x') && field(l, 4) != "0")
        .map(|l| (field(l, 3), field(l, 4)))
        .collect();
    lines
        .lines()
        .filter(|l| {
            let p = field(l, 1);
            p.starts_with("rw") && p.ends_with('s') && exec.contains(&(field(l, 3), field(l, 4)))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn never_writable_and_executable_never_non_executable() {
    let pad = PAD_A;
    let pad_range = pad.base()..pad.base() + UNITS * UNIT;
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, samples, pad_range) = (stop.clone(), samples.clone(), pad_range.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for (a, b, perms) in maps() {
                    let p = perms.as_bytes();
                    if p[1] == b'w' && p[2] == b'x' {
                        bad.push(format!("{a:x}-{b:x} {perms} is writable and executable"));
                    }
                    if a < pad_range.end && pad_range.start < b && p[2] != b'x' {
                        bad.push(format!("{a:x}-{b:x} {perms}: pad text not executable"));
                    }
                }
                samples.fetch_add(1, Ordering::Relaxed);
            }
            bad
        })
    };
    let mut plan = flip_plan(pad, 7);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut rounds = 0;
    let strategies = usable_strategies();
    while rounds < 60 || (Instant::now() < deadline && rounds < 400) {
        // Every strategy, each with both publications.
        let s = strategies[(rounds / 2) % strategies.len()];
        let publish = if rounds % 2 == 0 {
            Publish::InPlace
        } else {
            Publish::Remap
        };
        let mut poke = LinuxPoke::with_strategy(publish, s).unwrap();
        // SAFETY: NOP5 <-> jmp-next, one instruction each; nothing runs the
        // pad while the sampler runs.
        unsafe { plan.apply(&mut poke) }.unwrap();
        // Between batches no writable view of the pad exists (during a batch
        // an alias strategy opens one).
        let w = writable_aliases();
        assert!(w.is_empty(), "{s:?} {publish:?}: {w:#?}");
        // SAFETY: as above.
        unsafe { plan.undo(&mut poke) }.unwrap();
        rounds += 1;
    }
    LinuxPoke::release_aliases();
    stop.store(true, Ordering::Relaxed);
    let bad = sampler.join().unwrap();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(samples.load(Ordering::Relaxed) > 10, "sampler barely ran");
    assert_eq!(pad.call(), 42);
    assert!(
        maps()
            .iter()
            .any(|(a, b, p)| *a <= pad.base() && pad.base() < *b && p.starts_with("r-x")),
        "pad not mapped r-x"
    );
}

#[inline(never)]
fn racing_value() -> u32 {
    let r: u32;
    // SAFETY: only moves an immediate into `r`.
    unsafe { core::arch::asm!(patch_point!("poke_racing_value"), "mov {0:e}, 100", out(reg) r) };
    r
}

#[test]
fn threads_running_through_text_see_old_or_new() {
    let image = image();
    let at = image.patch_point("poke_racing_value").unwrap();
    let old = read(at, 5);
    let mut new = old.clone();
    new[1..5].copy_from_slice(&200u32.to_le_bytes());
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(at, &old, &new).site("racing_value"));

    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let f = std::hint::black_box(racing_value as fn() -> u32);
                let (mut old, mut new) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match f() {
                        100 => old += 1,
                        200 => new += 1,
                        v => panic!("torn instruction: got {v}"),
                    }
                }
                (old, new)
            })
        })
        .collect();
    // Remap publication: each page changes atomically under running threads.
    let mut poke = LinuxPoke::remapping().unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut flips = 0;
    while flips < 200 || (Instant::now() < deadline && flips < 5000) {
        // SAFETY: one `mov` replaced by one `mov` of the same length, so a
        // thread is never inside a changed instruction; the remap is atomic.
        unsafe { plan.apply(&mut poke) }.unwrap();
        // SAFETY: as above.
        unsafe { plan.undo(&mut poke) }.unwrap();
        flips += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen_new = 0;
    for c in callers {
        let (_, new) = c.join().unwrap();
        seen_new += new;
    }
    eprintln!("{flips} flips; callers saw the new value {seen_new} times");
    assert_eq!(racing_value(), 100);
}

#[inline(never)]
fn mdwe_value() -> u32 {
    let r: u32;
    // SAFETY: only moves an immediate into `r`.
    unsafe { core::arch::asm!(patch_point!("poke_mdwe_value"), "mov {0:e}, 7", out(reg) r) };
    r
}

const PR_SET_MDWE: libc::c_int = 65;
const PR_GET_MDWE: libc::c_int = 66;
const PR_MDWE_REFUSE_EXEC_GAIN: libc::c_ulong = 1;

/// Runs in a child process (see `patching_works_under_mdwe`).
#[test]
#[ignore = "run in a child process by patching_works_under_mdwe"]
fn mdwe_child() {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_MDWE: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    assert_eq!(unsafe { libc::prctl(PR_GET_MDWE, 0, 0, 0, 0) }, 1);
    // MDWE is really on: gaining exec on anonymous memory is refused.
    // SAFETY: a fresh anonymous mapping we own.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_ne!(
            libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
        libc::munmap(p, 4096);
    }

    let image = image();
    let at = image.patch_point("poke_mdwe_value").unwrap();
    let old = read(at, 5);
    let mut new = old.clone();
    new[1..5].copy_from_slice(&8u32.to_le_bytes());
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(at, &old, &new).site("mdwe_value"));
    let mut flips = flip_plan(PAD_B, 3);
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: one mov by one mov; single-threaded here.
    unsafe { plan.apply(&mut poke) }.unwrap();
    assert_eq!(std::hint::black_box(mdwe_value as fn() -> u32)(), 8);
    // SAFETY: NOP5 <-> jmp-next.
    unsafe { flips.apply(&mut poke) }.unwrap();
    assert_eq!(PAD_B.call(), 42);
    // Remap publication works under MDWE too.
    let mut remap = LinuxPoke::remapping().unwrap();
    // SAFETY: as above.
    unsafe { flips.undo(&mut remap) }.unwrap();
    assert_eq!(PAD_B.call(), 42);
    assert_eq!(read(PAD_B.site(0), 5), NOP5);
    // SAFETY: as above.
    unsafe { plan.undo(&mut poke) }.unwrap();
    assert_eq!(std::hint::black_box(mdwe_value as fn() -> u32)(), 7);
    println!("MDWE-CHILD-OK");
}

#[test]
fn patching_works_under_mdwe() {
    for s in usable_strategies() {
        let (ok, out) = run_child_test("mdwe_child", &[("ALTPATCH_POKE", s.name())]);
        assert!(
            ok && out.contains("MDWE-CHILD-OK"),
            "child ({s:?}) failed:\n{out}"
        );
    }
}

#[inline(never)]
fn fork_value() -> u32 {
    let r: u32;
    // SAFETY: only moves an immediate into `r`.
    unsafe { core::arch::asm!(patch_point!("poke_fork_value"), "mov {0:e}, 1", out(reg) r) };
    r
}

fn set_fork_value(poke: &mut LinuxPoke, from: u32, to: u32) {
    let image = image();
    let at = image.patch_point("poke_fork_value").unwrap();
    let mut old = read(at, 5);
    old[1..5].copy_from_slice(&from.to_le_bytes());
    let mut new = old.clone();
    new[1..5].copy_from_slice(&to.to_le_bytes());
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(at, &old, &new));
    // SAFETY: one mov by one mov; the process is single-threaded here.
    unsafe { plan.apply(poke) }.unwrap();
}

/// Runs in a (single-threaded) child process (see `fork_does_not_share_patches`).
#[test]
#[ignore = "run in a child process by fork_does_not_share_patches"]
fn fork_child() {
    let f = std::hint::black_box(fork_value as fn() -> u32);
    let mut poke = LinuxPoke::new().unwrap();
    set_fork_value(&mut poke, 1, 2); // page now patched (a private copy, or memfd-backed)
    assert_eq!(f(), 2);
    let (mut to_child, mut from_child) = ([0; 2], [0; 2]);
    // SAFETY: creating pipes.
    unsafe {
        assert_eq!(libc::pipe(to_child.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(from_child.as_mut_ptr()), 0);
    }
    // SAFETY: the process has one thread; the child only patches, reads and
    // writes pipes, then exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    let mut byte = [0u8; 1];
    if pid == 0 {
        // Child: patch its own copy, tell the parent, wait, check it kept it.
        // SAFETY: closing the ends the child does not use, so the parent
        // sees EOF if the child dies.
        unsafe {
            libc::close(to_child[1]);
            libc::close(from_child[0]);
        }
        let mut poke = LinuxPoke::new().unwrap();
        set_fork_value(&mut poke, 2, 3);
        let ok1 = f() == 3;
        // SAFETY: pipe I/O on our descriptors.
        unsafe {
            libc::write(from_child[1], b"x".as_ptr().cast(), 1);
            libc::read(to_child[0], byte.as_mut_ptr().cast(), 1);
        }
        let ok2 = f() == 3;
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if ok1 && ok2 { 0 } else { 1 }) };
    }
    // SAFETY: closing the parent's unused ends, then pipe I/O on ours.
    let got = unsafe {
        libc::close(to_child[0]);
        libc::close(from_child[1]);
        libc::read(from_child[0], byte.as_mut_ptr().cast(), 1)
    };
    assert_eq!(got, 1, "the child died before patching");
    assert_eq!(f(), 2, "the child's patch leaked into the parent");
    set_fork_value(&mut poke, 2, 4);
    assert_eq!(f(), 4);
    // SAFETY: pipe I/O, then reaping our child.
    let status = unsafe {
        libc::write(to_child[1], b"x".as_ptr().cast(), 1);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        status
    };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child saw the parent's patch or failed to patch (status {status:#x})"
    );
    println!("FORK-CHILD-OK");
}

#[test]
fn fork_does_not_share_patches() {
    for s in usable_strategies() {
        let (ok, out) = run_child_test("fork_child", &[("ALTPATCH_POKE", s.name())]);
        assert!(
            ok && out.contains("FORK-CHILD-OK"),
            "child ({s:?}) failed:\n{out}"
        );
    }
}

/// An in-place store that fails halfway (a partial `pwrite`, injected)
/// leaves no site half written: the batch puts back every byte it changed
/// before it returns, and the plan reports the error with the text as it
/// was. Without the fault, the same plan applies.
#[test]
fn a_failed_in_place_store_puts_back_every_byte() {
    let pad = PAD_D;
    let before = pad.snapshot();
    let mut plan = flip_plan(pad, 1);
    let mut poke = LinuxPoke::new().unwrap();
    altpatch::os::linux::fail_in_place_store_for_tests(Some(pad.site(UNITS / 2)));
    // SAFETY: NOP5 and `jmp` to the next instruction behave alike; no other
    // test runs this pad.
    let err = unsafe { plan.apply(&mut poke) };
    altpatch::os::linux::fail_in_place_store_for_tests(None);
    let err = err.unwrap_err();
    assert!(err.to_string().contains("injected for tests"), "{err}");
    assert_eq!(pad.snapshot(), before, "text is as it was");
    assert_eq!(pad.call(), 42);
    // SAFETY: as above.
    unsafe { plan.apply(&mut poke) }.unwrap();
    assert!((0..UNITS).all(|i| read(pad.site(i), 5) == JMP0));
    assert_eq!(pad.call(), 42);
}

#[test]
fn non_text_is_refused_by_the_poke() {
    use altpatch::{PokeError, TextPoke};
    // Writable data: the poke refuses to treat it as text even if a plan
    // were built with bounds that include it.
    let data = vec![0u8; 8192];
    let page = (data.as_ptr() as usize + 4095) & !4095;
    let mut poke = LinuxPoke::new().unwrap();
    let err = poke
        .begin(std::slice::from_ref(&(page..page + 4096)))
        .unwrap_err();
    assert!(matches!(err, PokeError::NotText { .. }), "{err}");
    // The lock was released: another batch can start.
    let pad = PAD_C.base() & !4095;
    poke.begin(std::slice::from_ref(&(pad..pad + 4096)))
        .unwrap();
    poke.abort();
}
