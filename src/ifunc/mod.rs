//! Ifuncs resolved in place: one resolver run per function, then a direct
//! `call` at every call site.
//!
//! # Rust: `ifunc!`
//!
//! ```
//! use altpatch::cpu::{Feature, Features};
//!
//! altpatch::ifunc! {
//!     /// Counts set bits, with `popcnt` where the CPU has it.
//!     pub fn ones(x: u64) -> u64 = pick_ones;
//! }
//! extern "C" fn ones_portable(x: u64) -> u64 { x.count_ones() as u64 }
//! extern "C" fn ones_popcnt(x: u64) -> u64 { x.count_ones() as u64 }
//! fn pick_ones(f: &Features) -> extern "C" fn(u64) -> u64 {
//!     if f.has(Feature::Popcnt) { ones_popcnt } else { ones_portable }
//! }
//!
//! fn main() {
//!     assert_eq!(ones(0b1011), 3);  // resolved lazily on first call
//!     assert_eq!(ones::ifunc().resolver_runs(), 1);
//!     # #[cfg(feature = "std")]
//!     altpatch::ifunc::init().unwrap(); // stub and call sites -> `call <impl>`
//!     assert_eq!(ones(0b1011), 3);
//!     assert_eq!(ones::ifunc().resolver_runs(), 1);
//! }
//! ```
//!
//! [`ifunc!`](macro@crate::ifunc) declares the function, a *stub* (a
//! static-call trampoline, initially jumping to a lazy resolver) and a
//! resolver that receives the feature snapshot as an argument.
//!
//! # Without the application's help
//!
//! * **Recorded calls.** The function is `#[inline(always)]`; where the C
//!   ABI passes its arguments and result in registers (integers, pointers
//!   and slices in at most six general-purpose ones, up to four `f32`/`f64`
//!   in SSE ones), its body is a direct `call <stub>` that records its own
//!   address (`call.rs`), so every caller, in any crate, is a call altpatch
//!   finds without relocations ([`Ifunc::recorded_calls`]). Other
//!   signatures (more registers' worth, aggregates in memory) are called
//!   as rustc calls any function.
//! * **At load** (`std`, Linux): every `ifunc!` registers a constructor; the
//!   first to run in an object resolves its ifuncs with the [published
//!   snapshot](crate::cpu::published), makes each stub a direct `jmp` and
//!   each recorded call a `call <impl>`, in one page-swap publication that
//!   other threads may run through ([`startup`] says what it did). Opt out
//!   with the `no-startup` feature or `ALTPATCH=startup=off`.
//! * **Lazily**, with start-up off or before the constructor ran: the first
//!   call resolves the ifunc — exactly once: concurrent first callers wait
//!   for the one running the resolver rather than racing — and, unless
//!   start-up is off, makes the stub a direct `jmp`. With start-up off,
//!   later calls take the lazy path: the stub's `jmp`, a load, an indirect
//!   jump (2.4× a direct call, `benches/ifunc.rs`).
//!
//! [`apply`] (or [`init`] with `std`) resolves every ifunc of an image with
//! the snapshot you pass, publishes that snapshot, and in one batch
//! rewrites the stubs to `jmp <impl>` and every call site — recorded, from
//! the image's relocations or from its embedded table — to `call <impl>`
//! (`jmp <impl>` at tail sites).
//!
//! Implementations are `extern "C"` functions of the declared type, like
//! static-call targets. A resolver must not call its own ifunc.
//!
//! # C: `__attribute__((ifunc))` in static and freestanding images
//!
//! In an image no dynamic loader relocates (a kernel, a `-static`
//! freestanding program), the linker leaves `R_X86_64_IRELATIVE` entries
//! between `__rela_iplt_start` and `__rela_iplt_end` and makes every call
//! go through a PLT stub. [`process_irelative`] calls each resolver once
//! (C resolvers read the published snapshot with `altpatch_cpu_has`, see
//! [`crate::cpu::published`] and `include/altpatch.h`), checks every
//! result is in the image's text, and only then fills the GOT slots.
//! [`apply_plt_sites`] then rewrites the call sites of those ifuncs (found
//! through `--emit-relocs`) into direct calls: `call <plt stub>` →
//! `call <impl>`, and the 6-byte `call *slot(%rip)` (`-fno-plt`) →
//! `cs call <impl>` — one instruction of the same length, so the return
//! address is unchanged. The same works for a dynamically linked program,
//! whose slots the dynamic loader filled.

mod apply;
mod call;
mod elf_ifunc;
mod error;
mod macros;
#[cfg(feature = "std")]
mod process;
#[cfg(feature = "std")]
mod startup;

use core::fmt;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

