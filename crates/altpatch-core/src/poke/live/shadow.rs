//! Shadow stacks (CET SHSTK) and the INT3 protocol: a trap handler must
//! not emulate a `call` or a `ret` for a context that runs with a shadow
//! stack.
//!
//! The CPU keeps a second, protected copy of every return address: `call`
//! pushes to both stacks, `ret` pops both and faults (`#CP`) if they
//! differ. An emulated `call` pushes the return address on the ordinary
//! stack only, so the callee's `ret` faults; an emulated `ret` pops the
//! ordinary stack only, so the caller's next `ret` faults. A handler that
//! finds such a site in flight therefore does not emulate it: it waits,
//! outside the slot, until the site's first byte is no longer the
//! protocol's `int3` (the patching thread wrote the new first byte, or
//! rolled the batch back), then resumes the context *at the site*, where
//! the CPU runs the real instruction and maintains both stacks itself
//! ([`TrapAction::Restarted`](super::TrapAction::Restarted)). `jmp`, `jcc`
//! and NOP sites are still emulated: they touch no stack.
//!
//! [`TrapSlot::emulate_with`](super::TrapSlot::emulate_with) takes a
//! [`ShadowStack`] saying whether the interrupted context has one and how
//! to wait; [`TrapSlot::emulate`](super::TrapSlot::emulate) assumes none.
//! The Linux `SIGTRAP` handler answers from the patching thread's
//! `arch_prctl(ARCH_SHSTK_STATUS)` (asked when the batch is published) and
//! the trapping thread's own shadow-stack pointer, with no system call in
//! the handler; a kernel with supervisor shadow stacks answers for its own
//! contexts.

use core::ptr;
use core::sync::atomic::{AtomicU8, Ordering};

use super::{LiveSites, TrapSlot};
use crate::arch::TRAP as INT3;

/// What a trap handler needs to know about shadow stacks. Both methods run
/// in the trap handler: they must be async-signal-safe, allocation-free
/// and lock-free, and (inlined into the handler) make no indirect call.
///
/// ```
/// use altpatch::poke::live::ShadowStack;
///
/// /// A kernel whose contexts all run with supervisor shadow stacks.
/// struct Always;
/// impl ShadowStack for Always {
///     fn active(&self) -> bool {
///         true
///     }
///     fn pause(&self) -> bool {
///         core::hint::spin_loop();
///         true
///     }
/// }
/// assert!(Always.active());
/// ```
pub trait ShadowStack {
    /// Whether the interrupted context runs with a shadow stack. Asked
    /// only for a site whose instruction would push or pop a return
    /// address ([`Emulation::uses_stack`](super::Emulation::uses_stack)).
    fn active(&self) -> bool;

    /// Called between two looks at the site while waiting for its `int3`
    /// to go: relax the CPU, or yield it to the patching thread. Returns
    /// `false` if this context must not wait, because waiting could never
    /// end (it is the patching thread's own); the trap is then not
    /// claimed ([`TrapAction::NotOurs`](super::TrapAction::NotOurs)).
    fn pause(&self) -> bool;
}

/// No shadow stack: every site is emulated (what
/// [`TrapSlot::emulate`](super::TrapSlot::emulate) uses).
///
/// ```
/// use altpatch::poke::live::{NoShadowStack, ShadowStack};
/// assert!(!NoShadowStack.active());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct NoShadowStack;

impl ShadowStack for NoShadowStack {
    #[inline(always)]
    fn active(&self) -> bool {
        false
    }

    #[inline(always)]
    fn pause(&self) -> bool {
        core::hint::spin_loop();
        true
    }
}

/// How a wait for a site's `int3` ended.
pub(super) enum Waited {
    /// The first byte is no longer `int3`: run the site again.
    Gone,
    /// Another table was published or this one retired: look again.
    TableChanged,
    /// This context must not wait ([`ShadowStack::pause`]).
    MustNotWait,
}

/// The first byte at `addr`, read atomically (another CPU may be writing
/// it).
///
/// # Safety
///
/// `addr` is mapped and readable.
#[inline(always)]
pub(super) unsafe fn first_byte(addr: usize) -> u8 {
    // SAFETY: the caller's contract; a byte is always aligned.
    unsafe { &*(addr as *const AtomicU8) }.load(Ordering::SeqCst)
}

impl TrapSlot {
    /// Waits, outside the slot, until the `int3` at `addr` (a site of the
    /// table `table` whose call or ret may not be emulated) is gone, or
    /// `table` is no longer the one published.
    ///
    /// Why this always ends (and never deadlocks):
    ///
    /// * The patching thread writes the site's new first byte in phase 3
    ///   of the protocol, or, if the batch fails, the plan's rollback
    ///   writes the old one; either way before it publishes another table
    ///   or retires this one. Then this loop sees a byte that is not
    ///   `int3`, or a table that changed (and the caller looks again, as a
    ///   late trap would: the byte is restarted, or an `int3` no batch in
    ///   flight owns is not ours — the same verdict as without a shadow
    ///   stack).
    /// * Nothing the patching thread does between phase 1 and phase 3
    ///   waits for this thread. It holds only the crate's process lock
    ///   (which a trap handler never takes), stores bytes (memory stores or
    ///   `pwrite` to `/proc/self/mem`, no allocation) and calls
    ///   `membarrier`, which interrupts running threads but waits for none
    ///   to reach any point. `retire` and `publish` wait for handlers
    ///   counted inside the slot, and this one left it before waiting.
    /// * The patching thread never runs a site of its own batch while it is
    ///   in flight: its code between the phases calls no static call, ifunc
    ///   or key site; and the retpoline sites a retpoline-built patcher
    ///   runs cannot be call sites in flight under a shadow stack (a
    ///   retpoline's own `ret` to a rewritten return address is what a
    ///   shadow stack forbids, so such a process runs no generic thunk).
    ///   Were it to, `shadow.pause()` says this context must not wait, and
    ///   the trap goes to the previous disposition (a crash, never a hang).
    /// * Waiting does not starve the patching thread: `shadow.pause()`
    ///   yields the CPU (the Linux handler calls `sched_yield`).
    ///
    /// # Safety
    ///
    /// `addr` is mapped and readable (the CPU just executed it).
    #[inline(always)]
    pub(super) unsafe fn wait_for_site<S: ShadowStack + ?Sized>(
        &self,
        addr: usize,
        table: *const LiveSites,
        shadow: &S,
    ) -> Waited {
        loop {
            // SAFETY: the caller's contract.
            if unsafe { first_byte(addr) } != INT3 {
                self.restarted.fetch_add(1, Ordering::Relaxed);
                return Waited::Gone;
            }
            if !ptr::eq(self.table.load(Ordering::SeqCst), table) {
                return Waited::TableChanged;
            }
            if !shadow.pause() {
                return Waited::MustNotWait;
            }
        }
    }
}
