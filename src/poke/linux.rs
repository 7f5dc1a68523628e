//! Linux process text poking that never creates a writable+executable
//! mapping.
//!
//! # Strategy: stage in a memfd, publish by remapping
//!
//! Each page a batch touches gets two *slots* in a process-private memfd (the
//! arena). A batch copies the current text of its pages into a buffer,
//! applies the writes there, `pwrite`s the result into the page's spare slot
//! (the one not currently mapped), and publishes it with one
//! `mmap(MAP_FIXED, PROT_READ|PROT_EXEC)` of that slot over the text, per run
//! of pages whose slots are contiguous. The previously mapped slot becomes the
//! next spare.
//!
//! Why this over the alternatives:
//!
//! * **No writable mapping of text ever exists.** Bytes reach the memfd with
//!   `pwrite`, so not even a transient RW alias is mapped: nothing for a
//!   stray write to hit, nothing for a W^X sampler to see.
//! * **Works under `PR_SET_MDWE`.** Mapping a file read+exec is allowed;
//!   `mprotect` from RW to RX (refused under MDWE) is never used.
//! * **Text never stops being executable.** `mmap(MAP_FIXED)` replaces the
//!   old mapping in one step under the mm lock, and the old page stays valid
//!   until every CPU has flushed its TLB entry, so a thread running on the
//!   page sees all-old or all-new bytes — never a non-executable page (the
//!   mprotect dance that gave frida-gum its SIGBUS) and never a torn page.
//! * **Fork-safe.** A forked child maps the same memfd pages. Both sides
//!   notice the fork (`pthread_atfork` bumps a generation) and move to a
//!   fresh arena on their next batch, so neither ever writes a page the other
//!   may be executing.
//! * **Cost proportional to pages, not edits:** per batch, one `pwrite` and
//!   one `mmap` per run, plus one `membarrier`; writes are `memcpy`s into the
//!   staging buffer. The first batch touching a page also checks
//!   `/proc/self/maps` that it is ordinary read+exec text.
//!
//! A text page patched this way is backed by the memfd from then on:
//! `/proc/self/maps` shows `/memfd:altpatch-text (deleted)` for it, and
//! profilers that symbolize by file offset lose those pages.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};
use std::ffi::CStr;
use std::sync::Once;

use super::{PAGE_SIZE, PokeError, TextPoke};

/// `MFD_EXEC` (Linux 6.3): the memfd may be mapped executable even when
/// `vm.memfd_noexec` defaults new memfds to non-executable.
const MFD_EXEC: libc::c_uint = 0x10;

