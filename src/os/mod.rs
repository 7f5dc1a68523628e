//! The OS seam: what altpatch needs from the system it runs on, and the
//! backends that provide it.
//!
//! The contract has two halves, each at the layer that needs it
//! (`ARCHITECTURE.md`, "Adding an OS"):
//!
//! * **below the backends** (`os::host`: the `altpatch-host` crate): the update lock,
//!   the environment (`ALTPATCH=`), the kernel's published facts (its
//!   spectre_v2 verdict, the CPUs it describes, that it makes `LFENCE`
//!   serializing). One trait, `Host`, implemented by each backend's `host`
//!   folder and by the freestanding build (a spin flag per object, no
//!   environment, no verdict).
//! * **above images and plans** (this module's backends): the running
//!   program's images and loader events (`Image::current`,
//!   `Image::from_loaded`, the loader generation), text writing with W^X
//!   kept and its publication to running threads (a
//!   [`TextPoke`](crate::TextPoke): [`LinuxPoke`](crate::LinuxPoke)), trap
//!   delivery for the INT3 protocol (a
//!   [`TrapTable`](crate::poke::live::TrapTable) fed by a `SIGTRAP`
//!   handler), and the repair of every layer's state in a forked child.
//!   A kernel provides the same through the public traits: a
//!   [`DirectPoke`](crate::DirectPoke) or
//!   [`Int3Poke`](crate::poke::live::Int3Poke) over its own trap handler,
//!   an [`Image`](crate::Image) from its linker script, its command line
//!   for overrides (`examples/kernel` does all of it).
//!
//! Only Linux today ([`linux`]). The `std` feature means "a process, on an
//! OS with a backend": built for another OS it stops with an error naming
//! the supported ones (`altpatch-host` says so). The `target_os` tests
//! live here (which backends exist) and in the `altpatch-host` crate
//! (which `Host` the build uses), nowhere else.

pub(crate) mod host;
#[cfg(all(feature = "std", target_os = "linux"))]
pub mod linux;
// `std` on an OS without a backend stops in `altpatch-host`, with one
// error naming the supported ones.
