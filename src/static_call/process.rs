//! Updating static calls in the running program (`std`).

use alloc::vec::Vec;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use super::{RawStaticCall, StaticCallError, UpdateReport};
use crate::LinuxPoke;
use crate::image::Image;
use crate::plan::PlanError;
use crate::sites::{Site, SiteKind};

/// The running program's image and its static-call sites by trampoline,
/// found once: the recorded calls, and the sites of the relocations or the
/// embedded table.
fn current() -> &'static (Image<'static>, BTreeMap<usize, Vec<Site>>) {
    static CURRENT: OnceLock<(Image<'static>, BTreeMap<usize, Vec<Site>>)> = OnceLock::new();
    if let Some(c) = CURRENT.get() {
        return c;
    }
    // Initialized under the process lock, which `fork` waits for: a child
    // never inherits an initialization another thread was in the middle of
    // (it would wait for it forever).
    let _held = crate::sync::Held::acquire();
    CURRENT.get_or_init(|| {
        let image = Image::current();
        let mut by_tramp: BTreeMap<usize, Vec<Site>> = BTreeMap::new();
        // The memoized site list every mechanism shares (one parse of the
        // executable per process). Held re-entrantly: the list's own
        // initialization takes the same process lock.
        let sites = crate::elf::current_sites().unwrap_or(&[]);
        // The calls `static_call!`'s functions recorded need no relocation
        // (those of ifunc stubs land under keys no trampoline asks for).
        for s in super::with_recorded(sites, SiteKind::StaticCall) {
            if s.kind == SiteKind::StaticCall {
                by_tramp.entry(s.target).or_default().push(s);
            }
        }
        (image, by_tramp)
    })
}

impl RawStaticCall {
    /// Points the static call at `target` (`None`: no-op calls) in the
    /// running program, in one batch published by page swap: safe while other
    /// threads make the call.
    ///
    /// # Safety
    ///
    /// `target` is the address of a function of exactly the declared type.
    pub(crate) unsafe fn update_current(
        &self,
        target: Option<usize>,
    ) -> Result<UpdateReport, StaticCallError> {
        let (image, by_tramp) = current();
        let sites = by_tramp
            .get(&self.trampoline())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut poke = LinuxPoke::running()
            .map_err(|error| StaticCallError::Plan(PlanError::Poke { site: None, error }))?;
        // SAFETY: the caller passes only functions of the declared type; the
        // running poke publishes each page atomically (or runs the INT3
        // protocol) and every edit is one instruction for one.
        unsafe { self.update_with(target, image, sites, &mut poke) }
    }

    /// Number of call sites of this static call in the running program.
    pub(crate) fn sites(&self) -> usize {
        current().1.get(&self.trampoline()).map_or(0, Vec::len)
    }
}