/// Serializes all text patching in the process and guards [`ARENA`].
/// A pthread mutex (not `std::sync::Mutex`) so the `pthread_atfork`
/// handlers can hold it across `fork`.
struct TextLock(UnsafeCell<libc::pthread_mutex_t>);
// SAFETY: a pthread mutex is designed to be shared between threads.
unsafe impl Sync for TextLock {}
static TEXT_LOCK: TextLock = TextLock(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

/// Bumped in both parent and child by the `pthread_atfork` handlers.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Per-process arena state, only touched with [`TEXT_LOCK`] held.
struct ArenaCell(UnsafeCell<Arena>);
// SAFETY: every access happens with TEXT_LOCK held (see `Locked`).
unsafe impl Sync for ArenaCell {}
static ARENA: ArenaCell = ArenaCell(UnsafeCell::new(Arena::new()));

/// Where each patched page's two slots are.
struct Arena {
    /// The memfd, or -1 before the first batch (or after a fork).
    fd: libc::c_int,
    /// Bytes of the memfd handed out as slots.
    len: u64,
    /// Fork generation the arena belongs to.
    generation: u64,
    /// Text page address -> its slots.
    pages: BTreeMap<usize, Slots>,
}

#[derive(Clone, Copy)]
struct Slots {
    /// Arena offsets of the two slots.
    off: [u64; 2],
    /// Which slot is mapped at the page now; `None` while the page is still
    /// the original mapping.
    live: Option<u8>,
}

impl Slots {
    fn spare(&self) -> u64 {
        match self.live {
            Some(l) => self.off[1 - l as usize],
            None => self.off[0],
        }
    }
    fn flip(&mut self) {
        self.live = Some(match self.live {
            Some(l) => 1 - l,
            None => 0,
        });
    }
}

impl Arena {
    const fn new() -> Arena {
        Arena {
            fd: -1,
            len: 0,
            generation: 0,
            pages: BTreeMap::new(),
        }
    }

    /// After a fork, every slot may be mapped by the other process: forget
    /// them all and start a new memfd.
    fn leave_if_forked(&mut self) {
        let now = FORK_GENERATION.load(Ordering::Acquire);
        if now != self.generation {
            if self.fd >= 0 {
                // SAFETY: closing our own descriptor; mappings keep the old
                // memfd alive for as long as they exist.
                unsafe { libc::close(self.fd) };
            }
            self.fd = -1;
            self.len = 0;
            self.pages.clear();
            self.generation = now;
        }
    }

    fn ensure_fd(&mut self) -> Result<libc::c_int, PokeError> {
        if self.fd >= 0 {
            return Ok(self.fd);
        }
        let name = c"altpatch-text";
        // SAFETY: memfd_create with a valid NUL-terminated name.
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
        Ok(fd)
    }

    /// Gives `n` consecutive pages starting at `first` fresh slot pairs,
    /// contiguous so that a run of them publishes with one mmap.
    fn allocate(&mut self, first: usize, n: usize) -> Result<(), PokeError> {
        let fd = self.ensure_fd()?;
        let bytes = (n * PAGE_SIZE) as u64;
        let base = self.len;
        let new_len = base + 2 * bytes;
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd, new_len as libc::off_t) } != 0 {
            return Err(os_err("ftruncate"));
        }
        self.len = new_len;
        for i in 0..n {
            let p = (i * PAGE_SIZE) as u64;
            self.pages.insert(
                first + i * PAGE_SIZE,
                Slots {
                    off: [base + p, base + bytes + p],
                    live: None,
                },
            );
        }
        Ok(())
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn os_err(call: &'static str) -> PokeError {
    PokeError::Os {
        call,
        errno: errno(),
    }
}

extern "C" fn atfork_prepare() {
    // SAFETY: locking the static mutex; released by the handlers below in
    // both processes, so no fork happens mid-batch.
    unsafe { libc::pthread_mutex_lock(TEXT_LOCK.0.get()) };
}

extern "C" fn atfork_after() {
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
    // SAFETY: this thread locked it in `atfork_prepare` (the child's only
    // thread is the one that called fork).
    unsafe { libc::pthread_mutex_unlock(TEXT_LOCK.0.get()) };
}

/// Whether `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE` is registered.
static SYNC_CORE: AtomicU64 = AtomicU64::new(0);
static INIT: Once = Once::new();

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

fn init_process() {
    INIT.call_once(|| {
        // SAFETY: registering async-signal-safe handlers that only touch a
        // pthread mutex and an atomic.
        unsafe {
            libc::pthread_atfork(Some(atfork_prepare), Some(atfork_after), Some(atfork_after));
        }
        // SAFETY: membarrier registration has no memory effects on us.
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

/// The text lock, held for the duration of a batch.
struct Locked {
    _not_send: PhantomData<*const ()>,
}

impl Locked {
    fn acquire() -> Locked {
        // SAFETY: locking the process-wide static mutex.
        unsafe { libc::pthread_mutex_lock(TEXT_LOCK.0.get()) };
        Locked {
            _not_send: PhantomData,
        }
    }

    fn arena(&mut self) -> &mut Arena {
        // SAFETY: TEXT_LOCK is held for our lifetime, and `&mut self` makes
        // this the only reference derived from this guard.
        unsafe { &mut *ARENA.0.get() }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: this thread locked it in `acquire`.
        unsafe { libc::pthread_mutex_unlock(TEXT_LOCK.0.get()) };
    }
}

/// One run of pages in the current batch.
struct Run {
    text: Range<usize>,
    /// Offset of the run's copy in the staging buffer.
    buf: usize,
}

/// Patches this process's own text without a writable+executable mapping,
/// even under `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`.
///
/// See the [module documentation](self) for the strategy. All `LinuxPoke`s
/// in a process share one lock: a batch (`begin` to `commit`/`abort`) holds
/// it, so concurrent patchers serialize, and `fork` waits for a batch to end.
/// The poke is not `Send` because the lock must be released by the thread
/// that took it; create one per patching thread (it is cheap).
///
/// ```
/// use altpatch::{Edit, Image, LinuxPoke, Plan};
/// # use altpatch::patch_point;
/// #[inline(never)]
/// fn value() -> u32 {
///     let r: u32;
///     // SAFETY: only moves an immediate.
///     unsafe { core::arch::asm!(patch_point!("doc_linux_value"), "mov {0:e}, 1", out(reg) r) };
///     r
/// }
/// let image = Image::current();
/// let at = image.patch_point("doc_linux_value").unwrap();
/// let mut old = [0u8; 5];
/// // SAFETY: the point is inside this program's readable text.
/// unsafe { core::ptr::copy_nonoverlapping(at as *const u8, old.as_mut_ptr(), 5) };
/// let mut new = old;
/// new[1] = 7; // mov r32, imm32: the immediate follows the opcode byte
/// let mut plan = Plan::for_image(&image);
/// plan.push(Edit::replace(at, &old, &new).site("value"));
/// let mut poke = LinuxPoke::new().unwrap();
/// // SAFETY: one `mov` replaced by one `mov`; no other thread runs `value`.
/// unsafe { plan.apply(&mut poke) }.unwrap();
/// assert_eq!(value(), 7);
/// ```
pub struct LinuxPoke {
    lock: Option<Locked>,
    runs: Vec<Run>,
    buf: Vec<u8>,
    maps_checks: u64,
    remaps: u64,
}

impl core::fmt::Debug for LinuxPoke {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinuxPoke")
            .field("in_batch", &self.lock.is_some())
            .field("remaps", &self.remaps)
            .finish()
    }
}

impl LinuxPoke {
    /// A poke for this process. Registers for
    /// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE` and the fork handlers
    /// the first time one is created in the process.
    pub fn new() -> Result<LinuxPoke, PokeError> {
        init_process();
        Ok(LinuxPoke {
            lock: None,
            runs: Vec::new(),
            buf: Vec::new(),
            maps_checks: 0,
            remaps: 0,
        })
    }

    /// Whether `sync` uses `membarrier` (otherwise it relies on the TLB
    /// shootdown every remap performs, which interrupts, and so serializes,
    /// every CPU running this process).
    pub fn has_membarrier_sync_core() -> bool {
        init_process();
        SYNC_CORE.load(Ordering::Acquire) != 0
    }

    /// Number of `mmap` publications this poke has made (for tests and
    /// benchmarks: it grows with pages, not edits).
    pub fn remaps(&self) -> u64 {
        self.remaps
    }

    /// Number of times this poke read `/proc/self/maps` (once per batch that
    /// touches a page never patched before).
    pub fn maps_checks(&self) -> u64 {
        self.maps_checks
    }

    fn end_batch(&mut self) {
        self.runs.clear();
        self.lock = None;
    }

    fn locate(&self, addr: usize, len: usize) -> Option<usize> {
        let i = self.runs.partition_point(|r| r.text.end <= addr);
        let r = self.runs.get(i)?;
        (r.text.start <= addr && addr + len <= r.text.end).then(|| r.buf + (addr - r.text.start))
    }

    fn publish(&mut self) -> Result<(), PokeError> {
        let mut lock = self
            .lock
            .take()
            .ok_or(PokeError::Unsupported("commit without a batch in progress"))?;
        let result = self.publish_locked(&mut lock);
        self.runs.clear();
        drop(lock);
        result
    }

    fn publish_locked(&mut self, lock: &mut Locked) -> Result<(), PokeError> {
        let arena = lock.arena();
        // Give never-patched pages their slots, contiguous per run of such
        // pages so they publish together.
        for run in &self.runs {
            let mut page = run.text.start;
            while page < run.text.end {
                if arena.pages.contains_key(&page) {
                    page += PAGE_SIZE;
                    continue;
                }
                let first = page;
                while page < run.text.end && !arena.pages.contains_key(&page) {
                    page += PAGE_SIZE;
                }
                arena.allocate(first, (page - first) / PAGE_SIZE)?;
            }
        }
        let fd = arena.fd;

        // Groups: consecutive pages whose spare slots are consecutive in
        // the arena. Stage every group before publishing any, so a failing
        // pwrite publishes nothing.
        let mut groups: Vec<(usize, usize, u64, usize)> = Vec::new(); // text, len, arena off, buf off
        for run in &self.runs {
            let mut page = run.text.start;
            while page < run.text.end {
                let off = arena.pages[&page].spare();
                let buf = run.buf + (page - run.text.start);
                match groups.last_mut() {
                    Some(g) if g.0 + g.1 == page && g.2 + g.1 as u64 == off => g.1 += PAGE_SIZE,
                    _ => groups.push((page, PAGE_SIZE, off, buf)),
                }
                page += PAGE_SIZE;
            }
        }
        for &(_, len, off, buf) in &groups {
            let mut done = 0;
            while done < len {
                let chunk = &self.buf[buf + done..buf + len];
                // SAFETY: pwrite from our own buffer into our own memfd.
                let n = unsafe {
                    libc::pwrite(
                        fd,
                        chunk.as_ptr().cast(),
                        chunk.len(),
                        (off + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    if errno() == libc::EINTR {
                        continue;
                    }
                    return Err(os_err("pwrite"));
                }
                done += n as usize;
            }
        }
        for &(text, len, off, _) in &groups {
            // SAFETY: replaces [text, text+len), verified to be read+exec
            // text of this process, with a read+exec private mapping of a
            // memfd slot holding the same bytes plus this batch's validated
            // edits. MAP_FIXED swaps the mapping atomically for other threads.
            let p = unsafe {
                libc::mmap(
                    text as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_POPULATE,
                    fd,
                    off as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(os_err("mmap"));
            }
            self.remaps += 1;
            let mut page = text;
            while page < text + len {
                if let Some(s) = arena.pages.get_mut(&page) {
                    s.flip();
                }
                page += PAGE_SIZE;
            }
        }
        Ok(())
    }
}

impl Drop for LinuxPoke {
    fn drop(&mut self) {
        self.end_batch();
    }
}

// SAFETY: `commit` maps, at each page, a copy of the page's current bytes
// with exactly the batch's writes applied, in one atomic mmap per group;
// `sync` serializes every thread (membarrier SYNC_CORE, or the remap's TLB
// shootdown IPIs). `abort` publishes nothing: writes only reach a private
// buffer before `commit`.
unsafe impl TextPoke for LinuxPoke {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        if self.lock.is_some() {
            return Err(PokeError::Unsupported("begin while a batch is in progress"));
        }
        let mut lock = Locked::acquire();
        let arena = lock.arena();
        arena.leave_if_forked();

        // Pages never patched before must be ordinary read+exec text.
        let unknown: Vec<Range<usize>> = pages
            .iter()
            .filter(|r| {
                (r.start..r.end)
                    .step_by(PAGE_SIZE)
                    .any(|p| !arena.pages.contains_key(&p))
            })
            .cloned()
            .collect();
        if !unknown.is_empty() {
            self.maps_checks += 1;
            check_text_mappings(&unknown)?;
        }

        let total: usize = pages.iter().map(|r| r.end - r.start).sum();
        self.buf.clear();
        self.buf.reserve(total);
        self.runs.clear();
        for r in pages {
            if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 || r.end <= r.start {
                return Err(PokeError::NotText {
                    addr: r.start,
                    why: "batch range is not page-aligned",
                });
            }
            let at = self.buf.len();
            // SAFETY: the range is mapped readable text (checked above or
            // mapped by us earlier); the lock keeps other patchers out.
            let src = unsafe { core::slice::from_raw_parts(r.start as *const u8, r.end - r.start) };
            self.buf.extend_from_slice(src);
            self.runs.push(Run {
                text: r.clone(),
                buf: at,
            });
        }
        self.lock = Some(lock);
        Ok(())
    }

    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        if self.lock.is_none() {
            return Err(PokeError::Unsupported("write outside a batch"));
        }
        let at = self
            .locate(addr, bytes.len())
            .ok_or(PokeError::OutsideBatch { addr })?;
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        self.publish()
    }

    fn abort(&mut self) {
        self.end_batch();
    }

    fn sync(&mut self) -> Result<(), PokeError> {
        if SYNC_CORE.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        // SAFETY: membarrier only interrupts this process's running threads.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
        if r != 0 {
            return Err(os_err("membarrier"));
        }
        Ok(())
    }
}

/// Checks that every range is covered by mappings that are readable and
/// executable but not writable.
fn check_text_mappings(ranges: &[Range<usize>]) -> Result<(), PokeError> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| PokeError::Os {
        call: "read /proc/self/maps",
        errno: e.raw_os_error().unwrap_or(0),
    })?;
    let mut vmas: Vec<(usize, usize, [u8; 4])> = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(span), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        let Some((a, b)) = span.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        let mut p = [b'-'; 4];
        for (d, s) in p.iter_mut().zip(perms.bytes()) {
            *d = s;
        }
        vmas.push((a, b, p));
    }
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let Some(&(_, end, perms)) = vmas.iter().find(|v| v.0 <= at && at < v.1) else {
                return Err(PokeError::NotText {
                    addr: at,
                    why: "not mapped",
                });
            };
            if perms[0] != b'r' || perms[2] != b'x' {
                return Err(PokeError::NotText {
                    addr: at,
                    why: "mapping is not readable and executable",
                });
            }
            if perms[1] == b'w' {
                return Err(PokeError::NotText {
                    addr: at,
                    why: "mapping is writable and executable (JIT memory?)",
                });
            }
            at = end;
        }
    }
    Ok(())
}

