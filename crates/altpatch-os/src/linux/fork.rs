//! `fork`: the handlers that keep the update lock and every layer's
//! process state consistent across it.
//!
//! They live here, at the top of the layers that hold such state, because
//! the child handler must repair each of them (the published feature
//! snapshot, the trap table) while the update lock is still held: the lock
//! module itself is below them all and calls none of them.

use super::host;

extern "C" fn prepare() {
    host::fork_prepare();
}

extern "C" fn parent() {
    // SAFETY: registered as the parent handler with `prepare`, which took
    // the lock on this thread before the fork.
    unsafe { host::fork_parent() };
}

extern "C" fn child() {
    // SAFETY: registered as the child handler with `prepare`: this is the
    // child of a fork whose parent thread took the lock.
    unsafe { host::fork_child_enter() };
    // The child's only thread is the one that forked, and it holds the
    // lock (from `prepare`): what other threads of the parent were in the
    // middle of is repaired before anyone here can look at it. The order
    // among the repairs does not matter (they share no state); releasing
    // the lock must come after all of them.
    // SAFETY: this is the forked child's only thread (above).
    unsafe { crate::cpu::after_fork_in_child() };
    super::trap::after_fork_in_child();
    // SAFETY: after `fork_child_enter` on this thread, above.
    unsafe { host::fork_child_leave() };
}

/// Registers the fork handlers at load time (`.init_array`), before any
/// thread of the program can fork, and without a lazy `Once` that a signal
/// handler could be the first to reach.
extern "C" fn register() {
    // SAFETY: the handlers are plain functions of this object; glibc
    // unregisters them if the object is unloaded.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    // Other copies of the crate linked in learn of this one before it can
    // patch anything (see `peers.rs`).
    super::peers::register();
}

#[used]
#[unsafe(link_section = ".init_array")]
static REGISTER: extern "C" fn() = register;

/// Names `REGISTER` from the code every update runs (`LinuxPoke`'s
/// constructor), so the object file holding it is in every link that
/// patches: a static library's object nothing references can be left out,
/// and with it the `.init_array` entry (rust-lang/rust#99721).
pub(super) fn keep_linked() {
    core::hint::black_box(&REGISTER);
    super::peers::register();
}
