//! Patching instructions other threads may be executing: the INT3 protocol.
//!
//! Writing a multi-byte instruction is not atomic for a CPU fetching it. The
//! protocol makes every intermediate state safe:
//!
//! ```text
//! 1. write int3 (cc) over the first byte of every site     sync
//! 2. write all bytes but the first                          sync
//! 3. write the first bytes                                  sync
//! ```
//!
//! After step 1 no thread can start a site's old instruction: it traps on
//! `int3`. The trap handler finds the site and *emulates the new
//! instruction* on the interrupted context (call: push the return address
//! and jump; jmp: jump; jcc: jump if taken; nop: skip; ret: pop), then
//! resumes. Three syncs per batch, however many sites.
//!
//! Under a shadow stack (CET SHSTK) a `call` or `ret` is never emulated:
//! the emulated push or pop would miss the shadow stack and the next `ret`
//! would fault. The handler waits for the site's `int3` to go and resumes
//! at the site, so the CPU runs the real instruction ([`ShadowStack`],
//! [`TrapSlot::emulate_with`]).
//!
//! Each site must be exactly one instruction before and after (a NOP of any
//! length, or `ret`/`jmp` followed by `int3` filler, counts as one), so no
//! thread is ever inside a changed instruction.
//!
//! * [`Int3Poke`] runs the protocol over any in-place [`TextPoke`](crate::poke::TextPoke); a kernel
//!   supplies the sync (IPIs) and, in its `#BP` handler, calls
//!   [`TrapSlot::emulate`] with the trapping context: the batch's
//!   [`LiveSites`] are published there ([`TrapTable`]) for exactly as long
//!   as a handler may read them.
//! * In a Linux process, `altpatch::os::linux::LinuxPoke` with
//!   `altpatch::os::linux::Publish::Live` runs it with
//!   `membarrier(SYNC_CORE)` and a `SIGTRAP` handler that emulates sites
//!   and passes any other trap to the previously installed handler.

mod int3;
mod protocol;
mod shadow;
mod table;

// What is x86 in the protocol (which swaps are one instruction, what each
// new instruction does to a trapped thread) is the arch seam's.
pub use crate::arch::{
    Emulation, LiveError, LiveSite, LiveSites, TrapAction, TrapFrame, check_swap,
};
pub use int3::Int3Poke;
#[cfg(feature = "std")]
#[doc(hidden)]
pub use protocol::Step;
pub use shadow::{NoShadowStack, ShadowStack};
#[cfg(feature = "std")]
#[doc(hidden)]
pub use table::run_published;
pub use table::{SlotGuard, TrapSlot, TrapTable};
