//! The one lock every update takes, and what a forked child must repair.
//!
//! Every mechanism that changes text (a static call's target, a key's
//! state, an ifunc's resolution, the IRELATIVE tables) holds an
//! [`UpdateLock`] from the moment it reads its own state until that state
//! matches the text again. What the lock *is* is the OS contract's
//! (`host::Host::lock`):
//!
//! * **freestanding** (`no_std`): each `UpdateLock` is its own spin flag. A
//!   kernel decides how its CPUs may contend; nothing here can sleep.
//! * **a Linux process** (`std`): every `UpdateLock` is the same
//!   process-wide lock, the one `altpatch::os::linux::LinuxPoke` holds from
//!   `begin` to `commit`: recursive, signal-masking, held across `fork` and
//!   shared by every copy of the crate in the object (why, in
//!   `crates/altpatch-host/src/linux/lock.rs`).

use core::marker::PhantomData;

use crate::host::Current;
use crate::host::Host;

/// Serializes the updates of one object (see the [module docs](self)).
#[derive(Debug)]
#[doc(hidden)]
pub struct UpdateLock {
    /// The host's per-object word: a spin flag when freestanding, nothing
    /// in a Linux process (whose one lock is process-wide).
    word: <Current as Host>::LockWord,
}

/// Holds an [`UpdateLock`]; released on drop. Not `Send`: in a process the
/// lock belongs to the thread that took it.
#[doc(hidden)]
pub struct UpdateGuard<'a> {
    lock: &'a UpdateLock,
    _not_send: PhantomData<*const ()>,
}

impl UpdateLock {
    /// An unlocked lock.
    #[doc(hidden)]
    pub const fn new() -> UpdateLock {
        UpdateLock {
            word: <Current as Host>::UNLOCKED,
        }
    }

    /// Waits for and takes the lock.
    #[inline]
    #[doc(hidden)]
    pub fn lock(&self) -> UpdateGuard<'_> {
        Current::lock(&self.word);
        UpdateGuard {
            lock: self,
            _not_send: PhantomData,
        }
    }
}

impl Drop for UpdateGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: a guard is made only by `lock` on this lock, is not
        // `Send` (so this is the thread that took it) and drops once.
        unsafe { Current::unlock(&self.lock.word) };
    }
}

/// The update lock held for a stretch of code that is not one object's
/// update (a poke holds it from `begin` to `commit`; a memo cell is filled
/// under it, so a forked child never inherits a half-done initialization).
/// In a process every `UpdateLock` is the one process lock, so this is it.
/// Not `Send`.
#[cfg(feature = "std")]
#[doc(hidden)]
pub struct Held(#[allow(dead_code)] UpdateGuard<'static>);

#[cfg(feature = "std")]
impl Held {
    #[doc(hidden)]
    pub fn acquire() -> Held {
        static PROCESS: UpdateLock = UpdateLock::new();
        Held(PROCESS.lock())
    }
}

/// Work done once per object by whoever claims it first (the first of the
/// constructors every `ifunc!` or `alternative!` registers), and what it
/// did, for anyone to read afterwards.
#[cfg(feature = "std")]
#[doc(hidden)]
pub struct ClaimedOnce<T> {
    claimed: core::sync::atomic::AtomicBool,
    outcome: std::sync::OnceLock<T>,
}

#[cfg(feature = "std")]
impl<T> ClaimedOnce<T> {
    #[doc(hidden)]
    pub const fn new() -> Self {
        ClaimedOnce {
            claimed: core::sync::atomic::AtomicBool::new(false),
            outcome: std::sync::OnceLock::new(),
        }
    }

    /// True for the first caller only: the one that does the work.
    #[doc(hidden)]
    pub fn claim(&self) -> bool {
        !self
            .claimed
            .swap(true, core::sync::atomic::Ordering::AcqRel)
    }

    /// Records what the work did (once; later records are dropped).
    #[doc(hidden)]
    pub fn finish(&self, outcome: T) {
        let _ = self.outcome.set(outcome);
    }

    /// What the work did, once it finished.
    #[doc(hidden)]
    pub fn get(&self) -> Option<&T> {
        self.outcome.get()
    }
}
