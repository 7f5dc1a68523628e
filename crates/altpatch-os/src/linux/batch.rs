//! One batch of a [`LinuxPoke`](super::LinuxPoke): where its writes go, how
//! they are published, and the read-back that proves they landed.
//!
//! The fixed order of a batch:
//!
//! 1. `begin`: check the pages are text and learn where each comes from
//!    (cached while the loader's object list is unchanged); choose how the
//!    batch is published — text a file maps stays that file's text, sealed
//!    text is changed in place, or the batch is refused before anything is
//!    written; stage the pages — a copy of each (ProcMem), or the alias of
//!    its live or spare slot (arena, anonymous text only); note which of
//!    the earlier patches on the pages the text still holds;
//! 2. `write`: check the edit (one instruction for one, or emulatable for
//!    the INT3 protocol) and store it into the staging;
//! 3. `commit`: publish (see `publish.rs`), then read every write back
//!    through the executable address; a page that does not hold it is built
//!    afresh and swapped in, once; still wrong is
//!    [`PokeError::NotLanded`]. What landed is recorded, for the page swaps
//!    of later batches to carry over, and logged where asked.

use alloc::vec::Vec;
use core::ops::Range;

mod kept;
mod publish;
mod stage;
mod verify;

use super::state::Shared;
use super::{Publish, poke_log};
use crate::plan::Bytes;
use crate::poke::live::{self, LiveSite};
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

/// Pages of a run that one page swap publishes: contiguous, mapping the
/// same file at consecutive offsets, or anonymous.
struct Group {
    text: Range<usize>,
    /// Index of its first page among the batch's pages.
    first: usize,
    /// The file and the offset the first page maps; `None` for anonymous
    /// text.
    file: Option<super::file_swap::FileAt>,
}

/// A clean page's dirty span.
const CLEAN: (u32, u32) = (PAGE_SIZE as u32, 0);

pub(super) struct Batch {
    /// How this poke writes and publishes (fixed at construction).
    pub(super) strategy: Strategy,
    pub(super) publish: Publish,
    /// How the batch in progress (or the last one) is published: `publish`,
    /// or the INT3 protocol where the text is sealed.
    pub(super) published: Publish,
    /// Every edit must replace one instruction by one
    /// ([`LinuxPoke::running`](super::LinuxPoke::running)).
    pub(super) one_for_one: bool,
    /// A start-up poke: in place only if, at commit, the calling thread is
    /// the process's only one; otherwise the batch is published as
    /// [`LinuxPoke::running`](super::LinuxPoke::running) would (see
    /// `publish.rs`).
    pub(super) start_up: bool,
    /// Whether the last batch was published in place because its thread
    /// was alone (for the report's method).
    pub(super) was_alone: bool,
    /// Whether the batch runs the INT3 protocol because the program chose
    /// it (not because its text is sealed), for the refusal's words.
    live_chosen: bool,
    /// Mapping publications made (swaps, homing, repairs), for reports.
    pub(super) remaps: u64,
    /// Pages found not holding their writes and rebuilt.
    pub(super) repairs: u64,
    runs: Vec<Run>,
    /// ProcMem page swap: the runs cut where the file or offset changes.
    groups: Vec<Group>,
    /// Per page of the batch: where writes to it go (staging copy or alias).
    targets: Vec<usize>,
    /// ProcMem: the batch's pages, run after run.
    stage: Vec<u8>,
    /// Per page: the span written (`lo > hi` when none).
    dirty: Vec<(u32, u32)>,
    /// Every write (address, length), for the read-back; and sorted by
    /// address, for publication.
    writes: Vec<(usize, usize)>,
    /// ProcMem in place: the bytes of every write, in order (no page is
    /// staged: the stores are built from these and the live text).
    kept: Vec<u8>,
    sorted: Vec<(usize, usize)>,
    /// Earlier patches the text no longer holds (found by a swap).
    stale: Vec<Range<usize>>,
    /// INT3 protocol: the writes, checked as live sites.
    pending: Vec<(LiveSite, Bytes)>,
    last_run: usize,
    /// The last new bytes (at most 8, zero-padded; length) that passed the
    /// page swap's check of new bytes, which does not depend on the
    /// address: start-up writes the same few forms ten thousand times.
    swap_ok: (u64, usize),
    /// Scratch: a page being rebuilt by a repair; the bytes a swap owns;
    /// the stores a publication makes.
    scratch: Vec<u8>,
    owned: Vec<Range<usize>>,
    /// ProcMem in place: the stores of the batch (see `kept.rs`).
    in_place: super::in_place::Stores,
    /// Whether the batch is logged, and then the old bytes of its writes,
    /// in order.
    logging: bool,
    old: Vec<u8>,
}

