//! Writing text: the [`TextPoke`] trait and its implementations.
//!
//! A poke has two duties: put bytes at a text address, and make every CPU or
//! thread that may execute them observe the change. [`Plan::apply`]
//! drives it in batches:
//!
//! ```text
//! begin(pages) ─► write* ─► commit ─► sync          (success)
//! begin(pages) ─► write* ─✗  (rollback writes) ─► abort ─► sync   (failure)
//! ```
//!
//! Implementations:
//!
//! * [`DirectPoke`]: stores straight into text that is writable (early boot,
//!   a kernel's own RWX identity map, or memory that is not text at all), then
//!   serializes the calling CPU. `no_std`.
//! * `altpatch::os::linux::LinuxPoke` (feature `std`): a Linux process patching its own text
//!   without ever creating a writable and executable mapping; works under
//!   `PR_SET_MDWE`.
//! * [`FaultInjectingPoke`]: wraps another poke and fails on the k-th write,
//!   for testing that failed batches leave text untouched.
//!
//! An embedder with its own way of writing text (a fixmap alias, a
//! temporary mm) and of synchronizing CPUs (IPIs) implements the trait:
//!
//! ```
//! use core::ops::Range;
//! use altpatch::{PokeError, TextPoke};
//!
//! /// Writes through a fixed offset to a writable alias of text.
//! struct AliasPoke { delta: usize }
//!
//! // SAFETY: writes land in the alias of exactly the addressed text bytes;
//! // `sync` would broadcast a serializing IPI in a real kernel (one CPU here).
//! unsafe impl TextPoke for AliasPoke {
//!     fn begin(&mut self, _pages: &[Range<usize>]) -> Result<(), PokeError> { Ok(()) }
//!     unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
//!         // SAFETY: the caller guarantees `addr` is text announced to `begin`;
//!         // the alias maps it writable at `addr + delta`.
//!         unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (addr + self.delta) as *mut u8, bytes.len()) };
//!         Ok(())
//!     }
//!     fn commit(&mut self) -> Result<(), PokeError> { Ok(()) }
//!     fn abort(&mut self) {}
//!     fn sync(&mut self) -> Result<(), PokeError> { Ok(()) }
//! }
//! ```
//!
//! [`Plan::apply`]: crate::plan::Plan::apply

use core::fmt;
use core::ops::Range;

use crate::host::write_errno;

mod direct;
mod fault;
pub mod live;
#[cfg(feature = "std")]
mod order;
mod pages;

pub use direct::{DirectPoke, SyncMethod};
pub use fault::{FaultInjectingPoke, FaultPoint};
#[cfg(feature = "std")]
#[doc(hidden)]
pub use order::sort_by_key;
#[doc(hidden)]
pub use pages::page_span;
#[cfg(feature = "std")]
#[doc(hidden)]
pub use pages::unknown_pages;
// The OS backend's ways of writing text, which `PokeError::NoStrategy`
// lists (a process's: without `std` there are none).
#[cfg(feature = "std")]
pub use crate::host::{Refusal, Strategy};
// The few-byte helpers live at the bottom layer; plans and pokes name them
// through here as before.
#[doc(hidden)]
pub use crate::short::{copy_short, in_ranges, load_short, short_eq};

/// Size of the pages batches are grouped by: the architecture's (4096 on
/// x86-64).
pub const PAGE_SIZE: usize = crate::arch::PAGE_SIZE;

