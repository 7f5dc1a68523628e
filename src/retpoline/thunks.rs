//! The thunk array: `__x86_indirect_thunk_<reg>` for every register but
//! `%rsp`, and `__x86_return_thunk`.
//!
//! The compiler calls the thunks by these fixed names, so a program has one
//! thunk per name, whatever links it. The names are therefore *weak*: a
//! program linking two copies of this crate (two libraries on incompatible
//! versions, see [`records`](crate::records)) links, and the linker binds
//! every call to one copy's thunks. Each copy keeps its own array under its
//! own name (`altpatch_v1_<tag>_thunk_array`, [`thunk_array`]); a copy
//! whose thunks the linker did not choose finds the chosen ones through
//! the sites that call them and rewrites them as another copy's slots
//! (`local.rs`, by their exact bytes). Its own array stays in its text,
//! reached by nothing.

use super::Mode;
use crate::arch::x86_64::{self as x86, Reg};

/// Bytes per thunk slot (see [`thunk_array`]).
pub const THUNK_SLOT: usize = 32;

/// The retpoline for one register, as a 32-byte slot. Weak (see the
/// module docs), and protected, not hidden: a program may export its thunks to the shared objects it loads
/// (`-Wl,--export-dynamic-symbol=__x86_indirect_thunk_*`), while calls
/// inside the object that defines them always bind to its own copy. The first instruction
/// is a `cs`-prefixed 6-byte `call`, so `lfence; jmp *%r8..%r15` (6 bytes)
/// replaces exactly one instruction.
macro_rules! slot {
    ($reg:literal) => {
        concat!(
            ".weak __x86_indirect_thunk_",
            $reg,
            "\n",
            ".protected __x86_indirect_thunk_",
            $reg,
            "\n",
            ".type __x86_indirect_thunk_",
            $reg,
            ", @function\n",
            "__x86_indirect_thunk_",
            $reg,
            ":\n",
            ".byte 0x2e\n",
            "call 1f\n",
            "2: pause\n",
            "lfence\n",
            "jmp 2b\n",
            "1: mov %",
            $reg,
            ", (%rsp)\n",
            "ret\n",
            ".size __x86_indirect_thunk_",
            $reg,
            ", 32\n",
            ".balign 32, 0xcc\n"
        )
    };
}

/// The array's symbol, with this copy's tag.
macro_rules! array_symbol {
    () => {
        altpatch_core::__altpatch_section!(thunk_array)
    };
}

core::arch::global_asm!(
    concat!(
        ".pushsection .text.altpatch_thunks,\"ax\",@progbits\n",
        ".balign 64, 0xcc\n",
        ".globl ",
        array_symbol!(),
        "\n.hidden ",
        array_symbol!(),
        "\n",
        array_symbol!(),
        ":\n",
        slot!("rax"),
        slot!("rcx"),
        slot!("rdx"),
        slot!("rbx"),
        // %rsp is never a thunk register: its slot traps.
        ".fill 32, 1, 0xcc\n",
        slot!("rbp"),
        slot!("rsi"),
        slot!("rdi"),
        slot!("r8"),
        slot!("r9"),
        slot!("r10"),
        slot!("r11"),
        slot!("r12"),
        slot!("r13"),
        slot!("r14"),
        slot!("r15"),
        ".weak __x86_return_thunk\n",
        ".protected __x86_return_thunk\n",
        ".type __x86_return_thunk, @function\n",
        "__x86_return_thunk:\n",
        "ret\n",
        "int3\n",
        ".size __x86_return_thunk, 2\n",
        ".balign 32, 0xcc\n",
        ".popsection\n"
    ),
    options(att_syntax)
);

unsafe extern "C" {
    #[link_name = array_symbol!()]
    static THUNK_ARRAY: [u8; 0];
}

/// The address of this copy's thunk array (slot `n` is register number
/// `n`): the program's `__x86_indirect_thunk_<reg>` unless the linker
/// chose another copy's (see the module docs).
///
/// ```
/// use altpatch::retpoline::{THUNK_SLOT, return_thunk, thunk, thunk_array};
/// use altpatch::x86::Reg;
///
/// assert_eq!(thunk_array() % 64, 0);
/// assert_eq!(thunk(Reg::R11), Some(thunk_array() + 11 * THUNK_SLOT));
/// assert_eq!(thunk(Reg::Rsp), None);
/// assert_eq!(return_thunk(), thunk_array() + 16 * THUNK_SLOT);
/// ```
pub fn thunk_array() -> usize {
    (&raw const THUNK_ARRAY) as usize
}

/// The address of this copy's `__x86_indirect_thunk_<reg>` slot; `None`
/// for `%rsp` (see [`thunk_array`] for an example).
pub fn thunk(reg: Reg) -> Option<usize> {
    (reg != Reg::Rsp).then(|| thunk_array() + reg as usize * THUNK_SLOT)
}

/// This crate's thunks, the array and the return thunk after it: a site
/// reaching into this range reaches one of ours.
pub(super) fn own_thunks() -> core::ops::Range<usize> {
    thunk_array()..return_thunk() + 1
}

/// The address of this copy's `__x86_return_thunk`, right after its
/// array (see [`thunk_array`]).
pub fn return_thunk() -> usize {
    thunk_array() + 16 * THUNK_SLOT
}

/// The first 6 bytes of `reg`'s slot in `mode`.
pub(super) fn head(reg: Reg, mode: Mode) -> [u8; 6] {
    let mut h = [x86::INT3; 6];
    match mode {
        // cs call 1f: the call skips pause (2), lfence (3), jmp (2).
        Mode::Generic => h.copy_from_slice(&[0x2e, 0xe8, 7, 0, 0, 0]),
        // The filler before the branch (lfence or a 3-byte NOP) is one
        // instruction of the same length in both, so moving between them
        // rewrites that instruction alone.
        Mode::Lfence | Mode::Plain => {
            let filler: &[u8] = if mode == Mode::Lfence {
                &x86::LFENCE
            } else {
                x86::nop(3).expect("a 3-byte NOP")
            };
            h[..3].copy_from_slice(filler);
            let j = x86::jmp_reg(reg);
            h[3..3 + j.len()].copy_from_slice(&j);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_laid_out_as_documented() {
        for r in Reg::ALL {
            let Some(a) = thunk(r) else { continue };
            // SAFETY: the slot is 32 bytes of this crate's text.
            let slot = unsafe { core::slice::from_raw_parts(a as *const u8, THUNK_SLOT) };
            // The generic head, or a patched one if a test already moved it.
            let heads = [Mode::Generic, Mode::Lfence, Mode::Plain].map(|m| head(r, m));
            assert!(
                heads.iter().any(|h| slot[..6] == h[..]),
                "{r}: {:02x?}",
                &slot[..6]
            );
            assert_eq!(slot[6..8], [0xf3, 0x90], "{r}: pause");
            assert_eq!(slot[8..11], x86::LFENCE, "{r}: lfence");
            assert_eq!(slot[11..13], [0xeb, 0xf9], "{r}: jmp 2b");
        }
        assert_eq!(return_thunk(), thunk_array() + 16 * THUNK_SLOT);
    }
}
