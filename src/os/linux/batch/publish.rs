//! Publishing a batch: how its staged bytes reach the text.
//!
//! * ProcMem, in place: one `pwrite` per stretch of writes (see
//!   [`write_runs`](super::super::runs::write_runs) for what a stretch may
//!   span).
//! * ProcMem, page swap: per group of pages, a fresh private mapping of the
//!   file they map holding the earlier patches and the writes
//!   ([`ProcMem::swap_file`](super::super::procmem::ProcMem::swap_file)),
//!   or for anonymous text a fresh anonymous page holding the new contents.
//! * The INT3 protocol, in place.
//! * The alias strategies (anonymous text): stores already went to the
//!   live slot (in place), or the spare slots are mapped over the text.

use alloc::vec::Vec;
use core::ops::Range;

use super::super::overlay::Overlay;
use super::super::runs::write_runs;
use super::super::state::Shared;
use super::super::{Publish, sys, threads, trap};
use super::{Batch, Group};
use crate::poke::live::{self, LiveSites, Step};
use crate::poke::{PAGE_SIZE, PokeError, Strategy, short_eq};

impl Batch {
    pub(super) fn publish_batch(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        self.sort_writes();
        match (self.strategy, self.published) {
            (_, Publish::Live) => self.commit_live(shared),
            (Strategy::ProcMem, Publish::InPlace) => self.commit_in_place(shared),
            (Strategy::ProcMem, Publish::Remap) => {
                for k in 0..self.groups.len() {
                    self.swap_group(shared, k)?;
                    self.remaps += 1;
                }
                Ok(())
            }
            (_, Publish::InPlace) => Ok(()), // stored through the live alias
            (_, Publish::Remap) => {
                for r in &self.runs {
                    self.remaps += shared.arena.publish_spares(r.text.clone())?;
                }
                Ok(())
            }
        }
    }

    /// The writes inside `range`, as offsets from its start, sorted, with
    /// (for a swap, given the record of earlier patches) those earlier
    /// patches the text still holds merged in: into `owned`. A recorded
    /// patch the text no longer holds (an object loaded again, a byte
    /// someone else rewrote) is not carried, and noted in `stale`.
    fn owned_in(&mut self, range: &Range<usize>, overlay: Option<&Overlay>) {
        let (lo, hi) = (range.start, range.end);
        let clip = |a: usize, b: usize| a.max(lo) - lo..b.min(hi) - lo;
        // Both lists are sorted (see `sort_writes`; the overlay's spans
        // are): a binary search finds where the range starts, a merge
        // interleaves them.
        let w = &self.sorted[self.sorted.partition_point(|&(a, n)| a + n <= lo)..];
        let mut w = w
            .iter()
            .take_while(|&&(a, _)| a < hi)
            .filter(|&&(a, n)| a + n > lo)
            .peekable();
        self.owned.clear();
        let mut spans = overlay.map(|o| o.spans_in(range.clone()).peekable());
        let Some(mut c) = spans.take_if(|c| c.peek().is_some()) else {
            // No earlier patch here (start-up): the writes alone, in order.
            for &(a, n) in w {
                let r = clip(a, a + n);
                if self.owned.last() != Some(&r) {
                    self.owned.push(r);
                }
            }
            return;
        };
        loop {
            let r = match (w.peek(), c.peek()) {
                (Some(&&(a, n)), Some(&(b, ours))) if a <= b => {
                    w.next();
                    // The earlier patch at the same place is superseded.
                    if a == b && n == ours.len() {
                        c.next();
                    }
                    clip(a, a + n)
                }
                (_, Some(&(b, ours))) => {
                    c.next();
                    // SAFETY: inside the range's pages, mapped readable
                    // text, not yet replaced.
                    let now = unsafe { core::slice::from_raw_parts(b as *const u8, ours.len()) };
                    if !short_eq(now, ours) {
                        self.stale.push(b..b + ours.len());
                        continue;
                    }
                    clip(b, b + ours.len())
                }
                (Some(&&(a, n)), None) => {
                    w.next();
                    clip(a, a + n)
                }
                (None, None) => break,
            };
            if self.owned.last() != Some(&r) {
                self.owned.push(r);
            }
        }
    }

    /// The writes sorted by address into `sorted` (they arrive in address
    /// order, so this is a copy; a rollback's may not be).
    fn sort_writes(&mut self) {
        self.sorted.clear();
        self.sorted.extend_from_slice(&self.writes);
        if !self.sorted.is_sorted_by_key(|&(a, _)| a) {
            self.sorted.sort_unstable_by_key(|&(a, _)| a);
        }
    }

