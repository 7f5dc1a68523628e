//! The published snapshot: the one [`Features`] value that code with no way
//! to receive it as an argument reads — lazily resolved ifuncs and C ifunc
//! resolvers (which take no arguments, by the glibc convention).
//!
//! Everything else in the crate takes the snapshot explicitly. Publish it
//! once, before anything resolves: [`publish`] (the ifunc `apply` and
//! `init` functions publish the snapshot they are given). If nothing was
//! published when it is first needed, [`published`] publishes
//! [`Features::detect`] (with `std`: plus the `ALTPATCH` overrides, read
//! without Rust's runtime or an allocation because C resolvers may run
//! inside the dynamic loader, before libc has even set `environ`; an
//! unparsable value is ignored there and reported by
//! `Features::detect_with_env`).
//!
//! From C, include `include/altpatch.h`:
//!
//! ```c
//! #include "altpatch.h"
//! static long (*resolve_ones(void))(long) {
//!     return altpatch_cpu_has(ALTPATCH_CPU_POPCNT) ? ones_popcnt : ones_portable;
//! }
//! long ones(long) __attribute__((ifunc("resolve_ones")));
//! ```

use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use super::{Feature, Features};

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

struct Slot {
    state: AtomicU8,
    value: UnsafeCell<Features>,
}

// SAFETY: `value` is written once, by the thread that moved `state` from
// EMPTY to WRITING, and read only after `state` is READY (Release/Acquire).
unsafe impl Sync for Slot {}

static SNAPSHOT: Slot = Slot {
    state: AtomicU8::new(EMPTY),
    value: UnsafeCell::new(Features::none()),
};

/// Another snapshot was published first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlreadyPublished {
    /// The snapshot in force.
    pub published: Features,
}

impl fmt::Display for AlreadyPublished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a different CPU feature snapshot was already published ({}); \
             publish once, before anything is resolved",
            self.published
        )
    }
}

impl core::error::Error for AlreadyPublished {}

/// Publishes `features` as the snapshot of this program. Publishing the
/// same value again is fine; a different one is refused, because code may
/// already have been chosen from the first.
///
/// ```
/// use altpatch::cpu::{self, Feature, Features};
///
/// let f = Features::detect();
/// cpu::publish(f).unwrap();
/// cpu::publish(f).unwrap(); // the same again: fine
/// assert_eq!(cpu::published(), f);
/// let other = f.with(Feature::Rdpid).without(Feature::Sse3);
/// assert!(cpu::publish(other).is_err() || other == f);
/// ```
pub fn publish(features: Features) -> Result<(), AlreadyPublished> {
    loop {
        match SNAPSHOT
            .state
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Acquire)
        {
            Ok(_) => {
                // SAFETY: we moved the state to WRITING: no one else writes,
                // and no one reads until READY.
                unsafe { *SNAPSHOT.value.get() = features };
                SNAPSHOT.state.store(READY, Ordering::Release);
                return Ok(());
            }
            Err(READY) => {
                let published = read_ready();
                return if published == features {
                    Ok(())
                } else {
                    Err(AlreadyPublished { published })
                };
            }
            // Another thread is writing: wait for it.
            Err(_) => core::hint::spin_loop(),
        }
    }
}

fn read_ready() -> Features {
    // SAFETY: READY was observed with Acquire: the write happened before.
    unsafe { *SNAPSHOT.value.get() }
}

/// The published snapshot, if any.
///
/// ```
/// use altpatch::cpu;
/// let f = cpu::published(); // publishes the detected snapshot if none was
/// assert_eq!(cpu::try_published(), Some(f));
/// ```
pub fn try_published() -> Option<Features> {
    (SNAPSHOT.state.load(Ordering::Acquire) == READY).then(read_ready)
}

/// The published snapshot; publishes the detected one first if nothing was
/// (see the module docs).
///
/// ```
/// let f = altpatch::cpu::published();
/// assert_eq!(altpatch::cpu::published(), f); // always the same value
/// ```
pub fn published() -> Features {
    if let Some(f) = try_published() {
        return f;
    }
    // Losing the race to another publisher is fine: use theirs.
    let _ = publish(detect_default());
    try_published().expect("published above or by another thread")
}

/// What [`published`] publishes when nothing was: the detected snapshot
/// with `ALTPATCH` applied — unless that string is invalid, or claims an
/// instruction set the CPU lacks (which [`Features::detect_with_env`]
/// refuses with an error; here, with no caller to tell, it is ignored
/// whole, as an invalid string is).
fn detect_default() -> Features {
    let detected = Features::detect();
    if let Some(o) = environment::overrides()
        && o.unverified(&detected).is_none()
    {
        return detected.with_overrides(&o);
    }
    detected
}

