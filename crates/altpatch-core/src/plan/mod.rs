//! Plans: a list of edits to text, validated as a whole before any byte is
//! written, applied in page batches, rolled back on failure, undoable.
//!
//! ```text
//! build (mechanism) ─► validate ─► begin/write/commit/sync (poke) ─► report
//!                        │  every edit's current bytes are its expected (or already its new)
//!                        │  bytes, no overlaps, rel32 targets in range, inside the image's text
//!                        └─► any failure: an error naming the site, nothing written
//! ```
//!
//! A plan is a plain value: it can be printed (a dry run), applied, applied
//! again (a no-op), and undone.

mod batch;
mod bytes;
mod compact;
mod debug;
mod display;
pub use debug::{DebugLevel, DebugSink, set_debug_sink};
use debug::{debug_level, debug_print};
pub use display::PlanSummary;
mod edit;
mod error;
mod write;

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

pub use bytes::Bytes;
pub use compact::{COMPACT_MAX, CompactPlan};
pub use edit::{Edit, Expect, Label};
pub use error::PlanError;

use crate::poke::{TextPoke, page_span, short_eq};
use edit::State;

/// A set of edits to text, applied all or nothing.
///
/// ```
/// use altpatch::{DirectPoke, Edit, Plan, SyncMethod};
///
/// let mut text = vec![0xb8u8, 1, 0, 0, 0, 0xc3]; // mov eax, 1; ret
/// let base = text.as_mut_ptr() as usize;
/// // SAFETY: `text` stays readable while the plan is used.
/// let mut plan = unsafe { Plan::with_text(base..base + text.len()) };
/// plan.push(Edit::replace(base, &[0xb8, 1, 0, 0, 0], &[0xb8, 2, 0, 0, 0]).site("ret_one"));
/// println!("{plan}"); // dry run
///
/// // SAFETY: `text` is writable data that nothing executes.
/// let mut poke = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
/// // SAFETY: as above.
/// let report = unsafe { plan.apply(&mut poke) }.unwrap();
/// assert_eq!((report.written, text[1]), (1, 2));
/// // Applying again changes nothing.
/// // SAFETY: as above.
/// assert_eq!(unsafe { plan.apply(&mut poke) }.unwrap().written, 0);
/// // SAFETY: as above.
/// unsafe { plan.undo(&mut poke) }.unwrap();
/// assert_eq!(text[1], 1);
/// ```
#[derive(Clone, Debug)]
pub struct Plan {
    edits: Vec<Edit>,
    text: Option<Vec<Range<usize>>>,
    sorted: bool,
}

/// What [`Plan::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Edits in the plan.
    pub edits: usize,
    /// Edits written by this call.
    pub written: usize,
    /// Edits whose new bytes were already in place.
    pub already: usize,
    /// Distinct pages touched by the batch.
    pub pages: usize,
    /// How the poke wrote and published ([`TextPoke::method`]; empty if it
    /// does not say or nothing was written).
    pub via: &'static str,
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} edits: {} written, {} already in place, {} pages touched",
            self.edits, self.written, self.already, self.pages
        )?;
        if !self.via.is_empty() {
            write!(f, " ({})", self.via)?;
        }
        Ok(())
    }
}

/// The outcome of [`Plan::validate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Validation {
    /// Edits whose expected bytes are in place (they will be written).
    pub pending: usize,
    /// Edits whose new bytes are already in place.
    pub already: usize,
}

impl Plan {
    /// An empty plan whose edits must lie inside `text`.
    ///
    /// # Safety
    ///
    /// The range must be mapped and readable for as long as the plan is
    /// validated or applied.
    pub unsafe fn with_text(text: Range<usize>) -> Plan {
        // SAFETY: forwarded.
        unsafe { Plan::with_text_ranges(core::slice::from_ref(&text)) }
    }

    /// An empty plan whose edits must each lie inside one of `text`.
    ///
    /// # Safety
    ///
    /// Every range must be mapped and readable for as long as the plan is
    /// validated or applied.
    pub unsafe fn with_text_ranges(text: &[Range<usize>]) -> Plan {
        Plan {
            edits: Vec::new(),
            text: Some(text.to_vec()),
            sorted: true,
        }
    }

    /// An empty plan with no text bounds.
    ///
    /// # Safety
    ///
    /// Every edit pushed must address mapped, readable memory for as long as
    /// the plan is validated or applied.
    pub unsafe fn unbounded() -> Plan {
        Plan {
            edits: Vec::new(),
            text: None,
            sorted: true,
        }
    }

