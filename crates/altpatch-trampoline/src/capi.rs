//! The C interface to the global pool (`include/altpatch.h`): what a C FFI
//! library calls instead of writing closure code into writable+executable
//! memory. The C names are weak symbols: in a program linking two copies
//! of the crate both reach the same copy's pool (see
//! [`records`](altpatch_core::records)).

use core::ffi::c_void;

use super::{Pool, Trampoline, TrampolineError};

/// Allocates a trampoline of the global pool that jumps to `target` with
/// `r10` = `data`; returns its code address, or null with `errno` set.
///
/// # Safety
///
/// `target` is a function that follows the trampoline contract (it finds
/// its data word in `r10`), or null (refused with `EINVAL`).
pub unsafe extern "C" fn altpatch_trampoline_alloc(
    target: Option<unsafe extern "C" fn()>,
    data: *mut c_void,
) -> *mut c_void {
    let Some(target) = target else {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    };
    match Trampoline::new(target, data) {
        Ok(t) => t.leak().cast_mut(),
        Err(e) => {
            set_errno(match e {
                TrampolineError::Os { errno, .. } => errno,
                TrampolineError::NoSource { .. } => libc::EACCES,
                _ => libc::ENOEXEC,
            });
            core::ptr::null_mut()
        }
    }
}

/// Frees a trampoline from [`altpatch_trampoline_alloc`]. Returns 0, or -1
/// with `errno` = `EINVAL` if `code` is not a trampoline of the global pool
/// or is free already (a double free is refused, not a corrupted pool).
///
/// # Safety
///
/// `code` was returned by `altpatch_trampoline_alloc`, is not freed yet,
/// and nobody calls it any more.
pub unsafe extern "C" fn altpatch_trampoline_free(code: *mut c_void) -> libc::c_int {
    let pool = Pool::global();
    if !pool.state.contains(code as usize) {
        set_errno(libc::EINVAL);
        return -1;
    }
    // SAFETY: a trampoline of the pool (checked above) that, by the
    // caller's contract, nobody calls any more.
    if unsafe { pool.state.free(code as usize) } {
        0
    } else {
        set_errno(libc::EINVAL);
        -1
    }
}

crate::arch::c_entry!("altpatch_trampoline_alloc", altpatch_trampoline_alloc);
crate::arch::c_entry!("altpatch_trampoline_free", altpatch_trampoline_free);

fn set_errno(e: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}
