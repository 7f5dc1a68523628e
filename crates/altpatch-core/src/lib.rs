//! The layers of [altpatch](https://docs.rs/altpatch) below its mechanisms,
//! as a crate of their own so that the compiler keeps them below: record
//! layouts (`records`), the architecture seam (`arch`), the CPU snapshot
//! (`cpu`), the update lock (`sync`, over `altpatch-host`), text pokes
//! (`poke`), plans and their one driver (`plan`), images (`image`),
//! compiler-generated sites and the embedded table (`sites`). With `std`,
//! images of the running program's objects (`Image::current`,
//! `Image::from_loaded`, from the loader through `altpatch-host`). Nothing
//! here can name the Linux backend, a mechanism, the patcher or the
//! process layer: they are `altpatch-os`'s and `altpatch`'s.
//!
//! Internal: depend on `altpatch`, which re-exports these modules at the
//! paths users name (`altpatch::plan`, `altpatch::poke`, `altpatch::cpu`,
//! ...). Items public here only for `altpatch`'s use are `#[doc(hidden)]`
//! and carry no stability promise.

#![no_std]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

// Another architecture gets one error that says why, not a crate that
// compiles to nothing and "unresolved import" at every use.
#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "altpatch supports target_arch = \"x86_64\" only (Linux processes, and \
     freestanding kernels such as x86_64-unknown-none); aarch64 is planned"
);

// The arch seam compiles on every target: `arch::x86_64` is x86-64 as an
// instruction set (tools read x86 binaries anywhere); only the host's
// contract and the x86 host's own parts are gated inside it. Hidden: its
// public items are public at their own paths in `altpatch` (`x86`, `cpu`,
// `poke::live`, ...).
#[doc(hidden)]
pub mod arch;
#[cfg(target_arch = "x86_64")]
pub mod cpu;
pub mod hex;
// The OS contract's lower half: the `altpatch-host` crate, and the build's
// `Host` (`Current`).
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub mod host;
#[cfg(target_arch = "x86_64")]
pub mod image;
#[cfg(target_arch = "x86_64")]
pub mod plan;
#[cfg(target_arch = "x86_64")]
pub mod poke;
#[cfg(target_arch = "x86_64")]
pub mod records;
#[doc(hidden)]
pub mod short;
#[cfg(target_arch = "x86_64")]
pub mod sites;
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub mod sync;