#[doc(hidden)]
pub use crate::static_call::{__Plain, __Recorded};
pub use apply::{Applied, Report, apply, sites_of};
pub(crate) use apply::{committed, plan_all};
#[doc(hidden)]
pub use call::{IfuncStub as __IfuncStub, Probe as __Probe};
pub use elf_ifunc::{
    IrelativeEntry, IrelativeError, IrelativeReport, IrelativeTable, PltSitesReport,
    apply_plt_sites, process_irelative,
};
pub use error::Error;
#[cfg(feature = "std")]
pub use process::{InitError, InitReport, init};
#[cfg(feature = "std")]
pub(crate) use startup::STARTUP;
#[cfg(feature = "std")]
pub use startup::{Startup, StartupError, startup};

use crate::cpu::{self, Features};
use crate::image::Image;
use crate::plan::Plan;
use crate::poke::TextPoke;
use crate::records::IfuncRecord;
use crate::sites::{Site, SiteKind};
use crate::static_call::{self, RawStaticCall};

const UNRESOLVED: u8 = 0;
const RESOLVING: u8 = 1;
const RESOLVED: u8 = 2;

/// The state behind one [`ifunc!`](macro@crate::ifunc): its stub (a
/// static-call trampoline), resolver and resolution. The macro generates
/// typed wrappers around it.
pub struct Ifunc {
    pub(crate) call: RawStaticCall,
    resolver: fn(&Features) -> usize,
    state: AtomicU8,
    chosen: AtomicUsize,
    runs: AtomicUsize,
}

/// Resets a resolution that did not finish (the resolver panicked), so
/// waiting threads retry instead of spinning forever.
struct Resolving<'a>(&'a Ifunc);

impl Drop for Resolving<'_> {
    fn drop(&mut self) {
        self.0.state.store(UNRESOLVED, Ordering::Release);
    }
}

impl Ifunc {
    /// Used by [`ifunc!`](macro@crate::ifunc).
    #[doc(hidden)]
    pub const fn new(
        name: &'static str,
        stub: fn() -> usize,
        lazy: fn() -> usize,
        resolver: fn(&Features) -> usize,
    ) -> Ifunc {
        Ifunc {
            call: RawStaticCall::new(name, stub, lazy, false).with_site_kind(SiteKind::Ifunc),
            resolver,
            state: AtomicU8::new(UNRESOLVED),
            chosen: AtomicUsize::new(0),
            runs: AtomicUsize::new(0),
        }
    }

