//! Linux process text poking that never creates a writable+executable
//! mapping and works under `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`.
//!
//! # Strategy
//!
//! The first batch that touches a text page *homes* it: the page's bytes are
//! copied into a slot of a process-private memfd and the slot is mapped over
//! the page, read+exec, with one `mmap(MAP_FIXED)` — a swap that running
//! threads cannot observe, since the bytes are identical and `MAP_FIXED`
//! replaces the mapping in one step. The memfd is also mapped read+write,
//! never executable, at another address (the *alias*). From then on:
//!
//! * [`Publish::InPlace`] (the default, [`LinuxPoke::new`]): writes are plain
//!   stores through the alias into the live slot: no system call per write,
//!   none per batch but the `membarrier` in [`sync`](TextPoke::sync). Other
//!   threads can observe a multi-byte write half done, so this is for text
//!   no thread runs during the batch (or for a protocol layered on top that
//!   makes partial writes harmless, like the INT3 protocol).
//! * [`Publish::Remap`] ([`LinuxPoke::remapping`]): each page has a second,
//!   spare slot. A batch copies the current page into the spare, writes
//!   there, and [`commit`](TextPoke::commit) maps the spares over the text,
//!   one `mmap` per run of pages. Each page changes atomically for threads
//!   running through it: they see all-old or all-new bytes, so single
//!   instructions can be replaced under running threads with no breakpoint
//!   dance. It costs a 4 KiB copy and an `mmap` per page per batch.
//!
//! Why not the obvious alternatives:
//!
//! * `mprotect(RW)`, write, `mprotect(RX)`: the text is non-executable while
//!   another thread may run it (the SIGBUS frida-gum hit), and under MDWE
//!   the second `mprotect` (gaining exec) is refused.
//! * Copy to anonymous memory and `mremap` over the text: making the copy
//!   executable is refused under MDWE too; a memfd mapped read+exec is not
//!   "gaining" exec, so it is allowed.
//!
//! Other properties:
//!
//! * **W^X**: the text mapping is never writable; the alias is never
//!   executable. The alias is a writable view of code at an address the
//!   kernel chose; [`LinuxPoke::release_aliases`] unmaps it once patching is
//!   over (later batches home pages again).
//! * **fork**: a child maps the same memfd pages. `pthread_atfork` handlers
//!   make both sides drop the arena; each homes pages into a new memfd on its
//!   next batch, so neither ever writes a page the other runs. Aliases are
//!   `MADV_DONTFORK`.
//! * **Checked**: a page is homed only if `/proc/self/maps` shows it
//!   readable and executable and not writable (so JIT RWX memory and data
//!   are refused with [`PokeError::NotText`]).
//! * **Observable**: patched pages show as `/memfd:altpatch-text (deleted)`
//!   in `/proc/self/maps`; profilers that symbolize by file offset lose them.

mod arena;
pub(crate) mod maps;
mod trap;

pub use trap::emulated_traps;

use alloc::vec::Vec;
use core::ops::Range;

use super::{PAGE_SIZE, PokeError, TextPoke, copy_short};
use arena::{Locked, init_process, os_err};
pub(crate) use maps::loaded_object_containing;

/// How a [`LinuxPoke`] publishes a batch (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    /// Stores through the writable alias into the live pages.
    InPlace,
    /// Stages in spare pages and maps them over the text at commit: every
    /// page changes atomically.
    Remap,
    /// Writes in place with the INT3 protocol (see [`live`](crate::poke::live)):
    /// safe while other threads run the sites, three `membarrier`s per
    /// batch. Every edit must replace one instruction (call, jmp, jcc, nop,
    /// ret) by one such instruction.
    Live,
}

/// One run of contiguous pages in the current batch.
struct Run {
    text: Range<usize>,
    /// Index in `targets` of the run's first page.
    first: usize,
}

