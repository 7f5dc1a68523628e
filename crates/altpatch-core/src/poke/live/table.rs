//! The seam between the INT3 protocol and the trap handler: where a batch's
//! sites are published for the handler, and how they are retired.
//!
//! The one invariant: **a table outlives every handler that loaded it.**
//! The patcher publishes the table before the first `int3` is written and
//! retires it after the last sync; retiring returns only once no handler
//! that could have seen the table is still reading it, so the patcher may
//! then free or reuse it. [`TrapSlot`] keeps that invariant with a pointer
//! and a count of handlers inside (the handler counts itself in *before*
//! loading the pointer; the patcher clears the pointer *before* waiting for
//! the count to reach zero — both sequentially consistent, so either the
//! handler sees null or the patcher sees the handler).
//!
//! A trap can also reach its handler after its batch ended: the CPU was
//! delayed between the trap and the handler, or (QEMU's TCG does this
//! often) it ran an `int3` it had fetched before the batch's last sync.
//! So the slot also remembers every site it ever published; a trap at one
//! of them whose `int3` is gone is *restarted* (run the site again as it
//! is now), and an `int3` found at one of them that the loaded table does
//! not have sends the handler back for the newest table (a batch published
//! after it looked). Only an `int3` at no site of ours, or at one where no
//! batch in flight put it, is not ours.
//!
//! The same driver ([`run_published`]) runs the protocol for
//! [`Int3Poke`](super::Int3Poke) (kernels) and for the Linux process path,
//! whose `SIGTRAP` handler reads a `TrapSlot` too.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use super::protocol::{Step, run_protocol};
use super::shadow::{Waited, first_byte};
use super::{LiveSites, NoShadowStack, ShadowStack, TrapAction, TrapFrame};
use crate::arch::TRAP as INT3;
use crate::poke::PokeError;

/// Where the sites of a live batch are published to the trap handler.
///
/// # Safety
///
/// Implementations must make the table passed to [`publish`] visible to
/// every trap handler that runs after `publish` returns, and must not return
/// from [`retire`] while any handler that read the table may still use it:
/// the caller frees or reuses the table as soon as `retire` returns.
///
/// [`publish`]: TrapTable::publish
/// [`retire`]: TrapTable::retire
pub unsafe trait TrapTable {
    /// Makes `sites` the table trap handlers consult.
    ///
    /// # Safety
    ///
    /// `sites` stays valid (unmoved, unchanged) until [`retire`] returns,
    /// and no other patcher publishes to this table until then (one batch
    /// at a time per table).
    ///
    /// [`retire`]: TrapTable::retire
    unsafe fn publish(&self, sites: &LiveSites);

    /// Withdraws the table and waits until no handler still uses it.
    ///
    /// # Safety
    ///
    /// Called by the patcher that published, once per `publish`.
    unsafe fn retire(&self);
}

