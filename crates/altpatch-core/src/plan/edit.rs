//! One edit: what must be at an address, and what to put there.

use alloc::borrow::Cow;
use alloc::boxed::Box;
use core::fmt;

use super::Bytes;
use crate::arch::{self, Encoded, OutOfRange};

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
    /// filler (on x86-64, see [`x86::is_gap`](crate::arch::x86_64::is_gap)).
    Gap,
    /// One `call rel32` to this absolute address, spanning the whole edit.
    Call(usize),
    /// One `jmp rel8`/`jmp rel32` to this absolute address, spanning the
    /// whole edit.
    Jmp(usize),
}

impl Expect {
    /// Whether `found`, located at `addr`, satisfies the expectation.
    #[inline]
    pub fn matches(&self, addr: usize, found: &[u8]) -> bool {
        match self {
            Expect::Bytes(b) => crate::poke::short_eq(b, found),
            // The architecture reads the forms this crate writes without
            // decoding; anything else goes to its decoder.
            Expect::Nop => arch::is_nop(found),
            Expect::Gap => arch::is_padding(found),
            Expect::Call(t) => arch::call_target(found, addr) == Some(*t),
            Expect::Jmp(t) => arch::jump_target(found, addr) == Some(*t),
        }
    }

    /// The canonical bytes satisfying the expectation for an edit of `len`
    /// bytes at `addr`, used to undo an edit whose original bytes were never
    /// observed. `None` if no encoding of that length exists.
    pub fn canonical(&self, addr: usize, len: usize) -> Option<Bytes> {
        match self {
            Expect::Bytes(b) => Some(b.clone()),
            Expect::Nop => arch::nop_of_len(len).map(Bytes::new),
            Expect::Gap => {
                let mut v = alloc::vec![0u8; len];
                arch::fill_gap(&mut v);
                Some(Bytes::new(&v))
            }
            Expect::Call(t) => arch::call_of_len(addr, *t, len).map(Bytes::from),
            Expect::Jmp(t) => arch::jump_of_len(addr, *t, len).map(Bytes::from),
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
    /// Not validated yet, but its old bytes were read at its address by
    /// the planner that pushed it, which holds the update lock until the
    /// plan is applied: validation takes the observation instead of
    /// reading the text again. Only compact edits, whose old bytes are
    /// exact, are pushed in this state (`CompactPlan::push_observed`).
    Observed,
    /// The expected bytes are there; the edit will write.
    Pending,
    /// Written by the batch in progress (not yet committed).
    Written,
    /// The new bytes are in place.
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
    /// Names and rare errors, out of line: validation and writing walk every
    /// edit of a plan, so the hot part stays small.
    pub(crate) meta: Option<Box<Meta>>,
    pub(crate) state: State,
    /// Whether `meta` holds a range error (checked without a pointer chase).
    pub(crate) out_of_range: bool,
}

/// The cold part of an [`Edit`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Meta {
    pub(crate) site: Label,
    pub(crate) reason: Label,
    pub(crate) range_error: Option<OutOfRange>,
}

impl Edit {
    /// At `addr`, expect `expect` and write `new`.
    pub fn new(addr: usize, expect: Expect, new: impl Into<Bytes>) -> Edit {
        Edit {
            addr,
            expect,
            new: new.into(),
            old: None,
            meta: None,
            state: State::Unchecked,
            out_of_range: false,
        }
    }

    fn meta_mut(&mut self) -> &mut Meta {
        self.meta.get_or_insert_with(Default::default)
    }

    #[inline]
    pub(crate) fn range_error(&self) -> Option<OutOfRange> {
        if !self.out_of_range {
            return None;
        }
        self.meta.as_ref().and_then(|m| m.range_error)
    }

    /// At `addr`, expect exactly `old` and write `new` (same length).
    pub fn replace(addr: usize, old: &[u8], new: &[u8]) -> Edit {
        Edit::new(addr, Expect::Bytes(Bytes::new(old)), Bytes::new(new))
    }

    /// At `addr`, expect `expect` and write `call target` (on x86-64
    /// `e8 rel32`). A target out of range is reported by validation,
    /// naming the site.
    pub fn call(addr: usize, expect: Expect, target: usize) -> Edit {
        Edit::branch(addr, expect, target, arch::call_to)
    }

    /// At `addr`, expect `expect` and write `jmp target` (on x86-64
    /// `e9 rel32`).
    pub fn jmp(addr: usize, expect: Expect, target: usize) -> Edit {
        Edit::branch(addr, expect, target, arch::jump_to)
    }

    fn branch(
        addr: usize,
        expect: Expect,
        target: usize,
        encode: fn(usize, usize) -> Result<Encoded, OutOfRange>,
    ) -> Edit {
        match encode(addr, target) {
            Ok(b) => Edit::new(addr, expect, b),
            Err(e) => {
                // Never written (validation refuses the edit, naming the
                // site); a branch to the next instruction keeps the edit's
                // length and shows what kind of branch was asked for.
                let next = encode(addr, addr.wrapping_add(arch::BRANCH_LEN))
                    .expect("a branch to the next instruction");
                let mut edit = Edit::new(addr, expect, next);
                edit.meta_mut().range_error = Some(e);
                edit.out_of_range = true;
                edit
            }
        }
    }

    /// Names the site (shown in reports and errors).
    pub fn site(mut self, site: impl Into<Label>) -> Edit {
        self.meta_mut().site = site.into();
        self
    }

    /// Says why the edit is made (shown in reports).
    pub fn reason(mut self, reason: impl Into<Label>) -> Edit {
        self.meta_mut().reason = reason.into();
        self
    }

    /// The first byte's address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    #[inline]
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

    /// The bytes `undo` restores: those the last validation found at the
    /// site in its expected state, or the expected bytes themselves for an
    /// exact-bytes expectation.
    pub fn old_bytes(&self) -> Option<&[u8]> {
        match (&self.old, &self.expect) {
            (Some(o), _) => Some(o),
            (None, Expect::Bytes(b)) => Some(b),
            (None, _) => None,
        }
    }

    /// The site's name.
    pub fn site_name(&self) -> &str {
        self.meta.as_ref().map_or("", |m| &m.site)
    }

    /// The reason given.
    pub fn reason_text(&self) -> &str {
        self.meta.as_ref().map_or("", |m| &m.reason)
    }

    /// The bytes validation found at the site (or, for an exact-bytes
    /// expectation, those bytes): what rollback and undo restore.
    pub(crate) fn original(&self) -> &[u8] {
        match (&self.old, &self.expect) {
            (Some(o), _) => o,
            (None, Expect::Bytes(b)) => b,
            (None, _) => unreachable!("a pending edit has recorded its old bytes"),
        }
    }

    /// The site name, or the address when the edit has none.
    pub(crate) fn who(&self) -> Label {
        match &self.meta {
            Some(m) if !m.site.is_empty() => m.site.clone(),
            _ => Label::Owned(alloc::format!("{:#x}", self.addr)),
        }
    }
}
