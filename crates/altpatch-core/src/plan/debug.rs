//! Listing applied plans: to stderr under `ALTPATCH_DEBUG` (std), or to a
//! sink the embedder installs (a kernel's serial port), in both worlds.

use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

use super::{ApplyReport, Plan};

/// How much the listing of an applied plan says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DebugLevel {
    /// Nothing.
    Off,
    /// Each plan summarized per reason (or shape) with its first edits: a
    /// dozen lines for thirteen thousand retpoline sites.
    Summary,
    /// Every edit.
    All,
}

/// A function that prints one listing (one or more lines, no trailing
/// newline), e.g. to a serial port. Called with the patcher's state
/// consistent and nothing half-written: after the plan's writes were read
/// back, but possibly while a mechanism still holds its update lock (a
/// static key between its writes and recording its count) and between
/// two batches of one mechanism (retpoline sites, then thunks).
///
/// So a sink must only print: not panic (unwinding would skip the rest of
/// the update), not apply plans or update keys, calls or ifuncs (the update
/// lock is recursive with `std`, a spin flag without: a nested update
/// would see half-recorded state, or spin forever), and not take a lock a
/// patching thread may hold.
pub type DebugSink = fn(&dyn fmt::Display);

/// The installed sink (a `DebugSink` cast to a pointer; null: none).
static SINK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());
/// The installed sink's level (a `DebugLevel` as `u8`).
static SINK_LEVEL: AtomicU8 = AtomicU8::new(0);

/// Sends the listing of every plan applied from now on (that wrote
/// something) to `sink`, at `level`, instead of `ALTPATCH_DEBUG` and
/// stderr. Usable without `std`: the example kernel lists its plans over
/// serial with it (`altpatch.debug` on its command line).
///
/// ```
/// use altpatch::plan::{DebugLevel, set_debug_sink};
/// use altpatch::{DirectPoke, Edit, Plan, SyncMethod};
/// use std::sync::Mutex;
///
/// static SEEN: Mutex<String> = Mutex::new(String::new());
/// fn sink(listing: &dyn core::fmt::Display) {
///     *SEEN.lock().unwrap() += &listing.to_string();
/// }
/// set_debug_sink(sink, DebugLevel::All);
///
/// let mut text = vec![0xb8u8, 1, 0, 0, 0, 0xc3];
/// let base = text.as_mut_ptr() as usize;
/// // SAFETY: `text` stays readable while the plan is used.
/// let mut plan = unsafe { Plan::with_text(base..base + text.len()) };
/// plan.push(Edit::replace(base, &[0xb8, 1, 0, 0, 0], &[0xb8, 2, 0, 0, 0]).site("ret_one"));
/// // SAFETY: plain data that nothing executes.
/// let mut poke = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
/// // SAFETY: as above.
/// unsafe { plan.apply(&mut poke) }.unwrap();
/// assert!(SEEN.lock().unwrap().contains("ret_one"));
/// set_debug_sink(sink, DebugLevel::Off);
/// ```
pub fn set_debug_sink(sink: DebugSink, level: DebugLevel) {
    SINK_LEVEL.store(level as u8, Ordering::Relaxed);
    SINK.store(sink as *mut (), Ordering::Release);
}

/// The installed sink and its level, if any.
fn sink() -> Option<(DebugSink, u8)> {
    let p = SINK.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: `SINK` only ever holds null or a `DebugSink` stored by
    // `set_debug_sink` (fn pointers and data pointers have one size and
    // representation on the targets this crate supports).
    let f = unsafe { core::mem::transmute::<*mut (), DebugSink>(p) };
    Some((f, SINK_LEVEL.load(Ordering::Relaxed)))
}

/// Where listings go and at which level: the sink's if one is installed,
/// else (std) stderr at `ALTPATCH_DEBUG`'s (unset/`0`: off, `all`: every
/// edit, else a summary).
fn in_force() -> (Option<DebugSink>, u8) {
    match sink() {
        Some((f, level)) => (Some(f), level),
        None => (None, env_level()),
    }
}

/// The level in force (0: off), for callers that build a listing only
/// when one is wanted.
pub(super) fn debug_level() -> u8 {
    in_force().1
}

#[cfg(feature = "std")]
fn env_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("ALTPATCH_DEBUG").as_deref() {
        Err(_) | Ok("") | Ok("0") => 0,
        Ok("all") => 2,
        Ok(_) => 1,
    })
}

#[cfg(not(feature = "std"))]
fn env_level() -> u8 {
    0
}

/// One applied plan's listing at a level.
struct Listing<'a> {
    plan: &'a Plan,
    report: &'a ApplyReport,
    level: u8,
    /// How to ask for every edit, named in summaries.
    more: &'static str,
}

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.level >= 2 {
            write!(f, "altpatch: applied plan ({})\n{}", self.report, self.plan)
        } else {
            write!(
                f,
                "altpatch: applied plan ({}); {} lists every edit\n{}",
                self.report,
                self.more,
                self.plan.summary(3)
            )
        }
    }
}

/// Lists an applied plan where the level in force says.
pub(super) fn debug_print(plan: &Plan, report: &ApplyReport) {
    let (sink, level) = in_force();
    if level == 0 {
        return;
    }
    let more = if sink.is_some() {
        "DebugLevel::All"
    } else {
        "ALTPATCH_DEBUG=all"
    };
    let listing = Listing {
        plan,
        report,
        level,
        more,
    };
    match sink {
        Some(f) => f(&listing),
        #[cfg(feature = "std")]
        None => std::eprintln!("{listing}"),
        #[cfg(not(feature = "std"))]
        None => {}
    }
}
