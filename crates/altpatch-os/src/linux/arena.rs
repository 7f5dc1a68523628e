//! The text arena of the alias strategies ([`Strategy::Memfd`],
//! [`Strategy::File`]): a memfd or unlinked tmpfs file that backs patched
//! text pages.
//!
//! Each patched text page owns two page *slots* in the file. One is *live*:
//! mapped read+exec at the text address (`MAP_PRIVATE|MAP_FIXED`). Both are
//! also mapped shared at an *alias* address, through which the patcher
//! writes. The alias is `PROT_NONE` between batches and read+write only
//! while a batch runs, so no writable view of code exists when a call
//! returns. A page enters the arena ("homing") by copying its current bytes
//! into a slot and mapping that slot over it, which changes nothing a
//! running thread can observe.
//!
//! After `fork`, parent and child map the same file pages, so neither may
//! write a slot any more: both forget the arena (the child never had the
//! aliases: they are `MADV_DONTFORK`) and home pages again into a new file
//! on their next batch. The same happens when the loader unloads or loads an
//! object (a remembered slot may no longer be what is mapped), and a write
//! that did not land is repaired by homing its page again (see
//! [`LinuxPoke`](super::LinuxPoke)).
//!
//! [`Strategy::Memfd`]: crate::poke::Strategy::Memfd
//! [`Strategy::File`]: crate::poke::Strategy::File

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Range;

use super::sys::{errno, os_err};
use crate::poke::{PAGE_SIZE, PokeError, Refusal, Strategy};

/// Directories tried for [`Strategy::File`], in order: tmpfs first (no disk
/// writes), then the usual temporary directories.
const FILE_DIRS: [&core::ffi::CStr; 3] = [c"/dev/shm", c"/tmp", c"/var/tmp"];

/// Opens a new, empty backing file of `kind`.
/// A failed call: its name (thin, see [`Refusal`]) and error number.
type Failed = (&'static &'static str, i32);

