//! Retargeting the `jmp`s of stubs (static-call trampolines, ifunc stubs)
//! and recorded `call`s of them in this process's text, live, without the
//! plan machinery.
//!
//! What patching at load needs (see `ifunc::startup`): a library that only
//! declares ifuncs must not carry a decoder, the listing code or the INT3
//! protocol into every program that links it. Each edit here is exact — a
//! 5-byte `jmp rel32` or `call rel32` whose current bytes are given,
//! replaced by another, inside one page —
//! so it needs none of them: the bytes are compared, not decoded. The
//! pages are published as the page swap publishes them (`file_swap.rs`:
//! a fresh mapping of the file, earlier patches carried over, the
//! uprobe reconcile), read back, recorded, logged, and synced.

use alloc::vec::Vec;
use core::ops::Range;

use super::file_swap::FileAt;
use super::state::{Locked, Shared};
use super::{maps, poke_log, sys};
use crate::arch::BRANCH_LEN;
use crate::poke::{PAGE_SIZE, PokeError};

pub(crate) use crate::JmpEdit;

/// Rewrites every edit's `jmp` in one publication (one page swap per page),
/// after checking each holds its `old` bytes (an edit already holding `new`
/// is left as it is) and lies inside one page. Nothing is written if a
/// check fails, a page is not ordinary text of a file this process can
/// open, or it is sealed.
///
/// # Safety
///
/// Each `new` is a `jmp` or `call` to a function the stub (or the call)
/// may reach (its declared type); the code may be running on other threads
/// (each page changes atomically, one instruction for one).
pub(crate) unsafe fn retarget(edits: &[JmpEdit]) -> Result<usize, PokeError> {
    let mut lock = Locked::acquire()?;
    let shared = lock.shared();
    let mut todo: Vec<JmpEdit> = Vec::new();
    for e in edits {
        // SAFETY: the stubs are text of this process, readable.
        let now = unsafe { core::ptr::read_unaligned(e.addr as *const [u8; BRANCH_LEN]) };
        if now == e.new {
            continue;
        }
        if now != e.old {
            return Err(PokeError::NotText {
                addr: e.addr,
                why: "the jmp or call is not the one expected",
            });
        }
        if e.addr / PAGE_SIZE != (e.addr + BRANCH_LEN - 1) / PAGE_SIZE {
            return Err(PokeError::NotText {
                addr: e.addr,
                why: "a jmp or call straddling two pages cannot change at once",
            });
        }
        todo.push(*e);
    }
    if todo.is_empty() {
        return Ok(0);
    }
    crate::poke::sort_by_key(&mut todo, |e| e.addr);
    let mut pages: Vec<Range<usize>> = Vec::new();
    for e in &todo {
        let span = crate::poke::page_span(e.addr, e.addr + BRANCH_LEN);
        match pages.last_mut() {
            Some(last) if last.end >= span.start => last.end = last.end.max(span.end),
            _ => pages.push(span),
        }
    }
    let alone = super::threads::Alone::claim();
    let method = if alone.is_some() {
        // No other thread can run the text (none exists, and with every
        // signal blocked no handler of this thread's can start one): each
        // 5-byte store may land as it comes, in place, where the page stays
        // the file's mapping (tools see it as they do the page swap's). No
        // maps, no file, no swap.
        // SAFETY: forwarded; the process has this one thread.
        unsafe { write_in_place(shared, &todo) }?;
        drop(alone);
        "pwrite to /proc/self/mem, in place (at load, the only thread)"
    } else {
        shared.text.refresh();
        shared.text.check(&pages)?;
        shared.procmem.open()?;
        for r in &pages {
            if maps::sealed(r) {
                return Err(PokeError::Sealed {
                    addr: r.start,
                    why: "patching at load only swaps pages",
                });
            }
        }
        for r in &pages {
            publish_run(shared, r.clone(), &todo)?;
        }
        "pwrite to /proc/self/mem, page swap (at load)"
    };
    for e in &todo {
        // SAFETY: readable text, just published.
        let now = unsafe { core::ptr::read_unaligned(e.addr as *const [u8; BRANCH_LEN]) };
        if now != e.new {
            return Err(PokeError::NotLanded { addr: e.addr });
        }
        shared.overlay.record(e.addr, &e.new);
    }
    if shared.log.enabled() {
        log(shared, &todo, method);
    }
    sys::sync_all_threads()?;
    Ok(todo.len())
}

