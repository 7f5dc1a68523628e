//! Choosing how this process writes its text: the strategies in order, each
//! probed once, the first that works used, every refusal kept for the error.

use super::state::{Order, Shared, slot};
use super::{arena, procmem};
use crate::poke::{PokeError, Refusal, Strategy};

fn order() -> Order {
    let mut out = [None; 3];
    let Ok(list) = std::env::var("ALTPATCH_POKE") else {
        return Ok((Strategy::ALL.map(Some), 3));
    };
    let mut n = 0;
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let s = Strategy::from_name(name).ok_or(PokeError::Unsupported(
            "ALTPATCH_POKE names an unknown strategy (valid: procmem, memfd, file)",
        ))?;
        if !out[..n].contains(&Some(s)) {
            out[n] = Some(s);
            n += 1;
        }
    }
    if n == 0 {
        return Err(PokeError::Unsupported(
            "ALTPATCH_POKE names no strategy (valid: procmem, memfd, file)",
        ));
    }
    Ok((out, n))
}

/// Whether `s` works in this process (probed once, then remembered).
pub(super) fn usable(shared: &mut Shared, s: Strategy) -> Result<(), Refusal> {
    let i = slot(s);
    if let Some(r) = shared.injected[i] {
        return Err(r);
    }
    if let Some(r) = shared.probed[i] {
        return r;
    }
    let r = match s {
        Strategy::ProcMem => procmem::probe(&mut shared.procmem),
        Strategy::Memfd | Strategy::File => arena::probe(s),
    };
    shared.probed[i] = Some(r);
    r
}

/// The first usable strategy in order, or every refusal.
pub(super) fn choose(shared: &mut Shared) -> Result<Strategy, PokeError> {
    // The environment is read once per process.
    let (order, n) = (*shared.order.get_or_insert_with(order))?;
    let mut refusals = [None; 3];
    for (k, s) in order[..n].iter().flatten().enumerate() {
        match usable(shared, *s) {
            Ok(()) => return Ok(*s),
            Err(r) => refusals[k] = Some(r),
        }
    }
    Err(PokeError::NoStrategy { refusals })
}

/// A report line for `strategy` under `publish`.
pub(super) fn method(strategy: Strategy, publish: super::Publish) -> &'static str {
    use super::Publish::*;
    match (strategy, publish) {
        (Strategy::ProcMem, InPlace) => "pwrite to /proc/self/mem, in place",
        (Strategy::ProcMem, Remap) => "pwrite to /proc/self/mem, page swap",
        (Strategy::ProcMem, Live) => "pwrite to /proc/self/mem, INT3 protocol",
        (Strategy::Memfd, InPlace) => "memfd alias, in place",
        (Strategy::Memfd, Remap) => "memfd alias, page swap",
        (Strategy::Memfd, Live) => "memfd alias, INT3 protocol",
        (Strategy::File, InPlace) => "file alias, in place",
        (Strategy::File, Remap) => "file alias, page swap",
        (Strategy::File, Live) => "file alias, INT3 protocol",
    }
}
