//! Read-only views of the files a batch's text maps, for telling a file's
//! own `int3` bytes from a breakpoint of the kernel's when the in-place
//! publication joins its stores across the text between sites.
//!
//! Compilers pad between functions with `int3` (LLVM on x86-64), so most
//! gaps between a program's sites hold some. A gap is rewritten as it is
//! only if no `int3` in it can be a uprobe's: a breakpoint removed between
//! our read and our store would come back and kill the next thread to
//! reach it. A gap that equals the file's bytes holds none of the kernel's
//! (the kernel never probes an `int3`: it refuses to; and a breakpoint over
//! any other byte makes the text differ from the file), so it may be
//! joined. Without that, every padded gap costs a `pwrite` of its own:
//! 2 561 instead of 361 on `tests/fixtures/realprog`.
//!
//! A view is a shared read-only mapping: the page cache's pages, no copy,
//! and no breakpoint ever (the kernel places uprobes only in private
//! mappings that may execute). It is made the first time a run of pages
//! needs it and unmapped with the views.

use core::cell::Cell;
use core::ops::Range;

use super::state::Shared;
use crate::poke::PAGE_SIZE;

/// The file view of each run of a batch's pages, made on first use.
pub(super) struct FileViews {
    runs: alloc::vec::Vec<View>,
}

struct View {
    text: Range<usize>,
    /// The descriptor and offset of the file the run maps (contiguously),
    /// if it maps one.
    file: Option<(libc::c_int, u64)>,
    /// Where the view is mapped: 0 not yet, `usize::MAX` could not be.
    at: Cell<usize>,
}

impl FileViews {
    /// The views of `runs` (page-aligned text ranges the batch checked),
    /// none mapped yet. A run not mapping one file at consecutive offsets,
    /// or whose file cannot be opened, has none.
    pub(super) fn new(shared: &mut Shared, runs: impl Iterator<Item = Range<usize>>) -> FileViews {
        let runs = runs
            .map(|text| {
                let file = (|| {
                    let first = shared.text.origin(text.start)?;
                    let i = first.file()?;
                    for p in text.clone().step_by(PAGE_SIZE) {
                        let o = shared.text.origin(p)?;
                        if o.file() != Some(i) || o.offset != first.offset + (p - text.start) as u64
                        {
                            return None;
                        }
                    }
                    Some((shared.text.file(i).fd().ok()?, first.offset))
                })();
                View {
                    text,
                    file,
                    at: Cell::new(0),
                }
            })
            .collect();
        FileViews { runs }
    }

    /// The file's bytes under `r` (inside one run), if it has a view.
    pub(super) fn bytes(&self, r: Range<usize>) -> Option<&[u8]> {
        let v = self
            .runs
            .iter()
            .find(|v| v.text.start <= r.start && r.end <= v.text.end)?;
        let (fd, offset) = v.file?;
        let len = v.text.end - v.text.start;
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
            return None;
        }
        // SAFETY: inside the view, mapped readable for `len` bytes until
        // the views are dropped, which the returned borrow outlives not.
        Some(unsafe {
            core::slice::from_raw_parts(
                (at + (r.start - v.text.start)) as *const u8,
                r.end - r.start,
            )
        })
    }
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
