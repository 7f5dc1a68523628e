//! The static-call trampoline on x86-64: `endbr64`, `jmp rel32` (or the
//! "none" `ret`), the `ud1` signature that marks it for validation, `int3`
//! padding to 16 bytes. An ifunc's stub is one too. The assembly the
//! macros place in users' code is `__altpatch_trampoline_body!` below;
//! what an update checks and rewrites is described by the constants.

use super::encode::ENDBR64;
use super::site::BRANCH_RET;

/// The bytes that follow a trampoline's `jmp`: `ud1 %esp, %ecx`, at
/// [`TRAMPOLINE_JMP`]` + 5`.
pub const TRAMPOLINE_SIGNATURE: [u8; 3] = [0x0f, 0xb9, 0xcc];
/// Where a trampoline's `jmp rel32` (or its "none" `ret`) starts: after
/// the [`ENDBR64`] at its first byte.
pub const TRAMPOLINE_JMP: usize = ENDBR64.len();
/// The bytes of a trampoline an update checks: `endbr64`, `jmp rel32`
/// and the signature.
pub const TRAMPOLINE_LEN: usize = TRAMPOLINE_JMP + 5 + TRAMPOLINE_SIGNATURE.len();
/// Every trampoline's alignment and padded size: 16, so its
/// [`TRAMPOLINE_LEN`] bytes never straddle a 64-byte fetch block (8 would
/// not do: a trampoline at 56 mod 64 has its `jmp` at 60..65).
pub const TRAMPOLINE_ALIGN: usize = 16;

/// Whether `bytes` (at least [`TRAMPOLINE_LEN`] of them) are a trampoline:
/// `endbr64`, a `jmp rel32` or `ret` + `int3` filler, and the signature.
///
/// ```
/// use altpatch::static_call::{is_trampoline, ENDBR64, TRAMPOLINE_SIGNATURE};
/// let mut t = [0xccu8; 16];
/// t[..4].copy_from_slice(&ENDBR64);
/// t[4..9].copy_from_slice(&[0xe9, 0x10, 0, 0, 0]);
/// t[9..12].copy_from_slice(&TRAMPOLINE_SIGNATURE);
/// assert!(is_trampoline(&t));
/// t[..4].copy_from_slice(&[0x0f, 0x1f, 0x40, 0x00]); // a NOP4, no endbr64
/// assert!(!is_trampoline(&t));
/// ```
pub fn is_trampoline(bytes: &[u8]) -> bool {
    let Some(b) = bytes.get(..TRAMPOLINE_LEN) else {
        return false;
    };
    let (endbr, rest) = b.split_at(TRAMPOLINE_JMP);
    let (branch, sig) = rest.split_at(5);
    endbr == ENDBR64 && sig == TRAMPOLINE_SIGNATURE && (branch[0] == 0xe9 || branch == BRANCH_RET)
}

/// Internal: the code of a static-call trampoline, and of an ifunc's stub
/// (which is one): `endbr64`, `jmp {target}`, the `0f b9 cc` signature
/// (`altpatch::static_call::TRAMPOLINE_SIGNATURE`),
/// then `int3` padding to 16 bytes (see
/// `altpatch::static_call::TRAMPOLINE_ALIGN`).
///
/// `endbr64` first, because the trampoline's address is one the crate
/// hands out (`NAME::static_call().trampoline()`, an ifunc's stub kept in
/// a `#[used]` static) and may be called indirectly: under CET indirect
/// branch tracking an indirect branch must land on `endbr64`. Elsewhere it
/// is a 4-byte NOP. Direct call sites reach it too (they call the
/// function's first byte, which is what their relocations say).
///
/// The padding makes the section's alignment 16, so every trampoline
/// starts 16-byte aligned and its 12 bytes never straddle a 64-byte fetch
/// block (16 divides 64; with 8-byte alignment a trampoline at 56 mod 64
/// would put its `jmp` at 60..65, across two blocks). Packed at 4 bytes by
/// the linker, a `jmp` split across two blocks cost a call through it
/// ~25 % more (benches/calls.rs).
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_trampoline_body {
    () => {
        concat!(
            ".byte 0xf3, 0x0f, 0x1e, 0xfa\n",
            ".byte 0xe9\n",
            ".long {target} - 4 - .\n",
            ".byte 0x0f, 0xb9, 0xcc\n",
            ".balign 16, 0xcc",
        )
    };
}
