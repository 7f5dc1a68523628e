//! `ifunc::apply`: every ifunc of an image resolved and made direct in one
//! batch, and what it reports.

use alloc::vec::Vec;
use core::fmt;

use super::{Error, Ifunc};
use crate::cpu::{self, Features};
use crate::image::Image;
use crate::plan::Plan;
use crate::poke::TextPoke;
use crate::sites::{Site, SiteKind};
use crate::sync::UpdateGuard;

/// One ifunc as [`apply`] left it.
#[derive(Clone, Copy, Debug)]
pub struct Applied {
    /// The ifunc.
    pub ifunc: &'static Ifunc,
    /// The implementation chosen.
    pub chosen: usize,
    /// Whether it had been resolved before this apply (lazily, by a call).
    pub was_resolved: bool,
    /// The stub and call sites.
    pub update: crate::static_call::Report,
}

/// What [`apply`] did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Every ifunc of the image.
    pub ifuncs: Vec<Applied>,
    /// The batch.
    pub applied: crate::plan::ApplyReport,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ifuncs: {} resolved, {} call sites made direct",
            self.ifuncs.len(),
            self.ifuncs.iter().map(|a| a.update.inlined).sum::<usize>()
        )?;
        for a in &self.ifuncs {
            writeln!(
                f,
                "  {} -> {:#x} ({} sites direct, {} via the stub{})",
                a.ifunc.name(),
                a.chosen,
                a.update.inlined,
                a.update.via_trampoline,
                if a.was_resolved {
                    ", resolved earlier by a call"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

/// Resolves every `ifunc!` of `image` with `features` (publishing it
/// first; see [`crate::cpu::publish`]) and rewrites, in one batch, each
/// stub to `jmp <impl>` and each call site in `sites` to `call <impl>`.
/// Already-applied ifuncs are left as they are. Nothing is written if any
/// resolver's choice lies outside the image's text or any site holds
/// unexpected bytes.
///
/// ```
/// use altpatch::cpu::Features;
/// use altpatch::{Image, LinuxPoke};
///
/// altpatch::ifunc! {
///     fn answer() -> u32 = pick;
/// }
/// extern "C" fn forty_two() -> u32 { 42 }
/// fn pick(_: &Features) -> extern "C" fn() -> u32 { forty_two }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let image = Image::current();
///     let mut poke = LinuxPoke::new()?;
///     // No call-site list here: the stub alone is rewritten.
///     let report = unsafe { altpatch::ifunc::apply(&image, &Features::detect(), &[], &mut poke) }?;
///     assert!(report.ifuncs.iter().any(|a| a.ifunc.name() == "answer"));
///     assert_eq!(answer(), 42);
///     assert!(answer::ifunc().is_applied());
///     Ok(())
/// }
/// ```
///
/// # Safety
///
/// As for [`Plan::apply`] with `poke` (each edit is one instruction for one,
/// so a live poke may run it while other threads call the ifuncs).
pub unsafe fn apply<P: TextPoke + ?Sized>(
    image: &Image<'_>,
    features: &Features,
    sites: &[Site],
    poke: &mut P,
) -> Result<Report, Error> {
    let mut plan = Plan::for_image(image);
    let (mut out, _locks) = plan_all(image, features, sites, &mut plan)?;
    // SAFETY: forwarded from our caller.
    out.applied = unsafe { plan.apply(poke) }.map_err(Error::Plan)?;
    committed(&mut out);
    Ok(out)
}

/// Publishes `features`, resolves every ifunc of `image` and pushes onto
/// `plan` the edits that make their stubs and the call sites in `sites`
/// direct. The returned guards hold every ifunc's update lock until the
/// plan is applied and [`committed`] (or dropped).
pub(crate) fn plan_all(
    image: &Image<'_>,
    features: &Features,
    sites: &[Site],
    plan: &mut Plan,
) -> Result<(Report, Vec<UpdateGuard<'static>>), Error> {
    cpu::publish(*features).map_err(Error::Snapshot)?;
    plan_with_sites(image, features, sites, plan)
}

fn plan_with_sites(
    image: &Image<'_>,
    features: &Features,
    sites: &[Site],
    plan: &mut Plan,
) -> Result<(Report, Vec<UpdateGuard<'static>>), Error> {
    let records = image.ifuncs();
    let ifuncs: Vec<&'static Ifunc> = records.iter().map(Ifunc::of_record).collect();
    let locks: Vec<_> = ifuncs.iter().map(|i| i.call.lock()).collect();
    let mut out = Report::default();
    for &ifunc in &ifuncs {
        let was_resolved = ifunc.resolved().is_some();
        let (chosen, update) = ifunc.plan_apply(features, image, sites, plan)?;
        out.ifuncs.push(Applied {
            ifunc,
            chosen,
            was_resolved,
            update,
        });
    }
    Ok((out, locks))
}

/// Records that the plan from [`plan_all`] was applied.
pub(crate) fn committed(out: &mut Report) {
    for a in &mut out.ifuncs {
        a.ifunc.call.committed(Some(a.chosen));
        a.update.applied = out.applied;
    }
}

/// The sites in `sites` that call `ifunc`'s stub.
pub fn sites_of(sites: &[Site], ifunc: &Ifunc) -> Vec<Site> {
    let stub = ifunc.stub();
    sites
        .iter()
        .filter(|s| s.kind == SiteKind::Ifunc && s.target == stub)
        .copied()
        .collect()
}
