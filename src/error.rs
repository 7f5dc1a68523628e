//! One error type for code that uses several mechanisms.
//!
//! See [`Error`].

use core::fmt;

use crate::arch::{OutOfRange, RelocError};
use crate::cpu::{AlreadyPublished, OverrideError, RecordedCpuidError};
use crate::plan::PlanError;
use crate::poke::PokeError;
use crate::poke::live::LiveError;
use crate::sites::EmbeddedTableError;
use crate::{alternative, ifunc, retpoline};

// Each layer's error, once: the variant, its conversion with `?` and its
// place in `inner` all come from this one list.
macro_rules! wrapping_errors {
    (
        $(#[$meta:meta])*
        wrapping { $( $(#[doc = $doc:literal])* $(#[cfg($cfg:meta)])? $variant:ident($ty:ty), )* }
        own { $($own:tt)* }
    ) => {
        $(#[$meta])*
        #[derive(Debug)]
        #[non_exhaustive]
        pub enum Error {
            $( $(#[doc = $doc])* $(#[cfg($cfg)])? $variant($ty), )*
            $($own)*
        }

        impl Error {
            /// The error this one holds, as a trait object (`None` for the
            /// patcher's own errors).
            fn inner(&self) -> Option<&(dyn core::error::Error + 'static)> {
                match self {
                    $( $(#[cfg($cfg)])? Error::$variant(e) => Some(e), )*
                    _ => None,
                }
            }
        }

        $(
            $(#[cfg($cfg)])?
            impl From<$ty> for Error {
                fn from(e: $ty) -> Error {
                    Error::$variant(e)
                }
            }
        )*
    };
}

wrapping_errors! {
    /// Any error of this crate, as one type.
    ///
    /// Every layer keeps its own precise error (a [`PlanError`] says which
    /// edit was refused, an [`alternative::Error`] which record was bad), since
    /// a lower layer cannot name a higher one's failures without importing it
    /// (the layer map in `ARCHITECTURE.md`). [`Error`] sits above them all: each
    /// of them converts into it with `?`, and it answers the questions a caller
    /// of any mechanism asks:
    ///
    /// - [`Error::site`]: which site it is about, where one is named;
    /// - [`core::error::Error::source`]: the cause below (a plan's poke failure,
    ///   the OS call that failed), down to the last layer that knows one;
    /// - its `Display`: the whole story in one line, as each layer tells it.
    ///
    /// The conversion is transparent: an `Error` displays exactly as the error
    /// it holds and has the same `source`, so wrapping adds no line to a report
    /// that walks the chain. Below it, a variant that only passes an error on
    /// (displays as it) is transparent the same way; one that adds context
    /// ("ifunc `sum`: ...") returns the error it holds as its source.
    ///
    /// ```
    /// use altpatch::{DirectPoke, Edit, Error, Plan, SyncMethod};
    ///
    /// // Different mechanisms' errors meet in one `Result` with `?`.
    /// fn refuse(text: &[u8]) -> Result<(), Error> {
    ///     let at = text.as_ptr() as usize;
    ///     // SAFETY: `text` is readable while the plan is validated.
    ///     let mut plan = unsafe { Plan::with_text(at..at + text.len()) };
    ///     plan.push(Edit::replace(at, &[0x90], &[0xc3]).site("example"));
    ///     // SAFETY: validation only reads.
    ///     let poke = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
    ///     plan.validate(&poke)?;
    ///     Ok(())
    /// }
    /// let text = [0xccu8; 4]; // not the NOP the edit expects
    /// let e = refuse(&text).unwrap_err();
    /// assert!(matches!(e, Error::Plan(_)));
    /// assert_eq!(e.site(), Some(text.as_ptr() as usize), "{e}");
    /// ```
    wrapping {

    /// A plan was refused or failed ([`plan`](crate::plan)).
    Plan(PlanError),
    /// Text could not be written ([`poke`](crate::poke)).
    Poke(PokeError),
    /// An edit cannot be applied live ([`poke::live`](crate::poke::live)).
    Live(LiveError),
    /// An override string was refused ([`cpu::Overrides`](crate::cpu::Overrides)).
    Overrides(OverrideError),
    /// A recorded CPUID dump was refused.
    RecordedCpuid(RecordedCpuidError),
    /// A different feature snapshot was published before.
    AlreadyPublished(AlreadyPublished),
    /// A branch cannot reach its target.
    OutOfRange(OutOfRange),
    /// Code could not be relocated.
    Relocation(RelocError),
    /// An embedded site table is malformed.
    EmbeddedTable(EmbeddedTableError),
    /// Alternatives ([`alternative`](mod@crate::alternative)).
    Alternative(alternative::Error),
    /// Retpolines ([`retpoline`]).
    Retpoline(retpoline::Error),
    /// A static call ([`static_call`](mod@crate::static_call)).
    StaticCall(crate::static_call::Error),
    /// A static key ([`static_key`](mod@crate::static_key)).
    StaticKey(crate::static_key::Error),
    /// Ifuncs ([`ifunc`](mod@crate::ifunc)).
    Ifunc(ifunc::Error),
    /// ELF ifunc call sites and IRELATIVE slots.
    Irelative(ifunc::IrelativeError),
    /// `ifunc::init` (`std`).
    #[cfg(feature = "std")]
    IfuncInit(ifunc::InitError),
    /// A loaded object could not be described (`std`).
    #[cfg(feature = "std")]
    Load(crate::LoadError),
    /// A linked file could not be read (`std`).
    #[cfg(feature = "std")]
    Elf(crate::elf::ElfError),
    /// The running program's sites could not be found (`std`).
    #[cfg(feature = "std")]
    Sites(crate::elf::SitesError),
    /// `altpatch embed` could not fill a table (`std`).
    #[cfg(feature = "std")]
    Embed(crate::elf::EmbedError),
    /// A trampoline could not be made (`std`).
    #[cfg(feature = "std")]
    Trampoline(crate::trampoline::TrampolineError),
    }
    own {
    /// The same mechanism or object was given to one
    /// [`Patcher`](crate::Patcher) twice; nothing was planned for the
    /// second.
    AddedTwice(&'static str),
    /// A [`Patcher`](crate::Patcher)'s shared batch failed (nothing of it
    /// is left written) after its retpoline batches were written, and those
    /// could not be put back. Every retpoline site form works with every
    /// thunk form, so the program is still correct.
    RetpolinesNotRestored(PlanError),
    /// An object's state changed between planning it in a
    /// [`Patcher`](crate::Patcher) and applying (on the patching thread
    /// itself: other threads wait for the lock the patcher holds); nothing
    /// was written. Plan again.
    ChangedSincePlanned(&'static str),
    }
}

impl Error {
    /// The address of the site the error is about, where it names one: a
    /// refused or unlanded edit, a bad record's site, a branch that cannot
    /// reach, a thunk slot. `None` for errors about no one site (an
    /// override string, a missing poke strategy).
    ///
    /// ```
    /// use altpatch::{Error, retpoline};
    /// let e = Error::from(retpoline::Error::RspSite { site: 0x1234 });
    /// assert_eq!(e.site(), Some(0x1234));
    /// ```
    pub fn site(&self) -> Option<usize> {
        match self {
            Error::Plan(e) => e.site(),
            Error::Poke(e) => e.site(),
            Error::Live(e) => e.site(),
            Error::OutOfRange(e) => Some(e.from),
            Error::RetpolinesNotRestored(e) => e.site(),
            Error::Alternative(e) => e.site(),
            Error::Retpoline(e) => e.site(),
            Error::StaticCall(e) => e.site(),
            Error::StaticKey(e) => e.site(),
            Error::Ifunc(e) => e.site(),
            Error::Irelative(e) => e.site(),
            #[cfg(feature = "std")]
            Error::IfuncInit(e) => e.site(),
            #[cfg(feature = "std")]
            Error::Embed(e) => e.site(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::AddedTwice(what) => write!(f, "{what} added to one patcher twice"),
            Error::ChangedSincePlanned(what) => write!(
                f,
                "{what} changed between planning and applying the patch; nothing written"
            ),
            Error::RetpolinesNotRestored(e) => write!(
                f,
                "{e}; the retpoline batches written before it could not be put back \
                 (every site form works with every thunk form: still correct)"
            ),
            _ => match self.inner() {
                Some(e) => fmt::Display::fmt(e, f),
                None => Ok(()),
            },
        }
    }
}

impl core::error::Error for Error {
    // Transparent: the held error's own cause, not the held error itself
    // (whose message is already this one's).
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Error::RetpolinesNotRestored(e) => Some(e),
            _ => self.inner().and_then(|e| e.source()),
        }
    }
}
