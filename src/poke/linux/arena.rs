//! The process-wide text arena: a memfd that backs every patched text page,
//! the lock that serializes patching, and fork handling.
//!
//! Each patched text page owns two page *slots* in the memfd. One is *live*:
//! mapped read+exec at the text address (`MAP_PRIVATE|MAP_FIXED`). Both are
//! also mapped read+write, never executable, at an *alias* address, through
//! which the patcher writes. A page enters the arena ("homing") by copying
//! its current bytes into a slot and mapping that slot over it, which changes
//! nothing a running thread can observe.
//!
//! After `fork`, parent and child map the same memfd pages, so neither may
//! write a slot any more: both forget the arena (the child never had the
//! aliases: they are `MADV_DONTFORK`) and home pages again into a new memfd
//! on their next batch.

use alloc::collections::BTreeMap;
use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use crate::poke::{PAGE_SIZE, PokeError};

/// `MFD_EXEC` (Linux 6.3): the memfd may be mapped executable even where
/// `vm.memfd_noexec` makes new memfds non-executable by default.
const MFD_EXEC: libc::c_uint = 0x10;

pub(super) const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// Serializes all text patching in the process and guards [`ARENA`]. A
/// pthread mutex (not `std::sync::Mutex`) so the `pthread_atfork` handlers
/// can hold it across `fork`, which therefore never happens mid-batch.
struct TextLock(UnsafeCell<libc::pthread_mutex_t>);
// SAFETY: a pthread mutex is designed to be shared between threads.
unsafe impl Sync for TextLock {}
static TEXT_LOCK: TextLock = TextLock(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

/// Bumped in parent and child by the `pthread_atfork` handlers.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

struct ArenaCell(UnsafeCell<Arena>);
// SAFETY: only accessed through `Locked`, i.e. with TEXT_LOCK held.
unsafe impl Sync for ArenaCell {}
static ARENA: ArenaCell = ArenaCell(UnsafeCell::new(Arena::new()));

/// Whether `membarrier(SYNC_CORE)` is registered for this process.
static SYNC_CORE: AtomicU64 = AtomicU64::new(0);
static INIT: Once = Once::new();

extern "C" fn atfork_prepare() {
    // SAFETY: locks the static mutex; both after-fork handlers unlock it.
    unsafe { libc::pthread_mutex_lock(TEXT_LOCK.0.get()) };
}

extern "C" fn atfork_after() {
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
    // SAFETY: this thread locked it in `atfork_prepare` (in the child, the
    // forking thread is the only thread).
    unsafe { libc::pthread_mutex_unlock(TEXT_LOCK.0.get()) };
}

/// Registers the fork handlers and `membarrier(SYNC_CORE)`, once.
pub(super) fn init_process() {
    INIT.call_once(|| {
        // SAFETY: the handlers only touch a pthread mutex and an atomic.
        unsafe {
            libc::pthread_atfork(Some(atfork_prepare), Some(atfork_after), Some(atfork_after));
        }
        // SAFETY: registration has no memory effects on this process.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
        SYNC_CORE.store((r == 0) as u64, Ordering::Release);
    });
}

pub(super) fn has_sync_core() -> bool {
    SYNC_CORE.load(Ordering::Acquire) != 0
}

pub(super) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub(super) fn os_err(call: &'static str) -> PokeError {
    PokeError::Os {
        call,
        errno: errno(),
    }
}

/// The text lock, held for the duration of a batch. Not `Send`: a pthread
/// mutex is unlocked by the thread that locked it.
pub(super) struct Locked {
    _not_send: PhantomData<*const ()>,
}

impl Locked {
    pub(super) fn acquire() -> Locked {
        // SAFETY: locking the process-wide static mutex.
        unsafe { libc::pthread_mutex_lock(TEXT_LOCK.0.get()) };
        // SAFETY: the lock is held; nothing else references the arena.
        unsafe { (*ARENA.0.get()).leave_if_forked() };
        Locked {
            _not_send: PhantomData,
        }
    }

    pub(super) fn arena(&mut self) -> &mut Arena {
        // SAFETY: TEXT_LOCK is held for our lifetime and `&mut self` makes
        // this the only reference derived from the guard.
        unsafe { &mut *ARENA.0.get() }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: this thread locked it in `acquire`.
        unsafe { libc::pthread_mutex_unlock(TEXT_LOCK.0.get()) };
    }
}

/// A text page's two slots.
#[derive(Clone, Copy)]
pub(super) struct Slots {
    /// Arena offsets of the slots.
    off: [u64; 2],
    /// Read+write alias addresses of the slots.
    alias: [usize; 2],
    /// Which slot is mapped at the text page; `None` until the first
    /// publication (the page is then still its original mapping).
    live: Option<u8>,
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

/// All arena state; only reachable through [`Locked`].
pub(super) struct Arena {
    /// The memfd, or -1 before the first batch (and after a fork).
    fd: libc::c_int,
    /// Bytes of the memfd handed out.
    len: u64,
    /// Fork generation and process the arena belongs to.
    generation: u64,
    pid: libc::pid_t,
    /// Alias mappings (address, length) to unmap when leaving the arena.
    aliases: alloc::vec::Vec<(usize, usize)>,
    /// Text page address -> its slots.
    pages: BTreeMap<usize, Slots>,
    /// Ranges already checked to be read+exec text in `/proc/self/maps`.
    pub(super) maps_checks: u64,
}

impl Arena {
    const fn new() -> Arena {
        Arena {
            fd: -1,
            len: 0,
            generation: 0,
            pid: 0,
            aliases: alloc::vec::Vec::new(),
            pages: BTreeMap::new(),
            maps_checks: 0,
        }
    }

    /// After a fork every slot may be mapped by the other process: drop the
    /// arena (unmapping our aliases only if they are ours: a child never
    /// inherited them) and start afresh.
    fn leave_if_forked(&mut self) {
        if FORK_GENERATION.load(Ordering::Acquire) != self.generation {
            // SAFETY: getpid has no preconditions.
            let ours = self.pid == unsafe { libc::getpid() };
            self.reset(ours);
        }
    }

    /// Forgets every slot; with `unmap_aliases`, also unmaps this process's
    /// aliases. Text stays mapped from the old memfd, which its mappings
    /// keep alive.
    pub(super) fn reset(&mut self, unmap_aliases: bool) {
        if unmap_aliases {
            for &(a, len) in &self.aliases {
                // SAFETY: unmapping an alias this process mapped; nothing
                // else refers to it once the slots are forgotten.
                unsafe { libc::munmap(a as *mut libc::c_void, len) };
            }
        }
        if self.fd >= 0 {
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(self.fd) };
        }
        self.fd = -1;
        self.len = 0;
        self.aliases.clear();
        self.pages.clear();
        self.generation = FORK_GENERATION.load(Ordering::Acquire);
        // SAFETY: getpid has no preconditions.
        self.pid = unsafe { libc::getpid() };
    }

    pub(super) fn slots(&self, page: usize) -> Option<&Slots> {
        self.pages.get(&page)
    }

    fn ensure_fd(&mut self) -> Result<libc::c_int, PokeError> {
        if self.fd >= 0 {
            return Ok(self.fd);
        }
        let name = c"altpatch-text";
        // SAFETY: memfd_create with a NUL-terminated name.
        let mut fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | MFD_EXEC) };
        if fd < 0 && errno() == libc::EINVAL {
            // Kernels before 6.3 do not know MFD_EXEC.
            // SAFETY: as above.
            fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        }
        if fd < 0 {
            return Err(os_err("memfd_create"));
        }
        self.fd = fd;
        self.generation = FORK_GENERATION.load(Ordering::Acquire);
        // SAFETY: getpid has no preconditions.
        self.pid = unsafe { libc::getpid() };
        Ok(fd)
    }

    /// Gives every page of `pages` (page-aligned) that has none a slot pair.
    /// Consecutive new pages get consecutive slots, one alias mapping per
    /// such sequence, so they publish with one `mmap`. Before returning,
    /// `/proc/self/maps` has confirmed they are ordinary read+exec text.
    pub(super) fn ensure_slots(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        let mut missing: alloc::vec::Vec<Range<usize>> = alloc::vec::Vec::new();
        for r in pages {
            let mut p = r.start;
            while p < r.end {
                if !self.pages.contains_key(&p) {
                    match missing.last_mut() {
                        Some(m) if m.end == p => m.end += PAGE_SIZE,
                        _ => missing.push(p..p + PAGE_SIZE),
                    }
                }
                p += PAGE_SIZE;
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        self.maps_checks += 1;
        super::maps::check_text_mappings(&missing)?;
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
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd, new_len as libc::off_t) } != 0 {
            return Err(os_err("ftruncate"));
        }
        self.len = new_len;
        // SAFETY: a new shared read+write mapping of our memfd at an address
        // the kernel picks; it is never executable.
        let alias = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                2 * bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                base as libc::off_t,
            )
        };
        if alias == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        // A forked child must not inherit a writable view of text it shares
        // with us. SAFETY: advice on our own mapping.
        unsafe { libc::madvise(alias, 2 * bytes, libc::MADV_DONTFORK) };
        let alias = alias as usize;
        self.aliases.push((alias, 2 * bytes));
        for i in 0..n {
            let p = i * PAGE_SIZE;
            self.pages.insert(
                first + p,
                Slots {
                    off: [base + p as u64, base + (bytes + p) as u64],
                    alias: [alias + p, alias + bytes + p],
                    live: None,
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
            // process (checked when its slots were made), with a read+exec
            // private mapping of memfd slots that hold its current bytes
            // plus validated edits. MAP_FIXED swaps the mapping in one step;
            // the old pages stay valid until every CPU has dropped them.
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
