//! # altpatch
//!
//! Rewrite x86-64 machine code in place, once, at boot or load time (and
//! again later where asked), so a program runs the best code for the CPU it
//! landed on without paying for indirection on every call.
//!
//! The crate is `#![no_std]` + `alloc` at its core, so a kernel or
//! bootloader can link it; the default `std` feature adds the Linux backend
//! that patches a running process's own text with W^X kept at every instant.
//!
//! Every operation follows one pipeline:
//!
//! ```text
//! cpu features ──► site tables ──► plan ──► validate ──► poke + sync ──► report
//!  (cpu)           (records, image)(mechanisms)  (Plan)      (poke)
//! ```
//!
//! 1. [`cpu::Features`]: a snapshot of CPUID (injectable, with overrides
//!    such as `"nomovbe,noavx2"` from a command line or `ALTPATCH`).
//! 2. [`Image`]: one binary's text bounds and site tables (records emitted
//!    from `asm!` into `altpatch_v1_*` sections, see [`records`]).
//! 3. [`Plan`]: a value listing [`Edit`]s — address, expected bytes, new
//!    bytes, reason. It prints as a dry run.
//! 4. Validation: every site holds what the edit expects (decoded with
//!    iced-x86 where the expectation is an instruction), no overlaps,
//!    branches in range, inside text; any failure names the site and writes
//!    nothing.
//! 5. [`TextPoke`]: writes the batch, page by page, and makes every CPU or
//!    thread observe it; a failure midway is rolled back.
//!
//! ## Mechanisms
//!
//! * [`alternative`](mod@alternative): instruction sequences and direct
//!   calls chosen per CPU feature;
//! * [`static_call`](mod@static_call) and [`static_key`]: calls and branches
//!   re-targeted at run time, live;
//! * [`retpoline`]: the `__x86_indirect_thunk_<reg>` thunks, patched per
//!   CPU, and their call sites inlined;
//! * [`ifunc`](mod@ifunc): functions resolved once per CPU, every call site
//!   made direct (Rust `ifunc!` and C `__attribute__((ifunc))`);
//! * `trampoline` (`std`, Linux): a fresh code address per Rust closure
//!   or C callback, from pre-assembled code pages mapped again, never
//!   written;
//! * [`sites`] and `elf` (`std`): finding the compiler's call
//!   sites from the linker's relocations.
//!
//! ## Example
//!
//! Rewrite the immediate of a `mov` inside one of this program's functions,
//! call it, then undo:
//!
//! ```
//! use altpatch::{Edit, Image, LinuxPoke, Plan, patch_point};
//!
//! #[inline(never)]
//! fn one() -> u32 {
//!     let r: u32;
//!     // SAFETY: only moves an immediate into `r`.
//!     unsafe { core::arch::asm!(patch_point!("crate_doc_one"), "mov {0:e}, 1", out(reg) r) };
//!     r
//! }
//!
//! let image = Image::current();
//! let at = image.patch_point("crate_doc_one").unwrap();
//! let mut old = [0u8; 5];
//! // SAFETY: `at` is in this program's readable text.
//! unsafe { core::ptr::copy_nonoverlapping(at as *const u8, old.as_mut_ptr(), 5) };
//! let mut new = old;
//! new[1] = 2;
//!
//! let mut plan = Plan::for_image(&image);
//! plan.push(Edit::replace(at, &old, &new).site("one").reason("return 2"));
//! let mut poke = LinuxPoke::new().unwrap();
//! // SAFETY: one `mov` becomes another; no other thread runs `one` now.
//! unsafe { plan.apply(&mut poke) }.unwrap();
//! assert_eq!(one(), 2);
//! // SAFETY: as above.
//! unsafe { plan.undo(&mut poke) }.unwrap();
//! assert_eq!(one(), 1);
//! ```
//!
//! ## Features
//!
//! * `std` (default): [`LinuxPoke`], text bounds of the current binary from
//!   the dynamic loader, `ALTPATCH` and `ALTPATCH_DEBUG` environment
//!   variables, disassembly in plan listings. Without it the crate needs
//!   only `core` and `alloc`.

