//! Small system-call helpers: errors, and making every thread observe new
//! text (`membarrier`).

use std::sync::Once;

use core::sync::atomic::{AtomicBool, Ordering};

use crate::poke::{PAGE_SIZE, PokeError};

pub(super) const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// Whether `membarrier(SYNC_CORE)` is registered for this process.
static SYNC_CORE: AtomicBool = AtomicBool::new(false);
static REGISTER: Once = Once::new();

#[doc(hidden)]
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A new memfd called `name` that may be mapped executable (`MFD_EXEC`,
/// Linux 6.3, so `vm.memfd_noexec=1` does not make it non-executable; on
/// older kernels, which do not know the flag, without it), close-on-exec,
/// plus `flags`. The error number on failure.
#[doc(hidden)]
pub fn memfd_exec(name: &core::ffi::CStr, flags: libc::c_uint) -> Result<libc::c_int, i32> {
    const MFD_EXEC: libc::c_uint = 0x10;
    let flags = flags | libc::MFD_CLOEXEC;
    // SAFETY: memfd_create with a NUL-terminated name.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), flags | MFD_EXEC) };
    if fd < 0 && errno() == libc::EINVAL {
        // SAFETY: as above.
        fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    }
    if fd < 0 { Err(errno()) } else { Ok(fd) }
}

pub(super) fn os_err(call: &'static str) -> PokeError {
    PokeError::Os {
        call,
        errno: errno(),
    }
}

/// A new private anonymous mapping of `len` bytes with `prot`, at an
/// address the kernel picks. Never writable and executable at once: callers
/// ask for read+write or read+exec (the latter is allowed under MDWE, since
/// the mapping is executable from the start).
pub(super) fn map_anon(len: usize, prot: libc::c_int) -> Result<*mut libc::c_void, PokeError> {
    debug_assert!(
        prot & (libc::PROT_WRITE | libc::PROT_EXEC) != libc::PROT_WRITE | libc::PROT_EXEC
    );
    // SAFETY: a fresh mapping that overlaps nothing of ours.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap"));
    }
    Ok(p)
}

/// A private read+exec mapping of `len` bytes of `fd` from `offset`, at an
/// address the kernel picks (the page swap's staging, the procmem and
/// alias probes).
pub(super) fn map_file(
    fd: libc::c_int,
    offset: u64,
    len: usize,
) -> Result<*mut libc::c_void, PokeError> {
    // SAFETY: a new private read+exec mapping of the file at an address the
    // kernel picks; nothing runs it.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            fd,
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap of the text's file"));
    }
    Ok(p)
}

/// Registers `membarrier(SYNC_CORE)` once per process.
pub(super) fn init_sync_core() {
    REGISTER.call_once(|| {
        // SAFETY: registration has no memory effects on this process.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
        SYNC_CORE.store(r == 0, Ordering::Release);
    });
}

pub(super) fn has_sync_core() -> bool {
    init_sync_core();
    SYNC_CORE.load(Ordering::Acquire)
}

/// Makes every thread of the process execute a core-serializing
/// instruction before it runs text again: `membarrier(SYNC_CORE)`, or where
/// that is unavailable a TLB shootdown, whose IPIs interrupt (and so
/// serialize) every CPU running this process.
pub(super) fn sync_all_threads() -> Result<(), PokeError> {
    if has_sync_core() {
        // SAFETY: membarrier only interrupts this process's running threads.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
        if r != 0 {
            return Err(os_err("membarrier"));
        }
        return Ok(());
    }
    let p = map_anon(PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE)?;
    // SAFETY: a private anonymous page we mapped: touch, flip and unmap it.
    unsafe {
        (p as *mut u8).write_volatile(1);
        let r = libc::mprotect(p, PAGE_SIZE, libc::PROT_READ);
        libc::munmap(p, PAGE_SIZE);
        if r != 0 {
            return Err(os_err("mprotect"));
        }
    }
    Ok(())
}
