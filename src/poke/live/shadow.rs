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
//! The Linux `SIGTRAP` handler asks the kernel per trap
//! (`arch_prctl(ARCH_SHSTK_STATUS)`); a kernel with supervisor shadow
//! stacks answers for its own contexts.

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
