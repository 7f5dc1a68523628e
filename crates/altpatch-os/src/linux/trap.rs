//! The process's `SIGTRAP` handler for the INT3 protocol: emulates the new
//! instruction at a site whose `int3` a thread hit, and leaves every other
//! trap exactly as it would have been without the crate.
//!
//! A trap is claimed only when all of these hold:
//!
//! * `si_code` is `SI_KERNEL`: the kernel raised it for an `int3`
//!   (`raise`/`kill`/`tgkill` give `SI_TKILL`/`SI_USER`, single-step and
//!   hardware breakpoints `TRAP_TRACE`/`TRAP_HWBKPT`);
//! * the byte before the interrupted `rip` is the first byte of a site the
//!   crate has patched live — checked against the tables, never by reading
//!   memory that may not be ours;
//! * that site is in the batch in flight (emulate its new instruction), or
//!   its `int3` is gone (a batch finished between the trap and this handler:
//!   run the byte again), or an `int3` is there that a batch published
//!   after the handler first looked put (emulate that batch's). A thread
//!   may be delayed arbitrarily between its trap and its handler, so "a
//!   site of some batch" is every site ever patched live, not only the
//!   current batch's: the [`TrapSlot`] kernels use keeps both.
//!
//! Under a shadow stack (CET SHSTK, or [`force_shadow_stack_for_tests`]) a
//! site whose new instruction is a `call` or `ret` is not emulated: the
//! handler waits (yielding the CPU) until the patching thread has written
//! the site, then resumes at it so the CPU runs the real instruction and
//! keeps both stacks in step ([`ShadowStack`]; counted by
//! [`restarted_traps`]). `jmp`, `jcc` and NOP sites are emulated as ever.
//!
//! [`force_shadow_stack_for_tests`]: super::force_shadow_stack_for_tests
//!
//! Everything else goes to the disposition installed before: its handler
//! with the original `siginfo` and context (`SA_SIGINFO` or not), the
//! default action (the process dies of `SIGTRAP`, as it would have), or
//! ignore (except for a kernel-raised trap, which the kernel never lets a
//! program ignore). The handler runs with every signal blocked, so a signal
//! storm cannot interrupt it.

use core::cell::Cell;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use super::cet::in_handler;
// The signal frame's registers are the architecture's.
use super::frame::{self, call3};
use crate::poke::PokeError;
use crate::poke::live::{LiveSites, ShadowStack, TrapAction, TrapSlot, TrapTable};

/// The table of the live batch being committed and every site ever
/// patched live (published and retired by `live::run_published`, the
/// driver kernels use too): a thread may be delayed arbitrarily between its
/// trap and this handler, so a trap at a site whose batch has ended is
/// claimed too (and the site run again).
static ACTIVE: TrapSlot = TrapSlot::new();
/// Whether our handler was installed.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The previous handler had `SA_RESETHAND` and has run once: default now.
static RESET: AtomicBool = AtomicBool::new(false);

/// The thread id of the patcher whose batch is published (0: none). A
/// trap on that thread must never wait for the batch to end.
static PATCHER: AtomicI32 = AtomicI32::new(0);

/// How many times a thread hit a site being patched live and had its new
/// instruction emulated, since the process started.
///
/// ```
/// use altpatch::os::linux::{emulated_traps, restarted_traps};
/// // After a stress run with the INT3 protocol (see tests/live.rs):
/// println!("{} traps emulated, {} restarted", emulated_traps(), restarted_traps());
/// ```
pub fn emulated_traps() -> usize {
    ACTIVE.emulated()
}

/// How many times a thread hit a site being patched live and was resumed
/// at the site to run it as it is now, instead of having it emulated, since
/// the process started: a `call` or `ret` site under a shadow stack (the
/// handler waited for the patching thread to write it), or a trap that
/// reached the handler after its batch had ended.
///
/// ```
/// use altpatch::os::linux::{emulated_traps, restarted_traps};
/// // Under a shadow stack a trap at a call site counts here, never in
/// // `emulated_traps` (tests/cet.rs).
/// println!("{} restarted, {} emulated", restarted_traps(), emulated_traps());
/// ```
pub fn restarted_traps() -> usize {
    ACTIVE.restarted()
}

/// The shadow-stack answers of the `SIGTRAP` handler (see [`ShadowStack`]).
struct Shadow {
    /// Whether this thread was checked not to be the patcher.
    not_patcher: Cell<bool>,
}

