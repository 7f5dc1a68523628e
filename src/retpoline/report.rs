//! What applying a retpoline policy did, site by site, and why it failed.

use alloc::vec::Vec;
use core::fmt;

use super::{Policy, SiteOutcomes};
use crate::arch::x86_64::Reg;
use crate::plan::{ApplyReport, PlanError};
use crate::sites::{Site, SiteKind};

/// What became of one site (see [`Report::counts`] for an example).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Rewritten into the mode's inline form.
    Inlined,
    /// Left (or put back) calling the thunk, which the mode patches; or, for
    /// a return site, routed to the embedder's return thunk
    /// ([`ReturnSites::Thunk`](super::ReturnSites::Thunk)).
    ViaThunk,
    /// Could not be inlined in this mode; keeps calling the (patched) thunk.
    Refused(&'static str),
}

/// One site and its outcome, as listed in [`Report::sites`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteOutcome {
    /// The site.
    pub site: Site,
    /// What happened to it.
    pub outcome: Outcome,
}

/// A retpoline thunk compiled into the program, not this crate's: its
/// first instruction is put in the mode's form when its bytes are a body
/// altpatch knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompiledThunk {
    /// Its entry.
    pub addr: usize,
    /// The register it branches through.
    pub reg: Reg,
    /// `None`: in the mode's form. Otherwise why it was left as it is (a
    /// full retpoline, or bytes altpatch does not know).
    pub refused: Option<&'static str>,
}

/// What [`apply`](super::apply) decided and did, for the site list `'s`
/// it was given (borrowed: one byte per site is recorded).
#[derive(Clone, Debug)]
pub struct Report<'s> {
    /// The mode applied, with the policy's reasoning.
    pub policy: Policy,
    /// Every site considered, and what became of it.
    pub sites: SiteOutcomes<'s>,
    /// Thunk slots of this crate rewritten to the mode's form.
    pub thunks: usize,
    /// Retpoline thunks compiled into the program (LLVM's
    /// `__llvm_retpoline_<reg>`, GCC's local thunks, or aliases of them)
    /// that the sites reach, and what the mode did to each.
    pub compiled_thunks: Vec<CompiledThunk>,
    /// The site batch's outcome.
    pub sites_applied: ApplyReport,
    /// The thunk batch's outcome.
    pub thunks_applied: ApplyReport,
}

impl Report<'_> {
    /// (inlined, via thunk, refused) counts for sites whose kind matches `f`.
    ///
    /// ```
    /// use altpatch::retpoline::{Mode, Outcome, Policy, Report, SiteOutcome, SiteOutcomes};
    /// use altpatch::sites::{Site, SiteKind};
    /// use altpatch::x86::{BranchKind, Reg};
    ///
    /// let site = |kind| Site { addr: 0x1000, len: 5, form: BranchKind::Call, kind, target: 0x2000 };
    /// let report = Report {
    ///     policy: Policy::new(Mode::Lfence, "example"),
    ///     sites: SiteOutcomes::from_outcomes(vec![
    ///         SiteOutcome { site: site(SiteKind::IndirectThunk(Reg::Rax)), outcome: Outcome::Inlined },
    ///         SiteOutcome {
    ///             site: site(SiteKind::IndirectThunk(Reg::R11)),
    ///             outcome: Outcome::Refused("no room"),
    ///         },
    ///     ]),
    ///     thunks: 15,
    ///     compiled_thunks: vec![],
    ///     sites_applied: Default::default(),
    ///     thunks_applied: Default::default(),
    /// };
    /// assert_eq!(report.counts(|k| matches!(k, SiteKind::IndirectThunk(_))), (1, 0, 1));
    /// assert!(report.to_string().contains("refused (1): no room"));
    /// ```
    pub fn counts(&self, f: impl Fn(&SiteKind) -> bool) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for s in self.sites.iter().filter(|s| f(&s.site.kind)) {
            match s.outcome {
                Outcome::Inlined => c.0 += 1,
                Outcome::ViaThunk => c.1 += 1,
                Outcome::Refused(_) => c.2 += 1,
            }
        }
        c
    }

    /// The same report, owning a copy of the site list.
    pub fn into_owned(self) -> Report<'static> {
        Report {
            policy: self.policy,
            sites: self.sites.into_owned(),
            thunks: self.thunks,
            compiled_thunks: self.compiled_thunks,
            sites_applied: self.sites_applied,
            thunks_applied: self.thunks_applied,
        }
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "retpoline mode {}: {}",
            self.policy.mode, self.policy.reason
        )?;
        let (ti, tv, tr) = self.counts(|k| matches!(k, SiteKind::IndirectThunk(_)));
        let (ri, rv, rr) = self.counts(|k| *k == SiteKind::ReturnThunk);
        writeln!(
            f,
            "  indirect-thunk sites: {ti} inlined, {tv} via thunk, {tr} refused; \
             return-thunk sites: {ri} inlined, {rv} via thunk, {rr} refused; {} thunks rewritten",
            self.thunks
        )?;
        let mut reasons: Vec<(&str, usize)> = Vec::new();
        for s in &self.sites {
            if let Outcome::Refused(why) = s.outcome {
                match reasons.iter_mut().find(|(w, _)| *w == why) {
                    Some((_, n)) => *n += 1,
                    None => reasons.push((why, 1)),
                }
            }
        }
        for (why, n) in reasons {
            writeln!(f, "  refused ({n}): {why}")?;
        }
        if !self.compiled_thunks.is_empty() {
            let kept: Vec<_> = self
                .compiled_thunks
                .iter()
                .filter_map(|t| t.refused)
                .collect();
            writeln!(
                f,
                "  compiled-in thunks: {} in the mode's form, {} left",
                self.compiled_thunks.len() - kept.len(),
                kept.len()
            )?;
            for t in &self.compiled_thunks {
                if let Some(why) = t.refused {
                    writeln!(f, "  compiled-in thunk {} at {:#x}: {why}", t.reg, t.addr)?;
                }
            }
        }
        Ok(())
    }
}

