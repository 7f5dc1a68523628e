//! Static calls: a call through a function pointer that changes rarely,
//! made a direct call.
//!
//! ```
//! altpatch::static_call! {
//!     /// Doubles or triples, depending on the machine.
//!     pub fn scale(x: u64) -> u64 = double;
//! }
//! extern "C" fn double(x: u64) -> u64 { x * 2 }
//! extern "C" fn triple(x: u64) -> u64 { x * 3 }
//!
//! fn main() {
//!     assert_eq!(scale(7), 14);           // a direct call to the trampoline
//!     scale::update(triple).unwrap();     // trampoline and every call site, live
//!     assert_eq!(scale(7), 21);
//!     assert_eq!(scale::target().map(|f| f(1)), Some(3));
//! }
//! ```
//!
//! [`static_call!`](macro@crate::static_call) declares a function and a
//! *trampoline*, 16 bytes, 16-byte aligned:
//!
//! ```text
//! +0   f3 0f 1e fa      endbr64          a valid target for indirect calls under CET IBT
//! +4   e9 <rel32>       jmp target       (ret; int3 x 4 for "none")
//! +9   0f b9 cc         ud1              the signature; stops straight-line speculation
//! +12  cc cc cc cc      int3 padding
//! ```
//!
//! The signature marks it as a trampoline for validation. Calling the
//! function is an ordinary Rust call, so the compiler emits
//! `call <trampoline>`; an update rewrites the `jmp` at
//! [`TRAMPOLINE_JMP`], never the `endbr64`.
//!
//! The trampoline is a naked `extern "C"` function (stable Rust has naked
//! functions only for explicit ABIs, and the Rust ABI is not stable enough
//! to jump into blindly), so what it jumps to is a C-ABI function of the
//! declared signature: an `extern "C"` target directly, or a Rust function
//! (or closure capturing nothing) through a C-ABI shim the macro generates
//! and rustc compiles the function into (`NAME::update_fn`, `NAME::c_fn`;
//! the declared default may be either). Targets come in and out typed
//! ([`StaticCall<F>`]), never as addresses.
//!
//! # In a library
//!
//! A static call declared in a library works without the application's
//! help: its trampoline holds the default from the start (nothing to
//! resolve at load), and an update rewrites the trampoline whatever the
//! application was linked with. Its calls need no relocations either:
//! where the C ABI passes the arguments and the result in registers
//! (integers, pointers and slices in at most six general-purpose ones, up
//! to four `f32`/`f64` in SSE ones), the function `static_call!` declares
//! is a direct `call <trampoline>` that records itself (`recorded.rs`), in
//! every caller, in any crate, and an update rewrites each recorded call
//! to `call <target>` as it rewrites the sites relocations list
//! ([`StaticCall::recorded_calls`]). Other signatures (more registers'
//! worth, aggregates in memory) are called as rustc calls any function: from another
//! crate or codegen unit through a register loaded with the trampoline's
//! address, which no relocation names, so they keep the trampoline's one
//! direct `jmp` (1.20× a direct call, `benches/libmode.rs`).
//!
//! An update rewrites, in one batch:
//!
//! * **out of line**: the trampoline's `jmp` (or `ret` for "none"), after
//!   its `endbr64`;
//! * **inline**: every recorded call, and every call site of the
//!   trampoline the image's relocations (or embedded site table) list — `call target`, a tail site
//!   `jmp target`; for none, a 5-byte NOP, or `ret` + `int3` at a tail site.
//!   A site the target is out of rel32 range from keeps calling the
//!   trampoline; conditional tail calls (`jcc`) always do.

use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::arch::{self, BranchKind};
use crate::image::Image;
use crate::plan::{Bytes, Edit, Expect, Plan, PlanError};
use crate::poke::TextPoke;
use crate::sites::{Site, SiteKind};
use crate::sync::{UpdateGuard, UpdateLock};

mod macros;
mod recorded;
mod typed;