    /// Makes room for `additional` more edits.
    pub fn reserve(&mut self, additional: usize) {
        self.edits.reserve(additional);
    }

    /// Adds an edit. Nothing is checked until [`validate`](Self::validate).
    pub fn push(&mut self, edit: Edit) {
        if let Some(last) = self.edits.last()
            && last.addr > edit.addr
        {
            self.sorted = false;
        }
        self.edits.push(edit);
    }

    /// Moves every edit of `other` (a plan over the same text) into this
    /// plan, so they are validated and written as one batch: an edit of
    /// `other` on bytes an edit of this plan also changes is then refused
    /// as an overlap.
    ///
    /// ```
    /// use altpatch::{Edit, Plan};
    /// let text = [0x90u8; 8];
    /// let at = text.as_ptr() as usize;
    /// // SAFETY: `text` outlives both plans.
    /// let (mut a, mut b) = unsafe { (Plan::with_text(at..at + 8), Plan::with_text(at..at + 8)) };
    /// a.push(Edit::replace(at, &[0x90], &[0xc3]));
    /// b.push(Edit::replace(at + 4, &[0x90], &[0xc3]));
    /// a.append(b);
    /// assert_eq!(a.len(), 2);
    /// ```
    pub fn append(&mut self, other: Plan) {
        self.edits.extend(other.edits);
        self.sorted = false;
    }

    /// The edits, in address order once validated.
    pub fn edits(&self) -> &[Edit] {
        &self.edits
    }

    /// Number of edits.
    pub fn len(&self) -> usize {
        self.edits.len()
    }

    /// Whether the plan has no edits.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Checks every edit without writing anything: each lies inside the
    /// text, none overlap, rel32 branches reach their targets, and the bytes
    /// now at each site are either what the edit expects (the edit is
    /// pending; the bytes are remembered for [`undo`](Self::undo)) or already
    /// its new bytes. The first failure is returned, naming its site.
    pub fn validate<P: TextPoke + ?Sized>(&mut self, poke: &P) -> Result<Validation, PlanError> {
        batch::validate(self, poke, None)
    }

    /// The plan that reverses this one: each edit expects this plan's new
    /// bytes and writes back the bytes validation found there (or, for an
    /// edit never seen in its old state, the canonical encoding of what it
    /// expected).
    pub fn inverse(&self) -> Result<Plan, PlanError> {
        self.inverse_where(|_| true)
    }

    /// The inverse of the edits whose state `keep` accepts.
    fn inverse_where(&self, keep: impl Fn(State) -> bool) -> Result<Plan, PlanError> {
        let mut inv = Plan {
            edits: Vec::with_capacity(self.edits.len()),
            text: self.text.clone(),
            sorted: self.sorted,
        };
        for e in self.edits.iter().filter(|e| keep(e.state)) {
            let old = match (&e.old, &e.expect) {
                (Some(o), _) => o.clone(),
                (None, Expect::Bytes(b)) => b.clone(),
                (None, _) => e
                    .expect
                    .canonical(e.addr, e.len())
                    .ok_or_else(|| PlanError::NothingToRestore { site: e.who() })?,
            };
            let mut r = Edit::new(e.addr, Expect::Bytes(e.new.clone()), old);
            if let Some(m) = &e.meta {
                r = r.site(m.site.clone());
                if !m.reason.is_empty() {
                    r = r.reason(alloc::format!("undo: {}", m.reason));
                }
            }
            inv.edits.push(r);
        }
        Ok(inv)
    }

    /// Restores what [`apply`](Self::apply) changed: applies
    /// [`inverse`](Self::inverse) with the same guarantees (validated first,
    /// all or nothing, idempotent).
    ///
    /// ```
    /// use altpatch::{DirectPoke, Edit, Expect, Plan, SyncMethod};
    ///
    /// let mut text = vec![0x0f_u8, 0x1f, 0x44, 0x00, 0x00, 0xc3];
    /// let base = text.as_mut_ptr() as usize;
    /// // SAFETY: `text` outlives the plan; nothing executes it.
    /// let mut plan = unsafe { Plan::with_text(base..base + text.len()) };
    /// plan.push(Edit::jmp(base, Expect::Nop, base + 5));
    /// // SAFETY: the buffer is writable at its own addresses.
    /// let mut poke = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
    /// // SAFETY: as above.
    /// unsafe { plan.apply(&mut poke) }.unwrap();
    /// // SAFETY: as above.
    /// unsafe { plan.undo(&mut poke) }.unwrap();
    /// assert_eq!(text[..5], [0x0f, 0x1f, 0x44, 0x00, 0x00]);
    /// ```
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