/// Whether altpatch may patch by itself: when an object is loaded (the
/// constructors `ifunc!` and `alternative!` register) and on an ifunc's
/// first call. Not with the `no-startup` feature, nor with `startup=off`
/// in `ALTPATCH` (an invalid `ALTPATCH` is ignored here, as for the
/// published snapshot). Allocation-free: it runs in constructors.
#[cfg(feature = "std")]
#[doc(hidden)]
pub fn startup_allowed() -> bool {
    !cfg!(feature = "no-startup")
        && environment::overrides().and_then(|o| o.startup()) != Some(false)
}

/// In a forked child: a thread of the parent that was writing the snapshot
/// at the instant of `fork` will never finish here; start over (the value
/// may be half written).
///
/// # Safety
///
/// Only in a forked child, before any other thread exists there: a thread
/// writing the snapshot would race with the next writer.
#[cfg(feature = "std")]
#[doc(hidden)]
pub unsafe fn after_fork_in_child() {
    let _ = SNAPSHOT
        .state
        .compare_exchange(WRITING, EMPTY, Ordering::AcqRel, Ordering::Acquire);
}

/// `ALTPATCH` without Rust's runtime, through the OS contract
/// (`host::Host`): from the C runtime's environment once it is set up,
/// before that (C ifunc resolvers of the executable run inside the dynamic
/// loader) from the environment the process started with, item by item
/// through a small buffer. Nothing is allocated, and a value of any length
/// parses exactly as `Overrides::parse` parses it (items are independent).
/// Freestanding there is no environment: no overrides.
mod environment {
    use crate::cpu::Overrides;
    use crate::host::Current;
    use crate::host::Host;

    pub(super) fn overrides() -> Option<Overrides> {
        match from_environ() {
            Some(o) => o,
            None => from_start(),
        }
    }

    /// The parsed value (`Some(None)` if invalid; no overrides if unset);
    /// `None` if the environment is not set up yet.
    fn from_environ() -> Option<Option<Overrides>> {
        Current::with_env(c"ALTPATCH", |v| match v {
            None => Some(Overrides::none()),
            Some(v) => core::str::from_utf8(v)
                .ok()
                .and_then(Overrides::parse_quiet),
        })
    }

    /// Items longer than this are not valid anyway (the longest valid one,
    /// `retpoline=generic` or `+NAME`, is far shorter) — unless padded with
    /// whitespace, whose runs are folded to one space on the way in.
    const ITEM: usize = 96;

    /// One item being collected from the stream.
    struct Item {
        buf: [u8; ITEM],
        len: usize,
        /// Longer than the buffer: invalid.
        overflow: bool,
    }

    impl Item {
        fn push(&mut self, b: u8) {
            if b.is_ascii_whitespace() && self.len > 0 && self.buf[self.len - 1] == b' ' {
                return;
            }
            let b = if b.is_ascii_whitespace() { b' ' } else { b };
            if self.len == ITEM {
                self.overflow = true;
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }

        /// Applies the item to `o`; false if it is invalid.
        fn apply(&mut self, o: &mut Overrides) -> bool {
            let ok = !self.overflow
                && core::str::from_utf8(&self.buf[..self.len])
                    .is_ok_and(|s| o.apply_item(s).is_ok());
            self.len = 0;
            self.overflow = false;
            ok
        }
    }

    /// Finds `ALTPATCH=` in a stream of NUL-separated environment entries
    /// fed in chunks of any size, and parses its value item by item.
    pub(super) struct EnvironScan {
        matched: usize,
        at_start: bool,
        in_value: bool,
        found: bool,
        done: bool,
        valid: bool,
        o: Overrides,
        item: Item,
    }

    impl EnvironScan {
        pub(super) const fn new() -> EnvironScan {
            EnvironScan {
                matched: 0,
                at_start: true,
                in_value: false,
                found: false,
                done: false,
                valid: true,
                o: Overrides::none(),
                item: Item {
                    buf: [0; ITEM],
                    len: 0,
                    overflow: false,
                },
            }
        }

        /// Consumes `chunk`; returns true once the value has ended.
        pub(super) fn feed(&mut self, chunk: &[u8]) -> bool {
            const NAME: &[u8] = b"ALTPATCH=";
            for &b in chunk {
                if self.done {
                    break;
                }
                if self.in_value {
                    match b {
                        0 => {
                            self.valid &= self.item.apply(&mut self.o);
                            (self.in_value, self.done) = (false, true);
                        }
                        b',' => self.valid &= self.item.apply(&mut self.o),
                        b => self.item.push(b),
                    }
                } else if b == 0 {
                    (self.matched, self.at_start) = (0, true);
                } else if self.at_start && b == NAME[self.matched] {
                    self.matched += 1;
                    if self.matched == NAME.len() {
                        (self.in_value, self.found) = (true, true);
                    }
                } else {
                    self.at_start = false;
                }
            }
            self.done
        }

