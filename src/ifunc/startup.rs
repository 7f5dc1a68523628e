//! Patching without the application's help: when the object holding an
//! `ifunc!` is loaded, and on an ifunc's first call.
//!
//! A library's author writes `ifunc!`; the application that (indirectly)
//! depends on the library never calls anything. So every `ifunc!`
//! registers a constructor (an `.init_array` entry, what the loader runs
//! for an executable before `main` and for a shared object inside
//! `dlopen`), `process::__ifunc_at_load` (`process/load_ifuncs.rs`, which
//! writes the text; this file keeps the outcome): the first of them to run
//! in an object resolves
//! every ifunc of that object — the records between this copy of
//! altpatch's `__start_`/`__stop_` bounds, which the linker makes per
//! object — and rewrites each stub's `jmp` to the implementation: in
//! place through `/proc/self/mem` while the process has one thread (no
//! other can run the text), by page swap otherwise (another library's
//! constructor may have started a thread); either way the text stays the
//! file's mapping, for uprobes and profilers. An ifunc first called before that
//! (from an earlier constructor) makes its own stub direct on the way
//! (`process::__ifunc_lazy_target`). The calls the ifunc's function recorded (see
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

/// Who runs this object's start-up (the first constructor to claim it),
/// and what it did.
pub(crate) static STARTUP: crate::sync::ClaimedOnce<Startup> = crate::sync::ClaimedOnce::new();

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
    STARTUP.get().cloned().unwrap_or(Startup::NotRun)
}