    /// Puts back the edits the last apply wrote (state `Written`), leaving
    /// those it found already in place: a caller undoing a batch after a
    /// later one failed must not undo what was there before it.
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`].
    #[doc(hidden)]
    pub unsafe fn undo_written<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<ApplyReport, PlanError> {
        // SAFETY: forwarded.
        unsafe { self.undo_where(poke, |s| s == State::Written) }
    }

    /// Applies the inverse of the edits `keep` accepts, then forgets every
    /// edit's state.
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`].
    unsafe fn undo_where<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
        keep: impl Fn(State) -> bool,
    ) -> Result<ApplyReport, PlanError> {
        let mut inv = self.inverse_where(keep)?;
        // SAFETY: forwarded; the inverse writes back bytes that were there.
        let report = unsafe { inv.apply(poke) }?;
        for e in &mut self.edits {
            e.state = State::Unchecked;
        }
        Ok(report)
    }
}

impl batch::EditList for Plan {
    fn count(&self) -> usize {
        self.edits.len()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.edits.sort_by_key(|e| e.addr);
            self.sorted = true;
        }
    }

    fn text(&self) -> Option<&[Range<usize>]> {
        self.text.as_deref()
    }

    #[inline]
    fn addr(&self, i: usize) -> usize {
        self.edits[i].addr
    }

    #[inline]
    fn len(&self, i: usize) -> usize {
        self.edits[i].len()
    }

    #[inline]
    fn new_bytes(&self, i: usize) -> &[u8] {
        &self.edits[i].new
    }

    fn original(&self, i: usize) -> &[u8] {
        self.edits[i].original()
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
        self.edits[i].who()
    }

    fn check_shape(&self, i: usize) -> Result<(), PlanError> {
        let e = &self.edits[i];
        if let Some(err) = e.range_error() {
            return Err(PlanError::OutOfRange {
                site: e.who(),
                error: err,
            });
        }
        let why = match &e.expect {
            _ if e.is_empty() => "edit writes no bytes",
            Expect::Bytes(b) if b.len() != e.len() => "expected and new bytes differ in length",
            _ => return Ok(()),
        };
        Err(PlanError::BadEdit {
            site: e.who(),
            addr: e.addr,
            why,
        })
    }

    fn observe(&mut self, i: usize, found: &[u8]) -> Result<bool, PlanError> {
        let e = &mut self.edits[i];
        if short_eq(found, &e.new) {
            Ok(false)
        } else if e.expect.matches(e.addr, found) {
            if !matches!(e.expect, Expect::Bytes(_)) {
                e.old = Some(Bytes::new(found));
            }
            Ok(true)
        } else {
            Err(PlanError::Unexpected {
                site: e.who(),
                addr: e.addr,
                expected: e.expect.clone(),
                found: Bytes::new(found),
            })
        }
    }

    fn applied(&self, report: &ApplyReport) {
        debug_print(self, report);
    }
}

/// Extends `runs` (maximal contiguous page ranges, in address order) with
/// the pages of `addr..end`, which starts at or after every earlier edit.
#[inline]
fn add_page_run(runs: &mut Vec<Range<usize>>, addr: usize, end: usize) {
    // Most edits lie in the run of the one before (edits come in address
    // order, so `addr` is past that run's start).
    if let Some(last) = runs.last()
        && last.start <= addr
        && end <= last.end
    {
        return;
    }
    let span = page_span(addr, end);
    match runs.last_mut() {
        Some(last) if last.end >= span.start => last.end = last.end.max(span.end),
        _ => runs.push(span),
    }
}

/// The page runs covering `edits`, which are in address order.
#[cfg(test)]
fn page_runs<'a>(edits: impl Iterator<Item = &'a Edit>) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    for e in edits {
        add_page_run(&mut runs, e.addr, e.addr + e.len());
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_pages() {
        let e = |a| Edit::replace(a, &[0], &[1]);
        let edits = [e(0x1000), e(0x1ff0), e(0x2000), e(0x4000), e(0x4fff)];
        let runs = page_runs(edits.iter());
        assert_eq!(runs, [0x1000..0x3000, 0x4000..0x5000]);
        // An edit straddling a page boundary covers both pages.
        let s = [Edit::replace(0x1ffe, &[0; 4], &[1; 4])];
        let runs = page_runs(s.iter());
        assert_eq!(
            (runs.len(), runs[0].start, runs[0].end),
            (1, 0x1000, 0x3000)
        );
    }
}
