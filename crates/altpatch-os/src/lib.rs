//! The OS seam: what altpatch needs from the system it runs on, and the
//! backends that provide it.
//!
//! The contract has two halves, each at the layer that needs it
//! (`ARCHITECTURE.md`, "Adding an OS"):
//!
//! * **below the backends** (`crate::host`: the `altpatch-host` crate): the update lock,
//!   the environment (`ALTPATCH=`), the kernel's published facts (its
//!   spectre_v2 verdict, the CPUs it describes, that it makes `LFENCE`
//!   serializing), the object the loader mapped at an address (what the
//!   core's `Image::current` and `Image::from_loaded` are built from). One trait, `Host`, implemented in `altpatch-host` for each
//!   OS (`linux/`) and for the freestanding build (a spin flag per object,
//!   no environment, no verdict); the core's `host.rs` picks the build's.
//! * **above images and plans** (this crate's backends): loader events
//!   (the loader generation, where each text page comes from), text writing with W^X
//!   kept and its publication to running threads (a
//!   [`TextPoke`](crate::poke::TextPoke): [`LinuxPoke`](crate::linux::LinuxPoke)), trap
//!   delivery for the INT3 protocol (a
//!   [`TrapTable`](crate::poke::live::TrapTable) fed by a `SIGTRAP`
//!   handler), and the repair of every layer's state in a forked child.
//!   A kernel provides the same through the public traits: a
//!   [`DirectPoke`](crate::poke::DirectPoke) or
//!   [`Int3Poke`](crate::poke::live::Int3Poke) over its own trap handler,
//!   an [`Image`](crate::image::Image) from its linker script, its command line
//!   for overrides (`examples/kernel` does all of it).
//!
//! Only Linux today ([`linux`]). This crate is `altpatch`'s with `std` ("a
//! process, on an OS with a backend"): built for another OS it stops with
//! an error naming the supported ones (`altpatch-host` says so). The `target_os` tests
//! live here (which backends exist, and the build's process backend), in
//! the core's `host.rs` (the build's `Host`) and in the `altpatch-host`
//! crate (its OS modules), nowhere else.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

// The core's modules under the names this crate's files use
// (`crate::poke`, ...), as `altpatch` names them.
use altpatch_core::{arch, cpu, image, plan, poke, short, sync};

#[cfg(target_os = "linux")]
pub mod linux;

/// The backend of this build's process (the contract's upper half, as the
/// `process` layer and the mechanisms' std entry points use it).
#[cfg(target_os = "linux")]
#[doc(hidden)]
pub type Process = altpatch_host::linux::Linux;

#[doc(hidden)]
pub use backend::{JmpEdit, ProcessBackend};

mod backend {
    use crate::arch::BRANCH_LEN;
    use crate::poke::{PokeError, TextPoke};

    /// What a process backend gives the layers above it (the `process`
    /// layer's one-liners and constructors, `ifunc::init`,
    /// `retpoline::apply_current`): the running program's pokes, whether
    /// it has other threads, and the exact branch rewrites patching at load
    /// uses. Its images are `Image::current` and `Image::from_loaded`,
    /// which the backend defines; its trap delivery and fork repair are
    /// its own (behind its pokes and its `pthread_atfork` handlers).
    #[doc(hidden)]
    pub trait ProcessBackend {
        /// The poke the running program's text is written with.
        type Poke: TextPoke;
        /// A poke for code other threads run: every edit replaces one
        /// instruction by one and is published so that no thread sees it
        /// half done (Linux: the page swap, or the INT3 protocol if the
        /// program chose it).
        fn running_poke() -> Result<Self::Poke, PokeError>;
        /// A poke for start-up code that may still be the process's only
        /// thread: it stores in place when, at commit, no other thread can
        /// run the sites (Linux: this thread alone, its signals blocked
        /// until the stores landed), and publishes as `running_poke` does
        /// otherwise. Edits as for `running_poke`.
        fn start_up_poke() -> Result<Self::Poke, PokeError>;
        /// A poke that stores in place, for sites no thread runs during
        /// the batch (start-up, or other threads parked).
        fn in_place_poke() -> Result<Self::Poke, PokeError>;
        /// Whether the calling thread is the process's only one (`false`
        /// when it cannot tell). No allocation: it runs in constructors.
        fn only_thread() -> bool;
        /// Rewrites every edit's `jmp`/`call` in one publication, each
        /// checked against its `old` bytes (one already holding `new` is
        /// left), without the plan or the decoder; the number rewritten.
        ///
        /// # Safety
        ///
        /// Each `new` is a branch to a function its site may reach (its
        /// declared type); other threads may run the sites.
        unsafe fn retarget_branches(edits: &[JmpEdit]) -> Result<usize, PokeError>;
    }

    /// One `jmp rel32` or `call rel32` to rewrite: at `addr`, `old` now,
    /// `new` after.
    #[derive(Clone, Copy, Debug)]
    #[doc(hidden)]
    pub struct JmpEdit {
        /// The branch's first byte.
        pub addr: usize,
        /// The bytes it must hold now.
        pub old: [u8; BRANCH_LEN],
        /// The bytes it is given.
        pub new: [u8; BRANCH_LEN],
    }
}
// `std` on an OS without a backend stops in `altpatch-host`, with one
// error naming the supported ones.
