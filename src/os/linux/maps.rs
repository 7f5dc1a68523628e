//! What the process's address space holds: `/proc/self/maps` and the
//! dynamic loader's list of loaded objects.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;
use std::ffi::CStr;

use crate::poke::PokeError;

/// Checks that every range is covered by mappings that are readable,
/// executable, private and not writable: ordinary text. Writable ones are JIT
/// memory or data; a shared one would carry writes through to its file
/// (`/proc/self/mem` writes even read-only shared mappings it may write).
pub(crate) fn check_text_mappings(ranges: &[Range<usize>]) -> Result<(), PokeError> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| PokeError::Os {
        call: "read /proc/self/maps",
        errno: e.raw_os_error().unwrap_or(0),
    })?;
    let mut vmas: Vec<(usize, usize, [u8; 4])> = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(span), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        let Some((a, b)) = span.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        let mut p = [b'-'; 4];
        for (d, s) in p.iter_mut().zip(perms.bytes()) {
            *d = s;
        }
        vmas.push((a, b, p));
    }
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let Some(&(_, end, perms)) = vmas.iter().find(|v| v.0 <= at && at < v.1) else {
                return Err(PokeError::NotText {
                    addr: at,
                    why: "not mapped",
                });
            };
            if perms[0] != b'r' || perms[2] != b'x' {
                return Err(PokeError::NotText {
                    addr: at,
                    why: "mapping is not readable and executable",
                });
            }
            if perms[1] == b'w' {
                return Err(PokeError::NotText {
                    addr: at,
                    why: "mapping is writable and executable (JIT memory?)",
                });
            }
            if perms[3] != b'p' {
                return Err(PokeError::NotText {
                    addr: at,
                    why: "mapping is shared, not private text",
                });
            }
            at = end;
        }
    }
    Ok(())
}

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

/// Pages confirmed to be ordinary text, valid while the loader generation
/// is unchanged (see [`loader_generation`]). Guarded by the process lock.
#[derive(Default)]
pub(crate) struct TextPages {
    generation: (u64, u64),
    checked: alloc::collections::BTreeSet<usize>,
    /// Times `/proc/self/maps` was read.
    pub(crate) reads: u64,
}

impl TextPages {
    pub(crate) const fn new() -> TextPages {
        TextPages {
            generation: (0, 0),
            checked: alloc::collections::BTreeSet::new(),
            reads: 0,
        }
    }

    /// Whether the loader changed the address space since the last check
    /// (then everything is checked again). Returns true if it did.
    pub(crate) fn refresh(&mut self) -> bool {
        let now = loader_generation();
        if now == self.generation {
            return false;
        }
        self.generation = now;
        self.checked.clear();
        true
    }

    /// Checks the page-aligned `pages` are text, reading `/proc/self/maps`
    /// only for pages not confirmed before.
    pub(crate) fn check(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        let missing = crate::poke::unknown_pages(pages, |p| self.checked.contains(&p));
        if missing.is_empty() {
            return Ok(());
        }
        self.reads += 1;
        check_text_mappings(&missing)?;
        for m in missing {
            self.checked.extend(m.step_by(crate::poke::PAGE_SIZE));
        }
        Ok(())
    }

    /// Forgets `page` (its mapping changed under us).
    pub(crate) fn forget(&mut self, page: usize) {
        self.checked.remove(&page);
    }
}

/// A loaded object (the executable or a shared object) and its executable
/// segments, as the dynamic loader reports them.
pub(crate) struct LoadedObject {
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
pub(crate) fn loaded_object_containing(addr: usize) -> Option<LoadedObject> {
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