/// Why retpolines could not be applied. Every variant but
/// [`Error::Thunks`] means nothing was written.
///
/// ```
/// use altpatch::retpoline::Error;
///
/// let e = Error::RspSite { site: 0x1234 };
/// assert!(e.to_string().contains("0x1234") && e.to_string().contains("%rsp"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A site names `%rsp`'s thunk, which does not exist.
    RspSite {
        /// The site.
        site: usize,
    },
    /// The return thunk a policy routes return sites to is not in the
    /// image's text.
    BadReturnThunk {
        /// Its address.
        addr: usize,
    },
    /// A thunk slot holds bytes of none of the modes.
    BadThunk {
        /// The register.
        reg: Reg,
        /// The slot's address.
        addr: usize,
    },
    /// The plan was refused (a site holds unexpected bytes) or the poke
    /// failed.
    Plan(PlanError),
    /// The sites were rewritten but the thunk batch then failed to write.
    /// Every site form works with every thunk form, so the program is
    /// correct either way.
    Thunks {
        /// Why the thunk batch failed.
        error: PlanError,
        /// Whether the sites were put back as they were.
        sites_restored: bool,
    },
    /// The running program's sites could not be found
    /// ([`apply_current`](super::apply_current), `std`): not linked with
    /// `--emit-relocs` and no embedded table, or its file unreadable.
    #[cfg(feature = "std")]
    Sites(crate::elf::SitesError),
    /// The loaded object could not be described
    /// ([`apply_loaded`](super::apply_loaded), `std`).
    #[cfg(feature = "std")]
    Load(crate::LoadError),
    /// No live poke could be set up (`std`).
    Poke(crate::poke::PokeError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::RspSite { site } => write!(
                f,
                "site {site:#x} calls a thunk for %rsp, which is never a thunk register; nothing written"
            ),
            Error::BadReturnThunk { addr } => write!(
                f,
                "the return thunk {addr:#x} the policy routes return sites to is not in the \
                 image's text; nothing written"
            ),
            Error::BadThunk { reg, addr } => write!(
                f,
                "thunk for {reg} at {addr:#x} holds none of the expected forms; nothing written"
            ),
            Error::Plan(e) => fmt::Display::fmt(e, f),
            #[cfg(feature = "std")]
            Error::Sites(e) => write!(f, "finding the program's sites: {e}"),
            #[cfg(feature = "std")]
            Error::Load(e) => write!(f, "describing the loaded object: {e}"),
            Error::Poke(e) => write!(f, "setting up the live poke: {e}"),
            Error::Thunks {
                error,
                sites_restored,
            } => write!(
                f,
                "rewriting the thunks failed ({error}); the sites {}",
                if *sites_restored {
                    "were put back as they were"
                } else {
                    "could not be put back and stay rewritten (still correct)"
                }
            ),
        }
    }
}

impl Error {
    /// The address of the site the error is about, where it names one
    /// (see [`crate::Error::site`]).
    pub fn site(&self) -> Option<usize> {
        match self {
            Error::RspSite { site } => Some(*site),
            Error::BadThunk { addr, .. } => Some(*addr),
            Error::Plan(e) | Error::Thunks { error: e, .. } => e.site(),
            Error::Poke(e) => e.site(),
            _ => None,
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            // Transparent: it displays as the plan error.
            Error::Plan(e) => core::error::Error::source(e),
            Error::Thunks { error, .. } => Some(error),
            #[cfg(feature = "std")]
            Error::Sites(e) => Some(e),
            #[cfg(feature = "std")]
            Error::Load(e) => Some(e),
            Error::Poke(e) => Some(e),
            _ => None,
        }
    }
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        Error::Plan(e)
    }
}