/// A loaded object (the executable or a shared object) and its executable
/// segments, as the dynamic loader reports them.
pub(crate) struct LoadedObject {
    /// Path as the loader knows it (empty for the main program).
    #[allow(dead_code)]
    pub name: String,
    /// Executable `PT_LOAD` segments, relocated.
    pub text: Vec<Range<usize>>,
}

/// The loaded object one of whose segments contains `addr`.
pub(crate) fn loaded_object_containing(addr: usize) -> Option<LoadedObject> {
    struct Search {
        addr: usize,
        found: Option<LoadedObject>,
    }
    unsafe extern "C" fn callback(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of
        // the call and our `data` pointer unchanged.
        let (info, search) = unsafe { (&*info, &mut *(data as *mut Search)) };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: the loader guarantees dlpi_phnum headers at dlpi_phdr.
        let phdrs =
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let base = info.dlpi_addr as usize;
        let seg = |p: &libc::Elf64_Phdr| {
            let s = base.wrapping_add(p.p_vaddr as usize);
            s..s.wrapping_add(p.p_memsz as usize)
        };
        let hit = phdrs
            .iter()
            .any(|p| p.p_type == libc::PT_LOAD && seg(p).contains(&search.addr));
        if !hit {
            return 0;
        }
        let text = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0)
            .map(seg)
            .collect();
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: the loader's name is a NUL-terminated string.
            unsafe { CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        search.found = Some(LoadedObject { name, text });
        1
    }
    let mut search = Search { addr, found: None };
    // SAFETY: the callback matches the expected signature and only uses
    // `search` for the duration of the call.
    unsafe { libc::dl_iterate_phdr(Some(callback), (&raw mut search).cast()) };
    search.found
}
