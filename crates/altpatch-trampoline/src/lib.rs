//! JIT-free trampolines: a fresh code address per closure or callback, with
//! no code ever written and no mapping ever writable and executable.
//!
//! A C library that takes a callback without a `void *` for state (or a
//! runtime that needs a distinct function address per object) needs a new
//! *code address* per closure. The classic answer writes a small stub into
//! writable+executable memory, which `PR_SET_MDWE`, SELinux's `execmem`
//! denial and W^X policies forbid. This module does what libffi's *static
//! trampolines* do, in Rust:
//!
//! * This crate's text holds a table of 2048 identical, pre-assembled
//!   trampolines (16 pages, 32 bytes each). Each loads a data word into
//!   `r10` and jumps to a target word, both RIP-relative, from its slot
//!   exactly 64 KiB (the table's size) ahead of it.
//! * A [`Pool`] maps the table again, read+exec, from the file it was
//!   loaded from (or from a memfd or temporary file written with `pwrite`,
//!   see [`Source`]), each copy followed by 64 KiB of ordinary read+write
//!   data pages. Allocating a trampoline means filling its data slot. Nothing is ever
//!   written to a code page, and no mapping is ever writable and executable,
//!   so it works under `PR_SET_MDWE` and `vm.memfd_noexec=2`.
//!
//! Two ways to use it:
//!
//! * [`Closure`]: a Rust closure behind an `unsafe extern "C" fn` pointer of
//!   the signature you name (up to five integer, pointer or floating-point
//!   arguments, see [`Signature`]). Freed, and its trampoline recycled, on
//!   drop; a panic inside aborts the process with a message instead of
//!   unwinding into C.
//! * [`Trampoline`]: the raw contract, also exported to C as
//!   `altpatch_trampoline_alloc` / `altpatch_trampoline_free`
//!   (`include/altpatch.h`). Calling the code address jumps to `target` with
//!   `r10` = `data` and every other register, the stack and the return
//!   address exactly as the caller left them. `r10` is the SysV
//!   static-chain register: caller-saved and never an argument.
//!
//! ```
//! use altpatch::trampoline::Closure;
//!
//! let offset = 40;
//! let add = Closure::<unsafe extern "C" fn(u32) -> u32>::new(move |x| x + offset).unwrap();
//! let f = add.code();
//! // SAFETY: `add` is alive, and the closure runs on this thread only.
//! assert_eq!(unsafe { f(2) }, 42);
//! ```
//!
//! Each trampoline starts with `endbr64`, so it is a valid indirect-branch
//! target where CET indirect-branch tracking is on. The pool grows by whole
//! copies of the table (doubling, up to eight copies per growth), maps them
//! near this crate's code (far calls cost more, see BENCHMARKS.md), reuses
//! freed trampolines, and never takes a lock: allocation and free are one
//! compare-and-swap each (see `pool.rs` for why that also keeps `fork`
//! safe). A pool's pages stay mapped until the pool is dropped (the global
//! pool: for the life of the process); a child after `fork` keeps every
//! trampoline working.
//!
//! Unsupported on purpose: by-value structs, 128-bit integers, `long
//! double`, variadic callbacks and more than five arguments (refused at
//! compile time, see [`Signature`]); the raw [`Trampoline`] has no such
//! limit, its target sees the caller's registers and stack unchanged.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

// The modules this crate's files name (`crate::arch`, `crate::os`, ...),
// as `altpatch` names them: the table and entries are the core's arch
// seam's, the loaded object the host contract's, the executable pages
// `altpatch-os`'s Linux backend's.
use altpatch_core::{arch, host, poke};
use altpatch_os as os;

mod backing;
mod capi;
mod closure;
mod pool;
// The table's code is the architecture's.
use crate::arch::closure_table as table;

pub use closure::{Arg, Closure, ClosureFn, Ret, Signature};

use alloc::vec::Vec;
use core::ffi::c_void;
use core::fmt;

/// Where a [`Pool`] gets its read+exec copies of the trampoline table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The executable or shared object that contains this crate, mapped
    /// again at the table's file offset. Writes nothing anywhere.
    OwnFile,
    /// A memfd holding a copy of the table (refused under
    /// `vm.memfd_noexec=2`).
    Memfd,
    /// An unlinked file in `/dev/shm`, `/tmp` or `/var/tmp` holding a copy
    /// of the table (refused where all are mounted `noexec`).
    TmpFile,
}

