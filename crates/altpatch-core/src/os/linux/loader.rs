//! What the dynamic loader has loaded: its generation counter (whether any
//! object was mapped or unmapped since a check) and the object holding an
//! address, with its segments and file offsets.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;
use std::ffi::CStr;

/// The dynamic loader's count of objects loaded and unloaded so far
/// (`dlpi_adds`, `dlpi_subs`): while it is unchanged, no object's text was
/// unmapped or mapped, so pages once checked to be text still are.
pub(crate) fn loader_generation() -> (u64, u64) {
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

/// A loaded object (the executable or a shared object) and its executable
/// segments, as the dynamic loader reports them.
#[doc(hidden)]
pub struct LoadedObject {
    /// Path as the loader knows it (empty for the main program).
    pub name: String,
    /// The load bias: runtime address minus link-time address.
    pub bias: usize,
    /// Every `PT_LOAD` segment, relocated.
    pub loads: Vec<Range<usize>>,
    /// The file offset (`p_offset`) of each segment of `loads`.
    pub load_offsets: Vec<u64>,
    /// Executable `PT_LOAD` segments, relocated.
    pub text: Vec<Range<usize>>,
}

/// The loaded object one of whose segments contains `addr`.
#[doc(hidden)]
pub fn loaded_object_containing(addr: usize) -> Option<LoadedObject> {
    struct Search {
        addr: usize,
        found: Option<LoadedObject>,
    }
    unsafe extern "C" fn callback(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of
        // the call and our `data` pointer unchanged.
        let (info, search) = unsafe { (&*info, &mut *(data as *mut Search)) };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: the loader guarantees dlpi_phnum headers at dlpi_phdr.
        let phdrs =
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let base = info.dlpi_addr as usize;
        let seg = |p: &libc::Elf64_Phdr| {
            let s = base.wrapping_add(p.p_vaddr as usize);
            s..s.wrapping_add(p.p_memsz as usize)
        };
        let hit = phdrs
            .iter()
            .any(|p| p.p_type == libc::PT_LOAD && seg(p).contains(&search.addr));
        if !hit {
            return 0;
        }
        let text = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0)
            .map(seg)
            .collect();
        let loads = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
            .map(seg)
            .collect();
        let load_offsets = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
            .map(|p| p.p_offset)
            .collect();
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: the loader's name is a NUL-terminated string.
            unsafe { CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        search.found = Some(LoadedObject {
            name,
            bias: base,
            loads,
            load_offsets,
            text,
        });
        1
    }
    let mut search = Search { addr, found: None };
    // SAFETY: the callback matches the expected signature and only uses
    // `search` for the duration of the call.
    unsafe { libc::dl_iterate_phdr(Some(callback), (&raw mut search).cast()) };
    search.found
}
