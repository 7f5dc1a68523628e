//! JIT-free trampolines: closures and raw trampolines called from Rust and
//! from C (`qsort`), in every source of code pages, under MDWE and
//! `vm.memfd_noexec=2`, from eight threads at once, with the process's
//! mappings sampled for writable code all along.

use std::collections::HashSet;
use std::ffi::c_void;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use altpatch::trampoline::{Closure, Pool, Source, Trampoline, TrampolineError};

mod common;
#[path = "trampoline/support.rs"]
mod support;
use support::*;

type Cmp = unsafe extern "C" fn(*const c_void, *const c_void) -> i32;

/// A comparator ordering `u32`s by `v ^ key`.
fn by_xor(pool: &Pool, key: u32) -> Closure<'_, Cmp> {
    Closure::new_in(pool, move |a: *const c_void, b: *const c_void| {
        // SAFETY: qsort (and the tests) pass pointers to u32s.
        let (a, b) = unsafe { (*a.cast::<u32>() ^ key, *b.cast::<u32>() ^ key) };
        a.cmp(&b) as i32
    })
    .unwrap()
}

/// Sorts four values with `c` through libc's `qsort`; checks the order.
fn check_qsort(c: &Closure<'_, Cmp>, key: u32) {
    let mut v = [3u32, 0x8000_0001, 7, key];
    // SAFETY: a valid array of four u32s and a comparator for them; `c`
    // outlives the call.
    unsafe { libc::qsort(v.as_mut_ptr().cast(), 4, 4, Some(c.code())) };
    assert!(
        v.windows(2).all(|w| w[0] ^ key <= w[1] ^ key),
        "key {key:#x}: {v:x?}"
    );
}

/// Allocates `n` closures with distinct keys, calls each from Rust and
/// through `qsort`, frees them, and does it again: the second round must
/// reuse the first round's pages.
fn hundred_thousand_in(pool: &Pool, n: usize) {
    let mut pages = 0;
    for round in 0..2 {
        let closures: Vec<_> = (0..n as u32).map(|k| by_xor(pool, k)).collect();
        let codes: HashSet<usize> = closures.iter().map(|c| c.as_ptr() as usize).collect();
        assert_eq!(codes.len(), n, "code addresses are not distinct");
        for (k, c) in closures.iter().enumerate() {
            let (a, b) = (1u32, 2u32);
            // SAFETY: `c` is alive; pointers to two u32s.
            let r = unsafe { c.code()((&raw const a).cast(), (&raw const b).cast()) };
            assert_eq!(r, ((1 ^ k as u32).cmp(&(2 ^ k as u32))) as i32, "key {k}");
            if k % 7 == 0 {
                check_qsort(c, k as u32);
            }
        }
        let s = pool.stats();
        assert_eq!(s.in_use, n, "round {round}");
        assert!(s.pages * s.per_page >= n);
        drop(closures);
        assert_eq!(pool.stats().in_use, 0, "round {round}: not all freed");
        if round == 0 {
            pages = pool.stats().pages;
        } else {
            assert_eq!(
                pool.stats().pages,
                pages,
                "freed trampolines were not reused"
            );
        }
    }
    assert_no_writable_view("100 000 closures");
}

#[test]
fn hundred_thousand_closures_from_rust_and_qsort() {
    static POOL: Pool = Pool::new();
    hundred_thousand_in(&POOL, 100_000);
    assert_eq!(POOL.source(), Some(Source::OwnFile));
}

/// Every source this machine allows: allocates from it, calls through it,
/// and checks the code pages' mapping (read+exec, private, never writable).
#[test]
fn every_source_maps_read_exec_copies() {
    for source in [Source::OwnFile, Source::Memfd, Source::TmpFile] {
        let pool = Pool::with_source(source);
        match pool.prepare() {
            Ok(s) => assert_eq!(s, source),
            Err(e) => {
                // Only an exec refusal (a noexec mount, vm.memfd_noexec) may
                // stop the alternatives; the file containing us always maps.
                let TrampolineError::NoSource { refusals } = &e else {
                    panic!("{source:?}: {e}")
                };
                assert!(
                    source != Source::OwnFile
                        && refusals
                            .iter()
                            .all(|r| matches!(r.errno, libc::EACCES | libc::EPERM)),
                    "{source:?} refused: {e}"
                );
                eprintln!("{source:?} refused here: {e}");
                continue;
            }
        }
        let c = by_xor(&pool, 0x55);
        check_qsort(&c, 0x55);
        let m = mapping_of(c.as_ptr() as usize).expect("code page not in /proc/self/maps");
        assert!(m.perms == "r-xp", "{source:?}: code mapped {}", m.line);
        match source {
            Source::OwnFile => assert!(m.inode == exe_inode(), "{source:?}: {}", m.line),
            Source::Memfd => assert!(m.path.contains("memfd:altpatch"), "{}", m.line),
            Source::TmpFile => assert!(m.inode.1 != 0, "{}", m.line),
        }
        // The data slot is 64 KiB past the trampoline (the table is 16 pages).
        let data = mapping_of(c.as_ptr() as usize + 16 * 4096).expect("data page");
        assert!(
            data.perms == "rw-p" && data.inode.1 == 0,
            "data: {}",
            data.line
        );
        // No descriptor of ours can write the file the code is mapped from
        // (unmodified private pages follow the file): the memfd is sealed,
        // the temporary file is open read-only, the executable too.
        let fds = descriptors_of(&m.inode);
        assert!(
            !fds.is_empty(),
            "{source:?}: the pool keeps no descriptor of {}",
            m.line
        );
        for fd in fds {
            let byte = 0xccu8;
            // SAFETY: a one-byte write attempt through our own descriptor.
            let r = unsafe { libc::pwrite(fd, (&raw const byte).cast(), 1, 0) };
            let e = std::io::Error::last_os_error().raw_os_error();
            assert!(
                r < 0 && matches!(e, Some(libc::EPERM | libc::EBADF)),
                "{source:?}: fd {fd} writes ({e:?})"
            );
        }
        assert_no_writable_view(&format!("{source:?}"));
    }
}

