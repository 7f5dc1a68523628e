//! Writing text through `/proc/self/mem` ([`Strategy::ProcMem`]).
//!
//! A `pwrite` to `/proc/self/mem` at a text address makes the kernel write
//! the page itself, as a debugger's `PTRACE_POKETEXT` does: it breaks
//! copy-on-write (the page becomes a private copy holding the same bytes,
//! swapped in atomically) and stores the bytes there. No mapping of the page
//! is ever writable, so there is no alias to leak, nothing shared with a
//! forked child (private pages are copy-on-write across `fork`), and the
//! write lands in whatever is mapped *now* — a debugger's private copy, a
//! re-loaded object — not in a page remembered from earlier.
//!
//! * **In place**: one `pwrite` per page of the batch, over the span the
//!   batch changed. The mapping keeps its file name in `/proc/self/maps`.
//! * **Page swap** of text backed by a file (see [`ProcMem::swap_file`]):
//!   a fresh private read+exec mapping of the same file at the same offset
//!   is staged — the kernel places in it the breakpoints of the uprobes
//!   registered now, and keeps them up to date while it exists — our bytes
//!   (earlier patches and the batch's) are written into it, and `mremap`
//!   moves it over the text in one step. A thread running there faults for
//!   an instant and continues in the new page, so it runs all-old or all-new
//!   bytes; and the page stays the file's text for the kernel (uprobes),
//!   `/proc/self/maps`, perf and debuggers.
//! * **Page swap** of anonymous text (no file, so no uprobe and no symbol to
//!   keep): a fresh anonymous read+exec mapping holding the new contents.
//!
//! Refused where the kernel forbids forced writes (`proc_mem.force_override=
//! never`, some LSMs) or `/proc` is not mounted: the probe checks both, on a
//! private mapping of this program's own file (anonymous executable memory
//! may be refused by policy, SELinux `execmem`, and the file-backed swap
//! does not need it).
//!
//! [`Strategy::ProcMem`]: crate::poke::Strategy::ProcMem

use core::ops::Range;

use super::sys::{errno, map_anon, os_err};
use crate::poke::{PAGE_SIZE, PokeError, Refusal, Strategy};

/// The open `/proc/self/mem`. Kept open; reopened in a forked child (found
/// by its process id), whose inherited descriptor still names the parent's
/// memory.
pub(super) struct ProcMem {
    fd: libc::c_int,
    pid: libc::pid_t,
    /// Device and inode of `fd` when opened.
    id: (u64, u64),
    /// Staging pages for swaps: an anonymous read+exec mapping, never
    /// touched, from whose end each swap takes the pages it moves over the
    /// text (one `mmap` per `POOL` pages instead of one per swap).
    pool: usize,
    pool_pages: usize,
}

/// Staging pages mapped at a time.
const POOL: usize = 32;

impl ProcMem {
    pub(super) const fn new() -> ProcMem {
        ProcMem {
            fd: -1,
            pid: 0,
            id: (0, 0),
            pool: 0,
            pool_pages: 0,
        }
    }

    /// `pages` untouched anonymous read+exec pages to stage a swap in,
    /// taken from the pool (refilled as needed).
    fn staging(&mut self, pages: usize) -> Result<usize, PokeError> {
        if self.pool_pages < pages {
            let n = pages.max(POOL);
            let p = map_anon(n * PAGE_SIZE, libc::PROT_READ | libc::PROT_EXEC)?;
            if self.pool_pages > 0 {
                // SAFETY: the rest of the old pool, ours and untouched.
                unsafe {
                    libc::munmap(self.pool as *mut libc::c_void, self.pool_pages * PAGE_SIZE)
                };
            }
            (self.pool, self.pool_pages) = (p as usize, n);
        }
        self.pool_pages -= pages;
        Ok(self.pool + self.pool_pages * PAGE_SIZE)
    }

