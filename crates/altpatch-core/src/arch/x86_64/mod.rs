//! x86-64: the encodings the patcher writes, decoding of what it finds,
//! relocation of moved code, and the rules of patching instructions other
//! threads run (which swaps are one instruction; what a trapped thread's
//! registers become).
//!
//! [`encode`](self#encoders) never allocates and is usable before any
//! allocator exists; the decoding helpers use iced-x86's decoder.
//!
//! Also reachable as `altpatch::x86` (the path before the arch seam).
//!
//! Compiled on every host: it is the instruction set, which tools use on
//! any machine (reading an x86-64 binary). What runs only on an x86-64
//! host — CPUID ([`cpu::HostCpuid`]), serialization (`sync_core()`), the
//! assembly of recorded calls, weak C entries and the closure table — is
//! `cfg(target_arch = "x86_64")`.
//!
//! # Encoders
//!
//! | what | bytes |
//! |---|---|
//! | NOP, 1..=11 bytes | [`nop`], [`fill_nops`] |
//! | `endbr64` (a CET IBT landing pad) | `f3 0f 1e fa`, [`ENDBR64`] |
//! | gap longer than 11 | `jmp` over `int3` filler, [`fill_gap`] |
//! | `call rel32` / `jmp rel32` | `e8 d32` / `e9 d32`, [`call_rel32`], [`jmp_rel32`] |
//! | `jmp rel8` | `eb d8`, [`jmp_rel8`] |
//! | `jcc rel32` / `jcc rel8` | `0f 80+cc d32` / `70+cc d8`, [`jcc_rel32`], [`jcc_rel8`] |
//! | `call *%reg` / `jmp *%reg` | `ff d0+r` / `ff e0+r`, REX.B `41` for r8..r15, [`call_reg`], [`jmp_reg`] |
//!
//! Every rel32/rel8 encoder checks that the displacement fits and returns
//! [`OutOfRange`] otherwise; nothing is ever truncated.

// On another host nothing in the crate uses the instruction set yet (the
// crate is its `compile_error!` there); it is compiled to stay portable.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused_imports, dead_code))]

// The encodings and decoding: `altpatch::x86`'s public items, as before
// the seam.
mod decode;
mod encode;
mod reg;
mod reloc;

pub use decode::{
    BranchKind, RelBranch, decode_one, for_each_insn, is_gap, is_single_nop, rel_branch,
    rel_branch_of,
};
pub use encode::{
    Cond, ENDBR64, Encoded, INT3, LFENCE, NOP_MAX, NOP5, OutOfRange, RET, SERIALIZE, call_rel32,
    fill_gap, fill_nops, jcc_rel8, jcc_rel32, jmp_rel8, jmp_rel32, nop, rel8, rel32,
};
pub use reg::{Reg, call_reg, jmp_reg};
pub use reloc::{RelocError, relocate};

// What the rest of the crate reaches through `crate::arch`'s contract
// (arch/mod.rs); the public items among them are public at the paths they
// had before the seam (`cpu::Features`, `poke::live::LiveSite`,
// `static_call::TRAMPOLINE_JMP`, `alternative::CallArg`, ...), not here.
pub(crate) mod breakpoint;
#[cfg(target_arch = "x86_64")]
pub(crate) mod c_entry;
pub(crate) mod call_abi;
mod call_asm;
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[doc(hidden)]
pub mod closure_table;
pub(crate) mod cpu;
#[cfg(feature = "std")]
pub(crate) mod disasm;
pub(crate) mod emulate;
pub(crate) mod got_call;
pub(crate) mod live;
pub(crate) mod recorded_abi;
#[cfg(target_arch = "x86_64")]
pub(crate) mod recorded_call;
pub(crate) mod site;
pub(crate) mod sync_core;
pub(crate) mod trampoline;

/// The page size text is patched in: the unit of a page swap and of the
/// page runs a batch is grouped by.
pub(crate) const PAGE_SIZE: usize = 4096;
