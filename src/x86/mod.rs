//! x86-64 encodings the patcher writes, and decoding of what it finds.
//!
//! [`encode`](self#encoders) never allocates and is usable before any
//! allocator exists; the decoding helpers use iced-x86's decoder.
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