    /// Opens `/proc/self/mem`, or reopens it if this is a forked child.
    /// Called when a batch begins (under the process lock, so no fork comes
    /// between this and the batch's writes) rather than reset by a fork
    /// handler: a raw `clone` runs no handler, and a write through the
    /// parent's descriptor would patch the parent.
    ///
    /// The descriptor kept is checked to still be ours (device and inode):
    /// a program may close descriptors it did not open (`closefrom` in a
    /// forked child) and the number be reused for a file of its own, which
    /// a `pwrite` meant for text would corrupt.
    pub(super) fn open(&mut self) -> Result<libc::c_int, PokeError> {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        if self.fd >= 0 {
            let ours = identity(self.fd) == Some(self.id);
            if ours && self.pid == pid {
                return Ok(self.fd);
            }
            if ours {
                // SAFETY: closing our own descriptor (the parent's memory).
                unsafe { libc::close(self.fd) };
            }
            self.fd = -1;
        }
        // SAFETY: open with a NUL-terminated path.
        let fd = unsafe { libc::open(c"/proc/self/mem".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(os_err("open /proc/self/mem"));
        }
        let Some(id) = identity(fd) else {
            let e = os_err("fstat /proc/self/mem");
            // SAFETY: closing the descriptor we just opened.
            unsafe { libc::close(fd) };
            return Err(e);
        };
        (self.fd, self.pid, self.id) = (fd, pid, id);
        Ok(fd)
    }

    /// Writes `bytes` at `addr` of this process.
    ///
    /// # Safety
    ///
    /// `addr..addr + bytes.len()` is validated text (or a mapping of ours
    /// nothing runs yet), and `bytes` is what may be there.
    pub(super) unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        let fd = if self.fd >= 0 { self.fd } else { self.open()? };
        let mut done = 0;
        while done < bytes.len() {
            // SAFETY: reads `bytes`; the kernel writes our own memory at an
            // address the caller vouches for.
            let n = unsafe {
                libc::pwrite(
                    fd,
                    bytes[done..].as_ptr().cast(),
                    bytes.len() - done,
                    (addr + done) as libc::off_t,
                )
            };
            if n < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                return Err(os_err("pwrite /proc/self/mem"));
            }
            if n == 0 {
                return Err(PokeError::NotLanded { addr: addr + done });
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Replaces the pages `text` with `bytes` (their whole new contents) in
    /// one step, for threads running through them.
    ///
    /// # Safety
    ///
    /// `text` is page-aligned validated text; `bytes` is its current
    /// contents with validated edits applied.
    pub(super) unsafe fn swap(
        &mut self,
        text: Range<usize>,
        bytes: &[u8],
    ) -> Result<(), PokeError> {
        let len = text.end - text.start;
        debug_assert!(bytes.len() == len && len.is_multiple_of(PAGE_SIZE));
        let stage = self.staging(len / PAGE_SIZE)? as *mut libc::c_void;
        let unmap = |e: PokeError| {
            // SAFETY: our staging mapping, not yet moved.
            unsafe { libc::munmap(stage, len) };
            e
        };
        // SAFETY: the staging mapping is ours and nothing runs it yet.
        unsafe { self.write(stage as usize, bytes) }.map_err(unmap)?;
        // SAFETY: forwarded.
        unsafe { move_over(stage, &text) }.map_err(unmap)
    }
}

/// Moves the staging mapping at `stage` over the pages `text` (the same
/// length) in one step; on failure the staging is left where it is.
///
/// # Safety
///
/// `text` is page-aligned validated text, and the staging mapping holds its
/// current bytes with validated edits applied.
pub(super) unsafe fn move_over(
    stage: *mut libc::c_void,
    text: &Range<usize>,
) -> Result<(), PokeError> {
    let len = text.end - text.start;
    // SAFETY: moves our staging pages over `text`, which the caller vouches
    // for; MREMAP_FIXED replaces the old pages in one step under the
    // address-space lock (a thread faulting there waits for it).
    let moved = unsafe {
        libc::mremap(
            stage,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            text.start as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        if super::sys::errno() == libc::EPERM && super::maps::sealed(text) {
            return Err(PokeError::Sealed {
                addr: text.start,
                why: "it was sealed after the batch began (the next batch publishes it in place)",
            });
        }
        return Err(os_err("mremap"));
    }
    Ok(())
}

/// The device and inode `fd` is open on, if it is open.
fn identity(fd: libc::c_int) -> Option<(u64, u64)> {
    // SAFETY: `st` is written by fstat before it is read.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: fstat into our buffer; a closed descriptor only fails.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

impl Drop for ProcMem {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(self.fd) };
        }
    }
}

/// Whether this process may use the strategy: opens `/proc/self/mem`,
/// maps a page of this program's own file privately read+exec (as the page
/// swap stages text), writes it through the file and reads it back.
pub(super) fn probe(mem: &mut ProcMem) -> Result<(), Refusal> {
    let refuse =
        |call: &'static &'static str, errno: i32| Refusal::new(Strategy::ProcMem, call, errno);
    mem.open()
        .map_err(|_| refuse(&"open /proc/self/mem", errno()))?;
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(refuse(&"open /proc/self/exe", errno()));
    }
    // The first page of our file, which nothing runs; unmapped below.
    let page = super::sys::map_file(fd, 0, PAGE_SIZE);
    let e = errno();
    // SAFETY: closing the descriptor we opened (the mapping keeps the file).
    unsafe { libc::close(fd) };
    let page = page.map_err(|_| refuse(&"mmap(PROT_READ|PROT_EXEC) of /proc/self/exe", e))?;
    let probe = [0xc3u8, 0xcc];
    // SAFETY: our own private page, which nothing runs.
    let wrote = unsafe { mem.write(page as usize, &probe) };
    // SAFETY: the page is mapped readable.
    let landed = unsafe { core::slice::from_raw_parts(page as *const u8, 2) } == probe;
    let e = errno();
    // SAFETY: unmapping the probe page.
    unsafe { libc::munmap(page, PAGE_SIZE) };
    match wrote {
        Err(PokeError::Os { errno, .. }) => Err(refuse(&"pwrite /proc/self/mem", errno)),
        Err(_) => Err(refuse(&"pwrite /proc/self/mem", e)),
        Ok(()) if !landed => Err(refuse(&"pwrite /proc/self/mem (read back)", 0)),
        Ok(()) => Ok(()),
    }
}
