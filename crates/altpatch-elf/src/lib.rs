//! Reading linked x86-64 ELF images (`std`): compiler-generated sites from
//! the relocations `--emit-relocs` keeps, the embedded site table, an audit
//! of indirect branches, and a CET audit of the entries altpatch created
//! ([`audit_cet`]: every one must start with `endbr64`).
//!
//! ```no_run
//! let data = std::fs::read("target/release/myprog").unwrap();
//! let found = altpatch::elf::read_sites(&data).unwrap();
//! for site in &found.sites {
//!     println!("{site}");
//! }
//! for r in &found.rejected {
//!     println!("not a site: {r}");
//! }
//! ```

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

// The reader runs in a process or a tool: `std`, over the `no_std` core.
extern crate alloc;

// The core's modules under the names this crate's files use (`crate::sites`,
// ...), as `altpatch` names them.
use altpatch_core::{arch, hex, image, records, sites, sync};

mod audit;
mod audit_allow;
mod audit_branch;
mod audit_symbols;
mod branch;
mod cet;
mod embed;
mod error;
mod objtool;
mod origin;
mod prefix;
mod runtime;
mod symbols;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use object::elf;
use object::endian::LittleEndian as LE;
use object::read::elf::{
    FileHeader, Rela as _, SectionHeader, SectionTable, Sym as _, SymbolTable,
};

pub use audit::{Audit, AuditAllow, BranchUse, IndirectBranch, Origin, audit, audit_with};
pub use audit_allow::AddressListError;
use branch::branch_at;
pub use branch::scan_branches;
pub use cet::{CetAudit, CetTarget, CetTargetKind, audit_cet};
pub use embed::{EmbedError, EmbedOutcome, embed, embed_file};
pub use error::ElfError;
use error::corrupt;
pub use objtool::{ObjtoolComparison, TableComparison, compare_with_objtool};
use prefix::{Boundaries, PREFIX_NOT_CS, Prefixes};
pub use runtime::{SitesError, current_sites, image_sites};
use symbols::{Class, Marks, classify, memo};

use crate::arch::x86_64 as x86;
use crate::sites::{Site, SiteKind, ThunkNames};

type Header = elf::FileHeader64<LE>;
type Sections<'d> = SectionTable<'d, Header, &'d [u8]>;
type Symbols<'d> = SymbolTable<'d, Header, &'d [u8]>;

/// A relocation against a site symbol that is not a patchable site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Address of the relocated field.
    pub offset: u64,
    /// The symbol the relocation names.
    pub symbol: String,
    /// Why it is not a site.
    pub why: &'static str,
}

/// Why a load of an ifunc's GOT slot is not a site (the `why` of its
/// [`Rejected`] entry).
///
/// rustc calls a function of another crate through its GOT slot (it emits
/// no PLT): `mov slot(%rip), %reg`, often hoisted out of a loop, then
/// `call *%reg`. The relocation marks the load, and nothing ties it to the
/// call (the register may be copied, spilled or used for several calls),
/// so the call cannot be made direct from relocations alone: it reaches
/// the stub through the register. The same load also takes an address.
const GOT_LOAD: &str = "a load of the GOT slot into a register (mov slot(%rip), %reg): how \
     rustc calls a function of another crate (then call *%reg, the load often hoisted out of \
     a loop) or takes its address; the relocation names the load, not the call, so \
     relocations alone cannot make the call direct and it reaches the stub through the \
     register";

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} -> {}: {}", self.offset, self.symbol, self.why)
    }
}

/// The sites of an image, at link-time addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoundSites {
    /// The sites, in address order.
    pub sites: Vec<Site>,
    /// Relocations against site symbols that are not exactly a
    /// `call`/`jmp`/`jcc rel32` to the symbol: reported, never patched.
    pub rejected: Vec<Rejected>,
    /// The names of the sites' targets, by address.
    pub names: BTreeMap<usize, String>,
    /// Relocations examined (all those applying to executable sections).
    pub relocations: usize,
}

impl FoundSites {
    /// Records a site.
    fn push_site(
        &mut self,
        addr: usize,
        len: usize,
        form: x86::BranchKind,
        kind: SiteKind,
        sym_value: u64,
    ) {
        self.sites.push(Site {
            addr,
            len: len as u8,
            form,
            kind,
            target: sym_value as usize,
        });
    }

