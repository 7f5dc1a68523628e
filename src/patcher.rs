//! One patcher for any mix of mechanisms over one image and one poke.
//!
//! Each mechanism still has its own entry point (`alternative::apply`,
//! `retpoline::apply`, `StaticKey::set_with`, ...); a [`Patcher`] is what a
//! kernel's boot path or a loader wants instead: every mechanism planned
//! against the same image, every batch validated before the first byte is
//! written, written in one fixed order, and undone as a whole if any batch
//! fails.

use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::cpu::Features;
use crate::error::Error;
use crate::image::Image;
use crate::plan::{ApplyReport, Plan, PlanError};
use crate::poke::TextPoke;
use crate::sites::Site;
use crate::static_call::{RawStaticCall, StaticCall};
use crate::static_key::{KeyIndex, StaticKey};
use crate::sync::UpdateGuard;
use crate::{alternative, ifunc, retpoline};

/// Plans several mechanisms over one image and applies them as one
/// validated batch.
///
/// The order of application is fixed, whatever order the mechanisms were
/// added in:
///
/// 1. **retpolines** (sites, then this crate's thunks): first, as in
///    Linux's `alternative_instructions()`, so every other mechanism sees
///    call sites in their final form; their sites are validated against the
///    compiled bytes, so an edit of another mechanism on the same bytes is
///    refused before anything is written;
/// 2. **everything else in one plan**: alternatives, static keys, static
///    calls and ifuncs (the feature snapshot published, each resolver run,
///    before planning). One plan, so two mechanisms claiming the same
///    bytes are refused as an overlap, by site.
///
/// Every batch is validated before the first write; if a later batch
/// fails, the earlier ones are undone, so text is as it was. Each object's
/// update lock is held from planning until the patch is applied or the
/// patcher dropped. Printing a patcher (`{}`) is the dry run.
///
/// In a process, every update lock is the one process-wide lock (see the
/// lock's rules in `ARCHITECTURE.md`): a patcher holding it keeps other
/// threads' updates waiting and asynchronous signals blocked on its own
/// thread until it is applied or dropped, so plan and apply without
/// waiting for anything in between. The patcher is not `Send`.
///
/// ```
/// use altpatch::cpu::Features;
/// use altpatch::retpoline::{Mode, Policy};
/// use altpatch::{Image, LinuxPoke, Patcher};
///
/// extern "C" fn one() -> u32 {
///     1
/// }
/// extern "C" fn two() -> u32 {
///     2
/// }
/// altpatch::static_call! {
///     fn pick() -> u32 = one;
/// }
///
/// let image = Image::current();
/// let features = Features::detect();
/// let mut patcher = Patcher::new(&image, &features, &[]);
/// patcher.retpolines(&Policy::new(Mode::Plain, "example"))?;
/// patcher.alternatives()?;
/// patcher.static_call(pick::static_call(), two)?;
/// print!("{patcher}"); // the dry run
/// let mut poke = LinuxPoke::new()?;
/// // SAFETY: in place; no other thread runs the patched code.
/// let report = unsafe { patcher.apply(&mut poke) }?;
/// assert_eq!(pick(), 2);
/// print!("{report}");
/// # Ok::<(), altpatch::Error>(())
/// ```
pub struct Patcher<'a> {
    image: &'a Image<'a>,
    features: Features,
    sites: &'a [Site],
    retpoline: Option<retpoline::Planned<'a>>,
    plan: Plan,
    alternatives: Option<alternative::Report>,
    ifuncs: Option<ifunc::Report>,
    calls: Vec<(&'static RawStaticCall, usize)>,
    /// Each key's count and the state its sites were planned for.
    keys: Vec<(&'static AtomicUsize, bool)>,
    locks: Vec<UpdateGuard<'static>>,
}

impl<'a> Patcher<'a> {
    /// A patcher of `image`, deciding with `features`, with `sites` the
    /// image's compiler-generated sites (retpoline and static-call or ifunc
    /// call sites: from [`crate::elf::image_sites`] or the embedded table;
    /// empty for trampolines and stubs only).
    pub fn new(image: &'a Image<'a>, features: &Features, sites: &'a [Site]) -> Patcher<'a> {
        Patcher {
            image,
            features: *features,
            sites,
            retpoline: None,
            plan: Plan::for_image(image),
            alternatives: None,
            ifuncs: None,
            calls: Vec::new(),
            keys: Vec::new(),
            locks: Vec::new(),
        }
    }

    /// Plans `policy` for the retpoline and return sites and the thunks.
    pub fn retpolines(&mut self, policy: &retpoline::Policy) -> Result<&mut Self, Error> {
        if self.retpoline.is_some() {
            return Err(Error::AddedTwice("retpolines"));
        }
        // Applied later (anything may write text in between): every site is
        // read again by validation.
        self.retpoline = Some(retpoline::Planned::new(
            self.image, self.sites, policy, false,
        )?);
        Ok(self)
    }

    /// Plans every alternative of the image for the feature snapshot.
    pub fn alternatives(&mut self) -> Result<&mut Self, Error> {
        if self.alternatives.is_some() {
            return Err(Error::AddedTwice("alternatives"));
        }
        let (plan, report) = alternative::plan(self.image, &self.features)?;
        self.plan.append(plan);
        self.alternatives = Some(report);
        Ok(self)
    }

    /// Publishes the feature snapshot, resolves every ifunc of the image
    /// and plans their stubs and call sites.
    pub fn ifuncs(&mut self) -> Result<&mut Self, Error> {
        if self.ifuncs.is_some() {
            return Err(Error::AddedTwice("ifuncs"));
        }
        // Into a scratch plan, kept only on success: a failed add leaves
        // the patcher as it was.
        let mut plan = Plan::for_image(self.image);
        let (report, locks) = ifunc::plan_all(self.image, &self.features, self.sites, &mut plan)?;
        self.plan.append(plan);
        self.locks.extend(locks);
        self.ifuncs = Some(report);
        Ok(self)
    }

    /// Plans bringing `key`'s sites in the image to the key's state (a
    /// kernel's boot, or an image loaded after the key changed).
    pub fn static_key<const INITIAL: bool>(
        &mut self,
        key: &'static StaticKey<INITIAL>,
        index: &KeyIndex,
    ) -> Result<&mut Self, Error> {
        // Refused before locking: in a kernel the lock is a spin flag, which
        // a second lock would wait on forever.
        if self
            .keys
            .iter()
            .any(|(c, _)| core::ptr::eq(*c, key.count_cell()))
        {
            return Err(Error::AddedTwice("a static key"));
        }
        let lock = key.lock();
        let enabled = key.is_enabled();
        // Into a scratch plan, kept only on success.
        let mut plan = Plan::for_image(self.image);
        key.plan_sync(enabled, self.image, index, &mut plan)?;
        self.plan.append(plan);
        self.locks.push(lock);
        // The std lock is recursive: this thread may still change the key
        // before `apply`, which then refuses rather than write stale forms.
        self.keys.push((key.count_cell(), enabled));
        Ok(self)
    }

    /// Plans pointing `call` (its trampoline and its sites among the
    /// patcher's) at `f`.
    pub fn static_call<F: Copy + 'static>(
        &mut self,
        call: &'static StaticCall<F>,
        f: F,
    ) -> Result<&mut Self, Error> {
        let raw = call.raw();
        // Refused before locking, as for keys.
        if self.calls.iter().any(|(c, _)| core::ptr::eq(*c, raw)) {
            return Err(Error::AddedTwice("a static call"));
        }
        let lock = raw.lock();
        let target = crate::static_call::addr_of(f);
        // Into a scratch plan, kept only on success.
        let mut plan = Plan::for_image(self.image);
        raw.plan_update(Some(target), self.image, self.sites, &mut plan)?;
        self.plan.append(plan);
        self.locks.push(lock);
        self.calls.push((raw, target));
        Ok(self)
    }

    /// Validates every batch, then writes them in the order of the type's
    /// docs; on any failure, undoes what was written and returns the error
    /// (text is as it was, unless the undo itself failed: the error says).
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`] with `poke`: if other threads may run the
    /// patched code, `poke` must implement a protocol for that.
    pub unsafe fn apply<P: TextPoke + ?Sized>(
        mut self,
        poke: &mut P,
    ) -> Result<PatchReport<'a>, Error> {
        let changed = |(count, planned): &(&AtomicUsize, bool)| {
            (count.load(Ordering::Acquire) != 0) != *planned
        };
        if self.keys.iter().any(changed) {
            return Err(Error::ChangedSincePlanned("a static key"));
        }
        // Nothing is written before every batch is known good: the shared
        // plan is validated here (its edits are then sorted and disjoint,
        // which the overlap check relies on), the thunk batch too (it is
        // written after the sites). The site batch is validated by its own
        // apply before its first write, which is the first write of all: a
        // second pass here would read every site twice.
        self.plan.validate(poke)?;
        if let Some(r) = &mut self.retpoline {
            r.thunk_plan
                .validate(poke)
                .map_err(retpoline::Error::from)?;
            let mut spans = r.site_plan.spans();
            let thunk_edits = r.thunk_plan.edits().iter();
            spans.extend(thunk_edits.map(|e| e.addr()..e.addr() + e.len()));
            refuse_shared_bytes(&spans, &self.plan)?;
        }

        let retpolines = match &mut self.retpoline {
            // SAFETY: forwarded from our caller.
            Some(r) => Some(unsafe { r.write(poke) }?),
            None => None,
        };
        // SAFETY: as above.
        let applied = match unsafe { self.plan.apply(poke) } {
            Ok(a) => a,
            Err(e) => {
                if let Some(r) = &mut self.retpoline {
                    // SAFETY: as above.
                    if !unsafe { r.undo(poke) } {
                        return Err(Error::RetpolinesNotRestored(e));
                    }
                }
                return Err(Error::Plan(e));
            }
        };
        // Record each object's new state (its lock still held).
        for (raw, target) in &self.calls {
            raw.committed(Some(*target));
        }
        let mut ifuncs = self.ifuncs.take();
        if let Some(r) = &mut ifuncs {
            r.applied = applied;
            ifunc::committed(r);
        }
        let mut alternatives = self.alternatives.take();
        if let Some(r) = &mut alternatives {
            r.applied = applied;
        }
        Ok(PatchReport {
            retpolines,
            alternatives,
            ifuncs,
            static_calls: self.calls.len(),
            static_keys: self.keys.len(),
            applied,
        })
    }
}

/// Refuses a retpoline edit on bytes another mechanism also edits. `plan`
/// was validated: its edits lie in text (no overflow) and are disjoint.
fn refuse_shared_bytes(spans: &[Range<usize>], plan: &Plan) -> Result<(), Error> {
    let edits = plan.edits();
    for s in spans {
        // The first edit ending after the span starts: the only candidate
        // that can overlap it, since validation sorted the plan's edits and
        // found them disjoint.
        let i = edits.partition_point(|e| e.addr() + e.len() <= s.start);
        if let Some(other) = edits.get(i)
            && other.addr() < s.end
        {
            return Err(Error::Plan(PlanError::Overlap {
                site: other.site_name().to_string().into(),
                other: "a retpoline site".into(),
                addr: s.start,
            }));
        }
    }
    Ok(())
}

impl fmt::Display for Patcher<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "patch of {} (dry run):", self.image.name())?;
        if let Some(r) = &self.retpoline {
            writeln!(
                f,
                "1. retpolines: {} site edits, {} thunk edits",
                r.site_plan.len(),
                r.thunk_plan.len()
            )?;
        }
        writeln!(
            f,
            "2. one plan of {} edits ({} static calls, {} static keys{}):",
            self.plan.len(),
            self.calls.len(),
            self.keys.len(),
            also(self.alternatives.is_some(), self.ifuncs.is_some()),
        )?;
        fmt::Display::fmt(&self.plan, f)
    }
}

/// What [`Patcher::apply`] did.
#[derive(Debug)]
#[non_exhaustive]
pub struct PatchReport<'s> {
    /// The retpoline step, if planned (for the patcher's site list `'s`).
    pub retpolines: Option<retpoline::Report<'s>>,
    /// The alternatives, if planned (their `applied` is the shared batch's).
    pub alternatives: Option<alternative::Report>,
    /// The ifuncs, if planned.
    pub ifuncs: Option<ifunc::Report>,
    /// Static calls re-targeted.
    pub static_calls: usize,
    /// Static keys whose sites were brought to their state.
    pub static_keys: usize,
    /// The shared batch (everything but retpolines).
    pub applied: ApplyReport,
}

impl fmt::Display for PatchReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.retpolines {
            write!(f, "{r}")?;
        }
        writeln!(
            f,
            "one batch: {} written, {} already in place ({} static calls, {} static keys{})",
            self.applied.written,
            self.applied.already,
            self.static_calls,
            self.static_keys,
            also(self.alternatives.is_some(), self.ifuncs.is_some()),
        )
    }
}

/// ", alternatives" and ", ifuncs" in a listing, for what was planned.
fn also(alternatives: bool, ifuncs: bool) -> &'static str {
    match (alternatives, ifuncs) {
        (true, true) => ", alternatives, ifuncs",
        (true, false) => ", alternatives",
        (false, true) => ", ifuncs",
        (false, false) => "",
    }
}
