//! A64 encodings of the instructions altpatch writes, with their range
//! checks (Arm ARM, "A64 Instruction Set Encoding"). Every instruction is
//! one little-endian 32-bit word at a 4-byte-aligned address; a branch's
//! offset counts words from the instruction itself.

use core::fmt;

/// `NOP` (`HINT #0`): what a disabled static-branch site holds.
pub const NOP: u32 = 0xd503_201f;
/// `BRK #0xa1ba`: the breakpoint altpatch's own live protocol would write
/// (a debugger's `BRK #0` and the kernel's uprobe `BRK #0x5` stay
/// distinguishable from it by the immediate).
pub const BRK_ALTPATCH: u32 = brk(0xa1ba);
/// `RET` (`RET X30`).
pub const RET: u32 = 0xd65f_03c0;

/// `BRK #imm`.
pub const fn brk(imm: u16) -> u32 {
    0xd420_0000 | (imm as u32) << 5
}

/// A general-purpose register number, 0..=30 (`X0`..`X30`); 31 names `XZR`
/// or `SP` depending on the instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reg(u8);

impl Reg {
    /// `X30`, the link register `BL`/`BLR` write.
    pub const LR: Reg = Reg(30);
    /// `X16` (`IP0`), the register the ABI lets veneers and PLT stubs
    /// clobber.
    pub const IP0: Reg = Reg(16);
    /// `X17` (`IP1`).
    pub const IP1: Reg = Reg(17);

    /// Register `n`, if `n <= 31`.
    pub const fn new(n: u8) -> Option<Reg> {
        if n <= 31 { Some(Reg(n)) } else { None }
    }

    /// Its number.
    pub const fn number(self) -> u8 {
        self.0
    }
}

/// A condition code of `B.cond` (the low four bits of the instruction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)] // the Arm ARM's names
pub enum Cond {
    Eq = 0,
    Ne,
    Cs,
    Cc,
    Mi,
    Pl,
    Vs,
    Vc,
    Hi,
    Ls,
    Ge,
    Lt,
    Gt,
    Le,
    Al,
}

impl Cond {
    /// The opposite condition (what a branch *over* a sequence tests).
    /// `Al` has none.
    pub const fn inverted(self) -> Option<Cond> {
        if matches!(self, Cond::Al) {
            return None;
        }
        Some(Cond::from_bits(self as u8 ^ 1))
    }

    /// The condition whose code is `bits & 0xf` (`0b1111`, "never", is
    /// executed as always and read as `Al`).
    pub const fn from_bits(bits: u8) -> Cond {
        match bits & 0xf {
            0 => Cond::Eq,
            1 => Cond::Ne,
            2 => Cond::Cs,
            3 => Cond::Cc,
            4 => Cond::Mi,
            5 => Cond::Pl,
            6 => Cond::Vs,
            7 => Cond::Vc,
            8 => Cond::Hi,
            9 => Cond::Ls,
            10 => Cond::Ge,
            11 => Cond::Lt,
            12 => Cond::Gt,
            13 => Cond::Le,
            _ => Cond::Al,
        }
    }
}

/// The landing pads of Branch Target Identification (`BTI {c, j, jc}`):
/// where an indirect branch may land when the page is guarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bti {
    /// `BTI` alone: no indirect branch lands here.
    None,
    /// `BTI c`: calls (`BLR`, and `BR` through `X16`/`X17`).
    C,
    /// `BTI j`: jumps (`BR`).
    J,
    /// `BTI jc`: both.
    Jc,
}

/// `BTI` with the given targets.
pub const fn bti(kind: Bti) -> u32 {
    0xd503_241f
        | (match kind {
            Bti::None => 0,
            Bti::C => 2,
            Bti::J => 4,
            Bti::Jc => 6,
        }) << 5
}

/// Why an instruction cannot be encoded at an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The target lies outside what the instruction's immediate reaches.
    OutOfRange {
        /// The instruction's address.
        from: usize,
        /// The target.
        to: usize,
        /// How far the instruction reaches either way, in bytes.
        reach: u64,
    },
    /// The instruction or a branch target is not 4-byte aligned.
    Misaligned {
        /// The offending address.
        addr: usize,
    },
    /// An operand the form does not take (`TBZ` of a bit above 63; the
    /// bit number also picks the `W` or `X` form).
    Operand(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::OutOfRange { from, to, reach } => write!(
                f,
                "{to:#x} is out of reach of an instruction at {from:#x} (±{reach:#x} bytes)"
            ),
            EncodeError::Misaligned { addr } => {
                write!(f, "{addr:#x} is not 4-byte aligned")
            }
            EncodeError::Operand(what) => write!(f, "invalid operand: {what}"),
        }
    }
}

impl core::error::Error for EncodeError {}

/// The signed offset `to - from` as a field of `bits` bits counting
/// `1 << shift`-byte units, or why not.
pub(super) fn field(from: usize, to: usize, bits: u32, shift: u32) -> Result<u32, EncodeError> {
    let unit = 1u64 << shift;
    let delta = (to as i64).wrapping_sub(from as i64);
    if shift == 2 {
        aligned(from)?;
        aligned(to)?;
    }
    let reach = unit << (bits - 1);
    if delta < -(reach as i64) || delta > reach as i64 - unit as i64 {
        return Err(EncodeError::OutOfRange { from, to, reach });
    }
    Ok(((delta >> shift) as u32) & ((1u32 << bits) - 1))
}

