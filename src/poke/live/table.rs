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
//! The same driver ([`run_published`]) runs the protocol for
//! [`Int3Poke`](super::Int3Poke) (kernels) and for the Linux process path,
//! whose `SIGTRAP` handler reads a `TrapSlot` too.

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use super::int3::{Step, run_protocol};
use super::{LiveSites, TrapAction, TrapFrame};
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
    /// Makes `sites` the table trap handlers consult. `sites` stays valid
    /// (unmoved, unchanged) until [`retire`](TrapTable::retire) returns.
    fn publish(&self, sites: &LiveSites);

    /// Withdraws the table and waits until no handler still uses it.
    fn retire(&self);
}

/// A [`TrapTable`] for a `static`: the published table and a count of
/// handlers inside. The embedder's `#BP` handler calls
/// [`emulate`](TrapSlot::emulate) (or [`enter`](TrapSlot::enter)).
///
/// ```
/// use altpatch::poke::live::{LiveSite, LiveSites, TrapAction, TrapFrame, TrapSlot, TrapTable};
///
/// static SLOT: TrapSlot = TrapSlot::new();
///
/// // The patcher publishes a batch: a NOP5 at 0x1000 becoming `jmp 0x2000`.
/// let jmp = [0xe9, 0xfb, 0x0f, 0, 0];
/// let site = LiveSite::new(0x1000, &[0x0f, 0x1f, 0x44, 0, 0], &jmp).unwrap();
/// let table = LiveSites::new(vec![site]);
/// SLOT.publish(&table);
///
/// // A CPU trapped on the int3 at 0x1000: the handler emulates the jmp.
/// let mut frame = TrapFrame { rip: 0x1001, rsp: 0, rflags: 0, regs: [0; 16] };
/// // SAFETY: a jmp reads and writes no stack.
/// assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::Emulated);
/// assert_eq!(frame.rip, 0x2000);
///
/// SLOT.retire(); // no handler inside: returns at once
/// let mut frame = TrapFrame { rip: 0x1001, rsp: 0, rflags: 0, regs: [0; 16] };
/// // SAFETY: as above.
/// assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::NotOurs);
/// assert_eq!(SLOT.emulated(), 1);
/// ```
pub struct TrapSlot {
    table: AtomicPtr<LiveSites>,
    inside: AtomicUsize,
    emulated: AtomicUsize,
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
            inside: AtomicUsize::new(0),
            emulated: AtomicUsize::new(0),
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

    /// For a trap handler: emulates the new instruction of the site whose
    /// `int3` trapped at `frame.rip - 1`, if a batch in flight has it.
    ///
    /// # Safety
    ///
    /// As for [`LiveSites::emulate`]: `frame` is the interrupted context,
    /// whose stack a real `call`/`ret` would use the same way.
    #[inline(always)]
    pub unsafe fn emulate(&self, frame: &mut TrapFrame) -> TrapAction {
        let guard = self.enter();
        let Some(sites) = guard.sites() else {
            return TrapAction::NotOurs;
        };
        // SAFETY: forwarded.
        let action = unsafe { sites.emulate(frame) };
        if action == TrapAction::Emulated {
            self.emulated.fetch_add(1, Ordering::Relaxed);
        }
        action
    }

    /// How many traps [`emulate`](TrapSlot::emulate) emulated.
    pub fn emulated(&self) -> usize {
        self.emulated.load(Ordering::Relaxed)
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
    #[cfg(all(feature = "std", target_os = "linux"))]
    pub(crate) fn reset_after_fork(&self) {
        self.inside.store(0, Ordering::SeqCst);
    }
}

// SAFETY: `publish` stores the pointer (SeqCst) before returning; `retire`
// clears it, then waits until every handler counted inside has left. A
// handler counts itself in before loading the pointer (both SeqCst), so a
// handler not seen by `retire`'s wait loaded null.
unsafe impl TrapTable for TrapSlot {
    fn publish(&self, sites: &LiveSites) {
        self.table.store(
            sites as *const LiveSites as *mut LiveSites,
            Ordering::SeqCst,
        );
    }

    fn retire(&self) {
        self.table.store(ptr::null_mut(), Ordering::SeqCst);
        self.wait_idle();
    }
}

/// The driver every INT3-protocol batch goes through: publishes `table`,
/// runs the three phases over `writes` with `step`, and retires the table
/// (also when a step failed: the protocol's writes are finished or the
/// caller restores the old bytes, and no handler may keep the table).
pub(crate) fn run_published(
    slot: &dyn TrapTable,
    table: &LiveSites,
    writes: &[(usize, &[u8])],
    step: impl FnMut(Step<'_>) -> Result<(), PokeError>,
) -> Result<(), PokeError> {
    slot.publish(table);
    let result = run_protocol(writes, step);
    slot.retire();
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
            LiveSite::new(0x1000, &crate::x86::NOP5, &[0xe9, 0xfb, 0x0f, 0, 0]).unwrap(),
        ]);
        SLOT.publish(&table);
        let guard = SLOT.enter();
        assert_eq!(guard.sites().map(|s| s.sites().len()), Some(1));
        let waiter = std::thread::spawn(|| {
            SLOT.retire();
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
