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
//! object — and rewrites each stub's `jmp` to the implementation: in
//! place through `/proc/self/mem` while the process has one thread (no
//! other can run the text), by page swap otherwise (another library's
//! constructor may have started a thread); either way the text stays the
//! file's mapping, for uprobes and profilers. An ifunc first called before that
//! (from an earlier constructor) makes its own stub direct on the way
//! ([`after_first_call`]). The calls the ifunc's function recorded (see
//! `call.rs`: every caller, in any crate, where the signature allows) are
//! rewritten in the same publication to `call <impl>`, as direct as a
//! call written to the implementation; any other caller pays one direct
//! `jmp` at the stub, no load and no indirect branch.
//!
//! Opt-out: the `no-startup` cargo feature, or `startup=off` in `ALTPATCH`
//! (see [`crate::cpu::Overrides`]); then nothing is patched until the
//! program calls [`init`](super::init) or [`apply`](super::apply).
//!
//! What happened is kept for [`startup`].

use core::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use alloc::vec::Vec;

use super::Ifunc;
use crate::image::Image;
use crate::os::linux::JmpEdit;
use crate::records::IfuncRecord;
use crate::static_call::{TRAMPOLINE_JMP, TRAMPOLINE_LEN, is_trampoline};

/// Whether this object's start-up ran: not yet, running or done.
static STATE: AtomicU8 = AtomicU8::new(0);
const DONE: u8 = 2;

/// What the start-up of this object did.
static OUTCOME: OnceLock<Startup> = OnceLock::new();

/// What patching at load did in the object this copy of altpatch is linked
/// into (see [`ifunc::startup`](crate::ifunc::startup)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Startup {
    /// Not run (yet): no `ifunc!` in this object, or its constructors have
    /// not run.
    NotRun,
    /// Turned off: the `no-startup` feature or `ALTPATCH=startup=off`.
    Off,
    /// Every ifunc of the object was resolved, its stub made a direct
    /// `jmp` and its recorded calls direct `call`s.
    Applied {
        /// How many ifuncs.
        ifuncs: usize,
        /// How many recorded calls now call the implementation.
        calls: usize,
        /// Recorded calls left calling the stub (still correct, one `jmp`
        /// longer): a call whose 5 bytes straddle two pages (no single
        /// page swap changes it at once), or one that does not hold the
        /// `call <stub>` its record promises (a breakpoint on it).
        left: usize,
        /// How long it took (resolvers included), by the monotonic clock.
        took: core::time::Duration,
    },
    /// Nothing was written: why.
    Failed(StartupError),
}

/// Why patching at load wrote nothing (see [`Startup::Failed`]).
///
/// Kept as data, formatted only when printed: a library that only declares
/// ifuncs does not carry the formatting of every error into its users'
/// programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartupError {
    /// An ifunc's stub or choice cannot be patched.
    Ifunc {
        /// The ifunc's name.
        name: &'static str,
        /// Its stub's address.
        stub: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The text could not be written.
    Poke(crate::poke::PokeError),
}

impl core::fmt::Display for StartupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartupError::Ifunc { name, stub, why } => {
                write!(f, "ifunc `{name}` (stub {stub:#x}): {why}")
            }
            StartupError::Poke(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for StartupError {}

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
        let start = std::time::Instant::now();
        match apply_stubs() {
            Ok((ifuncs, calls, left)) => Startup::Applied {
                ifuncs,
                calls,
                left,
                took: start.elapsed(),
            },
            Err(e) => Startup::Failed(e),
        }
    } else {
        Startup::Off
    };
    let _ = OUTCOME.set(outcome);
    STATE.store(DONE, Ordering::Release);
}

/// Resolves every ifunc of this object with the published snapshot and
/// rewrites each stub to a direct `jmp` and each recorded call to a direct
/// `call`, in one publication. Returns the ifuncs, the calls rewritten and
/// the calls left.
fn apply_stubs() -> Result<(usize, usize, usize), StartupError> {
    let image = Image::current();
    let records = image.ifuncs();
    if records.is_empty() {
        return Ok((0, 0, 0));
    }
    let features = crate::cpu::published();
    let ifuncs: Vec<&'static Ifunc> = records.iter().map(IfuncRecord::ifunc).collect();
    let _locks: Vec<_> = ifuncs.iter().map(|i| i.call.lock()).collect();
    let mut edits = Vec::with_capacity(ifuncs.len());
    let mut chosen = Vec::with_capacity(ifuncs.len());
    for &ifunc in &ifuncs {
        let c = ifunc.resolve(&features);
        edits.push(stub_edit(&image, ifunc, c)?);
        chosen.push(c);
    }
    let mut targets: Vec<(usize, usize)> = ifuncs
        .iter()
        .zip(&chosen)
        .map(|(i, &c)| (i.stub(), c))
        .collect();
    crate::poke::sort_by_key(&mut targets, |&t| t);
    let (calls, left) = super::call::call_edits(&image, &targets, &mut edits);
    // SAFETY: each edit is a stub's `jmp`, or a recorded `call` of a stub,
    // replaced by a `jmp` or `call` to the resolver's choice (its declared
    // type, checked by the macro), which other threads may be running:
    // published one page at a time, no edit straddling two.
    unsafe { crate::os::linux::retarget_jmps(&edits) }.map_err(StartupError::Poke)?;
    for (ifunc, c) in ifuncs.iter().zip(chosen) {
        ifunc.call.committed(Some(c));
    }
    Ok((ifuncs.len(), calls, left))
}

/// The edit that makes `ifunc`'s stub jump to `chosen`: its layout and its
/// current `jmp` checked as bytes (no decoding).
fn stub_edit(image: &Image<'_>, ifunc: &Ifunc, chosen: usize) -> Result<JmpEdit, StartupError> {
    let stub = ifunc.stub();
    let fail = |why: &'static str| StartupError::Ifunc {
        name: ifunc.name(),
        stub,
        why,
    };
    if !image.contains_text(chosen, 1) || !image.contains_text(stub, TRAMPOLINE_LEN) {
        return Err(fail(
            "the stub or the implementation is outside this object's text",
        ));
    }
    let mut bytes = [0u8; TRAMPOLINE_LEN];
    // SAFETY: inside the image's text, readable.
    unsafe {
        core::ptr::copy_nonoverlapping(stub as *const u8, bytes.as_mut_ptr(), TRAMPOLINE_LEN)
    };
    if !is_trampoline(&bytes) {
        return Err(fail("not a stub"));
    }
    let addr = stub + TRAMPOLINE_JMP;
    let jmp =
        crate::x86::jmp_rel32(addr, chosen).map_err(|_| fail("implementation out of reach"))?;
    let mut new = [0u8; 5];
    new.copy_from_slice(&jmp);
    let mut old = [0u8; 5];
    old.copy_from_slice(&bytes[TRAMPOLINE_JMP..TRAMPOLINE_JMP + 5]);
    Ok(JmpEdit { addr, old, new })
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
    let _lock = ifunc.call.lock();
    if ifunc.call.target() == Some(chosen) {
        return;
    }
    let Ok(edit) = stub_edit(&Image::current(), ifunc, chosen) else {
        return;
    };
    // SAFETY: as in `apply_stubs`.
    if unsafe { crate::os::linux::retarget_jmps(&[edit]) }.is_ok() {
        ifunc.call.committed(Some(chosen));
    }
}
