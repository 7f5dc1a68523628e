//! The update lock of a Linux process: one recursive, signal-masking futex
//! lock shared by every copy of the crate linked into an object, and the
//! three steps of its fork protocol.
//!
//! Every altpatch `UpdateLock` of the process is this one lock (the
//! contract's [`Host::lock`](crate::Host::lock) ignores the per-object
//! word). One lock
//! rather than one per object, because:
//!
//! - **fork**: `pthread_atfork` handlers (registered by `os::linux::fork`)
//!   take it before `fork` and release it on both sides after, so a child is
//!   never born holding a lock whose owner stayed in the parent, and never
//!   sees an update half done (text rewritten but the object's state not yet
//!   recorded). Per-object locks could not be covered that way without a
//!   global lock order.
//! - **signal handlers**: while a thread holds it, asynchronous signals are
//!   blocked on that thread, so a handler that updates a key cannot run in
//!   the middle of an update on the same thread (it would see the batch's
//!   staging half written). Synchronous signals (faults, `SIGTRAP`) stay
//!   deliverable: the kernel kills a thread that faults with them blocked.
//!   It is *recursive* for the thread holding it (an ifunc resolver may flip
//!   a static key), and a futex lock, so waiters sleep.
//! - updates serialize on the text anyway, so a finer lock buys nothing.
//! - **two copies of the crate** in one program (two libraries on
//!   incompatible versions: see altpatch's `records`) patch the same
//!   pages. Each patches only its own records, but a page swap rebuilds
//!   whole pages, so two copies updating at once would lose one another's
//!   bytes. The lock therefore lives in a symbol every copy linked into an
//!   object shares, `altpatch_shared_v1` (weak, hidden, in a COMDAT group:
//!   the linker keeps one): [`Rendezvous`], whose layout and lock protocol
//!   are frozen for version 1 of that symbol. A copy that needs another
//!   layout must use another name (and then shares nothing with v1 copies).
//!   It also anchors the list of copies (`os::linux::peers`), through which
//!   a page swap carries the other copies' patches.

use core::cell::{Cell, UnsafeCell};
use core::ffi::c_void;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// What every copy of the crate linked into one object shares (the
/// symbol `altpatch_shared_v1`, see the module docs). Version 1: this
/// layout (152 bytes, zero-initialized) and the lock protocol of
/// `acquire`/`release` are frozen.
#[repr(C)]
struct Rendezvous {
    /// Owner's thread id, with `WAITERS` set when someone sleeps on
    /// it; 0 when free. Taking the lock and recording the owner is one
    /// CAS, so a handler interrupting the acquisition never sees a
    /// half-taken lock.
    state: AtomicU32,
    /// Recursion depth; only the owner touches it.
    depth: UnsafeCell<u32>,
    /// 1 when `mask` holds the owner's signal mask from before it took
    /// the lock; only the owner touches it.
    masked: UnsafeCell<u32>,
    /// Bumped in a forked child before anything else: a thread id any
    /// copy cached before it is stale (the child's thread has a new
    /// one).
    forks: AtomicU32,
    /// That mask.
    mask: UnsafeCell<libc::sigset_t>,
    /// The copies of the crate linked into the object: a list of
    /// `os::linux::peers` nodes, pushed to and never popped.
    peers: AtomicPtr<c_void>,
}

/// Set in [`Rendezvous::state`] while someone sleeps on the lock.
const WAITERS: u32 = 1 << 31;

const _: () = assert!(core::mem::size_of::<Rendezvous>() == 152);
const _: () = assert!(core::mem::align_of::<Rendezvous>() == 8);

// One definition per copy, all weak, hidden and in one COMDAT group:
// the linker keeps one, and every copy's references bind to it.
core::arch::global_asm!(
    ".pushsection .bss.altpatch_shared_v1,\"awG\",@nobits,altpatch_shared_v1,comdat",
    ".weak altpatch_shared_v1",
    ".hidden altpatch_shared_v1",
    ".type altpatch_shared_v1,@object",
    ".balign 64",
    "altpatch_shared_v1:",
    ".zero {size}",
    ".size altpatch_shared_v1, {size}",
    ".popsection",
    size = const core::mem::size_of::<Rendezvous>(),
);

unsafe extern "C" {
    #[link_name = "altpatch_shared_v1"]
    static SHARED: Rendezvous;
}

fn shared() -> &'static Rendezvous {
    // SAFETY: the symbol is the zero-initialized `Rendezvous` above
    // (or another copy's identical one), alive for the object's life;
    // all-zero is a valid value of every field; its cells are only
    // touched by the lock's owner.
    unsafe { &SHARED }
}

/// The head of the list of copies linked into this object (see altpatch's
/// `os::linux::peers`).
///
/// # Safety
///
/// Every copy of altpatch dereferences what the list holds: callers store
/// only pointers to altpatch's own `Peer` nodes (of the layout that module
/// freezes), which live as long as the object, and never remove one.
pub unsafe fn peers() -> &'static AtomicPtr<c_void> {
    &shared().peers
}

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

std::thread_local! {
    /// This thread's id, cached with the [`Rendezvous::forks`] count it
    /// was read under (0: not fetched yet). Const-initialized and
    /// without a destructor, so reading it is a plain TLS load, fine in
    /// signal handlers and during thread exit.
    static TID: Cell<u64> = const { Cell::new(0) };
}

fn me() -> u32 {
    let forks = shared().forks.load(Ordering::Relaxed);
    TID.with(|t| {
        let c = t.get();
        if c != 0 && (c >> 32) as u32 == forks {
            return c as u32;
        }
        // SAFETY: gettid has no preconditions.
        let id = unsafe { libc::gettid() } as u32;
        t.set(u64::from(forks) << 32 | u64::from(id));
        id
    })
}