/// Patches this process's own text without a writable+executable mapping,
/// even under `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`.
///
/// All `LinuxPoke`s in a process share one lock, held from
/// [`begin`](TextPoke::begin) to [`commit`](TextPoke::commit) or
/// [`abort`](TextPoke::abort): concurrent patchers serialize, and `fork`
/// waits for a batch to end. A poke is not `Send`, because the lock must be
/// released by the thread that took it; create one where you patch (it is
/// cheap).
///
/// ```
/// use altpatch::{Edit, Image, LinuxPoke, Plan, patch_point};
///
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
    publish: Publish,
    lock: Option<Locked>,
    runs: Vec<Run>,
    /// Per page of the batch: the alias address writes to it go to.
    targets: Vec<usize>,
    /// Live batches: the writes (checked as live sites), run by the
    /// protocol at commit.
    pending: Vec<(crate::poke::live::LiveSite, crate::plan::Bytes)>,
    last_run: usize,
    remaps: u64,
    maps_checks: u64,
}

impl core::fmt::Debug for LinuxPoke {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinuxPoke")
            .field("publish", &self.publish)
            .field("in_batch", &self.lock.is_some())
            .field("remaps", &self.remaps)
            .finish()
    }
}

impl LinuxPoke {
    /// A poke that writes in place through the alias ([`Publish::InPlace`]).
    /// The first one in a process registers `membarrier(SYNC_CORE)` and the
    /// fork handlers.
    pub fn new() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::with_publish(Publish::InPlace)
    }

    /// A poke that publishes whole pages atomically ([`Publish::Remap`]).
    pub fn remapping() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::with_publish(Publish::Remap)
    }

    /// A poke for text other threads may be running ([`Publish::Live`]).
    pub fn live() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::with_publish(Publish::Live)
    }

    /// A poke with the given publication strategy.
    pub fn with_publish(publish: Publish) -> Result<LinuxPoke, PokeError> {
        init_process();
        Ok(LinuxPoke {
            publish,
            lock: None,
            runs: Vec::new(),
            targets: Vec::new(),
            pending: Vec::new(),
            last_run: 0,
            remaps: 0,
            maps_checks: 0,
        })
    }

    /// The publication strategy.
    pub fn publish(&self) -> Publish {
        self.publish
    }

    /// Whether [`sync`](TextPoke::sync) uses
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`. Otherwise
    /// it forces a TLB shootdown, whose IPIs interrupt (and so serialize)
    /// every CPU running this process.
    pub fn has_membarrier_sync_core() -> bool {
        init_process();
        arena::has_sync_core()
    }

    /// Number of `mmap` publications this poke has made, including homing
    /// (for tests and benchmarks: it grows with pages, not edits).
    pub fn remaps(&self) -> u64 {
        self.remaps
    }

    /// Number of times this poke read `/proc/self/maps` (once per batch that
    /// touches text never patched before).
    pub fn maps_checks(&self) -> u64 {
        self.maps_checks
    }

    /// Unmaps every writable alias of text and forgets the arena, so no
    /// writable view of code remains in the process. Call it when patching
    /// is over (after boot-time patching, say). Patched pages stay as they
    /// are; a later batch homes the pages it touches again.
    pub fn release_aliases() {
        init_process();
        let mut lock = Locked::acquire();
        lock.arena().reset(true);
    }

    /// Offset-resolved alias address for `addr` (and the bytes left in its
    /// page). Writes arrive in address order, so the previous write's run
    /// is tried first.
    #[inline]
    fn target(&mut self, addr: usize) -> Option<(usize, usize)> {
        let hit = |r: &Run| r.text.start <= addr && addr < r.text.end;
        let i = match self.runs.get(self.last_run) {
            Some(r) if hit(r) => self.last_run,
            _ => {
                let i = self.runs.partition_point(|r| r.text.end <= addr);
                if !hit(self.runs.get(i)?) {
                    return None;
                }
                self.last_run = i;
                i
            }
        };
        let r = &self.runs[i];
        let page = (addr - r.text.start) / PAGE_SIZE;
        let within = addr % PAGE_SIZE;
        Some((self.targets[r.first + page] + within, PAGE_SIZE - within))
    }

    fn end_batch(&mut self) {
        self.runs.clear();
        self.targets.clear();
        self.pending.clear();
        self.last_run = 0;
        self.lock = None;
    }

    fn begin_locked(&mut self, lock: &mut Locked, pages: &[Range<usize>]) -> Result<(), PokeError> {
        for r in pages {
            if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 || r.end <= r.start {
                return Err(PokeError::NotText {
                    addr: r.start,
                    why: "batch range is not page-aligned",
                });
            }
        }
        let arena = lock.arena();
        let checks = arena.maps_checks;
        arena.ensure_slots(pages)?;
        self.maps_checks += arena.maps_checks - checks;

        self.runs.clear();
        self.targets.clear();
        for r in pages {
            self.runs.push(Run {
                text: r.clone(),
                first: self.targets.len(),
            });
            if self.publish != Publish::Remap {
                self.home(arena, r.clone())?;
            }
            let mut p = r.start;
            while p < r.end {
                let s = arena.slots(p).expect("slots were just ensured");
                let target = match self.publish {
                    Publish::InPlace | Publish::Live => {
                        s.live_alias().expect("page was just homed")
                    }
                    Publish::Remap => {
                        let (_, spare) = s.spare();
                        // SAFETY: the text page is mapped readable; the
                        // spare slot is ours, mapped by no one executable.
                        unsafe {
                            core::ptr::copy_nonoverlapping(
                                p as *const u8,
                                spare as *mut u8,
                                PAGE_SIZE,
                            )
                        };
                        spare
                    }
                };
                self.targets.push(target);
                p += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// Maps memfd slots holding the current bytes over every page of `r`
    /// that is still its original mapping.
    fn home(&mut self, arena: &mut arena::Arena, r: Range<usize>) -> Result<(), PokeError> {
        let mut p = r.start;
        while p < r.end {
            if arena.slots(p).and_then(|s| s.live_alias()).is_some() {
                p += PAGE_SIZE;
                continue;
            }
            let start = p;
            while p < r.end && arena.slots(p).and_then(|s| s.live_alias()).is_none() {
                let (_, spare) = arena.slots(p).expect("slots were just ensured").spare();
                // SAFETY: the text page is readable; the slot is ours and
                // not mapped executable anywhere yet.
                unsafe {
                    core::ptr::copy_nonoverlapping(p as *const u8, spare as *mut u8, PAGE_SIZE)
                };
                p += PAGE_SIZE;
            }
            self.remaps += arena.publish_spares(start..p)?;
        }
        Ok(())
    }

    /// Stores `bytes` at `addr` through the alias of the batch's pages.
    ///
    /// # Safety
    ///
    /// As for [`TextPoke::write`].
    #[inline]
    unsafe fn store(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        let mut done = 0;
        while done < bytes.len() {
            let at = addr + done;
            let (target, room) = self
                .target(at)
                .ok_or(PokeError::OutsideBatch { addr: at })?;
            let n = room.min(bytes.len() - done);
            // SAFETY: `target` is inside a slot alias page we mapped
            // read+write, with `room` bytes left in it.
            unsafe { copy_short(bytes[done..].as_ptr(), target as *mut u8, n) };
            done += n;
        }
        Ok(())
    }

    /// Runs the INT3 protocol over the batch's writes, with the text lock
    /// held (so neither another patcher nor `fork` comes between phases).
    fn commit_live(&mut self) -> Result<(), PokeError> {
        let sites: Vec<crate::poke::live::LiveSite> =
            self.pending.iter().map(|(s, _)| *s).collect();
        let table = crate::poke::live::LiveSites::new(sites);
        trap::install();
        let pending = core::mem::take(&mut self.pending);
        let writes: Vec<(usize, &[u8])> = pending.iter().map(|(s, b)| (s.addr, &b[..])).collect();
        let result = trap::with_active(&table, || {
            let mut first_error = Ok(());
            // A failed sync does not stop the protocol: finishing it leaves
            // no int3 behind, and the plan restores the old bytes.
            let r = crate::poke::live::run_protocol(&writes, |step| match step {
                // SAFETY: inside the batch's pages (checked in `write`).
                crate::poke::live::Step::Write(addr, bytes) => unsafe { self.store(addr, bytes) },
                crate::poke::live::Step::Sync => {
                    if let Err(e) = Self::sync_now()
                        && first_error.is_ok()
                    {
                        first_error = Err(e);
                    }
                    Ok(())
                }
            });
            r.and(first_error)
        });
        self.lock = None;
        result
    }

    /// `membarrier(SYNC_CORE)`, or the TLB-shootdown fallback.
    fn sync_now() -> Result<(), PokeError> {
        if !arena::has_sync_core() {
            return LinuxPoke::sync_fallback();
        }
        // SAFETY: membarrier only interrupts this process's running threads.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                arena::MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
        if r != 0 {
            return Err(os_err("membarrier"));
        }
        Ok(())
    }

    fn sync_fallback() -> Result<(), PokeError> {
        // Changing a mapping's protection shoots down its TLB entries on
        // every CPU running this mm; the IPI serializes each of them.
        // SAFETY: a private anonymous page we map, flip and unmap.
        unsafe {
            let p = libc::mmap(
                core::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(os_err("mmap"));
            }
            (p as *mut u8).write_volatile(1);
            let r = libc::mprotect(p, PAGE_SIZE, libc::PROT_READ);
            libc::munmap(p, PAGE_SIZE);
            if r != 0 {
                return Err(os_err("mprotect"));
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

// SAFETY: `InPlace` stores through a read+write alias of the very memfd
// page mapped at the text address; `Remap` maps, at commit, a copy of each
// page's current bytes with exactly the batch's writes applied; homing maps
// an identical copy. `sync` serializes every thread of the process
// (membarrier SYNC_CORE, or a TLB shootdown). `abort` publishes nothing
// staged (`Remap`); in-place writes are undone by the plan's rollback.
unsafe impl TextPoke for LinuxPoke {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        if self.lock.is_some() {
            return Err(PokeError::Unsupported("begin while a batch is in progress"));
        }
        let mut lock = Locked::acquire();
        match self.begin_locked(&mut lock, pages) {
            Ok(()) => {
                self.lock = Some(lock);
                Ok(())
            }
            Err(e) => {
                self.runs.clear();
                self.targets.clear();
                Err(e)
            }
        }
    }

    #[inline]
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        if self.lock.is_none() {
            return Err(PokeError::Unsupported("write outside a batch"));
        }
        if self.publish == Publish::Live {
            // Checked now, so a plan the protocol cannot run fails before
            // anything is written.
            // SAFETY: the plan writes only inside its text, which is mapped.
            let old = unsafe { core::slice::from_raw_parts(addr as *const u8, bytes.len()) };
            let site = crate::poke::live::LiveSite::new(addr, old, bytes).map_err(|_| {
                PokeError::Unsupported("live patching needs one emulatable instruction per site")
            })?;
            self.target(addr).ok_or(PokeError::OutsideBatch { addr })?;
            self.pending.push((site, crate::plan::Bytes::new(bytes)));
            return Ok(());
        }
        // SAFETY: forwarded.
        unsafe { self.store(addr, bytes) }
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        if self.publish == Publish::Live && self.lock.is_some() {
            let result = self.commit_live();
            self.end_batch();
            return result;
        }
        let Some(mut lock) = self.lock.take() else {
            return Err(PokeError::Unsupported("commit without a batch"));
        };
        let mut result = Ok(());
        if self.publish == Publish::Remap {
            let arena = lock.arena();
            for r in &self.runs {
                match arena.publish_spares(r.text.clone()) {
                    Ok(n) => self.remaps += n,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        drop(lock);
        self.end_batch();
        result
    }

    fn abort(&mut self) {
        self.end_batch();
    }

    fn sync(&mut self) -> Result<(), PokeError> {
        if self.publish == Publish::Live {
            // The protocol synced after each of its phases.
            return Ok(());
        }
        LinuxPoke::sync_now()
    }
}
