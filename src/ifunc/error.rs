//! Why ifuncs could not be applied.

use core::fmt;

use crate::cpu;
use crate::plan::PlanError;

/// Why ifuncs could not be applied. Nothing was written.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// A different feature snapshot was published before.
    Snapshot(cpu::AlreadyPublished),
    /// A resolver chose an address outside the image's text.
    OutsideText {
        /// The ifunc.
        name: &'static str,
        /// What the resolver returned.
        addr: usize,
    },
    /// The stub or a call site did not hold what was expected.
    Stub(&'static str, crate::static_call::Error),
    /// The batch was refused or the poke failed.
    Plan(PlanError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Snapshot(e) => fmt::Display::fmt(e, f),
            Error::OutsideText { name, addr } => write!(
                f,
                "ifunc `{name}`: the resolver chose {addr:#x}, outside the image's text; nothing written"
            ),
            Error::Stub(name, e) => write!(f, "ifunc `{name}`: {e}"),
            Error::Plan(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl Error {
    /// The address of the site the error is about, where it names one
    /// (see [`crate::Error::site`]).
    pub fn site(&self) -> Option<usize> {
        match self {
            Error::Stub(_, e) => e.site(),
            Error::Plan(e) => e.site(),
            _ => None,
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            // Transparent: these display as the error they hold.
            Error::Snapshot(e) => core::error::Error::source(e),
            Error::Stub(_, e) => Some(e),
            Error::Plan(e) => core::error::Error::source(e),
            _ => None,
        }
    }
}
