//! Encoders for the handful of x86-64 instructions the patcher writes.
//!
//! Nothing here allocates: every encoder returns an [`Encoded`] value that
//! holds the bytes inline, so the same code serves early boot (before any
//! allocator exists) and the Linux backends.

use core::fmt;
use core::ops::Deref;

/// Longest single NOP instruction this crate emits (11 bytes: `66 66 2e 0f 1f 84 00 ..`).
pub const NOP_MAX: usize = 11;

/// `int3`, the one-byte breakpoint; also used as filler after a jump because it
/// stops straight-line speculation.
pub const INT3: u8 = 0xcc;
/// `ret`.
pub const RET: u8 = 0xc3;
/// `lfence`.
pub const LFENCE: [u8; 3] = [0x0f, 0xae, 0xe8];
/// `serialize` (CPUID.7.0:EDX\[14\]).
pub const SERIALIZE: [u8; 3] = [0x0f, 0x01, 0xe8];
/// The recommended 5-byte NOP (`nopl 0x0(%rax,%rax,1)`), used at static-key
/// and static-call sites.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `endbr64`: the instruction an indirect `call`/`jmp` must land on when
/// CET indirect-branch tracking (IBT) is on; a NOP on every other CPU. The
/// first instruction of every code address this crate hands out (static-call
/// trampolines, ifunc stubs, closure trampolines).
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The recommended multi-byte NOPs, indexed by length (index 0 is empty).
///
/// Lengths 1..=8 are the forms from the Intel SDM; 9..=11 add `cs` and operand
/// size prefixes, which every x86-64 CPU decodes as one instruction.
const NOPS: [&[u8]; NOP_MAX + 1] = [
    &[],
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[
        0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00,
    ],
];

/// The single NOP instruction of exactly `len` bytes, for `1..=11`.
///
/// ```
/// use altpatch::x86::nop;
/// assert_eq!(nop(1), Some(&[0x90][..]));
/// assert_eq!(nop(5), Some(&[0x0f, 0x1f, 0x44, 0x00, 0x00][..]));
/// assert_eq!(nop(12), None);
/// ```
pub fn nop(len: usize) -> Option<&'static [u8]> {
    match len {
        1..=NOP_MAX => Some(NOPS[len]),
        _ => None,
    }
}

/// Fills `buf` with as few instructions as possible that do nothing and fall
/// through to the end of `buf`.
///
/// Up to [`NOP_MAX`] bytes this is one NOP. Beyond that, executing a run of
/// NOPs costs a decode slot each, so the gap becomes a `jmp` to the end of the
/// buffer (`eb` rel8 up to 129 bytes, `e9` rel32 beyond) followed by `int3`
/// filler that is never executed and stops straight-line speculation.
///
/// ```
/// use altpatch::x86::fill_gap;
/// let mut gap = [0u8; 12];
/// fill_gap(&mut gap);
/// assert_eq!(gap[..2], [0xeb, 10]);
/// assert!(gap[2..].iter().all(|&b| b == 0xcc));
/// ```
pub fn fill_gap(buf: &mut [u8]) {
    let len = buf.len();
    if len == 0 {
        return;
    }
    if len <= NOP_MAX {
        buf.copy_from_slice(NOPS[len]);
        return;
    }
    let head = if len - 2 <= i8::MAX as usize {
        buf[0] = 0xeb;
        buf[1] = (len - 2) as u8;
        2
    } else {
        // A text gap never approaches 2 GiB; `len - 5` always fits.
        let rel = (len - 5) as u32;
        buf[0] = 0xe9;
        buf[1..5].copy_from_slice(&rel.to_le_bytes());
        5
    };
    buf[head..].fill(INT3);
}

/// Fills `buf` with the longest NOP instructions, back to back.
///
/// Unlike [`fill_gap`] this never emits a jump, so every byte position that
/// starts an instruction here is reachable by falling through; use it where a
/// thread may be resumed in the middle of the padded range.
///
/// ```
/// use altpatch::x86::fill_nops;
/// let mut pad = [0u8; 13];
/// fill_nops(&mut pad);
/// assert_eq!(pad[0], 0x66); // an 11-byte NOP
/// assert_eq!(pad[11..], [0x66, 0x90]);
/// ```
pub fn fill_nops(buf: &mut [u8]) {
    let mut rest = buf;
    while !rest.is_empty() {
        let n = rest.len().min(NOP_MAX);
        let (head, tail) = rest.split_at_mut(n);
        head.copy_from_slice(NOPS[n]);
        rest = tail;
    }
}