impl ShadowStack for Shadow {
    #[inline(always)]
    fn active(&self) -> bool {
        in_handler::active()
    }

    #[inline(always)]
    fn pause(&self) -> bool {
        if !self.not_patcher.get() {
            if in_handler::tid() == PATCHER.load(Ordering::SeqCst) {
                // Waiting for our own batch would never end: refuse it
                // loudly (the trap then goes to the previous disposition).
                in_handler::say(
                    b"altpatch: the patching thread ran a call or ret site of its own live batch \
                      under a shadow stack: it can neither be emulated nor waited for\n",
                );
                return false;
            }
            self.not_patcher.set(true);
        }
        core::hint::spin_loop();
        in_handler::yield_now();
        true
    }
}

struct OldAction(core::cell::UnsafeCell<libc::sigaction>);
// SAFETY: written only under the process lock before the handler is
// installed (and once more right after, if the disposition changed in
// between), read by the handler afterwards.
unsafe impl Sync for OldAction {}
// SAFETY: an all-zero sigaction is a valid (SIG_DFL) value.
static OLD: OldAction = OldAction(core::cell::UnsafeCell::new(unsafe { core::mem::zeroed() }));

/// Whether the handler claims the `int3` that trapped (and, if so, the
/// context now resumes at the emulated or restarted instruction).
#[inline(always)]
fn claim(uc: &mut libc::ucontext_t) -> bool {
    let mut frame = frame::read(uc);
    let shadow = Shadow {
        not_patcher: Cell::new(false),
    };
    // SAFETY: the frame is the interrupted thread's, whose stack a real
    // call/ret would use the same way; the kernel raised the trap for an
    // int3 the thread just executed, so its byte is readable.
    match unsafe { ACTIVE.emulate_with(&mut frame, &shadow) } {
        TrapAction::Emulated => {
            frame::write_emulated(uc, &frame);
            true
        }
        TrapAction::Restarted => {
            frame::write_restarted(uc, &frame);
            true
        }
        TrapAction::NotOurs => false,
    }
}

// Must contain no indirect-thunk site (see `call3`): tests/retpoline.rs
// checks the linked handler of a retpoline-built program.
pub(super) extern "C" fn on_sigtrap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let code = unsafe { (*info).si_code };
    if frame::is_breakpoint(code) {
        // SAFETY: the kernel passes a valid ucontext for SA_SIGINFO handlers.
        let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
        if claim(uc) {
            return;
        }
    }
    chain(sig, info, ctx, code);
}

/// Passes the trap to the previously installed disposition.
#[inline(always)]
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, code: i32) {
    // SAFETY: OLD was filled before this handler was installed.
    let old = unsafe { &*OLD.0.get() };
    let mut h = old.sa_sigaction;
    if RESET.load(Ordering::Relaxed) {
        h = libc::SIG_DFL;
    }
    // The kernel does not let a program ignore a trap it raised itself
    // (force_sig: ignored means default); one sent by a program is ignored.
    if h == libc::SIG_IGN && code <= 0 {
        return;
    }
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Re-deliver with the default action (terminate, core dump), as if
        // we had never been installed: it is blocked while we run and
        // arrives when the handler returns.
        // SAFETY: async-signal-safe calls restoring the default action and
        // raising the signal at this thread (`call3`: see there why not a
        // plain call).
        unsafe {
            let mut dfl: libc::sigaction = core::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            call3(
                libc::sigaction as *const () as usize,
                sig as usize,
                &raw const dfl as usize,
                0,
            );
            call3(libc::raise as *const () as usize, sig as usize, 0, 0);
        }
        return;
    }
    if old.sa_flags & libc::SA_RESETHAND != 0 {
        RESET.store(true, Ordering::Relaxed);
    }
    if old.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed for this signal with
        // SA_SIGINFO, so it takes these three arguments.
        unsafe { call3(h, sig as usize, info as usize, ctx as usize) };
    } else {
        // SAFETY: a plain handler for this signal takes the signal number.
        unsafe { call3(h, sig as usize, 0, 0) };
    }
}

