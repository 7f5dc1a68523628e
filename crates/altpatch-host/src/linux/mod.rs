//! Linux's implementation of [`Host`]: the process lock (`lock.rs`), the
//! environment (`environ.rs`), and what the kernel publishes in `/proc` and
//! `/sys`; and the ways a process writes its text (`strategy.rs`). Items
//! here that are not re-exported at the crate root are altpatch's Linux
//! backend's own (its fork handlers, its list of copies), not an API.

mod environ;
mod loader;
mod lock;
mod strategy;

pub use lock::{
    fork_child_enter, fork_child_leave, fork_generation, fork_parent, fork_prepare, peers,
};
pub use strategy::{Refusal, Strategy};

use alloc::string::String;

use crate::{Host, LoadedObject};

/// A Linux process, to altpatch's bottom layers.
pub struct Linux;

impl Host for Linux {
    /// Every update lock is the process's one lock: no per-object word.
    type LockWord = ();
    const UNLOCKED: () = ();

    #[inline]
    fn lock(_: &()) {
        lock::acquire();
    }

    #[inline]
    unsafe fn unlock(_: &()) {
        // SAFETY: the caller's: this thread holds the lock.
        unsafe { lock::release() };
    }

    fn with_env<R>(name: &core::ffi::CStr, f: impl FnOnce(Option<&[u8]>) -> R) -> Option<R> {
        environ::with_env(name, f)
    }

    fn read_environment(feed: impl FnMut(&[u8]) -> bool) -> bool {
        environ::read_initial(feed)
    }

    // Linux sets DE_CFG[1] ("LFENCE is dispatch serializing") at boot on
    // every AMD family from 10h on (arch/x86/kernel/cpu/amd.c).
    const AMD_LFENCE_SERIALIZING: bool = true;

    fn vulnerability(name: &str) -> Option<String> {
        let path = std::format!("/sys/devices/system/cpu/vulnerabilities/{name}");
        std::fs::read_to_string(path).ok()
    }

    fn cpu_info() -> Option<String> {
        std::fs::read_to_string("/proc/cpuinfo").ok()
    }

    fn loaded_object(addr: usize) -> Option<LoadedObject> {
        loader::loaded_object_containing(addr)
    }
}