    /// ProcMem in place: `pwrite` the writes, joined where that is safe.
    fn commit_in_place(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        for i in 0..self.runs.len() {
            let text = self.runs[i].text.clone();
            let from = self.runs[i].first * PAGE_SIZE;
            self.owned_in(&text, None);
            // SAFETY: the run's pages are mapped readable text.
            let live = unsafe {
                core::slice::from_raw_parts(text.start as *const u8, text.end - text.start)
            };
            let want = &self.stage[from..from + (text.end - text.start)];
            self.stores.clear();
            write_runs(live, want, &self.owned, &mut self.stores);
            for s in &self.stores {
                // SAFETY: validated text of the batch; the staged bytes are
                // its current bytes plus the writes, and `write_runs` keeps
                // every byte stored that is not a write a non-int3 byte as
                // it is now.
                unsafe { shared.procmem.write(text.start + s.start, &want[s.clone()]) }?;
            }
        }
        Ok(())
    }

    /// ProcMem page swap of group `k`: our patches and the batch's writes,
    /// and those of the other copies of the crate linked in, carried onto
    /// a fresh copy of the file.
    pub(super) fn swap_group(&mut self, shared: &mut Shared, k: usize) -> Result<(), PokeError> {
        let Group { text, first, file } = &self.groups[k];
        let (text, first, file) = (text.clone(), *first, *file);
        let from = first * PAGE_SIZE;
        let len = text.end - text.start;
        match file {
            Some(at) => {
                self.owned_in(&text, Some(&shared.overlay));
                for r in self.stale.drain(..) {
                    shared.overlay.forget(r);
                }
                // Other copies of the crate linked in: their patches on
                // these pages are carried too.
                super::super::peers::add_foreign(&text, &mut self.owned, &mut Vec::new())?;
                let want = &self.stage[from..from + len];
                // SAFETY: validated text mapping the file `at`; the
                // staging holds the current bytes plus the writes, and the
                // carried patches are what the text holds now.
                unsafe {
                    shared
                        .procmem
                        .swap_file(text, at, want, &self.owned, &mut shared.swap)
                }
            }
            // SAFETY: anonymous validated text (no file, so nothing but
            // ours can be in it); its current bytes plus the writes.
            None => unsafe { shared.procmem.swap(text, &self.stage[from..from + len]) },
        }
    }

    /// Runs the INT3 protocol over the pending writes, with the process
    /// lock held (so neither another patcher nor `fork` comes between
    /// phases).
    fn commit_live(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        trap::install()?;
        threads::check_can_trap()?;
        let table = LiveSites::new(self.pending.iter().map(|(s, _)| *s).collect());
        let pending = core::mem::take(&mut self.pending);
        let writes: Vec<(usize, &[u8])> = pending.iter().map(|(s, b)| (s.addr, &b[..])).collect();
        let mut first_error = Ok(());
        // A failed sync does not stop the protocol: finishing it leaves no
        // int3 behind, and the plan restores the old bytes.
        let step = |step: Step<'_>| match step {
            // SAFETY: a live site of the batch (checked in `write`); the
            // protocol keeps every intermediate state safe.
            Step::Write(addr, bytes) => unsafe { self.in_place(shared, addr, bytes) },
            Step::Sync => {
                if let Err(e) = sys::sync_all_threads()
                    && first_error.is_ok()
                {
                    first_error = Err(e);
                }
                Ok(())
            }
        };
        // SAFETY: `table` lives until after the call; the process lock is
        // held, so this is the only patcher publishing to the slot.
        let result = unsafe { live::run_published(trap::slot(), &table, &writes, step) };
        let result = result.and(first_error);
        drop(writes);
        self.pending = pending;
        result
    }

    /// Stores `bytes` at `addr` in the live text at once.
    ///
    /// # Safety
    ///
    /// `addr` is inside the batch; the bytes are a step of the protocol.
    unsafe fn in_place(
        &mut self,
        shared: &mut Shared,
        addr: usize,
        bytes: &[u8],
    ) -> Result<(), PokeError> {
        if self.strategy == Strategy::ProcMem {
            // SAFETY: forwarded.
            return unsafe { shared.procmem.write(addr, bytes) };
        }
        // The arena's targets are the live slots' aliases: stores there are
        // in place.
        self.store(addr, bytes)
    }
}

/// Maps slots holding the current bytes over every page of `r` that is
/// still its original mapping (the arena's in-place and INT3 publications
/// write into the live slot). Anonymous text only: a file's text is never
/// re-homed. Returns the number of `mmap` calls.
pub(super) fn home(shared: &mut Shared, r: Range<usize>) -> Result<u64, PokeError> {
    let arena = &mut shared.arena;
    let mut calls = 0;
    let mut p = r.start;
    while p < r.end {
        if arena.slots(p).and_then(|s| s.live_alias()).is_some() {
            p += PAGE_SIZE;
            continue;
        }
        let start = p;
        while p < r.end && arena.slots(p).and_then(|s| s.live_alias()).is_none() {
            let (_, spare) = arena.slots(p).expect("slots were just made").spare();
            // SAFETY: the text page is readable; the slot is ours, open
            // read+write, and not mapped executable anywhere yet.
            unsafe { core::ptr::copy_nonoverlapping(p as *const u8, spare as *mut u8, PAGE_SIZE) };
            p += PAGE_SIZE;
        }
        calls += arena.publish_spares(start..p)?;
    }
    Ok(calls)
}
