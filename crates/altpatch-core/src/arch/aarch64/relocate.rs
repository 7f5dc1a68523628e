//! Moving A64 code: which instructions refer to their own address, where
//! they point, and the same instruction re-based for another address.
//!
//! The PC-relative forms are classified by their fixed bits (Arm ARM,
//! "A64 Instruction Set Encoding"); whether a word is an instruction at
//! all, and whether it refers to the PC in a way this module does not
//! re-base, is the decoder's (`yaxpeax-arm`) answer, so a word the
//! classification would copy unchanged while it is PC-relative (a newer
//! extension's form) is refused, never moved wrongly. The decoder knows no
//! SVE or SME instruction yet, so code with those is refused too (safe,
//! not yet movable).

use core::fmt;

use yaxpeax_arch::{Decoder, U8Reader};
use yaxpeax_arm::armv8::a64::{InstDecoder, Operand};

use super::encode::{self, EncodeError, Reg, field};

/// The PC-relative forms this module re-bases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PcForm {
    /// `B`.
    B,
    /// `BL`.
    Bl,
    /// `B.cond` (and `BC.cond`, its "consistent" hint form).
    BCond,
    /// `CBZ`/`CBNZ`.
    Cbz,
    /// `TBZ`/`TBNZ`.
    Tbz,
    /// `ADR`.
    Adr,
    /// `ADRP` (a 4 KiB page).
    Adrp,
    /// `LDR`/`LDRSW`/`PRFM` (literal), general or SIMD registers.
    Literal,
}

/// Which PC-relative form `word` is, by its fixed bits; `None` for every
/// other word (which may still be PC-relative in a form this module does
/// not know: [`rebase`] asks the decoder).
pub fn pc_form(word: u32) -> Option<PcForm> {
    Some(match word {
        w if w & 0xfc00_0000 == 0x1400_0000 => PcForm::B,
        w if w & 0xfc00_0000 == 0x9400_0000 => PcForm::Bl,
        w if w & 0xff00_0000 == 0x5400_0000 => PcForm::BCond,
        w if w & 0x7e00_0000 == 0x3400_0000 => PcForm::Cbz,
        w if w & 0x7e00_0000 == 0x3600_0000 => PcForm::Tbz,
        w if w & 0x9f00_0000 == 0x1000_0000 => PcForm::Adr,
        w if w & 0x9f00_0000 == 0x9000_0000 => PcForm::Adrp,
        w if w & 0x3b00_0000 == 0x1800_0000 => PcForm::Literal,
        _ => return None,
    })
}

/// Sign-extends the `bits`-bit field of `word` at `lsb`, times `1 << shift`.
fn signed(word: u32, lsb: u32, bits: u32, shift: u32) -> i64 {
    let raw = (word >> lsb) & ((1 << bits) - 1);
    (((raw << (32 - bits)) as i32 >> (32 - bits)) as i64) << shift
}

/// The address a PC-relative instruction at `at` refers to (a branch's
/// target, the address `ADR` forms, the page `ADRP` forms, a literal's
/// address); `None` for any other word.
pub fn pc_target(word: u32, at: usize) -> Option<usize> {
    let form = pc_form(word)?;
    let offset = match form {
        PcForm::B | PcForm::Bl => signed(word, 0, 26, 2),
        PcForm::BCond | PcForm::Cbz | PcForm::Literal => signed(word, 5, 19, 2),
        PcForm::Tbz => signed(word, 5, 14, 2),
        PcForm::Adr | PcForm::Adrp => {
            let imm = ((word >> 5) & 0x7ffff) << 2 | (word >> 29) & 3;
            let shift = if form == PcForm::Adrp { 12 } else { 0 };
            signed(imm, 0, 21, shift)
        }
    };
    let base = if form == PcForm::Adrp {
        at & !0xfff
    } else {
        at
    };
    Some((base as i64).wrapping_add(offset) as usize)
}

