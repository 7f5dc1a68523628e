//! How live updates are published while other threads run: the
//! process-wide choice between the page swap and the INT3 protocol.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::poke::PokeError;

/// How a [`LinuxPoke`](super::LinuxPoke) publishes a batch (see the [module documentation](super)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Publish {
    /// Stores into the live pages.
    InPlace,
    /// The page swap: builds each page's new contents aside and maps them
    /// over the text at commit, so every page changes atomically.
    Remap,
    /// Writes in place with the INT3 protocol (see [`live`](crate::poke::live)):
    /// three `membarrier`s per batch and a `SIGTRAP` handler. Every edit
    /// must replace one instruction (call, jmp, jcc, nop, ret) by one such
    /// instruction.
    Live,
}

/// The publication [`LinuxPoke::running`](super::LinuxPoke::running) uses: `Remap` (0) or `Live` (1).
static LIVE_PUBLICATION: AtomicU8 = AtomicU8::new(0);

/// Chooses how the high-level APIs publish updates while other threads run
/// ([`LinuxPoke::running`](super::LinuxPoke::running)): [`Publish::Remap`] (the default, no trap) or
/// [`Publish::Live`] (the INT3 protocol). `InPlace` is refused: it is not
/// safe for running threads.
///
/// ```
/// use altpatch::os::linux::{live_publication, set_live_publication};
/// use altpatch::Publish;
/// assert_eq!(live_publication(), Publish::Remap);
/// assert!(set_live_publication(Publish::InPlace).is_err());
/// ```
pub fn set_live_publication(publish: Publish) -> Result<(), PokeError> {
    let v = match publish {
        Publish::Remap => 0,
        Publish::Live => 1,
        Publish::InPlace => {
            return Err(PokeError::Unsupported(
                "in-place publication is not safe while other threads run the text",
            ));
        }
    };
    LIVE_PUBLICATION.store(v, Ordering::Relaxed);
    Ok(())
}

/// The publication [`LinuxPoke::running`](super::LinuxPoke::running) uses (see [`set_live_publication`]).
pub fn live_publication() -> Publish {
    match LIVE_PUBLICATION.load(Ordering::Relaxed) {
        1 => Publish::Live,
        _ => Publish::Remap,
    }
}
