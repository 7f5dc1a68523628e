//! A plan of few-byte exact edits, stored flat: what start-up makes by the
//! ten thousand (one per retpoline site), at a fraction of a general
//! [`Edit`](super::Edit)'s cost to build, check, write and drop.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use super::batch::{self, EditList};
use super::edit::State;
use super::{ApplyReport, Bytes, Edit, Expect, Label, Plan, PlanError, Validation};
use crate::arch::Encoded;
use crate::poke::{PokeError, TextPoke, copy_short, load_short};

/// The longest edit a [`CompactPlan`] holds: every `call`/`jmp`/`jcc rel32`
/// and each inline form that replaces one.
pub const COMPACT_MAX: usize = 8;

/// One exact edit of at most [`COMPACT_MAX`] bytes, in 32 bytes.
#[derive(Clone, Copy)]
struct CompactEdit {
    addr: usize,
    old: [u8; COMPACT_MAX],
    new: [u8; COMPACT_MAX],
    /// 0 marks an edit that was pushed malformed (validation refuses it).
    len: u8,
    state: State,
}

/// A set of exact few-byte edits (expect exactly `old`, write `new`),
/// applied all or nothing with the same guarantees and the same driver as
/// a [`Plan`]: validated as a whole before any byte is written, written in
/// one batch, read back, rolled back on failure, undoable.
///
/// A [`Plan`] edit carries an [`Expect`], heap-capable bytes, a name and a
/// reason; a compact edit is an address and two short byte arrays, with one
/// reason for the whole plan. Mechanisms that plan thousands of sites at
/// start-up (retpolines) use it.
///
/// ```
/// use altpatch::{CompactPlan, DirectPoke, SyncMethod};
///
/// let mut text = vec![0xb8u8, 1, 0, 0, 0, 0xc3]; // mov eax, 1; ret
/// let base = text.as_mut_ptr() as usize;
/// // SAFETY: `text` stays readable while the plan is used.
/// let mut plan = unsafe { CompactPlan::with_text(base..base + text.len(), "return 2") };
/// plan.push(base, &[0xb8, 1, 0, 0, 0], &[0xb8, 2, 0, 0, 0]);
/// // SAFETY: `text` is writable data that nothing executes.
/// let mut poke = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
/// // SAFETY: as above.
/// let report = unsafe { plan.apply(&mut poke) }.unwrap();
/// assert_eq!((report.written, text[1]), (1, 2));
/// // SAFETY: as above.
/// unsafe { plan.undo(&mut poke) }.unwrap();
/// assert_eq!(text[1], 1);
/// ```
#[derive(Clone)]
pub struct CompactPlan {
    edits: Vec<CompactEdit>,
    text: Vec<Range<usize>>,
    reason: &'static str,
}

impl CompactPlan {
    /// An empty plan whose edits must each lie inside one of `text`.
    ///
    /// # Safety
    ///
    /// Every range must be mapped and readable for as long as the plan is
    /// validated or applied.
    pub unsafe fn with_text_ranges(text: &[Range<usize>], reason: &'static str) -> CompactPlan {
        CompactPlan {
            edits: Vec::new(),
            text: text.to_vec(),
            reason,
        }
    }

    /// An empty plan whose edits must lie inside `text`.
    ///
    /// # Safety
    ///
    /// The range must be mapped and readable for as long as the plan is
    /// validated or applied.
    pub unsafe fn with_text(text: Range<usize>, reason: &'static str) -> CompactPlan {
        CompactPlan {
            edits: Vec::new(),
            text: alloc::vec![text],
            reason,
        }
    }

    /// The byte ranges the edits change (for a caller checking that no
    /// other batch changes the same bytes).
    #[doc(hidden)]
    pub fn spans(&self) -> Vec<Range<usize>> {
        self.edits
            .iter()
            .map(|e| e.addr..e.addr.saturating_add(e.len as usize))
            .collect()
    }

