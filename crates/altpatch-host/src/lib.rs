//! The OS contract's lower half for [altpatch](https://docs.rs/altpatch):
//! what its bottom layers (the update lock, the CPU snapshot's overrides,
//! the retpoline policy's inputs) need from the system they run on: the
//! contract and its implementations.
//!
//! A crate of its own so that the compiler, not a test, keeps it below
//! everything else: it depends on nothing of altpatch (and on `libc` only
//! with `std`). It is altpatch's internal seam, not an API of its own:
//! altpatch re-exports what users see (`altpatch::Strategy`,
//! `altpatch::Refusal`), and the rest may change with any altpatch release.
//!
//! * [`Host`]: the contract (the update lock, the environment, what the
//!   kernel publishes about the CPUs);
//! * [`Freestanding`]: no OS (a kernel, a bootloader): a spin flag per
//!   lock, no environment, no verdict;
//! * `linux` (`std`): a Linux process — one futex lock shared by every
//!   copy of altpatch in the object, `environ` and `/proc/self/environ`,
//!   sysfs, the object the dynamic loader mapped at an address — and the
//!   ways it writes text ([`Strategy`], [`Refusal`]);
//! * which one a build uses is altpatch's choice (`altpatch-core`'s
//!   `host.rs`, by the core's own `std` feature). This crate, that file and
//!   `altpatch-os`'s `lib.rs` are the only places that ask which OS the
//!   build is for.
//!
//! The contract's upper half (text writing and its publication, trap
//! delivery, fork repair, the loader's generation) is `altpatch-os`'s: its
//! `TextPoke`, `TrapTable` and `SIGTRAP` handler need altpatch's plans and
//! images.

#![no_std]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(all(feature = "std", target_os = "linux"))]
#[doc(hidden)]
pub mod linux;

#[cfg(all(feature = "std", not(target_os = "linux")))]
compile_error!(
    "altpatch's `std` feature (a process patching itself) has an OS backend for target_os = \"linux\" only; \
     on another OS build with `default-features = false` (the freestanding API: your own Image and TextPoke)"
);

/// The ways this build's backend writes text, and why one was refused
/// (what altpatch's `PokeError::NoStrategy` lists).
#[cfg(all(feature = "std", target_os = "linux"))]
pub use linux::{Refusal, Strategy};

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, Ordering};

/// An error number as altpatch's messages show it: "no effect" for 0, the
/// system's text with `std`, else the number.
#[doc(hidden)]
pub fn write_errno(f: &mut fmt::Formatter<'_>, errno: i32) -> fmt::Result {
    if errno == 0 {
        return f.write_str("no effect");
    }
    #[cfg(feature = "std")]
    {
        write!(f, "{}", std::io::Error::from_raw_os_error(errno))
    }
    #[cfg(not(feature = "std"))]
    {
        write!(f, "errno {errno}")
    }
}

/// What a system provides to altpatch's bottom layers. Every item is an
/// associated function or constant: the build's one implementation is
/// chosen by altpatch at build time (the core's `host.rs`, by *its* `std`
/// feature, so that a copy of altpatch without `std` in a program whose
/// other copy enabled this crate's `std` still gets `Freestanding`) and
/// called without indirection (a lock taken per update, a string read once
/// per process).
pub trait Host {
    /// What each of altpatch's update locks holds: its own
    /// spin flag, or nothing where one lock serves the whole process.
    type LockWord: Sync + core::fmt::Debug;
    /// A free lock word.
    const UNLOCKED: Self::LockWord;
    /// Waits for and takes the update lock `word` belongs to.
    fn lock(word: &Self::LockWord);
    /// Releases what [`lock`](Host::lock) took.
    ///
    /// # Safety
    ///
    /// The calling thread took this lock with `lock(word)` and has not
    /// released that acquisition yet.
    unsafe fn unlock(word: &Self::LockWord);

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
    fn vulnerability(name: &str) -> Option<String>;
    /// The kernel's description of the CPUs (Linux: `/proc/cpuinfo`), if it
    /// publishes one.
    fn cpu_info() -> Option<String>;
    /// The loaded object (the executable or a shared object) one of whose
    /// segments holds `addr`, as the system's dynamic loader reports it
    /// (Linux: `dl_iterate_phdr`); `None` where there is no loader (a
    /// kernel describes its images from its linker script). What the core's
    /// `Image::current` and `Image::from_loaded` are built from, so an
    /// implementation promises what a loader knows: every range it returns
    /// is mapped as that object's segment while the object stays loaded.
    fn loaded_object(addr: usize) -> Option<LoadedObject>;
}

/// No OS: a kernel, a bootloader. The lock is a spin flag per object, and
/// there is no environment and no verdict (a kernel passes its command
/// line and its own decisions explicitly).
pub struct Freestanding;

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
    unsafe fn unlock(busy: &AtomicBool) {
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

    fn loaded_object(_: usize) -> Option<LoadedObject> {
        None
    }
}

/// A loaded object (the executable or a shared object) and its segments,
/// as a dynamic loader reports them ([`Host::loaded_object`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadedObject {
    /// Path as the loader knows it (empty for the main program).
    pub name: String,
    /// The load bias: run-time address minus link-time address.
    pub bias: usize,
    /// Every loaded segment (`PT_LOAD`), at its run-time addresses.
    pub loads: Vec<Range<usize>>,
    /// The file offset (`p_offset`) of each segment of `loads`.
    pub load_offsets: Vec<u64>,
    /// The executable segments among them.
    pub text: Vec<Range<usize>>,
}
