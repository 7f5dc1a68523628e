//! The three phases of the INT3 protocol, as steps a driver carries out
//! (`Int3Poke` over an in-place poke, `table.rs` with a trap table
//! published), in one place both use.

use crate::arch::TRAP as INT3;
use crate::poke::PokeError;

/// One step of the protocol, for [`run_protocol`]'s callback.
#[doc(hidden)]
pub enum Step<'a> {
    /// Store these bytes at this address (in place).
    Write(usize, &'a [u8]),
    /// Make every CPU/thread observe the stores so far.
    Sync,
}

/// Runs the three phases over `sites` (address, new bytes), calling `step`
/// for each store and after each phase.
pub(crate) fn run_protocol(
    sites: &[(usize, &[u8])],
    mut step: impl FnMut(Step<'_>) -> Result<(), PokeError>,
) -> Result<(), PokeError> {
    for &(addr, _) in sites {
        step(Step::Write(addr, &[INT3]))?;
    }
    step(Step::Sync)?;
    for &(addr, new) in sites {
        if new.len() > 1 {
            step(Step::Write(addr + 1, &new[1..]))?;
        }
    }
    step(Step::Sync)?;
    for &(addr, new) in sites {
        step(Step::Write(addr, &new[..1]))?;
    }
    step(Step::Sync)
}