#![no_std]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

// Another architecture gets one error that says why (from
// `altpatch-core`, below this crate, which names the supported targets);
// the modules here are gated so that nothing else is reported.
#[cfg(target_arch = "x86_64")]
pub mod alternative;
#[cfg(target_arch = "x86_64")]
mod error;
#[cfg(target_arch = "x86_64")]
pub mod ifunc;
#[cfg(target_arch = "x86_64")]
mod patcher;
#[cfg(target_arch = "x86_64")]
#[cfg(feature = "std")]
pub mod process;
#[cfg(target_arch = "x86_64")]
pub mod retpoline;
#[cfg(target_arch = "x86_64")]
pub mod static_call;
#[cfg(target_arch = "x86_64")]
pub mod static_key;

// The layers below the mechanisms are the `altpatch-core` crate
// (ARCHITECTURE.md, "Crates"): its public modules at the paths they have
// always had, the rest under the names this crate's modules use
// (`crate::arch`, `crate::image`, ...), private here.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
use altpatch_core::host;
use altpatch_core::{arch, hex};
#[cfg(target_arch = "x86_64")]
#[doc(inline)]
pub use altpatch_core::{cpu, plan, poke, records, sites};
#[cfg(target_arch = "x86_64")]
use altpatch_core::{image, sync};
/// Reading linked ELF images: the `altpatch-elf` crate.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[doc(inline)]
pub use altpatch_elf as elf;
/// The OS seam's upper half and its Linux backend: the `altpatch-os` crate.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[doc(inline)]
pub use altpatch_os as os;
/// JIT-free closure trampolines: the `altpatch-trampoline` crate.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[doc(inline)]
pub use altpatch_trampoline as trampoline;
// The macros the crate's own macros expand to, and the two public ones
// defined below the mechanisms, at the root where `$crate::` names them.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub use altpatch_core::{
    __alternative_call_abi, __alternative_call_asm, __alternative_call_insn,
    __alternative_call_regs, __altpatch_branch_site, __altpatch_push_section, __altpatch_section,
    __altpatch_site_pad, __altpatch_tag, __altpatch_trampoline_body,
};
#[cfg(target_arch = "x86_64")]
pub use altpatch_core::{patch_point, reserve_site_table};

/// AArch64's encodings and the re-basing of moved code (the arch seam's
/// `arch::aarch64`; the first part of the aarch64 port), on every host.
#[cfg(target_arch = "x86_64")]
pub use arch::aarch64;
/// The x86-64 encodings and decoding (the arch seam's `arch::x86_64`, at
/// the path they had before it).
#[cfg(target_arch = "x86_64")]
pub use arch::x86_64 as x86;

#[cfg(target_arch = "x86_64")]
pub use error::Error;
pub use hex::HexBytes;
#[cfg(target_arch = "x86_64")]
pub use image::{Image, ImageBuilder};
#[cfg(target_arch = "x86_64")]
#[cfg(feature = "std")]
pub use os::linux::{LinuxPoke, LoadError, Publish};
#[cfg(target_arch = "x86_64")]
pub use patcher::{PatchReport, Patcher};
#[cfg(target_arch = "x86_64")]
pub use plan::{ApplyReport, CompactPlan, Edit, Expect, Plan, PlanError, Validation};
#[cfg(target_arch = "x86_64")]
pub use poke::{DirectPoke, FaultInjectingPoke, FaultPoint, PokeError, SyncMethod, TextPoke};
#[cfg(all(target_arch = "x86_64", feature = "std"))]
pub use poke::{Refusal, Strategy};

/// The README's examples, compiled and run as doctests (`cargo test
/// --doc`), so each compiles as written.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;