/// `B to` at `from` (±128 MiB).
///
/// ```
/// use altpatch::aarch64::{self, encode};
/// assert_eq!(encode::b(0x1000, 0x1040), Ok(0x1400_0010));
/// assert!(encode::b(0, 128 << 20).is_err()); // one word too far
/// assert_eq!(aarch64::branch_target(0x1400_0010, 0x1000), Some(0x1040));
/// ```
pub fn b(from: usize, to: usize) -> Result<u32, EncodeError> {
    Ok(0x1400_0000 | field(from, to, 26, 2)?)
}

/// `BL to` at `from` (±128 MiB).
pub fn bl(from: usize, to: usize) -> Result<u32, EncodeError> {
    Ok(0x9400_0000 | field(from, to, 26, 2)?)
}

/// `B.cond to` at `from` (±1 MiB).
pub fn b_cond(from: usize, to: usize, cond: Cond) -> Result<u32, EncodeError> {
    Ok(0x5400_0000 | field(from, to, 19, 2)? << 5 | cond as u32)
}

/// `CBZ`/`CBNZ` (`nonzero`) of `rt`, 64-bit (`wide`) or 32-bit, to `to`
/// (±1 MiB).
pub fn cbz(from: usize, to: usize, rt: Reg, wide: bool, nonzero: bool) -> Result<u32, EncodeError> {
    Ok((wide as u32) << 31
        | 0x3400_0000
        | (nonzero as u32) << 24
        | field(from, to, 19, 2)? << 5
        | rt.0 as u32)
}

/// `TBZ`/`TBNZ` (`nonzero`) of bit `bit` of `rt` to `to` (±32 KiB).
pub fn tbz(from: usize, to: usize, rt: Reg, bit: u8, nonzero: bool) -> Result<u32, EncodeError> {
    if bit > 63 {
        return Err(EncodeError::Operand("TBZ tests bits 0..=63"));
    }
    let b5 = (bit >> 5) as u32;
    let b40 = (bit & 0x1f) as u32;
    Ok(b5 << 31
        | 0x3600_0000
        | (nonzero as u32) << 24
        | b40 << 19
        | field(from, to, 14, 2)? << 5
        | rt.0 as u32)
}

/// An instruction's address must be a word's.
pub(super) fn aligned(from: usize) -> Result<(), EncodeError> {
    if !from.is_multiple_of(4) {
        return Err(EncodeError::Misaligned { addr: from });
    }
    Ok(())
}

/// `ADR rd, to` at `from` (±1 MiB, any byte).
pub fn adr(from: usize, to: usize, rd: Reg) -> Result<u32, EncodeError> {
    aligned(from)?;
    let imm = field(from, to, 21, 0)?;
    Ok(0x1000_0000 | (imm & 3) << 29 | (imm >> 2) << 5 | rd.0 as u32)
}

/// `ADRP rd, to` at `from`: the 4 KiB page of `to` (±4 GiB of pages).
pub fn adrp(from: usize, to: usize, rd: Reg) -> Result<u32, EncodeError> {
    aligned(from)?;
    // The reach is in pages; an error names the caller's addresses.
    let imm = field(from & !0xfff, to & !0xfff, 21, 12).map_err(|e| match e {
        EncodeError::OutOfRange { reach, .. } => EncodeError::OutOfRange { from, to, reach },
        e => e,
    })?;
    Ok(0x9000_0000 | (imm & 3) << 29 | (imm >> 2) << 5 | rd.0 as u32)
}

/// What a literal load reads (the `opc` and `V` fields of `LDR (literal)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Literal {
    /// `LDR Wt`.
    W,
    /// `LDR Xt`.
    X,
    /// `LDRSW Xt`.
    Sw,
    /// `PRFM`.
    Prfm,
    /// `LDR St`.
    S,
    /// `LDR Dt`.
    D,
    /// `LDR Qt`.
    Q,
}

/// `LDR (literal)` of kind `kind` into `rt` from `to` (±1 MiB, 4-aligned).
pub fn ldr_literal(from: usize, to: usize, rt: Reg, kind: Literal) -> Result<u32, EncodeError> {
    let (opc, v) = match kind {
        Literal::W => (0, 0),
        Literal::X => (1, 0),
        Literal::Sw => (2, 0),
        Literal::Prfm => (3, 0),
        Literal::S => (0, 1),
        Literal::D => (1, 1),
        Literal::Q => (2, 1),
    };
    Ok(opc << 30 | 0x1800_0000 | v << 26 | field(from, to, 19, 2)? << 5 | rt.0 as u32)
}

/// `BR rn`.
pub const fn br(rn: Reg) -> u32 {
    0xd61f_0000 | (rn.0 as u32) << 5
}

/// `BLR rn`.
pub const fn blr(rn: Reg) -> u32 {
    0xd63f_0000 | (rn.0 as u32) << 5
}
