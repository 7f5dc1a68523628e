//! Writing a validated plan: one batch through the poke, rollback on
//! failure, and the read-back that proves every write landed.

use alloc::vec::Vec;
use core::ops::Range;

use super::edit::State;
use super::{ApplyReport, Bytes, Edit, Plan, PlanError, debug_print};
use crate::poke::{PAGE_SIZE, PokeError, TextPoke, short_eq};

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
        let mut runs = Vec::new();
        let v = self.validate_into(&*poke, Some(&mut runs))?;
        let report = ApplyReport {
            edits: self.edits.len(),
            written: v.pending,
            already: v.already,
            pages: runs.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum(),
            via: "",
        };
        if v.pending == 0 {
            return Ok(report);
        }
        // SAFETY: forwarded from our caller; every edit was validated.
        unsafe { self.write_batch(poke, &runs) }?;
        // SAFETY: as above.
        unsafe { self.check_landed(poke, &runs) }?;
        let report = ApplyReport {
            via: poke.method(),
            ..report
        };
        debug_print(self, &report);
        Ok(report)
    }

    /// The edits validation found in their old state, in address order.
    fn pending(&self) -> impl Iterator<Item = &Edit> {
        self.edits.iter().filter(|e| e.state == State::Pending)
    }

    /// Writes the pending edits in one batch, rolling back on failure.
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`]; the plan was just validated, and `runs`
    /// covers every pending edit.
    unsafe fn write_batch<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
        runs: &[Range<usize>],
    ) -> Result<(), PlanError> {
        if let Err(error) = poke.begin(runs) {
            poke.abort();
            return Err(PlanError::Poke { site: None, error });
        }
        // Edits move from Pending to Written as they are written, so a
        // rollback knows exactly what to put back.
        for i in 0..self.edits.len() {
            let e = &self.edits[i];
            if e.state != State::Pending {
                continue;
            }
            // SAFETY: the edit is inside `runs` and validated; our caller
            // vouches for the code.
            if let Err(error) = unsafe { poke.write(e.addr, &e.new) } {
                let site = e.who();
                // Put back what this batch already wrote (in-place pokes
                // published it), then drop anything staged.
                let mut rb = Ok(());
                for w in self.edits[..i].iter_mut().rev() {
                    if w.state == State::Written {
                        // SAFETY: restores the validated original bytes.
                        rb = rb.and(unsafe { poke.write(w.addr, w.original()) });
                        w.state = State::Pending;
                    }
                }
                poke.abort();
                rb = rb.and(poke.sync());
                return match rb {
                    Ok(()) => Err(PlanError::Poke {
                        site: Some(site),
                        error,
                    }),
                    Err(rollback) => Err(PlanError::RollbackFailed { error, rollback }),
                };
            }
            self.edits[i].state = State::Written;
        }
        let published = poke.commit().and_then(|()| poke.sync());
        if let Err(error) = published {
            // Some pages may be published: restore every edit in a new batch.
            // SAFETY: writes back the validated original bytes.
            let restored = unsafe { self.restore(poke, runs) };
            let site = match error {
                PokeError::NotLanded { addr } => self
                    .edits
                    .iter()
                    .find(|e| e.addr <= addr && addr < e.end())
                    .map(|e| e.who()),
                _ => None,
            };
            return match restored {
                Ok(()) => Err(PlanError::Poke { site, error }),
                Err(rollback) => Err(PlanError::RollbackFailed { error, rollback }),
            };
        }
        Ok(())
    }

    /// Reads every written edit back (in place, or through the poke) and
    /// compares it with its new bytes: a write that did not land is an
    /// error, never a success. On a mismatch the whole batch is restored.
    ///
    /// # Safety
    ///
    /// As for `write_batch`, after it succeeded.
    unsafe fn check_landed<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
        runs: &[Range<usize>],
    ) -> Result<(), PlanError> {
        let in_place = poke.reads_in_place();
        let mut buf = Vec::new();
        let mut bad = None;
        for (i, e) in self.edits.iter().enumerate() {
            if e.state != State::Written {
                continue;
            }
            let found: &[u8] = if in_place {
                // SAFETY: inside the plan's text, which is readable.
                unsafe { core::slice::from_raw_parts(e.addr as *const u8, e.len()) }
            } else {
                buf.resize(e.len(), 0);
                // SAFETY: as above.
                unsafe { poke.read(e.addr, &mut buf) }.map_err(|error| PlanError::Poke {
                    site: Some(e.who()),
                    error,
                })?;
                &buf
            };
            if !short_eq(found, &e.new) {
                bad = Some((i, Bytes::new(found)));
                break;
            }
        }
        let Some((i, found)) = bad else {
            return Ok(());
        };
        let e = &self.edits[i];
        let (site, addr, expected) = (e.who(), e.addr, e.new.clone());
        // SAFETY: writes back the validated original bytes.
        match unsafe { self.restore(poke, runs) } {
            Ok(()) => Err(PlanError::NotLanded {
                site,
                addr,
                expected,
                found,
            }),
            Err(rollback) => Err(PlanError::RollbackFailed {
                error: PokeError::NotLanded { addr },
                rollback,
            }),
        }
    }

    /// Writes the old bytes of the pending edits back in a batch of their own.
    ///
    /// # Safety
    ///
    /// As for `write_batch`.
    unsafe fn restore<P: TextPoke + ?Sized>(
        &mut self,
        poke: &mut P,
        runs: &[Range<usize>],
    ) -> Result<(), PokeError> {
        for e in &mut self.edits {
            if e.state == State::Written {
                e.state = State::Pending;
            }
        }
        poke.begin(runs)?;
        for e in self.pending() {
            // SAFETY: restores validated original bytes inside `runs`.
            if let Err(err) = unsafe { poke.write(e.addr, e.original()) } {
                poke.abort();
                return Err(err);
            }
        }
        poke.commit()?;
        poke.sync()
    }
}
