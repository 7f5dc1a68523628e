//! One batch of a [`LinuxPoke`](super::LinuxPoke): where its writes go, how
//! they are published, and the read-back that proves they landed.
//!
//! The fixed order of a batch:
//!
//! 1. `begin`: check the pages are text (cached while the loader's object
//!    list is unchanged); stage them — a copy of each page (ProcMem), or the
//!    alias of its live or spare slot (arena, homing the page first);
//! 2. `write`: check the edit (one instruction for one, or emulatable for
//!    the INT3 protocol) and store it into the staging;
//! 3. `commit`: publish (`pwrite` the changed spans, swap the pages, map the
//!    spare slots, or run the INT3 protocol), then read every write back
//!    through the executable address; a page that does not hold it is built
//!    afresh from what is mapped now plus the batch's writes and swapped in,
//!    once; still wrong is [`PokeError::NotLanded`].

use alloc::vec::Vec;
use core::ops::Range;

mod verify;

use super::state::Shared;
use super::{Publish, sys, threads, trap};
use crate::plan::Bytes;
use crate::poke::live::{self, LiveSite, LiveSites, Step};
use crate::poke::{PAGE_SIZE, PokeError, Strategy, copy_short, load_short, short_eq};

/// One run of contiguous pages in the batch.
struct Run {
    text: Range<usize>,
    /// Index of the run's first page among the batch's pages.
    first: usize,
}

impl Run {
    /// The batch's page index and offset of `addr` (inside the run).
    fn page_of(&self, addr: usize) -> (usize, usize) {
        (
            self.first + (addr - self.text.start) / PAGE_SIZE,
            addr % PAGE_SIZE,
        )
    }
}

/// A clean page's dirty span.
const CLEAN: (u32, u32) = (PAGE_SIZE as u32, 0);

pub(super) struct Batch {
    /// How this poke writes and publishes (fixed at construction).
    pub(super) strategy: Strategy,
    pub(super) publish: Publish,
    /// Every edit must replace one instruction by one
    /// ([`LinuxPoke::running`](super::LinuxPoke::running)).
    pub(super) one_for_one: bool,
    /// Mapping publications made (swaps, homing, repairs), for reports.
    pub(super) remaps: u64,
    /// Pages found not holding their writes and rebuilt.
    pub(super) repairs: u64,
    runs: Vec<Run>,
    /// Per page of the batch: where writes to it go (staging copy or alias).
    targets: Vec<usize>,
    /// ProcMem: the batch's pages, run after run.
    stage: Vec<u8>,
    /// Per page: the span written (`lo > hi` when none).
    dirty: Vec<(u32, u32)>,
    /// Every write (address, length), for the read-back.
    writes: Vec<(usize, usize)>,
    /// INT3 protocol: the writes, checked as live sites.
    pending: Vec<(LiveSite, Bytes)>,
    last_run: usize,
    /// The last new bytes (at most 8, zero-padded; length) that passed the
    /// page swap's check of new bytes, which does not depend on the
    /// address: start-up writes the same few forms ten thousand times.
    swap_ok: (u64, usize),
    /// A page being rebuilt by a repair.
    scratch: Vec<u8>,
}

impl Batch {
    pub(super) const fn new(strategy: Strategy, publish: Publish) -> Batch {
        Batch {
            strategy,
            publish,
            one_for_one: false,
            remaps: 0,
            repairs: 0,
            runs: Vec::new(),
            targets: Vec::new(),
            stage: Vec::new(),
            dirty: Vec::new(),
            writes: Vec::new(),
            pending: Vec::new(),
            last_run: 0,
            swap_ok: (0, 0),
            scratch: Vec::new(),
        }
    }

    /// Forgets the batch (capacity is kept for the next one).
    pub(super) fn clear(&mut self) {
        self.runs.clear();
        self.targets.clear();
        self.dirty.clear();
        self.writes.clear();
        self.pending.clear();
        self.last_run = 0;
    }

