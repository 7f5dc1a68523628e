//! Closure trampolines' pre-assembled code on x86-64 (the pools that map
//! it are `trampoline/`): 16 pages of identical trampolines in this
//! crate's text (64 KiB, linked only into programs that use trampolines:
//! the section is garbage-collected otherwise).
//!
//! Every trampoline of the table is the same 32 bytes:
//!
//! ```text
//! +0   f3 0f 1e fa            endbr64                   ; a valid IBT target
//! +4   4c 8b 15 f5 ff 00 00   mov r10, [rip + 0xfff5]   ; slot.data   (+64 KiB)
//! +11  ff 25 f7 ff 00 00      jmp [rip + 0xfff7]        ; slot.target (+64 KiB + 8)
//! +17  cc x 15                int3 padding              ; stops straight-line speculation
//! ```
//!
//! Both loads are RIP-relative with the same displacement from every
//! trampoline, so trampoline `i` of a mapped copy of the table reads slot
//! `i` of whatever 64 KiB follow that copy. That is the whole trick: the
//! code is never written, only mapped again, and each copy gets its own
//! data pages. The table is 16 pages rather than libffi's one so that a
//! growing pool maps 2048 trampolines per `mmap` (and the kernel's
//! fault-around maps them with one fault), not 128.

use super::PAGE_SIZE;

/// Bytes from one trampoline to the next, and from one data slot to the next.
#[doc(hidden)]
pub const STRIDE: usize = 32;

/// Trampolines per page.
#[doc(hidden)]
pub const PER_PAGE: usize = PAGE_SIZE / STRIDE;

/// Pages in the table.
#[doc(hidden)]
pub const TABLE_PAGES: usize = 16;

/// Bytes of the table, and the distance from a trampoline to its slot.
#[doc(hidden)]
pub const SPAN: usize = TABLE_PAGES * PAGE_SIZE;

/// One trampoline as assembled (checked against the table by a test, and
/// against every mapped copy before it is used).
pub(crate) const TRAMPOLINE: [u8; STRIDE] = [
    0xf3, 0x0f, 0x1e, 0xfa, // endbr64
    0x4c, 0x8b, 0x15, 0xf5, 0xff, 0x00, 0x00, // mov r10, [rip + 65525]
    0xff, 0x25, 0xf7, 0xff, 0x00, 0x00, // jmp [rip + 65527]
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
];

/// The table's symbol: `altpatch_v1_<tag>_trampoline_table`, with the tag
/// of this copy of the crate (see [`records`](mod@crate::records)), so two
/// copies in one binary each link their own table.
macro_rules! table_symbol {
    () => {
        concat!("altpatch_v1_", env!("ALTPATCH_TAG"), "_trampoline_table")
    };
}

// The table is page-aligned in its own section so its pages hold nothing
// else and can be mapped again from the file by their offset. `.rept`
// makes each copy byte-identical; the displacements are fixed numbers (not
// label arithmetic) because they must not depend on the copy's position.
core::arch::global_asm!(
    ".pushsection .text.altpatch_v1_trampolines,\"ax\",@progbits",
    ".balign 4096",
    concat!(".globl ", table_symbol!()),
    concat!(".hidden ", table_symbol!()),
    concat!(".type ", table_symbol!(), ",@object"),
    concat!(table_symbol!(), ":"),
    ".rept 2048",
    "endbr64",
    "mov r10, qword ptr [rip + 65525]",
    "jmp qword ptr [rip + 65527]",
    ".balign 32, 0xcc",
    ".endr",
    concat!(".size ", table_symbol!(), ", 65536"),
    ".popsection",
);

unsafe extern "C" {
    #[link_name = table_symbol!()]
    static TABLE: [u8; SPAN];
}

/// The table as linked into this object's text.
#[doc(hidden)]
pub fn table() -> &'static [u8; SPAN] {
    // SAFETY: the symbol is the 64 KiB table above, in read+exec text
    // that stays mapped for the life of the object containing this code.
    unsafe { &TABLE }
}

/// Whether `bytes` hold exactly the trampoline table.
#[doc(hidden)]
pub fn is_table(bytes: &[u8]) -> bool {
    bytes.len() == SPAN && bytes.chunks_exact(STRIDE).all(|t| t == TRAMPOLINE)
}

/// One entry of a closure trampoline: the target for closures whose
/// arguments take `$n` integer registers. It moves the closure (`r10`, the
/// table's load) into the integer argument register after them, where the
/// handler expects its last argument, and jumps: the caller's arguments,
/// the stack and the return address stay as they are, so the handler
/// returns straight to the caller.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_closure_entry {
    ($entry:ident, $n:tt, $handler:ident, ($($A:ident),*)) => {
        #[unsafe(naked)]
        unsafe extern "C" fn $entry<F: Fn($($A),*) -> R, R, $($A),*>() {
            core::arch::naked_asm!(
                "endbr64",
                concat!("mov ", $crate::arch::closure_arg_reg!($n), ", r10"),
                "jmp {handler}",
                handler = sym $handler::<F, R, $($A),*>,
            )
        }
    };
}
#[doc(hidden)]
pub use crate::__altpatch_closure_entry as closure_entry;

/// The SysV integer argument register number `$n` (0-based).
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_closure_arg_reg {
    (0) => {
        "rdi"
    };
    (1) => {
        "rsi"
    };
    (2) => {
        "rdx"
    };
    (3) => {
        "rcx"
    };
    (4) => {
        "r8"
    };
    (5) => {
        "r9"
    };
}
#[doc(hidden)]
pub use crate::__altpatch_closure_arg_reg as closure_arg_reg;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_2048_copies_of_the_documented_trampoline() {
        let t = table();
        assert_eq!(t.as_ptr() as usize % PAGE_SIZE, 0, "table not page-aligned");
        assert!(is_table(t), "first trampoline: {:02x?}", &t[..STRIDE]);
    }

    #[test]
    fn every_trampoline_reads_the_slot_one_page_ahead() {
        let t = table();
        let at = t.as_ptr() as u64;
        let mut decoder = iced_x86::Decoder::with_ip(64, &t[..STRIDE], at, 0);
        let endbr = decoder.decode();
        assert_eq!(endbr.mnemonic(), iced_x86::Mnemonic::Endbr64);
        let load = decoder.decode();
        assert_eq!(load.memory_displacement64(), at + SPAN as u64);
        assert_eq!(load.op0_register(), iced_x86::Register::R10);
        let jump = decoder.decode();
        assert_eq!(jump.mnemonic(), iced_x86::Mnemonic::Jmp);
        assert_eq!(jump.memory_displacement64(), at + SPAN as u64 + 8);
    }
}
