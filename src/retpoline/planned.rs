//! A retpoline policy planned and not yet written: the site batch and the
//! thunk batch, shared by [`apply`](super::apply) and the one patcher.

use alloc::vec::Vec;

use super::{
    CompiledThunk, Error, Policy, Report, SiteOutcomes, plan_compiled_thunks, plan_sites,
    plan_thunks,
};
use crate::image::Image;
use crate::plan::{CompactPlan, Plan};
use crate::poke::TextPoke;
use crate::sites::Site;
use crate::sync::{UpdateGuard, UpdateLock};

/// Taken from planning until the writes when they follow at once (in a
/// process, the one process lock every text change through a `LinuxPoke`
/// takes): the site plan's observations of the text stay true until they
/// are acted on.
static SITES_LOCK: UpdateLock = UpdateLock::new();

/// A policy planned against an image and not yet written: the site batch
/// and the thunk batch. `apply` and the one patcher
/// ([`Patcher`](crate::Patcher)) both go through it.
pub(crate) struct Planned<'s> {
    policy: Policy,
    pub(crate) site_plan: CompactPlan,
    outcomes: SiteOutcomes<'s>,
    pub(crate) thunk_plan: Plan,
    thunks: usize,
    compiled_thunks: Vec<CompiledThunk>,
    /// Held for as long as the plans are, when written at once (see
    /// `SITES_LOCK`).
    _lock: Option<UpdateGuard<'static>>,
}

impl<'s> Planned<'s> {
    /// Plans `policy` for `sites` and the thunks in `image`. `at_once`:
    /// the caller writes the plans right after (no text written in between
    /// on its thread): the update lock is then held until the result is
    /// dropped, and the site batch's validation takes planning's reading of
    /// each site. Otherwise (the patcher, which applies later) every site
    /// is read again when the batch is validated.
    pub(crate) fn new(
        image: &Image<'_>,
        sites: &'s [Site],
        policy: &Policy,
        at_once: bool,
    ) -> Result<Planned<'s>, Error> {
        let lock = at_once.then(|| SITES_LOCK.lock());
        let (site_plan, outcomes) = plan_sites(
            image,
            sites,
            policy.mode,
            policy.returns,
            policy.its,
            lock.as_ref(),
        )?;
        let (mut thunk_plan, thunks) = plan_thunks(image, policy.mode)?;
        let compiled_thunks = plan_compiled_thunks(image, sites, policy.mode, &mut thunk_plan);
        Ok(Planned {
            policy: policy.clone(),
            site_plan,
            outcomes,
            thunk_plan,
            thunks,
            compiled_thunks,
            _lock: lock,
        })
    }

    /// Writes the site batch, then the thunk batch (putting the sites back
    /// if the thunks fail). The thunk batch was validated by the caller.
    ///
    /// # Safety
    ///
    /// As for [`apply`](super::apply).
    pub(crate) unsafe fn write<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<Report<'s>, Error> {
        // SAFETY: forwarded from our caller.
        let sites_applied = unsafe { self.site_plan.apply(poke) }?;
        // SAFETY: as above.
        let thunks_applied = match unsafe { self.thunk_plan.apply(poke) } {
            Ok(r) => r,
            Err(error) => {
                // Put the sites back too (which a live poke may refuse: see
                // the module docs). Either way every site works with every
                // thunk form, so the program stays correct.
                // SAFETY: as above.
                let sites_restored = unsafe { self.site_plan.undo_written(poke) }.is_ok();
                return Err(Error::Thunks {
                    error,
                    sites_restored,
                });
            }
        };
        Ok(Report {
            policy: self.policy.clone(),
            sites: core::mem::take(&mut self.outcomes),
            thunks: self.thunks,
            compiled_thunks: core::mem::take(&mut self.compiled_thunks),
            sites_applied,
            thunks_applied,
        })
    }

    /// Puts back what [`write`](Self::write) wrote (a later batch of the
    /// patcher failed), and only that: edits it found already in place
    /// (an earlier `apply`) stay.
    ///
    /// # Safety
    ///
    /// As for [`apply`](super::apply).
    pub(crate) unsafe fn undo<P: TextPoke + ?Sized>(&mut self, poke: &mut P) -> bool {
        // SAFETY: forwarded from our caller.
        let thunks = unsafe { self.thunk_plan.undo_written(poke) }.is_ok();
        // SAFETY: as above.
        let sites = unsafe { self.site_plan.undo_written(poke) }.is_ok();
        thunks && sites
    }
}
