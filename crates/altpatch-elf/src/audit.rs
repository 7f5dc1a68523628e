//! Retpoline audit: indirect branches that do not go through a thunk,
//! classified by where the code came from and what the branch is for.

use alloc::string::String;
use alloc::vec::Vec;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use object::elf;
use object::endian::LittleEndian as LE;
use object::read::elf::{SectionHeader as _, Sym as _};

pub use super::audit_allow::AuditAllow;
pub use super::audit_branch::{BranchUse, IndirectBranch};
use super::audit_symbols::{Annotations, SymbolMap};
pub use super::origin::Origin;
use super::origin::{demangle, origin_of};
use super::{ElfError, Parsed, corrupt, exec_bytes_at, parse};
use crate::sites::ThunkNames;

/// What [`audit_with`] found.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    /// Every bypass not allowed, by address: the audit fails if any.
    pub bypasses: Vec<IndirectBranch>,
    /// Bypasses allowed by pattern or origin.
    pub allowed: usize,
    /// Indirect branches the code marks as intended — the crate's own, in
    /// section `altpatch_v1_<tag>_indirect_ok` of each copy of the crate
    /// linked in, and a kernel's `ANNOTATE_RETPOLINE_SAFE` where the image
    /// keeps `.discard.retpoline_safe` or `.discard.annotate_insn`: never
    /// reported.
    pub intended: usize,
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

fn is_indirect(insn: &Instruction) -> bool {
    matches!(insn.mnemonic(), Mnemonic::Call | Mnemonic::Jmp)
        && matches!(insn.op0_kind(), OpKind::Register | OpKind::Memory)
}

