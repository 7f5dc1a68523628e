//! The forms the architecture-neutral layers ask about at a site: "is this
//! a NOP", "is this a call to T", "write a jump to T here". Plans,
//! static keys, static calls and ifuncs speak only these words, so a second
//! architecture answers them in its own module and those layers do not
//! change.

use super::decode::{BranchKind, is_gap, is_single_nop, rel_branch};
use super::encode::{Encoded, NOP5, OutOfRange, call_rel32, jmp_rel8, jmp_rel32, nop};
use crate::short::short_eq;

/// Length of the direct call or jump the patcher writes at a branch site
/// (`call rel32` / `jmp rel32`), and of [`BRANCH_NOP`].
pub const BRANCH_LEN: usize = 5;

/// The NOP a branch site holds when it branches nowhere (a static key's
/// default, a static call set to none): one instruction of [`BRANCH_LEN`]
/// bytes, so a thread is never inside it.
pub const BRANCH_NOP: [u8; BRANCH_LEN] = NOP5;

/// What a branch site holds when it returns instead (a tail call set to
/// none, a trampoline's "none"): `ret`, then `int3` filler that stops
/// straight-line speculation.
pub const BRANCH_RET: [u8; BRANCH_LEN] = [0xc3, 0xcc, 0xcc, 0xcc, 0xcc];

/// `call target` written at `at` (`e8 rel32`).
#[inline]
pub fn call_to(at: usize, target: usize) -> Result<Encoded, OutOfRange> {
    call_rel32(at, target)
}

/// `jmp target` written at `at`, [`BRANCH_LEN`] bytes.
#[inline]
pub fn jump_to(at: usize, target: usize) -> Result<Encoded, OutOfRange> {
    jmp_rel32(at, target)
}

/// Whether `at` can hold a [`call_to`] or [`jump_to`] `target`.
#[inline]
pub fn reaches(at: usize, target: usize) -> bool {
    call_rel32(at, target).is_ok()
}

/// A jump to `target` of exactly `len` bytes at `at` (the canonical form
/// an undo writes back), if the architecture has one of that length.
pub fn jump_of_len(at: usize, target: usize, len: usize) -> Option<Encoded> {
    match len {
        BRANCH_LEN => jmp_rel32(at, target).ok(),
        2 => jmp_rel8(at, target).ok(),
        _ => None,
    }
}

/// A call to `target` of exactly `len` bytes at `at`.
pub fn call_of_len(at: usize, target: usize, len: usize) -> Option<Encoded> {
    (len == BRANCH_LEN)
        .then(|| call_rel32(at, target).ok())
        .flatten()
}

/// The one NOP instruction of exactly `len` bytes, if there is one.
#[inline]
pub fn nop_of_len(len: usize) -> Option<&'static [u8]> {
    nop(len)
}

/// Whether `found` is one NOP instruction (any encoding an assembler
/// picks), the recommended 5-byte form checked without decoding.
#[inline]
pub fn is_nop(found: &[u8]) -> bool {
    short_eq(found, &NOP5) || is_single_nop(found)
}

/// Whether `found` is padding that falls through to its end.
#[inline]
pub fn is_padding(found: &[u8]) -> bool {
    is_gap(found)
}

/// The target of `found` at `at` if it is exactly one direct call.
#[inline]
pub fn call_target(found: &[u8], at: usize) -> Option<usize> {
    branch_target(found, at, 0xe8, BranchKind::Call)
}

/// The target of `found` at `at` if it is exactly one direct unconditional
/// jump (any length).
#[inline]
pub fn jump_target(found: &[u8], at: usize) -> Option<usize> {
    branch_target(found, at, 0xe9, BranchKind::Jmp)
}

/// `found` at `at` if it is exactly `call rel32` or `jmp rel32`, the forms
/// this crate writes, read by hand: what it does and its target.
#[inline]
pub(crate) fn rel32_branch(found: &[u8], at: usize) -> Option<(BranchKind, usize)> {
    let [op @ (0xe8 | 0xe9), d @ ..] = found else {
        return None;
    };
    let d = <[u8; 4]>::try_from(d).ok()?;
    let kind = if *op == 0xe8 {
        BranchKind::Call
    } else {
        BranchKind::Jmp
    };
    Some((
        kind,
        (at as i64 + 5 + i32::from_le_bytes(d) as i64) as usize,
    ))
}

/// The forms this crate writes are read without decoding
/// ([`rel32_branch`]); anything else goes to the decoder.
#[inline]
fn branch_target(found: &[u8], at: usize, opcode: u8, kind: BranchKind) -> Option<usize> {
    if found.first() == Some(&opcode)
        && let Some((_, target)) = rel32_branch(found, at)
    {
        return Some(target);
    }
    rel_branch(found, at as u64)
        .filter(|b| b.kind == kind)
        .map(|b| b.target as usize)
}

/// Internal: the instruction of a static-branch site, as assembler text
/// for the `asm!` goto of `static_branch_likely!`/`unlikely!`: a jump to
/// the `{target}` label when the `{jump}` operand is 1, else
/// [`BRANCH_NOP`]. Both are [`BRANCH_LEN`] bytes.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_branch_site {
    () => {
        concat!(
            ".if {jump}\n",
            ".byte 0xe9\n",
            ".long {target} - 4 - .\n",
            ".else\n",
            ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n",
            ".endif",
        )
    };
}

/// What `__altpatch_site_pad!` fills a grown `alternative!` site with
/// (one-byte NOPs): the bytes of an unpatched site past its default.
pub fn fill_site_pad(buf: &mut [u8]) {
    buf.fill(0x90);
}

/// Internal: the directive of `alternative!`'s template that grows the
/// site (from label `8660`) to the length of the replacement between labels
/// `8671` and `8672`, if that is longer: one-byte NOPs (`0x90`), which the
/// replacement overwrites and the default's copy never runs.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_site_pad {
    () => {
        ".skip -((((8672f - 8671f) - (. - 8660b)) > 0) * ((8672f - 8671f) - (. - 8660b))), 0x90\n"
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_forms_read_back() {
        let at = 0x40_0000;
        for t in [at - 0x100, at + 5, at + 0x7000_0000] {
            assert_eq!(call_target(&call_to(at, t).unwrap(), at), Some(t));
            assert_eq!(jump_target(&jump_to(at, t).unwrap(), at), Some(t));
            assert_eq!(call_target(&jump_to(at, t).unwrap(), at), None);
            assert_eq!(jump_target(&call_to(at, t).unwrap(), at), None);
        }
        // A short jump is a jump too (the decoder's path).
        let j8 = jump_of_len(at, at + 0x20, 2).unwrap();
        assert_eq!(jump_target(&j8, at), Some(at + 0x20));
        assert!(call_of_len(at, at + 0x20, 2).is_none());
        assert!(is_nop(&BRANCH_NOP) && is_nop(&[0x66, 0x90]) && !is_nop(&[0x90, 0x90]));
        assert!(!reaches(at, at + (1 << 32)));
    }
}
