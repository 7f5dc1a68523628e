//! Alternatives: instruction sequences chosen by CPU feature and patched in
//! place, Linux's `ALTERNATIVE` in Rust.
//!
//! A site is written with [`alternative!`](crate::alternative!) (or
//! [`alternative_call!`](crate::alternative_call!) for a direct call to one
//! of several functions). Until patched, the default sequence runs. At boot
//! or load time, [`apply`] (or [`plan`], to look first) builds one
//! [`Plan`] for every site of an [`Image`]: for each site the last
//! alternative whose [`Condition`] holds is copied over the site, its
//! relative operands re-based to the site address, and the rest of the site
//! filled with as few NOP instructions as possible; where no alternative
//! holds, the default stays and its one-byte NOP padding is merged.
//!
//! Each site also carries a copy of its default sequence, so the original
//! bytes are known whatever state the site is in: the plan validates
//! against them, `undo` restores them, and applying again with another
//! feature snapshot moves a site from one alternative to another.

mod call_macros;
mod macros;
#[cfg(feature = "std")]
mod startup;

#[doc(hidden)]
pub use crate::arch::{__call_result, CallArgs};
pub use crate::arch::{CallArg, CallRet};
#[doc(inline)]
pub use crate::cpu::Condition;
#[cfg(feature = "std")]
pub(crate) use startup::STARTUP;
#[doc(hidden)]
#[cfg(feature = "std")]
#[cfg(feature = "std")]
pub use startup::{Startup, startup};

use alloc::borrow::Cow;
use alloc::format;
use alloc::vec::Vec;
use core::fmt;

use crate::arch::{self, RelocError};
use crate::cpu::Features;
use crate::image::Image;
use crate::plan::{ApplyReport, Bytes, Edit, Expect, Plan, PlanError};
use crate::poke::TextPoke;
use crate::records::AlternativeRecord;

/// Why alternatives could not be planned or applied. Nothing was written.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// A record is malformed or disagrees with the image.
    BadRecord {
        /// The site it names.
        site: usize,
        /// Index of the record in the image's table.
        record: usize,
        /// What is wrong.
        why: Cow<'static, str>,
    },
    /// The chosen sequence cannot be moved to the site.
    Relocation {
        /// The site.
        site: usize,
        /// The condition of the alternative (or `None` for the default).
        condition: Option<Condition>,
        /// Why.
        error: RelocError,
    },
    /// The plan was refused (for example, a site holds bytes that are no
    /// sequence of its own) or the poke failed.
    Plan(PlanError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadRecord { site, record, why } => write!(
                f,
                "alternative site at {site:#x} (record {record}): {why}; nothing written"
            ),
            Error::Relocation {
                site,
                condition,
                error,
            } => {
                let which = match condition {
                    Some(c) => format!("alternative `{c}`"),
                    None => "default".into(),
                };
                write!(
                    f,
                    "alternative site at {site:#x}: {which} cannot be moved there: {error}; nothing written"
                )
            }
            Error::Plan(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl Error {
    /// The address of the site the error is about, where it names one
    /// (see [`crate::Error::site`]).
    pub fn site(&self) -> Option<usize> {
        match self {
            Error::BadRecord { site, .. } | Error::Relocation { site, .. } => Some(*site),
            Error::Plan(e) => e.site(),
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Error::Relocation { error, .. } => Some(error),
            // Transparent (its message is the plan error's): the cause below.
            Error::Plan(e) => core::error::Error::source(e),
            Error::BadRecord { .. } => None,
        }
    }
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        Error::Plan(e)
    }
}

/// What was decided for one site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteReport {
    /// The site's first byte.
    pub site: usize,
    /// The site's name, if it was given one (`alternative!(name: ...)`).
    pub name: Option<alloc::string::String>,
    /// Its length (padding included).
    pub len: usize,
    /// The conditions of its alternatives, in order.
    pub conditions: Vec<Condition>,
    /// The index (in `conditions`) of the alternative chosen, or `None` when
    /// the default stays.
    pub chosen: Option<usize>,
}

impl fmt::Display for SiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} ", self.site)?;
        if let Some(n) = &self.name {
            write!(f, "{n} ")?;
        }
        write!(f, "({} bytes) [", self.len)?;
        for (i, c) in self.conditions.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}")?;
        }
        f.write_str("] -> ")?;
        match self.chosen {
            Some(i) => write!(f, "`{}`", self.conditions[i]),
            None => f.write_str("default"),
        }
    }
}