    /// The sites of one kind.
    pub fn of_kind(&self, kind: SiteKind) -> impl Iterator<Item = &Site> {
        self.sites.iter().filter(move |s| s.kind == kind)
    }

    /// The name of the symbol at `target`, if a site reaches it.
    pub fn name_of(&self, target: usize) -> Option<&str> {
        self.names.get(&target).map(String::as_str)
    }
}

/// A parsed image: headers, sections and symbols.
pub(crate) struct Parsed<'d> {
    pub data: &'d [u8],
    pub sections: Sections<'d>,
    pub symbols: Symbols<'d>,
}

pub(crate) fn parse(data: &[u8]) -> Result<Parsed<'_>, ElfError> {
    if data.len() < 16 || data[..4] != *b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if data[4] != 2 {
        return Err(ElfError::WrongClass);
    }
    if data[5] != 1 {
        return Err(ElfError::WrongEndian);
    }
    let header = Header::parse(data).map_err(corrupt)?;
    let machine = header.e_machine(LE).0;
    if machine != elf::EM_X86_64.0 {
        return Err(ElfError::WrongMachine(machine));
    }
    if header.e_type(LE) == elf::ET_REL {
        return Err(ElfError::NotLinked);
    }
    let sections = header.sections(LE, data).map_err(corrupt)?;
    let symbols = sections
        .symbols(LE, data, elf::SHT_SYMTAB)
        .map_err(corrupt)?;
    if symbols.is_empty() {
        return Err(ElfError::Stripped);
    }
    Ok(Parsed {
        data,
        sections,
        symbols,
    })
}

/// The executable section containing `addr..addr+len`, with its bytes.
pub(crate) fn exec_bytes_at<'d>(p: &Parsed<'d>, addr: u64, len: u64) -> Option<(u64, &'d [u8])> {
    p.sections.iter().find_map(|s| {
        if s.sh_flags(LE).0 & elf::SHF_EXECINSTR.0 == 0 || s.sh_type(LE) == elf::SHT_NOBITS {
            return None;
        }
        let a = s.sh_addr(LE);
        // Bounds from the bytes present, not the header's claimed size.
        let data = s.data(LE, p.data).ok()?;
        if addr < a || addr.checked_add(len)? > a.checked_add(data.len() as u64)? {
            return None;
        }
        Some((a, data))
    })
}

/// The address ranges of the image's PLT sections (`.plt`, `.plt.sec`).
fn plt_ranges(p: &Parsed<'_>) -> Vec<core::ops::Range<u64>> {
    p.sections
        .iter()
        .filter(|s| {
            matches!(
                p.sections.section_name(LE, s),
                Ok(b".plt") | Ok(b".plt.sec")
            )
        })
        .map(|s| s.sh_addr(LE)..s.sh_addr(LE) + s.sh_size(LE))
        .collect()
}

/// Finds every site of the linked image `data`: each `R_X86_64_PLT32` or
/// `R_X86_64_PC32` relocation in an executable section against a
/// [well-known symbol](crate::sites::names) (or an `STT_GNU_IFUNC` symbol),
/// kept only where it is the displacement of a `call`, `jmp` or `jcc` rel32
/// (optionally prefixed) that reaches the symbol itself. Ifunc symbols are
/// also called through their GOT slot (`-fno-plt`): a `GOTPCREL`/
/// `GOTPCRELX` relocation at the displacement of `call/jmp *slot(%rip)` is
/// a 6-byte ifunc site.
///
/// Thunks are recognised by their [built-in names](ThunkNames); a thunk
/// another object defines (a shared object calling the executable's) is a
/// site where its call reaches this image's PLT stub for it (the site's
/// target is then the stub). [`read_sites_with`] also takes a project's
/// aliases.
pub fn read_sites(data: &[u8]) -> Result<FoundSites, ElfError> {
    read_sites_with(data, &ThunkNames::new())
}

