//! Moving code: re-basing the relative operands of instructions assembled at
//! one address so they work at another.

use core::fmt;

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};

/// Why code could not be moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocError {
    /// The bytes at this offset of the code are not a valid instruction.
    Invalid {
        /// Offset in the code.
        offset: usize,
    },
    /// A relative operand at this offset cannot reach its target from the new
    /// address with the displacement width it has.
    OutOfRange {
        /// Offset of the instruction in the code.
        offset: usize,
        /// The absolute target it must keep reaching.
        target: u64,
        /// Displacement width in bytes.
        width: usize,
    },
    /// The output buffer is shorter than the code.
    ShortBuffer,
}

impl fmt::Display for RelocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocError::Invalid { offset } => {
                write!(f, "invalid instruction at offset {offset}")
            }
            RelocError::OutOfRange {
                offset,
                target,
                width,
            } => write!(
                f,
                "instruction at offset {offset} cannot reach {target:#x} with a {}-bit displacement from its new address",
                width * 8
            ),
            RelocError::ShortBuffer => f.write_str("output buffer shorter than the code"),
        }
    }
}

impl core::error::Error for RelocError {}

/// Copies `code`, assembled at address `from`, into `out` so that it works at
/// address `to`.
///
/// Every relative operand — `call`/`jmp`/`jcc` with rel8 or rel32 (and the
/// other near branches: `loop`, `jrcxz`, `xbegin`), and RIP-relative memory
/// operands — whose target lies outside `from..=from + code.len()` gets a
/// new displacement that reaches the same absolute target from `to`. Targets
/// inside the code (including its end, which is where execution continues
/// after it) move with it and are left alone. A displacement that no longer
/// fits is an error, never a truncation.
///
/// ```
/// use altpatch::x86::relocate;
/// // call +0x10 (to 0x1015), assembled at 0x1000, moved to 0x2000.
/// let code = [0xe8, 0x10, 0, 0, 0];
/// let mut out = [0; 5];
/// relocate(&code, 0x1000, 0x2000, &mut out).unwrap();
/// assert_eq!(out, [0xe8, 0x10, 0xf0, 0xff, 0xff]); // 0x1015 - 0x2005
/// ```
pub fn relocate(code: &[u8], from: usize, to: usize, out: &mut [u8]) -> Result<(), RelocError> {
    if out.len() < code.len() {
        return Err(RelocError::ShortBuffer);
    }
    out[..code.len()].copy_from_slice(code);
    let inside = |t: u64| t >= from as u64 && t <= (from + code.len()) as u64;
    let mut decoder = Decoder::with_ip(64, code, from as u64, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        let offset = decoder.position();
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return Err(RelocError::Invalid { offset });
        }
        let consts = decoder.get_constant_offsets(&insn);
        let new_end = (to + offset + insn.len()) as i64;
        let is_branch = (0..insn.op_count()).any(|i| {
            matches!(
                insn.op_kind(i),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
        });
        if is_branch && consts.has_immediate() {
            let target = insn.near_branch_target();
            if !inside(target) {
                let width = consts.immediate_size();
                let at = offset + consts.immediate_offset();
                write_disp(out, at, width, target as i64 - new_end).ok_or(
                    RelocError::OutOfRange {
                        offset,
                        target,
                        width,
                    },
                )?;
            }
        }
        if insn.is_ip_rel_memory_operand() && consts.has_displacement() {
            let target = insn.ip_rel_memory_address();
            if !inside(target) {
                // A RIP-relative displacement is 32 bits in the encoding
                // whatever size the decoder reports it as.
                let at = offset + consts.displacement_offset();
                write_disp(out, at, 4, target as i64 - new_end).ok_or(RelocError::OutOfRange {
                    offset,
                    target,
                    width: 4,
                })?;
            }
        }
    }
    Ok(())
}

/// Writes `disp` as a `width`-byte little-endian displacement, if it fits.
fn write_disp(out: &mut [u8], at: usize, width: usize, disp: i64) -> Option<()> {
    match width {
        1 => out[at] = i8::try_from(disp).ok()? as u8,
        2 => out[at..at + 2].copy_from_slice(&i16::try_from(disp).ok()?.to_le_bytes()),
        4 => out[at..at + 4].copy_from_slice(&i32::try_from(disp).ok()?.to_le_bytes()),
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rip_relative_lea_is_rebased() {
        // lea rax, [rip + 0x10]  -> target from + 7 + 0x10
        let code = [0x48, 0x8d, 0x05, 0x10, 0, 0, 0];
        let mut out = [0; 7];
        relocate(&code, 0x1000, 0x1100, &mut out).unwrap();
        let d = i32::from_le_bytes(out[3..7].try_into().unwrap());
        assert_eq!(0x1100 + 7 + d as i64, 0x1000 + 7 + 0x10);
    }

    #[test]
    fn internal_targets_stay() {
        // jmp +0 (to the end of the code), jne -2 (to itself)
        let code = [0x75, 0xfe, 0xeb, 0x00];
        let mut out = [0; 4];
        relocate(&code, 0x1000, 0x9000, &mut out).unwrap();
        assert_eq!(out, code);
    }

    #[test]
    fn short_branch_out_of_reach_is_an_error() {
        // jmp rel8 to 0x1000 + 2 + 0x20, moved 1 MiB away.
        let code = [0xeb, 0x20];
        let mut out = [0; 2];
        let e = relocate(&code, 0x1000, 0x10_1000, &mut out).unwrap_err();
        assert!(
            matches!(e, RelocError::OutOfRange { width: 1, .. }),
            "{e:?}"
        );
        // jcc rel32 far away is fine.
        let code = [0x0f, 0x84, 0x00, 0x01, 0, 0];
        let mut out = [0; 6];
        relocate(&code, 0x1000, 0x10_1000, &mut out).unwrap();
    }

    #[test]
    fn invalid_code_is_an_error() {
        let mut out = [0; 2];
        assert_eq!(
            relocate(&[0x0f, 0xff], 0, 0, &mut out),
            Err(RelocError::Invalid { offset: 0 })
        );
    }
}
