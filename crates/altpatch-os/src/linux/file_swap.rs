//! The page swap of text a file maps, so that it stays that file's text.
//!
//! 1. A fresh private read+exec mapping of the same file at the same offset
//!    is staged. The kernel places in it the breakpoints of the uprobes
//!    registered now, and while it exists keeps them as probes come and go.
//! 2. The file's bytes are learnt (one `pread` the first time a page is
//!    swapped), and our bytes — earlier patches and the batch's writes —
//!    are written into the staging through
//!    `/proc/self/mem` (see [`write_runs`]: never an `int3` that is not
//!    ours, never over the kernel's breakpoint at an unpatched byte).
//! 3. `mremap` moves the staging over the text in one step: a thread runs
//!    all-old or all-new bytes, and the page keeps the file's identity for
//!    the kernel, `/proc/self/maps`, perf and debuggers.
//! 4. Reconcile with a uprobe detached during the move. The kernel removes
//!    a probe by walking the mappings of the file it listed when the
//!    removal began, by address: a mapping moved after that is missed, and
//!    the breakpoint it carried would stay, unknown to the kernel, and kill
//!    the next thread to reach it. So where the moved page holds an `int3`
//!    that is neither ours nor the file's, a fresh mapping of the file
//!    (where the kernel places only the probes registered now) is asked,
//!    and a breakpoint no probe stands behind any more is replaced by the
//!    file's byte — what the kernel's removal would have written.
//!
//! A probe attached during the move may miss the page, as it may miss any
//! mapping `mremap` moves; it is never left half-installed. It fires again
//! once re-attached.

// Breakpoints are found byte by byte: x86's `int3` is one byte.
use crate::arch::TRAP;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ops::Range;

use super::procmem::ProcMem;
use super::runs::file_runs;
use super::sorted_map::SortedMap;
use super::sys::{errno, map_file, os_err};
use crate::poke::{PAGE_SIZE, PokeError};

/// Where a group of text pages comes from: a file (its descriptor and its
/// device and inode) and the offset of the first page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileAt {
    pub(super) fd: libc::c_int,
    pub(super) id: (u64, u64),
    pub(super) offset: u64,
}

impl FileAt {
    /// The same file `by` bytes further.
    pub(super) fn plus(self, by: usize) -> FileAt {
        FileAt {
            offset: self.offset + by as u64,
            ..self
        }
    }
}

/// Pages whose file bytes are remembered (4 KiB each): live updates flip
/// the same few pages, and need no read of the file after the first.
const CACHED_PAGES: usize = 64;

/// Scratch reused across swaps, and what the file holds.
pub(super) struct Scratch {
    /// The file's bytes for the pages being swapped.
    file: Vec<u8>,
    /// The stores a swap makes, and the pages they fall in.
    stores: Vec<Range<usize>>,
    written: Vec<bool>,
    /// Breakpoint-looking bytes after the move.
    suspects: Vec<usize>,
    /// Remembered pages: (device, inode, file offset) -> the file's bytes.
    cache: SortedMap<(u64, u64, u64), Box<[u8; PAGE_SIZE]>>,
}

impl Scratch {
    pub(super) const fn new() -> Scratch {
        Scratch {
            file: Vec::new(),
            stores: Vec::new(),
            written: Vec::new(),
            suspects: Vec::new(),
            cache: SortedMap::new(),
        }
    }

    /// Fills `file` with the `len` bytes of the file from `at`, reading the
    /// file (one `pread`) only if a page is not remembered.
    fn learn(&mut self, at: FileAt, len: usize) -> Result<(), PokeError> {
        let pages = len / PAGE_SIZE;
        let key = |i: usize| (at.id.0, at.id.1, at.offset + (i * PAGE_SIZE) as u64);
        if (0..pages).all(|i| self.cache.contains_key(&key(i))) {
            self.file.clear();
            for i in 0..pages {
                if let Some(page) = self.cache.get(&key(i)) {
                    self.file.extend_from_slice(&page[..]);
                }
            }
            return Ok(());
        }
        read_file(at.fd, at.offset, len, &mut self.file)?;
        for (i, page) in self.file.chunks(PAGE_SIZE).enumerate() {
            if self.cache.len() >= CACHED_PAGES {
                break;
            }
            let page: Box<[u8; PAGE_SIZE]> = Box::new(page.try_into().expect("a whole page"));
            self.cache.insert(key(i), page);
        }
        Ok(())
    }
}