    pub(super) fn begin(
        &mut self,
        shared: &mut Shared,
        pages: &[Range<usize>],
    ) -> Result<(), PokeError> {
        let (strategy, publish) = (self.strategy, self.publish);
        self.clear();
        for r in pages {
            if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 || r.end <= r.start {
                return Err(PokeError::NotText {
                    addr: r.start,
                    why: "batch range is not page-aligned",
                });
            }
        }
        if shared.text.refresh() {
            // An object was loaded or unloaded: a remembered slot may no
            // longer be what is mapped at its page.
            shared.arena.reset(true);
        }
        shared.text.check(pages)?;
        let mut n = 0;
        for r in pages {
            self.runs.push(Run {
                text: r.clone(),
                first: n,
            });
            n += (r.end - r.start) / PAGE_SIZE;
        }
        self.dirty.resize(n, CLEAN);
        match strategy {
            Strategy::ProcMem => {
                shared.procmem.open()?;
                self.stage_copies(pages, n);
            }
            Strategy::Memfd | Strategy::File => {
                shared.arena.begin(strategy, pages)?;
                for r in pages {
                    if publish != Publish::Remap {
                        self.remaps += home(shared, r.clone())?;
                    }
                    let mut p = r.start;
                    while p < r.end {
                        let s = shared.arena.slots(p).expect("slots were just made");
                        let target = if publish == Publish::Remap {
                            let (_, spare) = s.spare();
                            // SAFETY: the text page is mapped readable; the
                            // spare slot is ours, mapped executable nowhere.
                            unsafe {
                                core::ptr::copy_nonoverlapping(
                                    p as *const u8,
                                    spare as *mut u8,
                                    PAGE_SIZE,
                                )
                            };
                            spare
                        } else {
                            s.live_alias().expect("page was just homed")
                        };
                        self.targets.push(target);
                        p += PAGE_SIZE;
                    }
                }
            }
        }
        Ok(())
    }

    /// ProcMem: a copy of every page to write into (none for the INT3
    /// protocol, which writes in place).
    fn stage_copies(&mut self, pages: &[Range<usize>], n: usize) {
        if self.publish == Publish::Live {
            self.targets.resize(n, 0);
            return;
        }
        // Copied, not zeroed first: a batch covers every page holding a
        // site (a megabyte of text in a large program).
        self.stage.clear();
        self.stage.reserve(n * PAGE_SIZE);
        for r in pages {
            // SAFETY: the batch's pages are mapped readable text (checked by
            // `TextPages::check` in `begin`).
            let text =
                unsafe { core::slice::from_raw_parts(r.start as *const u8, r.end - r.start) };
            self.stage.extend_from_slice(text);
        }
        let base = self.stage.as_mut_ptr() as usize;
        let mut i = 0;
        for r in pages {
            let mut p = r.start;
            while p < r.end {
                self.targets.push(base + i * PAGE_SIZE);
                i += 1;
                p += PAGE_SIZE;
            }
        }
    }

    /// The batch's page index and offset of `addr`. Writes arrive in
    /// address order, so the previous write's run is tried first.
    #[inline]
    fn locate(&mut self, addr: usize) -> Option<(usize, usize)> {
        let i = match self.runs.get(self.last_run) {
            Some(r) if r.text.contains(&addr) => self.last_run,
            _ => {
                let i = self.run_of(addr)?;
                self.last_run = i;
                i
            }
        };
        Some(self.runs[i].page_of(addr))
    }

    /// The index of the run holding `addr`.
    fn run_of(&self, addr: usize) -> Option<usize> {
        let i = self.runs.partition_point(|r| r.text.end <= addr);
        self.runs
            .get(i)
            .is_some_and(|r| r.text.contains(&addr))
            .then_some(i)
    }

