//! What the audit looks up besides the code — the branches annotated as
//! intended, the symbol an address falls in, the code no function symbol
//! covers — and discovery too (the function a prefixed branch is in).

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use object::elf;
use object::endian::LittleEndian as LE;
use object::read::elf::{SectionHeader as _, Sym as _};

use super::{ElfError, Parsed, corrupt};

/// Linux's annotation type for an indirect branch objtool must accept
/// (`ANNOTYPE_RETPOLINE_SAFE`, `include/linux/objtool_types.h`).
const ANNOTYPE_RETPOLINE_SAFE: u32 = 2;

/// The addresses of the indirect branches the image marks as intended,
/// sorted.
pub(super) struct Annotations;

impl Annotations {
    /// Every copy's `altpatch_v1_<tag>_indirect_ok` (self-relative 32-bit
    /// offsets), and where the image keeps them, a kernel's
    /// `ANNOTATE_RETPOLINE_SAFE` annotations: `.discard.retpoline_safe`
    /// (absolute 64-bit addresses, Linux up to 6.12) and
    /// `.discard.annotate_insn` entries of the retpoline-safe type
    /// (self-relative 32-bit offset, then the 32-bit type; later Linux).
    pub(super) fn read(p: &Parsed<'_>) -> Result<Vec<u64>, ElfError> {
        let mut out = Vec::new();
        for s in p.sections.iter() {
            let name = p.sections.section_name(LE, s).map_err(corrupt)?;
            if s.sh_type(LE) == elf::SHT_NOBITS {
                continue;
            }
            let ours = crate::records::parse_section_name(name)
                .is_some_and(|n| n.kind == crate::records::SectionKind::IndirectOk);
            let (base, data) = (s.sh_addr(LE), s.data(LE, p.data).map_err(corrupt)?);
            if ours {
                out.extend(self_relative(base, data, 4).map(|(target, _)| target));
            } else if name == b".discard.retpoline_safe" {
                for w in data.chunks_exact(8) {
                    out.push(u64::from_le_bytes(w.try_into().unwrap_or_default()));
                }
            } else if name == b".discard.annotate_insn" {
                out.extend(self_relative(base, data, 8).filter_map(|(target, e)| {
                    let kind = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                    (kind == ANNOTYPE_RETPOLINE_SAFE).then_some(target)
                }));
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// The entries of a table of `stride`-byte entries at link-time address
/// `base`, each starting with a 32-bit offset from itself to an address (the
/// form of this crate's `indirect_ok` records, of objtool's site tables
/// and annotations): (that address, the whole entry).
pub(super) fn self_relative(
    base: u64,
    data: &[u8],
    stride: usize,
) -> impl Iterator<Item = (u64, &[u8])> {
    data.chunks_exact(stride).enumerate().map(move |(i, e)| {
        let rel = i32::from_le_bytes([e[0], e[1], e[2], e[3]]) as i64;
        ((base + (stride * i) as u64).wrapping_add_signed(rel), e)
    })
}

/// One defined symbol: where it is, how long, its name.
struct Symbol<'d> {
    addr: u64,
    size: u64,
    name: &'d [u8],
    function: bool,
}

/// The defined symbols of an image by address, and its executable
/// sections: what an address is in.
pub(super) struct SymbolMap<'d> {
    /// Sorted by address.
    symbols: Vec<Symbol<'d>>,
    /// Executable sections with bytes: (name, range).
    sections: Vec<(&'d [u8], Range<u64>)>,
}

impl<'d> SymbolMap<'d> {
    pub(super) fn new(p: &Parsed<'d>) -> Result<SymbolMap<'d>, ElfError> {
        let mut symbols = Vec::new();
        for sym in p.symbols.iter() {
            let kind = sym.st_type();
            if sym.is_undefined(LE)
                || !matches!(kind, elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE)
            {
                continue;
            }
            let name = p.symbols.symbol_name(LE, sym).map_err(corrupt)?;
            // Assembler-local labels and file-start markers name nothing.
            if name.is_empty() || name.starts_with(b".L") || name.starts_with(b"$") {
                continue;
            }
            symbols.push(Symbol {
                addr: sym.st_value(LE),
                size: sym.st_size(LE),
                name,
                function: kind == elf::STT_FUNC,
            });
        }
        symbols.sort_unstable_by_key(|s| s.addr);
        let mut sections = Vec::new();
        for s in p.sections.iter() {
            if s.sh_flags(LE).0 & elf::SHF_EXECINSTR.0 == 0 || s.sh_type(LE) == elf::SHT_NOBITS {
                continue;
            }
            let name = p.sections.section_name(LE, s).map_err(corrupt)?;
            let len = s.data(LE, p.data).map_err(corrupt)?.len() as u64;
            sections.push((name, s.sh_addr(LE)..s.sh_addr(LE) + len));
        }
        Ok(SymbolMap { symbols, sections })
    }

    /// The executable section holding `addr`.
    pub(super) fn section_of(&self, addr: u64) -> String {
        self.sections
            .iter()
            .find(|(_, r)| r.contains(&addr))
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default()
    }

    /// The nearest symbol at or before `addr` that `want` accepts and
    /// whose bytes hold `addr`. Symbols may overlap (aliases, nested
    /// symbols): the few accepted ones before `addr` are looked at, however
    /// many labels lie between.
    fn holding_where(&self, addr: u64, want: impl Fn(&Symbol<'d>) -> bool) -> Option<&Symbol<'d>> {
        let after = self.symbols.partition_point(|s| s.addr <= addr);
        self.symbols[..after]
            .iter()
            .rev()
            .filter(|s| want(s))
            .take(16)
            .find(|s| addr < s.addr.saturating_add(s.size))
    }

    /// The sized data or function symbol whose bytes hold `addr`.
    pub(super) fn holding(&self, addr: u64) -> Option<String> {
        self.holding_where(addr, |_| true)
            .map(|s| String::from_utf8_lossy(s.name).into_owned())
    }

    /// The function symbol holding `addr`: (start, end).
    pub(super) fn function_at(&self, addr: u64) -> Option<(u64, u64)> {
        self.holding_where(addr, |s| s.function)
            .map(|s| (s.addr, s.addr + s.size))
    }

    /// The nearest symbol at or before `addr` in `section` (a label, a
    /// function of no size): its name and address.
    pub(super) fn nearest(&self, addr: u64, section: &Range<u64>) -> Option<(&'d [u8], u64)> {
        let after = self.symbols.partition_point(|s| s.addr <= addr);
        self.symbols[..after]
            .last()
            .filter(|s| section.contains(&s.addr))
            .map(|s| (s.name, s.addr))
    }

    /// The bytes of each executable section no sized function symbol
    /// covers, except the PLT's (scanned as stubs): (section name, range).
    pub(super) fn uncovered(&self) -> Vec<(&'d [u8], Range<u64>)> {
        let mut out = Vec::new();
        for (name, range) in &self.sections {
            if matches!(*name, b".plt" | b".plt.sec" | b".plt.got") {
                continue;
            }
            let mut at = range.start;
            let first = self.symbols.partition_point(|s| s.addr < range.start);
            for s in &self.symbols[first..] {
                if s.addr >= range.end {
                    break;
                }
                if !s.function || s.size == 0 {
                    continue;
                }
                if s.addr > at {
                    out.push((*name, at..s.addr));
                }
                at = at.max(s.addr.saturating_add(s.size));
            }
            if at < range.end {
                out.push((*name, at..range.end));
            }
        }
        out
    }
}
