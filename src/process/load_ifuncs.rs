//! Patching an object's ifuncs without the application's help: when the
//! object is loaded, and on an ifunc's first call (see the `ifunc`
//! module's `startup.rs` for the story and for [`startup`], the outcome;
//! this is the part that writes the running program's text).
//!
//! The constructor every `ifunc!` registers ([`__ifunc_at_load`]) resolves
//! every ifunc of its object with the published snapshot and rewrites each
//! stub's `jmp` and each recorded call in one publication through
//! `os/linux/jmps.rs`: exact 5-byte edits checked as bytes, without the
//! plan or the decoder, so an ifunc-only library links neither. An ifunc
//! first called before that makes its own stub direct on the way
//! ([`__ifunc_lazy_target`]).
//!
//! [`startup`]: crate::ifunc::startup

use alloc::vec::Vec;

use crate::arch::BRANCH_LEN;
use crate::ifunc::{Ifunc, STARTUP, Startup, StartupError};
use crate::image::Image;
use crate::os::{JmpEdit, Process, ProcessBackend};
use crate::static_call::{TRAMPOLINE_JMP, TRAMPOLINE_LEN, is_trampoline};

/// The lazy path's target (what `ifunc!`'s stub calls before its `jmp` is
/// direct): the implementation, resolved with the published snapshot if
/// this is the first call, after which the stub is made to jump straight
/// there, so the next call skips this path.
#[doc(hidden)]
#[inline]
pub fn __ifunc_lazy_target(ifunc: &Ifunc) -> usize {
    if let Some(chosen) = ifunc.resolved() {
        return chosen;
    }
    let chosen = ifunc.lazy_target();
    after_first_call(ifunc, chosen);
    chosen
}

/// The constructor every `ifunc!` registers; runs once per object, however
/// many entries point here (the first does the work).
#[doc(hidden)]
pub extern "C" fn __ifunc_at_load() {
    if !STARTUP.claim() {
        return;
    }
    let outcome = if crate::cpu::startup_allowed() {
        let start = std::time::Instant::now();
        match apply_stubs() {
            Ok((ifuncs, calls, left)) => Startup::Applied {
                ifuncs,
                calls,
                left,
                took: start.elapsed(),
            },
            Err(e) => Startup::Failed(e),
        }
    } else {
        Startup::Off
    };
    STARTUP.finish(outcome);
}

/// Resolves every ifunc of this object with the published snapshot and
/// rewrites each stub to a direct `jmp` and each recorded call to a direct
/// `call`, in one publication. Returns the ifuncs, the calls rewritten and
/// the calls left.
fn apply_stubs() -> Result<(usize, usize, usize), StartupError> {
    let image = &super::running().image;
    let records = image.ifuncs();
    if records.is_empty() {
        return Ok((0, 0, 0));
    }
    let features = crate::cpu::published();
    let ifuncs: Vec<&'static Ifunc> = records.iter().map(Ifunc::of_record).collect();
    let _locks: Vec<_> = ifuncs.iter().map(|i| i.call.lock()).collect();
    let mut edits = Vec::with_capacity(ifuncs.len());
    let mut chosen = Vec::with_capacity(ifuncs.len());
    for &ifunc in &ifuncs {
        let c = ifunc.resolve(&features);
        edits.push(stub_edit(image, ifunc, c)?);
        chosen.push(c);
    }
    let mut targets: Vec<(usize, usize)> = ifuncs
        .iter()
        .zip(&chosen)
        .map(|(i, &c)| (i.stub(), c))
        .collect();
    crate::poke::sort_by_key(&mut targets, |&t| t);
    let (calls, left) = call_edits(image, &targets, &mut edits);
    // SAFETY: each edit is a stub's `jmp`, or a recorded `call` of a stub,
    // replaced by a `jmp` or `call` to the resolver's choice (its declared
    // type, checked by the macro), which other threads may be running:
    // published one page at a time, no edit straddling two.
    unsafe { Process::retarget_branches(&edits) }.map_err(StartupError::Poke)?;
    for (ifunc, c) in ifuncs.iter().zip(chosen) {
        ifunc.call.committed(Some(c));
    }
    Ok((ifuncs.len(), calls, left))
}