    /// Makes room for `additional` more edits.
    pub fn reserve(&mut self, additional: usize) {
        self.edits.reserve(additional);
    }

    /// Adds the edit that expects exactly `old` at `addr` and writes `new`.
    /// Nothing is checked until validation; an edit that is empty, longer
    /// than [`COMPACT_MAX`] or whose two sides differ in length is refused
    /// there, naming its address, and nothing is written.
    #[inline]
    pub fn push(&mut self, addr: usize, old: &[u8], new: &[u8]) {
        let n = new.len();
        if old.len() != n || n > COMPACT_MAX {
            return self.push_int(addr, 0, 0, 0, State::Unchecked);
        }
        // SAFETY: both slices are `n <= COMPACT_MAX` (8) readable bytes.
        let (old, new) = unsafe { (load_short(old.as_ptr(), n), load_short(new.as_ptr(), n)) };
        self.push_int(addr, old, new, n, State::Unchecked);
    }

    /// [`push`](Self::push) of the first `n` bytes of two encodings: the
    /// start-up path, with no length dispatch per copy.
    #[inline(always)]
    #[doc(hidden)]
    pub fn push_encoded(&mut self, addr: usize, old: &Encoded, new: &Encoded, n: usize) {
        if n > COMPACT_MAX || n > old.len() || n > new.len() {
            return self.push_int(addr, 0, 0, 0, State::Unchecked);
        }
        // Only the first `n` bytes, also when the edit covers just a prefix
        // of the encodings (`lfence` against a NOP).
        let mask = if n == COMPACT_MAX {
            u64::MAX
        } else {
            (1u64 << (8 * n)) - 1
        };
        let head = |e: &Encoded| u64::from_le_bytes(e.head8()) & mask;
        self.push_int(addr, head(old), head(new), n, State::Unchecked);
    }

    /// [`push`](Self::push) of an edit given as little-endian integers,
    /// zero above its `n` bytes (at most [`COMPACT_MAX`]): the start-up
    /// path, which reads and builds site bytes as integers.
    #[inline(always)]
    #[doc(hidden)]
    pub fn push_short(&mut self, addr: usize, old: u64, new: u64, n: usize) {
        self.push_int(addr, old, new, n, State::Unchecked);
    }

    /// [`push_short`](Self::push_short) of an edit whose old bytes the
    /// caller has just read, pushed observed (see `State::Observed`):
    /// validation takes that reading instead of reading them again.
    ///
    /// # Safety
    ///
    /// `old` must be the bytes at `addr..addr+n` now, read inside the
    /// plan's text. The caller must hold the update lock from that read
    /// until the plan is applied, and neither write text on its own thread
    /// in between nor let another writer do so: every change through a
    /// `altpatch::os::linux::LinuxPoke` takes that lock; a `DirectPoke`'s
    /// and a kernel's other writers are the caller's to exclude.
    #[inline(always)]
    #[doc(hidden)]
    pub unsafe fn push_observed(&mut self, addr: usize, old: u64, new: u64, n: usize) {
        self.push_int(addr, old, new, n, State::Observed);
    }

    /// The one constructor of an edit: `old` and `new` zero above their
    /// `n` bytes (the arrays are compared whole, `observe`); `n` outside
    /// 1..=8 makes an edit validation refuses by name (length 0).
    #[inline(always)]
    fn push_int(&mut self, addr: usize, old: u64, new: u64, n: usize, state: State) {
        debug_assert!(n >= COMPACT_MAX || (old | new) >> (8 * n) == 0);
        self.edits.push(CompactEdit {
            addr,
            old: old.to_le_bytes(),
            new: new.to_le_bytes(),
            len: if (1..=COMPACT_MAX).contains(&n) {
                n as u8
            } else {
                0
            },
            state,
        });
    }

    /// Number of edits.
    pub fn len(&self) -> usize {
        self.edits.len()
    }

    /// Whether the plan has no edits.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Checks every edit without writing anything, as [`Plan::validate`].
    pub fn validate<P: TextPoke + ?Sized>(&mut self, poke: &P) -> Result<Validation, PlanError> {
        batch::validate(self, poke, None)
    }