/// What [`plan`] decided and [`apply`] did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One entry per site, in address order.
    pub sites: Vec<SiteReport>,
    /// The outcome of applying the plan (zero for a plan not yet applied).
    pub applied: ApplyReport,
}

impl Report {
    /// The report for the site at `addr`.
    pub fn site(&self, addr: usize) -> Option<&SiteReport> {
        self.sites.iter().find(|s| s.site == addr)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let replaced = self.sites.iter().filter(|s| s.chosen.is_some()).count();
        writeln!(
            f,
            "alternatives: {} sites, {} replaced, {} default; {}",
            self.sites.len(),
            replaced,
            self.sites.len() - replaced,
            self.applied
        )?;
        for s in &self.sites {
            writeln!(f, "  {s}")?;
        }
        Ok(())
    }
}

/// Reads `len` bytes at `addr` of `image`'s text.
fn text_bytes<'a>(image: &Image<'a>, addr: usize, len: usize) -> Option<&'a [u8]> {
    if !image.contains_text(addr, len) {
        return None;
    }
    // SAFETY: the range lies inside the image's text, which the image's
    // constructor guarantees is mapped and readable for 'a.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Builds the plan that puts every site of `image` in the state `features`
/// selects, without writing anything. Reads the image's text to learn which
/// state each site is in now.
pub fn plan(image: &Image<'_>, features: &Features) -> Result<(Plan, Report), Error> {
    let records = image.alternatives();
    // Group by site without touching the table: an index sorted by address,
    // stable so each site's records keep their order (the last that holds
    // wins).
    let mut order: Vec<u32> = (0..records.len() as u32).collect();
    order.sort_by_key(|&i| records[i as usize].site());

    // Names come from patch points at site addresses.
    let mut names: Vec<(usize, &str)> = image
        .patch_points()
        .iter()
        .map(|p| (p.address(), p.name()))
        .collect();
    names.sort_unstable();

    let mut plan = Plan::for_image(image);
    let mut report = Report::default();
    let mut i = 0;
    while i < order.len() {
        let site = records[order[i] as usize].site();
        let mut j = i;
        while j < order.len() && records[order[j] as usize].site() == site {
            j += 1;
        }
        let group: Vec<usize> = order[i..j].iter().map(|&k| k as usize).collect();
        let name = names
            .binary_search_by_key(&site, |&(a, _)| a)
            .ok()
            .map(|k| names[k].1);
        let (edit, site_report) = plan_site(image, features, records, &group, name)?;
        plan.push(edit);
        report.sites.push(site_report);
        i = j;
    }
    Ok((plan, report))
}