fn our_action() -> libc::sigaction {
    // SAFETY: building a sigaction value.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_sigtrap as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // Nothing may interrupt the handler: a signal whose handler runs a
        // site would trap again while SIGTRAP is blocked, and die.
        libc::sigfillset(&mut sa.sa_mask);
        // Also glibc's two internal signals (32 and 33), which `sigfillset`
        // leaves out and no program can block through glibc: a thread whose
        // mask holds them is in this handler, or on its way in or out — what
        // `threads::check_can_trap` tells from a program's blocked thread.
        // The kernel takes the mask as given.
        sa.sa_mask = with_internal_signals(sa.sa_mask);
        sa
    }
}

/// The bits of glibc's internal signals 32 and 33 in a signal mask as
/// `/proc` shows it.
pub(super) const INTERNAL_SIGNALS: u64 = (1 << 31) | (1 << 32);

/// `mask` with glibc's internal signals 32 and 33 added (bits 31 and 32 of
/// its first word, as the kernel lays a mask out).
fn with_internal_signals(mut mask: libc::sigset_t) -> libc::sigset_t {
    // SAFETY: a `sigset_t` is plain bits, at least 8 bytes, whose first
    // 64 bits are the kernel's signals 1..=64 in order.
    unsafe {
        let words = (&raw mut mask).cast::<u64>();
        *words |= INTERNAL_SIGNALS;
    }
    mask
}

fn current_action() -> libc::sigaction {
    // SAFETY: reads the disposition into a local.
    unsafe {
        let mut cur: libc::sigaction = core::mem::zeroed();
        libc::sigaction(libc::SIGTRAP, ptr::null(), &mut cur);
        cur
    }
}

/// Installs the handler (once per process), or checks it is still the
/// installed one. The caller holds the process lock.
pub(super) fn install() -> Result<(), PokeError> {
    let ours = on_sigtrap as *const () as usize;
    if INSTALLED.load(Ordering::Acquire) {
        // Another copy of the crate installed after us passes our traps
        // on to us: still ours, through it.
        if !super::peers::sigtrap_reaches(current_action().sa_sigaction, ours) {
            return Err(PokeError::SignalState {
                why: "the program replaced altpatch's SIGTRAP handler, so a thread \
                      hitting a site mid-update would not be emulated",
                tid: 0,
            });
        }
        return Ok(());
    }
    // Read the old disposition first, so it is in place before our handler
    // can run; then install, and keep the true previous one if it changed
    // in between.
    let before = current_action();
    // SAFETY: the handler is not installed yet: nothing reads OLD.
    unsafe { *OLD.0.get() = before };
    let sa = our_action();
    // SAFETY: installs our handler; `prev` receives what it replaced.
    let mut prev: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sigaction(libc::SIGTRAP, &sa, &mut prev) } != 0 {
        return Err(super::sys::os_err("sigaction"));
    }
    if prev.sa_sigaction != before.sa_sigaction || prev.sa_flags != before.sa_flags {
        // SAFETY: a store of a value the handler reads only on a foreign
        // trap that raced with its own installation.
        unsafe { *OLD.0.get() = prev };
    }
    // SAFETY: OLD is final now; only the handler reads it hereafter.
    super::peers::set_sigtrap(ours, unsafe { (*OLD.0.get()).sa_sigaction });
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// The slot the handler reads the batch in flight from, as the patcher
/// publishes to it: [`ACTIVE`], and the patching thread's id.
pub(super) struct Slot;

// SAFETY: forwards to ACTIVE (a TrapSlot, which keeps the contract); the
// thread id is stored before the table and cleared after it is retired.
unsafe impl TrapTable for Slot {
    unsafe fn publish(&self, sites: &LiveSites) {
        super::cet::refresh();
        PATCHER.store(in_handler::tid(), Ordering::SeqCst);
        // SAFETY: the caller's contract, forwarded.
        unsafe { ACTIVE.publish(sites) };
    }

    unsafe fn retire(&self) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { ACTIVE.retire() };
        PATCHER.store(0, Ordering::SeqCst);
    }
}

/// The slot the handler reads the batch in flight from.
pub(super) fn slot() -> &'static Slot {
    &Slot
}

/// In a forked child: handlers that were running on other threads of the
/// parent will never finish here, and no batch is in flight.
pub(super) fn after_fork_in_child() {
    // SAFETY: called by the fork handler in the child (fork.rs), which has
    // one thread: no handler can be inside the table.
    unsafe { ACTIVE.reset_after_fork() };
    PATCHER.store(0, Ordering::SeqCst);
}
