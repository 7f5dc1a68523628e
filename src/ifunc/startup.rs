//! Patching without the application's help: when the object holding an
//! `ifunc!` is loaded, and on an ifunc's first call.
//!
//! A library's author writes `ifunc!`; the application that (indirectly)
//! depends on the library never calls anything. So every `ifunc!`
//! registers a constructor (an `.init_array` entry, what the loader runs
//! for an executable before `main` and for a shared object inside
//! `dlopen`), [`at_load`]: the first of them to run in an object resolves
//! every ifunc of that object — the records between this copy of
//! altpatch's `__start_`/`__stop_` bounds, which the linker makes per
//! object — and rewrites each stub's `jmp` to the implementation, by page
//! swap (safe if other threads exist already: another library's
//! constructor may have started one). An ifunc first called before that
//! (from an earlier constructor) makes its own stub direct on the way
//! ([`after_first_call`]). Either way, from then on every caller — also a
//! caller in another crate, which reaches the stub through a register the
//! linker loaded with its address — pays one direct `jmp`, no load and no
//! indirect branch.
//!
//! Opt-out: the `no-startup` cargo feature, or `startup=off` in `ALTPATCH`
//! (see [`crate::cpu::Overrides`]); then nothing is patched until the
//! program calls [`init`](super::init) or [`apply`](super::apply).
//!
//! What happened is kept for [`startup`].

use core::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use super::{Ifunc, Report, committed};
use crate::LinuxPoke;
use crate::image::Image;
use crate::plan::Plan;

/// Whether this object's start-up ran: not yet, running or done.
static STATE: AtomicU8 = AtomicU8::new(0);
const DONE: u8 = 2;

/// What the start-up of this object did.
static OUTCOME: OnceLock<Startup> = OnceLock::new();

/// What patching at load did in the object this copy of altpatch is linked
/// into (see the [module documentation](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Startup {
    /// Not run (yet): no `ifunc!` in this object, or its constructors have
    /// not run.
    NotRun,
    /// Turned off: the `no-startup` feature or `ALTPATCH=startup=off`.
    Off,
    /// Every ifunc of the object was resolved and its stub made a direct
    /// `jmp`.
    Applied {
        /// How many ifuncs.
        ifuncs: usize,
    },
    /// Nothing was written: why.
    Failed(std::string::String),
}

/// What patching at load did in this object.
///
/// ```
/// altpatch::ifunc! {
///     fn seven() -> u32 = pick;
/// }
/// extern "C" fn seven_impl() -> u32 { 7 }
/// fn pick(_: &altpatch::cpu::Features) -> extern "C" fn() -> u32 { seven_impl }
///
/// fn main() {
///     // The constructor `ifunc!` registered ran before `main`.
///     println!("{:?}", altpatch::ifunc::startup());
///     assert_eq!(seven(), 7);
/// }
/// ```
pub fn startup() -> Startup {
    OUTCOME.get().cloned().unwrap_or(Startup::NotRun)
}

/// The constructor every `ifunc!` registers; runs once per object, however
/// many entries point here (the first does the work).
#[doc(hidden)]
pub extern "C" fn at_load() {
    if STATE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let outcome = if crate::cpu::startup_allowed() {
        match apply_stubs() {
            Ok(n) => Startup::Applied { ifuncs: n },
            Err(e) => Startup::Failed(e),
        }
    } else {
        Startup::Off
    };
    let _ = OUTCOME.set(outcome);
    STATE.store(DONE, Ordering::Release);
}

/// Resolves every ifunc of this object with the published snapshot and
/// rewrites each stub to a direct `jmp`, in one batch.
fn apply_stubs() -> Result<usize, std::string::String> {
    use std::string::ToString;
    let image = Image::current();
    if image.ifuncs().is_empty() {
        return Ok(0);
    }
    let features = crate::cpu::published();
    let mut plan = Plan::for_image(&image);
    let (mut report, _locks): (Report, _) =
        super::plan_stubs(&image, &features, &mut plan).map_err(|e| e.to_string())?;
    let mut poke = LinuxPoke::running().map_err(|e| e.to_string())?;
    // SAFETY: every edit is a stub's `jmp` replaced by a `jmp` (one
    // instruction for one), published by the running poke, which other
    // threads may be executing.
    report.applied = unsafe { plan.apply(&mut poke) }.map_err(|e| e.to_string())?;
    committed(&mut report);
    Ok(report.ifuncs.len())
}

/// After the lazy path resolved `ifunc` (its first call): its stub becomes a
/// direct `jmp` to the implementation, so the next call skips the lazy
/// path. Best effort and silent: the lazy path stays correct if this does
/// not happen (start-up turned off, this thread in the middle of a batch,
/// a refused poke).
pub(super) fn after_first_call(ifunc: &Ifunc, chosen: usize) {
    if !crate::cpu::startup_allowed() || ifunc.call.target() == Some(chosen) {
        return;
    }
    let image = Image::current();
    if !image.contains_text(chosen, 1) {
        return;
    }
    let Ok(mut poke) = LinuxPoke::running() else {
        return;
    };
    let _lock = ifunc.call.lock();
    if ifunc.call.target() == Some(chosen) {
        return;
    }
    let mut plan = Plan::for_image(&image);
    if ifunc
        .call
        .plan_update(Some(chosen), &image, &[], &mut plan)
        .is_err()
    {
        return;
    }
    // SAFETY: the stub's `jmp` replaced by a `jmp`, published by the
    // running poke.
    if unsafe { plan.apply(&mut poke) }.is_ok() {
        ifunc.call.committed(Some(chosen));
    }
}