/// The edit that makes `ifunc`'s stub jump to `chosen`: its layout and its
/// current `jmp` checked as bytes (no decoding).
fn stub_edit(image: &Image<'_>, ifunc: &Ifunc, chosen: usize) -> Result<JmpEdit, StartupError> {
    let stub = ifunc.stub();
    let fail = |why: &'static str| StartupError::Ifunc {
        name: ifunc.name(),
        stub,
        why,
    };
    if !image.contains_text(chosen, 1) || !image.contains_text(stub, TRAMPOLINE_LEN) {
        return Err(fail(
            "the stub or the implementation is outside this object's text",
        ));
    }
    let mut bytes = [0u8; TRAMPOLINE_LEN];
    // SAFETY: inside the image's text, readable.
    unsafe {
        core::ptr::copy_nonoverlapping(stub as *const u8, bytes.as_mut_ptr(), TRAMPOLINE_LEN)
    };
    if !is_trampoline(&bytes) {
        return Err(fail("not a stub"));
    }
    let addr = stub + TRAMPOLINE_JMP;
    let jmp =
        crate::arch::jump_to(addr, chosen).map_err(|_| fail("implementation out of reach"))?;
    let mut new = [0u8; BRANCH_LEN];
    new.copy_from_slice(&jmp);
    let mut old = [0u8; BRANCH_LEN];
    old.copy_from_slice(&bytes[TRAMPOLINE_JMP..TRAMPOLINE_JMP + BRANCH_LEN]);
    Ok(JmpEdit { addr, old, new })
}

/// After the lazy path resolved `ifunc` (its first call): its stub becomes a
/// direct `jmp` to the implementation, so the next call skips the lazy
/// path. Best effort and silent: the lazy path stays correct if this does
/// not happen (start-up turned off, this thread in the middle of a batch,
/// a refused poke).
fn after_first_call(ifunc: &Ifunc, chosen: usize) {
    if !crate::cpu::startup_allowed() || ifunc.call.target() == Some(chosen) {
        return;
    }
    let _lock = ifunc.call.lock();
    if ifunc.call.target() == Some(chosen) {
        return;
    }
    let Ok(edit) = stub_edit(&super::running().image, ifunc, chosen) else {
        return;
    };
    // SAFETY: as in `apply_stubs`.
    if unsafe { Process::retarget_branches(&[edit]) }.is_ok() {
        ifunc.call.committed(Some(chosen));
    }
}

/// Adds to `edits` the rewrite of each recorded call of a stub in
/// `targets` (`(stub, chosen)`, sorted by stub) into `call <chosen>`, each
/// checked as bytes: the 5 bytes at the record's site must be the
/// `call <stub>` it was assembled as. Returns how many calls were added
/// and how many were left calling the stub: those straddling two pages
/// (a page swap changes one page at a time) and those holding other
/// bytes (a breakpoint, or a site some other tool rewrote). Calls of
/// stubs not in `targets` (another object's, reached through its PLT) and
/// calls already direct are skipped.
fn call_edits(
    image: &crate::image::Image<'_>,
    targets: &[(usize, usize)],
    edits: &mut Vec<JmpEdit>,
) -> (usize, usize) {
    use crate::poke::PAGE_SIZE;
    let (mut added, mut left) = (0, 0);
    for r in crate::records::current_calls() {
        let (site, stub) = (r.site(), r.stub());
        let Ok(i) = targets.binary_search_by_key(&stub, |t| t.0) else {
            continue;
        };
        let chosen = targets[i].1;
        if !image.contains_text(site, BRANCH_LEN) {
            continue;
        }
        let (Ok(old), Ok(new)) = (
            crate::arch::call_to(site, stub),
            crate::arch::call_to(site, chosen),
        ) else {
            left += 1;
            continue;
        };
        // SAFETY: inside the image's text, readable.
        let now = unsafe { core::ptr::read_unaligned(site as *const [u8; BRANCH_LEN]) };
        if now == new[..] {
            continue;
        }
        if now != old[..] || site / PAGE_SIZE != (site + BRANCH_LEN - 1) / PAGE_SIZE {
            left += 1;
            continue;
        }
        let mut e = JmpEdit {
            addr: site,
            old: [0; BRANCH_LEN],
            new: [0; BRANCH_LEN],
        };
        e.old.copy_from_slice(&old);
        e.new.copy_from_slice(&new);
        edits.push(e);
        added += 1;
    }
    (added, left)
}
