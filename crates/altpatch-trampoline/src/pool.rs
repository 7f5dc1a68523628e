//! The pool: blocks (a read+exec copy of the 16-page table, then its 16
//! read+write data pages), and a lock-free free list of trampolines.
//!
//! Why lock-free: a process may `fork` while another thread allocates, and
//! the child must still be able to allocate (a mutex held at that instant
//! would stay held in the child forever). Every change to the free list is
//! one compare-and-swap on its head, so a child sees the list either before
//! or after each operation, never half-done. Growth needs no lock either:
//! a thread that finds the list empty maps a chunk of its own and pushes all
//! of it (two threads growing at once map a little more than needed).
//!
//! The head is tagged against ABA: it packs a trampoline's index in the
//! pool's address-space reservation (30 bits) with a 34-bit counter bumped
//! by every change, so a pop that read `next` from a trampoline that was
//! meanwhile taken and given back fails its CAS and retries. (With raw
//! addresses only 22 bits would be left for the counter, which a tight
//! alloc/free loop wraps in tens of milliseconds, a plausible preemption;
//! 2^34 changes take minutes.) The reservation is one `PROT_NONE` range
//! (`MAP_NORESERVE`, 4 GiB, smaller where `RLIMIT_AS` refuses)
//! taken just below the object containing this crate, so trampolines are
//! near the entries and handlers they jump to (see `hint` in backing.rs);
//! chunks are carved from its top down.

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use super::backing::Backing;
use super::table::{SPAN, STRIDE, TABLE_PAGES};
use super::{Source, TrampolineError};

/// The index bits of the free-list head (index + 1 of the trampoline in
/// the reservation, 0 for an empty list).
const IDX_BITS: u32 = 30;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Blocks mapped at most per growth (a block is 2048 trampolines).
const MAX_CHUNK: usize = 8;

/// `MADV_POPULATE_WRITE` (Linux 5.14): faults a range in with one call.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Word offsets in a data slot (`STRIDE` bytes, one per trampoline).
const DATA: usize = 0;
const TARGET: usize = 1;
/// Free-list link (a packed address); the trampoline never reads it.
const NEXT: usize = 2;

/// One growth: `blocks` blocks from `base`.
struct Chunk {
    base: usize,
    blocks: usize,
    next: *mut Chunk,
}

impl Chunk {
    fn len(&self) -> usize {
        2 * SPAN * self.blocks
    }
}

/// The state behind [`super::Pool`].
pub(crate) struct PoolState {
    /// The sources to try, in order.
    order: &'static [Source],
    /// The open source, once the first allocation opened it.
    backing: AtomicPtr<Backing>,
    /// Tagged head of the free list.
    free: AtomicU64,
    /// Every chunk, newest first (push-only until the pool is dropped).
    chunks: AtomicPtr<Chunk>,
    /// Blocks mapped.
    blocks: AtomicUsize,
    /// Blocks of the reservation claimed by growers (mapped or failed).
    claimed: AtomicUsize,
    /// Trampolines handed out and not yet freed.
    live: AtomicUsize,
    /// A failed growth could not restore its range to the reservation.
    holed: AtomicBool,
}

/// `code` as a free-list link: its index in the reservation at `base`, + 1.
fn link(base: usize, code: usize) -> u64 {
    ((code - base) / STRIDE) as u64 + 1
}

/// The trampoline a link names (0 for the end of the list).
fn unlink(base: usize, link: u64) -> usize {
    match link & IDX_MASK {
        0 => 0,
        i => base + (i as usize - 1) * STRIDE,
    }
}

/// `head` with `link` in place of its link and its tag bumped.
fn replace(head: u64, link: u64) -> u64 {
    ((head >> IDX_BITS).wrapping_add(1) << IDX_BITS) | link
}

/// Word `w` of the data slot of trampoline `code`.
///
/// The slot is `SPAN` after the trampoline: in the data pages that follow
/// its copy of the table, in a chunk this pool mapped and keeps mapped.
fn slot(code: usize, w: usize) -> &'static AtomicU64 {
    // SAFETY: `code` is a trampoline of a live chunk (callers only pass
    // addresses from the free list or from an allocation), so the slot is
    // mapped read+write, 8-byte aligned, and only ever accessed atomically
    // by Rust (the trampoline's own loads are outside the memory model).
    unsafe { AtomicU64::from_ptr((code + SPAN + 8 * w) as *mut u64) }
}

impl PoolState {
    pub(crate) const fn new(order: &'static [Source]) -> PoolState {
        PoolState {
            order,
            backing: AtomicPtr::new(ptr::null_mut()),
            free: AtomicU64::new(0),
            chunks: AtomicPtr::new(ptr::null_mut()),
            blocks: AtomicUsize::new(0),
            claimed: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            holed: AtomicBool::new(false),
        }
    }

