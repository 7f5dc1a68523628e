//! Which [`Host`](crate::os::host::Host) this build uses: the one place
//! (with `os/mod.rs`, which declares the backends) where the crate asks
//! which OS it is built for.

/// The implementation of this build: a Linux process.
#[cfg(all(feature = "std", target_os = "linux"))]
pub(crate) type Current = crate::os::linux::host::Linux;
/// The implementation of this build: no OS.
#[cfg(not(feature = "std"))]
pub(crate) type Current = crate::os::host::Freestanding;

/// The ways this build's backend writes text, and why one was refused
/// (what [`PokeError::NoStrategy`](crate::PokeError::NoStrategy) lists).
#[cfg(all(feature = "std", target_os = "linux"))]
pub use crate::os::linux::host::{Refusal, Strategy};