/// The addresses of the retpoline thunks (by [`ThunkNames`]), sorted.
fn thunk_addresses(p: &Parsed<'_>, thunks: &ThunkNames) -> Result<Vec<u64>, ElfError> {
    let mut out = Vec::new();
    for sym in p.symbols.iter() {
        if sym.is_undefined(LE) {
            continue;
        }
        let name = p.symbols.symbol_name(LE, sym).map_err(corrupt)?;
        if thunks.is_thunk(name) {
            out.push(sym.st_value(LE));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// What an indirect branch is for: a call, a jump through a table (an
/// indexed memory operand, or a register loaded from a table of 32-bit
/// offsets in the same function: `table_load`), or another jump.
fn branch_use(insn: &Instruction, table_load: bool) -> BranchUse {
    if insn.mnemonic() == Mnemonic::Call {
        BranchUse::Call
    } else if (insn.op0_kind() == OpKind::Memory && insn.memory_index() != Register::None)
        || (insn.op0_kind() == OpKind::Register && table_load)
    {
        BranchUse::JumpTable
    } else {
        BranchUse::TailJump
    }
}

/// The fixed address a branch through memory reads (`call *sym(%rip)`,
/// `call *sym+8`, `jmp *table(,%rax,8)`): where its operand points before
/// any register is added.
fn memory_target(insn: &Instruction) -> Option<u64> {
    (insn.op0_kind() == OpKind::Memory
        && matches!(insn.memory_base(), Register::RIP | Register::None))
    .then(|| insn.memory_displacement64())
}

/// Every indirect `call`/`jmp` of the linked image `data` that does not go
/// through a retpoline thunk — what objtool's retpoline validation reports —
/// with its origin and use, minus what `allow` allows and what the code
/// marks as intended. The thunks themselves are never reported. Code no
/// function symbol covers (hand-written asm between functions) is decoded
/// too and its branches reported, marked
/// [`outside_function`](IndirectBranch::outside_function), never dropped.
///
/// An empty [`Audit::bypasses`] means every indirect branch that is not
/// allowed goes through `__x86_indirect_thunk_<reg>`.
pub fn audit_with(data: &[u8], allow: &AuditAllow) -> Result<Audit, ElfError> {
    let p = parse(data)?;
    let ok = Annotations::read(&p)?;
    let thunks = thunk_addresses(&p, &allow.thunks)?;
    let map = SymbolMap::new(&p)?;
    let mut out = Audit::default();
    let mut fmt = iced_x86::GasFormatter::new();
    // One branch of `function` (its demangled name too), which starts at
    // `start`: intended, allowed, or a bypass.
    let mut report =
        |insn: &Instruction, function: &str, demangled: &str, start: u64, origin, kind, outside| {
            if ok.binary_search(&insn.ip()).is_ok() {
                out.intended += 1;
                return;
            }
            let mut text = String::new();
            iced_x86::Formatter::format(&mut fmt, insn, &mut text);
            let b = IndirectBranch {
                addr: insn.ip(),
                function: function.into(),
                offset: insn.ip() - start,
                text,
                origin,
                kind,
                section: map.section_of(insn.ip()),
                target: memory_target(insn).and_then(|a| map.holding(a)),
                outside_function: outside,
            };
            if allow.allows(&b, demangled) {
                out.allowed += 1;
            } else {
                out.bypasses.push(b);
            }
        };
    // Reused for every function: its indirect branches, found in one pass.
    let mut indirect: Vec<Instruction> = Vec::new();
    for_each_function(&p, |raw, addr, code| {
        if allow.thunks.is_thunk(raw) {
            return;
        }
        // LLVM's jump tables hold 32-bit offsets loaded with
        // `movslq (%base,%idx,4), %reg` before the `jmp *%reg`.
        let mut table_load = false;
        let mut calls_thunks = false;
        indirect.clear();
        decode_all(code, addr, |insn| {
            if is_indirect(insn) {
                indirect.push(*insn);
            } else if matches!(insn.mnemonic(), Mnemonic::Call | Mnemonic::Jmp)
                && insn.op0_kind() == OpKind::NearBranch64
                && thunks.binary_search(&insn.near_branch64()).is_ok()
            {
                calls_thunks = true;
            } else if insn.mnemonic() == Mnemonic::Movsxd
                && insn.op1_kind() == OpKind::Memory
                && insn.memory_index() != Register::None
                && insn.memory_index_scale() == 4
            {
                table_load = true;
            }
        });
        if indirect.is_empty() {
            return;
        }
        // Names only for functions that have something to report.
        let raw = String::from_utf8_lossy(raw);
        let (demangled, krate) = demangle(&raw);
        let origin = origin_of(&raw, krate.as_deref(), calls_thunks);
        for insn in &indirect {
            let kind = branch_use(insn, table_load);
            report(insn, &raw, &demangled, addr, origin, kind, false);
        }
    })?;
    // PLT stubs have no function symbols: scan their sections whole.
    for s in p.sections.iter() {
        let name = p.sections.section_name(LE, s).map_err(corrupt)?;
        if !matches!(name, b".plt" | b".plt.sec" | b".plt.got") || s.sh_type(LE) == elf::SHT_NOBITS
        {
            continue;
        }
        let section = String::from_utf8_lossy(name).into_owned();
        let (base, data) = (s.sh_addr(LE), s.data(LE, p.data).map_err(corrupt)?);
        decode_all(data, base, |insn| {
            if is_indirect(insn) {
                let kind = BranchUse::TailJump;
                report(insn, &section, &section, base, Origin::Plt, kind, false);
            }
        });
    }
    // Code between function symbols (padding, hand-written asm): each run
    // decoded from its start, its branches named by the nearest symbol.
    for (section, range) in map.uncovered() {
        let Some((base, data)) = exec_bytes_at(&p, range.start, range.end - range.start) else {
            continue;
        };
        let bytes = &data[(range.start - base) as usize..(range.end - base) as usize];
        let section = String::from_utf8_lossy(section).into_owned();
        decode_all(bytes, range.start, |insn| {
            if !is_indirect(insn) {
                return;
            }
            let (name, start) = match map.nearest(insn.ip(), &(base..base + data.len() as u64)) {
                Some((n, _)) if allow.thunks.is_thunk(n) => return,
                Some((n, a)) => (String::from_utf8_lossy(n).into_owned(), a),
                None => (section.clone(), base),
            };
            let (demangled, krate) = demangle(&name);
            let origin = origin_of(&name, krate.as_deref(), false);
            let kind = branch_use(insn, false);
            report(insn, &name, &demangled, start, origin, kind, true);
        });
    }
    out.bypasses.sort_by_key(|b| b.addr);
    Ok(out)
}

/// [`audit_with`] allowing the functions `allow` names (exact symbol or
/// demangled names, or `*` patterns): the bypasses left.
pub fn audit(data: &[u8], allow: &[&str]) -> Result<Vec<IndirectBranch>, ElfError> {
    let allow = allow
        .iter()
        .fold(AuditAllow::default(), |a, p| a.pattern(p));
    Ok(audit_with(data, &allow)?.bypasses)
}
