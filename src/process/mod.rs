//! The running program as one context (`std`, Linux): what the one-liners
//! that patch it — `KEY.enable()`, `NAME::update(f)` — find once and share.
//!
//! This layer sits above every mechanism and the patcher: the mechanisms
//! plan and apply over any image, text poke and site list (what a kernel
//! uses), and only here are those the running program's, its loader's
//! and Linux's. The one-liners are inherent methods of the mechanisms'
//! types written here (`keys.rs`, `calls.rs`), so their paths are the
//! types' while the mechanisms themselves import no OS backend for them.
//!
//! One context: the image of the object this copy of altpatch is linked
//! into, found once, and beside it what each mechanism indexes from it on
//! first use (the keys' sites, the static calls' sites by trampoline) —
//! each built under the process lock, which `fork` waits for, so a child
//! never inherits a half-built index.

use std::sync::OnceLock;

use crate::LinuxPoke;
use crate::image::Image;
use crate::poke::PokeError;

mod calls;
mod keys;

/// The running program: its image, and each mechanism's index of it.
pub(crate) struct Running {
    pub(crate) image: Image<'static>,
    keys: OnceLock<crate::static_key::KeyIndex>,
    calls: OnceLock<calls::ByTrampoline>,
}

/// The running program's context, found once.
pub(crate) fn running() -> &'static Running {
    static RUNNING: OnceLock<Running> = OnceLock::new();
    initialized(&RUNNING, || Running {
        image: Image::current(),
        keys: OnceLock::new(),
        calls: OnceLock::new(),
    })
}

impl Running {
    /// The keys' sites in the running program.
    pub(crate) fn keys(&self) -> &crate::static_key::KeyIndex {
        initialized(&self.keys, || crate::static_key::KeyIndex::new(&self.image))
    }

    /// The static calls' sites by trampoline in the running program.
    fn calls(&self) -> &calls::ByTrampoline {
        initialized(&self.calls, calls::by_trampoline)
    }
}

/// `cell`'s value, built by `init` under the process lock if it is not yet:
/// `fork` waits for that lock, so a child never inherits an initialization
/// another thread was in the middle of (it would wait for it forever). The
/// lock is re-entrant: `init` may take it again.
fn initialized<T>(cell: &OnceLock<T>, init: impl FnOnce() -> T) -> &T {
    if let Some(v) = cell.get() {
        return v;
    }
    let _held = crate::sync::Held::acquire();
    cell.get_or_init(init)
}

/// A poke for code other threads run (the page swap by default: see
/// [`crate::os::linux`]).
fn running_poke() -> Result<LinuxPoke, PokeError> {
    LinuxPoke::running()
}
