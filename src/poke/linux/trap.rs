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

// Must contain no indirect-thunk site (see `call3`): tests/retpoline.rs
// checks the linked handler of a retpoline-built program.
extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let gregs = &mut uc.uc_mcontext.gregs;
    let rip = gregs[libc::REG_RIP as usize] as u64;

    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    let table = ACTIVE.load(Ordering::SeqCst);
    if !table.is_null() {
        // gregs index of each register by encoding number.
        const GREG: [libc::c_int; 16] = [
            libc::REG_RAX,
            libc::REG_RCX,
            libc::REG_RDX,
            libc::REG_RBX,
            libc::REG_RSP,
            libc::REG_RBP,
            libc::REG_RSI,
            libc::REG_RDI,
            libc::REG_R8,
            libc::REG_R9,
            libc::REG_R10,
            libc::REG_R11,
            libc::REG_R12,
            libc::REG_R13,
            libc::REG_R14,
            libc::REG_R15,
        ];
        let mut frame = TrapFrame {
            rip,
            rsp: gregs[libc::REG_RSP as usize] as u64,
            rflags: gregs[libc::REG_EFL as usize] as u64,
            regs: GREG.map(|g| gregs[g as usize] as u64),
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
#[inline(always)]
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
        // SAFETY: async-signal-safe calls restoring the default action
        // (`call3`: see there why not a plain call).
        unsafe {
            call3(
                libc::signal as *const () as usize,
                sig as usize,
                libc::SIG_DFL,
                0,
            );
            call3(libc::raise as *const () as usize, sig as usize, 0, 0);
        }
        return;
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

/// Calls the C function at `f` with three integer arguments, with an
/// indirect call written in assembly.
///
/// This handler runs while sites are being rewritten. In a program built
/// with retpolines every indirect call the *compiler* emits (including calls
/// to other crates' functions through the GOT) is a call to a thunk — a site
/// that may hold an `int3` at this moment, and a trap inside the `SIGTRAP`
/// handler kills the process. The handler's own path is therefore kept free
/// of compiler-emitted indirect branches: the lookup is inlined, and calls
/// out go through here.
///
/// # Safety
///
/// `f` must be a function taking (up to) three integer arguments in the C
/// calling convention that is safe to call with these values.
#[inline(always)]
unsafe fn call3(f: usize, a: usize, b: usize, c: usize) {
    // SAFETY: the stack is aligned for a call at an asm block (no
    // `nostack`, so the compiler keeps the red zone out of our way); the
    // callee follows the C ABI, whose clobbers are declared.
    unsafe {
        core::arch::asm!(
            "call {f}",
            f = in(reg) f,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            clobber_abi("C"),
        );
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