impl Batch {
    pub(super) const fn new(strategy: Strategy, publish: Publish) -> Batch {
        Batch {
            strategy,
            publish,
            published: publish,
            one_for_one: false,
            start_up: false,
            was_alone: false,
            live_chosen: false,
            remaps: 0,
            repairs: 0,
            runs: Vec::new(),
            groups: Vec::new(),
            targets: Vec::new(),
            stage: Vec::new(),
            dirty: Vec::new(),
            writes: Vec::new(),
            kept: Vec::new(),
            sorted: Vec::new(),
            stale: Vec::new(),
            pending: Vec::new(),
            last_run: 0,
            swap_ok: (0, 0),
            scratch: Vec::new(),
            owned: Vec::new(),
            in_place: super::in_place::Stores::new(),
            logging: false,
            old: Vec::new(),
        }
    }

    /// Forgets the batch (capacity is kept for the next one).
    pub(super) fn clear(&mut self) {
        self.runs.clear();
        self.groups.clear();
        self.targets.clear();
        self.dirty.clear();
        self.writes.clear();
        self.kept.clear();
        self.stale.clear();
        self.pending.clear();
        self.old.clear();
        self.last_run = 0;
    }

    pub(super) fn begin(
        &mut self,
        shared: &mut Shared,
        pages: &[Range<usize>],
    ) -> Result<(), PokeError> {
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
        self.logging = shared.log.enabled();
        self.was_alone = false;
        self.published = self.choose_publication(shared, pages, self.publish)?;
        self.live_chosen = self.publish == Publish::Live;
        if self.keeps_bytes() {
            // Room for a write every 64 bytes of the batch's pages (start-up
            // writes thousands; growing would copy them again and again).
            self.writes.reserve(n * PAGE_SIZE / 64);
            self.kept.reserve(n * PAGE_SIZE / 8);
            self.old.reserve(n * PAGE_SIZE / 8);
        }
        self.stage(shared, pages)
    }

    /// Prepares the batch's pages for its publication: ProcMem opens
    /// `/proc/self/mem` and copies the pages it swaps; the alias strategies
    /// take their slots.
    fn stage(&mut self, shared: &mut Shared, pages: &[Range<usize>]) -> Result<(), PokeError> {
        let n = self.dirty.len();
        match self.strategy {
            Strategy::ProcMem => {
                shared.procmem.open()?;
                self.stage_copies(pages, n);
                if self.published == Publish::Remap {
                    self.make_groups(shared)?;
                }
            }
            Strategy::Memfd | Strategy::File => self.stage_in_arena(shared, pages)?,
        }
        Ok(())
    }

