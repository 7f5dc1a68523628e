//! What the process's address space holds where a batch writes:
//! `/proc/self/maps`, read for pages not seen before. Each page is checked
//! to be ordinary text, and remembered with where its bytes come from — the
//! file and offset it maps (which the page swap stages its copy from, so the
//! text stays that file's text for the kernel and for every tool), or
//! anonymous memory.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use super::files::MappedFile;
use super::loader::loader_generation;
use super::sorted_map::SortedMap;
use super::sys::os_err;
use crate::poke::{PAGE_SIZE, PokeError};

/// One line of `/proc/self/maps`.
pub(crate) struct Vma {
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// `rwxp` letters (`-` where a permission is absent).
    pub(crate) perms: [u8; 4],
    /// File offset of `start`.
    pub(crate) offset: u64,
    /// Device (as `st_dev`) and inode of the file; inode 0 when anonymous.
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    /// The path the kernel shows (may end in ` (deleted)`); empty when
    /// anonymous.
    pub(crate) path: String,
}

impl Vma {
    /// Parses `start-end perms offset major:minor inode   path` (numbers in
    /// hex but the decimal inode), byte by byte: `str` splitting and
    /// `from_str_radix` cost kilobytes of code in every program that
    /// patches at load.
    fn parse(line: &[u8]) -> Option<Vma> {
        let mut f = Fields(line);
        let start = f.hex(b'-')? as usize;
        let end = f.hex(b' ')? as usize;
        let perms: [u8; 4] = f.0.get(..4)?.try_into().ok()?;
        f.0 = f.0.get(4..)?.strip_prefix(b" ")?;
        let offset = f.hex(b' ')?;
        let major = f.hex(b':')?;
        let minor = f.hex(b' ')?;
        let ino = f.decimal()?;
        let path = f.0.trim_ascii_start();
        Some(Vma {
            start,
            end,
            perms,
            offset,
            dev: libc::makedev(u32::try_from(major).ok()?, u32::try_from(minor).ok()?),
            ino,
            path: String::from_utf8_lossy(path).into_owned(),
        })
    }

    /// Why this mapping is not ordinary text, if it is not: readable,
    /// executable, private and not writable. Writable ones are JIT memory
    /// or data; a shared one would carry writes through to its file
    /// (`/proc/self/mem` writes even read-only shared mappings it may write).
    fn not_text(&self) -> Option<&'static str> {
        let p = self.perms;
        if p[0] != b'r' || p[2] != b'x' {
            Some("mapping is not readable and executable")
        } else if p[1] == b'w' {
            Some("mapping is writable and executable (JIT memory?)")
        } else if p[3] != b'p' {
            Some("mapping is shared, not private text")
        } else {
            None
        }
    }
}

/// The rest of a `/proc/self/maps` line.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    /// A hex number ended by `end` (consumed); `None` for no digits, an
    /// overflow or another byte.
    fn hex(&mut self, end: u8) -> Option<u64> {
        let mut v: u64 = 0;
        let mut digits = 0;
        while let Some((&b, rest)) = self.0.split_first() {
            self.0 = rest;
            if b == end && digits > 0 {
                return Some(v);
            }
            let d = (b as char).to_digit(16)?;
            v = v.checked_mul(16)?.checked_add(u64::from(d))?;
            digits += 1;
        }
        None
    }

    /// A decimal number ended by a space (consumed) or the end of the line.
    fn decimal(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        let mut digits = 0;
        while let Some((&b, rest)) = self.0.split_first() {
            self.0 = rest;
            if b == b' ' {
                break;
            }
            let d = (b as char).to_digit(10)?;
            v = v.checked_mul(10)?.checked_add(u64::from(d))?;
            digits += 1;
        }
        (digits > 0).then_some(v)
    }
}

/// Every mapping of the process, in address order.
pub(crate) fn read_vmas() -> Result<Vec<Vma>, PokeError> {
    // The file reports no size: read it in large pieces from the start (a
    // growing buffer from 32 bytes would take a dozen reads). By `open` and
    // `read` themselves: `std::fs` brings path conversion and its error
    // type into every program that patches at load.
    // SAFETY: a constant NUL-terminated path; the flags ask for nothing
    // but a read-only descriptor.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(os_err("open /proc/self/maps"));
    }
    let mut maps: Vec<u8> = Vec::with_capacity(16 * 1024);
    let read = loop {
        if maps.capacity() - maps.len() < 4096 {
            maps.reserve(maps.capacity());
        }
        let spare = maps.spare_capacity_mut();
        // SAFETY: `spare` is writable memory of `spare.len()` bytes that
        // `read` fills from its start.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
        if n < 0 && super::sys::errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break n;
        }
        // SAFETY: `read` initialized the `n` bytes after the length.
        unsafe { maps.set_len(maps.len() + n as usize) };
    };
    let err = (read < 0).then(|| os_err("read /proc/self/maps"));
    // SAFETY: our descriptor, closed once.
    unsafe { libc::close(fd) };
    if let Some(e) = err {
        return Err(e);
    }
    Ok(maps.split(|&b| b == b'\n').filter_map(Vma::parse).collect())
}

/// No file: the page is anonymous memory.
const ANONYMOUS: u32 = u32::MAX;

/// Where a text page's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Index of the file among [`TextPages`]'s files, or [`ANONYMOUS`].
    file: u32,
    /// The file offset the page maps.
    pub(crate) offset: u64,
}

impl Origin {
    /// The index of the file the page maps (`None`: anonymous memory).
    pub(crate) fn file(&self) -> Option<usize> {
        (self.file != ANONYMOUS).then_some(self.file as usize)
    }
}

