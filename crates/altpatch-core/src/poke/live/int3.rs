//! [`Int3Poke`], which runs the three phases of the INT3 protocol
//! (`protocol.rs`) over any in-place poke.

use alloc::vec::Vec;
use core::ops::Range;

use super::protocol::{Step, run_protocol};
use super::table::{TrapTable, run_published};
use super::{LiveSite, LiveSites};
use crate::poke::{PokeError, TextPoke};

/// Runs the INT3 protocol over an in-place poke (one whose writes are
/// visible at once, like [`DirectPoke`](crate::poke::DirectPoke) or a kernel's
/// alias poke).
///
/// Writes are collected until [`commit`](TextPoke::commit), which runs the
/// three phases as three batches of the inner poke, each followed by its
/// `sync`: three syncs per batch, however many sites (the plan's own
/// `sync` after the commit adds none). The batch's sites are published to
/// the embedder's `#BP` handler through the [`TrapTable`] given to
/// [`set_table`](Int3Poke::set_table) (a [`TrapSlot`](super::TrapSlot) the handler reads)
/// before the first `int3` and retired after the last sync.
///
/// ```
/// use altpatch::{DirectPoke, Edit, Expect, Plan, SyncMethod, poke::live::Int3Poke};
///
/// let mut text = vec![0x0fu8, 0x1f, 0x44, 0x00, 0x00, 0xc3];
/// let base = text.as_mut_ptr() as usize;
/// // SAFETY: `text` outlives the plan.
/// let mut plan = unsafe { Plan::with_text(base..base + 6) };
/// plan.push(Edit::jmp(base, Expect::Nop, base + 5));
/// // SAFETY: plain data; nothing executes it.
/// let inner = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
/// let mut poke = Int3Poke::new(inner);
/// // SAFETY: as above.
/// unsafe { plan.apply(&mut poke) }.unwrap();
/// assert_eq!(text[..5], [0xe9, 0, 0, 0, 0]);
/// ```
pub struct Int3Poke<P> {
    inner: P,
    pages: Vec<Range<usize>>,
    pending: Vec<(usize, alloc::vec::Vec<u8>)>,
    live: LiveSites,
    table: Option<&'static dyn TrapTable>,
    /// Nothing written since the protocol's last sync.
    synced: bool,
}

impl<P: TextPoke> Int3Poke<P> {
    /// Wraps `inner`, which must write in place.
    pub fn new(inner: P) -> Self {
        Int3Poke {
            inner,
            pages: Vec::new(),
            pending: Vec::new(),
            live: LiveSites::default(),
            table: None,
            synced: true,
        }
    }

    /// Publishes every batch's sites through `table`, which the embedder's
    /// `#BP` handler reads (typically a `static`
    /// [`TrapSlot`](super::TrapSlot) whose
    /// [`emulate`](super::TrapSlot::emulate) the handler calls). Without a
    /// table, no handler learns of the sites: only for a single CPU.
    ///
    /// # Safety
    ///
    /// While this poke commits, no other patcher publishes to `table` (one
    /// batch at a time per table).
    pub unsafe fn set_table(&mut self, table: &'static dyn TrapTable) {
        self.table = Some(table);
    }

    /// The sites of the batch being committed.
    pub fn active(&self) -> &LiveSites {
        &self.live
    }

    /// The wrapped poke.
    pub fn into_inner(self) -> P {
        self.inner
    }
}

// SAFETY: every byte written reaches the inner in-place poke through the
// protocol, whose intermediate states are all safe for running threads
// (int3 at sites, emulated by the embedder's handler), ending with exactly
// the batch's bytes and a sync.
unsafe impl<P: TextPoke> TextPoke for Int3Poke<P> {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        self.pages.clear();
        self.pages.extend_from_slice(pages);
        self.pending.clear();
        self.synced = false;
        Ok(())
    }

    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        let mut old = alloc::vec![0u8; bytes.len()];
        // SAFETY: the plan only writes inside its text, which is readable.
        unsafe { self.inner.read(addr, &mut old) }?;
        LiveSite::new(addr, &old, bytes).map_err(|_| PokeError::NotLiveSafe {
            addr,
            rule: "the INT3 protocol needs one emulatable instruction (call, jmp, jcc, nop, ret) \
                   replaced by one",
        })?;
        self.pending.push((addr, bytes.to_vec()));
        Ok(())
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        let mut table = Vec::with_capacity(self.pending.len());
        for (addr, new) in &self.pending {
            let mut old = alloc::vec![0u8; new.len()];
            // SAFETY: as in `write`.
            unsafe { self.inner.read(*addr, &mut old) }?;
            table.push(
                LiveSite::new(*addr, &old, new).map_err(|_| PokeError::NotLiveSafe {
                    addr: *addr,
                    rule: "the INT3 protocol needs one emulatable instruction (call, jmp, jcc, \
                           nop, ret) replaced by one",
                })?,
            );
        }
        self.live = LiveSites::new(table);
        if self.pending.is_empty() {
            return Ok(());
        }
        let sites: Vec<(usize, &[u8])> = self.pending.iter().map(|(a, b)| (*a, &b[..])).collect();
        let pages = &self.pages;
        let inner = &mut self.inner;
        let step = |step: Step<'_>| match step {
            Step::Write(addr, bytes) => {
                inner.begin(pages)?;
                // SAFETY: inside the batch's pages; the protocol keeps every
                // intermediate state safe for running threads.
                unsafe { inner.write(addr, bytes) }?;
                inner.commit()
            }
            Step::Sync => inner.sync(),
        };
        let result = match self.table {
            // SAFETY: `self.live` is not touched until the call returns; the
            // caller of `set_table` promised no other patcher publishes to
            // `table` meanwhile.
            Some(table) => unsafe { run_published(table, &self.live, &sites, step) },
            None => run_protocol(&sites, step),
        };
        self.pending.clear();
        self.synced = result.is_ok();
        result
    }

    fn abort(&mut self) {
        self.pending.clear();
    }

    fn sync(&mut self) -> Result<(), PokeError> {
        // The protocol ended with a sync and nothing was written since:
        // another round of IPIs would make no CPU see anything new.
        if self.synced {
            return Ok(());
        }
        self.inner.sync()
    }

    fn reads_in_place(&self) -> bool {
        self.inner.reads_in_place()
    }

    fn method(&self) -> &'static str {
        "INT3 protocol"
    }

    unsafe fn read(&self, addr: usize, out: &mut [u8]) -> Result<(), PokeError> {
        // SAFETY: same contract, forwarded.
        unsafe { self.inner.read(addr, out) }
    }
}