    /// The source in use, opening one if none is yet.
    pub(crate) fn backing(&self) -> Result<&Backing, TrampolineError> {
        let b = self.backing.load(Ordering::Acquire);
        if !b.is_null() {
            // SAFETY: published once below and freed only by `Drop`.
            return Ok(unsafe { &*b });
        }
        let order = match super::env_order() {
            Some(o) if self.order == super::AUTO => o,
            _ => self.order,
        };
        let opened = Backing::open(order);
        let won = self.backing.load(Ordering::Acquire);
        if !won.is_null() {
            // Another thread opened one meanwhile (ours may even have failed
            // only because its reservation held the address space).
            drop(opened);
            // SAFETY: as for `b` above.
            return Ok(unsafe { &*won });
        }
        let new = alloc::boxed::Box::into_raw(alloc::boxed::Box::new(opened?));
        match self.backing.compare_exchange(
            ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: we just published it.
            Ok(_) => Ok(unsafe { &*new }),
            Err(won) => {
                // Another thread opened one first: use it, close ours.
                // SAFETY: `new` came from Box::into_raw and was never shared.
                drop(unsafe { alloc::boxed::Box::from_raw(new) });
                // SAFETY: as for `b` above.
                Ok(unsafe { &*won })
            }
        }
    }

    /// The source in use, if one is open.
    pub(crate) fn source(&self) -> Option<Source> {
        let b = self.backing.load(Ordering::Acquire);
        // SAFETY: published once by `backing` and freed only by `Drop`.
        (!b.is_null()).then(|| unsafe { (*b).source })
    }

    /// A free trampoline whose slot now holds `target` and `data`.
    pub(crate) fn alloc(&self, target: usize, data: usize) -> Result<usize, TrampolineError> {
        let base = self.backing()?.region.0;
        let code = loop {
            if let Some(c) = self.pop(base) {
                break c;
            }
            self.grow()?;
        };
        slot(code, DATA).store(data as u64, Ordering::Relaxed);
        // Release: the slot is complete before the address is handed out
        // (the caller publishes it to other threads however it likes).
        slot(code, TARGET).store(target as u64, Ordering::Release);
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(code)
    }

    /// Points `code`'s slot at new `target` and `data`.
    ///
    /// # Safety
    ///
    /// `code` is a trampoline this pool handed out and not yet freed.
    pub(crate) unsafe fn set(&self, code: usize, target: usize, data: usize) {
        slot(code, DATA).store(data as u64, Ordering::Relaxed);
        slot(code, TARGET).store(target as u64, Ordering::Release);
    }

    /// The data word of `code`'s slot.
    ///
    /// # Safety
    ///
    /// As for [`PoolState::set`].
    pub(crate) unsafe fn data(&self, code: usize) -> usize {
        slot(code, DATA).load(Ordering::Relaxed) as usize
    }

    /// Gives `code` back; `false` (and nothing done) if it is free already.
    ///
    /// # Safety
    ///
    /// `code` is a trampoline of this pool (see [`PoolState::contains`])
    /// that nobody calls any more.
    pub(crate) unsafe fn free(&self, code: usize) -> bool {
        // The swap makes a second free of the same trampoline (from C, or
        // C freeing one a Rust owner frees again) a refusal instead of a
        // cycle in the free list.
        if slot(code, TARGET).swap(freed_target(), Ordering::AcqRel) == freed_target() {
            return false;
        }
        slot(code, DATA).store(0, Ordering::Relaxed);
        self.live.fetch_sub(1, Ordering::Relaxed);
        let b = self.backing.load(Ordering::Acquire);
        // SAFETY: a trampoline exists only once the backing does, which
        // lives as long as the pool.
        let base = unsafe { (*b).region.0 };
        self.push(base, code, code);
        true
    }

    fn pop(&self, base: usize) -> Option<usize> {
        let mut head = self.free.load(Ordering::Acquire);
        loop {
            let code = unlink(base, head);
            if code == 0 {
                return None;
            }
            let next = slot(code, NEXT).load(Ordering::Relaxed);
            match self.free.compare_exchange_weak(
                head,
                replace(head, next),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(code),
                Err(h) => head = h,
            }
        }
    }