impl Source {
    /// The name `ALTPATCH_TRAMPOLINE` accepts for it.
    ///
    /// ```
    /// assert_eq!(altpatch::trampoline::Source::OwnFile.name(), "file");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Source::OwnFile => "file",
            Source::Memfd => "memfd",
            Source::TmpFile => "tmpfile",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::OwnFile => "the file containing altpatch",
            Source::Memfd => "a memfd",
            Source::TmpFile => "a temporary file",
        })
    }
}

/// The order [`Pool::new`] tries.
const AUTO: &[Source] = &[Source::OwnFile, Source::Memfd, Source::TmpFile];

/// `ALTPATCH_TRAMPOLINE=file|memfd|tmpfile` pins the source of pools that
/// choose automatically (read when a pool opens its source).
fn env_order() -> Option<&'static [Source]> {
    match std::env::var("ALTPATCH_TRAMPOLINE").ok()?.as_str() {
        "file" => Some(&[Source::OwnFile]),
        "memfd" => Some(&[Source::Memfd]),
        "tmpfile" => Some(&[Source::TmpFile]),
        _ => None,
    }
}

/// Why a source could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRefusal {
    /// The source.
    pub source: Source,
    /// The call (or check) that failed.
    pub call: &'static str,
    /// Its error number (0 for a check).
    pub errno: i32,
}

impl fmt::Display for SourceRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} failed", self.source, self.call)?;
        if self.errno != 0 {
            write!(f, ": {}", std::io::Error::from_raw_os_error(self.errno))?;
        }
        Ok(())
    }
}

/// Why a trampoline could not be allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrampolineError {
    /// No source of code pages works in this process; why each was refused.
    NoSource {
        /// One refusal per source tried, in order.
        refusals: Vec<SourceRefusal>,
    },
    /// A system call failed while the pool grew.
    Os {
        /// The call.
        call: &'static str,
        /// Its error number.
        errno: i32,
    },
    /// A mapped copy of the table differs from the table (the file was
    /// replaced on disk since it was loaded); nothing of it was used.
    NotTheTable {
        /// The file mapped.
        path: alloc::string::String,
    },
}

impl fmt::Display for TrampolineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrampolineError::NoSource { refusals } => {
                f.write_str("no source of trampoline pages works here")?;
                for r in refusals {
                    write!(f, "; {r}")?;
                }
                Ok(())
            }
            TrampolineError::Os { call, errno } => write!(
                f,
                "{call} failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            TrampolineError::NotTheTable { path } => write!(
                f,
                "the page mapped from {path} is not altpatch's trampoline table \
                 (was the file replaced since it was loaded?)"
            ),
        }
    }
}

impl std::error::Error for TrampolineError {}

/// Ends the process with `why` on standard error: used where returning or
/// unwinding would mean running code we cannot vouch for.
pub(crate) fn abort_with(why: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "altpatch: {why}; aborting");
    std::process::abort()
}

/// A pool of trampolines.
///
/// Most programs use the process-wide [`Pool::global`] (what
/// [`Closure::new`] and [`Trampoline::new`] use). A pool of your own pins
/// the [`Source`] or keeps its pages apart; dropping it unmaps them, which
/// the borrow checker only allows once every trampoline of it is gone.
///
/// ```
/// use altpatch::trampoline::{Closure, Pool, Source};
///
/// static FROM_FILE: Pool = Pool::with_source(Source::OwnFile);
/// let c = Closure::<unsafe extern "C" fn() -> i32>::new_in(&FROM_FILE, || 7).unwrap();
/// // SAFETY: `c` is alive.
/// assert_eq!(unsafe { c.code()() }, 7);
/// assert_eq!(FROM_FILE.source(), Some(Source::OwnFile));
/// assert_eq!(FROM_FILE.stats().in_use, 1);
/// ```
pub struct Pool {
    state: pool::PoolState,
}

/// What a pool holds, from [`Pool::stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Code pages mapped (16 per copy of the table, each copy followed by
    /// as many data pages).
    pub pages: usize,
    /// Trampolines each code page holds.
    pub per_page: usize,
    /// Trampolines handed out and not yet freed.
    pub in_use: usize,
}

