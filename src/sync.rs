//! The one lock every update takes, and what a forked child must repair.
//!
//! Every mechanism that changes text (a static call's target, a key's
//! state, an ifunc's resolution, the IRELATIVE tables) holds an
//! [`UpdateLock`] from the moment it reads its own state until that state
//! matches the text again. What the lock *is* depends on the world:
//!
//! * **`no_std`**: each `UpdateLock` is its own spin flag. A kernel decides
//!   how its CPUs may contend; nothing here can sleep.
//! * **`std` (Linux)**: every `UpdateLock` is the same process-wide lock, the
//!   one [`LinuxPoke`](crate::LinuxPoke) holds from `begin` to `commit`. It
//!   is a futex lock, so waiters sleep, and it is *recursive* for the
//!   thread holding it (an ifunc resolver may flip a static key). One lock
//!   rather than one per object, because:
//!   - **fork**: `pthread_atfork` handlers (registered by `os::linux::fork`)
//!     take it before `fork` and release
//!     it on both sides after, so a child is never born holding a lock whose
//!     owner stayed in the parent, and never sees an update half done (text
//!     rewritten but the object's state not yet recorded). Per-object locks
//!     could not be covered that way without a global lock order.
//!   - **signal handlers**: while a thread holds it, asynchronous signals are
//!     blocked on that thread, so a handler that updates a key cannot run in
//!     the middle of an update on the same thread (it would see the batch's
//!     staging half written). Synchronous signals (faults, `SIGTRAP`) stay
//!     deliverable: the kernel kills a thread that faults with them blocked.
//!   - updates serialize on the text anyway, so a finer lock buys nothing.

use core::marker::PhantomData;
#[cfg(not(all(feature = "std", target_os = "linux")))]
use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering;

/// Serializes the updates of one object (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct UpdateLock {
    #[cfg(not(all(feature = "std", target_os = "linux")))]
    busy: AtomicBool,
}

/// Holds an [`UpdateLock`]; released on drop. Not `Send`: under `std` the
/// lock belongs to the thread that took it.
pub(crate) struct UpdateGuard<'a> {
    #[cfg(not(all(feature = "std", target_os = "linux")))]
    lock: &'a UpdateLock,
    _not_send: PhantomData<(&'a (), *const ())>,
}

impl UpdateLock {
    /// An unlocked lock.
    pub(crate) const fn new() -> UpdateLock {
        UpdateLock {
            #[cfg(not(all(feature = "std", target_os = "linux")))]
            busy: AtomicBool::new(false),
        }
    }

    /// Waits for and takes the lock.
    #[cfg(not(all(feature = "std", target_os = "linux")))]
    pub(crate) fn lock(&self) -> UpdateGuard<'_> {
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        UpdateGuard {
            lock: self,
            _not_send: PhantomData,
        }
    }

    /// Waits for and takes the lock (the process lock: see the module docs).
    #[cfg(all(feature = "std", target_os = "linux"))]
    pub(crate) fn lock(&self) -> UpdateGuard<'_> {
        process::acquire();
        UpdateGuard {
            _not_send: PhantomData,
        }
    }
}

impl Drop for UpdateGuard<'_> {
    fn drop(&mut self) {
        #[cfg(not(all(feature = "std", target_os = "linux")))]
        self.lock.busy.store(false, Ordering::Release);
        #[cfg(all(feature = "std", target_os = "linux"))]
        process::release();
    }
}

/// Incremented in parent and child after every `fork` (`std`): state
/// derived from the address space's sharing (the memfd arena, the
/// `/proc/self/mem` descriptor) compares it to know it must start afresh.
#[cfg(all(feature = "std", target_os = "linux"))]
pub(crate) fn fork_generation() -> u64 {
    process::FORK_GENERATION.load(Ordering::Acquire)
}

#[cfg(all(feature = "std", target_os = "linux"))]
pub(crate) use process::{Held, fork_child_enter, fork_child_leave, fork_parent, fork_prepare};

#[cfg(all(feature = "std", target_os = "linux"))]
mod process {
    use core::cell::{Cell, UnsafeCell};
    use core::marker::PhantomData;
    use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    /// Owner's thread id, with `WAITERS` set when someone sleeps on it; 0
    /// when free. Taking the lock and recording the owner is one CAS, so a
    /// handler interrupting the acquisition never sees a half-taken lock.
    static STATE: AtomicU32 = AtomicU32::new(0);
    const WAITERS: u32 = 1 << 31;
    /// Recursion depth; only the owner touches it.
    static DEPTH: OwnerCell<u32> = OwnerCell(UnsafeCell::new(0));
    /// The owner's signal mask from before it took the lock.
    static SAVED_MASK: OwnerCell<Option<libc::sigset_t>> = OwnerCell(UnsafeCell::new(None));

    pub(super) static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

