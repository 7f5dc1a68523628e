//! CET audit: every indirect-branch target altpatch created in an image
//! must start with `endbr64`, or an indirect call to it faults under
//! indirect-branch tracking (IBT).
//!
//! The targets are the crate's own code addresses that it hands out:
//!
//! * static-call trampolines (symbols whose name contains
//!   [`STATIC_CALL_TRAMPOLINE_MARK`](crate::sites::names::STATIC_CALL_TRAMPOLINE_MARK));
//! * `ifunc!` stubs (names containing
//!   [`IFUNC_STUB_MARK`](crate::sites::names::IFUNC_STUB_MARK); C ifuncs,
//!   `STT_GNU_IFUNC`, are the compiler's and the loader's, not ours);
//! * every trampoline of the closure-trampoline table
//!   (`altpatch_v1_<tag>_trampoline_table`, 2048 entries of 32 bytes; one
//!   per copy of the crate linked in, see [`records`](crate::records)),
//!   when the image links it.
//!
//! They are found by symbol, so the image needs its symbol table (the same
//! names site discovery reads).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use object::elf;
use object::endian::LittleEndian as LE;
use object::read::elf::Sym as _;

use super::origin::demangle;
use super::{ElfError, corrupt, exec_bytes_at, parse};
use crate::arch::x86_64::ENDBR64;
use crate::sites::names;

/// The closure-trampoline table's symbol (after the copy's tag), and its
/// layout.
const TABLE: &str = "trampoline_table";
const TABLE_STRIDE: u64 = 32;
const TABLE_ENTRIES: u64 = 2048;

/// What kind of entry a [`CetTarget`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CetTargetKind {
    /// A static-call trampoline.
    StaticCallTrampoline,
    /// An `ifunc!` stub.
    IfuncStub,
    /// One trampoline of the closure-trampoline table.
    ClosureTrampoline,
}

impl CetTargetKind {
    /// `static_call_trampoline`, `ifunc_stub` or `closure_trampoline`.
    ///
    /// ```
    /// use altpatch::elf::CetTargetKind;
    /// assert_eq!(CetTargetKind::IfuncStub.name(), "ifunc_stub");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            CetTargetKind::StaticCallTrampoline => "static_call_trampoline",
            CetTargetKind::IfuncStub => "ifunc_stub",
            CetTargetKind::ClosureTrampoline => "closure_trampoline",
        }
    }

    /// All kinds, in report order.
    pub const ALL: [CetTargetKind; 3] = [
        CetTargetKind::StaticCallTrampoline,
        CetTargetKind::IfuncStub,
        CetTargetKind::ClosureTrampoline,
    ];
}

/// One indirect-branch target altpatch created in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CetTarget {
    /// Its address (link time).
    pub addr: u64,
    /// What it is.
    pub kind: CetTargetKind,
    /// Its symbol, demangled without the hash (for a closure trampoline,
    /// `altpatch_v1_<tag>_trampoline_table+OFFSET`).
    pub name: String,
    /// Its first four bytes (`f3 0f 1e fa` when it is `endbr64`).
    pub first: [u8; 4],
}

impl CetTarget {
    /// Whether it starts with `endbr64`.
    pub fn has_endbr64(&self) -> bool {
        self.first == ENDBR64
    }
}

impl fmt::Display for CetTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} {} {}: starts with {}",
            self.addr,
            self.kind.name(),
            self.name,
            crate::hex::HexBytes(&self.first)
        )
    }
}

/// What [`audit_cet`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CetAudit {
    /// Every target found, by address.
    pub targets: Vec<CetTarget>,
}

impl CetAudit {
    /// The targets that do not start with `endbr64`: the audit fails if
    /// any.
    pub fn missing(&self) -> impl Iterator<Item = &CetTarget> {
        self.targets.iter().filter(|t| !t.has_endbr64())
    }

    /// How many targets of `kind` were found.
    pub fn count(&self, kind: CetTargetKind) -> usize {
        self.targets.iter().filter(|t| t.kind == kind).count()
    }
}

/// Lists every indirect-branch target altpatch created in the linked image
/// `data`, with its first bytes: static-call trampolines and `ifunc!` stubs
/// (by the name marks of [`crate::sites::names`], in the symbol table) and
/// each trampoline of the closure-trampoline table when the image links
/// it. [`CetAudit::missing`] is empty when all start with `endbr64`; a
/// stripped image is an error ([`ElfError::Stripped`]), never a pass.
///
/// ```no_run
/// let data = std::fs::read("target/release/myprog").unwrap();
/// let audit = altpatch::elf::audit_cet(&data).unwrap();
/// for t in audit.missing() {
///     println!("no endbr64: {t}");
/// }
/// ```
pub fn audit_cet(data: &[u8]) -> Result<CetAudit, ElfError> {
    let p = parse(data)?;
    let mut out = CetAudit::default();
    for sym in p.symbols.iter() {
        if sym.is_undefined(LE) || sym.st_type() == elf::STT_GNU_IFUNC {
            continue;
        }
        let raw = p.symbols.symbol_name(LE, sym).map_err(corrupt)?;
        let addr = sym.st_value(LE);
        if crate::records::tag_in(raw, TABLE).is_some() {
            table_entries(&p, addr, &String::from_utf8_lossy(raw), &mut out.targets);
            continue;
        }
        let kind =
            if memchr::memmem::find(raw, names::STATIC_CALL_TRAMPOLINE_MARK.as_bytes()).is_some() {
                CetTargetKind::StaticCallTrampoline
            } else if memchr::memmem::find(raw, names::IFUNC_STUB_MARK.as_bytes()).is_some() {
                CetTargetKind::IfuncStub
            } else {
                continue;
            };
        // A name in code only: a data symbol that happens to carry the
        // mark is no entry.
        let Some(first) = first_bytes(&p, addr) else {
            continue;
        };
        let (name, _) = demangle(&String::from_utf8_lossy(raw));
        out.targets.push(CetTarget {
            addr,
            kind,
            name,
            first,
        });
    }
    out.targets.sort_by_key(|t| (t.addr, t.kind));
    // Aliases (a local and a global name at one address) are one target.
    out.targets.dedup_by_key(|t| t.addr);
    Ok(out)
}

/// The first four bytes at `addr`, if they lie in an executable section.
fn first_bytes(p: &super::Parsed<'_>, addr: u64) -> Option<[u8; 4]> {
    let (base, data) = exec_bytes_at(p, addr, 4)?;
    let at = usize::try_from(addr - base).ok()?;
    data.get(at..at + 4)?.try_into().ok()
}

/// Every trampoline of the closure table `table` at `addr` (those in code).
fn table_entries(p: &super::Parsed<'_>, addr: u64, table: &str, out: &mut Vec<CetTarget>) {
    for i in 0..TABLE_ENTRIES {
        let Some(at) = addr.checked_add(i * TABLE_STRIDE) else {
            return;
        };
        let Some(first) = first_bytes(p, at) else {
            continue;
        };
        out.push(CetTarget {
            addr: at,
            kind: CetTargetKind::ClosureTrampoline,
            name: alloc::format!("{table}+{:#x}", i * TABLE_STRIDE),
            first,
        });
    }
}