/// Pages confirmed to be ordinary text and where they come from, valid
/// while the loader generation is unchanged (see [`loader_generation`]).
/// Guarded by the process lock.
pub(crate) struct TextPages {
    generation: (u64, u64),
    checked: SortedMap<usize, Origin>,
    /// The files text pages map (kept across loader changes: a file's
    /// descriptor stays valid, and a reloaded object finds its entry).
    files: Vec<MappedFile>,
    /// Times `/proc/self/maps` was read.
    pub(crate) reads: u64,
}

impl TextPages {
    pub(crate) const fn new() -> TextPages {
        TextPages {
            generation: (0, 0),
            checked: SortedMap::new(),
            files: Vec::new(),
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
    /// only for pages not confirmed before, and remembers their origins.
    pub(crate) fn check(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        let missing = crate::poke::unknown_pages(pages, |p| self.checked.contains_key(&p));
        if missing.is_empty() {
            return Ok(());
        }
        self.reads += 1;
        let vmas = read_vmas()?;
        // Checked in full before any page is remembered: a failed check
        // leaves the cache as it was.
        let mut found: Vec<(usize, Origin)> = Vec::new();
        for r in &missing {
            let mut at = r.start;
            while at < r.end {
                let i = vmas.partition_point(|v| v.end <= at);
                let Some(v) = vmas.get(i).filter(|v| v.start <= at) else {
                    return Err(PokeError::NotText {
                        addr: at,
                        why: "not mapped",
                    });
                };
                if let Some(why) = v.not_text() {
                    return Err(PokeError::NotText { addr: at, why });
                }
                let file = if v.ino == 0 {
                    ANONYMOUS
                } else {
                    self.file_index(v)
                };
                let end = v.end.min(r.end);
                while at < end {
                    let offset = v.offset + (at - v.start) as u64;
                    found.push((at, Origin { file, offset }));
                    at += PAGE_SIZE;
                }
            }
        }
        self.checked.extend_new(found);
        Ok(())
    }

    /// The index of `v`'s file among the files, added if new.
    fn file_index(&mut self, v: &Vma) -> u32 {
        if let Some(i) = self.files.iter().position(|f| f.is(v.dev, v.ino)) {
            self.files[i].seen_at(v.start..v.end);
            return i as u32;
        }
        self.files
            .push(MappedFile::new(v.dev, v.ino, &v.path, v.start..v.end));
        (self.files.len() - 1) as u32
    }

    /// Where `page` comes from (checked pages only).
    pub(crate) fn origin(&self, page: usize) -> Option<Origin> {
        self.checked.get(&page).copied()
    }

    /// The file at `index` (see [`Origin::file`]).
    pub(crate) fn file(&mut self, index: usize) -> &mut MappedFile {
        &mut self.files[index]
    }

    /// Forgets `page` (its mapping changed under us).
    pub(crate) fn forget(&mut self, page: usize) {
        self.checked.remove(&page);
    }
}

/// Whether any page of `range` (mapped text) is sealed (`mseal(2)`): a
/// sealed mapping cannot be remapped, unmapped or re-protected. Asked by
/// re-protecting the range with the protection it has, which changes
/// nothing where it is allowed and fails with `EPERM` only on a seal (a
/// policy refusing executable protections answers otherwise, and means
/// "not sealed" here: the publication then meets that policy itself).
pub(crate) fn sealed(range: &Range<usize>) -> bool {
    // SAFETY: the range is read+exec text (checked by the caller); asking
    // for read+exec again leaves every mapping as it is.
    let r = unsafe {
        libc::mprotect(
            range.start as *mut libc::c_void,
            range.end - range.start,
            libc::PROT_READ | libc::PROT_EXEC,
        )
    };
    r != 0 && super::sys::errno() == libc::EPERM
}

#[cfg(test)]
mod tests {
    use super::Vma;

    #[test]
    fn parses_maps_lines() {
        let v = Vma::parse(
            b"55d0c1a00000-55d0c1a42000 r-xp 00003000 fd:01 1234567    /usr/bin/my prog (deleted)",
        )
        .unwrap();
        assert_eq!((v.start, v.end), (0x55d0c1a00000, 0x55d0c1a42000));
        assert_eq!(&v.perms, b"r-xp");
        assert_eq!((v.offset, v.ino), (0x3000, 1234567));
        assert_eq!(v.dev, libc::makedev(0xfd, 1));
        assert_eq!(v.path, "/usr/bin/my prog (deleted)");
        assert_eq!(v.not_text(), None);
        let anon = Vma::parse(b"7f0000000000-7f0000001000 rwxp 00000000 00:00 0 ").unwrap();
        assert_eq!((anon.ino, anon.path.as_str()), (0, ""));
        assert!(anon.not_text().unwrap().contains("JIT"));
        let bare = Vma::parse(b"7f0000000000-7f0000001000 r-xp 00000000 00:00 0").unwrap();
        assert_eq!((bare.ino, bare.path.as_str()), (0, ""));
        let named = Vma::parse(
            b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
        )
        .unwrap();
        assert_eq!(
            (named.start, named.path.as_str()),
            (0xffff_ffff_ff60_0000, "[vsyscall]")
        );
        for bad in [
            &b"garbage"[..],
            b"",
            b"-1000 r-xp 00000000 00:00 0",
            b"1000-2000 r-xp 0000000g 00:00 0",
            b"1000-2000 r-x 00000000 00:00 0",
            b"1000-2000 r-xp 00000000 00:00 x",
            b"1000-2000 r-xp 00000000 00:00 ",
            b"11112222333344445-2000 r-xp 00000000 00:00 0",
        ] {
            assert!(Vma::parse(bad).is_none(), "{:?}", core::str::from_utf8(bad));
        }
    }
}