#[doc(hidden)]
pub use crate::arch::{
    MAX_SSE as __MAX_SSE, RecordedArg as __RecordedArg, RecordedArgs as __RecordedArgs,
    RecordedRet as __RecordedRet,
};
#[cfg(feature = "std")]
pub(crate) use recorded::with_recorded;
#[doc(hidden)]
pub use recorded::{
    Plain as __Plain, Probe as __Probe, Recorded as __Recorded, Signature as __Signature,
    TrampolineStub as __TrampolineStub,
};
pub(crate) use recorded::{calls_of, recorded_probe};
pub use typed::StaticCall;
pub(crate) use typed::addr_of;
#[doc(hidden)]
pub use typed::{conjure_fn as __conjure_fn, fn_at as __fn_at};

#[cfg(target_arch = "x86_64")]
#[doc(no_inline)]
pub use crate::x86::ENDBR64;
// A trampoline's layout is the architecture's (arch/x86_64/trampoline.rs).
use crate::arch::BRANCH_RET as RET_FILL;
pub use crate::arch::{
    TRAMPOLINE_ALIGN, TRAMPOLINE_JMP, TRAMPOLINE_LEN, TRAMPOLINE_SIGNATURE, is_trampoline,
};

/// `target` values: "the declared default" (not yet updated) and "none".
const DEFAULT: usize = 0;
const NONE: usize = 1;

/// The untyped state behind one static call or ifunc stub: the
/// trampoline's address and the current target as an address.
/// [`StaticCall`] is its typed face.
pub(crate) struct RawStaticCall {
    name: &'static str,
    trampoline: fn() -> usize,
    default: fn() -> usize,
    returns_unit: bool,
    /// The kind of the trampoline's call sites (ifunc stubs reuse this).
    site_kind: SiteKind,
    /// `DEFAULT`, `NONE` or the target's address.
    target: AtomicUsize,
    /// What the inline call sites call now: `DEFAULT` (the trampoline),
    /// `NONE` (NOP) or the target's address.
    inline: AtomicUsize,
    busy: UpdateLock,
}

/// What an update did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Whether the trampoline was rewritten.
    pub trampoline: bool,
    /// Call sites now calling (or jumping to) the target directly.
    pub inlined: usize,
    /// Call sites left calling the trampoline (out of rel32 range, or
    /// conditional tail calls).
    pub via_trampoline: usize,
    /// Bytes-level outcome of the batch.
    pub applied: crate::plan::ApplyReport,
}

/// Why a static call could not be updated. Nothing was written.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The trampoline is not `endbr64`, `jmp rel32` (or `ret`) and the
    /// signature ([`is_trampoline`]).
    BadTrampoline {
        /// The static call's name.
        name: &'static str,
        /// Its address.
        addr: usize,
        /// The bytes found.
        found: [u8; TRAMPOLINE_LEN],
    },
    /// "None" was asked for a static call that returns a value.
    NoneNotAllowed {
        /// The static call's name.
        name: &'static str,
    },
    /// The plan was refused (a site holds unexpected bytes) or the poke
    /// failed.
    Plan(PlanError),
    /// The running program's sites or poke are unavailable.
    Unavailable(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadTrampoline { name, addr, found } => write!(
                f,
                "static call `{name}`: trampoline at {addr:#x} holds {}, not endbr64, jmp rel32 (or ret) and the 0f b9 cc signature; nothing written",
                crate::hex::HexBytes(found)
            ),
            Error::NoneNotAllowed { name } => write!(
                f,
                "static call `{name}` returns a value, so it cannot be set to none"
            ),
            Error::Plan(e) => fmt::Display::fmt(e, f),
            Error::Unavailable(why) => f.write_str(why),
        }
    }
}

impl Error {
    /// The address of the site the error is about, where it names one
    /// (see [`crate::Error::site`]).
    pub fn site(&self) -> Option<usize> {
        match self {
            Error::BadTrampoline { addr, .. } => Some(*addr),
            Error::Plan(e) => e.site(),
            _ => None,
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            // Transparent (its message is the plan error's): the cause below.
            Error::Plan(e) => e.source(),
            _ => None,
        }
    }
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        Error::Plan(e)
    }
}