/// Up to 15 bytes of encoded instruction(s), held inline.
///
/// Dereferences to `[u8]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encoded {
    buf: [u8; 15],
    len: u8,
}

impl Encoded {
    /// Copies `bytes` (at most 15) into a new value.
    ///
    /// # Panics
    ///
    /// If `bytes` is longer than 15 bytes, the longest x86 instruction.
    pub const fn from_slice(bytes: &[u8]) -> Self {
        assert!(bytes.len() <= 15, "an x86 instruction is at most 15 bytes");
        let mut buf = [0u8; 15];
        let mut i = 0;
        while i < bytes.len() {
            buf[i] = bytes[i];
            i += 1;
        }
        Encoded {
            buf,
            len: bytes.len() as u8,
        }
    }

    /// The encoded bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// The first 8 bytes of the buffer (zero past the end of the
    /// instruction): one load, for few-byte plans.
    #[inline]
    #[doc(hidden)]
    pub fn head8(&self) -> [u8; 8] {
        let mut h = [0u8; 8];
        h.copy_from_slice(&self.buf[..8]);
        h
    }

    /// Appends NOP padding (one [`fill_gap`] run) up to `len` bytes.
    ///
    /// # Panics
    ///
    /// If `len` is shorter than the current encoding or longer than 15.
    pub fn padded_to(mut self, len: usize) -> Self {
        assert!(len >= self.len as usize && len <= 15);
        fill_gap(&mut self.buf[self.len as usize..len]);
        self.len = len as u8;
        self
    }
}

impl Deref for Encoded {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Encoded({})", crate::hex::HexBytes(self.as_slice()))
    }
}

/// A relative branch target that does not fit the displacement field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    /// Address of the first byte of the branch instruction.
    pub from: usize,
    /// The target it was asked to reach.
    pub to: usize,
    /// Width of the displacement field in bits (8 or 32).
    pub bits: u8,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "branch at {:#x} cannot reach {:#x} with a {}-bit displacement",
            self.from, self.to, self.bits
        )
    }
}

impl core::error::Error for OutOfRange {}

/// The displacement from the end of an instruction at `from` of length
/// `insn_len` to `to`, if it fits in 32 bits.
///
/// ```
/// use altpatch::x86::rel32;
/// assert_eq!(rel32(0x1000, 5, 0x1005), Ok(0));
/// assert_eq!(rel32(0x1000, 5, 0x1000), Ok(-5));
/// assert!(rel32(0x1000, 5, 0x1_0000_1000).is_err());
/// ```
pub fn rel32(from: usize, insn_len: usize, to: usize) -> Result<i32, OutOfRange> {
    let next = from.wrapping_add(insn_len) as i64;
    let disp = (to as i64).wrapping_sub(next);
    i32::try_from(disp).map_err(|_| OutOfRange { from, to, bits: 32 })
}

/// The 8-bit displacement from the end of an instruction at `from` of length
/// `insn_len` to `to`, if it fits.
pub fn rel8(from: usize, insn_len: usize, to: usize) -> Result<i8, OutOfRange> {
    let next = from.wrapping_add(insn_len) as i64;
    let disp = (to as i64).wrapping_sub(next);
    i8::try_from(disp).map_err(|_| OutOfRange { from, to, bits: 8 })
}

fn op_rel32(opcode: &[u8], from: usize, to: usize) -> Result<Encoded, OutOfRange> {
    let len = opcode.len() + 4;
    let disp = rel32(from, len, to)?;
    let mut buf = [0u8; 15];
    buf[..opcode.len()].copy_from_slice(opcode);
    buf[opcode.len()..len].copy_from_slice(&disp.to_le_bytes());
    Ok(Encoded {
        buf,
        len: len as u8,
    })
}

/// `call rel32` (`e8 d32`) at `from` reaching `to`.
///
/// ```
/// use altpatch::x86::call_rel32;
/// assert_eq!(&*call_rel32(0x1000, 0x1010).unwrap(), &[0xe8, 0x0b, 0, 0, 0]);
/// ```
pub fn call_rel32(from: usize, to: usize) -> Result<Encoded, OutOfRange> {
    op_rel32(&[0xe8], from, to)
}

/// `jmp rel32` (`e9 d32`) at `from` reaching `to`.
pub fn jmp_rel32(from: usize, to: usize) -> Result<Encoded, OutOfRange> {
    op_rel32(&[0xe9], from, to)
}

