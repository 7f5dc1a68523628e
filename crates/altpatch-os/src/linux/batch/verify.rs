//! The read-back after publication, and the repair of a page that does
//! not hold the batch's writes (its mapping changed under us: a debugger's
//! private copy, a re-loaded object, someone's `mmap`).

use alloc::vec::Vec;
use core::ops::Range;

use super::Batch;
use crate::linux::file_swap::FileAt;
use crate::linux::state::Shared;
use crate::linux::{Publish, sys};
use crate::poke::{PAGE_SIZE, PokeError, Strategy, short_eq};

impl Batch {
    /// Calls `f(addr, intended bytes)` for every write of the batch, split
    /// at page boundaries. The intended bytes are the protocol's pending
    /// writes or the kept ones, or else what the staging (or alias) holds
    /// there.
    pub(super) fn each_piece(&self, mut f: impl FnMut(usize, &[u8])) {
        let mut write = |addr: usize, len: usize, kept: Option<&[u8]>| {
            let mut done = 0;
            while done < len {
                let at = addr + done;
                let n = (PAGE_SIZE - at % PAGE_SIZE).min(len - done);
                let want = match kept {
                    Some(b) => &b[done..done + n],
                    None => {
                        let Some(i) = self.run_of(at) else { break };
                        let (page, off) = self.runs[i].page_of(at);
                        // SAFETY: staging or alias memory of the batch,
                        // still mapped, with `n` bytes left in the page.
                        unsafe {
                            core::slice::from_raw_parts((self.targets[page] + off) as *const u8, n)
                        }
                    }
                };
                f(at, want);
                done += n;
            }
        };
        if self.published == Publish::Live {
            for (s, b) in &self.pending {
                write(s.addr, b.len(), Some(&b[..]));
            }
        } else if self.keeps_bytes() {
            let mut from = 0;
            for &(a, n) in &self.writes {
                write(a, n, Some(&self.kept[from..from + n]));
                from += n;
            }
        } else {
            for &(a, n) in &self.writes {
                write(a, n, None);
            }
        }
    }

    /// Whether the read-back compares each write (the INT3 protocol keeps
    /// its edits) rather than each page's written span with its staging.
    fn compares_writes(&self) -> bool {
        self.published == Publish::Live
    }

    /// Pages (address, first wrong byte) whose text does not hold the
    /// batch's writes. Where pages were staged each page's written span is
    /// compared with its staging first (one compare per page, whatever the
    /// number of edits); only where that differs — bytes between the
    /// writes may differ legitimately: a breakpoint the kernel keeps, or
    /// one a page swap did not carry — are the writes compared one by one.
    fn mismatches(&self) -> Vec<(usize, usize)> {
        if self.keeps_bytes() {
            return self.kept_mismatches();
        }
        let mut bad: Vec<(usize, usize)> = Vec::new();
        let mut suspect: Vec<usize> = Vec::new();
        let each_write = self.compares_writes();
        if !each_write {
            for r in &self.runs {
                let pages = (r.text.end - r.text.start) / PAGE_SIZE;
                for k in 0..pages {
                    let (lo, hi) = self.dirty[r.first + k];
                    if lo >= hi {
                        continue;
                    }
                    let page = r.text.start + k * PAGE_SIZE;
                    let n = (hi - lo) as usize;
                    // SAFETY: the page is mapped readable; the target is
                    // staging or alias memory of the batch, still mapped.
                    let (have, want) = unsafe {
                        (
                            core::slice::from_raw_parts((page + lo as usize) as *const u8, n),
                            core::slice::from_raw_parts(
                                (self.targets[r.first + k] + lo as usize) as *const u8,
                                n,
                            ),
                        )
                    };
                    if have != want {
                        suspect.push(page);
                    }
                }
            }
            if suspect.is_empty() {
                return bad;
            }
        }
        self.each_piece(|at, want| {
            let page = at - at % PAGE_SIZE;
            if !each_write && suspect.binary_search(&page).is_err() {
                return;
            }
            // SAFETY: inside the batch's text, which is mapped readable.
            let have = unsafe { core::slice::from_raw_parts(at as *const u8, want.len()) };
            if short_eq(have, want) {
                return;
            }
            if let Some(i) = have.iter().zip(want).position(|(a, b)| a != b)
                && bad.last().is_none_or(|&(p, _)| p != page)
            {
                bad.push((page, at + i));
            }
        });
        bad
    }