/// Reads `len` bytes of `fd` from `offset` into `out` (not zeroed first: a
/// start-up swap reads megabytes).
fn read_file(fd: libc::c_int, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<(), PokeError> {
    out.clear();
    out.reserve(len);
    let spare = out.spare_capacity_mut();
    let mut done = 0;
    while done < len {
        // SAFETY: reads into the buffer's spare capacity, within `len`.
        let n = unsafe {
            libc::pread(
                fd,
                spare[done..].as_mut_ptr().cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return Err(os_err("pread of the text's file"));
        }
        done += n as usize;
    }
    // SAFETY: `pread` initialized the first `len` bytes.
    unsafe { out.set_len(len) };
    Ok(())
}

impl ProcMem {
    /// Replaces the pages `text`, which map the file `at`,
    /// with a fresh private mapping of the same file at the same offset
    /// holding `want` at every position of `owned`, in one step (see the
    /// [module documentation](self)).
    ///
    /// # Safety
    ///
    /// `text` is page-aligned validated text mapping the file `at`; `want`
    /// (`text`'s length) holds its intended bytes at `owned` (sorted
    /// offsets into `text`), which are earlier patches and validated edits.
    pub(super) unsafe fn swap_file(
        &mut self,
        text: Range<usize>,
        at: FileAt,
        want: &[u8],
        owned: &[Range<usize>],
        scratch: &mut Scratch,
    ) -> Result<(), PokeError> {
        let len = text.end - text.start;
        debug_assert!(want.len() == len && len.is_multiple_of(PAGE_SIZE));
        let stage = map_file(at.fd, at.offset, len)?;
        let unmap = |e: PokeError| {
            // SAFETY: our staging mapping, not moved.
            unsafe { libc::munmap(stage, len) };
            e
        };
        scratch.learn(at, len).map_err(unmap)?;
        // SAFETY: `text` is mapped readable.
        // Decided from the file and the live text, not read from the
        // staging: the staging is faulted once, by our first store.
        scratch.stores.clear();
        file_runs(
            // SAFETY: `text` is mapped readable.
            unsafe { core::slice::from_raw_parts(text.start as *const u8, len) },
            &scratch.file,
            want,
            owned,
            &mut scratch.stores,
        );
        // Pages a store faults in (as a private copy).
        scratch.written.clear();
        scratch.written.resize(len / PAGE_SIZE, false);
        for r in &scratch.stores {
            // SAFETY: our staging mapping, which nothing runs yet.
            unsafe { self.write(stage as usize + r.start, &want[r.clone()]) }.map_err(unmap)?;
            for p in r.start / PAGE_SIZE..=(r.end - 1) / PAGE_SIZE {
                scratch.written[p] = true;
            }
        }
        // Every page mapped before the move: moved over the text, a page not
        // yet mapped would be faulted in by every thread running it, each
        // contending for the address-space lock the next update needs.
        for (page, _) in scratch.written.iter().enumerate().filter(|(_, w)| !**w) {
            // SAFETY: a readable byte of our staging mapping.
            unsafe { core::ptr::read_volatile((stage as *const u8).add(page * PAGE_SIZE)) };
        }
        // SAFETY: forwarded; the staging holds the text's intended bytes.
        unsafe { super::procmem::move_over(stage, &text) }.map_err(unmap)?;
        // SAFETY: `text` is validated text, now the moved staging.
        unsafe { self.reconcile(&text, at, want, owned, scratch) }
    }

    /// Step 4 of the [module documentation](self): removes a breakpoint
    /// the moved page carries that no registered probe stands behind.
    ///
    /// # Safety
    ///
    /// `text` is validated text mapping the file `at`, just swapped.
    unsafe fn reconcile(
        &mut self,
        text: &Range<usize>,
        at: FileAt,
        want: &[u8],
        owned: &[Range<usize>],
        scratch: &mut Scratch,
    ) -> Result<(), PokeError> {
        let len = text.end - text.start;
        // SAFETY: `text` is mapped readable.
        let now = unsafe { core::slice::from_raw_parts(text.start as *const u8, len) };
        scratch.suspects.clear();
        // An int3 here that is neither the file's nor one of ours (the
        // file's are most: padding between functions).
        let mut k = 0; // owned ranges before this position
        let file = &scratch.file;
        let mut from = 0;
        while let Some(i) = memchr::memchr(TRAP, &now[from..]) {
            let p = from + i;
            if file[p] == TRAP {
                // The file's padding, in runs: skipped as a whole.
                from = p + 1;
                while from < len && now[from] == TRAP && file[from] == TRAP {
                    from += 1;
                }
                continue;
            }
            from = p + 1;
            while k < owned.len() && owned[k].end <= p {
                k += 1;
            }
            let ours = owned[k..]
                .iter()
                .take_while(|r| r.start <= p)
                .any(|r| r.contains(&p));
            if !(ours && want[p] == TRAP) {
                scratch.suspects.push(p);
            }
        }
        if scratch.suspects.is_empty() {
            return Ok(());
        }
        // Asked after the move: the kernel places in a new mapping only the
        // probes that have a consumer now (a removal drops its consumer
        // before it walks the mappings).
        let probe = map_file(at.fd, at.offset, len)?;
        // SAFETY: our fresh mapping of `len` readable bytes.
        let registered = unsafe { core::slice::from_raw_parts(probe as *const u8, len) };
        let mut result = Ok(());
        for &p in &scratch.suspects {
            if registered[p] != TRAP {
                // The file's byte: the mapping just made shows it, no probe
                // standing there.
                let b = [registered[p]];
                // SAFETY: the first byte of the instruction the kernel's
                // breakpoint covered, written back as the kernel would.
                result = result.and(unsafe { self.write(text.start + p, &b) });
            }
        }
        // SAFETY: unmapping our probe mapping.
        unsafe { libc::munmap(probe, len) };
        result
    }
}
