//! The other copies of the crate linked into this object, and what a batch
//! must know of them.
//!
//! A program may link two copies of altpatch (two libraries on
//! semver-incompatible versions, see [`records`](mod@crate::records)). Each
//! patches only its own records, under the one update lock they share
//! ([`crate::sync`]), but they patch the same pages, and what this copy's
//! page swap must carry over to a fresh copy of a file's page is every
//! patch on it, not only its own: the kernel's uprobe breakpoints and the
//! copies' own `int3` filler look alike, so only each copy knows which bytes
//! are its. And a `SIGTRAP` handler chain of several copies is not "the
//! program replaced our handler". (A thread inside another copy's handler
//! needs no word from it: every copy's handler runs with glibc's internal
//! signals blocked, which is how the thread check tells it, see
//! `threads.rs`.)
//!
//! So each copy publishes a [`Peer`] node in the list anchored in the
//! shared symbol (version 1: the node's layout below is frozen, fields are
//! only ever appended, `size` says how many a node has).

use alloc::vec::Vec;
use core::ffi::{c_char, c_int, c_void};
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use super::state::Locked;
use crate::poke::{PokeError, short_eq};

/// Calls `each(cx, start, end)` for every run of bytes in `[start, end)`
/// the copy's patches put in text that the text holds now. Returns 0, or
/// -1 if the copy cannot answer now (its own batch is open on this
/// thread). Called with the update lock held; `[start, end)` is mapped
/// readable text.
type OwnedFn = unsafe extern "C" fn(
    start: usize,
    end: usize,
    each: unsafe extern "C" fn(cx: *mut c_void, start: usize, end: usize),
    cx: *mut c_void,
) -> c_int;

/// One copy of the crate, as the others see it (v1 layout).
#[repr(C)]
pub(super) struct Peer {
    /// The next node (set before this one is published, then never).
    next: AtomicPtr<Peer>,
    /// `size_of::<Peer>()` of the copy that made the node.
    size: usize,
    /// The copy's tag, NUL-terminated (see [`records::TAG`](crate::records::TAG)).
    tag: *const c_char,
    /// What the copy's patches hold (see [`OwnedFn`]).
    owned: OwnedFn,
    /// The copy's `SIGTRAP` handler, once installed (0 before).
    sigtrap: AtomicUsize,
    /// The handler the copy passes traps that are not its own to.
    sigtrap_next: AtomicUsize,
}

// SAFETY: `tag` points to a static string; every other field is an atomic
// or a function pointer.
unsafe impl Sync for Peer {}

static SELF: Peer = Peer {
    next: AtomicPtr::new(core::ptr::null_mut()),
    size: core::mem::size_of::<Peer>(),
    tag: concat!(altpatch_core::__altpatch_tag!(), "\0")
        .as_ptr()
        .cast(),
    owned,
    sigtrap: AtomicUsize::new(0),
    sigtrap_next: AtomicUsize::new(0),
};

static REGISTERED: AtomicBool = AtomicBool::new(false);

/// More nodes than any program links copies: a corrupt list ends here.
const MAX_PEERS: usize = 64;

/// Publishes this copy's node (once; at load time, from the fork module's
/// constructor, and again from every poke's constructor).
pub(super) fn register() {
    if REGISTERED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: the list holds only copies' `Peer` nodes; we push `SELF`, a
    // static node of that layout, and never pop.
    let head = unsafe { super::host::peers() };
    let me = (&raw const SELF).cast_mut();
    let mut now = head.load(Ordering::Acquire);
    loop {
        SELF.next.store(now.cast(), Ordering::Relaxed);
        match head.compare_exchange_weak(now, me.cast(), Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(h) => now = h,
        }
    }
}

