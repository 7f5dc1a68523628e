//! Applying alternatives when their object is loaded, without the
//! application's help (`alternative!` registers
//! `process::__alternative_at_load`, in `process/load_alternatives.rs`,
//! which writes the text; this file keeps the outcome).
//!
//! An alternative site may change from several instructions to others,
//! so unlike an ifunc's one-instruction edits it cannot change under a
//! thread that is inside it (preempted mid-sequence, it would resume in
//! the middle of the new one). At load that is proven, not assumed: the
//! constructor runs on the thread that loads the object, before anything
//! of the object has run — except on other threads, which another
//! library's constructor may have started and which may call into an
//! executable's code (an interposed `malloc`, a callback). So the sites
//! are applied only while the process has exactly one thread (no other
//! can appear while it is the only one); otherwise they keep their
//! defaults, which are correct, and [`startup`] says why, for the program
//! to call [`apply`](super::apply) when its threads allow.

/// Who runs this object's start-up (the first constructor to claim it),
/// and what it did.
pub(crate) static STARTUP: crate::sync::ClaimedOnce<Startup> = crate::sync::ClaimedOnce::new();

/// What applying alternatives at load did in the object this copy of
/// altpatch is linked into.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Startup {
    /// Not run (yet): no `alternative!` in this object, or its
    /// constructors have not run.
    NotRun,
    /// Turned off: the `no-startup` feature or `ALTPATCH=startup=off`.
    Off,
    /// Every site was put in the state the published CPU snapshot
    /// selects.
    Applied {
        /// Sites in the object.
        sites: usize,
        /// Sites now running a replacement.
        replaced: usize,
        /// How long it took, by the monotonic clock.
        took: core::time::Duration,
    },
    /// Left on their defaults: the process had other threads, which might
    /// be inside a site.
    OtherThreads,
    /// Nothing was written: why.
    Failed(std::string::String),
}

/// What applying alternatives at load did in this object.
///
/// ```
/// #[inline(never)]
/// fn one() -> u64 {
///     let r: u64;
///     // SAFETY: both sequences only set `r`.
///     unsafe { altpatch::alternative!("mov {r}, 1", [never => "mov {r}, 2"], r = out(reg) r) };
///     r
/// }
///
/// fn main() {
///     println!("{:?}", altpatch::alternative::startup());
///     assert_eq!(one(), 1);
/// }
/// ```
pub fn startup() -> Startup {
    STARTUP.get().cloned().unwrap_or(Startup::NotRun)
}
