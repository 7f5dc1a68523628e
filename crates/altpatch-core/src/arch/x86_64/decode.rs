//! Decoding with iced-x86, for validating what is at a site before it is
//! changed.
//!
//! Expectations such as "a 5-byte NOP" or "a `call` to this address" are
//! checked by decoding, not by comparing byte strings, because assemblers and
//! compilers choose among several encodings of the same instruction.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

use super::encode::{Cond, INT3};

/// Decodes the single instruction that starts at `bytes\[0\]`, as if located at
/// `ip`. Returns `None` for an invalid or truncated encoding.
pub fn decode_one(bytes: &[u8], ip: u64) -> Option<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() { None } else { Some(insn) }
}

/// Calls `f` for each instruction of `bytes` (located at `ip`) in order.
/// Returns `false` as soon as an encoding is invalid or truncated, or `f`
/// returns `false`.
pub fn for_each_insn(bytes: &[u8], ip: u64, mut f: impl FnMut(&Instruction) -> bool) -> bool {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() || !f(&insn) {
            return false;
        }
    }
    true
}

/// Whether `bytes` is exactly one instruction that does nothing (`nop` in any
/// of its encodings, including `xchg %ax,%ax`).
///
/// ```
/// use altpatch::x86::is_single_nop;
/// assert!(is_single_nop(&[0x0f, 0x1f, 0x44, 0x00, 0x00]));
/// assert!(is_single_nop(&[0x66, 0x90]));
/// assert!(!is_single_nop(&[0x90, 0x90]));
/// assert!(!is_single_nop(&[0xe8, 0, 0, 0, 0]));
/// ```
pub fn is_single_nop(bytes: &[u8]) -> bool {
    match decode_one(bytes, 0) {
        Some(insn) => insn.len() == bytes.len() && insn.mnemonic() == Mnemonic::Nop,
        None => false,
    }
}

/// Whether `bytes` is padding that falls through to its end: a run of NOP
/// instructions, or a `jmp` to the end followed by `int3` filler (as
/// [`fill_gap`](super::fill_gap) writes).
///
/// ```
/// use altpatch::x86::{fill_gap, is_gap};
/// let mut g = [0u8; 40];
/// fill_gap(&mut g);
/// assert!(is_gap(&g));
/// assert!(is_gap(&[0x90, 0x66, 0x90]));
/// assert!(!is_gap(&[0xc3]));
/// ```
pub fn is_gap(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    if let Some(insn) = decode_one(bytes, 0)
        && matches!(insn.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64)
        && insn.near_branch_target() == bytes.len() as u64
    {
        return bytes[insn.len()..].iter().all(|&b| b == INT3);
    }
    for_each_insn(bytes, 0, |insn| insn.mnemonic() == Mnemonic::Nop)
}

/// What kind of direct relative branch an instruction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BranchKind {
    /// `call rel32`.
    Call,
    /// `jmp rel8` or `jmp rel32`.
    Jmp,
    /// `jcc rel8` or `jcc rel32`.
    Jcc(Cond),
}

/// A direct relative branch decoded from text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelBranch {
    /// Call, jump or conditional jump.
    pub kind: BranchKind,
    /// Absolute target address.
    pub target: u64,
    /// Length of the instruction in bytes.
    pub len: usize,
    /// Offset of the displacement field within the instruction.
    pub disp_offset: usize,
    /// Width of the displacement field in bytes (1 or 4).
    pub disp_size: usize,
}

fn cond_of(m: Mnemonic) -> Option<Cond> {
    Some(match m {
        Mnemonic::Jo => Cond::O,
        Mnemonic::Jno => Cond::No,
        Mnemonic::Jb => Cond::B,
        Mnemonic::Jae => Cond::Ae,
        Mnemonic::Je => Cond::E,
        Mnemonic::Jne => Cond::Ne,
        Mnemonic::Jbe => Cond::Be,
        Mnemonic::Ja => Cond::A,
        Mnemonic::Js => Cond::S,
        Mnemonic::Jns => Cond::Ns,
        Mnemonic::Jp => Cond::P,
        Mnemonic::Jnp => Cond::Np,
        Mnemonic::Jl => Cond::L,
        Mnemonic::Jge => Cond::Ge,
        Mnemonic::Jle => Cond::Le,
        Mnemonic::Jg => Cond::G,
        _ => return None,
    })
}

