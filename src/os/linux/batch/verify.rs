//! The read-back after publication, and the repair of a page that does
//! not hold the batch's writes (its mapping changed under us: a debugger's
//! private copy, a re-loaded object, someone's `mmap`).

use alloc::vec::Vec;

use super::Batch;
use crate::os::linux::state::Shared;
use crate::os::linux::{Publish, sys};
use crate::poke::{PAGE_SIZE, PokeError, Strategy};

impl Batch {
    /// Calls `f(addr, intended bytes)` for every write of the batch, split
    /// at page boundaries. The intended bytes are the protocol's pending
    /// writes, or else what the staging (or alias) holds there.
    fn each_piece(&self, mut f: impl FnMut(usize, &[u8])) {
        for (addr, len, pending) in self.write_list() {
            let mut done = 0;
            while done < len {
                let at = addr + done;
                let n = (PAGE_SIZE - at % PAGE_SIZE).min(len - done);
                let want = match pending {
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
        }
    }

    /// Every write as (address, length, the bytes if the batch keeps them).
    fn write_list(&self) -> Vec<(usize, usize, Option<&[u8]>)> {
        if self.publish == Publish::Live {
            self.pending
                .iter()
                .map(|(s, b)| (s.addr, b.len(), Some(&b[..])))
                .collect()
        } else {
            self.writes.iter().map(|&(a, n)| (a, n, None)).collect()
        }
    }

    /// Pages (address, first wrong byte) whose text does not hold the
    /// batch's writes. Outside the INT3 protocol each page's written span is
    /// compared with its staging (one compare per page, whatever the number
    /// of edits); the protocol's writes are compared one by one.
    fn mismatches(&self) -> Vec<(usize, usize)> {
        let mut bad: Vec<(usize, usize)> = Vec::new();
        if self.publish != Publish::Live {
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
                        let i = have.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                        bad.push((page, page + lo as usize + i));
                    }
                }
            }
            return bad;
        }
        self.each_piece(|at, want| {
            // SAFETY: inside the batch's text, which is mapped readable.
            let have = unsafe { core::slice::from_raw_parts(at as *const u8, want.len()) };
            if let Some(i) = have.iter().zip(want).position(|(a, b)| a != b) {
                let page = at - at % PAGE_SIZE;
                if bad.last().is_none_or(|&(p, _)| p != page) {
                    bad.push((page, at + i));
                }
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
        if self.publish == Publish::Live {
            sys::sync_all_threads()?;
        }
        match self.mismatches().first() {
            None => Ok(()),
            Some(&(_, addr)) => Err(PokeError::NotLanded { addr }),
        }
    }

    /// Builds `page` afresh — the bytes mapped there now with the batch's
    /// writes on top — and swaps it in.
    fn repair(&mut self, shared: &mut Shared, page: usize) -> Result<(), PokeError> {
        let strategy = self.strategy;
        let range = page..page + PAGE_SIZE;
        shared.text.forget(page);
        shared.text.check(core::slice::from_ref(&range))?;
        let mut fresh = core::mem::take(&mut self.scratch);
        fresh.clear();
        // SAFETY: the page is mapped readable (just checked).
        fresh.extend_from_slice(unsafe {
            core::slice::from_raw_parts(page as *const u8, PAGE_SIZE)
        });
        self.each_piece(|at, want| {
            if range.contains(&at) {
                let off = at - page;
                fresh[off..off + want.len()].copy_from_slice(want);
            }
        });
        let r = match strategy {
            // SAFETY: validated text; its current bytes plus the writes.
            Strategy::ProcMem => unsafe { shared.procmem.swap(range.clone(), &fresh) },
            Strategy::Memfd | Strategy::File => {
                shared.arena.forget(page);
                shared
                    .arena
                    .begin(strategy, core::slice::from_ref(&range))
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
