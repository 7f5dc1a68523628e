//! What became of each site, one byte per site: start-up applies a policy
//! to tens of thousands of sites, and a 48-byte record per site (a copy of
//! the site and its outcome) cost more to build than planning the site.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;

use super::{Outcome, SiteOutcome};
use crate::sites::Site;

/// Not a site a policy considers (a static call or ifunc site).
const SKIPPED: u8 = 0;
const INLINED: u8 = 1;
const VIA_THUNK: u8 = 2;
/// Refused, for `reasons[code - REFUSED]`.
const REFUSED: u8 = 3;
/// The reasons a code can name.
const MAX_REASONS: usize = (u8::MAX - REFUSED) as usize + 1;
/// The reason shown if more distinct reasons than codes were recorded
/// (never by this crate, which has a few dozen).
const TOO_MANY: &str = "refused (more distinct reasons than a report records)";

/// The outcome of every thunk and return-thunk site
/// [`apply`](super::apply) considered, in the order of the site list it
/// was given. It keeps that list (borrowed) and one byte per site, not a
/// copy of each site; iterating yields [`SiteOutcome`]s.
///
/// ```
/// use altpatch::retpoline::{Outcome, SiteOutcome, SiteOutcomes};
/// use altpatch::sites::{Site, SiteKind};
/// use altpatch::x86::{BranchKind, Reg};
///
/// let site = Site {
///     addr: 0x1000,
///     len: 5,
///     form: BranchKind::Call,
///     kind: SiteKind::IndirectThunk(Reg::R11),
///     target: 0x2000,
/// };
/// let outcomes = SiteOutcomes::from_outcomes(vec![
///     SiteOutcome { site, outcome: Outcome::Inlined },
///     SiteOutcome { site, outcome: Outcome::Refused("no room") },
/// ]);
/// assert_eq!(outcomes.len(), 2);
/// let refused: Vec<_> = outcomes.iter().filter(|s| s.outcome != Outcome::Inlined).collect();
/// assert_eq!(refused[0].outcome, Outcome::Refused("no room"));
/// ```
#[derive(Clone, Default)]
pub struct SiteOutcomes<'s> {
    sites: Cow<'s, [Site]>,
    /// Per site of `sites` (a prefix of them while planning): `SKIPPED`,
    /// `INLINED`, `VIA_THUNK`, or `REFUSED` + its reason's index.
    codes: Vec<u8>,
    reasons: Vec<&'static str>,
    len: usize,
}

impl<'s> SiteOutcomes<'s> {
    /// Outcomes for `sites`, none recorded yet (room for all).
    pub(super) fn for_sites(sites: &'s [Site]) -> SiteOutcomes<'s> {
        SiteOutcomes {
            sites: Cow::Borrowed(sites),
            codes: Vec::with_capacity(sites.len()),
            reasons: Vec::new(),
            len: 0,
        }
    }

    /// Records that the next site of the list is not one a policy
    /// considers.
    #[inline(always)]
    pub(super) fn skip(&mut self) {
        self.codes.push(SKIPPED);
    }

    /// Records the next site's outcome.
    #[inline(always)]
    pub(super) fn push(&mut self, outcome: Outcome) {
        let code = match outcome {
            Outcome::Inlined => INLINED,
            Outcome::ViaThunk => VIA_THUNK,
            Outcome::Refused(why) => self.refused(why),
        };
        self.codes.push(code);
        self.len += 1;
    }

    /// The code of refusal `why` (rare: out of line).
    #[inline(never)]
    fn refused(&mut self, why: &'static str) -> u8 {
        let i = match self.reasons.iter().position(|r| *r == why) {
            Some(i) => i,
            None if self.reasons.len() < MAX_REASONS - 1 => {
                self.reasons.push(why);
                self.reasons.len() - 1
            }
            // The last code stands for every further reason.
            None => {
                self.reasons.resize(MAX_REASONS, TOO_MANY);
                MAX_REASONS - 1
            }
        };
        REFUSED + i as u8
    }

    /// The given outcomes (for a report built by hand).
    pub fn from_outcomes(outcomes: Vec<SiteOutcome>) -> SiteOutcomes<'static> {
        let mut out = SiteOutcomes {
            sites: Cow::Owned(outcomes.iter().map(|o| o.site).collect()),
            codes: Vec::with_capacity(outcomes.len()),
            reasons: Vec::new(),
            len: 0,
        };
        for o in outcomes {
            out.push(o.outcome);
        }
        out
    }

