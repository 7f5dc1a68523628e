//! AArch64 (A64) as an instruction set, on every host: the encodings of
//! the instructions altpatch writes, with their reach, and the re-basing of
//! code moved to another address (what an alternative's replacement
//! needs). Tools read and patch aarch64 binaries from any machine, so
//! nothing here is `cfg(target_arch)`.
//!
//! And the CPU's features ([`cpu`]), decoded from the ID registers or
//! Linux's `AT_HWCAP`/`AT_HWCAP2`, with recorded dumps of real cores.
//!
//! This is the first part of the aarch64 port (issue 29): the mechanisms,
//! reading the registers on the CPU itself, the overrides, cache
//! maintenance and the Linux backend's frame are not here yet, and the
//! crate still builds for x86-64 targets only. Decoding is the `yaxpeax-arm` crate's; only
//! what is written is encoded by hand.

// Off x86-64 hosts the crate is one `compile_error!` and this module is
// not re-exported yet (it will be the aarch64 target's own).
#![cfg_attr(not(target_arch = "x86_64"), allow(unused_imports, dead_code))]

pub mod cpu;
pub mod encode;
mod relocate;

pub use relocate::{PcForm, RebaseError, branch_target, pc_form, pc_target, rebase};

#[cfg(test)]
mod tests;