core::arch::global_asm!(
    ".pushsection .text.trampoline_test_targets,\"ax\",@progbits",
    // Returns r10 + rdi + 2*rsi + 3*rdx + 4*rcx + 5*r8 + 6*r9: every
    // argument register arrives untouched, and r10 holds the data word.
    ".globl tt_weighted_sum",
    "tt_weighted_sum:",
    "lea rax, [r10 + rdi]",
    "lea rax, [rax + 2*rsi]",
    "imul rdx, rdx, 3",
    "add rax, rdx",
    "lea rax, [rax + 4*rcx]",
    "imul r8, r8, 5",
    "add rax, r8",
    "imul r9, r9, 6",
    "add rax, r9",
    "ret",
    // Returns xmm0 * xmm1 + r10 (as a double).
    ".globl tt_fma_data",
    "tt_fma_data:",
    "mulsd xmm0, xmm1",
    "cvtsi2sd xmm1, r10",
    "addsd xmm0, xmm1",
    "ret",
    ".popsection",
);
unsafe extern "C" {
    fn tt_weighted_sum();
    fn tt_fma_data();
    fn altpatch_trampoline_alloc(
        target: Option<unsafe extern "C" fn()>,
        data: *mut c_void,
    ) -> *mut c_void;
    fn altpatch_trampoline_free(code: *mut c_void) -> i32;
}

type Six = unsafe extern "C" fn(u64, u64, u64, u64, u64, u64) -> u64;

/// The raw contract, through the Rust type and the C functions: r10 holds
/// the data word, every argument register (integer and SSE) arrives as the
/// caller left it, and the stack is untouched (a seventh argument on the
/// stack would break otherwise; the target reads registers only).
#[test]
fn raw_trampolines_keep_every_register_and_pass_data_in_r10() {
    let t = Trampoline::new(tt_weighted_sum, 1_000_000 as *mut c_void).unwrap();
    // SAFETY: the target reads six integer arguments and returns one.
    let f: Six = unsafe { std::mem::transmute(t.code()) };
    // SAFETY: `t` is alive.
    assert_eq!(
        unsafe { f(1, 10, 100, 1000, 10_000, 100_000) },
        1_000_000 + 654_321
    );

    // SAFETY: the C interface with a contract-following target.
    let code = unsafe { altpatch_trampoline_alloc(Some(tt_fma_data), 7 as *mut c_void) };
    assert!(!code.is_null(), "{}", std::io::Error::last_os_error());
    // SAFETY: the target takes two doubles and returns one.
    let g: unsafe extern "C" fn(f64, f64) -> f64 = unsafe { std::mem::transmute(code) };
    // SAFETY: `code` is allocated.
    assert_eq!(unsafe { g(1.5, 4.0) }, 13.0);
    // SAFETY: ours, no longer called.
    assert_eq!(unsafe { altpatch_trampoline_free(code) }, 0);
    // A second free is refused (not a cycle in the free list).
    // SAFETY: the function checks the trampoline is in use.
    assert_eq!(unsafe { altpatch_trampoline_free(code) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EINVAL)
    );
    // Freeing twice, or something else, is refused.
    let bogus = [0u8; 64];
    // SAFETY: the function checks the address before using it.
    assert_eq!(
        unsafe { altpatch_trampoline_free(bogus.as_ptr() as *mut c_void) },
        -1
    );
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EINVAL)
    );
    // SAFETY: a null target is refused.
    assert!(unsafe { altpatch_trampoline_alloc(None, std::ptr::null_mut()) }.is_null());

    // The header declares what the crate exports.
    let h = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/altpatch.h"))
        .unwrap();
    assert!(h.contains("void *altpatch_trampoline_alloc(void (*target)(void), void *data);"));
    assert!(h.contains("int altpatch_trampoline_free(void *code);"));
}

