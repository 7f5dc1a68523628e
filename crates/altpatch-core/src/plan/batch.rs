//! The one driver every plan representation goes through: validation, the
//! batch of writes, the read-back that proves each write landed, rollback.
//!
//! A [`Plan`](super::Plan) holds general edits (any length, any
//! [`Expect`](super::Expect), names and reasons); a
//! [`CompactPlan`](super::CompactPlan) holds the few-byte exact edits start-up
//! makes by the ten thousand. Both are lists of edits to this driver
//! ([`EditList`]), so the order of the protocol — validate everything, then
//! announce the pages, write, commit, sync, read back, and restore on any
//! failure — is written once.

use alloc::vec::Vec;
use core::ops::Range;

use super::edit::State;
use super::{ApplyReport, Label, PlanError, Validation, add_page_run};
use crate::poke::{PAGE_SIZE, PokeError, TextPoke, short_eq};

/// A list of edits the driver validates and writes.
///
/// Indexes run over `0..count()`; after [`sort`](EditList::sort) they are in
/// address order.
pub(crate) trait EditList {
    /// Number of edits.
    fn count(&self) -> usize;
    /// Puts the edits in address order (validation relies on it).
    fn sort(&mut self);
    /// The text every edit must lie in (`None`: unbounded).
    fn text(&self) -> Option<&[Range<usize>]>;
    /// Edit `i`'s first address.
    fn addr(&self, i: usize) -> usize;
    /// Edit `i`'s length.
    fn len(&self, i: usize) -> usize;
    /// The bytes edit `i` writes.
    fn new_bytes(&self, i: usize) -> &[u8];
    /// The bytes rollback and undo restore for a pending edit `i`.
    fn original(&self, i: usize) -> &[u8];
    /// Where edit `i` stands.
    fn state(&self, i: usize) -> State;
    /// Moves edit `i` to `state`.
    fn set_state(&mut self, i: usize, state: State);
    /// Edit `i`'s name for errors (its site, or its address).
    fn who(&self, i: usize) -> Label;
    /// Refusals that need no read of the text (empty edit, lengths that
    /// disagree, a branch out of range).
    fn check_shape(&self, i: usize) -> Result<(), PlanError>;
    /// Judges `found`, the bytes now at edit `i`: `Ok(true)` if they are
    /// the expected old bytes (the edit will write; remembers them for
    /// undo), `Ok(false)` if they are already the new bytes, else the
    /// refusal naming the site.
    fn observe(&mut self, i: usize, found: &[u8]) -> Result<bool, PlanError>;
    /// Called after a successful apply that wrote something (the
    /// `ALTPATCH_DEBUG` listing).
    fn applied(&self, _report: &ApplyReport) {}

    /// Writes every pending edit through `poke` in index order, moving
    /// each to [`State::Written`]; on a failed write, that edit's index and
    /// the error (the edits before it stay written, for the rollback).
    /// A list may override it with a loop over its own storage that does
    /// exactly this (start-up writes tens of thousands of edits).
    ///
    /// # Safety
    ///
    /// As for [`apply`], inside a batch `poke` began over every pending
    /// edit, after validation.
    unsafe fn write_pending<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<(), (usize, PokeError)> {
        for i in 0..self.count() {
            if self.state(i) != State::Pending {
                continue;
            }
            // SAFETY: forwarded from our caller.
            unsafe { poke.write(self.addr(i), self.new_bytes(i)) }.map_err(|e| (i, e))?;
            self.set_state(i, State::Written);
        }
        Ok(())
    }

    /// Takes the run of [`State::Observed`] edits starting at `from`
    /// without reading them (their planner read them under the update
    /// lock, held since): each must start at or after `*prev_end` (no
    /// overlap), moves to [`State::Pending`], extends `*prev_end` and, with
    /// `runs`, the page runs. Returns the index after the run (`from` if
    /// edit `from` is not observed), or the index of an overlapping edit.
    /// The default takes none: validation then reads observed edits like
    /// any other (always safe; only lists that push observed edits
    /// override it).
    fn take_observed(
        &mut self,
        from: usize,
        _prev_end: &mut usize,
        _runs: Option<&mut Vec<Range<usize>>>,
    ) -> Result<usize, usize> {
        Ok(from)
    }

    /// The first written edit whose bytes, read in place, are not its new
    /// bytes (a write that did not land). Overridable as
    /// [`write_pending`](EditList::write_pending) is.
    ///
    /// # Safety
    ///
    /// Every edit lies in the list's text, which is readable in place.
    unsafe fn first_not_landed_in_place(&self) -> Option<usize> {
        (0..self.count()).find(|&i| {
            self.state(i) == State::Written && {
                let (addr, len) = (self.addr(i), self.len(i));
                // SAFETY: inside the list's text, readable (our contract).
                let found = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
                !short_eq(found, self.new_bytes(i))
            }
        })
    }
}

