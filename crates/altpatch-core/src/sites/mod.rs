//! Compiler-generated sites: calls and jumps to retpoline thunks, the return
//! thunk, static-call trampolines and ifunc symbols.
//!
//! The compiler emits these without any table of where they are. altpatch
//! finds them exactly from the linked image's own relocations (link with
//! `-Wl,--emit-relocs`): each `R_X86_64_PLT32`/`PC32` relocation against one
//! of the [well-known names](names) in an executable section, at the
//! displacement of a `call`/`jmp`/`jcc rel32`, is a site. Nothing is guessed
//! from instruction patterns.
//!
//! Two ways to get them:
//!
//! * at run time (`std`): `altpatch::elf::current_sites` reads
//!   `/proc/self/exe` once and maps link-time addresses to run-time ones;
//! * embedded: the program reserves a table with
//!   [`reserve_site_table!`](crate::reserve_site_table) and the `altpatch
//!   embed IMAGE` tool (or `altpatch::elf::embed_file`) fills it in the linked
//!   file, in place. The table is part of the image, so a kernel reads it
//!   with no file system ([`Image::embedded_sites`](crate::image::Image::embedded_sites)).
//!   When present it is preferred.

#[doc(hidden)]
pub mod embedded;
mod thunk_names;

use core::fmt;

pub use embedded::{EmbeddedEntry, EmbeddedTable, EmbeddedTableError, TABLE_MAGIC};
pub use thunk_names::{ThunkName, ThunkNames};

use crate::arch::x86_64::{BranchKind, Reg};

/// The symbol names that make a relocation a site.
pub mod names {
    /// Prefix of the retpoline thunks: `__x86_indirect_thunk_<reg>`.
    pub const INDIRECT_THUNK_PREFIX: &str = "__x86_indirect_thunk_";
    /// Prefix of LLVM's own retpoline thunks, `__llvm_retpoline_<reg>`:
    /// a local copy in each binary built with `-Zretpoline` (stable rustc:
    /// `-C target-feature=+retpoline-indirect-calls`) or clang
    /// `-mretpoline`.
    pub const LLVM_RETPOLINE_PREFIX: &str = "__llvm_retpoline_";
    /// The return thunk.
    pub const RETURN_THUNK: &str = "__x86_return_thunk";
    /// Static-call trampolines: any symbol whose name *contains* this (the
    /// macro's trampolines are naked functions named `__altpatch_sc_tramp`,
    /// so their mangled names carry it; hand-written ones may use it as a
    /// prefix).
    pub const STATIC_CALL_TRAMPOLINE_MARK: &str = "__altpatch_sc_tramp";
    /// Stubs of `ifunc!` functions: any symbol whose name contains this.
    /// (ELF symbols of type `STT_GNU_IFUNC` are ifunc sites too, whatever
    /// their name.)
    pub const IFUNC_STUB_MARK: &str = "__altpatch_ifunc";
}

/// What a site reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SiteKind {
    /// `__x86_indirect_thunk_<reg>`, `__llvm_retpoline_<reg>` or a
    /// registered alias ([`ThunkNames`]): an indirect branch through `reg`.
    IndirectThunk(Reg),
    /// `__x86_return_thunk`: a return.
    ReturnThunk,
    /// A static-call trampoline.
    StaticCall,
    /// An ifunc symbol or `ifunc!` stub.
    Ifunc,
}

/// [`SiteKind::decode`]'s table, by `kind * 16 + register`.
const KINDS: [Option<SiteKind>; 256] = {
    let mut t = [None; 256];
    let mut i = 0;
    while i < 256 {
        let reg = Reg::ALL[i & 15];
        t[i] = match i >> 4 {
            1 => Some(SiteKind::IndirectThunk(reg)),
            2 => Some(SiteKind::ReturnThunk),
            3 => Some(SiteKind::StaticCall),
            4 => Some(SiteKind::Ifunc),
            _ => None,
        };
        i += 1;
    }
    t
};

impl SiteKind {
    /// The embedded-table encoding: (kind, register).
    #[doc(hidden)]
    pub fn encode(self) -> (u8, u8) {
        match self {
            SiteKind::IndirectThunk(r) => (1, r as u8),
            SiteKind::ReturnThunk => (2, 0),
            SiteKind::StaticCall => (3, 0),
            SiteKind::Ifunc => (4, 0),
        }
    }

    /// [`encode`](Self::encode) back, both numbers below 16 (a register
    /// of 16 or more is refused for every kind: 0 is written where a kind
    /// has none). One table load: discovery decodes a kind per relocation,
    /// start-up one per embedded entry.
    #[inline(always)]
    #[doc(hidden)]
    pub fn decode(kind: u8, reg: u8) -> Option<SiteKind> {
        if (kind | reg) >= 16 {
            return None;
        }
        KINDS[usize::from(kind << 4 | reg)]
    }

    /// A short name for tables: `thunk`, `return_thunk`, `static_call`,
    /// `ifunc`.
    pub fn name(self) -> &'static str {
        match self {
            SiteKind::IndirectThunk(_) => "thunk",
            SiteKind::ReturnThunk => "return_thunk",
            SiteKind::StaticCall => "static_call",
            SiteKind::Ifunc => "ifunc",
        }
    }
}

impl fmt::Display for SiteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteKind::IndirectThunk(r) => write!(f, "thunk {r}"),
            other => f.write_str(other.name()),
        }
    }
}

/// One site: an instruction that branches to a well-known symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Site {
    /// Address of the instruction's first byte (link-time or run-time,
    /// depending on where the list came from).
    pub addr: usize,
    /// The instruction's length: 5 for `call`/`jmp rel32`, 6 for
    /// `jcc rel32`, one more per prefix byte.
    pub len: u8,
    /// `call`, `jmp` or `jcc`.
    pub form: BranchKind,
    /// What the symbol is.
    pub kind: SiteKind,
    /// The symbol's address (the thunk, trampoline or ifunc), in the same
    /// address space as `addr`.
    pub target: usize,
}

impl Site {
    /// The same site shifted by `bias` (link-time to run-time addresses).
    pub fn biased(&self, bias: usize) -> Site {
        Site {
            addr: self.addr.wrapping_add(bias),
            target: self.target.wrapping_add(bias),
            ..*self
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form = match self.form {
            BranchKind::Call => "call",
            BranchKind::Jmp => "jmp",
            BranchKind::Jcc(_) => "jcc",
        };
        write!(
            f,
            "{:#x} {form} ({} bytes) -> {:#x} {}",
            self.addr, self.len, self.target, self.kind
        )
    }
}
