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
//!    `pwrite` (no mapping of it is ever writable), then sealed against
//!    writes, shrinking and growing: unmodified private pages follow the
//!    file, so an unsealed memfd would be a writable view of the code
//!    (through the descriptor, `/proc/<pid>/fd`, or a forked child).
//!    Refused where `vm.memfd_noexec=2`.
//! 3. [`Source::TmpFile`]: the same in an unlinked file in `/dev/shm`,
//!    `/tmp` or `/var/tmp`, made read-only (mode 0400) and reopened
//!    read-only, the writable descriptor closed. Weaker than a sealed
//!    memfd: its owner (this process, or another of the same user that may
//!    open `/proc/<pid>/fd`) can `chmod` it back and write it. Refused on
//!    `noexec` mounts; used only where both sources above are refused.
//!
//! Every mapped copy is compared with the table before its trampolines are
//! handed out, so a file replaced on disk since it was loaded is refused,
//! not executed.

use alloc::string::String;
use alloc::vec::Vec;

use super::table::{self, SPAN};
use super::{Source, SourceRefusal, TrampolineError};
use crate::host::{Current, Host};
use crate::os::linux::errno;
use crate::poke::PAGE_SIZE;

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
    /// The pool's address-space reservation (base, length): `PROT_NONE`
    /// until chunks are mapped into it; unmapped on drop unless kept.
    pub(crate) region: (usize, usize),
}

/// The reservation asked for first: 4 GiB, 32 768 blocks of 2048
/// trampolines (67 million). Each block is two mappings, so the default
/// `vm.max_map_count` (65 530) allows about this many anyway; indexes fit
/// the head's 30 bits (see `pool.rs`).
const REGION_MAX: usize = 1 << 32;

/// Where an address-space limit refused `REGION_MAX`: start again from
/// 64 MiB (a million trampolines) and halve, so the pool does not take
/// most of what the limit leaves the rest of the process.
const REGION_LIMITED: usize = 1 << 26;

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours; mappings made from it stay valid
        // after it is closed.
        unsafe { libc::close(self.fd) };
        let (base, len) = self.region;
        if len != 0 {
            // SAFETY: the reservation and every chunk in it are this pool's;
            // the pool is being dropped with no trampoline in use.
            unsafe { libc::munmap(base as *mut libc::c_void, len) };
        }
    }
}

