//! Read-only views of the files a batch's text maps: the in-place
//! publication joins its stores across the text between sites only where
//! that text is exactly its file's bytes.
//!
//! A gap is rewritten as it is, and anything of the kernel's in it removed
//! between our read and our store would come back: a uprobe's `int3` (it
//! would kill the next thread to reach it) or an optimized probe (a `nop5`
//! made a `call` to the uprobe trampoline). A gap equal to the file's bytes
//! holds neither: a probe makes the text differ from the file, and the
//! kernel never probes an `int3` (it refuses to), so the `int3`s compilers
//! pad functions with (LLVM on x86-64) are the file's. Splitting at every
//! `int3` instead cost 2 561 `pwrite`s instead of about 160 on
//! `tests/fixtures/realprog`, slower than the page swap.
//!
//! A view is a shared read-only mapping: the page cache's pages, no copy,
//! and no breakpoint ever (the kernel places uprobes only in private
//! mappings that may execute). It is made the first time a run of pages
//! needs it and unmapped with the views.

use core::cell::Cell;
use core::ops::Range;

use super::in_place::Backing;
use super::state::Shared;
use crate::poke::PAGE_SIZE;

/// The file view of each run of a batch's pages, made on first use.
pub(super) struct FileViews {
    runs: alloc::vec::Vec<View>,
    /// The run the last question fell in (they come in address order).
    last: Cell<usize>,
}

struct View {
    text: Range<usize>,
    /// `Some(None)`: the run maps no file; `Some(Some(..))`: the
    /// descriptor and offset of the one file it maps at consecutive
    /// offsets; `None`: neither (or the file cannot be opened).
    file: Option<Option<(libc::c_int, u64)>>,
    /// Where the view is mapped: 0 not yet, `usize::MAX` could not be.
    at: Cell<usize>,
}

impl FileViews {
    /// The views of `runs` (page-aligned text ranges the batch checked),
    /// none mapped yet.
    pub(super) fn new(shared: &mut Shared, runs: impl Iterator<Item = Range<usize>>) -> FileViews {
        let runs = runs
            .map(|text| View {
                file: run_file(shared, &text),
                text,
                at: Cell::new(0),
            })
            .collect();
        FileViews {
            runs,
            last: Cell::new(0),
        }
    }

    /// What the text `r` (inside one run) is: anonymous, a file's with the
    /// file's bytes under it, or a file's that cannot be read.
    #[inline]
    pub(super) fn bytes(&self, r: Range<usize>) -> Backing<'_> {
        // Most questions fall in the run of the one before, already mapped.
        if let Some(v) = self.runs.get(self.last.get())
            && v.text.start <= r.start
            && r.end <= v.text.end
            && v.at.get().wrapping_add(1) > 1
        {
            // SAFETY: as in `bytes_slow`: inside the mapped view.
            return Backing::File(unsafe {
                core::slice::from_raw_parts(
                    (v.at.get() + (r.start - v.text.start)) as *const u8,
                    r.end - r.start,
                )
            });
        }
        self.bytes_slow(r)
    }

    /// [`bytes`](Self::bytes) when the run is another's or not mapped yet.
    #[inline(never)]
    fn bytes_slow(&self, r: Range<usize>) -> Backing<'_> {
        let inside = |v: &View| v.text.start <= r.start && r.end <= v.text.end;
        let v = match self.runs.get(self.last.get()) {
            Some(v) if inside(v) => v,
            _ => match self.runs.iter().position(inside) {
                Some(i) => {
                    self.last.set(i);
                    &self.runs[i]
                }
                None => return Backing::Unknown,
            },
        };
        let (fd, offset) = match v.file {
            Some(None) => return Backing::Anonymous,
            None => return Backing::Unknown,
            Some(Some(f)) => f,
        };
        let len = v.text.end - v.text.start;
        if v.at.get() == 0 && !holds(fd, offset + len as u64) {
            // Shorter than the text it is mapped as (truncated since): a
            // page past its end would raise SIGBUS, which with every signal
            // blocked kills the process.
            v.at.set(usize::MAX);
        }
        if v.at.get() == 0 {
            // SAFETY: a new shared read-only mapping of a file we hold
            // open, at an address the kernel picks; unmapped in `drop`.
            let p = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    offset as libc::off_t,
                )
            };
            v.at.set(if p == libc::MAP_FAILED {
                usize::MAX
            } else {
                p as usize
            });
        }
        let at = v.at.get();
        if at == usize::MAX {
            return Backing::Unknown;
        }
        // SAFETY: inside the view, mapped readable for `len` bytes until
        // the views are dropped, which the returned borrow outlives not.
        Backing::File(unsafe {
            core::slice::from_raw_parts(
                (at + (r.start - v.text.start)) as *const u8,
                r.end - r.start,
            )
        })
    }
}

/// The file `text` maps at consecutive offsets (descriptor, first offset),
/// `Some(None)` if it maps none (anonymous, or altpatch's own re-homed
/// text), `None` if it maps several or its file cannot be opened.
fn run_file(shared: &mut Shared, text: &Range<usize>) -> Option<Option<(libc::c_int, u64)>> {
    let mut first: Option<Option<(usize, u64)>> = None;
    for p in text.clone().step_by(PAGE_SIZE) {
        let o = shared.text.origin(p)?;
        let file = o.file().filter(|&i| {
            let (dev, ino) = shared.text.file(i).id();
            !shared.arena.owns(dev, ino)
        });
        // The offset the run's first page would map: the same for every
        // page of a file mapped at consecutive offsets.
        let this = match file {
            None => None,
            Some(i) => Some((i, o.offset.checked_sub((p - text.start) as u64)?)),
        };
        match first {
            None => first = Some(this),
            Some(f) if f == this => {}
            Some(_) => return None,
        }
    }
    match first? {
        None => Some(None),
        Some((i, offset)) => Some(Some((shared.text.file(i).fd().ok()?, offset))),
    }
}

/// Whether the file open as `fd` has at least `len` bytes.
fn holds(fd: libc::c_int, len: u64) -> bool {
    // SAFETY: `st` is written by fstat before it is read.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: fstat into our buffer.
    let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
    // The last page may hold the file's end: its tail reads as zeros.
    ok && (st.st_size as u64).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64 >= len
}

impl Drop for FileViews {
    fn drop(&mut self) {
        for v in &self.runs {
            let at = v.at.get();
            if at != 0 && at != usize::MAX {
                // SAFETY: our own mapping of this length, no longer borrowed.
                unsafe { libc::munmap(at as *mut libc::c_void, v.text.end - v.text.start) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::holds;
    use alloc::{format, vec};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_view_is_clipped_to_the_pages_the_file_has() {
        let path = std::env::temp_dir().join(format!("altpatch-view-{}", std::process::id()));
        std::fs::write(&path, vec![0x90u8; 5000]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // 5000 bytes: the second page holds the end (its tail reads as
        // zeros); a third would raise SIGBUS.
        assert!(holds(f.as_raw_fd(), 4096));
        assert!(holds(f.as_raw_fd(), 8192));
        assert!(!holds(f.as_raw_fd(), 8193));
        assert!(!holds(f.as_raw_fd(), 12288));
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }
}
