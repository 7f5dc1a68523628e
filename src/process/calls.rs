//! Updating static calls in the running program: the trampoline and every
//! call site — the recorded calls, and the sites of the relocations or the
//! embedded table — rewritten live.

use alloc::vec::Vec;
use std::collections::BTreeMap;

use crate::os::{Process, ProcessBackend};
use crate::plan::PlanError;
use crate::sites::{Site, SiteKind};
use crate::static_call::{self, RawStaticCall, StaticCall, addr_of};

/// The running program's static-call sites by trampoline.
pub(super) type ByTrampoline = BTreeMap<usize, Vec<Site>>;

/// Indexes the running program's static-call sites by trampoline.
pub(super) fn by_trampoline() -> ByTrampoline {
    let mut by_tramp = ByTrampoline::new();
    // The memoized site list every mechanism shares (one parse of the
    // executable per process). Held re-entrantly: the list's own
    // initialization takes the same process lock.
    let sites = crate::elf::current_sites().unwrap_or(&[]);
    // The calls `static_call!`'s functions recorded need no relocation
    // (those of ifunc stubs land under keys no trampoline asks for).
    for s in crate::static_call::with_recorded(sites, SiteKind::StaticCall) {
        if s.kind == SiteKind::StaticCall {
            by_tramp.entry(s.target).or_default().push(s);
        }
    }
    by_tramp
}

impl<F: Copy + 'static> StaticCall<F> {
    /// Points every call at `f` in the running program (`std`): the
    /// trampoline and every call site its relocations (or embedded site
    /// table) list, in one batch published by page swap, safe while other
    /// threads make the call.
    pub fn update(&self, f: F) -> Result<static_call::Report, static_call::Error> {
        // SAFETY: `f` has the declared type.
        unsafe { self.raw().update_current(Some(addr_of(f))) }
    }

    /// Makes every call a no-op in the running program, live (`std`;
    /// functions returning `()` only).
    pub fn set_none(&self) -> Result<static_call::Report, static_call::Error> {
        // SAFETY: none is checked against the signature.
        unsafe { self.raw().update_current(None) }
    }

    /// Number of call sites of this static call in the running program
    /// (`std`).
    pub fn site_count(&self) -> usize {
        self.raw().site_count()
    }
}

impl RawStaticCall {
    /// Points the static call at `target` (`None`: no-op calls) in the
    /// running program, in one batch published by page swap: safe while other
    /// threads make the call.
    ///
    /// # Safety
    ///
    /// `target` is the address of a function of exactly the declared type.
    unsafe fn update_current(
        &self,
        target: Option<usize>,
    ) -> Result<static_call::Report, static_call::Error> {
        let running = super::running();
        let sites = running
            .calls()
            .get(&self.trampoline())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut poke = Process::running_poke()
            .map_err(|error| static_call::Error::Plan(PlanError::Poke { site: None, error }))?;
        // SAFETY: the caller passes only functions of the declared type; the
        // running poke publishes each page atomically (or runs the INT3
        // protocol) and every edit is one instruction for one.
        unsafe { self.update_with(target, &running.image, sites, &mut poke) }
    }

    /// Number of call sites of this static call in the running program.
    fn site_count(&self) -> usize {
        super::running()
            .calls()
            .get(&self.trampoline())
            .map_or(0, Vec::len)
    }
}
