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

/// What [`published`] publishes when nothing was.
fn detect_default() -> Features {
    #[cfg(all(feature = "std", target_os = "linux"))]
    if let Some(o) = env::overrides() {
        return Features::detect().with_overrides(&o);
    }
    Features::detect()
}

/// `ALTPATCH` without Rust's runtime: C ifunc resolvers of the executable
/// run inside the dynamic loader, before libc has set `environ` (`getenv`
/// then finds nothing), so the variable is then read from
/// `/proc/self/environ` — into fixed buffers, no allocation.
#[cfg(all(feature = "std", target_os = "linux"))]
mod env {
    use crate::cpu::Overrides;

    unsafe extern "C" {
        static environ: *const *const core::ffi::c_char;
    }

    pub(super) fn overrides() -> Option<Overrides> {
        let mut buf = [0u8; 512];
        let len = match from_environ(&mut buf) {
            Some(n) => n,
            None => from_proc(&mut buf)?,
        };
        Overrides::parse(core::str::from_utf8(&buf[..len]).ok()?).ok()
    }

    /// The value's length in `buf` (0 if unset); `None` if `environ` is
    /// not set up yet.
    fn from_environ(buf: &mut [u8; 512]) -> Option<usize> {
        // SAFETY: reading libc's `environ` pointer; null until libc's
        // start-up code sets it.
        if unsafe { environ }.is_null() {
            return None;
        }
        // SAFETY: environ is set: getenv with a NUL-terminated name; the
        // result is copied right away.
        let v = unsafe { libc::getenv(c"ALTPATCH".as_ptr()) };
        if v.is_null() {
            return Some(0);
        }
        // SAFETY: a NUL-terminated string from getenv.
        let v = unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes();
        let n = v.len().min(buf.len());
        buf[..n].copy_from_slice(&v[..n]);
        Some(n)
    }

    /// The value's length in `buf`, from `/proc/self/environ`.
    fn from_proc(buf: &mut [u8; 512]) -> Option<usize> {
        const NAME: &[u8] = b"ALTPATCH=";
        // SAFETY: open/read/close on a path and stack buffers we own.
        let fd = unsafe {
            libc::open(
                c"/proc/self/environ".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // Entries are NUL-separated: match NAME at an entry's start, then
        // copy the value.
        let (mut matched, mut at_start, mut len) = (0usize, true, None::<usize>);
        let mut chunk = [0u8; 1024];
        'read: loop {
            // SAFETY: reading into our buffer, at most its length.
            let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            if n <= 0 {
                break;
            }
            for &b in &chunk[..n as usize] {
                if let Some(l) = len.as_mut() {
                    if b == 0 {
                        break 'read;
                    }
                    if *l < buf.len() {
                        buf[*l] = b;
                        *l += 1;
                    }
                } else if b == 0 {
                    (matched, at_start) = (0, true);
                } else if at_start && b == NAME[matched] {
                    matched += 1;
                    if matched == NAME.len() {
                        len = Some(0);
                    }
                } else {
                    at_start = false;
                }
            }
        }
        // SAFETY: closing the descriptor we opened.
        unsafe { libc::close(fd) };
        len
    }
}

/// C: `int altpatch_cpu_has(unsigned feature)`: whether the published
/// snapshot (see [`published`]) has the feature numbered `feature` (the
/// [`Feature`] discriminants, `ALTPATCH_CPU_*` in `include/altpatch.h`); 0
/// for unknown numbers. Allocation-free and lock-free, for ifunc resolvers.
///
/// ```
/// use altpatch::cpu::{self, Feature};
/// let has = cpu::altpatch_cpu_has(Feature::Sse3 as u32) != 0;
/// assert_eq!(has, cpu::published().has(Feature::Sse3));
/// assert_eq!(cpu::altpatch_cpu_has(999), 0);
/// ```
#[unsafe(no_mangle)]
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
#[unsafe(no_mangle)]
pub extern "C" fn altpatch_cpu_features() -> u64 {
    published().bits()
}
