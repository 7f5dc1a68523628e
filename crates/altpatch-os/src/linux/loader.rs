//! The dynamic loader's generation counter: whether any object was mapped
//! or unmapped since a check. (The object holding an address is the host
//! contract's, `Host::loaded_object`: `altpatch-host`'s `linux/loader.rs`.)

/// The dynamic loader's count of objects loaded and unloaded so far
/// (`dlpi_adds`, `dlpi_subs`): while it is unchanged, no object's text was
/// unmapped or mapped, so pages once checked to be text still are.
pub(crate) fn loader_generation() -> (u64, u64) {
    /// `dl_iterate_phdr`'s callback.
    ///
    /// # Safety
    ///
    /// `info` is the loader's valid entry and `data` points to a
    /// `(u64, u64)`, both for the duration of the call.
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info and our pointer.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut (u64, u64))) };
        *out = (info.dlpi_adds, info.dlpi_subs);
        1
    }
    let mut out = (0u64, 0u64);
    // SAFETY: the callback matches the expected signature and writes only
    // `out`, for the duration of the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&raw mut out).cast()) };
    out
}