    struct OwnerCell<T>(UnsafeCell<T>);
    // SAFETY: only the thread whose id is in STATE reads or writes it.
    unsafe impl<T> Sync for OwnerCell<T> {}

    std::thread_local! {
        /// This thread's id, cached (0: not fetched yet). Const-initialized
        /// and without a destructor, so reading it is a plain TLS load,
        /// fine in signal handlers and during thread exit.
        static TID: Cell<u32> = const { Cell::new(0) };
    }

    fn me() -> u32 {
        TID.with(|t| {
            let mut id = t.get();
            if id == 0 {
                // SAFETY: gettid has no preconditions.
                id = unsafe { libc::gettid() } as u32;
                t.set(id);
            }
            id
        })
    }

    fn futex(op: libc::c_int, val: u32) {
        // SAFETY: a futex call on a static word; wait returns at once if
        // the word changed, wake has no memory effect.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                STATE.as_ptr(),
                op | libc::FUTEX_PRIVATE_FLAG,
                val,
                core::ptr::null::<libc::timespec>(),
            )
        };
    }

    /// The asynchronous signals: every signal but those the kernel raises
    /// synchronously for the faulting thread (blocked, they kill it).
    fn async_signals() -> libc::sigset_t {
        // SAFETY: sigset manipulation on a local value.
        unsafe {
            let mut set: libc::sigset_t = core::mem::zeroed();
            libc::sigfillset(&mut set);
            for s in [
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
                libc::SIGTRAP,
                libc::SIGSYS,
            ] {
                libc::sigdelset(&mut set, s);
            }
            set
        }
    }

    pub(super) fn acquire() {
        let me = me();
        if STATE.load(Ordering::Relaxed) & !WAITERS == me {
            // SAFETY: we are the owner.
            unsafe { *DEPTH.0.get() += 1 };
            return;
        }
        // SAFETY: an all-zero sigset_t is a valid (empty) set.
        let mut old: libc::sigset_t = unsafe { core::mem::zeroed() };
        let block = async_signals();
        // SAFETY: changes only this thread's mask; `old` receives the
        // previous one.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old) };
        // After sleeping once, a waiter cannot know whether others still
        // sleep: it takes the lock with the flag set, so its release wakes
        // the next one.
        let mut mine = me;
        loop {
            let s = STATE.load(Ordering::Relaxed);
            if s == 0 {
                if STATE
                    .compare_exchange_weak(0, mine, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
                continue;
            }
            if s & WAITERS == 0
                && STATE
                    .compare_exchange_weak(s, s | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            futex(libc::FUTEX_WAIT, s | WAITERS);
            mine = me | WAITERS;
        }
        // SAFETY: we are the owner now.
        unsafe {
            *DEPTH.0.get() = 1;
            *SAVED_MASK.0.get() = Some(old);
        }
    }

    pub(super) fn release() {
        // SAFETY: only the owner releases (guards are not Send).
        let depth = unsafe { &mut *DEPTH.0.get() };
        debug_assert!(*depth > 0 && STATE.load(Ordering::Relaxed) & !WAITERS == me());
        *depth -= 1;
        if *depth > 0 {
            return;
        }
        // SAFETY: as above; read before the lock is given away.
        let mask = unsafe { (*SAVED_MASK.0.get()).take() };
        if STATE.swap(0, Ordering::Release) & WAITERS != 0 {
            futex(libc::FUTEX_WAKE, 1);
        }
        if let Some(mask) = mask {
            // SAFETY: restores this thread's own mask.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, core::ptr::null_mut()) };
        }
    }

    /// The lock held for a stretch of code that is not a guard's scope (a
    /// poke holds it from `begin` to `commit`). Not `Send`.
    pub(crate) struct Held {
        _not_send: PhantomData<*const ()>,
    }

    impl Held {
        pub(crate) fn acquire() -> Held {
            acquire();
            Held {
                _not_send: PhantomData,
            }
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            release();
        }
    }

    // The fork protocol's three steps. `os::linux::fork` registers them
    // with `pthread_atfork` and runs the other layers' child repairs
    // between `fork_child_enter` and `fork_child_leave`: this module is
    // below those layers and calls none of them.

    /// Before `fork`: take the lock, so no update is half done in the child.
    pub(crate) fn fork_prepare() {
        acquire();
    }

    /// After `fork`, in the parent.
    pub(crate) fn fork_parent() {
        FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
        release();
    }

    /// After `fork`, in the child, before any repair. The child's only
    /// thread is the one that forked; it holds the lock (from
    /// `fork_prepare`), so state other threads of the parent were in the
    /// middle of can be repaired before anyone here can look at it.
    pub(crate) fn fork_child_enter() {
        FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
    }

    /// After `fork`, in the child, once every repair is done.
    pub(crate) fn fork_child_leave() {
        release();
        // The thread has a new id in the child.
        TID.with(|t| t.set(0));
    }
}
