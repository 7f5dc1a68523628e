//! The running program as one context (`std`, Linux): what the one-liners
//! that patch it — `KEY.enable()`, `NAME::update(f)` — find once and share.
//!
//! This layer sits above every mechanism and the patcher: the mechanisms
//! plan and apply over any image, text poke and site list (what a kernel
//! uses), and only here are those the running program's, its loader's
//! and Linux's. The one-liners are inherent methods of the mechanisms'
//! types written here (`keys.rs`, `calls.rs`), so their paths are the
//! types' while the mechanisms themselves import no OS backend for them.
//!
//! One context: the image of the object this copy of altpatch is linked
//! into, found once, and beside it what each mechanism indexes from it on
//! first use (the keys' sites, the static calls' sites by trampoline) —
//! each built under the process lock, which `fork` waits for, so a child
//! never inherits a half-built index. [`patcher`] is the [`Patcher`] over
//! it, and [`apply_alternatives`] the alternatives' one-liner through it.

use std::sync::OnceLock;

use crate::cpu::Features;
use crate::error::Error;
use crate::image::Image;
use crate::os::{Process, ProcessBackend};
use crate::patcher::{PatchReport, Patcher};

mod calls;
mod keys;
mod load_alternatives;
mod load_ifuncs;

#[doc(hidden)]
pub use load_alternatives::__alternative_at_load;
#[doc(hidden)]
pub use load_ifuncs::{__ifunc_at_load, __ifunc_lazy_target};

/// The running program: its image, and each mechanism's index of it.
pub(crate) struct Running {
    pub(crate) image: Image<'static>,
    keys: OnceLock<crate::static_key::KeyIndex>,
    calls: OnceLock<calls::ByTrampoline>,
}

/// The running program's context, found once.
pub(crate) fn running() -> &'static Running {
    static RUNNING: OnceLock<Running> = OnceLock::new();
    initialized(&RUNNING, || Running {
        image: Image::current(),
        keys: OnceLock::new(),
        calls: OnceLock::new(),
    })
}

impl Running {
    /// The keys' sites in the running program.
    pub(crate) fn keys(&self) -> &crate::static_key::KeyIndex {
        initialized(&self.keys, || crate::static_key::KeyIndex::new(&self.image))
    }

    /// The static calls' sites by trampoline in the running program.
    fn calls(&self) -> &calls::ByTrampoline {
        initialized(&self.calls, calls::by_trampoline)
    }
}

/// `cell`'s value, built by `init` under the process lock if it is not yet:
/// `fork` waits for that lock, so a child never inherits an initialization
/// another thread was in the middle of (it would wait for it forever). The
/// lock is re-entrant: `init` may take it again.
fn initialized<T>(cell: &OnceLock<T>, init: impl FnOnce() -> T) -> &T {
    if let Some(v) = cell.get() {
        return v;
    }
    let _held = crate::sync::Held::acquire();
    cell.get_or_init(init)
}

/// The running program's [`Patcher`]: the image of the object this copy
/// of altpatch is linked into (found once), the published feature snapshot
/// ([`crate::cpu::published`]: what patching at load and C resolvers
/// use), and the program's compiler-generated sites (its relocations or
/// embedded table, parsed once per process; none where it has neither, so
/// retpolines and relocated call sites are then not found).
///
/// ```
/// use altpatch::retpoline::{Mode, Policy};
///
/// let mut patcher = altpatch::process::patcher();
/// patcher.alternatives()?.ifuncs()?;
/// print!("{patcher}"); // the dry run: nothing is written
/// # let _ = Policy::new(Mode::Plain, "example");
/// # Ok::<(), altpatch::Error>(())
/// ```
pub fn patcher() -> Patcher<'static> {
    let features: Features = crate::cpu::published();
    let sites = crate::elf::current_sites().unwrap_or(&[]);
    Patcher::new(&running().image, &features, sites)
}

/// Applies every alternative of the running program for the published
/// snapshot: [`patcher`]`().alternatives()`, validated, then written in
/// place through `/proc/self/mem` (the text stays the file's). Patching at
/// load does this by itself while the process has one thread
/// ([`crate::alternative::startup`]); this is the call for a program that
/// turned that off or started threads first, at a moment of its choosing.
///
/// # Safety
///
/// No thread may execute an alternative site of the program during the
/// call (a site may change from several instructions to others): call it
/// before starting threads, or with the others parked outside the sites.
///
/// ```
/// fn answer() -> u64 {
///     let r: u64;
///     // SAFETY: both sequences only set `r`.
///     unsafe { altpatch::alternative!("mov {r}, 1", [always => "mov {r}, 2"], r = out(reg) r) };
///     r
/// }
///
/// fn main() -> Result<(), altpatch::Error> {
///     // SAFETY: this example runs no other thread.
///     let report = unsafe { altpatch::process::apply_alternatives() }?;
///     assert_eq!(answer(), 2);
///     print!("{report}");
///     Ok(())
/// }
/// ```
pub unsafe fn apply_alternatives() -> Result<PatchReport<'static>, Error> {
    let mut patcher = patcher();
    patcher.alternatives()?;
    let mut poke = Process::in_place_poke()?;
    // SAFETY: the caller's: no thread runs an alternative site while the
    // sites are written in place; the snapshot is the published one, which
    // never claims what the CPU lacks.
    unsafe { patcher.apply(&mut poke) }
}
