//! Retpoline audit: indirect branches that do not go through a thunk.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};
use object::elf;
use object::endian::LittleEndian as LE;
use object::read::elf::Sym as _;

use super::{ElfError, Parsed, corrupt, exec_bytes_at, parse};
use crate::sites::names;

/// An indirect `call` or `jmp` (through a register or memory) in a function
/// of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndirectBranch {
    /// Its address (link time).
    pub addr: u64,
    /// The function containing it.
    pub function: String,
    /// Its offset in the function.
    pub offset: u64,
    /// The instruction, disassembled (AT&T syntax).
    pub text: String,
}

impl fmt::Display for IndirectBranch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} <{}+{:#x}>: {}",
            self.addr, self.function, self.offset, self.text
        )
    }
}

/// Calls `f(name, address, bytes)` for every function symbol (`STT_FUNC`,
/// non-zero size) whose bytes lie in an executable section.
pub(crate) fn for_each_function<'d>(
    p: &Parsed<'d>,
    mut f: impl FnMut(&'d [u8], u64, &'d [u8]),
) -> Result<(), ElfError> {
    for sym in p.symbols.iter() {
        if sym.st_type() != elf::STT_FUNC || sym.is_undefined(LE) {
            continue;
        }
        let (addr, size) = (sym.st_value(LE), sym.st_size(LE));
        if size == 0 {
            continue;
        }
        let Some((base, data)) = exec_bytes_at(p, addr, size) else {
            continue;
        };
        let name = p.symbols.symbol_name(LE, sym).map_err(corrupt)?;
        let start = (addr - base) as usize;
        f(name, addr, &data[start..start + size as usize]);
    }
    Ok(())
}

/// Decodes `code` at `ip`, continuing past undecodable bytes.
pub(crate) fn decode_all(code: &[u8], ip: u64, mut f: impl FnMut(&Instruction)) {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if !insn.is_invalid() {
            f(&insn);
        }
    }
}

/// Every indirect `call`/`jmp` in the functions of the linked image `data`
/// that does not go through a retpoline thunk — what objtool's retpoline
/// validation reports. Functions named in `allow`, and the thunks
/// themselves, are skipped.
///
/// An empty result means every indirect branch the image's functions make
/// goes through `__x86_indirect_thunk_<reg>`.
pub fn audit(data: &[u8], allow: &[&str]) -> Result<Vec<IndirectBranch>, ElfError> {
    let p = parse(data)?;
    let mut found = Vec::new();
    let mut fmt = iced_x86::GasFormatter::new();
    for_each_function(&p, |name, addr, code| {
        let name = String::from_utf8_lossy(name);
        if allow.contains(&name.as_ref())
            || name.starts_with(names::INDIRECT_THUNK_PREFIX)
            || name == names::RETURN_THUNK
        {
            return;
        }
        decode_all(code, addr, |insn| {
            let indirect = matches!(insn.mnemonic(), Mnemonic::Call | Mnemonic::Jmp)
                && matches!(insn.op0_kind(), OpKind::Register | OpKind::Memory);
            if indirect {
                let mut text = String::new();
                iced_x86::Formatter::format(&mut fmt, insn, &mut text);
                found.push(IndirectBranch {
                    addr: insn.ip(),
                    function: name.clone().into_owned(),
                    offset: insn.ip() - addr,
                    text,
                });
            }
        });
    })?;
    found.sort_by_key(|b| b.addr);
    Ok(found)
}
