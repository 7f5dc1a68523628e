//! Retpoline audit: indirect branches that do not go through a thunk,
//! classified by where the code came from and what the branch is for.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};
use object::elf;
use object::endian::LittleEndian as LE;
use object::read::elf::{SectionHeader as _, Sym as _};

pub use super::origin::Origin;
use super::origin::{demangle, glob, origin_of};
use super::{ElfError, Parsed, corrupt, exec_bytes_at, parse};
use crate::sites::ThunkNames;

/// What an indirect branch is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BranchUse {
    /// `call *%reg` / `call *mem`.
    Call,
    /// A switch's jump table: `jmp *table(,%idx,8)`, or `jmp *%reg` in a
    /// function that loads 32-bit relative table entries. Rust covers these
    /// only with `+retpoline-indirect-branches`.
    JumpTable,
    /// Any other `jmp *`: a tail call, or a PLT stub.
    TailJump,
}

impl BranchUse {
    /// `call`, `jump-table` or `tail-jump`.
    pub fn name(self) -> &'static str {
        match self {
            BranchUse::Call => "call",
            BranchUse::JumpTable => "jump-table",
            BranchUse::TailJump => "tail-jump",
        }
    }
}

/// An indirect `call` or `jmp` (through a register or memory) of the
/// image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndirectBranch {
    /// Its address (link time).
    pub addr: u64,
    /// The function containing it (its symbol; the section for PLT stubs).
    pub function: String,
    /// Its offset in the function.
    pub offset: u64,
    /// The instruction, disassembled (AT&T syntax).
    pub text: String,
    /// Where the code came from.
    pub origin: Origin,
    /// What the branch is for.
    pub kind: BranchUse,
}

impl fmt::Display for IndirectBranch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} <{}+{:#x}>: {} [{} {}]",
            self.addr,
            self.function,
            self.offset,
            self.text,
            self.origin.name(),
            self.kind.name()
        )
    }
}

/// What may bypass the thunks without failing the audit.
///
/// ```
/// use altpatch::elf::{AuditAllow, Origin};
/// let allow = AuditAllow::default().pattern("std::*").origin(Origin::Plt);
/// assert!(allow.matches_name("std::io::stdio::_print"));
/// assert!(!allow.matches_name("my_crate::dispatch"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct AuditAllow {
    patterns: Vec<String>,
    origins: Vec<Origin>,
    thunks: ThunkNames,
}

impl AuditAllow {
    /// Also allows functions whose name — demangled without its hash, or
    /// as in the symbol table — matches `pattern`, where `*` matches any run
    /// of characters (`std::*`, `*::dispatch`, an exact C name).
    pub fn pattern(mut self, pattern: &str) -> AuditAllow {
        self.patterns.push(pattern.into());
        self
    }

    /// Recognises these thunk names (aliases beyond the built-in ones): the
    /// thunks' own bodies are never reported, and branches to them are
    /// the routed kind.
    ///
    /// ```
    /// use altpatch::elf::AuditAllow;
    /// use altpatch::sites::ThunkNames;
    /// let rules = AuditAllow::default()
    ///     .thunk_names(ThunkNames::new().indirect_prefix("__x86_retpoline_"));
    /// # let _ = rules;
    /// ```
    pub fn thunk_names(mut self, names: ThunkNames) -> AuditAllow {
        self.thunks = names;
        self
    }

    /// Also allows everything of `origin`.
    pub fn origin(mut self, origin: Origin) -> AuditAllow {
        self.origins.push(origin);
        self
    }

    /// Whether a function called `name` (demangled, or raw) is allowed by
    /// pattern.
    pub fn matches_name(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| glob(p, name))
    }

    fn allows(&self, b: &IndirectBranch, demangled: &str) -> bool {
        self.origins.contains(&b.origin)
            || self.matches_name(demangled)
            || self.matches_name(&b.function)
    }
}

/// What [`audit_with`] found.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    /// Every bypass not allowed, by address: the audit fails if any.
    pub bypasses: Vec<IndirectBranch>,
    /// Bypasses allowed by pattern or origin.
    pub allowed: usize,
    /// Indirect branches the code marks as intended (the crate's own, in
    /// section `altpatch_v1_<tag>_indirect_ok` of each copy of the crate
    /// linked in): never reported.
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

/// The addresses recorded in every copy's `altpatch_v1_<tag>_indirect_ok`:
/// self-relative 32-bit offsets, each to an intended indirect branch.
fn intended(p: &Parsed<'_>) -> Result<Vec<u64>, ElfError> {
    let mut out = Vec::new();
    for s in p.sections.iter() {
        let name = p.sections.section_name(LE, s).map_err(corrupt)?;
        let intended = crate::records::parse_section_name(name)
            .is_some_and(|n| n.kind == crate::records::SectionKind::IndirectOk);
        if !intended || s.sh_type(LE) == elf::SHT_NOBITS {
            continue;
        }
        let data = s.data(LE, p.data).map_err(corrupt)?;
        let base = s.sh_addr(LE);
        for (i, w) in data.chunks_exact(4).enumerate() {
            let rel = i32::from_le_bytes([w[0], w[1], w[2], w[3]]) as i64;
            out.push((base + 4 * i as u64).wrapping_add_signed(rel));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Every indirect `call`/`jmp` of the linked image `data` that does not go
/// through a retpoline thunk — what objtool's retpoline validation reports —
/// with its origin and use, minus what `allow` allows and what the code
/// marks as intended. The thunks themselves are never reported.
///
/// An empty [`Audit::bypasses`] means every indirect branch that is not
/// allowed goes through `__x86_indirect_thunk_<reg>`.
pub fn audit_with(data: &[u8], allow: &AuditAllow) -> Result<Audit, ElfError> {
    let p = parse(data)?;
    let ok = intended(&p)?;
    let thunks = thunk_addresses(&p, &allow.thunks)?;
    let mut out = Audit::default();
    let mut fmt = iced_x86::GasFormatter::new();
    let mut text = |insn: &Instruction| {
        let mut t = String::new();
        iced_x86::Formatter::format(&mut fmt, insn, &mut t);
        t
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
                && insn.memory_index() != iced_x86::Register::None
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
            if ok.binary_search(&insn.ip()).is_ok() {
                out.intended += 1;
                continue;
            }
            let kind = if insn.mnemonic() == Mnemonic::Call {
                BranchUse::Call
            } else if (insn.op0_kind() == OpKind::Memory
                && insn.memory_index() != iced_x86::Register::None)
                || (insn.op0_kind() == OpKind::Register && table_load)
            {
                BranchUse::JumpTable
            } else {
                BranchUse::TailJump
            };
            let b = IndirectBranch {
                addr: insn.ip(),
                function: raw.clone().into_owned(),
                offset: insn.ip() - addr,
                text: text(insn),
                origin,
                kind,
            };
            if allow.allows(&b, &demangled) {
                out.allowed += 1;
            } else {
                out.bypasses.push(b);
            }
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
            if !is_indirect(insn) {
                return;
            }
            let b = IndirectBranch {
                addr: insn.ip(),
                function: section.clone(),
                offset: insn.ip() - base,
                text: text(insn),
                origin: Origin::Plt,
                kind: BranchUse::TailJump,
            };
            if allow.allows(&b, &section) {
                out.allowed += 1;
            } else {
                out.bypasses.push(b);
            }
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
