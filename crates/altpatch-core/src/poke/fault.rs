//! A poke that fails on purpose, for testing rollback.

use core::cell::Cell;
use core::ops::Range;

use super::{PokeError, TextPoke};

/// Which operation of a batch [`FaultInjectingPoke`] makes fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// The k-th call to `write` (0-based, counted across batches).
    Write(usize),
    /// The k-th call to `begin`.
    Begin(usize),
    /// The k-th call to `commit`.
    Commit(usize),
    /// The k-th call to `write` reports success but writes nothing: a
    /// write that did not land, which [`Plan::apply`](crate::plan::Plan::apply)
    /// must catch when it reads the site back.
    Lose(usize),
    /// The k-th call to `read`. While this fault is armed the poke does not
    /// read in place, so validation and the read-back go through `read`:
    /// a read-back that fails must restore the batch, not leave unproven
    /// writes behind.
    Read(usize),
}

/// Wraps a poke and makes one chosen operation fail, once.
///
/// Everything else is forwarded, so the plan's rollback (which writes the old
/// bytes back through the same poke) proceeds normally after the injected
/// failure. Meant for tests that check a failed batch leaves text exactly as
/// it was.
///
/// ```
/// use altpatch::{DirectPoke, Edit, FaultInjectingPoke, FaultPoint, Plan, PlanError};
///
/// let mut text = vec![0x90u8; 64];
/// let base = text.as_mut_ptr() as usize;
/// // SAFETY: `text` is readable for the plan's use.
/// let mut plan = unsafe { Plan::with_text(base..base + 64) };
/// for i in 0..4 {
///     plan.push(Edit::replace(base + 8 * i, &[0x90], &[0xcc]));
/// }
/// // SAFETY: `text` is writable data that nothing executes.
/// let inner = unsafe { DirectPoke::new(altpatch::SyncMethod::Cpuid) };
/// let mut poke = FaultInjectingPoke::new(inner, FaultPoint::Write(2));
/// // SAFETY: as above.
/// let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
/// assert!(matches!(err, PlanError::Poke { .. }));
/// assert!(text.iter().all(|&b| b == 0x90)); // the two writes were rolled back
/// ```
#[derive(Debug)]
pub struct FaultInjectingPoke<P> {
    inner: P,
    /// A `Cell`: `read` takes `&self`.
    fault: Cell<Option<FaultPoint>>,
    reads: Cell<usize>,
    writes: usize,
    begins: usize,
    commits: usize,
}

impl<P: TextPoke> FaultInjectingPoke<P> {
    /// Forwards to `inner`, failing once at `fault`.
    pub fn new(inner: P, fault: FaultPoint) -> Self {
        FaultInjectingPoke {
            inner,
            fault: Cell::new(Some(fault)),
            reads: Cell::new(0),
            writes: 0,
            begins: 0,
            commits: 0,
        }
    }

    /// Whether the fault has fired.
    pub fn fired(&self) -> bool {
        self.fault.get().is_none()
    }

    /// Number of `write` calls seen so far (including the failing one).
    pub fn writes(&self) -> usize {
        self.writes
    }

    /// The wrapped poke.
    pub fn into_inner(self) -> P {
        self.inner
    }

    fn trip(&self, now: FaultPoint) -> Result<(), PokeError> {
        if self.fault.get() == Some(now) {
            self.fault.set(None);
            return Err(PokeError::Injected { at: now });
        }
        Ok(())
    }
}

// SAFETY: every successful operation is the inner poke's; failures publish
// nothing beyond what the inner poke already did.
unsafe impl<P: TextPoke> TextPoke for FaultInjectingPoke<P> {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        let k = self.begins;
        self.begins += 1;
        self.trip(FaultPoint::Begin(k))?;
        self.inner.begin(pages)
    }

    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        let k = self.writes;
        self.writes += 1;
        self.trip(FaultPoint::Write(k))?;
        if self.fault.get() == Some(FaultPoint::Lose(k)) {
            self.fault.set(None);
            return Ok(());
        }
        // SAFETY: same contract, forwarded.
        unsafe { self.inner.write(addr, bytes) }
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        let k = self.commits;
        self.commits += 1;
        if self.fault.get() == Some(FaultPoint::Commit(k)) {
            // Publish nothing: behave like a commit that failed before its
            // first page.
            self.fault.set(None);
            self.inner.abort();
            return Err(PokeError::Injected {
                at: FaultPoint::Commit(k),
            });
        }
        self.inner.commit()
    }

    fn abort(&mut self) {
        self.inner.abort()
    }

    fn sync(&mut self) -> Result<(), PokeError> {
        self.inner.sync()
    }

    fn reads_in_place(&self) -> bool {
        !matches!(self.fault.get(), Some(FaultPoint::Read(_))) && self.inner.reads_in_place()
    }

    fn method(&self) -> &'static str {
        self.inner.method()
    }

    unsafe fn read(&self, addr: usize, out: &mut [u8]) -> Result<(), PokeError> {
        let k = self.reads.get();
        self.reads.set(k + 1);
        self.trip(FaultPoint::Read(k))?;
        // SAFETY: same contract, forwarded.
        unsafe { self.inner.read(addr, out) }
    }
}
