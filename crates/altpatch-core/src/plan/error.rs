//! Why a plan was refused or failed.

use core::fmt;

use super::{Bytes, Expect, Label};
use crate::arch::OutOfRange;
use crate::poke::PokeError;

/// A refused or failed plan. Every variant names the site; unless the
/// variant says otherwise, no byte of text was changed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PlanError {
    /// The bytes at the site are neither the expected old bytes nor the new
    /// ones.
    Unexpected {
        /// The site.
        site: Label,
        /// Its address.
        addr: usize,
        /// What the edit expected.
        expected: Expect,
        /// What is there.
        found: Bytes,
    },
    /// Two edits cover the same byte.
    Overlap {
        /// The earlier edit's site.
        site: Label,
        /// The later edit's site.
        other: Label,
        /// The later edit's address.
        addr: usize,
    },
    /// A rel32 branch written by the edit cannot reach its target.
    OutOfRange {
        /// The site.
        site: Label,
        /// The branch and its target.
        error: OutOfRange,
    },
    /// The edit is not inside the image's text.
    OutsideText {
        /// The site.
        site: Label,
        /// First address of the edit.
        addr: usize,
        /// Its length.
        len: usize,
    },
    /// The edit is malformed (empty, or its expectation has another length).
    BadEdit {
        /// The site.
        site: Label,
        /// Its address.
        addr: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// `undo` found no bytes to restore for an edit.
    NothingToRestore {
        /// The site.
        site: Label,
    },
    /// The poke failed; what was written was rolled back and text is as it
    /// was before the batch.
    Poke {
        /// The site being written when it failed (`None` outside writes).
        site: Option<Label>,
        /// The failure.
        error: PokeError,
    },
    /// The batch was published, but reading the site back through its
    /// executable address did not find the new bytes; everything the batch
    /// wrote was rolled back.
    NotLanded {
        /// The site.
        site: Label,
        /// Its address.
        addr: usize,
        /// The bytes written.
        expected: Bytes,
        /// The bytes read back.
        found: Bytes,
    },
    /// The poke failed and so did the rollback: text may be partially
    /// patched. Only a poke that keeps failing can cause this.
    RollbackFailed {
        /// The first failure.
        error: PokeError,
        /// The failure during rollback.
        rollback: PokeError,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Unexpected {
                site,
                addr,
                expected,
                found,
            } => write!(
                f,
                "site `{site}` at {addr:#x}: expected {expected}, found {found}; nothing written"
            ),
            PlanError::Overlap { site, other, addr } => write!(
                f,
                "site `{other}` at {addr:#x} overlaps site `{site}`; nothing written"
            ),
            PlanError::OutOfRange { site, error } => {
                write!(f, "site `{site}`: {error}; nothing written")
            }
            PlanError::OutsideText { site, addr, len } => write!(
                f,
                "site `{site}` at {addr:#x} (+{len}) is outside the image's text; nothing written"
            ),
            PlanError::BadEdit { site, addr, why } => {
                write!(f, "site `{site}` at {addr:#x}: {why}; nothing written")
            }
            PlanError::NothingToRestore { site } => write!(
                f,
                "site `{site}`: original bytes unknown, cannot undo; nothing written"
            ),
            PlanError::Poke {
                site: Some(site),
                error,
            } => write!(
                f,
                "writing site `{site}` failed: {error}; the batch was rolled back"
            ),
            PlanError::Poke { site: None, error } => {
                write!(f, "text poke failed: {error}; the batch was rolled back")
            }
            PlanError::NotLanded {
                site,
                addr,
                expected,
                found,
            } => write!(
                f,
                "site `{site}` at {addr:#x}: wrote {expected} but read back {found}; the batch was rolled back"
            ),
            PlanError::RollbackFailed { error, rollback } => write!(
                f,
                "text poke failed ({error}) and so did the rollback ({rollback}); text may be inconsistent"
            ),
        }
    }
}

impl PlanError {
    /// The address of the site the error is about, where it names one
    /// (see `altpatch::Error::site`).
    pub fn site(&self) -> Option<usize> {
        match self {
            PlanError::Unexpected { addr, .. }
            | PlanError::Overlap { addr, .. }
            | PlanError::OutsideText { addr, .. }
            | PlanError::BadEdit { addr, .. }
            | PlanError::NotLanded { addr, .. } => Some(*addr),
            PlanError::OutOfRange { error, .. } => Some(error.from),
            PlanError::Poke { error, .. } | PlanError::RollbackFailed { error, .. } => error.site(),
            PlanError::NothingToRestore { .. } => None,
        }
    }
}

impl core::error::Error for PlanError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            PlanError::Poke { error, .. } | PlanError::RollbackFailed { error, .. } => Some(error),
            _ => None,
        }
    }
}