impl Pool {
    /// A pool that tries [`Source::OwnFile`], then [`Source::Memfd`], then
    /// [`Source::TmpFile`] (or only the one `ALTPATCH_TRAMPOLINE` names).
    /// Maps nothing until the first allocation.
    ///
    /// ```
    /// static POOL: altpatch::trampoline::Pool = altpatch::trampoline::Pool::new();
    /// assert_eq!(POOL.stats().pages, 0);
    /// ```
    pub const fn new() -> Pool {
        Pool {
            state: pool::PoolState::new(AUTO),
        }
    }

    /// A pool that uses only `source`.
    ///
    /// ```
    /// use altpatch::trampoline::{Pool, Source};
    /// let pool = Pool::with_source(Source::TmpFile);
    /// # let _ = pool;
    /// ```
    pub const fn with_source(source: Source) -> Pool {
        let order: &'static [Source] = match source {
            Source::OwnFile => &[Source::OwnFile],
            Source::Memfd => &[Source::Memfd],
            Source::TmpFile => &[Source::TmpFile],
        };
        Pool {
            state: pool::PoolState::new(order),
        }
    }

    /// The process-wide pool.
    ///
    /// ```
    /// let pool = altpatch::trampoline::Pool::global();
    /// # let _ = pool;
    /// ```
    pub fn global() -> &'static Pool {
        static GLOBAL: Pool = Pool::new();
        &GLOBAL
    }

    /// Opens the pool's source now (the first allocation does otherwise),
    /// so a program learns at start-up whether trampolines work here.
    ///
    /// ```
    /// let source = altpatch::trampoline::Pool::global().prepare().unwrap();
    /// println!("trampolines mapped from {source}");
    /// ```
    pub fn prepare(&self) -> Result<Source, TrampolineError> {
        self.state.backing().map(|b| b.source)
    }

    /// The source in use, once one is open.
    ///
    /// ```
    /// use altpatch::trampoline::Pool;
    /// let pool = Pool::new();
    /// assert_eq!(pool.source(), None);
    /// ```
    pub fn source(&self) -> Option<Source> {
        self.state.source()
    }

    /// How many pages the pool maps and how many trampolines are in use.
    ///
    /// ```
    /// let s = altpatch::trampoline::Pool::new().stats();
    /// assert_eq!((s.pages, s.per_page, s.in_use), (0, 128, 0));
    /// ```
    pub fn stats(&self) -> PoolStats {
        let (pages, in_use) = self.state.counts();
        PoolStats {
            pages,
            per_page: table::PER_PAGE,
            in_use,
        }
    }
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new()
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("source", &self.source())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A raw trampoline: a code address that jumps to a target with a data
/// word in `r10`. Freed (and given back to its pool) on drop.
///
/// ```
/// use altpatch::trampoline::Trampoline;
///
/// // A target that follows the contract: returns its data word plus rdi.
/// # fn main() {
/// #     example();
/// # }
/// core::arch::global_asm!(
///     ".globl doc_data_plus_arg",
///     "doc_data_plus_arg:",
///     "lea rax, [r10 + rdi]",
///     "ret",
/// );
/// unsafe extern "C" {
///     fn doc_data_plus_arg();
/// }
///
/// # fn example() {
/// let t = Trampoline::new(doc_data_plus_arg, 1000 as *mut _).unwrap();
/// // SAFETY: the code address takes one integer and returns one (what the
/// // target does).
/// let f: unsafe extern "C" fn(usize) -> usize = unsafe { core::mem::transmute(t.code()) };
/// // SAFETY: `t` is alive, and its target reads only rdi and r10.
/// assert_eq!(unsafe { f(42) }, 1042);
/// # }
/// ```
pub struct Trampoline<'p> {
    pool: &'p Pool,
    code: usize,
}

impl Trampoline<'static> {
    /// A trampoline of the [global pool](Pool::global) jumping to `target`
    /// with `r10` = `data`.
    ///
    /// See the [type's example](Trampoline).
    pub fn new(
        target: unsafe extern "C" fn(),
        data: *mut c_void,
    ) -> Result<Trampoline<'static>, TrampolineError> {
        Trampoline::new_in(Pool::global(), target, data)
    }
}

