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

mod breakpoint;
#[cfg(target_arch = "x86_64")]
mod c_entry;
mod call_abi;
mod call_asm;
#[cfg(all(target_arch = "x86_64", feature = "std", target_os = "linux"))]
pub(crate) mod closure_table;
pub mod cpu;
mod decode;
#[cfg(feature = "std")]
mod disasm;
mod emulate;
mod encode;
mod got_call;
mod live;
mod recorded_abi;
#[cfg(target_arch = "x86_64")]
mod recorded_call;
mod reg;
mod reloc;
mod site;
mod sync_core;
mod trampoline;

pub use breakpoint::{TRAP, contains_trap};
#[cfg(target_arch = "x86_64")]
pub(crate) use c_entry::c_entry;
pub use call_abi::{CallArg, CallRet};
#[doc(hidden)]
pub use call_abi::{CallArgs, call_result as __call_result};
pub use decode::{
    BranchKind, RelBranch, decode_one, for_each_insn, is_gap, is_single_nop, rel_branch,
    rel_branch_of,
};
#[cfg(feature = "std")]
pub use disasm::disasm;
pub use emulate::{LiveSites, TrapAction, TrapFrame};
pub use encode::{
    Cond, ENDBR64, Encoded, INT3, LFENCE, NOP_MAX, NOP5, OutOfRange, RET, SERIALIZE, call_rel32,
    fill_gap, fill_nops, jcc_rel8, jcc_rel32, jmp_rel8, jmp_rel32, nop, rel8, rel32,
};
pub use got_call::{
    GotCall, NOT_GOT_CALL, NOT_IRELATIVE, PLT_STUB_LEN, R_IRELATIVE, direct_call, got_call,
    plt_slot,
};
pub use live::{Emulation, LiveError, LiveSite, check_swap};
#[cfg(target_arch = "x86_64")]
pub(crate) use live::{check_new_whole, check_old};
pub use recorded_abi::{MAX_SSE, RecordedArg, RecordedArgs, RecordedRet};
#[cfg(target_arch = "x86_64")]
pub(crate) use recorded_call::{recorded_asm, recorded_call, recorded_gp, recorded_xmm};
pub use reg::{Reg, call_reg, jmp_reg};
pub use reloc::{RelocError, relocate};
pub use site::{
    BRANCH_LEN, BRANCH_NOP, BRANCH_RET, call_of_len, call_target, call_to, fill_site_pad, is_nop,
    is_padding, jump_of_len, jump_target, jump_to, nop_of_len, reaches,
};
pub use sync_core::SyncMethod;
#[cfg(target_arch = "x86_64")]
pub use sync_core::sync_core;
pub use trampoline::{
    TRAMPOLINE_ALIGN, TRAMPOLINE_JMP, TRAMPOLINE_LEN, TRAMPOLINE_SIGNATURE, is_trampoline,
};

/// The page size text is patched in: the unit of a page swap and of the
/// page runs a batch is grouped by.
pub const PAGE_SIZE: usize = 4096;
