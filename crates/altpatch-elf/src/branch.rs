//! Direct branches in linked code: the one whose displacement a relocation
//! names ([`branch_at`], the check behind every relocation-found site), and
//! every branch to a site symbol found by decoding ([`scan_branches`]).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use object::endian::LittleEndian as LE;
use object::read::elf::Sym as _;

use super::{Class, ElfError, Marks, audit, classify, corrupt, parse};
use crate::arch::x86_64 as x86;
use crate::sites::{Site, SiteKind};

/// The `call`/`jmp`/`jcc rel32` whose 4-byte displacement is at `off` in
/// `code` (located at `base`), allowing up to two prefix bytes: (start
/// offset, length, form, absolute target). Inlined into discovery's loop
/// (one call per relocation; out of line it costs a third more).
#[inline(always)]
pub(super) fn branch_at(
    code: &[u8],
    base: u64,
    off: usize,
) -> Option<(usize, usize, x86::BranchKind, u64)> {
    // `call`/`jmp rel32` (e8/e9) and `jcc rel32` (0f 80+cc), what nearly
    // every site is, decode the same by hand as through the decoder below
    // (which tries the shortest opcode first), without building a decoder
    // per relocation: start-up finds tens of thousands.
    if let (Some(start), Some(rel)) = (off.checked_sub(1), code.get(off..off + 4)) {
        let rel = i32::from_le_bytes([rel[0], rel[1], rel[2], rel[3]]) as i64;
        let target = (base + off as u64 + 4).wrapping_add_signed(rel);
        match code[start] {
            0xe8 => return Some((start, 5, x86::BranchKind::Call, target)),
            0xe9 => return Some((start, 5, x86::BranchKind::Jmp, target)),
            op @ 0x80..=0x8f if start > 0 && code[start - 1] == 0x0f => {
                let cc = x86::Cond::from_nibble(op);
                return Some((start - 1, 6, x86::BranchKind::Jcc(cc), target));
            }
            _ => {}
        }
    }
    for opcode_len in 1..=4usize {
        let start = off.checked_sub(opcode_len)?;
        let end = (start + 15).min(code.len());
        let insn = x86::decode_one(code.get(start..end)?, base + start as u64)?;
        if insn.len() != opcode_len + 4 {
            continue;
        }
        let b = x86::rel_branch_of(&insn)?;
        if b.disp_size == 4 && b.disp_offset == opcode_len {
            return Some((start, insn.len(), b.kind, b.target));
        }
    }
    None
}

/// Every direct `call`/`jmp`/`jcc rel32` to a site symbol found by decoding
/// each function symbol's bytes, independently of relocations: a
/// cross-check of [`read_sites`](super::read_sites) (which it should equal for the site kinds
/// it covers) and the way to look at an image linked without
/// `--emit-relocs`.
pub fn scan_branches(data: &[u8]) -> Result<Vec<Site>, ElfError> {
    let p = parse(data)?;
    let names = crate::sites::ThunkNames::new();
    let marks = Marks::new(&names);
    // Targets: the addresses of defined site symbols.
    let mut targets: BTreeMap<u64, SiteKind> = BTreeMap::new();
    for sym in p.symbols.iter() {
        if sym.is_undefined(LE) {
            continue;
        }
        let name = p.symbols.symbol_name(LE, sym).map_err(corrupt)?;
        if let Some(Class::Site(kind)) = classify(name, sym.st_type().0, &marks)
            && kind != SiteKind::Ifunc
        {
            targets.insert(sym.st_value(LE), kind);
        }
    }
    let mut found = Vec::new();
    audit::for_each_function(&p, |_name, addr, code| {
        audit::decode_all(code, addr, |insn| {
            if let Some(b) = x86::rel_branch_of(insn)
                && let Some(&kind) = targets.get(&b.target)
                && b.disp_size == 4
                && !(kind == SiteKind::ReturnThunk && b.kind == x86::BranchKind::Call)
                && only_cs_prefixes(code, addr, insn, b.kind)
            {
                found.push(Site {
                    addr: insn.ip() as usize,
                    len: insn.len() as u8,
                    form: b.kind,
                    kind,
                    target: b.target as usize,
                });
            }
        });
    })?;
    found.sort_by_key(|s| s.addr);
    found.dedup();
    Ok(found)
}

/// Whether the prefixes of `insn` (a rel32 branch in `code`, located at
/// `base`) are all `cs`, the one prefix [`read_sites`](super::read_sites)
/// keeps in a site.
fn only_cs_prefixes(
    code: &[u8],
    base: u64,
    insn: &iced_x86::Instruction,
    kind: x86::BranchKind,
) -> bool {
    let canonical = if matches!(kind, x86::BranchKind::Jcc(_)) {
        6
    } else {
        5
    };
    let at = (insn.ip() - base) as usize;
    let n = insn.len().saturating_sub(canonical);
    code.get(at..at + n)
        .is_some_and(|p| p.iter().all(|&b| b == 0x2e))
}
