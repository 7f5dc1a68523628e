//! Publishing a batch: how its staged bytes reach the text.
//!
//! * ProcMem, in place: one `pwrite` per stretch of writes (see
//!   [`in_place_stores`] for what a stretch may span). A start-up poke
//!   stores in place only if the calling thread is the process's only one,
//!   checked with every signal blocked until the stores have landed (so no
//!   handler starts a thread or runs code between two stores); otherwise
//!   its writes are staged again and published as a running poke's.
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
use super::super::state::Shared;
use super::super::{Publish, sys, threads, trap};
use super::{Batch, Group};
use crate::poke::live::{self, LiveSites, Step};
use crate::poke::{PAGE_SIZE, PokeError, Strategy, short_eq};

impl Batch {
    pub(super) fn publish_batch(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        match (self.strategy, self.published) {
            (_, Publish::Live) => self.commit_live(shared),
            (Strategy::ProcMem, Publish::InPlace) if self.start_up => {
                match threads::Alone::claim() {
                    // Every signal stays blocked until the stores landed.
                    Some(_alone) => {
                        self.was_alone = true;
                        self.commit_in_place(shared)
                    }
                    None => self.publish_as_running(shared),
                }
            }
            (Strategy::ProcMem, Publish::InPlace) => self.commit_in_place(shared),
            (Strategy::ProcMem, Publish::Remap) => {
                self.sort_writes();
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

    /// A start-up batch whose thread is not alone at commit: staged again as
    /// a [`LinuxPoke::running`](super::super::LinuxPoke::running) batch is
    /// (the process's live publication; sealed text by the INT3 protocol),
    /// its writes replayed through the same checks, and published so.
    /// Nothing has been written yet.
    fn publish_as_running(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        let pages: Vec<Range<usize>> = self.runs.iter().map(|r| r.text.clone()).collect();
        let publish = super::super::live_publication();
        self.published = self.choose_publication(shared, &pages, publish)?;
        self.live_chosen = publish == Publish::Live;
        self.stage(shared, &pages)?;
        let writes = core::mem::take(&mut self.writes);
        let kept = core::mem::take(&mut self.kept);
        self.old.clear();
        let mut from = 0;
        for &(addr, n) in &writes {
            // SAFETY: `write` accepted these bytes for this batch already.
            unsafe { self.write(addr, &kept[from..from + n]) }?;
            from += n;
        }
        self.publish_batch(shared)
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