impl Backing {
    /// Opens the first source of `order` that works; the refusals of those
    /// that did not, if none does.
    pub(crate) fn open(order: &[Source]) -> Result<Backing, TrampolineError> {
        let mut refusals = Vec::new();
        for &source in order {
            match Backing::open_one(source) {
                Ok(mut b) => {
                    b.region = reserve()?;
                    return Ok(b);
                }
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
            Source::Memfd => {
                let fd = sealed_memfd()?;
                Backing {
                    source,
                    fd,
                    offset: 0,
                    path: "memfd:altpatch-trampolines".into(),
                    region: (0, 0),
                }
            }
            Source::TmpFile => {
                let fd = read_only_tmpfile()?;
                Backing {
                    source,
                    fd,
                    offset: 0,
                    path: "an unlinked file in /dev/shm, /tmp or /var/tmp".into(),
                    region: (0, 0),
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
        let obj = Current::loaded_object(at)
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
        // A file replaced by a shorter one would fault (SIGBUS) when the
        // mapped copy is compared, instead of being refused.
        // SAFETY: fstat into a zeroed stat of our own.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: our descriptor and buffer.
        let short =
            unsafe { libc::fstat(fd, &mut st) } != 0 || (st.st_size as u64) < offset + SPAN as u64;
        if short {
            // SAFETY: closing the descriptor we opened.
            unsafe { libc::close(fd) };
            return Err((
                "fstat (the file is shorter than the table's end)",
                libc::ENOEXEC,
            ));
        }
        Ok(Backing {
            source: Source::OwnFile,
            fd,
            offset: offset as libc::off_t,
            path,
            region: (0, 0),
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

/// Writes the table at offset 0 of `fd`; the error number on failure.
fn write_table(fd: libc::c_int) -> Result<(), i32> {
    let t = table::table();
    // SAFETY: writes the table's bytes into our own file (no mapping of it
    // exists yet).
    let n = unsafe { libc::pwrite(fd, t.as_ptr().cast(), SPAN, 0) };
    if n == SPAN as isize {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Closes `fd` and returns the failed call.
fn fail(fd: libc::c_int, call: &'static str, e: i32) -> (&'static str, i32) {
    // SAFETY: closing a descriptor we opened.
    unsafe { libc::close(fd) };
    (call, e)
}

/// A memfd holding the table, sealed: no write, shrink or grow, and no
/// further seals (so nobody can unseal it either).
fn sealed_memfd() -> Result<libc::c_int, (&'static str, i32)> {
    let fd = crate::os::linux::memfd_exec(c"altpatch-trampolines", libc::MFD_ALLOW_SEALING)
        .map_err(|e| ("memfd_create(MFD_ALLOW_SEALING)", e))?;
    write_table(fd).map_err(|e| fail(fd, "pwrite", e))?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: sealing our own memfd, which has no mapping yet.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return Err(fail(fd, "fcntl(F_ADD_SEALS)", errno()));
    }
    Ok(fd)
}

/// An unlinked temporary file holding the table, mode 0400, open
/// read-only (the descriptor it was written through is closed).
fn read_only_tmpfile() -> Result<libc::c_int, (&'static str, i32)> {
    let rw = crate::os::linux::open_exec_tmpfile()?;
    write_table(rw).map_err(|e| fail(rw, "pwrite", e))?;
    // SAFETY: fchmod of our own file.
    if unsafe { libc::fchmod(rw, 0o400) } != 0 {
        return Err(fail(rw, "fchmod", errno()));
    }
    let path = std::format!("/proc/self/fd/{rw}\0");
    // SAFETY: reopening our own file read-only through its descriptor.
    let ro = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let e = errno();
    // SAFETY: the writable descriptor is not needed any more.
    unsafe { libc::close(rw) };
    if ro < 0 {
        return Err(("open /proc/self/fd (read-only)", e));
    }
    Ok(ro)
}

/// Reserves the pool's address space, `PROT_NONE`: 4 GiB, or where the
/// kernel refuses that (`RLIMIT_AS`) 64 MiB halved until it fits, down to
/// one block.
fn reserve() -> Result<(usize, usize), TrampolineError> {
    let below = object_start().saturating_sub(1 << 20);
    let mut len = REGION_MAX;
    loop {
        // Just below the object containing this crate: trampolines then sit
        // near the entries and handlers they jump to. On the CPU measured
        // (AMD Zen under KVM) calls and jumps across the ~40 TiB between a
        // PIE executable and the default mmap area cost ~2 ns more (see
        // BENCHMARKS.md). Only a hint: the kernel picks elsewhere if taken.
        let hint = match below.checked_sub(len) {
            Some(h) if h >= 1 << 32 => (h & !(2 * SPAN - 1)) as *mut libc::c_void,
            _ => core::ptr::null_mut(),
        };
        // SAFETY: a fresh inaccessible mapping overlapping nothing of ours.
        let p = unsafe {
            libc::mmap(
                hint,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            let base = p as usize;
            if (base + len) as u64 >> 47 != 0 {
                // SAFETY: the reservation just made.
                unsafe { libc::munmap(p, len) };
                return Err(TrampolineError::Os {
                    call: "mmap (trampoline reservation above 2^47)",
                    errno: libc::ENOMEM,
                });
            }
            return Ok((base, len));
        }
        let e = errno();
        if len <= 2 * SPAN {
            return Err(TrampolineError::Os {
                call: "mmap (trampoline address-space reservation)",
                errno: e,
            });
        }
        len = if len == REGION_MAX {
            REGION_LIMITED
        } else {
            len / 2
        };
    }
}

impl Backing {
    /// Leaves the reservation mapped when the pool is dropped.
    pub(crate) fn keep_region(&mut self) {
        self.region = (0, 0);
    }
}

/// The lowest address of the object containing this crate, or 0.
fn object_start() -> usize {
    Current::loaded_object(table::table().as_ptr() as usize)
        .and_then(|o| o.loads.iter().map(|r| r.start).min())
        .unwrap_or(0)
}
