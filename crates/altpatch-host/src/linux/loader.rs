//! The object the dynamic loader mapped at an address (`dl_iterate_phdr`):
//! its name, load bias, segments and their file offsets.

use alloc::string::String;
use std::ffi::CStr;

use crate::LoadedObject;

/// The loaded object one of whose segments contains `addr`.
pub(crate) fn loaded_object_containing(addr: usize) -> Option<LoadedObject> {
    struct Search {
        addr: usize,
        found: Option<LoadedObject>,
    }
    /// `dl_iterate_phdr`'s callback.
    ///
    /// # Safety
    ///
    /// `info` is the loader's valid entry and `data` points to a `Search`,
    /// both for the duration of the call.
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
