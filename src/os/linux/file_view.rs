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
//! `int3` instead cost 2 561 `pwrite`s instead of 164 on
//! `tests/fixtures/realprog`, slower than the page swap.
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
    /// The run the last question fell in (they come in address order).
    last: Cell<usize>,
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
        FileViews {
            runs,
            last: Cell::new(0),
        }
    }

    /// The file's bytes under `r` (inside one run), if it has a view.
    pub(super) fn bytes(&self, r: Range<usize>) -> Option<&[u8]> {
        let inside = |v: &View| v.text.start <= r.start && r.end <= v.text.end;
        let v = match self.runs.get(self.last.get()) {
            Some(v) if inside(v) => v,
            _ => {
                let i = self.runs.iter().position(inside)?;
                self.last.set(i);
                &self.runs[i]
            }
        };
        let (fd, offset) = v.file?;
        let len = v.text.end - v.text.start;
        if v.at.get() == 0 && !holds(fd, offset + len as u64) {
            // Shorter than the text it is mapped as (truncated since): a
            // page past its end would raise SIGBUS, which with every signal
            // blocked kills the process. No view; gaps with `int3` split.
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
