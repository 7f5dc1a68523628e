//! The environment of a Linux process, readable at any point of its life:
//! C ifunc resolvers of the executable run inside the dynamic loader,
//! before libc has set `environ` (`getenv` then finds nothing), so the
//! environment the kernel gave the process is then read from
//! `/proc/self/environ` through a small buffer. Nothing is allocated (this
//! runs in constructors and resolvers).

use core::ffi::CStr;

unsafe extern "C" {
    static environ: *const *const core::ffi::c_char;
}

/// `f` applied to the value of `name` (`None` if unset); `None` if libc has
/// not set `environ` up yet.
pub(crate) fn with_env<R>(name: &CStr, f: impl FnOnce(Option<&[u8]>) -> R) -> Option<R> {
    // SAFETY: reading libc's `environ` pointer; null until libc's start-up
    // code sets it.
    if unsafe { environ }.is_null() {
        return None;
    }
    // SAFETY: environ is set: getenv with a NUL-terminated name.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    if v.is_null() {
        return Some(f(None));
    }
    // SAFETY: a NUL-terminated string from getenv, read in place before
    // anything else may change the environment on this thread.
    Some(f(Some(unsafe { CStr::from_ptr(v) }.to_bytes())))
}

/// Feeds `/proc/self/environ` to `feed` in chunks until it returns true or
/// the file ends; false if it cannot be opened.
pub(crate) fn read_initial(mut feed: impl FnMut(&[u8]) -> bool) -> bool {
    // SAFETY: open on a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/proc/self/environ".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return false;
    }
    let mut chunk = [0u8; 1024];
    loop {
        // SAFETY: reading into our buffer, at most its length.
        let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n <= 0 || feed(&chunk[..n as usize]) {
            break;
        }
    }
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
    true
}