/// Swaps the pages `run` in, page by page, with the edits falling in them.
fn publish_run(shared: &mut Shared, run: Range<usize>, edits: &[JmpEdit]) -> Result<(), PokeError> {
    for page in run.step_by(PAGE_SIZE) {
        let range = page..page + PAGE_SIZE;
        let mut want = Vec::with_capacity(PAGE_SIZE);
        // SAFETY: the page is mapped readable text (checked).
        want.extend_from_slice(unsafe {
            core::slice::from_raw_parts(page as *const u8, PAGE_SIZE)
        });
        let mut owned: Vec<Range<usize>> = Vec::new();
        let mut stale: Vec<Range<usize>> = Vec::new();
        shared.overlay.each_in(range.clone(), |a, ours| {
            let off = a - page;
            if want[off..off + ours.len()] == *ours {
                owned.push(off..off + ours.len());
            } else {
                stale.push(a..a + ours.len());
            }
        });
        for r in stale {
            shared.overlay.forget(r);
        }
        for e in edits.iter().filter(|e| range.contains(&e.addr)) {
            let off = e.addr - page;
            // Inside the page (checked in `retarget`).
            want[off..off + BRANCH_LEN].copy_from_slice(&e.new);
            owned.push(off..off + BRANCH_LEN);
        }
        if owned.is_empty() {
            continue;
        }
        crate::poke::sort_by_key(&mut owned, |r| r.start);
        let origin = shared.text.origin(page).ok_or(PokeError::NotText {
            addr: page,
            why: "not checked",
        })?;
        let Some(i) = origin.file() else {
            return Err(PokeError::NotText {
                addr: page,
                why: "patching at load rewrites a file's text only",
            });
        };
        let file = shared.text.file(i);
        let id = file.id();
        let fd = file.fd().map_err(|(call, errno)| PokeError::LeavesFile {
            addr: page,
            why: call,
            errno,
        })?;
        let at = FileAt {
            fd,
            id,
            offset: origin.offset,
        };
        // SAFETY: validated text mapping the file `at`; `want` is its
        // current bytes with exact `jmp` edits over stub `jmp`s.
        unsafe {
            shared
                .procmem
                .swap_file(range, at, &want, &owned, &mut shared.swap)
        }?;
    }
    Ok(())
}

/// Writes each edit in place through `/proc/self/mem`; if one fails, puts
/// back the ones written and returns the error.
///
/// # Safety
///
/// As for [`retarget`], and no other thread runs the text.
unsafe fn write_in_place(shared: &mut Shared, edits: &[JmpEdit]) -> Result<(), PokeError> {
    shared.procmem.open()?;
    for (k, e) in edits.iter().enumerate() {
        // SAFETY: the caller's: validated text of this process that no
        // other thread runs, `new` one instruction for the one there.
        if let Err(err) = unsafe { shared.procmem.write(e.addr, &e.new) } {
            for done in &edits[..k] {
                // SAFETY: as above, the bytes that were there.
                let _ = unsafe { shared.procmem.write(done.addr, &done.old) };
            }
            return Err(err);
        }
    }
    Ok(())
}

/// The batch's line in the text-poke log.
fn log(shared: &mut Shared, edits: &[JmpEdit], method: &'static str) {
    let mut line = shared.log.begin_line(method);
    for (k, e) in edits.iter().enumerate() {
        let page = e.addr - e.addr % PAGE_SIZE;
        let file = shared.text.origin(page).and_then(|o| {
            let i = o.file()?;
            Some((i, o.offset + (e.addr - page) as u64))
        });
        let file = file.map(|(i, off)| (shared.text.file(i).path(), off));
        poke_log::push_edit(&mut line, k == 0, e.addr, file, &e.old, &e.new);
    }
    shared.log.finish_line(line);
}