/// Classifies `insn` as a direct relative `call`/`jmp`/`jcc`, if it is one.
/// `loop`, `jrcxz` and friends are not included: they have no 32-bit form and
/// the patcher never writes or expects them.
pub fn rel_branch_of(insn: &Instruction) -> Option<RelBranch> {
    if insn.op_count() != 1 || insn.op0_kind() != OpKind::NearBranch64 {
        return None;
    }
    let (kind, disp_size) = match insn.code() {
        Code::Call_rel32_64 => (BranchKind::Call, 4),
        Code::Jmp_rel8_64 => (BranchKind::Jmp, 1),
        Code::Jmp_rel32_64 => (BranchKind::Jmp, 4),
        Code::Jo_rel8_64
        | Code::Jno_rel8_64
        | Code::Jb_rel8_64
        | Code::Jae_rel8_64
        | Code::Je_rel8_64
        | Code::Jne_rel8_64
        | Code::Jbe_rel8_64
        | Code::Ja_rel8_64
        | Code::Js_rel8_64
        | Code::Jns_rel8_64
        | Code::Jp_rel8_64
        | Code::Jnp_rel8_64
        | Code::Jl_rel8_64
        | Code::Jge_rel8_64
        | Code::Jle_rel8_64
        | Code::Jg_rel8_64 => (BranchKind::Jcc(cond_of(insn.mnemonic())?), 1),
        Code::Jo_rel32_64
        | Code::Jno_rel32_64
        | Code::Jb_rel32_64
        | Code::Jae_rel32_64
        | Code::Je_rel32_64
        | Code::Jne_rel32_64
        | Code::Jbe_rel32_64
        | Code::Ja_rel32_64
        | Code::Js_rel32_64
        | Code::Jns_rel32_64
        | Code::Jp_rel32_64
        | Code::Jnp_rel32_64
        | Code::Jl_rel32_64
        | Code::Jge_rel32_64
        | Code::Jle_rel32_64
        | Code::Jg_rel32_64 => (BranchKind::Jcc(cond_of(insn.mnemonic())?), 4),
        _ => return None,
    };
    Some(RelBranch {
        kind,
        target: insn.near_branch_target(),
        len: insn.len(),
        disp_offset: insn.len() - disp_size,
        disp_size,
    })
}

/// Decodes `bytes` located at `ip` as exactly one direct relative branch.
///
/// ```
/// use altpatch::x86::{rel_branch, BranchKind};
/// let b = rel_branch(&[0xe8, 0x0b, 0, 0, 0], 0x1000).unwrap();
/// assert_eq!((b.kind, b.target, b.len), (BranchKind::Call, 0x1010, 5));
/// ```
pub fn rel_branch(bytes: &[u8], ip: u64) -> Option<RelBranch> {
    let insn = decode_one(bytes, ip)?;
    if insn.len() != bytes.len() {
        return None;
    }
    rel_branch_of(&insn)
}

#[cfg(test)]
mod tests {
    use super::super::encode::*;
    use super::super::reg::{Reg, call_reg};
    use super::*;

    #[test]
    fn all_nops_decode_as_one_nop() {
        for len in 1..=NOP_MAX {
            assert!(is_single_nop(nop(len).unwrap()), "nop{len}");
        }
    }

    #[test]
    fn branches_round_trip() {
        let at = 0x40_0000usize;
        let to = 0x40_1234usize;
        let c = call_rel32(at, to).unwrap();
        let b = rel_branch(&c, at as u64).unwrap();
        assert_eq!((b.kind, b.target as usize), (BranchKind::Call, to));
        let j = jmp_rel32(at, to).unwrap();
        assert_eq!(rel_branch(&j, at as u64).unwrap().kind, BranchKind::Jmp);
        let j8 = jmp_rel8(at, at + 20).unwrap();
        assert_eq!(rel_branch(&j8, at as u64).unwrap().target as usize, at + 20);
        for n in 0..16 {
            let cc = Cond::from_nibble(n);
            let j = jcc_rel32(cc, at, to).unwrap();
            let b = rel_branch(&j, at as u64).unwrap();
            assert_eq!(b.kind, BranchKind::Jcc(cc));
            assert_eq!((b.disp_offset, b.disp_size), (2, 4));
            let j = jcc_rel8(cc, at, at + 7).unwrap();
            assert_eq!(rel_branch(&j, at as u64).unwrap().kind, BranchKind::Jcc(cc));
        }
        assert!(rel_branch(&call_reg(Reg::R11), 0).is_none());
    }
}