    /// Validates, then writes every pending edit in one batch, as
    /// [`Plan::apply`] (same guarantees: nothing written on a refusal,
    /// rollback on a failed write, every write read back).
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`].
    pub unsafe fn apply<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<ApplyReport, PlanError> {
        // SAFETY: forwarded from our caller.
        unsafe { batch::apply(self, poke) }
    }

    /// Restores what [`apply`](Self::apply) changed: every edit expects its
    /// new bytes and writes its old ones back, validated first, all or
    /// nothing.
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`].
    pub unsafe fn undo<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<ApplyReport, PlanError> {
        // SAFETY: forwarded.
        unsafe { self.undo_where(poke, |_| true) }
    }

    /// Writes back the old bytes of the edits whose state `keep` accepts,
    /// as one validated batch (the inverse plan).
    ///
    /// # Safety
    ///
    /// As for [`CompactPlan::apply`].
    unsafe fn undo_where<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
        keep: impl Fn(State) -> bool,
    ) -> Result<ApplyReport, PlanError> {
        let mut inv = self.clone();
        inv.edits.retain(|e| keep(e.state));
        for e in &mut inv.edits {
            core::mem::swap(&mut e.old, &mut e.new);
            e.state = State::Unchecked;
        }
        // SAFETY: forwarded; the inverse writes back bytes that were there.
        let report = unsafe { inv.apply(poke) }?;
        for e in &mut self.edits {
            e.state = State::Unchecked;
        }
        Ok(report)
    }

    /// Puts back the edits the last apply wrote, leaving those it found
    /// already in place (see `Plan::undo_written`).
    ///
    /// # Safety
    ///
    /// As for [`CompactPlan::apply`].
    #[doc(hidden)]
    pub unsafe fn undo_written<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<ApplyReport, PlanError> {
        // SAFETY: forwarded.
        unsafe { self.undo_where(poke, |s| s == State::Written) }
    }

    /// The same edits, in the state they stand, as a general [`Plan`] (for
    /// listings and dry runs).
    pub fn to_plan(&self) -> Plan {
        // SAFETY: the ranges are this plan's own, under the same contract.
        let mut plan = unsafe { Plan::with_text_ranges(&self.text) };
        plan.reserve(self.edits.len());
        for e in &self.edits {
            let n = e.len as usize;
            let mut edit = Edit::replace(e.addr, &e.old[..n], &e.new[..n]);
            // Listed as it stands (`[wrote]`, `[done]`, ...); an
            // observation stays with this plan (the copy is read again).
            edit.state = match e.state {
                State::Observed => State::Unchecked,
                s => s,
            };
            plan.push(if self.reason.is_empty() {
                edit
            } else {
                edit.reason(self.reason)
            });
        }
        plan
    }
}

impl EditList for CompactPlan {
    #[inline]
    fn count(&self) -> usize {
        self.edits.len()
    }

    fn sort(&mut self) {
        // One scan, rather than a flag kept by every push (start-up pushes
        // tens of thousands of edits, in order).
        if !self.edits.is_sorted_by_key(|e| e.addr) {
            self.edits.sort_unstable_by_key(|e| e.addr);
        }
    }

    #[inline]
    fn text(&self) -> Option<&[Range<usize>]> {
        Some(&self.text)
    }

    #[inline]
    fn addr(&self, i: usize) -> usize {
        self.edits[i].addr
    }

    #[inline]
    fn len(&self, i: usize) -> usize {
        self.edits[i].len as usize
    }

    #[inline]
    fn new_bytes(&self, i: usize) -> &[u8] {
        let e = &self.edits[i];
        &e.new[..e.len as usize]
    }

    #[inline]
    fn original(&self, i: usize) -> &[u8] {
        let e = &self.edits[i];
        &e.old[..e.len as usize]
    }

    #[inline]
    fn state(&self, i: usize) -> State {
        self.edits[i].state
    }