fn futex(op: libc::c_int, val: u32) {
    // SAFETY: a futex call on a static word; wait returns at once if
    // the word changed, wake has no memory effect.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            shared().state.as_ptr(),
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

/// Waits for and takes the process's update lock (recursive for the thread
/// holding it; asynchronous signals blocked on this thread while held).
pub fn acquire() {
    let me = me();
    let r = shared();
    if r.state.load(Ordering::Relaxed) & !WAITERS == me {
        // SAFETY: we are the owner.
        unsafe { *r.depth.get() += 1 };
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
        let s = r.state.load(Ordering::Relaxed);
        if s == 0 {
            if r.state
                .compare_exchange_weak(0, mine, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                break;
            }
            continue;
        }
        if s & WAITERS == 0
            && r.state
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
        *r.depth.get() = 1;
        *r.mask.get() = old;
        *r.masked.get() = 1;
    }
}

/// Releases the lock once (the last release of a recursive hold gives it
/// away and restores the signal mask saved by the first acquisition).
///
/// # Safety
///
/// The calling thread holds the lock (an [`acquire`] on this thread not yet
/// released): its recursion depth and saved mask are owner-only cells.
pub unsafe fn release() {
    let r = shared();
    // SAFETY: only the owner releases (guards are not Send).
    let depth = unsafe { &mut *r.depth.get() };
    debug_assert!(*depth > 0 && r.state.load(Ordering::Relaxed) & !WAITERS == me());
    *depth -= 1;
    if *depth > 0 {
        return;
    }
    // SAFETY: as above (the owner's cells); read before the lock is
    // given away.
    let mask = unsafe {
        let saved = core::mem::replace(&mut *r.masked.get(), 0) == 1;
        saved.then(|| *r.mask.get())
    };
    if r.state.swap(0, Ordering::Release) & WAITERS != 0 {
        futex(libc::FUTEX_WAKE, 1);
    }
    if let Some(mask) = mask {
        // SAFETY: restores this thread's own mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, core::ptr::null_mut()) };
    }
}

// The fork protocol's three steps. `os::linux::fork` registers them
// with `pthread_atfork` and runs the other layers' child repairs
// between `fork_child_enter` and `fork_child_leave`: this module is
// below those layers and calls none of them.

/// Before `fork`: take the lock, so no update is half done in the child.
pub fn fork_prepare() {
    acquire();
}

/// After `fork`, in the parent.
///
/// # Safety
///
/// This thread ran [`fork_prepare`] before the `fork` (a `pthread_atfork`
/// parent handler).
pub unsafe fn fork_parent() {
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
    // SAFETY: the caller's: `fork_prepare` took the lock on this thread.
    unsafe { release() };
}

/// After `fork`, in the child, before any repair. The child's only
/// thread is the one that forked; it holds the lock (from
/// `fork_prepare`), so state other threads of the parent were in the
/// middle of can be repaired before anyone here can look at it. The
/// thread has a new id here: the lock is made its own, and every
/// copy's cached id stale, before any copy's handler looks (each copy
/// linked in runs these steps; doing it twice changes nothing).
///
/// # Safety
///
/// Only in the child of a `fork` whose parent thread ran [`fork_prepare`]
/// (a `pthread_atfork` child handler): it makes the lock this thread's.
pub unsafe fn fork_child_enter() {
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
    let r = shared();
    r.forks.fetch_add(1, Ordering::AcqRel);
    // No other thread exists to wait: the owner alone, no waiter flag.
    r.state.store(me(), Ordering::Relaxed);
}

/// After `fork`, in the child, once every repair is done.
///
/// # Safety
///
/// After [`fork_child_enter`] on this thread.
pub unsafe fn fork_child_leave() {
    // SAFETY: the caller's: `fork_child_enter` made the lock this thread's.
    unsafe { release() };
}

/// Incremented in parent and child after every `fork`: state derived from
/// the address space's sharing (the memfd arena, the `/proc/self/mem`
/// descriptor) compares it to know it must start afresh.
pub fn fork_generation() -> u64 {
    FORK_GENERATION.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(sig: libc::c_int) -> bool {
        // SAFETY: reads this thread's mask into a local set.
        unsafe {
            let mut set: libc::sigset_t = core::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, core::ptr::null(), &mut set);
            libc::sigismember(&set, sig) == 1
        }
    }

    /// Recursive for the holder; asynchronous signals blocked while held
    /// (synchronous ones not), the mask restored by the last release.
    #[test]
    fn recursive_and_masking() {
        assert!(!blocked(libc::SIGUSR1));
        acquire();
        assert!(blocked(libc::SIGUSR1) && !blocked(libc::SIGTRAP) && !blocked(libc::SIGSEGV));
        acquire();
        // SAFETY: held twice by this thread.
        unsafe { release() };
        assert!(blocked(libc::SIGUSR1), "still held once");
        // SAFETY: held once by this thread.
        unsafe { release() };
        assert!(!blocked(libc::SIGUSR1));
    }

    /// Another thread waits (sleeps on the futex) until the holder
    /// releases.
    #[test]
    fn excludes_other_threads() {
        use std::sync::atomic::AtomicBool;
        static INSIDE: AtomicBool = AtomicBool::new(false);
        acquire();
        INSIDE.store(true, Ordering::SeqCst);
        let t = std::thread::spawn(|| {
            acquire();
            let saw = INSIDE.load(Ordering::SeqCst);
            // SAFETY: taken just above on this thread.
            unsafe { release() };
            saw
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        INSIDE.store(false, Ordering::SeqCst);
        // SAFETY: taken above on this thread.
        unsafe { release() };
        assert!(!t.join().unwrap(), "the other thread got in while held");
    }
}
