//! The OS contract's lower half, as this crate names it: the `altpatch-host`
//! crate (`crates/altpatch-host`) — the trait `Host` (the update lock, the
//! environment, what the kernel publishes, the object the loader mapped at
//! an address, which `Image::current` is built from), `Freestanding` (no OS) and
//! Linux's implementation — and `Current`, this build's, chosen here by
//! this crate's own `std` feature (a copy of altpatch without `std` stays
//! freestanding even where another copy in the program enabled the host
//! crate's `std`). A crate of its own so that the compiler keeps it below
//! every layer here.
//!
//! The upper half — loader events, text-writing strategies and their
//! publication, trap delivery, fork repair — is what a backend's
//! [`TextPoke`](crate::poke::TextPoke) provides (`altpatch-os`'s `lib.rs` lists it);
//! a kernel provides its own ([`DirectPoke`](crate::poke::DirectPoke) or
//! [`Int3Poke`](crate::poke::live::Int3Poke) over its
//! [`TrapTable`](crate::poke::live::TrapTable), an [`Image`](crate::image::Image)
//! from its linker script).

#[doc(hidden)]
pub use altpatch_host::{Host, write_errno};

/// The implementation of this build: a Linux process.
#[cfg(all(feature = "std", target_os = "linux"))]
#[doc(hidden)]
pub type Current = altpatch_host::linux::Linux;
/// The implementation of this build: no OS.
#[cfg(not(feature = "std"))]
pub(crate) type Current = altpatch_host::Freestanding;
/// The ways this build's backend writes text, and why one was refused.
#[cfg(feature = "std")]
pub use altpatch_host::{Refusal, Strategy};
