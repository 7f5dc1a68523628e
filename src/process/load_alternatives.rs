//! Applying an object's alternatives when it is loaded, without the
//! application's help (see the `alternative` module's `startup.rs` for why
//! only while the process has one thread, and for [`startup`], the
//! outcome; this is the part that writes the running program's text).
//!
//! [`startup`]: crate::alternative::startup

use crate::alternative::{STARTUP, Startup};
use crate::os::{Process, ProcessBackend};

/// The constructor every `alternative!` registers; runs once per object.
#[doc(hidden)]
pub extern "C" fn __alternative_at_load() {
    if !STARTUP.claim() {
        return;
    }
    let outcome = if !crate::cpu::startup_allowed() {
        Startup::Off
    } else if !Process::only_thread() {
        Startup::OtherThreads
    } else {
        apply_now()
    };
    STARTUP.finish(outcome);
}

fn apply_now() -> Startup {
    use std::string::ToString;
    let start = std::time::Instant::now();
    let image = &super::running().image;
    let features = crate::cpu::published();
    let mut poke = match Process::start_up_poke() {
        Ok(p) => p,
        Err(e) => return Startup::Failed(e.to_string()),
    };
    // SAFETY: this thread is the process's only one (checked just before,
    // and again by the start-up poke under a full signal mask before it
    // stores in place; else it swaps pages), and it is running this constructor,
    // not a site of the object: the loader called it before any of the
    // object's code ran. The snapshot is the published one, which never
    // claims what the CPU lacks.
    match unsafe { crate::alternative::apply(image, &features, &mut poke) } {
        Ok(r) => Startup::Applied {
            sites: r.sites.len(),
            replaced: r.sites.iter().filter(|s| s.chosen.is_some()).count(),
            took: start.elapsed(),
        },
        Err(e) => Startup::Failed(e.to_string()),
    }
}