    /// Pushes the chain `first ..= last` (already linked through `NEXT`).
    fn push(&self, base: usize, first: usize, last: usize) {
        let mut head = self.free.load(Ordering::Relaxed);
        loop {
            slot(last, NEXT).store(head & IDX_MASK, Ordering::Relaxed);
            match self.free.compare_exchange_weak(
                head,
                replace(head, link(base, first)),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Maps a chunk of blocks and frees all its trampolines.
    fn grow(&self) -> Result<(), TrampolineError> {
        let backing = self.backing()?;
        let (region, region_len) = backing.region;
        // Double the pool each time, up to MAX_CHUNK blocks at once.
        let want = self.blocks.load(Ordering::Relaxed).clamp(1, MAX_CHUNK);
        // Claim blocks of the reservation, from its top down (nearest the
        // code first). Concurrent growers claim disjoint blocks.
        let capacity = region_len / (2 * SPAN);
        let first_block = self.claimed.fetch_add(want, Ordering::Relaxed);
        if first_block >= capacity {
            return Err(TrampolineError::Os {
                call: "mmap (the pool's reservation is full)",
                errno: libc::ENOMEM,
            });
        }
        let blocks = want.min(capacity - first_block);
        let len = 2 * SPAN * blocks;
        let base = region + region_len - 2 * SPAN * (first_block + blocks);
        // The chunk becomes ordinary read+write memory: the data pages stay
        // so, the code pages are replaced by read+exec file mappings.
        // SAFETY: replaces part of our own PROT_NONE reservation that no
        // other grower claimed.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        // Gives the chunk back to the reservation on failure (the claim is
        // not returned: the blocks stay unused).
        let unmap = || {
            // SAFETY: the claimed range, reserved again as PROT_NONE.
            let r = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if r == libc::MAP_FAILED {
                // The range may now be a hole another mapping can take:
                // never unmap the reservation wholesale.
                self.holed.store(true, Ordering::Relaxed);
            }
        };
        if p == libc::MAP_FAILED {
            let errno = crate::os::linux::errno();
            unmap();
            return Err(TrampolineError::Os {
                call: "mmap (trampoline data pages)",
                errno,
            });
        }
        for b in 0..blocks {
            let code = base + 2 * b * SPAN;
            if let Err(e) = backing.map(Some(code as *mut u8)) {
                unmap();
                return Err(e);
            }
            // Fault the data pages in with one call rather than one fault
            // per page below (older kernels refuse it: the faults happen).
            // SAFETY: advice on our own read+write pages.
            unsafe {
                libc::madvise(
                    (code + SPAN) as *mut libc::c_void,
                    SPAN,
                    MADV_POPULATE_WRITE,
                )
            };
        }
        // Link every trampoline of the chunk, in address order, with the
        // freed target so a stray call reports instead of jumping to 0.
        let codes = (0..blocks)
            .flat_map(|b| (0..SPAN / STRIDE).map(move |t| base + 2 * b * SPAN + t * STRIDE));
        let mut prev = 0usize;
        let mut first = 0usize;
        for code in codes {
            slot(code, TARGET).store(freed_target(), Ordering::Relaxed);
            if prev == 0 {
                first = code;
            } else {
                slot(prev, NEXT).store(link(region, code), Ordering::Relaxed);
            }
            prev = code;
        }
        let chunk = alloc::boxed::Box::into_raw(alloc::boxed::Box::new(Chunk {
            base,
            blocks,
            next: ptr::null_mut(),
        }));
        let mut head = self.chunks.load(Ordering::Relaxed);
        loop {
            // SAFETY: `chunk` is ours until the CAS publishes it.
            unsafe { (*chunk).next = head };
            match self.chunks.compare_exchange_weak(
                head,
                chunk,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        self.blocks.fetch_add(blocks, Ordering::Relaxed);
        self.push(region, first, prev);
        Ok(())
    }

    /// Whether `code` is a trampoline of this pool (any state).
    pub(crate) fn contains(&self, code: usize) -> bool {
        let mut c = self.chunks.load(Ordering::Acquire);
        while !c.is_null() {
            // SAFETY: chunks are published complete and freed only by Drop.
            let chunk = unsafe { &*c };
            let off = code.wrapping_sub(chunk.base);
            if off < chunk.len() {
                return off % (2 * SPAN) < SPAN && off % STRIDE == 0;
            }
            c = chunk.next;
        }
        false
    }

    /// (code pages mapped, trampolines in use).
    pub(crate) fn counts(&self) -> (usize, usize) {
        (
            self.blocks.load(Ordering::Relaxed) * TABLE_PAGES,
            self.live.load(Ordering::Relaxed),
        )
    }
}

impl Drop for PoolState {
    fn drop(&mut self) {
        let mut c = *self.chunks.get_mut();
        while !c.is_null() {
            // SAFETY: every chunk was Box-allocated by `grow` and is
            // reachable only from this list.
            let chunk = unsafe { alloc::boxed::Box::from_raw(c) };
            c = chunk.next;
        }
        let b = *self.backing.get_mut();
        if b.is_null() {
            return;
        }
        // SAFETY: published by `backing` from Box::into_raw.
        let mut backing = unsafe { alloc::boxed::Box::from_raw(b) };
        if *self.live.get_mut() != 0 || *self.holed.get_mut() {
            // Leaked trampolines (`Trampoline::leak`, a forgotten
            // `Closure`, C code that never freed) may still be called: keep
            // their pages mapped rather than let a later mapping take the
            // addresses. (And a hole may hold someone else's mapping.)
            backing.keep_region();
        }
    }
}

/// The target of every free trampoline.
fn freed_target() -> u64 {
    called_after_free as *const () as usize as u64
}

/// Where a freed trampoline jumps: a call through a code address after its
/// trampoline was freed (and before it is handed out again) ends the
/// process with a message instead of running whatever the slot last held.
pub(crate) extern "C" fn called_after_free() -> ! {
    crate::abort_with("a trampoline was called after it was freed");
}