    /// # Safety
    ///
    /// As for [`TextPoke::write`](crate::TextPoke::write).
    #[inline]
    pub(super) unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: the plan writes only inside its text, which is mapped.
        let old = unsafe { core::slice::from_raw_parts(addr as *const u8, bytes.len()) };
        if self.publish == Publish::Live {
            if short_eq(old, bytes) {
                // Nothing to do (a rollback of a batch the protocol never
                // ran): no trap, no sync.
                return Ok(());
            }
            // Checked now, so a plan the protocol cannot run fails before
            // anything is written.
            let site = LiveSite::new(addr, old, bytes).map_err(|_| PokeError::NotLiveSafe {
                addr,
                rule: "the INT3 protocol needs one emulatable instruction (call, jmp, jcc, nop, \
                       ret) replaced by one",
            })?;
            self.locate(addr).ok_or(PokeError::OutsideBatch { addr })?;
            self.pending.push((site, Bytes::new(bytes)));
            return Ok(());
        }
        if self.one_for_one && !short_eq(old, bytes) {
            self.check_swap(addr, old, bytes)
                .map_err(|_| PokeError::NotLiveSafe {
                    addr,
                    rule: "a page swap needs each edit to replace one instruction by whole \
                           instructions",
                })?;
        }
        self.store(addr, bytes)?;
        self.writes.push((addr, bytes.len()));
        Ok(())
    }

    /// [`live::check_swap`], with its verdict on `new` remembered for the
    /// next edit writing the same bytes (it depends on them alone).
    #[inline]
    fn check_swap(&mut self, addr: usize, old: &[u8], new: &[u8]) -> Result<(), live::LiveError> {
        live::check_old(addr, old)?;
        let n = new.len();
        if n == 0 || n > 8 {
            return live::check_new_whole(addr, new);
        }
        // SAFETY: `new` is `n <= 8` readable bytes.
        let key = (unsafe { load_short(new.as_ptr(), n) }, n);
        if self.swap_ok != key {
            live::check_new_whole(addr, new)?;
            self.swap_ok = key;
        }
        Ok(())
    }

    /// Copies `bytes` to the batch's target of `addr` (a staging page, or
    /// an alias page open read+write for the batch), page by page, and
    /// records the written span of each page.
    #[inline]
    fn store(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        let mut done = 0;
        while done < bytes.len() {
            let at = addr + done;
            let (page, off) = self
                .locate(at)
                .ok_or(PokeError::OutsideBatch { addr: at })?;
            let n = (PAGE_SIZE - off).min(bytes.len() - done);
            // SAFETY: the target page belongs to this batch and has `n`
            // bytes left after `off`.
            unsafe {
                copy_short(
                    bytes[done..].as_ptr(),
                    (self.targets[page] + off) as *mut u8,
                    n,
                )
            };
            let d = &mut self.dirty[page];
            d.0 = d.0.min(off as u32);
            d.1 = d.1.max((off + n) as u32);
            done += n;
        }
        Ok(())
    }

    pub(super) fn commit(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        match (self.strategy, self.publish) {
            (_, Publish::Live) => self.commit_live(shared)?,
            (Strategy::ProcMem, Publish::InPlace) => {
                for (at, from, len) in self.spans() {
                    // SAFETY: validated text of the batch; the staged bytes
                    // are its current bytes plus the writes.
                    unsafe { shared.procmem.write(at, &self.stage[from..from + len]) }?;
                }
            }
            (Strategy::ProcMem, Publish::Remap) => {
                for r in &self.runs {
                    let from = r.first * PAGE_SIZE;
                    let bytes = &self.stage[from..from + (r.text.end - r.text.start)];
                    // SAFETY: as above, whole pages.
                    unsafe { shared.procmem.swap(r.text.clone(), bytes) }?;
                    self.remaps += 1;
                }
            }
            (_, Publish::InPlace) => {} // stored through the live alias
            (_, Publish::Remap) => {
                for r in &self.runs {
                    self.remaps += shared.arena.publish_spares(r.text.clone())?;
                }
            }
        }
        self.verify_and_repair(shared)
    }

    /// The written spans of the batch as (text address, stage offset,
    /// length), neighbouring pages' spans joined across page boundaries when
    /// the unchanged bytes between them are few: one `pwrite` per stretch of
    /// edits instead of one per page. The bytes in between are written with
    /// the values they have (the staging is a copy of the text).
    fn spans(&self) -> Vec<(usize, usize, usize)> {
        /// Unchanged bytes worth rewriting to save a system call.
        const JOIN: usize = 512;
        let mut out: Vec<(usize, usize, usize)> = Vec::new();
        for r in &self.runs {
            let pages = (r.text.end - r.text.start) / PAGE_SIZE;
            let mut last_run_end: Option<usize> = None;
            for k in 0..pages {
                let (lo, hi) = self.dirty[r.first + k];
                if lo >= hi {
                    continue;
                }
                let at = r.text.start + k * PAGE_SIZE + lo as usize;
                let end = at + (hi - lo) as usize;
                match (out.last_mut(), last_run_end) {
                    (Some(span), Some(prev)) if at - prev <= JOIN => span.2 = end - span.0,
                    _ => out.push((at, (r.first + k) * PAGE_SIZE + lo as usize, end - at)),
                }
                last_run_end = Some(end);
            }
        }
        out
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
/// write into the live slot).
/// Returns the number of `mmap` calls.
fn home(shared: &mut Shared, r: Range<usize>) -> Result<u64, PokeError> {
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