/// Why a poke failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PokeError {
    /// A system call failed with `errno`.
    Os {
        /// The call (`"mmap"`, `"memfd_create"`, ...).
        call: &'static str,
        /// The error number.
        errno: i32,
    },
    /// The range is not ordinary read+execute text this poke can rewrite.
    NotText {
        /// First address of the offending range.
        addr: usize,
        /// What was found there instead.
        why: &'static str,
    },
    /// A write outside the pages announced to [`TextPoke::begin`].
    OutsideBatch {
        /// The address written.
        addr: usize,
    },
    /// A failure injected by [`FaultInjectingPoke`].
    Injected {
        /// Which operation failed.
        at: FaultPoint,
    },
    /// The operation cannot be done by this poke.
    Unsupported(&'static str),
    /// A poke for running code (page swap or INT3) refused an edit that
    /// does not replace one instruction by one: a thread may be between
    /// the old instructions, so the edit is only safe with other threads
    /// stopped. Nothing was written.
    NotLiveSafe {
        /// The edit's address.
        addr: usize,
        /// Which rule the edit breaks.
        rule: &'static str,
    },
    /// A write was published but the text does not hold its bytes: the
    /// executable mapping at `addr` is no longer the one written (a debugger's
    /// private copy, a re-loaded object, someone's `mmap`), even after the
    /// page was re-homed once.
    NotLanded {
        /// First address whose bytes differ.
        addr: usize,
    },
    /// Every way of writing text was refused (Linux: see
    /// [`Strategy`]); one refusal per strategy tried, in order. (`std`:
    /// the strategies are the OS backend's.)
    #[cfg(feature = "std")]
    NoStrategy {
        /// What each strategy's probe ran into.
        refusals: [Option<Refusal>; 3],
    },
    /// The text at `addr` is a mapping of a file, and publishing this batch
    /// would have turned it into memory the kernel and the tools outside
    /// the process do not know as that file: a uprobe's breakpoint copied
    /// into it would kill the process, and perf, gdb and `/proc/self/maps`
    /// would lose the binary. Nothing was written.
    LeavesFile {
        /// A page of that text.
        addr: usize,
        /// Why the page could not stay the file's.
        why: &'static str,
        /// The error number behind `why` (0 if none).
        errno: i32,
    },
    /// The text at `addr` is sealed (`mseal(2)`, or a loader honouring
    /// `-z memory-seal`): it cannot be remapped, only changed in place, and
    /// the in-place way that is safe while threads run was not possible.
    /// Nothing was written.
    Sealed {
        /// A sealed page.
        addr: usize,
        /// Why no publication the seal allows could be used.
        why: &'static str,
    },
    /// The INT3 protocol was refused because a thread could not survive a
    /// trap: it blocks `SIGTRAP`, or the program replaced the crate's
    /// `SIGTRAP` handler.
    SignalState {
        /// What was found.
        why: &'static str,
        /// The thread concerned (0 if not one thread).
        tid: i32,
    },
}

impl fmt::Display for PokeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PokeError::Os { call, errno } => {
                write!(f, "{call} failed: ")?;
                write_errno(f, *errno)
            }
            PokeError::NotText { addr, why } => {
                write!(f, "{addr:#x} is not patchable text: {why}")
            }
            PokeError::OutsideBatch { addr } => {
                write!(f, "write at {addr:#x} outside the pages of the batch")
            }
            PokeError::Injected { at } => write!(f, "injected failure at {at:?}"),
            PokeError::Unsupported(what) => write!(f, "unsupported: {what}"),
            PokeError::NotLiveSafe { addr, rule } => write!(
                f,
                "edit at {addr:#x} is not safe while other threads run: {rule}; a thread may be \
                 between its old instructions (moving back to more mitigation re-routes an \
                 inlined site through its thunk, for instance). Apply it with other threads \
                 stopped, through an in-place poke (LinuxPoke::new); nothing written"
            ),
            PokeError::NotLanded { addr } => write!(
                f,
                "write at {addr:#x} did not land: the executable mapping there is not the one written"
            ),
            #[cfg(feature = "std")]
            PokeError::NoStrategy { refusals } => {
                f.write_str("no way to write text is allowed here")?;
                for r in refusals.iter().flatten() {
                    write!(f, "; {r}")?;
                }
                Ok(())
            }
            PokeError::LeavesFile { addr, why, errno } => {
                write!(f, "text at {addr:#x} maps a file, and {why}")?;
                if *errno != 0 {
                    f.write_str(" (")?;
                    write_errno(f, *errno)?;
                    f.write_str(")")?;
                }
                f.write_str(
                    "; it would become memory the kernel and the tools outside the process \
                     (uprobes, perf, debuggers) do not know as that file, where a uprobe's \
                     breakpoint kills the process. Nothing written",
                )
            }
            PokeError::Sealed { addr, why } => write!(
                f,
                "text at {addr:#x} is sealed (mseal): it cannot be remapped, and {why}. Nothing \
                 written"
            ),
            PokeError::SignalState { why, tid } => {
                write!(f, "INT3 protocol refused: {why}")?;
                if *tid != 0 {
                    write!(f, " (thread {tid})")?;
                }
                Ok(())
            }
        }
    }
}