impl RawStaticCall {
    /// A static call in its compiled state.
    pub(crate) const fn new(
        name: &'static str,
        trampoline: fn() -> usize,
        default: fn() -> usize,
        returns_unit: bool,
    ) -> RawStaticCall {
        RawStaticCall {
            name,
            trampoline,
            default,
            returns_unit,
            site_kind: SiteKind::StaticCall,
            target: AtomicUsize::new(DEFAULT),
            inline: AtomicUsize::new(DEFAULT),
            busy: UpdateLock::new(),
        }
    }

    /// The same state for a trampoline whose call sites are of `kind`
    /// (an `ifunc!` stub: [`SiteKind::Ifunc`]).
    pub(crate) const fn with_site_kind(mut self, kind: SiteKind) -> RawStaticCall {
        self.site_kind = kind;
        self
    }

    /// Serializes updates of this static call (see [`crate::sync`]).
    pub(crate) fn lock(&self) -> UpdateGuard<'_> {
        self.busy.lock()
    }

    /// The declared name.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The trampoline's address.
    pub(crate) fn trampoline(&self) -> usize {
        (self.trampoline)()
    }

    /// The current target's address, or `None` for "none".
    pub(crate) fn target(&self) -> Option<usize> {
        match self.target.load(Ordering::Acquire) {
            DEFAULT => Some((self.default)()),
            NONE => None,
            t => Some(t),
        }
    }

    /// Whether the target can be set to none (the function returns `()`).
    pub(crate) fn allows_none(&self) -> bool {
        self.returns_unit
    }

    /// Points the static call at `target` (an address of a function of the
    /// declared type, or `None` for no-op calls): the trampoline and every
    /// call site in `sites` (those of the image whose target is this
    /// trampoline are used; others are ignored), in one batch through
    /// `poke`.
    ///
    /// # Safety
    ///
    /// `target` must be the address of a function of exactly the declared
    /// type (the typed wrappers the macro generates guarantee it). As for
    /// [`Plan::apply`] with `poke`: if other threads may be running the
    /// trampoline or sites, `poke` must implement a protocol for that (each
    /// edit is a single instruction).
    pub(crate) unsafe fn update_with<P: TextPoke + ?Sized>(
        &self,
        target: Option<usize>,
        image: &Image<'_>,
        sites: &[Site],
        poke: &mut P,
    ) -> Result<Report, Error> {
        let _busy = self.lock();
        let mut plan = Plan::for_image(image);
        let mut report = self.plan_update(target, image, sites, &mut plan)?;
        // SAFETY: forwarded from our caller.
        report.applied = unsafe { plan.apply(poke) }?;
        self.committed(target);
        Ok(report)
    }

    /// Pushes onto `plan` the edits that point the trampoline and the call
    /// sites in `sites` at `target`; the caller holds [`lock`](Self::lock),
    /// applies the plan, then calls [`committed`](Self::committed).
    pub(crate) fn plan_update(
        &self,
        target: Option<usize>,
        image: &Image<'_>,
        sites: &[Site],
        plan: &mut Plan,
    ) -> Result<Report, Error> {
        if target.is_none() && !self.returns_unit {
            return Err(Error::NoneNotAllowed { name: self.name });
        }
        let tramp = self.trampoline();

        // The trampoline: validated by its layout, then by its jmp (after
        // the endbr64, which is never written).
        let mut found = [0u8; TRAMPOLINE_LEN];
        if image.contains_text(tramp, TRAMPOLINE_LEN) {
            // SAFETY: inside the image's text, which is readable.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    tramp as *const u8,
                    found.as_mut_ptr(),
                    TRAMPOLINE_LEN,
                )
            };
        }
        if !is_trampoline(&found) {
            return Err(Error::BadTrampoline {
                name: self.name,
                addr: tramp,
                found,
            });
        }
        plan.reserve(1 + sites.len());
        let expect_tramp = match self.target() {
            Some(t) => Expect::Jmp(t),
            None => Expect::Bytes(Bytes::new(&RET_FILL)),
        };
        let jmp_at = tramp + TRAMPOLINE_JMP;
        let tramp_edit = match target {
            Some(t) => Edit::jmp(jmp_at, expect_tramp, t),
            None => Edit::new(jmp_at, expect_tramp, RET_FILL),
        };
        plan.push(
            tramp_edit
                .site(self.name)
                .reason("static call trampoline (its jmp, after endbr64)"),
        );

        // Inline sites.
        let mut report = Report {
            trampoline: true,
            ..Report::default()
        };
        let inline_now = self.inline.load(Ordering::Acquire);
        let inline_then = match target {
            Some(t) => t,
            None => NONE,
        };
        for s in sites {
            if s.kind != self.site_kind || s.target != tramp {
                continue;
            }
            if s.len as usize != arch::BRANCH_LEN || matches!(s.form, BranchKind::Jcc(_)) {
                report.via_trampoline += 1;
                continue;
            }
            let tail = s.form == BranchKind::Jmp;
            let reach = |t: usize| arch::reaches(s.addr, t);
            // A site an earlier update did not list (`update_with` takes
            // any subset) still calls the trampoline; every other site is
            // in the state the last update left the sites in.
            let calls_tramp = image.contains_text(s.addr, arch::BRANCH_LEN) && {
                let mut now = [0u8; arch::BRANCH_LEN];
                // SAFETY: inside the image's text, which is readable.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        s.addr as *const u8,
                        now.as_mut_ptr(),
                        arch::BRANCH_LEN,
                    )
                };
                branch_expect(tail, tramp).matches(s.addr, &now)
            };
            let expect = match inline_now {
                _ if calls_tramp => branch_expect(tail, tramp),
                DEFAULT => branch_expect(tail, tramp),
                NONE if tail => Expect::Bytes(Bytes::new(&RET_FILL)),
                NONE => Expect::Nop,
                t if reach(t) => branch_expect(tail, t),
                _ => branch_expect(tail, tramp),
            };
            let edit = match inline_then {
                NONE if tail => Edit::new(s.addr, expect, RET_FILL),
                NONE => Edit::new(s.addr, expect, arch::BRANCH_NOP),
                t => {
                    let to = if reach(t) {
                        report.inlined += 1;
                        t
                    } else {
                        report.via_trampoline += 1;
                        tramp
                    };
                    if tail {
                        Edit::jmp(s.addr, expect, to)
                    } else {
                        Edit::call(s.addr, expect, to)
                    }
                }
            };
            if inline_then == NONE {
                report.inlined += 1;
            }
            plan.push(edit);
        }
        Ok(report)
    }

    /// Records that a plan from [`plan_update`](Self::plan_update) for
    /// `target` was applied.
    pub(crate) fn committed(&self, target: Option<usize>) {
        let t = target.unwrap_or(NONE);
        self.target.store(t, Ordering::Release);
        self.inline.store(t, Ordering::Release);
    }
}

fn branch_expect(tail: bool, to: usize) -> Expect {
    if tail {
        Expect::Jmp(to)
    } else {
        Expect::Call(to)
    }
}

impl fmt::Debug for RawStaticCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCall")
            .field("name", &self.name)
            .field("trampoline", &format_args!("{:#x}", self.trampoline()))
            .field(
                "target",
                &self.target().map(|t| format_args!("{t:#x}").to_string()),
            )
            .finish()
    }
}

/// The sites in `sites` that call the trampoline at `tramp`.
pub fn sites_of(sites: &[Site], tramp: usize) -> Vec<Site> {
    sites
        .iter()
        .filter(|s| s.kind == SiteKind::StaticCall && s.target == tramp)
        .copied()
        .collect()
}