/// [`read_sites`], with extra thunk names (aliases) recognised as thunks.
///
/// ```no_run
/// use altpatch::sites::ThunkNames;
/// let data = std::fs::read("target/release/myprog").unwrap();
/// let names = ThunkNames::new().indirect_prefix("__x86_retpoline_");
/// let found = altpatch::elf::read_sites_with(&data, &names).unwrap();
/// println!("{} sites", found.sites.len());
/// ```
pub fn read_sites_with(data: &[u8], names: &ThunkNames) -> Result<FoundSites, ElfError> {
    let p = parse(data)?;
    let mut out = FoundSites::default();
    let mut class_of = alloc::vec![memo::UNSEEN; p.symbols.len()];
    let marks = Marks::new(names);
    let mut plt = None;
    let mut bounds = Boundaries::new();
    let mut any_exec_relocs = false;
    for section in p.sections.iter() {
        if section.sh_type(LE) != elf::SHT_RELA {
            continue;
        }
        let Some((relas, _link)) = section.rela(LE, p.data).map_err(corrupt)? else {
            continue;
        };
        let target_index = section.sh_info(LE) as usize;
        let Ok(target) = p.sections.section(object::SectionIndex(target_index)) else {
            continue;
        };
        if target.sh_flags(LE).0 & elf::SHF_EXECINSTR.0 == 0 {
            continue;
        }
        if section.sh_link(LE) as usize != p.symbols.section().0 {
            continue;
        }
        any_exec_relocs = true;
        let sec_addr = target.sh_addr(LE);
        // The bytes present, not the size the header claims: a NOBITS or
        // truncated section has fewer (possibly none).
        let sec_data = target.data(LE, p.data).map_err(corrupt)?;
        let sec_size = sec_data.len() as u64;
        let sec_name = || {
            p.sections
                .section_name(LE, target)
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default()
        };
        for rela in relas {
            out.relocations += 1;
            let r_type = rela.r_type(LE, false);
            let is_branch_reloc = r_type == elf::R_X86_64_PLT32 || r_type == elf::R_X86_64_PC32;
            let Some(sym_index) = rela.symbol(LE, false) else {
                continue;
            };
            // Each symbol is classified once, however many relocations
            // name it: most relocations in code name ordinary functions,
            // and a name compare per relocation dominated discovery.
            let Some(memo) = class_of.get_mut(sym_index.0) else {
                return Err(ElfError::Corrupt(alloc::format!(
                    "relocation names symbol {} of {}",
                    sym_index.0,
                    p.symbols.len()
                )));
            };
            if *memo == memo::UNSEEN {
                let sym = p.symbols.symbol(sym_index).map_err(corrupt)?;
                let name = p.symbols.symbol_name(LE, sym).map_err(corrupt)?;
                *memo = memo::encode(classify(name, sym.st_type().0, &marks));
            }
            // Most relocations name a symbol already seen to be none of
            // ours: nothing more is read for them.
            let Some(class) = memo::decode(*memo) else {
                continue;
            };
            let sym = p.symbols.symbol(sym_index).map_err(corrupt)?;
            let name = || p.symbols.symbol_name(LE, sym).unwrap_or_default();
            let offset = rela.r_offset(LE);
            let reject = |why| Rejected {
                offset,
                symbol: String::from_utf8_lossy(name()).into_owned(),
                why,
            };
            let kind = match class {
                Class::BadThunk => {
                    out.rejected.push(reject(
                        "no such thunk register (%rsp is never a thunk register)",
                    ));
                    continue;
                }
                Class::Site(k) => k,
            };
            let is_got_reloc = r_type == elf::R_X86_64_GOTPCREL
                || r_type == elf::R_X86_64_GOTPCRELX
                || r_type == elf::R_X86_64_REX_GOTPCRELX;
            let got_ifunc = kind == SiteKind::Ifunc && is_got_reloc;
            if !(is_branch_reloc || got_ifunc) {
                out.rejected
                    .push(reject("not a PC-relative branch relocation"));
                continue;
            }
            if offset < sec_addr || offset.saturating_add(4) > sec_addr.saturating_add(sec_size) {
                return Err(ElfError::RelocationOutsideSection {
                    offset,
                    section: sec_name(),
                });
            }
            if is_got_reloc {
                // An ifunc called through its GOT slot (`-fno-plt`):
                // `call/jmp *slot(%rip)`, `ff 15/25 disp32`.
                let off = (offset - sec_addr) as usize;
                let form = match off.checked_sub(2).map(|o| &sec_data[o..o + 2]) {
                    Some([0xff, 0x15]) => x86::BranchKind::Call,
                    Some([0xff, 0x25]) => x86::BranchKind::Jmp,
                    _ => {
                        // `mov slot(%rip), %reg` (REX.W 8b, ModRM mod 00 r/m
                        // 101): how rustc calls a function of another crate
                        // (no PLT, the load often hoisted out of a loop), or
                        // takes its address. The call, if any, is a
                        // `call *%reg` somewhere after (through a thunk in
                        // retpoline-built code, whose own site is found
                        // apart); the relocation names only the load.
                        let load =
                            off.checked_sub(3)
                                .map(|o| &sec_data[o..o + 3])
                                .is_some_and(|b| {
                                    b[0] & 0xf8 == 0x48 && b[1] == 0x8b && b[2] & 0xc7 == 0x05
                                });
                        out.rejected.push(reject(if load {
                            GOT_LOAD
                        } else {
                            "a GOT reference that is neither call/jmp *slot(%rip) nor a load of \
                             the slot (taking the address)"
                        }));
                        continue;
                    }
                };
                if sym.is_undefined(LE) {
                    out.rejected.push(reject("symbol not defined in the image"));
                    continue;
                }
                out.push_site(offset as usize - 2, 6, form, kind, sym.st_value(LE));
                memo::name_once(memo, &mut out.names, sym.st_value(LE), name);
                continue;
            }
            // A thunk another object defines (a shared object calling the
            // executable's thunks) is reached through this image's PLT.
            let via_plt = sym.is_undefined(LE)
                && matches!(kind, SiteKind::IndirectThunk(_) | SiteKind::ReturnThunk)
                && r_type == elf::R_X86_64_PLT32
                && rela.r_addend(LE) == -4;
            if sym.is_undefined(LE) && !via_plt {
                out.rejected.push(reject("symbol not defined in the image"));
                continue;
            }
            let off = (offset - sec_addr) as usize;
            let Some((start, len, form, decoded_target)) = branch_at(sec_data, sec_addr, off)
            else {
                out.rejected.push(reject(
                    "not a call/jmp/jcc rel32 with the relocation at its displacement",
                ));
                continue;
            };
            let sym_value = if via_plt {
                if !plt
                    .get_or_insert_with(|| plt_ranges(&p))
                    .iter()
                    .any(|r| r.contains(&decoded_target))
                {
                    out.rejected.push(reject(
                        "a thunk defined elsewhere, reached other than through this image's PLT",
                    ));
                    continue;
                }
                decoded_target
            } else {
                sym.st_value(LE)
            };
            // An ifunc symbol's value is its resolver; calls reach a PLT stub.
            if kind != SiteKind::Ifunc && !via_plt {
                let expected = (sym_value as i64)
                    .wrapping_add(rela.r_addend(LE))
                    .wrapping_add(4);
                if decoded_target as i64 != expected || expected != sym_value as i64 {
                    out.rejected
                        .push(reject("branch does not reach the symbol's first byte"));
                    continue;
                }
            }
            if kind == SiteKind::ReturnThunk && form == x86::BranchKind::Call {
                out.rejected.push(reject("a call to the return thunk"));
                continue;
            }
            let (start, len) = match bounds.prefixes(&p, sec_data, sec_addr, start, len, &out.sites)
            {
                Prefixes::None | Prefixes::Unproven => (start, len),
                Prefixes::Cs(n) => (start - n, len + n),
                Prefixes::Other(_) => {
                    out.rejected.push(reject(PREFIX_NOT_CS));
                    continue;
                }
            };
            out.push_site((sec_addr as usize) + start, len, form, kind, sym_value);
            memo::name_once(memo, &mut out.names, sym_value, name);
        }
    }
    if !any_exec_relocs {
        return Err(ElfError::NoRelocations);
    }
    out.sites.sort_by_key(|s| s.addr);
    out.sites.dedup();
    Ok(out)
}