/// A direct branch's target (`B`, `BL`, `B.cond`, `CBZ`, `TBZ`); `None`
/// for any other word.
pub fn branch_target(word: u32, at: usize) -> Option<usize> {
    match pc_form(word)? {
        PcForm::B | PcForm::Bl | PcForm::BCond | PcForm::Cbz | PcForm::Tbz => pc_target(word, at),
        _ => None,
    }
}

/// Why an instruction cannot be moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebaseError {
    /// The decoder does not know the word as an instruction.
    Unknown {
        /// The word.
        word: u32,
    },
    /// The decoder says the word refers to the PC in a form this module
    /// does not re-base.
    UnknownPcRelative {
        /// The word.
        word: u32,
    },
    /// At the new address the target is out of the instruction's reach.
    Encode(EncodeError),
}

impl fmt::Display for RebaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RebaseError::Unknown { word } => {
                write!(f, "{word:#010x} is not a known A64 instruction")
            }
            RebaseError::UnknownPcRelative { word } => write!(
                f,
                "{word:#010x} refers to its own address in a form that is not re-based"
            ),
            RebaseError::Encode(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for RebaseError {}

/// Whether the decoder reads `word` as an instruction with a PC-relative
/// operand (`Err` if it is not an instruction it knows).
fn decoded_pc_relative(word: u32) -> Result<bool, RebaseError> {
    let bytes = word.to_le_bytes();
    let mut reader = U8Reader::new(&bytes);
    let inst = InstDecoder::default()
        .decode(&mut reader)
        .map_err(|_| RebaseError::Unknown { word })?;
    Ok(inst
        .operands
        .iter()
        .any(|o| matches!(o, Operand::PCOffset(_))))
}

/// `word`, an instruction at `from`, re-based to run at `to` with the same
/// meaning: a PC-relative form gets the offset that reaches its old target
/// from `to`; any other instruction the decoder knows is returned as it
/// is.
///
/// ```
/// use altpatch::aarch64::{encode, rebase};
/// let bl = encode::bl(0x1000, 0x8000).unwrap();
/// let moved = rebase(bl, 0x1000, 0x4000).unwrap();
/// assert_eq!(moved, encode::bl(0x4000, 0x8000).unwrap());
/// assert_eq!(rebase(encode::NOP, 0x1000, 0x4000), Ok(encode::NOP));
/// assert!(rebase(bl, 0x1000, 0x1000_0000).is_err()); // out of BL's reach
/// ```
pub fn rebase(word: u32, from: usize, to: usize) -> Result<u32, RebaseError> {
    // An instruction lives at a word's address, before and after.
    encode::aligned(from).map_err(RebaseError::Encode)?;
    encode::aligned(to).map_err(RebaseError::Encode)?;
    let pc_relative = decoded_pc_relative(word)?;
    let Some(form) = pc_form(word) else {
        return if pc_relative {
            Err(RebaseError::UnknownPcRelative { word })
        } else {
            Ok(word)
        };
    };
    if !pc_relative {
        // The fixed bits say PC-relative, the decoder does not: trust
        // neither.
        return Err(RebaseError::Unknown { word });
    }
    let target = pc_target(word, from).expect("a PC-relative form has a target");
    let rt = Reg::new((word & 0x1f) as u8).expect("five bits");
    let e = RebaseError::Encode;
    match form {
        PcForm::B => encode::b(to, target).map_err(e),
        PcForm::Bl => encode::bl(to, target).map_err(e),
        // The condition (and B.cond's "consistent" bit), the register,
        // the size: every field but the offset is kept.
        PcForm::BCond | PcForm::Cbz | PcForm::Literal => {
            let imm = field(to, target, 19, 2).map_err(e)?;
            Ok(word & !(0x7ffff << 5) | imm << 5)
        }
        PcForm::Tbz => {
            let imm = field(to, target, 14, 2).map_err(e)?;
            Ok(word & !(0x3fff << 5) | imm << 5)
        }
        PcForm::Adr => encode::adr(to, target, rt).map_err(e),
        PcForm::Adrp => encode::adrp(to, target, rt).map_err(e),
    }
}
