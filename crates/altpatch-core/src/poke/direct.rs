//! Freestanding poke: store directly into writable text, then make this
//! CPU execute it (the arch's `sync_core`).

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{Ordering, compiler_fence};

use super::{PokeError, TextPoke};
pub use crate::arch::SyncMethod;
use crate::arch::sync_core;
use crate::cpu::Features;

/// Writes directly to text that is writable at its own address, then
/// serializes the calling CPU.
///
/// For early boot (before text is write-protected), a kernel that maps its
/// text writable, or memory that is not executed at all (tests). Only the
/// calling CPU is serialized: on a multiprocessor system, either patch before
/// other CPUs start, or implement [`TextPoke`] yourself with an IPI in `sync`.
///
/// Writes are in place, so a failed batch is undone by the plan's rollback
/// writes, not by [`abort`](TextPoke::abort).
///
/// ```
/// use altpatch::{DirectPoke, Edit, Plan, cpu::Features};
///
/// // "Text" that is only data here, so plain memory is fine.
/// let mut text = vec![0xb8u8, 1, 0, 0, 0, 0xc3];
/// let base = text.as_mut_ptr() as usize;
/// // SAFETY: `text` is readable for the whole plan's use.
/// let mut plan = unsafe { Plan::with_text(base..base + text.len()) };
/// plan.push(Edit::replace(base, &[0xb8, 1, 0, 0, 0], &[0xb8, 2, 0, 0, 0]));
/// // SAFETY: `text` is writable and nothing executes it.
/// let mut poke = unsafe { DirectPoke::for_features(&Features::detect()) };
/// // SAFETY: as above.
/// unsafe { plan.apply(&mut poke) }.unwrap();
/// assert_eq!(text[1], 2);
/// ```
#[derive(Debug)]
pub struct DirectPoke {
    sync: SyncMethod,
    pages: Vec<Range<usize>>,
    /// The page run the last write fell in.
    hit: usize,
}

impl DirectPoke {
    /// A poke using `sync` after each batch.
    ///
    /// ```
    /// use altpatch::{DirectPoke, SyncMethod, TextPoke};
    ///
    /// // A kernel whose text is mapped writable, before other CPUs run
    /// // (with them running, wrap it in `poke::live::Int3Poke`).
    /// // SAFETY: every plan applied through it writes writable memory.
    /// let poke = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
    /// assert_eq!(poke.sync_method(), SyncMethod::Cpuid);
    /// assert!(poke.reads_in_place());
    /// ```
    ///
    /// # Safety
    ///
    /// Every text address a plan applied through this poke writes must be
    /// writable memory at that address, and no other CPU may execute the
    /// changed bytes until the caller has made it serialize.
    /// `sync` must be a method this CPU supports (see
    /// [`SyncMethod::for_features`]; on x86-64, `Serialize` only where
    /// CPUID.7.0:EDX\[14\] says so).
    pub unsafe fn new(sync: SyncMethod) -> DirectPoke {
        DirectPoke {
            sync,
            pages: Vec::new(),
            hit: 0,
        }
    }

    /// A poke using the fastest [`SyncMethod`] `features` allow (on x86-64
    /// `serialize` where the CPU has it, else `cpuid`).
    ///
    /// # Safety
    ///
    /// As for [`DirectPoke::new`].
    pub unsafe fn for_features(features: &Features) -> DirectPoke {
        // SAFETY: forwarded to our caller.
        unsafe { DirectPoke::new(SyncMethod::for_features(features)) }
    }

    /// The serialization method in use.
    pub fn sync_method(&self) -> SyncMethod {
        self.sync
    }
}

// SAFETY: writes go to the addressed bytes themselves (writable by the
// constructor's contract); `sync` serializes this CPU, and the constructor's
// contract puts other CPUs on the caller.
unsafe impl TextPoke for DirectPoke {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        self.hit = 0;
        self.pages.clear();
        self.pages.extend_from_slice(pages);
        Ok(())
    }

    #[inline]
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        if !super::in_ranges(&self.pages, &mut self.hit, addr, addr + bytes.len()) {
            return Err(PokeError::OutsideBatch { addr });
        }
        // SAFETY: the caller guarantees the range is inside the batch's
        // pages, and the constructor's contract makes them writable.
        unsafe { super::copy_short(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        compiler_fence(Ordering::SeqCst);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        Ok(())
    }

    fn abort(&mut self) {}

    fn sync(&mut self) -> Result<(), PokeError> {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: `new`'s caller (or `for_features`) chose a method this
        // CPU supports; the pages are the batch's, just written.
        unsafe { sync_core(self.sync, &self.pages) };
        Ok(())
    }
}
