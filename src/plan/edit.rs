//! One edit: what must be at an address, and what to put there.

use alloc::borrow::Cow;
use core::fmt;

use super::Bytes;
use crate::x86::{self, BranchKind, OutOfRange};

/// A short text naming a site or giving a reason: usually a `&'static str`,
/// owned only where a mechanism formats one.
pub type Label = Cow<'static, str>;

/// What an edit expects to find at its address before writing.
///
/// Instruction expectations are checked by decoding with iced-x86, since
/// different assemblers pick different encodings of the same instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expect {
    /// Exactly these bytes.
    Bytes(Bytes),
    /// One NOP instruction spanning the whole edit.
    Nop,
    /// Padding that falls through: NOPs, or a `jmp` to the end over `int3`
    /// filler (see [`x86::is_gap`]).
    Gap,
    /// One `call rel32` to this absolute address, spanning the whole edit.
    Call(usize),
    /// One `jmp rel8`/`jmp rel32` to this absolute address, spanning the
    /// whole edit.
    Jmp(usize),
}

impl Expect {
    /// Whether `found`, located at `addr`, satisfies the expectation.
    pub fn matches(&self, addr: usize, found: &[u8]) -> bool {
        match self {
            Expect::Bytes(b) => b.as_slice() == found,
            Expect::Nop => x86::is_single_nop(found),
            Expect::Gap => x86::is_gap(found),
            Expect::Call(t) => x86::rel_branch(found, addr as u64)
                .is_some_and(|b| b.kind == BranchKind::Call && b.target == *t as u64),
            Expect::Jmp(t) => x86::rel_branch(found, addr as u64)
                .is_some_and(|b| b.kind == BranchKind::Jmp && b.target == *t as u64),
        }
    }

    /// The canonical bytes satisfying the expectation for an edit of `len`
    /// bytes at `addr`, used to undo an edit whose original bytes were never
    /// observed. `None` if no encoding of that length exists.
    pub fn canonical(&self, addr: usize, len: usize) -> Option<Bytes> {
        match self {
            Expect::Bytes(b) => Some(b.clone()),
            Expect::Nop => x86::nop(len).map(Bytes::new),
            Expect::Gap => {
                let mut v = alloc::vec![0u8; len];
                x86::fill_gap(&mut v);
                Some(Bytes::new(&v))
            }
            Expect::Call(t) if len == 5 => x86::call_rel32(addr, *t).ok().map(Bytes::from),
            Expect::Jmp(t) if len == 5 => x86::jmp_rel32(addr, *t).ok().map(Bytes::from),
            Expect::Jmp(t) if len == 2 => x86::jmp_rel8(addr, *t).ok().map(Bytes::from),
            _ => None,
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Bytes(b) => write!(f, "{b}"),
            Expect::Nop => f.write_str("<a nop>"),
            Expect::Gap => f.write_str("<padding>"),
            Expect::Call(t) => write!(f, "<call {t:#x}>"),
            Expect::Jmp(t) => write!(f, "<jmp {t:#x}>"),
        }
    }
}

/// Where an edit stands after validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Not validated yet.
    Unchecked,
    /// The expected bytes are there; the edit will write.
    Pending,
    /// The new bytes are already there; the edit is a no-op.
    Done,
}

/// One change to text: at `addr`, replace what [`Expect`] describes by `new`.
///
/// ```
/// use altpatch::{Edit, Expect};
/// let e = Edit::replace(0x1000, &[0xb8, 1, 0, 0, 0], &[0xb8, 2, 0, 0, 0])
///     .site("ret_one")
///     .reason("return 2 instead of 1");
/// assert_eq!(e.len(), 5);
/// let c = Edit::call(0x2000, Expect::Nop, 0x2100).site("hook");
/// assert_eq!(c.new_bytes(), &[0xe8, 0xfb, 0x00, 0x00, 0x00]);
/// ```
#[derive(Clone, Debug)]
pub struct Edit {
    pub(crate) addr: usize,
    pub(crate) expect: Expect,
    pub(crate) new: Bytes,
    pub(crate) old: Option<Bytes>,
    pub(crate) range_error: Option<OutOfRange>,
    pub(crate) site: Label,
    pub(crate) reason: Label,
    pub(crate) state: State,
}

impl Edit {
    /// At `addr`, expect `expect` and write `new`.
    pub fn new(addr: usize, expect: Expect, new: impl Into<Bytes>) -> Edit {
        Edit {
            addr,
            expect,
            new: new.into(),
            old: None,
            range_error: None,
            site: Label::Borrowed(""),
            reason: Label::Borrowed(""),
            state: State::Unchecked,
        }
    }

    /// At `addr`, expect exactly `old` and write `new` (same length).
    pub fn replace(addr: usize, old: &[u8], new: &[u8]) -> Edit {
        Edit::new(addr, Expect::Bytes(Bytes::new(old)), Bytes::new(new))
    }

    /// At `addr`, expect `expect` and write `call target` (`e8 rel32`).
    /// A target out of rel32 range is reported by validation, naming the site.
    pub fn call(addr: usize, expect: Expect, target: usize) -> Edit {
        Edit::branch(addr, expect, target, 0xe8)
    }

    /// At `addr`, expect `expect` and write `jmp target` (`e9 rel32`).
    pub fn jmp(addr: usize, expect: Expect, target: usize) -> Edit {
        Edit::branch(addr, expect, target, 0xe9)
    }

    fn branch(addr: usize, expect: Expect, target: usize, opcode: u8) -> Edit {
        let enc = if opcode == 0xe8 {
            x86::call_rel32(addr, target)
        } else {
            x86::jmp_rel32(addr, target)
        };
        match enc {
            Ok(b) => Edit::new(addr, expect, b),
            Err(e) => {
                let mut edit = Edit::new(addr, expect, [opcode, 0, 0, 0, 0]);
                edit.range_error = Some(e);
                edit
            }
        }
    }

    /// Names the site (shown in reports and errors).
    pub fn site(mut self, site: impl Into<Label>) -> Edit {
        self.site = site.into();
        self
    }

    /// Says why the edit is made (shown in reports).
    pub fn reason(mut self, reason: impl Into<Label>) -> Edit {
        self.reason = reason.into();
        self
    }

    /// The first byte's address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.new.len()
    }

    /// Whether the edit writes no bytes (such an edit is rejected by validation).
    pub fn is_empty(&self) -> bool {
        self.new.is_empty()
    }

    /// The bytes the edit writes.
    pub fn new_bytes(&self) -> &[u8] {
        &self.new
    }

    /// What the edit expects to find.
    pub fn expected(&self) -> &Expect {
        &self.expect
    }

    /// The bytes found at the site by the last validation that saw the
    /// expected state (what `undo` restores).
    pub fn old_bytes(&self) -> Option<&[u8]> {
        self.old.as_deref()
    }

    /// The site's name.
    pub fn site_name(&self) -> &str {
        &self.site
    }

    /// The reason given.
    pub fn reason_text(&self) -> &str {
        &self.reason
    }

    pub(crate) fn end(&self) -> usize {
        self.addr.wrapping_add(self.new.len())
    }

    /// The site name, or the address when the edit has none.
    pub(crate) fn who(&self) -> Label {
        if self.site.is_empty() {
            Label::Owned(alloc::format!("{:#x}", self.addr))
        } else {
            self.site.clone()
        }
    }
}
