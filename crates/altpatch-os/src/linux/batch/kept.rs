//! ProcMem's in-place publication (a start-up batch alone in its process,
//! or [`LinuxPoke::new`](super::super::LinuxPoke::new)): the writes kept
//! as bytes with the bytes they replace (no page staged), made sorted and
//! disjoint at commit, stored over the live text in joined `pwrite`s (see
//! [`in_place_stores`]), put back if a store fails, and read back.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Range;

use super::super::file_view::FileViews;
use super::super::in_place::{Backing, Kept, in_place_stores};
use super::super::state::Shared;
use super::Batch;
use crate::arch::TRAP;
use crate::poke::{PAGE_SIZE, PokeError, short_eq};

impl Batch {
    /// Stores the kept writes over the live text, joined where that is
    /// safe. If a store fails (a partial `pwrite` may leave a site half
    /// written), every byte this batch changed is put back before the
    /// error is returned, while the caller still keeps every other thread
    /// and handler out.
    pub(super) fn commit_in_place(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        self.normalize_kept();
        let mut out = core::mem::take(&mut self.in_place);
        out.clear();
        // Every store lies in the batch's pages: room for all of them at
        // once (untouched room costs no memory).
        out.buf.reserve(self.dirty.len() * PAGE_SIZE);
        // A gap is read only inside one run of the batch's pages (the
        // run of the gap before tried first: writes come in address order).
        let last = core::cell::Cell::new(0);
        let joinable = |gap: Range<usize>| {
            let inside = |i: usize| {
                self.runs
                    .get(i)
                    .is_some_and(|r| r.text.start <= gap.start && gap.end <= r.text.end)
            };
            gap.is_empty()
                || inside(last.get())
                || self.run_of(gap.start).is_some_and(|i| {
                    last.set(i);
                    inside(i)
                })
        };
        let views = FileViews::new(shared, self.runs.iter().map(|r| r.text.clone()));
        let kept = Kept {
            writes: &self.writes,
            new: &self.kept,
            old: &self.old,
        };
        in_place_stores(
            kept,
            // SAFETY: `in_place_stores` reads the writes' bytes and gaps
            // `joinable` accepted: inside the batch's pages.
            |r| unsafe { live(r) },
            |r| views.bytes(r),
            joinable,
            &mut out,
        );
        let mut result = Ok(());
        let fail = super::super::FAIL_IN_PLACE_STORE.load(core::sync::atomic::Ordering::Relaxed);
        for (addr, r) in &out.list {
            let bytes = &out.buf[r.clone()];
            let injected = fail != 0 && *addr + bytes.len() > fail;
            let bytes = if injected {
                &bytes[..bytes.len() / 2]
            } else {
                bytes
            };
            // SAFETY: validated text of the batch; every byte stored is a
            // write's, or between two of them the byte that is there (and
            // the file's, see `in_place_stores`).
            result = unsafe { shared.procmem.write(*addr, bytes) };
            if injected && result.is_ok() {
                result = Err(PokeError::Os {
                    call: "pwrite /proc/self/mem (a partial store injected for tests)",
                    errno: libc::EIO,
                });
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_err() {
            // What is returned is the first error. If putting back fails
            // too, the plan's own rollback finds a site that is no
            // instruction and says the text may be inconsistent.
            let _ = self.restore_kept(shared, &views);
        }
        drop(views);
        self.in_place = out;
        result
    }

    /// Makes the kept writes sorted and disjoint, the last write winning
    /// where two overlap, each byte keeping the bytes the first write found.
    /// Plans write each edit once, in address order: one pass finding
    /// nothing to do; a direct `TextPoke` user (or a rollback) may not.
    fn normalize_kept(&mut self) {
        if self.writes.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0) {
            return;
        }
        let mut bytes: BTreeMap<usize, (u8, u8)> = BTreeMap::new();
        let mut from = 0;
        for &(addr, n) in &self.writes {
            for k in 0..n {
                let b = bytes.entry(addr + k).or_insert((0, self.old[from + k]));
                b.0 = self.kept[from + k];
            }
            from += n;
        }
        self.writes.clear();
        self.kept.clear();
        self.old.clear();
        for (addr, (new, old)) in bytes {
            match self.writes.last_mut() {
                Some((at, n)) if *at + *n == addr => *n += 1,
                _ => self.writes.push((addr, 1)),
            }
            self.kept.push(new);
            self.old.push(old);
        }
    }

    /// Puts back the bytes this batch's stores put there: where the text
    /// holds a write's new byte and it differs from the old one. Nothing
    /// else is touched: a breakpoint the kernel placed since (over one of
    /// ours or not) stays, and an old byte that was a breakpoint the file
    /// does not have (the kernel's, read by validation, maybe removed since)
    /// is not written back.
    fn restore_kept(&self, shared: &mut Shared, views: &FileViews) -> Result<(), PokeError> {
        let mut from = 0;
        let mut result = Ok(());
        for &(addr, n) in &self.writes {
            let (new, old) = (&self.kept[from..from + n], &self.old[from..from + n]);
            from += n;
            // SAFETY: a write of the batch, inside its pages.
            let now = unsafe { live(addr..addr + n) };
            let file = match views.bytes(addr..addr + n) {
                Backing::File(f) => Some(f),
                _ => None,
            };
            // An old `int3` is put back only if it is the file's or one of
            // our own fillers (the overlay's): one of the kernel's, read by
            // validation and maybe removed since, must not come back.
            let overlay = &shared.overlay;
            let ours = |p: usize| {
                now[p] == new[p]
                    && new[p] != old[p]
                    && (old[p] != TRAP
                        || file.is_some_and(|f| f[p] == TRAP)
                        || overlay
                            .spans_in(addr + p..addr + p + 1)
                            .any(|(_, b)| b[0] == TRAP))
            };
            let mut p = 0;
            while p < n {
                if !ours(p) {
                    p += 1;
                    continue;
                }
                let q = (p..n).find(|&q| !ours(q)).unwrap_or(n);
                // SAFETY: validated text of the batch; the bytes it held
                // before this batch stored over them.
                let r = unsafe { shared.procmem.write(addr + p, &old[p..q]) };
                result = result.and(r);
                p = q;
            }
        }
        result
    }

    /// The read-back of the kept writes: pages (address, first wrong byte)
    /// whose text does not hold them. A breakpoint the stores left in place
    /// (the kernel's, over a byte its write keeps or sets to the file's) is
    /// not wrong.
    pub(super) fn kept_mismatches(&self) -> Vec<(usize, usize)> {
        let mut bad: Vec<(usize, usize)> = Vec::new();
        let mut from = 0;
        for &(at, n) in &self.writes {
            let (want, old) = (&self.kept[from..from + n], &self.old[from..from + n]);
            from += n;
            // SAFETY: a write of the batch, inside its pages.
            let have = unsafe { live(at..at + n) };
            if short_eq(have, want) {
                continue;
            }
            let wrong =
                (0..n).find(|&i| have[i] != want[i] && !(have[i] == TRAP && want[i] == old[i]));
            if let Some(i) = wrong {
                let page = (at + i) - (at + i) % PAGE_SIZE;
                if bad.last().is_none_or(|&(p, _)| p != page) {
                    bad.push((page, at + i));
                }
            }
        }
        bad
    }
}

/// The text's bytes at `r`.
///
/// # Safety
///
/// `r` lies in the batch's pages (validated text, mapped readable while
/// the batch holds the process lock).
unsafe fn live<'t>(r: Range<usize>) -> &'t [u8] {
    // SAFETY: the caller's.
    unsafe { core::slice::from_raw_parts(r.start as *const u8, r.end - r.start) }
}
