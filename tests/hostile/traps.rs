//! Foreign `SIGTRAP`s after the crate installed its handler: each reaches
//! the disposition the program had, exactly as if the crate were absent.

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

use super::support::*;

/// What the program's own handler saw.
static HITS: AtomicUsize = AtomicUsize::new(0);
static LAST_CODE: AtomicI32 = AtomicI32::new(0);
static LAST_RIP: AtomicU64 = AtomicU64::new(0);
/// Single-step traps to take before clearing the trap flag.
static STEPS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn programs_handler(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: SA_SIGINFO: valid siginfo and ucontext.
    let (info, uc) = unsafe { (&*info, &mut *(ctx as *mut libc::ucontext_t)) };
    HITS.fetch_add(1, Ordering::SeqCst);
    LAST_CODE.store(info.si_code, Ordering::SeqCst);
    LAST_RIP.store(
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64,
        Ordering::SeqCst,
    );
    if STEPS.load(Ordering::SeqCst) > 0 && STEPS.fetch_sub(1, Ordering::SeqCst) == 1 {
        uc.uc_mcontext.gregs[libc::REG_EFL as usize] &= !0x100;
    }
}

fn set_disposition(handler: usize, flags: i32) {
    // SAFETY: installing a disposition for SIGTRAP in this child process.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
    }
}

fn install_programs_handler() {
    set_disposition(programs_handler as *const () as usize, libc::SA_SIGINFO);
}

/// An `int3` the program wrote itself; returns the address after it.
#[inline(never)]
fn own_int3() -> u64 {
    let after: u64;
    // SAFETY: int3 then a lea of the following address; the program's
    // handler (or the default action) deals with the trap.
    unsafe {
        core::arch::asm!(
            "int3",
            "2:",
            "lea {a}, [rip + 2b]",
            a = out(reg) after,
        )
    };
    after
}

/// Sets the trap flag for a few instructions; the handler clears it.
#[inline(never)]
fn single_step() {
    // SAFETY: sets EFLAGS.TF; each following instruction traps until the
    // program's handler clears it (or the default action ends the process).
    unsafe {
        core::arch::asm!(
            "pushfq",
            "or qword ptr [rsp], 0x100",
            "popfq",
            "nop",
            "nop",
            "nop",
            "nop",
            "nop",
            "nop",
            "nop",
            "nop",
        )
    };
}

/// A thread blocked in `join` of another (a futex wait) receives SIGTRAP.
fn tgkill_joiner() {
    let (tx, rx) = std::sync::mpsc::channel::<i32>();
    let joiner = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        let sleeper =
            std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(300)));
        sleeper.join().unwrap();
        7
    });
    let tid = rx.recv().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: signalling our own thread.
    assert_eq!(
        unsafe { libc::tgkill(libc::getpid(), tid, libc::SIGTRAP) },
        0
    );
    assert_eq!(joiner.join().unwrap(), 7, "the joiner's wait was corrupted");
}

pub fn scenario(s: &str) {
    let with_handler = s.ends_with("_handler");
    if with_handler {
        install_programs_handler();
    }
    if s.ends_with("_ignored") {
        set_disposition(libc::SIG_IGN, 0);
    }
    // The handler is installed after the program's disposition, as a
    // program would meet it: then every trap below goes through it.
    install_altpatch_handler();
    let emulated = altpatch::os::linux::emulated_traps();
    match s {
        "trap_raise_handler" => {
            // SAFETY: raising a signal at ourselves.
            assert_eq!(unsafe { libc::raise(libc::SIGTRAP) }, 0);
            assert_eq!(HITS.load(Ordering::SeqCst), 1);
            assert_eq!(LAST_CODE.load(Ordering::SeqCst), libc::SI_TKILL);
        }
        "trap_raise_default" | "trap_raise_ignored" => {
            // SAFETY: as above.
            unsafe { libc::raise(libc::SIGTRAP) };
            assert_eq!(
                s, "trap_raise_ignored",
                "the default action should have killed us"
            );
        }
        "trap_tgkill_handler" => {
            tgkill_joiner();
            assert_eq!(HITS.load(Ordering::SeqCst), 1);
            assert_eq!(LAST_CODE.load(Ordering::SeqCst), libc::SI_TKILL);
        }
        "trap_tgkill_default" => {
            tgkill_joiner();
            panic!("the default action should have killed us");
        }
        "trap_step_handler" => {
            STEPS.store(3, Ordering::SeqCst);
            single_step();
            assert_eq!(
                HITS.load(Ordering::SeqCst),
                3,
                "one trap per stepped instruction"
            );
            assert!(LAST_CODE.load(Ordering::SeqCst) > 0, "a kernel trap code");
        }
        "trap_step_default" => {
            single_step();
            panic!("the default action should have killed us");
        }
        "trap_int3_handler" => {
            let after = own_int3();
            assert_eq!(HITS.load(Ordering::SeqCst), 1);
            assert_eq!(LAST_CODE.load(Ordering::SeqCst), libc::SI_KERNEL);
            assert_eq!(
                LAST_RIP.load(Ordering::SeqCst),
                after,
                "the trap was rewound"
            );
        }
        "trap_int3_default" | "trap_int3_ignored" => {
            own_int3();
            panic!("the kernel kills a program that ignores or lacks a SIGTRAP handler");
        }
        "trap_replaced" => replaced(),
        _ => panic!("unknown scenario {s}"),
    }
    assert_eq!(
        altpatch::os::linux::emulated_traps(),
        emulated,
        "a foreign trap was claimed"
    );
}

/// The program replaces the crate's handler (without chaining): the next
/// INT3 batch is refused with an error; the page swap goes on working.
fn replaced() {
    install_programs_handler();
    altpatch::os::linux::set_live_publication(altpatch::Publish::Live).unwrap();
    let before = hcall(1);
    let err = hcall::update(add2).unwrap_err();
    assert!(err.to_string().contains("replaced"), "{err}");
    assert_eq!(hcall(1), before, "a refused batch changed the text");
    altpatch::os::linux::set_live_publication(altpatch::Publish::Remap).unwrap();
    hcall::update(add2).unwrap();
    assert_eq!(hcall(1), 3);
    let after = own_int3();
    assert_eq!(LAST_RIP.load(Ordering::SeqCst), after);
}
