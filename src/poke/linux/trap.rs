//! The process's `SIGTRAP` handler for live patching: emulates the new
//! instruction at a site whose `int3` a thread hit, and passes every other
//! trap to the handler installed before it.

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

use crate::poke::live::{LiveSites, TrapAction, TrapFrame};
use crate::x86::INT3;

/// The table of the live batch being committed, or null.
static ACTIVE: AtomicPtr<LiveSites> = AtomicPtr::new(ptr::null_mut());
/// Handlers currently running (the table is freed only when none are).
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);
/// Traps emulated so far (for tests and diagnostics).
static EMULATED: AtomicUsize = AtomicUsize::new(0);

/// How many times a thread hit a site being patched live and had its new
/// instruction emulated, since the process started.
pub fn emulated_traps() -> usize {
    EMULATED.load(Ordering::Relaxed)
}
static INSTALL: Once = Once::new();

struct OldAction(core::cell::UnsafeCell<libc::sigaction>);
// SAFETY: written once inside `INSTALL`, before the handler can run, and
// only read afterwards.
unsafe impl Sync for OldAction {}
// SAFETY: an all-zero sigaction is a valid (SIG_DFL) value.
static OLD: OldAction = OldAction(core::cell::UnsafeCell::new(unsafe { core::mem::zeroed() }));

extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let gregs = &mut uc.uc_mcontext.gregs;
    let rip = gregs[libc::REG_RIP as usize] as u64;

    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    let table = ACTIVE.load(Ordering::SeqCst);
    if !table.is_null() {
        let mut frame = TrapFrame {
            rip,
            rsp: gregs[libc::REG_RSP as usize] as u64,
            rflags: gregs[libc::REG_EFL as usize] as u64,
        };
        // SAFETY: the table stays alive while IN_HANDLER is non-zero; the
        // frame is the interrupted thread's, whose stack a real call/ret
        // would use the same way.
        if unsafe { (*table).emulate(&mut frame) } == TrapAction::Emulated {
            gregs[libc::REG_RIP as usize] = frame.rip as i64;
            gregs[libc::REG_RSP as usize] = frame.rsp as i64;
            EMULATED.fetch_add(1, Ordering::Relaxed);
            IN_HANDLER.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
    IN_HANDLER.fetch_sub(1, Ordering::SeqCst);

    // An int3 of a batch that has finished since this thread trapped: the
    // byte is no longer int3, so run whatever is there now.
    let at = rip.wrapping_sub(1) as *const u8;
    // SAFETY: the thread just executed the byte before rip, so it is
    // mapped and readable.
    if unsafe { at.read_volatile() } != INT3 {
        gregs[libc::REG_RIP as usize] = (rip - 1) as i64;
        return;
    }
    chain(sig, info, ctx);
}

/// Passes the trap to the previously installed disposition.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: OLD was filled before this handler was installed.
    let old = unsafe { &*OLD.0.get() };
    let h = old.sa_sigaction;
    if h == libc::SIG_IGN {
        return;
    }
    if h == libc::SIG_DFL {
        // Re-deliver with the default action (terminate, core dump), as if
        // we had never been installed.
        // SAFETY: async-signal-safe calls restoring the default action.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    if old.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed for this signal with
        // SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { core::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler for this signal.
        let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(h) };
        f(sig);
    }
}

/// Installs the handler once per process.
pub(super) fn install() {
    INSTALL.call_once(|| {
        // SAFETY: building a sigaction for our handler and installing it,
        // saving the previous one into OLD before any trap can reach us.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = on_sigtrap as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGTRAP, &sa, OLD.0.get());
        }
    });
}

/// Makes `table` the one the handler consults, for the duration of `f`,
/// then waits until no handler still uses it.
pub(super) fn with_active<R>(table: &LiveSites, f: impl FnOnce() -> R) -> R {
    ACTIVE.store(
        table as *const LiveSites as *mut LiveSites,
        Ordering::SeqCst,
    );
    let r = f();
    ACTIVE.store(ptr::null_mut(), Ordering::SeqCst);
    while IN_HANDLER.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    r
}