    /// The declared name.
    pub fn name(&self) -> &'static str {
        self.call.name()
    }

    /// The stub's address (what call sites call until applied).
    pub fn stub(&self) -> usize {
        self.call.trampoline()
    }

    /// The chosen implementation's address, once resolved.
    pub fn resolved(&self) -> Option<usize> {
        (self.state.load(Ordering::Acquire) == RESOLVED)
            .then(|| self.chosen.load(Ordering::Acquire))
    }

    /// How many times the resolver ran: 1 once resolved (0 before), however
    /// many threads called first.
    pub fn resolver_runs(&self) -> usize {
        self.runs.load(Ordering::Acquire)
    }

    /// Whether the stub and call sites were rewritten to the implementation.
    pub fn is_applied(&self) -> bool {
        self.resolved().is_some() && self.call.target() == self.resolved()
    }

    /// Resolves with `features` — the first time only: afterwards returns
    /// the implementation chosen then, whatever `features` says. Threads
    /// arriving while another runs the resolver wait for its result.
    pub fn resolve(&self, features: &Features) -> usize {
        if self.state.load(Ordering::Acquire) == RESOLVED {
            return self.chosen.load(Ordering::Acquire);
        }
        #[cfg(feature = "std")]
        {
            // Under the process lock (see `crate::sync`): waiters sleep, and
            // `fork` waits for the resolver, so a child never inherits a
            // resolution some thread of the parent was in the middle of.
            let _lock = self.call.lock();
            match self.state.load(Ordering::Acquire) {
                RESOLVED => return self.chosen.load(Ordering::Acquire),
                RESOLVING => panic!(
                    "the resolver of ifunc `{}` called the ifunc itself",
                    self.name()
                ),
                _ => {}
            }
            self.state.store(RESOLVING, Ordering::Release);
            self.run_resolver(features)
        }
        #[cfg(not(feature = "std"))]
        loop {
            match self.state.compare_exchange(
                UNRESOLVED,
                RESOLVING,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return self.run_resolver(features),
                Err(RESOLVED) => return self.chosen.load(Ordering::Acquire),
                Err(_) => core::hint::spin_loop(),
            }
        }
    }

    /// Runs the resolver; the state is RESOLVING and this thread owns it.
    fn run_resolver(&self, features: &Features) -> usize {
        let guard = Resolving(self);
        let chosen = (self.resolver)(features);
        core::mem::forget(guard);
        self.runs.fetch_add(1, Ordering::AcqRel);
        self.chosen.store(chosen, Ordering::Release);
        self.state.store(RESOLVED, Ordering::Release);
        chosen
    }

    /// The lazy path's target: the implementation, resolved with the
    /// published snapshot if this is the first call.
    #[doc(hidden)]
    #[inline]
    pub fn lazy_target(&self) -> usize {
        if self.state.load(Ordering::Acquire) == RESOLVED {
            return self.chosen.load(Ordering::Acquire);
        }
        // (In a process, `ifunc!`'s stub reaches this through
        // `process::__ifunc_lazy_target`, which then makes the stub jump
        // straight there, so the next call skips this path.)
        self.resolve(&cpu::published())
    }

    /// Resolves this one ifunc (if not yet) with `features` and rewrites its
    /// stub and its call sites in `sites` to reach the implementation, in
    /// one batch. [`apply`] does this for every ifunc of an image at once;
    /// this is for an `Ifunc` outside any image's records. Publishes
    /// nothing.
    ///
    /// ```
    /// use altpatch::cpu::{Feature, Features};
    ///
    /// extern "C" fn ones_hw(x: u64) -> u64 {
    ///     x.count_ones() as u64
    /// }
    /// extern "C" fn ones_sw(mut x: u64) -> u64 {
    ///     let mut n = 0;
    ///     while x != 0 {
    ///         x &= x - 1;
    ///         n += 1;
    ///     }
    ///     n
    /// }
    /// fn pick(f: &Features) -> extern "C" fn(u64) -> u64 {
    ///     if f.has(Feature::Popcnt) { ones_hw } else { ones_sw }
    /// }
    /// altpatch::ifunc! {
    ///     fn ones(x: u64) -> u64 = pick;
    /// }
    ///
    /// fn main() {
    ///     let image = altpatch::Image::current();
    ///     let mut poke = altpatch::LinuxPoke::new().unwrap();
    ///     // The stub only (a kernel also passes its embedded site table).
    ///     // SAFETY: in place; no other thread calls `ones` meanwhile.
    ///     unsafe { ones::ifunc().apply_with(&Features::detect(), &image, &[], &mut poke) }.unwrap();
    ///     assert!(ones::ifunc().is_applied());
    ///     assert_eq!(ones(0b1011), 3);
    /// }
    /// ```
    ///
    /// # Safety
    ///
    /// As for [`apply`].
    pub unsafe fn apply_with<P: TextPoke + ?Sized>(
        &'static self,
        features: &Features,
        image: &Image<'_>,
        sites: &[Site],
        poke: &mut P,
    ) -> Result<Applied, Error> {
        let _lock = self.call.lock();
        let was_resolved = self.resolved().is_some();
        let mut plan = Plan::for_image(image);
        let (chosen, mut update) = self.plan_apply(features, image, sites, &mut plan)?;
        // SAFETY: forwarded from our caller.
        update.applied = unsafe { plan.apply(poke) }.map_err(Error::Plan)?;
        self.call.committed(Some(chosen));
        Ok(Applied {
            ifunc: self,
            chosen,
            was_resolved,
            update,
        })
    }

    /// Resolves (if not yet) with `features`, checks the implementation lies
    /// in `image`'s text, and pushes onto `plan` the edits that make the
    /// stub and the call sites in `sites` reach it directly.
    fn plan_apply(
        &self,
        features: &Features,
        image: &Image<'_>,
        sites: &[Site],
        plan: &mut Plan,
    ) -> Result<(usize, static_call::Report), Error> {
        let chosen = self.resolve(features);
        if !image.contains_text(chosen, 1) {
            return Err(Error::OutsideText {
                name: self.name(),
                addr: chosen,
            });
        }
        let report = self
            .call
            .plan_update(Some(chosen), image, sites, plan)
            .map_err(|e| Error::Stub(self.name(), e))?;
        Ok((chosen, report))
    }
}

impl fmt::Debug for Ifunc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ifunc")
            .field("name", &self.name())
            .field("stub", &format_args!("{:#x}", self.stub()))
            .field(
                "resolved",
                &self.resolved().map(|a| alloc::format!("{a:#x}")),
            )
            .field("applied", &self.is_applied())
            .finish()
    }
}

// The record's layout is in `records` (in `altpatch-core`, below this
// module); that it points at an `Ifunc` is this module's knowledge.
impl Ifunc {
    /// The ifunc an ifunc record (from [`Image::ifuncs`](crate::Image::ifuncs)) names.
    ///
    /// ```
    /// use altpatch::ifunc::Ifunc;
    /// for record in altpatch::Image::current().ifuncs() {
    ///     let ifunc = Ifunc::of_record(record);
    ///     assert!(!ifunc.name().is_empty());
    /// }
    /// ```
    pub fn of_record(record: &IfuncRecord) -> &'static Ifunc {
        // SAFETY: the macro emits a record only for an `Ifunc` static of
        // the same image, which lives as long as the program.
        unsafe { &*(record.ifunc_address() as *const Ifunc) }
    }
}