impl PokeError {
    /// The address of the site the error is about, where it names one
    /// (see `altpatch::Error::site`).
    pub fn site(&self) -> Option<usize> {
        match self {
            PokeError::NotText { addr, .. }
            | PokeError::OutsideBatch { addr }
            | PokeError::NotLiveSafe { addr, .. }
            | PokeError::NotLanded { addr, .. }
            | PokeError::LeavesFile { addr, .. }
            | PokeError::Sealed { addr, .. } => Some(*addr),
            _ => None,
        }
    }
}

impl core::error::Error for PokeError {}

/// Writes text and makes every executing context observe it.
///
/// [`Plan::apply`](crate::plan::Plan::apply) calls the methods in this order for
/// each batch: [`begin`](Self::begin) once with every page the batch will
/// touch; [`write`](Self::write) for each edit; then either
/// [`commit`](Self::commit) or (after a failure, once the plan has written
/// the old bytes back) [`abort`](Self::abort); then [`sync`](Self::sync).
///
/// # Safety
///
/// Implementors promise that once `commit` and `sync` have returned `Ok`,
/// every byte passed to `write` in the batch is what instruction fetch on
/// every CPU or thread that may run the text observes at that address, and
/// that no other byte of text was changed. A poke that stages writes and
/// publishes them in `commit` must publish nothing on `abort`; a poke that
/// writes in place relies on the plan's rollback writes before `abort`.
pub unsafe trait TextPoke {
    /// Starts a batch that will write only inside `pages`: sorted, disjoint,
    /// page-aligned ranges, each touched by at least one write. This is the
    /// place to make the pages writable or to stage copies of them, once per
    /// page per batch.
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError>;

    /// Writes `bytes` at text address `addr`.
    ///
    /// # Safety
    ///
    /// `addr..addr + bytes.len()` lies inside the pages passed to `begin`
    /// for this batch, and `bytes` is what the caller has validated should
    /// be there (other threads may execute it once published).
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError>;

    /// Publishes the batch's writes. On error, the poke has published either
    /// nothing or a prefix of the pages; the plan then writes the old bytes
    /// back in a new batch.
    fn commit(&mut self) -> Result<(), PokeError>;

    /// Ends a failed batch without publishing anything still staged.
    fn abort(&mut self);

    /// Makes every CPU/thread that may execute text observe the committed
    /// bytes (a core-serializing event on each).
    fn sync(&mut self) -> Result<(), PokeError>;

    /// Whether the current text bytes can be read at their own addresses
    /// (true for every poke in this crate). When true, validation compares
    /// text in place; when false, it copies it out with
    /// [`read`](Self::read). A poke that overrides `read` to look elsewhere
    /// must return false here.
    fn reads_in_place(&self) -> bool {
        true
    }

    /// How this poke writes and publishes, for reports (e.g. `"pwrite to
    /// /proc/self/mem, page swap"`); empty if it does not say.
    fn method(&self) -> &'static str {
        ""
    }

    /// Reads the current text bytes at `addr` into `out`.
    ///
    /// # Safety
    ///
    /// `addr..addr + out.len()` is mapped and readable.
    #[inline]
    unsafe fn read(&self, addr: usize, out: &mut [u8]) -> Result<(), PokeError> {
        // SAFETY: the caller guarantees the range is readable; text is only
        // modified under the patcher's own serialization, so this is not a
        // data race with another writer.
        unsafe { copy_short(addr as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}