/// Plans one site from its records (indices into `records`, in order).
fn plan_site(
    image: &Image<'_>,
    features: &Features,
    records: &[AlternativeRecord],
    group: &[usize],
    name: Option<&str>,
) -> Result<(Edit, SiteReport), Error> {
    let first = &records[group[0]];
    let site = first.site();
    let site_len = first.site_len();
    let default_len = first.default_len();
    let bad = |record: usize, why: Cow<'static, str>| Error::BadRecord { site, record, why };

    let mut conditions = Vec::with_capacity(group.len());
    for &k in group {
        let r = &records[k];
        let cond = r.condition().ok_or_else(|| {
            bad(
                k,
                format!(
                    "unknown condition {:#06x} (feature number or flags)",
                    r.condition_bits()
                )
                .into(),
            )
        })?;
        if r.site_len() != site_len
            || r.default_len() != default_len
            || r.original() != first.original()
        {
            return Err(bad(k, "records of one site disagree on its layout".into()));
        }
        if r.default_len() > r.site_len() {
            return Err(bad(k, "default longer than the site".into()));
        }
        if r.replacement_len() > r.site_len() {
            return Err(bad(
                k,
                format!(
                    "replacement of {} bytes is longer than the {}-byte site",
                    r.replacement_len(),
                    r.site_len()
                )
                .into(),
            ));
        }
        if r.original_len() != r.default_len() {
            return Err(bad(
                k,
                "the copy of the default differs in length from the site's default".into(),
            ));
        }
        if !image.contains_text(site, site_len) {
            return Err(bad(k, "site is outside the image's text".into()));
        }
        if text_bytes(image, r.replacement(), r.replacement_len()).is_none() {
            return Err(bad(k, "replacement is outside the image's text".into()));
        }
        conditions.push(cond);
    }
    let orig = text_bytes(image, first.original(), default_len).ok_or_else(|| {
        bad(
            group[0],
            "copy of the default is outside the image's text".into(),
        )
    })?;

    // Every state the site can legitimately be in: original (default plus
    // one-byte NOP padding), default with merged padding, each alternative.
    let relocated = |code: &[u8], from: usize, condition: Option<Condition>, pad: fn(&mut [u8])| {
        let mut out = alloc::vec![0u8; site_len];
        arch::relocate(code, from, site, &mut out).map_err(|error| Error::Relocation {
            site,
            condition,
            error,
        })?;
        pad(&mut out[code.len()..]);
        Ok::<_, Error>(out)
    };
    let original = relocated(orig, first.original(), None, arch::fill_site_pad)?;
    let default_merged = relocated(orig, first.original(), None, arch::fill_gap)?;
    let mut states = Vec::with_capacity(group.len());
    for (&k, &cond) in group.iter().zip(&conditions) {
        let r = &records[k];
        let code = text_bytes(image, r.replacement(), r.replacement_len()).unwrap_or(&[]);
        states.push(relocated(
            code,
            r.replacement(),
            Some(cond),
            arch::fill_gap,
        )?);
    }

    let chosen = conditions.iter().rposition(|c| c.holds(features));
    let new = match chosen {
        Some(n) => &states[n],
        None => &default_merged,
    };

    // Validate against the state the site is in now, if it is one of its own.
    let current = text_bytes(image, site, site_len).expect("checked above");
    let expected = if current == &original[..] || current == &new[..] {
        &original
    } else if current == &default_merged[..] {
        &default_merged
    } else {
        states
            .iter()
            .find(|s| current == &s[..])
            .unwrap_or(&original)
    };

    let reason = match chosen {
        Some(n) => format!("alternative `{}`", conditions[n]),
        None => "default, padding merged".into(),
    };
    let label = match name {
        Some(n) => format!("alternative {n}"),
        None => format!("alternative@{site:#x}"),
    };
    let edit = Edit::new(site, Expect::Bytes(Bytes::new(expected)), Bytes::new(new))
        .site(label)
        .reason(reason);
    let report = SiteReport {
        site,
        name: name.map(Into::into),
        len: site_len,
        conditions,
        chosen,
    };
    Ok((edit, report))
}

/// Puts every alternative site of `image` in the state `features` selects:
/// [`plan`], then [`Plan::apply`] through `poke`. Sites already in that
/// state are left alone, so applying twice is a no-op.
///
/// ```
/// use altpatch::cpu::Features;
/// use altpatch::{Image, LinuxPoke, alternative};
///
/// #[inline(never)]
/// fn load_be(p: &u32) -> u32 {
///     let v: u32;
///     // SAFETY: reads the u32 behind a valid reference; both sequences
///     // compute the same value.
///     unsafe {
///         alternative!(
///             "mov {v:e}, [{p}]\nbswap {v:e}",
///             [Movbe => "movbe {v:e}, [{p}]"],
///             p = in(reg) p, v = out(reg) v,
///             options(nostack, readonly, preserves_flags)
///         )
///     };
///     v
/// }
///
/// let mut poke = LinuxPoke::new().unwrap();
/// // SAFETY: at start-up; no other thread runs the program's alternatives.
/// let report =
///     unsafe { altpatch::alternative::apply(&Image::current(), &Features::detect(), &mut poke) }
///         .unwrap();
/// assert!(!report.sites.is_empty());
/// assert_eq!(load_be(&0x1122_3344), 0x4433_2211);
/// ```
///
/// # Safety
///
/// No thread may execute any alternative site of the image during the call
/// (a site may change from several instructions to others): patch at boot,
/// at load time before the image's code runs, or with the other threads
/// stopped. Every replacement must be correct for the CPU `features`
/// describes (forcing a feature on that the CPU lacks makes the site fault).
pub unsafe fn apply<P: TextPoke + ?Sized>(
    image: &Image<'_>,
    features: &Features,
    poke: &mut P,
) -> Result<Report, Error> {
    let (mut plan, mut report) = plan(image, features)?;
    // SAFETY: forwarded from our caller; the plan writes only sequences the
    // image's own records describe, moved to their sites.
    report.applied = unsafe { plan.apply(poke) }?;
    Ok(report)
}