        /// No overrides if the variable is absent; `None` if its value is
        /// invalid.
        pub(super) fn finish(mut self) -> Option<Overrides> {
            if self.in_value && self.item.len > 0 {
                // The value ran to the end of the data without a NUL.
                self.valid &= self.item.apply(&mut self.o);
            }
            match (self.found, self.valid) {
                (false, _) => Some(Overrides::none()),
                (true, true) => Some(self.o),
                (true, false) => None,
            }
        }
    }

    /// The value of `ALTPATCH` in the environment the process started
    /// with, parsed; `None` if that cannot be read.
    fn from_start() -> Option<Overrides> {
        let mut scan = EnvironScan::new();
        if !Current::read_environment(|chunk| scan.feed(chunk)) {
            return None;
        }
        scan.finish()
    }
}

/// C: `int altpatch_cpu_has(unsigned feature)`: whether the published
/// snapshot (see [`published`]) has the feature numbered `feature` (the
/// [`Feature`] discriminants, `ALTPATCH_CPU_*` in `include/altpatch.h`); 0
/// for unknown numbers. Allocation-free and lock-free, for ifunc resolvers.
///
/// The C name is a weak symbol: in a program linking two copies of the
/// crate it reaches one copy's snapshot (see
/// [`records`](mod@crate::records)).
///
/// ```
/// use altpatch::cpu::{self, Feature};
/// let has = cpu::altpatch_cpu_has(Feature::Sse3 as u32) != 0;
/// assert_eq!(has, cpu::published().has(Feature::Sse3));
/// assert_eq!(cpu::altpatch_cpu_has(999), 0);
/// ```
pub extern "C" fn altpatch_cpu_has(feature: u32) -> core::ffi::c_int {
    let Some(&f) = Feature::ALL.iter().find(|f| **f as u32 == feature) else {
        return 0;
    };
    published().has(f) as core::ffi::c_int
}

/// C: `unsigned long long altpatch_cpu_features(void)`: the published
/// snapshot's feature bits (bit *n* is the feature numbered *n*).
///
/// ```
/// use altpatch::cpu::{self, Feature};
/// let bits = cpu::altpatch_cpu_features();
/// assert_eq!(bits & (1 << Feature::Sse3 as u32) != 0, cpu::published().has(Feature::Sse3));
/// ```
pub extern "C" fn altpatch_cpu_features() -> u64 {
    published().bits()
}

crate::arch::c_entry!("altpatch_cpu_has", altpatch_cpu_has);
crate::arch::c_entry!("altpatch_cpu_features", altpatch_cpu_features);

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::environment::EnvironScan;
    use crate::cpu::Overrides;

    fn scan(environ: &[u8], chunk: usize) -> Option<Overrides> {
        let mut s = EnvironScan::new();
        for c in environ.chunks(chunk) {
            if s.feed(c) {
                break;
            }
        }
        s.finish()
    }

    #[test]
    fn environ_stream_parses_values_of_any_length_like_parse() {
        let long = alloc::format!(
            "{}nomovbe, retpoline = plain ,+erms",
            "+sse3,   ".repeat(200)
        );
        assert!(long.len() > 1500);
        let environ = alloc::format!("PATH=/bin\0XALTPATCH=nosse3\0ALTPATCH={long}\0HOME=/root\0");
        let want = Overrides::parse(&long).unwrap();
        for chunk in [1, 7, 64, 1024, 4096] {
            assert_eq!(scan(environ.as_bytes(), chunk), Some(want), "chunk {chunk}");
        }
        // Absent: no overrides. Invalid: rejected, as `parse` rejects it.
        assert_eq!(scan(b"A=1\0B=2\0", 3), Some(Overrides::none()));
        assert_eq!(scan(b"ALTPATCH=nomovbee\0", 5), None);
        assert!(Overrides::parse("nomovbee").is_err());
        let huge_item = alloc::format!("ALTPATCH=+{}\0", "x".repeat(300));
        assert_eq!(scan(huge_item.as_bytes(), 100), None);
        // The last entry may end without a NUL.
        assert_eq!(
            scan(b"ALTPATCH=nomovbe", 4),
            Some(Overrides::parse("nomovbe").unwrap())
        );
    }
}