/// A [`TrapTable`] for a `static`: the published table, every site ever
/// published, and a count of handlers inside. The embedder's `#BP`
/// handler calls [`emulate`](TrapSlot::emulate).
///
/// ```
/// use altpatch::poke::live::{LiveSite, LiveSites, TrapAction, TrapFrame, TrapSlot, TrapTable};
///
/// static SLOT: TrapSlot = TrapSlot::new();
///
/// // Text with a NOP5 that is to become `jmp +0x100`, mid-batch: its first
/// // byte is already the protocol's int3.
/// let mut text = vec![0xcc_u8, 0x1f, 0x44, 0, 0];
/// let at = text.as_ptr() as usize;
/// let jmp = [0xe9, 0xfb, 0, 0, 0];
/// let site = LiveSite::new(at, &[0x0f, 0x1f, 0x44, 0, 0], &jmp).unwrap();
/// let table = LiveSites::new(vec![site]);
/// // SAFETY: `table` outlives the batch; this is the only patcher.
/// unsafe { SLOT.publish(&table) };
///
/// // A CPU trapped on that int3: the handler emulates the jmp.
/// let trap = || TrapFrame { rip: at as u64 + 1, rsp: 0, rflags: 0, regs: [0; 16] };
/// let mut frame = trap();
/// // SAFETY: a jmp reads and writes no stack; the site is readable.
/// assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::Emulated);
/// assert_eq!(frame.rip, at as u64 + 0x100);
///
/// // The batch ends (last byte written, table retired). A CPU that trapped
/// // before but is handled only now runs the site again.
/// text[0] = 0xe9;
/// // SAFETY: published above.
/// unsafe { SLOT.retire() };
/// let mut frame = trap();
/// // SAFETY: as above.
/// assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::Restarted);
/// assert_eq!(frame.rip, at as u64);
/// assert_eq!(SLOT.emulated(), 1);
/// ```
pub struct TrapSlot {
    pub(super) table: AtomicPtr<LiveSites>,
    /// Every site address ever published, sorted (a leaked-until-replaced
    /// `Vec`, freed once no handler is inside).
    history: AtomicPtr<Vec<usize>>,
    /// Tables published so far: a handler that saw an `int3` its table
    /// lacks looks again if a batch was published meanwhile.
    generation: AtomicUsize,
    inside: AtomicUsize,
    emulated: AtomicUsize,
    pub(super) restarted: AtomicUsize,
}

impl Default for TrapSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// A handler inside a [`TrapSlot`]: while it lives, the table it saw stays
/// valid.
pub struct SlotGuard<'a> {
    slot: &'a TrapSlot,
    table: *const LiveSites,
}

impl SlotGuard<'_> {
    /// The published table, if a batch is in flight.
    #[inline(always)]
    pub fn sites(&self) -> Option<&LiveSites> {
        // SAFETY: the table stays valid while this guard counts itself
        // inside the slot (see `TrapSlot::retire`).
        unsafe { self.table.as_ref() }
    }

    /// Whether `addr` is a site this slot ever published.
    #[inline(always)]
    pub fn was_published(&self, addr: usize) -> bool {
        let h = self.slot.history.load(Ordering::SeqCst);
        // SAFETY: a history is freed only once no handler is inside, and
        // this guard is (see `TrapSlot::publish`).
        !h.is_null() && unsafe { &*h }.binary_search(&addr).is_ok()
    }

    /// The table published now (it may be newer than [`sites`]).
    ///
    /// [`sites`]: SlotGuard::sites
    #[inline(always)]
    fn reload(&mut self) -> Option<&LiveSites> {
        self.table = self.slot.table.load(Ordering::SeqCst);
        // SAFETY: as for `sites`: loaded while counted inside.
        unsafe { self.table.as_ref() }
    }
}

impl Drop for SlotGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.slot.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TrapSlot {
    /// An empty slot.
    pub const fn new() -> TrapSlot {
        TrapSlot {
            table: AtomicPtr::new(ptr::null_mut()),
            history: AtomicPtr::new(ptr::null_mut()),
            generation: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            emulated: AtomicUsize::new(0),
            restarted: AtomicUsize::new(0),
        }
    }