/// The other copies' nodes.
fn others() -> impl Iterator<Item = &'static Peer> {
    // SAFETY: we only read the list here.
    let mut p: *const Peer = unsafe { super::host::peers() }
        .load(Ordering::Acquire)
        .cast();
    let mut left = MAX_PEERS;
    core::iter::from_fn(move || {
        loop {
            if p.is_null() || left == 0 {
                return None;
            }
            left -= 1;
            // SAFETY: nodes are statics of the copies linked into this
            // object, published fully built (release) and never removed.
            let node = unsafe { &*p };
            p = node.next.load(Ordering::Acquire);
            if !core::ptr::eq(node, &SELF) {
                return Some(node);
            }
        }
    })
}

/// Our [`OwnedFn`]: the overlay's spans in the range the text still holds.
unsafe extern "C" fn owned(
    start: usize,
    end: usize,
    each: unsafe extern "C" fn(*mut c_void, usize, usize),
    cx: *mut c_void,
) -> c_int {
    // The lock is held by the caller (recursive): this only borrows our
    // state, refused if our own batch has it on this thread.
    let Ok(mut locked) = Locked::acquire() else {
        return -1;
    };
    for (a, ours) in locked.shared().overlay.spans_in(start..end) {
        // SAFETY: inside `[start, end)`, mapped readable text (caller).
        let now = unsafe { core::slice::from_raw_parts(a as *const u8, ours.len()) };
        if short_eq(now, ours) {
            // SAFETY: the caller's callback and context, as given.
            unsafe { each(cx, a, a + ours.len()) };
        }
    }
    0
}

unsafe extern "C" fn push_range(cx: *mut c_void, start: usize, end: usize) {
    // SAFETY: `cx` is the `Vec` `foreign_owned` passed, borrowed for the
    // call.
    let out = unsafe { &mut *cx.cast::<Vec<Range<usize>>>() };
    out.push(start..end);
}

/// Adds to `owned` (sorted offsets from `range.start`) the bytes in
/// `range` other copies' patches hold now, keeping it sorted and disjoint:
/// a page swap carries them as it carries ours. `scratch` is reused.
/// Nothing changes when no other copy is linked in.
///
/// The caller holds the update lock and `range` is mapped readable text.
pub(super) fn add_foreign(
    range: &Range<usize>,
    owned: &mut Vec<Range<usize>>,
    scratch: &mut Vec<Range<usize>>,
) -> Result<(), PokeError> {
    scratch.clear();
    for peer in others() {
        // SAFETY: the peer's function, called as its contract says: the
        // lock is held, the range is mapped text, `push_range` takes the
        // `Vec` we pass.
        let r = unsafe {
            (peer.owned)(
                range.start,
                range.end,
                push_range,
                (scratch as *mut Vec<Range<usize>>).cast(),
            )
        };
        if r != 0 {
            return Err(PokeError::Unsupported(
                "another copy of altpatch has a batch open on this thread",
            ));
        }
    }
    if scratch.is_empty() {
        return Ok(());
    }
    for r in scratch.drain(..) {
        let (lo, hi) = (r.start.max(range.start), r.end.min(range.end));
        if lo < hi {
            owned.push(lo - range.start..hi - range.start);
        }
    }
    crate::poke::sort_by_key(owned, |r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(owned.len());
    for r in owned.drain(..) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    *owned = merged;
    Ok(())
}

/// Records our `SIGTRAP` handler and the one it passes foreign traps to.
pub(super) fn set_sigtrap(handler: usize, next: usize) {
    SELF.sigtrap_next.store(next, Ordering::Release);
    SELF.sigtrap.store(handler, Ordering::Release);
}

/// Whether the installed `SIGTRAP` handler `current` reaches `ours`:
/// `ours` itself, or another copy's handler passing foreign traps along a
/// chain that does.
pub(super) fn sigtrap_reaches(current: usize, ours: usize) -> bool {
    let mut h = current;
    for _ in 0..MAX_PEERS {
        if h == ours {
            return true;
        }
        match others().find(|p| p.sigtrap.load(Ordering::Acquire) == h && h != 0) {
            Some(p) => h = p.sigtrap_next.load(Ordering::Acquire),
            None => return false,
        }
    }
    false
}