fn open_backing(kind: Strategy) -> Result<libc::c_int, Failed> {
    match kind {
        Strategy::Memfd => {
            super::sys::memfd_exec(c"altpatch-text", 0).map_err(|e| (&"memfd_create(MFD_EXEC)", e))
        }
        Strategy::File => {
            let mut last: Failed = (&"open(O_TMPFILE) in /dev/shm, /tmp, /var/tmp", 0);
            for dir in FILE_DIRS {
                // SAFETY: open with a NUL-terminated path; the file has no
                // name, so nothing else can open it.
                let fd = unsafe {
                    libc::open(
                        dir.as_ptr(),
                        libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if fd >= 0 {
                    if exec_mappable(fd).is_ok() {
                        return Ok(fd);
                    }
                    last = (
                        &"mmap(PROT_EXEC) of a file in /dev/shm, /tmp, /var/tmp",
                        errno(),
                    );
                    // SAFETY: closing the descriptor we opened.
                    unsafe { libc::close(fd) };
                } else {
                    last.1 = errno();
                }
            }
            Err(last)
        }
        Strategy::ProcMem => Err((&"not an alias strategy", libc::EINVAL)),
    }
}

/// A new, unlinked temporary file that can be mapped executable (what
/// [`Strategy::File`] backs text with), for code written with `pwrite` and
/// only ever mapped read+exec (the trampoline pages, `altpatch::trampoline`):
/// the descriptor, or the call that failed and its error number.
#[doc(hidden)]
pub fn open_exec_tmpfile() -> Result<libc::c_int, (&'static str, i32)> {
    open_backing(Strategy::File).map_err(|(call, errno)| (*call, errno))
}

/// Whether a page of `fd` can be mapped read+exec (a `noexec` mount or
/// `vm.memfd_noexec` refuses it). Leaves the file one page long.
fn exec_mappable(fd: libc::c_int) -> Result<(), Failed> {
    // SAFETY: ftruncate on our own descriptor.
    if unsafe { libc::ftruncate(fd, PAGE_SIZE as libc::off_t) } != 0 {
        return Err((&"ftruncate", errno()));
    }
    let p = super::sys::map_file(fd, 0, PAGE_SIZE)
        .map_err(|_| -> Failed { (&"mmap(PROT_EXEC)", errno()) })?;
    // SAFETY: the probe mapping.
    unsafe { libc::munmap(p, PAGE_SIZE) };
    Ok(())
}

/// Whether this process may use the alias strategy `kind`.
pub(super) fn probe(kind: Strategy) -> Result<(), Refusal> {
    let refuse = |(call, errno): Failed| Refusal::new(kind, call, errno);
    let fd = open_backing(kind).map_err(refuse)?;
    let r = exec_mappable(fd).map_err(|(call, e)| {
        let call: &'static &'static str = match (*call, kind) {
            ("mmap(PROT_EXEC)", Strategy::Memfd) => &"mmap(PROT_EXEC) of a memfd",
            ("mmap(PROT_EXEC)", _) => &"mmap(PROT_EXEC) of a file",
            _ => call,
        };
        refuse((call, e))
    });
    // SAFETY: closing the probe's descriptor.
    unsafe { libc::close(fd) };
    r
}

/// A text page's two slots.
#[derive(Clone, Copy)]
pub(super) struct Slots {
    /// File offsets of the slots.
    off: [u64; 2],
    /// Alias addresses of the slots.
    alias: [usize; 2],
    /// Which slot is mapped at the text page; `None` until the first
    /// publication (the page is then still its original mapping).
    live: Option<u8>,
    /// Index of the alias mapping holding both slots.
    region: u32,
}

impl Slots {
    /// The slot mapped at the text page (homed pages only).
    pub(super) fn live_alias(&self) -> Option<usize> {
        self.live.map(|l| self.alias[l as usize])
    }

    /// The slot not mapped anywhere executable: where a remap stages.
    pub(super) fn spare(&self) -> (u64, usize) {
        let s = match self.live {
            Some(l) => 1 - l as usize,
            None => 0,
        };
        (self.off[s], self.alias[s])
    }

    fn flip(&mut self) {
        self.live = Some(match self.live {
            Some(l) => 1 - l,
            None => 0,
        });
    }
}

/// All arena state; reached through the process lock only.
pub(super) struct Arena {
    /// What the file is (memfd or tmpfs file); `None` before first use.
    kind: Option<Strategy>,
    /// The file, or -1 before the first batch (and after a fork).
    fd: libc::c_int,
    /// Bytes of the file handed out.
    len: u64,
    /// Fork generation and process the arena belongs to.
    generation: u64,
    pid: libc::pid_t,
    /// Alias mappings (address, length), `PROT_NONE` between batches.
    regions: Vec<(usize, usize)>,
    /// Regions opened read+write for the batch in progress.
    open: Vec<u32>,
    /// Text page address -> its slots.
    pages: BTreeMap<usize, Slots>,
    /// Device and inode of every backing file this process (or the one it
    /// was forked from) made: text mapping one is re-homed anonymous text,
    /// not a file's.
    own: Vec<(u64, u64)>,
}

impl Arena {
    pub(super) const fn new() -> Arena {
        Arena {
            kind: None,
            fd: -1,
            len: 0,
            generation: 0,
            pid: 0,
            regions: Vec::new(),
            open: Vec::new(),
            pages: BTreeMap::new(),
            own: Vec::new(),
        }
    }

    /// Whether the file with `dev` and `ino` is one of the arena's.
    pub(super) fn owns(&self, dev: u64, ino: u64) -> bool {
        self.own.contains(&(dev, ino))
    }

    /// Starts a batch over `pages` with backing `kind`: drops the arena if
    /// the process forked or the kind changed, gives every page slots, and
    /// opens their aliases read+write.
    pub(super) fn begin(
        &mut self,
        kind: Strategy,
        pages: &[Range<usize>],
    ) -> Result<(), PokeError> {
        self.leave_if_forked();
        if self.kind != Some(kind) {
            self.reset(true);
            self.kind = Some(kind);
        }
        self.ensure_slots(pages)?;
        for r in pages {
            let mut p = r.start;
            while p < r.end {
                let region = self.pages[&p].region;
                if !self.open.contains(&region) {
                    let (a, len) = self.regions[region as usize];
                    // SAFETY: one of our alias mappings, never executable.
                    if unsafe {
                        libc::mprotect(
                            a as *mut libc::c_void,
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                        )
                    } != 0
                    {
                        let e = os_err("mprotect");
                        self.end();
                        return Err(e);
                    }
                    self.open.push(region);
                }
                p += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// Ends the batch: every alias is `PROT_NONE` again. If one cannot be
    /// closed, the whole arena is unmapped instead.
    pub(super) fn end(&mut self) {
        let mut failed = false;
        for &region in &self.open {
            let (a, len) = self.regions[region as usize];
            // SAFETY: one of our alias mappings.
            failed |= unsafe { libc::mprotect(a as *mut libc::c_void, len, libc::PROT_NONE) } != 0;
        }
        self.open.clear();
        if failed {
            self.reset(true);
        }
    }

    /// After a fork every slot may be mapped by the other process: drop the
    /// arena (unmapping our aliases only if they are ours: a child never
    /// inherited them) and start afresh.
    fn leave_if_forked(&mut self) {
        if super::host::fork_generation() != self.generation {
            // SAFETY: getpid has no preconditions.
            let ours = self.pid == unsafe { libc::getpid() };
            self.reset(ours);
        }
    }

    /// Forgets every slot; with `unmap_aliases`, also unmaps this process's
    /// aliases. Text stays mapped from the old file, which its mappings keep
    /// alive.
    pub(super) fn reset(&mut self, unmap_aliases: bool) {
        if unmap_aliases {
            for &(a, len) in &self.regions {
                // SAFETY: unmapping an alias this process mapped; nothing
                // refers to it once the slots are forgotten.
                unsafe { libc::munmap(a as *mut libc::c_void, len) };
            }
        }
        if self.fd >= 0 {
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(self.fd) };
        }
        self.fd = -1;
        self.len = 0;
        self.regions.clear();
        self.open.clear();
        self.pages.clear();
        self.generation = super::host::fork_generation();
        // SAFETY: getpid has no preconditions.
        self.pid = unsafe { libc::getpid() };
    }

    pub(super) fn slots(&self, page: usize) -> Option<&Slots> {
        self.pages.get(&page)
    }

    /// Forgets `page`'s slots, so the next batch homes it again (its
    /// mapping is no longer the live slot). Their file space stays unused.
    pub(super) fn forget(&mut self, page: usize) {
        self.pages.remove(&page);
    }

    fn ensure_fd(&mut self) -> Result<libc::c_int, PokeError> {
        if self.fd >= 0 {
            return Ok(self.fd);
        }
        let kind = self.kind.unwrap_or(Strategy::Memfd);
        let fd = open_backing(kind).map_err(|(call, errno)| PokeError::Os { call, errno })?;
        // The probe left the file one page long; slots start at 0.
        self.fd = fd;
        // SAFETY: `st` is written by fstat before it is read.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: fstat on our descriptor into our buffer.
        if unsafe { libc::fstat(fd, &mut st) } == 0 {
            self.own.push((st.st_dev, st.st_ino));
        }
        self.generation = super::host::fork_generation();
        // SAFETY: getpid has no preconditions.
        self.pid = unsafe { libc::getpid() };
        Ok(fd)
    }

    /// Gives every page of `pages` (page-aligned) that has none a slot pair.
    /// Consecutive new pages get consecutive slots, one alias mapping per
    /// such sequence, so they publish with one `mmap`.
    fn ensure_slots(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        let missing = crate::poke::unknown_pages(pages, |p| self.pages.contains_key(&p));
        for m in missing {
            self.allocate(m.start, (m.end - m.start) / PAGE_SIZE)?;
        }
        Ok(())
    }

    fn allocate(&mut self, first: usize, n: usize) -> Result<(), PokeError> {
        let fd = self.ensure_fd()?;
        let bytes = n * PAGE_SIZE;
        let base = self.len;
        let new_len = base + 2 * bytes as u64;
        // SAFETY: ftruncate on our own file.
        if unsafe { libc::ftruncate(fd, new_len as libc::off_t) } != 0 {
            return Err(os_err("ftruncate"));
        }
        self.len = new_len;
        // SAFETY: a new shared mapping of our file at an address the kernel
        // picks; it is never executable, and inaccessible until a batch
        // opens it.
        let alias = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                2 * bytes,
                libc::PROT_NONE,
                libc::MAP_SHARED,
                fd,
                base as libc::off_t,
            )
        };
        if alias == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        // A forked child must not inherit a view of text it shares with us.
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(alias, 2 * bytes, libc::MADV_DONTFORK) };
        let alias = alias as usize;
        let region = self.regions.len() as u32;
        self.regions.push((alias, 2 * bytes));
        for i in 0..n {
            let p = i * PAGE_SIZE;
            self.pages.insert(
                first + p,
                Slots {
                    off: [base + p as u64, base + (bytes + p) as u64],
                    alias: [alias + p, alias + bytes + p],
                    live: None,
                    region,
                },
            );
        }
        Ok(())
    }

    /// Maps the spare slot of every page in `range` over it, read+exec, one
    /// `mmap` per group of pages whose spare slots are consecutive, and
    /// makes those slots live. Returns the number of `mmap` calls.
    pub(super) fn publish_spares(&mut self, range: Range<usize>) -> Result<u64, PokeError> {
        let mut calls = 0;
        let mut page = range.start;
        while page < range.end {
            let (off, _) = self.pages[&page].spare();
            let mut len = PAGE_SIZE;
            while page + len < range.end && self.pages[&(page + len)].spare().0 == off + len as u64
            {
                len += PAGE_SIZE;
            }
            // SAFETY: replaces [page, page+len), read+exec text of this
            // process (checked before the batch), with a read+exec private
            // mapping of file slots that hold its current bytes plus
            // validated edits. MAP_FIXED swaps the mapping in one step; the
            // old pages stay valid until every CPU has dropped them.
            let p = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_POPULATE,
                    self.fd,
                    off as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(os_err("mmap"));
            }
            calls += 1;
            let mut q = page;
            while q < page + len {
                if let Some(s) = self.pages.get_mut(&q) {
                    s.flip();
                }
                q += PAGE_SIZE;
            }
            page += len;
        }
        Ok(calls)
    }
}
