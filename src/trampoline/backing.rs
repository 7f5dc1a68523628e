//! Where mapped copies of the trampoline table come from.
//!
//! Each source is a file descriptor and an offset at which the table's 16
//! pages lie, mapped `PROT_READ|PROT_EXEC, MAP_PRIVATE` and never writable:
//!
//! 1. [`Source::OwnFile`]: the executable or shared object that contains
//!    this crate, at the table's own file offset. Nothing is written
//!    anywhere; the kernel sees an ordinary read+exec file mapping, which
//!    `PR_SET_MDWE`, `vm.memfd_noexec` and SELinux `execmem` all allow.
//! 2. [`Source::Memfd`]: a memfd holding a copy of the table, written with
//!    `pwrite` (no mapping of it is ever writable). Refused where
//!    `vm.memfd_noexec=2`.
//! 3. [`Source::TmpFile`]: the same in an unlinked file in `/dev/shm`,
//!    `/tmp` or `/var/tmp`. Refused on `noexec` mounts.
//!
//! Every mapped copy is compared with the table before its trampolines are
//! handed out, so a file replaced on disk since it was loaded is refused,
//! not executed.

use alloc::string::String;
use alloc::vec::Vec;

use super::table::{self, SPAN};
use super::{Source, SourceRefusal, TrampolineError};
use crate::poke::{PAGE_SIZE, Strategy};

/// An open source of table pages.
pub(crate) struct Backing {
    /// Which source this is.
    pub(crate) source: Source,
    /// The descriptor (close-on-exec, owned for the life of the pool).
    fd: libc::c_int,
    /// File offset of the table page.
    offset: libc::off_t,
    /// What the file is, for messages (`/proc/self/exe`, a library path,
    /// `memfd`, ...).
    pub(crate) path: String,
    /// The lowest address of the object containing this crate (0 if
    /// unknown): pools map their chunks just below it (see `pool.rs`).
    pub(crate) object_start: usize,
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours; mappings made from it stay valid
        // after it is closed.
        unsafe { libc::close(self.fd) };
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Backing {
    /// Opens the first source of `order` that works; the refusals of those
    /// that did not, if none does.
    pub(crate) fn open(order: &[Source]) -> Result<Backing, TrampolineError> {
        let mut refusals = Vec::new();
        for &source in order {
            match Backing::open_one(source) {
                Ok(b) => return Ok(b),
                Err((call, errno)) => refusals.push(SourceRefusal {
                    source,
                    call,
                    errno,
                }),
            }
        }
        Err(TrampolineError::NoSource { refusals })
    }

    fn open_one(source: Source) -> Result<Backing, (&'static str, i32)> {
        let b = match source {
            Source::OwnFile => Backing::own_file()?,
            Source::Memfd | Source::TmpFile => {
                let kind = if source == Source::Memfd {
                    Strategy::Memfd
                } else {
                    Strategy::File
                };
                let fd = crate::poke::linux::open_code_file(kind)?;
                let t = table::table();
                // SAFETY: writes the table's bytes into our own file at
                // offset 0 (no mapping of the file exists yet).
                let n = unsafe { libc::pwrite(fd, t.as_ptr().cast(), SPAN, 0) };
                if n != SPAN as isize {
                    let e = errno();
                    // SAFETY: closing the descriptor we opened.
                    unsafe { libc::close(fd) };
                    return Err(("pwrite", e));
                }
                let path = if source == Source::Memfd {
                    "memfd:altpatch-text"
                } else {
                    "an unlinked file in /dev/shm, /tmp or /var/tmp"
                };
                Backing {
                    source,
                    fd,
                    offset: 0,
                    path: path.into(),
                    object_start: object_start(),
                }
            }
        };
        // One probe mapping proves the source works here (a noexec mount or
        // vm.memfd_noexec refuses the mmap) and that it holds the table.
        let probe = b.map(None).map_err(|e| match e {
            TrampolineError::Os { call, errno } => (call, errno),
            _ => ("compare the mapped page with the trampoline table", 0),
        })?;
        // SAFETY: the probe mapping from just above, unused by anyone.
        unsafe { libc::munmap(probe.cast(), SPAN) };
        Ok(b)
    }

    /// The object containing this crate, at the table's file offset.
    fn own_file() -> Result<Backing, (&'static str, i32)> {
        let at = table::table().as_ptr() as usize;
        let obj = crate::poke::linux::loaded_object_containing(at)
            .ok_or(("dl_iterate_phdr (no object contains the table)", 0))?;
        let (seg, off) = obj
            .loads
            .iter()
            .zip(&obj.load_offsets)
            .find(|(r, _)| r.contains(&at))
            .ok_or(("dl_iterate_phdr (no segment contains the table)", 0))?;
        let offset = off + (at - seg.start) as u64;
        if !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(("the table's file offset is not page-aligned", libc::EINVAL));
        }
        let path = if obj.name.is_empty() {
            String::from("/proc/self/exe")
        } else {
            obj.name.clone()
        };
        let mut c = path.clone().into_bytes();
        c.push(0);
        // SAFETY: open with a NUL-terminated path, read-only.
        let fd = unsafe { libc::open(c.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(("open the object containing the table", errno()));
        }
        Ok(Backing {
            source: Source::OwnFile,
            fd,
            offset: offset as libc::off_t,
            path,
            object_start: obj.loads.iter().map(|r| r.start).min().unwrap_or(0),
        })
    }

    /// Maps one read+exec copy of the table: over `at` (`SPAN` bytes the
    /// caller reserved) or anywhere if `None`. The copy is compared with the table
    /// before it is returned; a copy that differs is unmapped (if it was not
    /// placed over `at`) and refused.
    pub(crate) fn map(&self, at: Option<*mut u8>) -> Result<*mut u8, TrampolineError> {
        let (hint, flags) = match at {
            Some(p) => (p.cast(), libc::MAP_PRIVATE | libc::MAP_FIXED),
            None => (core::ptr::null_mut(), libc::MAP_PRIVATE),
        };
        // SAFETY: a read+exec private mapping of our descriptor; with
        // MAP_FIXED it replaces only the page the caller reserved for it.
        let p = unsafe {
            libc::mmap(
                hint,
                SPAN,
                libc::PROT_READ | libc::PROT_EXEC,
                flags,
                self.fd,
                self.offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(TrampolineError::Os {
                call: "mmap(PROT_READ|PROT_EXEC) of the trampoline table",
                errno: errno(),
            });
        }
        // SAFETY: the pages just mapped readable.
        let copy = unsafe { core::slice::from_raw_parts(p as *const u8, SPAN) };
        if !table::is_table(copy) {
            if at.is_none() {
                // SAFETY: our own mapping from just above.
                unsafe { libc::munmap(p, SPAN) };
            }
            return Err(TrampolineError::NotTheTable {
                path: self.path.clone(),
            });
        }
        Ok(p.cast())
    }
}

/// The lowest address of the object containing this crate, or 0.
fn object_start() -> usize {
    crate::poke::linux::loaded_object_containing(table::table().as_ptr() as usize)
        .and_then(|o| o.loads.iter().map(|r| r.start).min())
        .unwrap_or(0)
}