/// Checks every edit without writing anything; with `runs`, also collects
/// the page runs of the pending edits (one pass instead of two).
pub(crate) fn validate<E: EditList + ?Sized, P: TextPoke + ?Sized>(
    list: &mut E,
    poke: &P,
    mut runs: Option<&mut Vec<Range<usize>>>,
) -> Result<Validation, PlanError> {
    list.sort();
    let mut v = Validation::default();
    let mut small = [0u8; 32];
    let mut big = Vec::new();
    let mut prev_end = 0usize;
    let in_place = poke.reads_in_place();
    let mut i = 0;
    while i < list.count() {
        match list.take_observed(i, &mut prev_end, runs.as_deref_mut()) {
            Ok(next) if next > i => {
                v.pending += next - i;
                i = next;
                continue;
            }
            Ok(_) => {}
            Err(at) => {
                return Err(PlanError::Overlap {
                    site: list.who(at - 1),
                    other: list.who(at),
                    addr: list.addr(at),
                });
            }
        }
        list.check_shape(i)?;
        let (addr, len) = (list.addr(i), list.len(i));
        let inside = match (list.text(), addr.checked_add(len)) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(text), Some(end)) => text.iter().any(|r| r.start <= addr && end <= r.end),
        };
        if !inside {
            return Err(PlanError::OutsideText {
                site: list.who(i),
                addr,
                len,
            });
        }
        if i > 0 && prev_end > addr {
            return Err(PlanError::Overlap {
                site: list.who(i - 1),
                other: list.who(i),
                addr,
            });
        }
        prev_end = addr + len;

        let found: &[u8] = if in_place {
            // SAFETY: the edit lies inside the list's text (checked above),
            // which its constructor guarantees is readable (without bounds,
            // `Plan::unbounded`'s contract covers every edit); text changes
            // only under the patcher's lock.
            unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
        } else {
            let buf: &mut [u8] = if len <= small.len() {
                &mut small[..len]
            } else {
                big.resize(len, 0);
                &mut big[..]
            };
            // SAFETY: as above.
            unsafe { poke.read(addr, buf) }.map_err(|error| PlanError::Poke {
                site: Some(list.who(i)),
                error,
            })?;
            buf
        };
        // Observations are recorded as they are made: they stay true even
        // if a later edit fails validation, since nothing is written.
        if list.observe(i, found)? {
            list.set_state(i, State::Pending);
            v.pending += 1;
            if let Some(runs) = runs.as_deref_mut() {
                add_page_run(runs, addr, addr + len);
            }
        } else {
            list.set_state(i, State::Done);
            v.already += 1;
        }
        i += 1;
    }
    Ok(v)
}

/// Validates, then writes every pending edit through `poke` in one batch,
/// commits, syncs and reads every write back (see [`Plan::apply`]).
///
/// [`Plan::apply`]: super::Plan::apply
///
/// # Safety
///
/// As for [`Plan::apply`](super::Plan::apply).
pub(crate) unsafe fn apply<E: EditList + ?Sized, P: TextPoke + ?Sized>(
    list: &mut E,
    poke: &mut P,
) -> Result<ApplyReport, PlanError> {
    let mut runs = Vec::new();
    let v = validate(list, &*poke, Some(&mut runs))?;
    let report = ApplyReport {
        edits: list.count(),
        written: v.pending,
        already: v.already,
        pages: runs.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum(),
        via: "",
    };
    if v.pending == 0 {
        return Ok(report);
    }
    // SAFETY: forwarded from our caller; every edit was validated.
    unsafe { write_batch(list, poke, &runs) }?;
    // SAFETY: as above.
    unsafe { check_landed(list, poke, &runs) }?;
    let report = ApplyReport {
        via: poke.method(),
        ..report
    };
    list.applied(&report);
    Ok(report)
}

/// Writes the pending edits in one batch, rolling back on failure.
///
/// # Safety
///
/// As for [`apply`]; the list was just validated, and `runs` covers every
/// pending edit.
unsafe fn write_batch<E: EditList + ?Sized, P: TextPoke + ?Sized>(
    list: &mut E,
    poke: &mut P,
    runs: &[Range<usize>],
) -> Result<(), PlanError> {
    if let Err(error) = poke.begin(runs) {
        poke.abort();
        return Err(PlanError::Poke { site: None, error });
    }
    // Edits move from Pending to Written as they are written, so a rollback
    // knows exactly what to put back.
    // SAFETY: every pending edit is inside `runs` and validated; our
    // caller vouches for the code.
    if let Err((i, error)) = unsafe { list.write_pending(poke) } {
        let site = list.who(i);
        // Put back what this batch already wrote (in-place pokes
        // published it), then drop anything staged.
        let mut rb = Ok(());
        for w in (0..i).rev() {
            if list.state(w) == State::Written {
                // SAFETY: restores the validated original bytes.
                rb = rb.and(unsafe { poke.write(list.addr(w), list.original(w)) });
                list.set_state(w, State::Pending);
            }
        }
        poke.abort();
        rb = rb.and(poke.sync());
        return match rb {
            Ok(()) => Err(PlanError::Poke {
                site: Some(site),
                error,
            }),
            Err(rollback) => Err(PlanError::RollbackFailed { error, rollback }),
        };
    }
    let published = poke.commit().and_then(|()| poke.sync());
    if let Err(error) = published {
        let site = match error {
            PokeError::NotLanded { addr } => (0..list.count())
                .find(|&i| list.addr(i) <= addr && addr < list.addr(i) + list.len(i))
                .map(|i| list.who(i)),
            _ => None,
        };
        // Some pages may be published: restore every edit in a new batch.
        // SAFETY: writes back the validated original bytes.
        return Err(unsafe { restoring(list, poke, runs, PlanError::Poke { site, error }, error) });
    }
    Ok(())
}