    #[inline]
    fn set_state(&mut self, i: usize, state: State) {
        self.edits[i].state = state;
    }

    fn who(&self, i: usize) -> Label {
        Label::Owned(alloc::format!("{:#x}", self.edits[i].addr))
    }

    #[inline]
    fn check_shape(&self, i: usize) -> Result<(), PlanError> {
        if self.edits[i].len != 0 {
            return Ok(());
        }
        Err(PlanError::BadEdit {
            site: self.who(i),
            addr: self.edits[i].addr,
            why: "a compact edit is 1 to 8 bytes, the same length on both sides",
        })
    }

    #[inline]
    fn observe(&mut self, i: usize, found: &[u8]) -> Result<bool, PlanError> {
        let e = &self.edits[i];
        // Both arrays are zero past the edit's length (`push`,
        // `push_encoded`): one copy of what was found, two 8-byte compares.
        let mut f = [0u8; COMPACT_MAX];
        let n = found.len().min(COMPACT_MAX);
        // SAFETY: `n` bytes fit both `found` and `f`.
        unsafe { copy_short(found.as_ptr(), f.as_mut_ptr(), n) };
        if found.len() == e.len as usize && f == e.new {
            Ok(false)
        } else if found.len() == e.len as usize && f == e.old {
            Ok(true)
        } else {
            Err(PlanError::Unexpected {
                site: self.who(i),
                addr: self.edits[i].addr,
                expected: Expect::Bytes(Bytes::new(self.original(i))),
                found: Bytes::new(found),
            })
        }
    }

    /// The driver's loop over the flat edits (no index checks per edit).
    fn take_observed(
        &mut self,
        from: usize,
        prev_end: &mut usize,
        mut runs: Option<&mut Vec<Range<usize>>>,
    ) -> Result<usize, usize> {
        let mut end = *prev_end;
        let mut next = from;
        for e in self.edits.get_mut(from..).unwrap_or_default() {
            // A malformed edit (length 0) is left to the per-edit checks,
            // which refuse it by name.
            if e.state != State::Observed || e.len == 0 {
                break;
            }
            if end > e.addr {
                *prev_end = end;
                return Err(next);
            }
            end = e.addr + usize::from(e.len);
            e.state = State::Pending;
            if let Some(runs) = runs.as_deref_mut() {
                super::add_page_run(runs, e.addr, end);
            }
            next += 1;
        }
        *prev_end = end;
        Ok(next)
    }

    unsafe fn write_pending<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<(), (usize, PokeError)> {
        for (i, e) in self.edits.iter_mut().enumerate() {
            if e.state != State::Pending {
                continue;
            }
            // SAFETY: forwarded from our caller (the trait's contract).
            unsafe { poke.write(e.addr, &e.new[..usize::from(e.len)]) }.map_err(|err| (i, err))?;
            e.state = State::Written;
        }
        Ok(())
    }

    /// The driver's read-back over the flat edits: both sides compared as
    /// their zero-padded 8 bytes.
    unsafe fn first_not_landed_in_place(&self) -> Option<usize> {
        self.edits.iter().position(|e| {
            // SAFETY: the edit lies in the plan's text, readable in place
            // (the trait's contract); `len` is at most 8 (`push`).
            e.state == State::Written
                && unsafe { load_short(e.addr as *const u8, usize::from(e.len)) }
                    != u64::from_le_bytes(e.new)
        })
    }

    fn applied(&self, report: &ApplyReport) {
        // The listing is built only when asked for.
        if super::debug_level() > 0 {
            super::debug_print(&self.to_plan(), report);
        }
    }
}

impl fmt::Debug for CompactPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompactPlan")
            .field("edits", &self.edits.len())
            .field("reason", &self.reason)
            .finish()
    }
}

impl fmt::Display for CompactPlan {
    /// The listing of [`to_plan`](Self::to_plan).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_plan(), f)
    }
}

#[cfg(test)]
mod tests;
