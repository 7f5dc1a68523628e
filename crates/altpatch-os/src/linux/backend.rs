//! Linux as the process backend of the `process` layer and the mechanisms'
//! std entry points (the OS contract's upper half: `os::ProcessBackend`).

use altpatch_host::linux::Linux;

use super::{LinuxPoke, Publish};
use crate::poke::PokeError;
use crate::{JmpEdit, ProcessBackend};

impl ProcessBackend for Linux {
    type Poke = LinuxPoke;

    fn running_poke() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::running()
    }

    fn start_up_poke() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::start_up()
    }

    fn in_place_poke() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::with_publish(Publish::InPlace)
    }

    fn only_thread() -> bool {
        super::threads::only_thread()
    }

    unsafe fn retarget_branches(edits: &[JmpEdit]) -> Result<usize, PokeError> {
        // SAFETY: forwarded from our caller.
        unsafe { super::jmps::retarget(edits) }
    }
}