/// Closures of every supported shape: argument counts 0..=5, integers of
/// each width, floats among integers, pointers, and results of each kind.
#[test]
fn closure_shapes() {
    let base = 100u64;
    let c0 = Closure::<unsafe extern "C" fn() -> u64>::new(|| base).unwrap();
    let c5 = Closure::<unsafe extern "C" fn(u8, i16, f64, u32, *const u64) -> f64>::new(
        |a: u8, b: i16, x: f64, d: u32, p: *const u64| {
            // SAFETY: the test passes a valid pointer.
            let e = unsafe { *p };
            a as f64 + b as f64 + x + d as f64 + e as f64 + base as f64
        },
    )
    .unwrap();
    let cf =
        Closure::<unsafe extern "C" fn(f32, f32, bool) -> f32>::new(|x: f32, y: f32, neg: bool| {
            if neg { -(x * y) } else { x * y }
        })
        .unwrap();
    let ci = Closure::<unsafe extern "C" fn(i64, isize, usize, i8) -> i64>::new(
        |a: i64, b: isize, c: usize, d: i8| a + b as i64 + c as i64 + d as i64,
    )
    .unwrap();
    let e = 5u64;
    // SAFETY: every closure is alive; the pointer is valid.
    unsafe {
        assert_eq!(c0.code()(), 100);
        assert_eq!(c5.code()(1, -2, 0.5, 3, &e), 107.5);
        assert_eq!(cf.code()(1.5, 2.0, true), -3.0);
        assert_eq!(ci.code()(-1, 2, 3, -4), 0);
    }
}

/// Eight threads allocating, calling (from Rust and through qsort) and
/// freeing in one pool, while the main thread samples /proc/self/maps.
#[test]
fn eight_threads_allocate_call_and_free() {
    static POOL: Pool = Pool::new();
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sampler = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                seen.lock().unwrap().extend(writable_views_of_code());
                samples += 1;
            }
            samples
        })
    };
    let workers: Vec<_> = (0..8u32)
        .map(|t| {
            std::thread::spawn(move || {
                for round in 0..300u32 {
                    let key = t << 24 | round;
                    let batch: Vec<_> = (0..50).map(|i| by_xor(&POOL, key + i)).collect();
                    for (i, c) in batch.iter().enumerate() {
                        let (a, b) = (5u32, 9u32);
                        let k = key + i as u32;
                        // SAFETY: alive; pointers to u32s.
                        let r = unsafe { c.code()((&raw const a).cast(), (&raw const b).cast()) };
                        assert_eq!(r, (5 ^ k).cmp(&(9 ^ k)) as i32);
                        if i == 0 {
                            check_qsort(c, k);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker failed");
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    assert!(samples > 0);
    let seen = seen.lock().unwrap();
    assert!(seen.is_empty(), "writable code seen: {seen:#?}");
    assert_eq!(POOL.stats().in_use, 0);
}

/// Children: each scenario runs in a fresh process of this test binary.
#[test]
#[ignore = "run by the tests below in a child process"]
fn child() {
    let scenario = std::env::var("TRAMPOLINE_CHILD").unwrap_or_default();
    run_child(&scenario, hundred_thousand_in);
}

#[test]
fn under_mdwe_every_allowed_source_works() {
    let o = run("mdwe", &[]);
    assert!(o.ok("mdwe"), "MDWE child:\n{}", o.out);
}

#[test]
fn under_memfd_noexec_2_the_own_file_works_and_memfd_is_refused() {
    in_hardened_namespace();
}

#[test]
fn a_panic_in_a_closure_called_from_c_aborts_with_a_message() {
    let o = run("panic", &[]);
    assert_eq!(o.signal, Some(libc::SIGABRT), "{}", o.out);
    assert!(o.out.contains("closure panicked in qsort"), "{}", o.out);
    assert!(
        o.out
            .contains("altpatch: a closure called through a trampoline panicked"),
        "{}",
        o.out
    );
    assert!(!o.out.contains("CHILD-OK"), "{}", o.out);
}

#[test]
fn a_call_after_free_aborts_with_a_message() {
    let o = run("after_free", &[]);
    assert_eq!(o.signal, Some(libc::SIGABRT), "{}", o.out);
    assert!(
        o.out
            .contains("altpatch: a trampoline was called after it was freed"),
        "{}",
        o.out
    );
}

#[test]
fn closures_work_in_a_forked_child_and_the_child_allocates() {
    let o = run("fork", &[]);
    assert!(o.ok("fork"), "{}", o.out);
}

#[test]
fn an_address_space_limit_shrinks_the_reservation() {
    let o = run("rlimit_as", &[]);
    assert!(o.ok("rlimit_as"), "{}", o.out);
}

#[test]
fn altpatch_trampoline_pins_the_source() {
    for (name, want) in [
        ("memfd", "Memfd"),
        ("tmpfile", "TmpFile"),
        ("file", "OwnFile"),
    ] {
        let o = run("env", &[("ALTPATCH_TRAMPOLINE", name)]);
        let refused = o.out.contains("NoSource");
        assert!(
            (o.ok("env") && o.out.contains(&format!("source {want}")))
                || (refused && name != "file"),
            "{name}:\n{}",
            o.out
        );
    }
    // The status is not "killed by a signal" in any of them.
    assert!(run("env", &[]).status.signal().is_none());
}
