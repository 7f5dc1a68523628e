//! The OS contract's lower half: what the layers below the OS backends
//! (the update lock, the CPU snapshot, the retpoline policy's inputs) need
//! from the system they run on, and which implementation this build uses.
//!
//! Each OS backend implements [`Host`] in its own `host` folder, with
//! nothing above the bottom layers (`os/linux/host/`: a futex, `environ`,
//! `/proc` and `/sys`); a build without `std` uses [`Freestanding`].
//! `os/current.rs` picks one: its `target_os` tests and `os/mod.rs`'s are
//! the crate's only ones (`tests/layers.rs` checks it).
//!
//! The upper half — images and loader events, text-writing strategies and
//! their publication, trap delivery, fork repair — is what a backend's
//! [`TextPoke`](crate::TextPoke) and loader provide (`os/mod.rs` lists it);
//! a kernel provides its own ([`DirectPoke`](crate::DirectPoke) or
//! [`Int3Poke`](crate::poke::live::Int3Poke) over its
//! [`TrapTable`](crate::poke::live::TrapTable), an [`Image`](crate::Image)
//! from its linker script).

use alloc::string::String;
use core::sync::atomic::{AtomicBool, Ordering};

/// What a system provides to the bottom layers. Every item is an
/// associated function or constant: the build's one implementation is
/// `os::current::Current`, called without indirection (a lock taken per update, a
/// string read once per process).
pub(crate) trait Host {
    /// What each [`UpdateLock`](crate::sync::UpdateLock) holds: its own
    /// spin flag, or nothing where one lock serves the whole process.
    type LockWord: Sync + core::fmt::Debug;
    /// A free lock word.
    const UNLOCKED: Self::LockWord;
    /// Waits for and takes the update lock `word` belongs to.
    fn lock(word: &Self::LockWord);
    /// Releases what [`lock`](Host::lock) took, on the same thread.
    fn unlock(word: &Self::LockWord);

    /// Calls `f` with the value of the environment variable `name` (`None`
    /// if unset) once the C runtime has set the environment up; `None`
    /// before that (a resolver running inside the dynamic loader).
    fn with_env<R>(name: &core::ffi::CStr, f: impl FnOnce(Option<&[u8]>) -> R) -> Option<R>;
    /// Feeds the environment the process started with, as NUL-separated
    /// `NAME=value` entries in chunks of any size, until `feed` returns
    /// true; readable before the C runtime has set it up, without
    /// allocating. False if it cannot be read.
    fn read_environment(feed: impl FnMut(&[u8]) -> bool) -> bool;

    /// Whether the kernel makes `LFENCE` dispatch-serializing on every AMD
    /// CPU from family 10h on (Linux sets `DE_CFG[1]` at boot), so code it
    /// runs may rely on it where CPUID does not say so.
    const AMD_LFENCE_SERIALIZING: bool;
    /// The kernel's one-line verdict on the CPU vulnerability `name`
    /// (`"spectre_v2"`), if it publishes one. (Read by
    /// `retpoline::KernelView::read`, a process's API: a kernel knows its
    /// own verdict.)
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    fn vulnerability(name: &str) -> Option<String>;
    /// The kernel's description of the CPUs (Linux: `/proc/cpuinfo`), if it
    /// publishes one.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    fn cpu_info() -> Option<String>;
}

/// No OS: a kernel, a bootloader. The lock is a spin flag per object, and
/// there is no environment and no verdict (a kernel passes its command
/// line and its own decisions explicitly).
#[cfg_attr(feature = "std", allow(dead_code))]
pub(crate) struct Freestanding;

impl Host for Freestanding {
    type LockWord = AtomicBool;
    #[allow(clippy::declare_interior_mutable_const)] // a fresh flag per lock, by design
    const UNLOCKED: AtomicBool = AtomicBool::new(false);

    #[inline]
    fn lock(busy: &AtomicBool) {
        while busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
    }

    #[inline]
    fn unlock(busy: &AtomicBool) {
        busy.store(false, Ordering::Release);
    }

    fn with_env<R>(_: &core::ffi::CStr, _: impl FnOnce(Option<&[u8]>) -> R) -> Option<R> {
        None
    }

    fn read_environment(_: impl FnMut(&[u8]) -> bool) -> bool {
        false
    }

    const AMD_LFENCE_SERIALIZING: bool = false;

    fn vulnerability(_: &str) -> Option<String> {
        None
    }

    fn cpu_info() -> Option<String> {
        None
    }
}