impl<'p> Trampoline<'p> {
    /// A trampoline of `pool` jumping to `target` with `r10` = `data`.
    ///
    /// ```
    /// use altpatch::trampoline::{Pool, Trampoline};
    /// extern "C" fn nothing() {}
    /// let pool = Pool::new();
    /// let t = Trampoline::new_in(&pool, nothing, core::ptr::null_mut()).unwrap();
    /// // SAFETY: `nothing` takes no arguments and ignores r10.
    /// unsafe { core::mem::transmute::<_, extern "C" fn()>(t.code())() };
    /// ```
    pub fn new_in(
        pool: &'p Pool,
        target: unsafe extern "C" fn(),
        data: *mut c_void,
    ) -> Result<Trampoline<'p>, TrampolineError> {
        let code = pool.state.alloc(target as usize, data as usize)?;
        Ok(Trampoline { pool, code })
    }

    /// The code address: call it as the function `target` is (with the
    /// data word in `r10`).
    ///
    /// See the [type's example](Trampoline).
    pub fn code(&self) -> *const c_void {
        self.code as *const c_void
    }

    /// The data word `target` receives in `r10`.
    ///
    /// ```
    /// use altpatch::trampoline::Trampoline;
    /// extern "C" fn nothing() {}
    /// let t = Trampoline::new(nothing, 5 as *mut _).unwrap();
    /// assert_eq!(t.data() as usize, 5);
    /// ```
    pub fn data(&self) -> *mut c_void {
        // SAFETY: `self` holds the trampoline, allocated and not freed.
        unsafe { self.pool.state.data(self.code) as *mut c_void }
    }

    /// Gives the trampoline a new target and data word. A call already
    /// past the trampoline's loads finishes with the old pair; each new
    /// call reads both words separately, so callers racing with the change
    /// may see the new data with the old target.
    ///
    /// ```
    /// use altpatch::trampoline::Trampoline;
    /// extern "C" fn one() -> i32 { 1 }
    /// extern "C" fn two() -> i32 { 2 }
    /// /// `f` as a raw trampoline target.
    /// fn raw(f: extern "C" fn() -> i32) -> unsafe extern "C" fn() {
    ///     // SAFETY: only the type changes; the trampoline jumps to the
    ///     // function, and its callers call it as `fn() -> i32`.
    ///     unsafe { core::mem::transmute(f) }
    /// }
    /// let mut t = Trampoline::new(raw(one), core::ptr::null_mut()).unwrap();
    /// // SAFETY: the trampoline reaches `one` or `two`, both `fn() -> i32`,
    /// // and `t` outlives every call below.
    /// let f: extern "C" fn() -> i32 = unsafe { core::mem::transmute(t.code()) };
    /// assert_eq!(f(), 1);
    /// t.retarget(raw(two), core::ptr::null_mut());
    /// assert_eq!(f(), 2);
    /// ```
    pub fn retarget(&mut self, target: unsafe extern "C" fn(), data: *mut c_void) {
        // SAFETY: `self` holds the trampoline, allocated and not freed.
        unsafe {
            self.pool
                .state
                .set(self.code, target as usize, data as usize)
        }
    }

    /// Keeps the trampoline allocated for the rest of the process (or of
    /// its pool) and returns its code address.
    ///
    /// ```
    /// use altpatch::trampoline::Trampoline;
    /// extern "C" fn nothing() {}
    /// let code = Trampoline::new(nothing, core::ptr::null_mut()).unwrap().leak();
    /// assert!(!code.is_null());
    /// ```
    pub fn leak(self) -> *const c_void {
        let code = self.code;
        core::mem::forget(self);
        code as *const c_void
    }
}

impl Drop for Trampoline<'_> {
    fn drop(&mut self) {
        // SAFETY: `self` holds the trampoline; once dropped nobody may call
        // it (a stray call reaches `called_after_free` until it is reused).
        // A `false` here means C freed it through the C interface first
        // (its contract forbids that); nothing more to do either way.
        let _ = unsafe { self.pool.state.free(self.code) };
    }
}

impl fmt::Debug for Trampoline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Trampoline({:#x})", self.code)
    }
}