    /// For a trap handler: counts it in, then loads the table. Lock-free
    /// and allocation-free.
    #[inline(always)]
    pub fn enter(&self) -> SlotGuard<'_> {
        // Counted in before the load: `retire` clears the pointer before it
        // reads the count, so one of the two sees the other.
        self.inside.fetch_add(1, Ordering::SeqCst);
        SlotGuard {
            slot: self,
            table: self.table.load(Ordering::SeqCst),
        }
    }

    /// For a trap handler: what to do with the `int3` that trapped at
    /// `frame.rip - 1`. [`Emulated`]: the site is in the batch in flight,
    /// and `frame` now holds the effect of its new instruction.
    /// [`Restarted`]: a site published earlier whose `int3` is gone;
    /// `frame.rip` points at it again. [`NotOurs`]: no batch put an `int3`
    /// there; `frame` is unchanged. Lock-free and allocation-free.
    ///
    /// Assumes no shadow stack ([`NoShadowStack`]); see
    /// [`emulate_with`](TrapSlot::emulate_with).
    ///
    /// [`Emulated`]: TrapAction::Emulated
    /// [`Restarted`]: TrapAction::Restarted
    /// [`NotOurs`]: TrapAction::NotOurs
    ///
    /// # Safety
    ///
    /// As for [`LiveSites::emulate`]: `frame` is the interrupted context,
    /// whose stack a real `call`/`ret` would use the same way; and the CPU
    /// just executed an `int3` at `frame.rip - 1`, so that byte is mapped
    /// and readable.
    #[inline(always)]
    pub unsafe fn emulate(&self, frame: &mut TrapFrame) -> TrapAction {
        // SAFETY: forwarded.
        unsafe { self.emulate_with(frame, &NoShadowStack) }
    }

    /// [`emulate`](TrapSlot::emulate) for a context that may run with a
    /// shadow stack: when `shadow` says it does, a site whose new
    /// instruction pushes or pops a return address is not emulated. The
    /// handler waits until the site's `int3` is gone, then returns
    /// [`Restarted`](TrapAction::Restarted) with `frame.rip` at the site
    /// (see [`ShadowStack`]). Lock-free and allocation-free; waits only
    /// for the patching thread's next store.
    ///
    /// ```
    /// use altpatch::poke::live::{
    ///     LiveSite, LiveSites, ShadowStack, TrapAction, TrapFrame, TrapSlot, TrapTable,
    /// };
    /// use std::sync::atomic::{AtomicU8, Ordering};
    ///
    /// static SLOT: TrapSlot = TrapSlot::new();
    /// // A NOP5 becoming `call +0x100`, mid-batch: its first byte is the
    /// // protocol's int3.
    /// let text: Vec<AtomicU8> = [0xcc_u8, 0x1f, 0x44, 0, 0].map(AtomicU8::new).into();
    /// let at = text.as_ptr() as usize;
    /// let site = LiveSite::new(at, &[0x0f, 0x1f, 0x44, 0, 0], &[0xe8, 0xfb, 0, 0, 0]).unwrap();
    /// let table = LiveSites::new(vec![site]);
    /// // SAFETY: `table` outlives the batch; this is the only patcher.
    /// unsafe { SLOT.publish(&table) };
    ///
    /// // A shadow stack is on; the "patching thread" finishes the site
    /// // while the handler waits (here: on the handler's first pause).
    /// struct Shadow<'a>(&'a [AtomicU8]);
    /// impl ShadowStack for Shadow<'_> {
    ///     fn active(&self) -> bool {
    ///         true
    ///     }
    ///     fn pause(&self) -> bool {
    ///         self.0[0].store(0xe8, Ordering::SeqCst);
    ///         true
    ///     }
    /// }
    /// let mut frame = TrapFrame { rip: at as u64 + 1, rsp: 0, rflags: 0, regs: [0; 16] };
    /// // SAFETY: nothing is emulated (no stack is touched); the site is
    /// // readable.
    /// let action = unsafe { SLOT.emulate_with(&mut frame, &Shadow(&text)) };
    /// assert_eq!(action, TrapAction::Restarted);
    /// assert_eq!((frame.rip, frame.rsp), (at as u64, 0)); // runs the real call
    /// assert_eq!((SLOT.emulated(), SLOT.restarted()), (0, 1));
    /// // SAFETY: published above.
    /// unsafe { SLOT.retire() };
    /// ```
    ///
    /// # Safety
    ///
    /// As for [`emulate`](TrapSlot::emulate).
    #[inline(always)]
    pub unsafe fn emulate_with<S: ShadowStack + ?Sized>(
        &self,
        frame: &mut TrapFrame,
        shadow: &S,
    ) -> TrapAction {
        let addr = frame.trap_site();
        'enter: loop {
            let mut guard = self.enter();
            loop {
                let generation = self.generation.load(Ordering::SeqCst);
                if let Some(site) = guard.reload().and_then(|sites| sites.find(addr)) {
                    if !(site.uses_stack(frame) && shadow.active()) {
                        // SAFETY: forwarded.
                        unsafe { site.emulate(frame) };
                        self.emulated.fetch_add(1, Ordering::Relaxed);
                        return TrapAction::Emulated;
                    }
                    // A call or ret under a shadow stack: wait for the
                    // int3 to go, then run the real instruction. Out of
                    // the slot first (nothing of the table is used while
                    // waiting), so `retire` never waits for this handler.
                    let table = guard.table;
                    drop(guard);
                    // SAFETY: the caller's contract: this byte was just
                    // executed, so it is mapped and readable.
                    match unsafe { self.wait_for_site(addr, table, shadow) } {
                        Waited::Gone => {
                            frame.restart_at(addr);
                            return TrapAction::Restarted;
                        }
                        Waited::TableChanged => continue 'enter,
                        Waited::MustNotWait => return TrapAction::NotOurs,
                    }
                }
                if !guard.was_published(addr) {
                    return TrapAction::NotOurs;
                }
                // SAFETY: the CPU just executed this byte (the caller's
                // contract); text other CPUs may be writing is read atomically.
                if unsafe { first_byte(addr) } != INT3 {
                    frame.restart_at(addr);
                    self.restarted.fetch_add(1, Ordering::Relaxed);
                    return TrapAction::Restarted;
                }
                // An int3 at one of our sites that the table loaded above
                // lacks. If no batch was published since that load, no batch in
                // flight put it there: not ours. Otherwise a newer batch did
                // (its generation and table are stored before its first int3,
                // so a load after reading that int3 sees them): look again —
                // however many batches come and go meanwhile, each table loaded
                // stays valid while this handler is counted inside.
                if self.generation.load(Ordering::SeqCst) == generation {
                    return TrapAction::NotOurs;
                }
            }
        }
    }

    /// How many traps [`emulate`](TrapSlot::emulate) emulated.
    pub fn emulated(&self) -> usize {
        self.emulated.load(Ordering::Relaxed)
    }

    /// How many traps [`emulate`](TrapSlot::emulate) (or
    /// [`emulate_with`](TrapSlot::emulate_with)) resumed at the site to run
    /// it again, rather than emulated: a late trap whose `int3` was already
    /// gone, or a call or ret under a shadow stack, waited for.
    pub fn restarted(&self) -> usize {
        self.restarted.load(Ordering::Relaxed)
    }

    /// Waits until no handler is inside (however the table changed).
    pub fn wait_idle(&self) {
        while self.inside.load(Ordering::SeqCst) != 0 {
            #[cfg(feature = "std")]
            std::thread::yield_now();
            #[cfg(not(feature = "std"))]
            core::hint::spin_loop();
        }
    }

    /// Forgets handlers counted inside: for a forked child, where the
    /// parent's other threads (and their handlers) do not exist.
    ///
    /// # Safety
    ///
    /// Only in a forked child, before any other thread exists there: a
    /// handler still inside the table would have its table or history
    /// freed under it by the next batch.
    #[cfg(feature = "std")]
    #[doc(hidden)]
    pub unsafe fn reset_after_fork(&self) {
        self.inside.store(0, Ordering::SeqCst);
    }

    /// Adds `sites` to the history (only the patcher calls this, through
    /// `publish`, one batch at a time).
    fn remember(&self, sites: &LiveSites) {
        let old = self.history.load(Ordering::SeqCst);
        // SAFETY: only the (single) patcher replaces the history.
        let known: &[usize] = if old.is_null() { &[] } else { unsafe { &*old } };
        if sites
            .sites()
            .iter()
            .all(|s| known.binary_search(&s.addr).is_ok())
        {
            return;
        }
        let mut merged = Vec::with_capacity(known.len() + sites.sites().len());
        merged.extend_from_slice(known);
        merged.extend(sites.sites().iter().map(|s| s.addr));
        merged.sort_unstable();
        merged.dedup();
        self.history
            .store(Box::into_raw(Box::new(merged)), Ordering::SeqCst);
        self.wait_idle();
        if !old.is_null() {
            // SAFETY: every handler that could have loaded `old` counted
            // itself inside first, and none is inside now.
            drop(unsafe { Box::from_raw(old) });
        }
    }
}