    /// Whether the batch keeps its writes' bytes (`kept`) instead of
    /// staging pages: ProcMem in place, which stores them over the live
    /// text at commit.
    #[inline]
    fn keeps_bytes(&self) -> bool {
        self.strategy == Strategy::ProcMem && self.published == Publish::InPlace
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
    /// As for [`TextPoke::write`](crate::poke::TextPoke::write).
    #[inline]
    pub(super) unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        // SAFETY: the plan writes only inside its text, which is mapped.
        let old = unsafe { core::slice::from_raw_parts(addr as *const u8, bytes.len()) };
        if self.published == Publish::Live {
            if short_eq(old, bytes) {
                // Nothing to do (a rollback of a batch the protocol never
                // ran): no trap, no sync.
                return Ok(());
            }
            // Checked now, so a plan the protocol cannot run fails before
            // anything is written.
            let site = LiveSite::new(addr, old, bytes).map_err(|_| PokeError::NotLiveSafe {
                addr,
                rule: if self.live_chosen {
                    "the INT3 protocol needs one emulatable instruction (call, jmp, jcc, nop, \
                     ret) replaced by one"
                } else {
                    "the text is sealed (mseal), so it changes only in place, by the INT3 \
                     protocol, which needs one emulatable instruction (call, jmp, jcc, nop, ret) \
                     replaced by one"
                },
            })?;
            self.locate(addr).ok_or(PokeError::OutsideBatch { addr })?;
            if self.logging {
                self.old.extend_from_slice(old);
            }
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
        if self.keeps_bytes() {
            // Inside one run of the batch's pages from its first byte to its
            // last.
            self.locate(addr).ok_or(PokeError::OutsideBatch { addr })?;
            let end = addr + bytes.len();
            if end > self.runs[self.last_run].text.end {
                return Err(PokeError::OutsideBatch { addr: end - 1 });
            }
            crate::short::extend_short(&mut self.kept, bytes);
            // The bytes replaced are kept too: a failed store is put back,
            // and a breakpoint over a byte the write keeps is left.
            crate::short::extend_short(&mut self.old, old);
        } else {
            if self.logging {
                self.old.extend_from_slice(old);
            }
            self.store(addr, bytes)?;
        }
        self.writes.push((addr, bytes.len()));
        Ok(())
    }

    /// [`live::check_swap`], with its verdict on `new` remembered for the
    /// next edit writing the same bytes (it depends on them alone).
    #[inline]
    fn check_swap(&mut self, addr: usize, old: &[u8], new: &[u8]) -> Result<(), live::LiveError> {
        crate::arch::check_old(addr, old)?;
        let n = new.len();
        if n == 0 || n > 8 {
            return crate::arch::check_new_whole(addr, new);
        }
        // SAFETY: `new` is `n <= 8` readable bytes.
        let key = (unsafe { load_short(new.as_ptr(), n) }, n);
        if self.swap_ok != key {
            crate::arch::check_new_whole(addr, new)?;
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
        self.publish_batch(shared)?;
        self.verify_and_repair(shared)?;
        // What landed is ours now: later swaps of these pages carry it over.
        let overlay = &mut shared.overlay;
        if self.keeps_bytes() {
            overlay.record_all(&self.writes, &self.kept);
        } else {
            self.each_piece(|at, bytes| overlay.record(at, bytes));
        }
        if self.logging {
            self.log(shared);
        }
        Ok(())
    }

    /// The batch's publication method, for reports.
    pub(super) fn method(&self) -> &'static str {
        if self.was_alone {
            return "pwrite to /proc/self/mem, in place (start-up: the only thread)";
        }
        super::strategy::method(self.strategy, self.published)
    }

    /// Appends the batch's line to the text-poke log.
    fn log(&self, shared: &mut Shared) {
        let method = self.method();
        let mut line = shared.log.begin_line(method);
        let mut cursor = 0;
        let mut first = true;
        self.each_piece(|at, new| {
            let old = self.old.get(cursor..cursor + new.len()).unwrap_or(&[]);
            cursor += new.len();
            let page = at - at % PAGE_SIZE;
            let file = stage::shared_file_of(shared, page).map(|(i, off)| {
                let path = shared.text.file(i).path();
                (path, off + (at - page) as u64)
            });
            poke_log::push_edit(&mut line, first, at, file, old, new);
            first = false;
        });
        shared.log.finish_line(line);
    }
}