/// Reads every written edit back (in place, or through the poke) and
/// compares it with its new bytes: a write that did not land is an error,
/// never a success. On a mismatch the whole batch is restored.
///
/// # Safety
///
/// As for `write_batch`, after it succeeded.
unsafe fn check_landed<E: EditList + ?Sized, P: TextPoke + ?Sized>(
    list: &mut E,
    poke: &mut P,
    runs: &[Range<usize>],
) -> Result<(), PlanError> {
    if poke.reads_in_place() {
        // SAFETY: every edit lies inside the list's text, readable in
        // place (the poke says so: it publishes there).
        return match unsafe { list.first_not_landed_in_place() } {
            None => Ok(()),
            Some(i) => {
                let (addr, len) = (list.addr(i), list.len(i));
                // SAFETY: as above.
                let found = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
                let found = super::Bytes::new(found);
                // SAFETY: writes back the validated original bytes.
                Err(unsafe { not_landed(list, poke, runs, i, found) })
            }
        };
    }
    let mut buf = Vec::new();
    for i in 0..list.count() {
        if list.state(i) != State::Written {
            continue;
        }
        let (addr, len) = (list.addr(i), list.len(i));
        buf.resize(len, 0);
        // SAFETY: inside the list's text, which is readable through the
        // poke.
        let found: &[u8] = match unsafe { poke.read(addr, &mut buf) } {
            Ok(()) => &buf,
            // Unproven writes are not left behind: restored, as for a
            // mismatch.
            Err(error) => {
                let failed = PlanError::Poke {
                    site: Some(list.who(i)),
                    error,
                };
                // SAFETY: writes back the validated original bytes.
                return Err(unsafe { restoring(list, poke, runs, failed, error) });
            }
        };
        if !short_eq(found, list.new_bytes(i)) {
            let found = super::Bytes::new(found);
            // SAFETY: writes back the validated original bytes.
            return Err(unsafe { not_landed(list, poke, runs, i, found) });
        }
    }
    Ok(())
}

/// [`restoring`] after edit `i` was read back as `found`.
///
/// # Safety
///
/// As for `write_batch`.
#[cold]
#[inline(never)]
unsafe fn not_landed<E: EditList + ?Sized, P: TextPoke + ?Sized>(
    list: &mut E,
    poke: &mut P,
    runs: &[Range<usize>],
    i: usize,
    found: super::Bytes,
) -> PlanError {
    let addr = list.addr(i);
    let failed = PlanError::NotLanded {
        site: list.who(i),
        addr,
        expected: super::Bytes::new(list.new_bytes(i)),
        found,
    };
    // SAFETY: forwarded.
    unsafe { restoring(list, poke, runs, failed, PokeError::NotLanded { addr }) }
}

/// Restores the batch after a failure after its writes and returns the
/// error to report: `failed` if the text is back as it was, else
/// [`PlanError::RollbackFailed`] with `cause` (the poke-level failure) and
/// the rollback's own.
///
/// # Safety
///
/// As for `write_batch`.
#[cold]
#[inline(never)]
unsafe fn restoring<E: EditList + ?Sized, P: TextPoke + ?Sized>(
    list: &mut E,
    poke: &mut P,
    runs: &[Range<usize>],
    failed: PlanError,
    cause: PokeError,
) -> PlanError {
    // SAFETY: forwarded: writes back the validated original bytes.
    match unsafe { restore(list, poke, runs) } {
        Ok(()) => failed,
        Err(rollback) => PlanError::RollbackFailed {
            error: cause,
            rollback,
        },
    }
}

/// Writes the old bytes of the pending edits back in a batch of their own.
///
/// # Safety
///
/// As for `write_batch`.
unsafe fn restore<E: EditList + ?Sized, P: TextPoke + ?Sized>(
    list: &mut E,
    poke: &mut P,
    runs: &[Range<usize>],
) -> Result<(), PokeError> {
    for i in 0..list.count() {
        if list.state(i) == State::Written {
            list.set_state(i, State::Pending);
        }
    }
    poke.begin(runs)?;
    for i in 0..list.count() {
        if list.state(i) != State::Pending {
            continue;
        }
        // SAFETY: restores validated original bytes inside `runs`.
        if let Err(err) = unsafe { poke.write(list.addr(i), list.original(i)) } {
            poke.abort();
            return Err(err);
        }
    }
    poke.commit()?;
    poke.sync()
}