/// `jmp rel8` (`eb d8`) at `from` reaching `to`.
pub fn jmp_rel8(from: usize, to: usize) -> Result<Encoded, OutOfRange> {
    let d = rel8(from, 2, to)?;
    Ok(Encoded::from_slice(&[0xeb, d as u8]))
}

/// An x86 condition code: the low nibble of `jcc` opcodes (`70+cc`, `0f 80+cc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
#[allow(missing_docs)] // the names are the architectural mnemonics
pub enum Cond {
    O = 0,
    No = 1,
    B = 2,
    Ae = 3,
    E = 4,
    Ne = 5,
    Be = 6,
    A = 7,
    S = 8,
    Ns = 9,
    P = 10,
    Np = 11,
    L = 12,
    Ge = 13,
    Le = 14,
    G = 15,
}

impl Cond {
    /// The condition from the low nibble of a `jcc` opcode.
    pub const fn from_nibble(n: u8) -> Cond {
        const ALL: [Cond; 16] = [
            Cond::O,
            Cond::No,
            Cond::B,
            Cond::Ae,
            Cond::E,
            Cond::Ne,
            Cond::Be,
            Cond::A,
            Cond::S,
            Cond::Ns,
            Cond::P,
            Cond::Np,
            Cond::L,
            Cond::Ge,
            Cond::Le,
            Cond::G,
        ];
        ALL[(n & 0xf) as usize]
    }

    /// The opposite condition (flips the low bit, as the encoding does).
    ///
    /// ```
    /// use altpatch::x86::Cond;
    /// assert_eq!(Cond::E.inverted(), Cond::Ne);
    /// assert_eq!(Cond::Ae.inverted(), Cond::B);
    /// ```
    pub fn inverted(self) -> Cond {
        Cond::from_nibble(self as u8 ^ 1)
    }
}

/// `jcc rel32` (`0f 80+cc d32`) at `from` reaching `to`.
pub fn jcc_rel32(cc: Cond, from: usize, to: usize) -> Result<Encoded, OutOfRange> {
    op_rel32(&[0x0f, 0x80 + cc as u8], from, to)
}

/// `jcc rel8` (`70+cc d8`) at `from` reaching `to`.
pub fn jcc_rel8(cc: Cond, from: usize, to: usize) -> Result<Encoded, OutOfRange> {
    let d = rel8(from, 2, to)?;
    Ok(Encoded::from_slice(&[0x70 + cc as u8, d as u8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nops_have_their_length() {
        for (len, n) in NOPS.iter().enumerate() {
            assert_eq!(n.len(), len);
        }
    }

    #[test]
    fn gap_lengths() {
        for len in 0..300 {
            let mut buf = alloc::vec![0u8; len];
            fill_gap(&mut buf);
            if len == 0 {
                continue;
            }
            if len <= NOP_MAX {
                assert_eq!(Some(&buf[..]), nop(len));
            } else if len <= 129 {
                assert_eq!(buf[0], 0xeb);
                assert_eq!(buf[1] as usize + 2, len);
            } else {
                assert_eq!(buf[0], 0xe9);
                let d = i32::from_le_bytes(buf[1..5].try_into().unwrap());
                assert_eq!(d as usize + 5, len);
            }
        }
    }

    #[test]
    fn nop_runs_cover_exactly() {
        for len in 0..40 {
            let mut buf = alloc::vec![0u8; len];
            fill_nops(&mut buf);
            let mut off = 0;
            while off < len {
                let n = (len - off).min(NOP_MAX);
                assert_eq!(&buf[off..off + n], NOPS[n]);
                off += n;
            }
        }
    }

    #[test]
    fn branches_check_range() {
        assert!(call_rel32(0x1000, 0x1000 + (i32::MAX as usize) + 5).is_ok());
        assert!(call_rel32(0x1000, 0x1000 + (i32::MAX as usize) + 6).is_err());
        assert!(jmp_rel32(0x8000_0000, 5).is_ok());
        assert_eq!(&*jmp_rel8(0x100, 0x102 + 127).unwrap(), &[0xeb, 127]);
        assert!(jmp_rel8(0x100, 0x102 + 128).is_err());
        assert_eq!(&*jcc_rel8(Cond::Ne, 0x100, 0x100).unwrap(), &[0x75, 0xfe]);
        assert_eq!(
            &*jcc_rel32(Cond::E, 0x100, 0x106).unwrap(),
            &[0x0f, 0x84, 0, 0, 0, 0]
        );
    }
}
