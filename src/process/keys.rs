//! Changing keys in the running program: their sites rewritten live.

use crate::os::{Process, ProcessBackend};
use crate::plan::{ApplyReport, PlanError};
use crate::static_key::{self, StaticKey};

/// A poke for code other threads run, its failure as a key's.
fn poke() -> Result<<Process as ProcessBackend>::Poke, static_key::Error> {
    Process::running_poke()
        .map_err(|error| static_key::Error::Plan(PlanError::Poke { site: None, error }))
}

impl<const INITIAL: bool> StaticKey<INITIAL> {
    /// Enables the key: every site in the running program changes in one
    /// batch published by page swap (see [`crate::os::linux`]), safe while
    /// other threads run them, whatever their signal state.
    pub fn enable(&self) -> Result<ApplyReport, static_key::Error> {
        self.set(true)
    }

    /// Disables the key (see [`enable`](Self::enable)).
    pub fn disable(&self) -> Result<ApplyReport, static_key::Error> {
        self.set(false)
    }

    /// Flips the key (see [`enable`](Self::enable)).
    pub fn toggle(&self) -> Result<ApplyReport, static_key::Error> {
        let _busy = self.busy.lock();
        let now = self.is_enabled();
        let running = super::running();
        let (image, index) = (&running.image, running.keys());
        // SAFETY: the running poke publishes pages atomically (or runs the
        // INT3 protocol), safe for threads running the sites; each site is
        // one NOP or jmp.
        unsafe { self.set_locked(!now, image, index, &mut poke()?) }
    }

    /// Sets the key to `enabled` (see [`enable`](Self::enable) and
    /// [`set_with`](Self::set_with) for the count). The program's own sites
    /// always follow the key, so an unchanged state writes nothing and
    /// makes no system call.
    pub fn set(&self, enabled: bool) -> Result<ApplyReport, static_key::Error> {
        let _busy = self.busy.lock();
        let count = self.count_for(enabled)?;
        if count == self.count() {
            return Ok(ApplyReport::default());
        }
        let running = super::running();
        let (image, index) = (&running.image, running.keys());
        // SAFETY: as in `toggle`.
        unsafe { self.move_locked(count, true, image, index, &mut poke()?) }
    }

    /// Reference-counted enable in the running program.
    pub fn inc(&self) -> Result<ApplyReport, static_key::Error> {
        let running = super::running();
        let (image, index) = (&running.image, running.keys());
        // SAFETY: as in `toggle`.
        unsafe { self.inc_with(image, index, &mut poke()?) }
    }

    /// Reference-counted disable in the running program.
    pub fn dec(&self) -> Result<ApplyReport, static_key::Error> {
        let running = super::running();
        let (image, index) = (&running.image, running.keys());
        // SAFETY: as in `toggle`.
        unsafe { self.dec_with(image, index, &mut poke()?) }
    }

    /// Number of sites this key has in the running program.
    pub fn site_count(&self) -> usize {
        super::running().keys().count(self.addr())
    }
}
