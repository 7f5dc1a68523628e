//! Writing a validated plan: one batch through the poke, rollback on
//! failure, and the read-back that proves every write landed (the driver in
//! `batch.rs`, shared with [`CompactPlan`](super::CompactPlan)).

use super::{ApplyReport, Plan, PlanError, batch};
use crate::poke::TextPoke;

impl Plan {
    /// Validates, then writes every pending edit through `poke` in one
    /// batch (each page announced once), commits and syncs.
    ///
    /// If validation fails nothing is written. If the poke fails, what was
    /// written is written back and the batch is abandoned, so text is
    /// exactly as before; the error names the site. Edits already in place
    /// are skipped, so applying a plan twice is a no-op. With the `std`
    /// feature and `ALTPATCH_DEBUG=1`, the applied plan is printed to stderr
    /// (summarized per reason; `ALTPATCH_DEBUG=all`: every edit).
    ///
    /// A kernel-style use: a direct poke over text it may write (here a
    /// buffer standing for it):
    ///
    /// ```
    /// use altpatch::{DirectPoke, Edit, Expect, Plan, SyncMethod};
    ///
    /// let mut text = vec![0x0f_u8, 0x1f, 0x44, 0x00, 0x00, 0xc3]; // nop5; ret
    /// let base = text.as_mut_ptr() as usize;
    /// // SAFETY: `text` outlives the plan; nothing executes it.
    /// let mut plan = unsafe { Plan::with_text(base..base + text.len()) };
    /// plan.push(Edit::jmp(base, Expect::Nop, base + 5).site("skip"));
    /// // SAFETY: the buffer is writable at its own addresses.
    /// let mut poke = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
    /// // SAFETY: as above; no thread runs these bytes.
    /// let report = unsafe { plan.apply(&mut poke) }.unwrap();
    /// assert_eq!((report.written, report.pages), (1, 1));
    /// assert_eq!(text[..5], [0xe9, 0, 0, 0, 0]);
    /// // Applying again finds the edit in place and writes nothing.
    /// // SAFETY: as above.
    /// assert_eq!(unsafe { plan.apply(&mut poke) }.unwrap().already, 1);
    /// ```
    ///
    /// # Safety
    ///
    /// The new bytes must be correct code for their sites. Unless the poke
    /// implements a protocol for concurrently executing code, no thread may
    /// execute the edited bytes during the call; if one may, each edit must
    /// replace exactly one instruction by one instruction.
    pub unsafe fn apply<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
    ) -> Result<ApplyReport, PlanError> {
        // SAFETY: forwarded from our caller.
        unsafe { batch::apply(self, poke) }
    }
}