// SAFETY: `publish` stores the pointer (SeqCst) before returning; `retire`
// clears it, then waits until every handler counted inside has left. A
// handler counts itself in before loading the pointer (both SeqCst), so a
// handler not seen by `retire`'s wait loaded null.
unsafe impl TrapTable for TrapSlot {
    /// Publishes `sites`; a batch with sites never published before also
    /// replaces the history (allocating: the patcher's side, never a
    /// handler's).
    unsafe fn publish(&self, sites: &LiveSites) {
        self.remember(sites);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.table.store(
            sites as *const LiveSites as *mut LiveSites,
            Ordering::SeqCst,
        );
    }

    unsafe fn retire(&self) {
        self.table.store(ptr::null_mut(), Ordering::SeqCst);
        self.wait_idle();
    }
}

/// The driver every INT3-protocol batch goes through: publishes `table`,
/// runs the three phases over `writes` with `step`, and retires the table.
///
/// A step that fails ends the protocol where it is, and the table is
/// retired all the same: if phase 1 had begun, `int3`s may remain in the
/// text with no table to emulate them (the plan's rollback then refuses to
/// write over them and reports `RollbackFailed`). The pokes this crate
/// drives do not fail mid-protocol in practice (in-place stores, and a
/// failed Linux sync does not stop the protocol).
///
/// # Safety
///
/// As for [`TrapTable::publish`]: `table` outlives the call, and this is
/// the only patcher publishing to `slot`.
#[doc(hidden)]
pub unsafe fn run_published(
    slot: &dyn TrapTable,
    table: &LiveSites,
    writes: &[(usize, &[u8])],
    step: impl FnMut(Step<'_>) -> Result<(), PokeError>,
) -> Result<(), PokeError> {
    // SAFETY: the caller's contract.
    unsafe { slot.publish(table) };
    let result = run_protocol(writes, step);
    // SAFETY: published just above, by this patcher.
    unsafe { slot.retire() };
    result
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::poke::live::LiveSite;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn retire_waits_for_a_handler_inside() {
        static SLOT: TrapSlot = TrapSlot::new();
        static LEFT: AtomicBool = AtomicBool::new(false);
        let table = LiveSites::new(alloc::vec![
            LiveSite::new(0x1000, &crate::arch::BRANCH_NOP, &[0xe9, 0xfb, 0x0f, 0, 0]).unwrap(),
        ]);
        // SAFETY: `table` outlives the test's use of the slot.
        unsafe { SLOT.publish(&table) };
        let guard = SLOT.enter();
        assert_eq!(guard.sites().map(|s| s.sites().len()), Some(1));
        let waiter = std::thread::spawn(|| {
            // SAFETY: published above, by this test alone.
            unsafe { SLOT.retire() };
            // Retire returned: the handler must have left first.
            assert!(
                LEFT.load(Ordering::SeqCst),
                "retire returned with a handler inside"
            );
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "retire did not wait");
        LEFT.store(true, Ordering::SeqCst);
        drop(guard);
        waiter.join().unwrap();
        // Retired: a new handler sees no table.
        assert!(SLOT.enter().sites().is_none());
    }
}