    /// The same outcomes, owning a copy of the site list.
    pub fn into_owned(self) -> SiteOutcomes<'static> {
        SiteOutcomes {
            sites: Cow::Owned(self.sites.into_owned()),
            codes: self.codes,
            reasons: self.reasons,
            len: self.len,
        }
    }

    /// Number of sites considered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no site was considered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each site considered and its outcome, in list order.
    pub fn iter(&self) -> SiteOutcomeIter<'_> {
        SiteOutcomeIter {
            sites: self.sites.iter(),
            codes: self.codes.iter(),
            reasons: &self.reasons,
        }
    }
}

/// The iterator of [`SiteOutcomes::iter`].
#[derive(Clone, Debug)]
pub struct SiteOutcomeIter<'a> {
    sites: core::slice::Iter<'a, Site>,
    codes: core::slice::Iter<'a, u8>,
    reasons: &'a [&'static str],
}

impl Iterator for SiteOutcomeIter<'_> {
    type Item = SiteOutcome;

    fn next(&mut self) -> Option<SiteOutcome> {
        loop {
            let (site, &code) = (self.sites.next()?, self.codes.next()?);
            let outcome = match code {
                SKIPPED => continue,
                INLINED => Outcome::Inlined,
                VIA_THUNK => Outcome::ViaThunk,
                c => Outcome::Refused(self.reasons[usize::from(c - REFUSED)]),
            };
            return Some(SiteOutcome {
                site: *site,
                outcome,
            });
        }
    }
}

impl<'a> IntoIterator for &'a SiteOutcomes<'_> {
    type Item = SiteOutcome;
    type IntoIter = SiteOutcomeIter<'a>;

    fn into_iter(self) -> SiteOutcomeIter<'a> {
        self.iter()
    }
}

impl fmt::Debug for SiteOutcomes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq for SiteOutcomes<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{BranchKind, Reg};
    use crate::sites::SiteKind;

    #[test]
    fn records_and_lists_in_order_skipping_other_kinds() {
        let site = |addr, kind| Site {
            addr,
            len: 5,
            form: BranchKind::Call,
            kind,
            target: 0,
        };
        let sites = [
            site(1, SiteKind::IndirectThunk(Reg::Rax)),
            site(2, SiteKind::StaticCall),
            site(3, SiteKind::ReturnThunk),
            site(4, SiteKind::IndirectThunk(Reg::R11)),
        ];
        let mut o = SiteOutcomes::for_sites(&sites);
        o.push(Outcome::Inlined);
        o.skip();
        o.push(Outcome::Refused("b"));
        o.push(Outcome::Refused("a"));
        let got: Vec<_> = o.iter().map(|s| (s.site.addr, s.outcome)).collect();
        let refused = |w| Outcome::Refused(w);
        assert_eq!(
            got,
            [(1, Outcome::Inlined), (3, refused("b")), (4, refused("a"))]
        );
        assert_eq!(o.len(), 3);
        assert_eq!(o.clone().into_owned(), o);
        // More distinct reasons than codes: the rest share the last one.
        let many: Vec<&'static str> = (0..300)
            .map(|i| &*alloc::boxed::Box::leak(alloc::format!("r{i}").into_boxed_str()))
            .collect();
        let sites = alloc::vec![sites[0]; 300];
        let mut o = SiteOutcomes::for_sites(&sites);
        for w in &many {
            o.push(Outcome::Refused(w));
        }
        let last = o.iter().last().unwrap().outcome;
        assert_eq!(last, Outcome::Refused(TOO_MANY));
        assert_eq!(o.iter().nth(251).unwrap().outcome, Outcome::Refused("r251"));
    }
}
