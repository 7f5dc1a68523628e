//! The process-wide patching state, reachable only with the process lock
//! held (see [`crate::sync`]).

use core::cell::{Cell, UnsafeCell};

use super::arena::Arena;
use super::file_swap;
use super::maps::TextPages;
use super::overlay::Overlay;
use super::poke_log::PokeLog;
use super::procmem::ProcMem;
use crate::poke::{PokeError, Refusal, Strategy};
use crate::sync::Held;

/// The order strategies are tried in: `ALTPATCH_POKE` (comma-separated
/// names, e.g. `memfd,file`) or [`Strategy::ALL`].
pub(super) type Order = Result<([Option<Strategy>; 3], usize), PokeError>;

/// Everything the pokes of a process share.
pub(super) struct Shared {
    /// Pages confirmed to be ordinary text.
    pub(super) text: TextPages,
    /// The bytes this process's patches put in text (what a page swap
    /// carries over to the file's fresh copy of a page).
    pub(super) overlay: Overlay,
    /// The text-poke log, if one is open.
    pub(super) log: PokeLog,
    /// The file-backed page swap's scratch and what it knows of the files.
    pub(super) swap: file_swap::Scratch,
    /// The open `/proc/self/mem`.
    pub(super) procmem: ProcMem,
    /// The alias strategies' backing file and slots.
    pub(super) arena: Arena,
    /// The strategies this process may use, once probed: per strategy of
    /// [`Strategy::ALL`], `Ok` or why it was refused.
    pub(super) probed: [Option<Result<(), Refusal>>; 3],
    /// Refusals injected for tests (see `refuse_for_tests`).
    pub(super) injected: [Option<Refusal>; 3],
    /// The order strategies are tried in, once read (`ALTPATCH_POKE`).
    pub(super) order: Option<Order>,
}

struct SharedCell(UnsafeCell<Shared>);
// SAFETY: only reached through `Locked`, i.e. with the process lock held,
// and `Locked` refuses a second borrow on the owning thread.
unsafe impl Sync for SharedCell {}

static SHARED: SharedCell = SharedCell(UnsafeCell::new(Shared {
    text: TextPages::new(),
    overlay: Overlay::new(),
    log: PokeLog::new(),
    swap: file_swap::Scratch::new(),
    procmem: ProcMem::new(),
    arena: Arena::new(),
    probed: [None; 3],
    injected: [None; 3],
    order: None,
}));

std::thread_local! {
    /// Whether this thread holds a `Locked` now (the process lock is
    /// recursive; the state must not be borrowed twice).
    static BORROWED: Cell<bool> = const { Cell::new(false) };
}

/// The process lock, held with exclusive access to [`Shared`]. Not `Send`.
pub(super) struct Locked {
    _held: Held,
}

impl Locked {
    /// Takes the lock. Fails if this thread already has the state borrowed
    /// (two batches of different pokes interleaved on one thread).
    pub(super) fn acquire() -> Result<Locked, PokeError> {
        let held = Held::acquire();
        if BORROWED.with(|b| b.replace(true)) {
            drop(held);
            return Err(PokeError::Unsupported(
                "another LinuxPoke's batch is open on this thread",
            ));
        }
        Ok(Locked { _held: held })
    }

    pub(super) fn shared(&mut self) -> &mut Shared {
        // SAFETY: the process lock is held for our lifetime, this thread had
        // no other borrow (checked in `acquire`), and `&mut self` makes this
        // the only reference derived from the guard.
        unsafe { &mut *SHARED.0.get() }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        BORROWED.with(|b| b.set(false));
    }
}

/// Index of `s` in [`Strategy::ALL`].
pub(super) fn slot(s: Strategy) -> usize {
    Strategy::ALL.iter().position(|&t| t == s).unwrap_or(0)
}
