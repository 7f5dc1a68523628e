//! What objtool listed, against what relocations found: a Linux kernel
//! image keeps objtool's tables of its thunk sites (`.retpoline_sites`)
//! and return sites (`.return_sites`), each entry a 32-bit offset from
//! itself to an instruction. Sites found here that a table lacks are
//! real (objtool skips some objects: the vDSO setup code's `jmp
//! __x86_return_thunk`s), and a table entry not found here is a site this
//! crate would leave alone; both are worth saying.

use alloc::vec::Vec;

use object::elf;
use object::endian::LittleEndian as LE;
use object::read::elf::SectionHeader as _;

use super::audit_symbols::self_relative;
use super::{ElfError, FoundSites, Parsed, corrupt, parse};
use crate::sites::SiteKind;

/// One objtool table compared with the sites found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableComparison {
    /// Entries in the table.
    pub listed: usize,
    /// Sites found here of the table's kind that it lists too.
    pub both: usize,
    /// Sites found here the table lacks (link-time addresses, sorted).
    pub only_found: Vec<u64>,
    /// Table entries no site found here starts at (sorted).
    pub only_listed: Vec<u64>,
}

/// objtool's tables in an image compared with the sites found in it;
/// `None` for a table the image does not have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjtoolComparison {
    /// `.retpoline_sites`: calls and jumps to the indirect thunks.
    pub retpoline_sites: Option<TableComparison>,
    /// `.return_sites`: jumps to the return thunk.
    pub return_sites: Option<TableComparison>,
}

/// The addresses the table `name` of `p` points to (self-relative 32-bit
/// offsets), sorted; `None` without that section.
fn table(p: &Parsed<'_>, name: &[u8]) -> Result<Option<Vec<u64>>, ElfError> {
    for s in p.sections.iter() {
        if p.sections.section_name(LE, s).map_err(corrupt)? != name
            || s.sh_type(LE) == elf::SHT_NOBITS
        {
            continue;
        }
        let (base, bytes) = (s.sh_addr(LE), s.data(LE, p.data).map_err(corrupt)?);
        let mut out: Vec<u64> = self_relative(base, bytes, 4).map(|(a, _)| a).collect();
        out.sort_unstable();
        return Ok(Some(out));
    }
    Ok(None)
}

/// `listed` against the addresses of the sites `found` of the kinds
/// `keep` accepts.
fn compare(
    listed: Vec<u64>,
    found: &FoundSites,
    keep: impl Fn(SiteKind) -> bool,
) -> TableComparison {
    let ours: Vec<u64> = found
        .sites
        .iter()
        .filter(|s| keep(s.kind))
        .map(|s| s.addr as u64)
        .collect();
    let has = |v: &[u64], a: &u64| v.binary_search(a).is_ok();
    TableComparison {
        listed: listed.len(),
        both: ours.iter().filter(|a| has(&listed, a)).count(),
        only_found: ours.iter().copied().filter(|a| !has(&listed, a)).collect(),
        only_listed: listed.iter().copied().filter(|a| !has(&ours, a)).collect(),
    }
}

/// Compares objtool's tables in the linked image `data` (a `vmlinux`)
/// with `found`, the sites [`read_sites`](super::read_sites) found in it.
///
/// ```no_run
/// let data = std::fs::read("vmlinux").unwrap();
/// let found = altpatch::elf::read_sites(&data).unwrap();
/// let cmp = altpatch::elf::compare_with_objtool(&data, &found).unwrap();
/// if let Some(r) = &cmp.return_sites {
///     println!("{} return sites objtool did not list", r.only_found.len());
/// }
/// ```
pub fn compare_with_objtool(
    data: &[u8],
    found: &FoundSites,
) -> Result<ObjtoolComparison, ElfError> {
    let p = parse(data)?;
    let thunk = |k| matches!(k, SiteKind::IndirectThunk(_));
    let ret = |k| k == SiteKind::ReturnThunk;
    Ok(ObjtoolComparison {
        retpoline_sites: table(&p, b".retpoline_sites")?.map(|t| compare(t, found, thunk)),
        return_sites: table(&p, b".return_sites")?.map(|t| compare(t, found, ret)),
    })
}
