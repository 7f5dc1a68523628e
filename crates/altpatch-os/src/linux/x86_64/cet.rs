//! CET in a Linux process: whether a thread runs with a user shadow stack
//! (Linux 6.6+, `arch_prctl(ARCH_SHSTK_STATUS)`), and the raw system calls
//! the `SIGTRAP` handler makes while it waits for a site (see
//! [`ShadowStack`](crate::poke::live::ShadowStack)).
//!
//! The handler makes no system call to decide: one inside it would be a
//! point where the thread can be scheduled out with `SIGTRAP` blocked (the
//! handler blocks every signal), where the next batch's check that every
//! thread can take `SIGTRAP` would find it and, on a loaded machine,
//! refuse the batch. It combines, syscall-free: the forced test mode; the patching
//! thread's `arch_prctl(ARCH_SHSTK_STATUS)`, asked when each batch is
//! published (glibc enables shadow stacks for the whole process at
//! start-up, so that thread speaks for all); and the trapping thread's own
//! shadow-stack pointer (`rdsspq`, a NOP leaving 0 where no shadow stack
//! is on), which covers a thread whose state differs. Waiting is correct
//! with or without a shadow stack, so any "yes" wins.
//!
//! Everything the handler calls here is an instruction in assembly:
//! async-signal-safe, allocation-free, and no compiler-emitted indirect
//! call (in a retpoline-built program that would be a thunk site, see
//! `trap.rs`).

use core::sync::atomic::{AtomicBool, Ordering};

/// `arch_prctl` code: the thread's shadow-stack features, as a `u64` mask
/// written through the pointer argument.
const ARCH_SHSTK_STATUS: usize = 0x5005;
/// Bit of the mask: the shadow stack is enabled.
const ARCH_SHSTK_SHSTK: u64 = 1 << 0;

/// Set by [`force_shadow_stack_for_tests`].
static FORCED: AtomicBool = AtomicBool::new(false);
/// The patching thread's answer, refreshed when a batch is published.
static PATCHER_HAS_SHSTK: AtomicBool = AtomicBool::new(false);

/// Asks the kernel for the calling thread's shadow stack, for the handler
/// of the batch about to be published (called outside the handler).
pub(in crate::linux) fn refresh() {
    PATCHER_HAS_SHSTK.store(in_handler::kernel_says_enabled(), Ordering::SeqCst);
}

/// Makes every thread of this process look as if it ran with a user
/// shadow stack (`true`), or asks the kernel again (`false`). For tests of
/// the INT3 protocol's shadow-stack path on machines without CET: the
/// `SIGTRAP` handler then never emulates a `call` or `ret`, it waits and
/// restarts the site ([`restarted_traps`](crate::linux::restarted_traps) counts
/// those). Harmless without a real shadow stack: waiting and restarting is
/// correct everywhere, only slower than emulating.
///
/// ```
/// use altpatch::os::linux::{force_shadow_stack_for_tests, shadow_stack_enabled};
/// force_shadow_stack_for_tests(true);
/// assert!(shadow_stack_enabled());
/// force_shadow_stack_for_tests(false);
/// ```
#[doc(hidden)]
pub fn force_shadow_stack_for_tests(on: bool) {
    FORCED.store(on, Ordering::SeqCst);
}

/// Whether the calling thread runs with a user shadow stack (CET SHSTK):
/// `arch_prctl(ARCH_SHSTK_STATUS)` reports it enabled. `false` where the
/// kernel or CPU has none (the call fails with `EINVAL`). Under a shadow
/// stack the INT3 protocol's `SIGTRAP` handler never emulates a `call` or
/// `ret`: it waits for the site to be written and runs the real
/// instruction.
///
/// ```
/// // Whatever the machine: a plain answer, never an error.
/// let on = altpatch::os::linux::shadow_stack_enabled();
/// println!("shadow stack: {on}");
/// ```
pub fn shadow_stack_enabled() -> bool {
    FORCED.load(Ordering::SeqCst) || in_handler::kernel_says_enabled()
}

/// What the `SIGTRAP` handler calls (everything inlined, raw system calls).
pub(in crate::linux) mod in_handler {
    use super::{ARCH_SHSTK_SHSTK, ARCH_SHSTK_STATUS, FORCED, Ordering, PATCHER_HAS_SHSTK};

    /// `syscall(n, a, b, c)`, returning the kernel's value (`-errno` on
    /// failure).
    ///
    /// # Safety
    ///
    /// The system call must be safe with these arguments (pointers valid
    /// for what the call reads or writes).
    #[inline(always)]
    unsafe fn syscall3(n: usize, a: usize, b: usize, c: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller's contract; `syscall` clobbers rcx and r11
        // only, and uses no user stack.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a,
                in("rsi") b,
                in("rdx") c,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            )
        };
        ret
    }

    /// Whether the interrupted thread may run with a shadow stack: forced,
    /// or the patching thread has one, or this thread's shadow-stack
    /// pointer is set. No system call (see the module documentation).
    #[inline(always)]
    pub(in crate::linux) fn active() -> bool {
        FORCED.load(Ordering::SeqCst) || PATCHER_HAS_SHSTK.load(Ordering::SeqCst) || ssp() != 0
    }

    /// The shadow-stack pointer, 0 when no shadow stack is on: `rdsspq`
    /// (`f3 48 0f 1e c8`, in the hint-NOP space) leaves its register
    /// unchanged then, and on CPUs without CET.
    #[inline(always)]
    fn ssp() -> u64 {
        let ssp: u64;
        // SAFETY: rdsspq reads the SSP into rax or does nothing; it touches
        // no memory, stack or flags.
        unsafe {
            core::arch::asm!(
                ".byte 0xf3, 0x48, 0x0f, 0x1e, 0xc8",
                inlateout("rax") 0u64 => ssp,
                options(nomem, nostack, preserves_flags),
            )
        };
        ssp
    }

    /// `arch_prctl(ARCH_SHSTK_STATUS)` reports the calling thread's shadow
    /// stack enabled (`false` where the kernel or CPU has none: EINVAL).
    pub(in crate::linux) fn kernel_says_enabled() -> bool {
        let mut features: u64 = 0;
        // SAFETY: ARCH_SHSTK_STATUS writes one u64 through the pointer,
        // which is a local's; an unknown code fails with EINVAL, touching
        // nothing.
        let r = unsafe {
            syscall3(
                libc::SYS_arch_prctl as usize,
                ARCH_SHSTK_STATUS,
                &raw mut features as usize,
                0,
            )
        };
        r == 0 && features & ARCH_SHSTK_SHSTK != 0
    }

    /// Gives the CPU to another thread (the patching one, on a busy core).
    #[inline(always)]
    pub(in crate::linux) fn yield_now() {
        // SAFETY: sched_yield takes no argument and cannot fail.
        unsafe { syscall3(libc::SYS_sched_yield as usize, 0, 0, 0) };
    }

    /// The calling thread's id.
    #[inline(always)]
    pub(in crate::linux) fn tid() -> i32 {
        // SAFETY: gettid takes no argument and cannot fail.
        unsafe { syscall3(libc::SYS_gettid as usize, 0, 0, 0) as i32 }
    }

    /// Writes `msg` to standard error (best effort).
    #[inline(always)]
    pub(in crate::linux) fn say(msg: &[u8]) {
        // SAFETY: write reads `msg.len()` bytes of `msg`.
        unsafe {
            syscall3(
                libc::SYS_write as usize,
                2,
                msg.as_ptr() as usize,
                msg.len(),
            )
        };
    }
}
