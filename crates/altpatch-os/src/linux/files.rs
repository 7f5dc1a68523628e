//! The files text pages map, opened so the page swap can stage a private
//! mapping of the same file at the same offset.
//!
//! The kernel knows a uprobe, and profilers, debuggers and symbolizers know
//! a symbol, only in a mapping of the probed *file* at the right offset. So
//! a page published by the swap must be such a mapping, and to map it we
//! need a descriptor of exactly the file the text maps — not whatever now
//! has its path (a package upgrade renames a new file over it). Tried in
//! order, each checked against the device and inode `/proc/self/maps` shows:
//!
//! 1. the path `/proc/self/maps` shows (unless it says ` (deleted)`);
//! 2. `/proc/self/exe`, which names the executable even when it was
//!    deleted or replaced;
//! 3. `/proc/self/map_files/<start>-<end>`, which names any mapped file,
//!    deleted or not, but only to a process with `CAP_SYS_ADMIN` or
//!    `CAP_CHECKPOINT_RESTORE`.
//!
//! The descriptor is opened once, read-only and close-on-exec, and kept.

use alloc::format;
use alloc::string::String;
use core::ops::Range;

use super::sys::errno;

/// Why a file cannot be opened: the last call tried and its error number.
pub(crate) type Unopenable = (&'static str, i32);

/// A file some text page maps.
pub(crate) struct MappedFile {
    dev: u64,
    ino: u64,
    /// The path `/proc/self/maps` showed.
    path: String,
    /// A mapping of it last seen (for `/proc/self/map_files`).
    vma: Range<usize>,
    /// Once tried: the descriptor, or why none.
    fd: Option<Result<libc::c_int, Unopenable>>,
}

impl MappedFile {
    /// The file with `dev` and `ino` that `/proc/self/maps` shows at
    /// `path`, mapped (among others) at `vma`.
    pub(crate) fn new(dev: u64, ino: u64, path: &str, vma: Range<usize>) -> MappedFile {
        MappedFile {
            dev,
            ino,
            path: path.into(),
            vma,
            fd: None,
        }
    }

    /// The file's device and inode.
    pub(crate) fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Whether this is the file with `dev` and `ino`.
    pub(crate) fn is(&self, dev: u64, ino: u64) -> bool {
        self.dev == dev && self.ino == ino
    }

    /// Notes a mapping of the file seen now (its bounds may have changed;
    /// a file that could not be opened is tried again).
    pub(crate) fn seen_at(&mut self, vma: Range<usize>) {
        self.vma = vma;
        if matches!(self.fd, Some(Err(_))) {
            self.fd = None;
        }
    }

    /// The path `/proc/self/maps` showed for the file.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// A read-only descriptor of the file (opened the first time, and again
    /// if the one kept no longer names it: a program may close descriptors
    /// it did not open, `closefrom` in a forked child, and the number be
    /// reused — that descriptor is then not ours to close).
    pub(crate) fn fd(&mut self) -> Result<libc::c_int, Unopenable> {
        if let Some(r) = self.fd {
            match r {
                Ok(fd) if self.names_it(fd) => return Ok(fd),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        let r = self.open();
        self.fd = Some(r);
        r
    }

    /// Whether `fd` is open on this file.
    fn names_it(&self, fd: libc::c_int) -> bool {
        // SAFETY: `st` is written by fstat before it is read.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: fstat into our buffer; a closed descriptor only fails.
        let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
        ok && st.st_dev == self.dev && st.st_ino == self.ino
    }

    fn open(&self) -> Result<libc::c_int, Unopenable> {
        let mut last: Unopenable = ("open the mapped file", libc::ENOENT);
        let listed = (!self.path.ends_with(" (deleted)") && self.path.starts_with('/'))
            .then(|| self.path.clone());
        let map_files = format!(
            "/proc/self/map_files/{:x}-{:x}",
            self.vma.start, self.vma.end
        );
        let tries = [
            (listed, "open the path /proc/self/maps shows"),
            (Some("/proc/self/exe".into()), "open /proc/self/exe"),
            (Some(map_files), "open /proc/self/map_files"),
        ];
        for (path, call) in tries {
            let Some(path) = path else { continue };
            match self.open_checked(&path) {
                Ok(fd) => return Ok(fd),
                Err(0) => last = (call, 0),
                Err(e) => last = (call, e),
            }
        }
        Err(last)
    }

    /// Opens `path` and keeps it if it is this file (device and inode);
    /// the error number otherwise (0: another file).
    fn open_checked(&self, path: &str) -> Result<libc::c_int, i32> {
        let Ok(c) = std::ffi::CString::new(path) else {
            return Err(libc::EINVAL);
        };
        // SAFETY: open with a NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(errno());
        }
        if self.names_it(fd) {
            return Ok(fd);
        }
        // SAFETY: closing the descriptor we opened.
        unsafe { libc::close(fd) };
        Err(0)
    }
}