    pub(super) fn verify_and_repair(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        let bad = self.mismatches();
        if bad.is_empty() {
            return Ok(());
        }
        for &(page, _) in &bad {
            self.repair(shared, page)?;
            self.remaps += 1;
            self.repairs += 1;
        }
        if self.published == Publish::Live {
            sys::sync_all_threads()?;
        }
        match self.mismatches().first() {
            None => Ok(()),
            Some(&(_, addr)) => Err(PokeError::NotLanded { addr }),
        }
    }

    /// Builds `page` afresh — the bytes mapped there now with the batch's
    /// writes on top — and swaps it in: for a file's text, as a fresh copy
    /// of the file carrying the writes and the earlier patches the text
    /// still holds.
    fn repair(&mut self, shared: &mut Shared, page: usize) -> Result<(), PokeError> {
        let range = page..page + PAGE_SIZE;
        shared.text.forget(page);
        shared.text.check(core::slice::from_ref(&range))?;
        let mut fresh = core::mem::take(&mut self.scratch);
        fresh.clear();
        // SAFETY: the page is mapped readable (just checked).
        fresh.extend_from_slice(unsafe {
            core::slice::from_raw_parts(page as *const u8, PAGE_SIZE)
        });
        let mut owned: Vec<Range<usize>> = Vec::new();
        self.each_piece(|at, want| {
            if range.contains(&at) {
                let off = at - page;
                fresh[off..off + want.len()].copy_from_slice(want);
                owned.push(off..off + want.len());
            }
        });
        let r = match self.strategy {
            Strategy::ProcMem => match super::stage::shared_file_of(shared, page) {
                Some((i, offset)) => {
                    shared.overlay.each_in(range.clone(), |a, ours| {
                        let off = a - page;
                        if fresh[off..off + ours.len()] == *ours {
                            owned.push(off..off + ours.len());
                        }
                    });
                    crate::poke::sort_by_key(&mut owned, |r| r.start);
                    // The other copies' patches on the page, as in a swap.
                    if let Err(e) =
                        super::super::peers::add_foreign(&range, &mut owned, &mut Vec::new())
                    {
                        self.scratch = fresh;
                        return Err(e);
                    }
                    let id = shared.text.file(i).id();
                    match shared.text.file(i).fd() {
                        // SAFETY: validated text mapping the file at
                        // `offset`; its current bytes plus the writes.
                        Ok(fd) => unsafe {
                            shared.procmem.swap_file(
                                range.clone(),
                                FileAt { fd, id, offset },
                                &fresh,
                                &owned,
                                &mut shared.swap,
                            )
                        },
                        Err((call, errno)) => Err(PokeError::LeavesFile {
                            addr: page,
                            why: call,
                            errno,
                        }),
                    }
                }
                // SAFETY: anonymous validated text; its current bytes plus
                // the writes.
                None => unsafe { shared.procmem.swap(range.clone(), &fresh) },
            },
            Strategy::Memfd | Strategy::File => {
                shared.arena.forget(page);
                shared
                    .arena
                    .begin(self.strategy, core::slice::from_ref(&range))
                    .and_then(|()| {
                        let (_, spare) = shared.arena.slots(page).expect("just made").spare();
                        // SAFETY: the new spare slot's alias, open read+write.
                        unsafe {
                            core::ptr::copy_nonoverlapping(
                                fresh.as_ptr(),
                                spare as *mut u8,
                                PAGE_SIZE,
                            )
                        };
                        shared.arena.publish_spares(range.clone()).map(|_| ())
                    })
            }
        };
        self.scratch = fresh;
        r
    }
}
