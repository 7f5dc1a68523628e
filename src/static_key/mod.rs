//! Static keys (jump labels): a flag whose check costs a 5-byte NOP.
//!
//! ```
//! use altpatch::static_key::StaticFalseKey;
//! use altpatch::static_branch_unlikely;
//!
//! static TRACING: StaticFalseKey = StaticFalseKey::new();
//!
//! fn work() -> u32 {
//!     if static_branch_unlikely!(TRACING) {
//!         return 1; // rarely on: the check is a NOP until enabled
//!     }
//!     0
//! }
//!
//! assert_eq!(work(), 0);
//! TRACING.enable().unwrap();   // every site of the key becomes a jmp, live
//! assert_eq!(work(), 1);
//! TRACING.disable().unwrap();
//! assert_eq!(work(), 0);
//! ```
//!
//! Each [`static_branch_unlikely!`](crate::static_branch_unlikely) or
//! [`static_branch_likely!`](crate::static_branch_likely) site is an `asm!`
//! goto whose first instruction is a 5-byte NOP (fall through) or a 5-byte
//! `jmp` to the other path, recorded in the `altpatch_v1_key` section with
//! the key's address. Changing the key rewrites every site of the key in one
//! batch. `unlikely` sites fall through to `false` (NOP while the key is
//! off); `likely` sites fall through to `true` (NOP while it is on).

mod index;

use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::sync::UpdateLock;

pub use index::KeyIndex;

use crate::arch;
use crate::image::Image;
use crate::plan::{ApplyReport, Edit, Expect, Plan, PlanError};
use crate::poke::TextPoke;

/// A static key, initially enabled if `INITIAL`.
///
/// Declare it as a `static` ([`StaticFalseKey`] or [`StaticTrueKey`]) and
/// test it with [`static_branch_unlikely!`](crate::static_branch_unlikely)
/// or [`static_branch_likely!`](crate::static_branch_likely). With `std`,
/// [`enable`](Self::enable) and friends rewrite the current program's sites
/// while other threads run; [`set_with`](Self::set_with) does it for any
/// image through any [`TextPoke`] (`no_std`).
#[repr(C, align(8))]
pub struct StaticKey<const INITIAL: bool> {
    /// The reference count, the key's only state: enabled while positive.
    /// Changed under `busy`, stored after the sites follow it.
    count: AtomicUsize,
    pub(crate) busy: UpdateLock,
}

/// A key that starts disabled.
pub type StaticFalseKey = StaticKey<false>;
/// A key that starts enabled.
pub type StaticTrueKey = StaticKey<true>;

/// Why a key could not be changed. Nothing was written.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// A record's jump target is outside the image's text.
    BadRecord {
        /// The site.
        site: usize,
    },
    /// The plan was refused (a site holds unexpected bytes) or the poke
    /// failed.
    Plan(PlanError),
    /// The current program's sites or poke are unavailable.
    Unavailable(&'static str),
    /// `disable` of a key more than one `inc` holds: `dec` each instead.
    Held {
        /// The reference count.
        count: usize,
    },
    /// `dec` of a key that is not enabled.
    NotHeld,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadRecord { site } => {
                write!(
                    f,
                    "static key site {site:#x}: jump target outside the image's text; nothing written"
                )
            }
            Error::Plan(e) => fmt::Display::fmt(e, f),
            Error::Unavailable(why) => f.write_str(why),
            Error::Held { count } => write!(
                f,
                "static key held by {count} increments: disabling it would drop the others' \
                 holds; dec each instead (nothing written)"
            ),
            Error::NotHeld => {
                f.write_str("static key dec while it is disabled (no inc or enable to undo)")
            }
        }
    }
}

impl Error {
    /// The address of the site the error is about, where it names one
    /// (see [`crate::Error::site`]).
    pub fn site(&self) -> Option<usize> {
        match self {
            Error::BadRecord { site } => Some(*site),
            Error::Plan(e) => e.site(),
            _ => None,
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            // Transparent (its message is the plan error's): the cause below.
            Error::Plan(e) => e.source(),
            _ => None,
        }
    }
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        Error::Plan(e)
    }
}

impl<const INITIAL: bool> StaticKey<INITIAL> {
    /// A key in its initial state.
    pub const fn new() -> Self {
        StaticKey {
            count: AtomicUsize::new(INITIAL as usize),
            busy: UpdateLock::new(),
        }
    }

    /// The state the sites were compiled in.
    pub const fn initial_enabled(&self) -> bool {
        INITIAL
    }

    /// Whether the key is enabled now (a load; the branch macros do not
    /// read it).
    pub fn is_enabled(&self) -> bool {
        self.count.load(Ordering::Acquire) != 0
    }

    /// The key's address, as recorded at its sites.
    pub fn addr(&self) -> usize {
        self as *const Self as usize
    }

    /// Sets the key and brings its sites in `image` (found through
    /// `index`, built once per image) to that state in one batch through
    /// `poke`. Linux's `static_key_enable`/`_disable` semantics: enabling
    /// an enabled key keeps its count; disabling sets the count to zero,
    /// and is refused ([`Error::Held`]) while more than one
    /// [`inc_with`](Self::inc_with) holds it. Sites already in the state
    /// are left alone, so calling it for an image loaded after the key
    /// changed (a module: Linux's `jump_label_add_module`) brings that
    /// image's sites up to date.
    ///
    /// ```
    /// use altpatch::static_key::{KeyIndex, StaticFalseKey};
    /// use altpatch::{Image, LinuxPoke, static_branch_unlikely};
    ///
    /// static VERBOSE: StaticFalseKey = StaticFalseKey::new();
    ///
    /// #[inline(never)]
    /// fn verbose() -> bool {
    ///     static_branch_unlikely!(VERBOSE)
    /// }
    ///
    /// let image = Image::current();
    /// let index = KeyIndex::new(&image); // once per image
    /// let mut poke = LinuxPoke::new().unwrap();
    /// assert!(!verbose());
    /// // SAFETY: in place, and no other thread runs the key's sites.
    /// unsafe { VERBOSE.set_with(true, &image, &index, &mut poke) }.unwrap();
    /// assert!(verbose() && VERBOSE.is_enabled());
    /// ```
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`] with `poke`: if other threads may be running
    /// the sites, `poke` must implement a protocol for that (such as
    /// [`Publish::Live`](crate::os::linux::Publish::Live) or
    /// [`Int3Poke`](crate::poke::live::Int3Poke)); each site is a single
    /// instruction either way.
    pub unsafe fn set_with<P: TextPoke + ?Sized>(
        &self,
        enabled: bool,
        image: &Image<'_>,
        index: &KeyIndex,
        poke: &mut P,
    ) -> Result<ApplyReport, Error> {
        let _busy = self.busy.lock();
        // SAFETY: forwarded.
        unsafe { self.set_locked(enabled, image, index, poke) }
    }

    /// # Safety
    ///
    /// As for `set_with`; the caller holds `busy`.
    pub(crate) unsafe fn set_locked<P: TextPoke + ?Sized>(
        &self,
        enabled: bool,
        image: &Image<'_>,
        index: &KeyIndex,
        poke: &mut P,
    ) -> Result<ApplyReport, Error> {
        let count = self.count_for(enabled)?;
        // SAFETY: forwarded.
        unsafe { self.move_locked(count, true, image, index, poke) }
    }

    /// The count `enabled` moves the key to (Linux's enable/disable rules).
    pub(crate) fn count_for(&self, enabled: bool) -> Result<usize, Error> {
        match (enabled, self.count.load(Ordering::Relaxed)) {
            (true, 0) => Ok(1),
            (true, n) => Ok(n),
            (false, 0 | 1) => Ok(0),
            (false, count) => Err(Error::Held { count }),
        }
    }

    /// Brings the sites in `image` to the state of `count` if `sync`, then
    /// stores the count (after the sites, so a reader that sees the state
    /// sees it written).
    ///
    /// # Safety
    ///
    /// As for `set_with`; the caller holds `busy`.
    pub(crate) unsafe fn move_locked<P: TextPoke + ?Sized>(
        &self,
        count: usize,
        sync: bool,
        image: &Image<'_>,
        index: &KeyIndex,
        poke: &mut P,
    ) -> Result<ApplyReport, Error> {
        let r = if sync {
            // SAFETY: forwarded.
            unsafe { self.sync_locked(count != 0, image, index, poke) }?
        } else {
            ApplyReport::default()
        };
        self.count.store(count, Ordering::Release);
        Ok(r)
    }

    /// Brings this key's sites in `image` to the key's current state (for
    /// an image loaded after the key changed; a no-op for sites already
    /// in it).
    ///
    /// # Safety
    ///
    /// As for [`set_with`](Self::set_with).
    pub unsafe fn sync_with<P: TextPoke + ?Sized>(
        &self,
        image: &Image<'_>,
        index: &KeyIndex,
        poke: &mut P,
    ) -> Result<ApplyReport, Error> {
        let _busy = self.busy.lock();
        // SAFETY: forwarded.
        unsafe { self.sync_locked(self.is_enabled(), image, index, poke) }
    }

    /// Writes `enabled`'s form at every site of the key in `image` that is
    /// not in it yet.
    ///
    /// # Safety
    ///
    /// As for `set_with`; the caller holds `busy`.
    unsafe fn sync_locked<P: TextPoke + ?Sized>(
        &self,
        enabled: bool,
        image: &Image<'_>,
        index: &KeyIndex,
        poke: &mut P,
    ) -> Result<ApplyReport, Error> {
        let mut plan = Plan::for_image(image);
        self.plan_sync(enabled, image, index, &mut plan)?;
        // SAFETY: forwarded from our caller.
        Ok(unsafe { plan.apply(poke) }?)
    }

    /// Pushes onto `plan` the edits that bring this key's sites in `image`
    /// to `enabled`'s form (each expects the other form: validation finds a
    /// site already in this one done). The caller holds the key's lock.
    pub(crate) fn plan_sync(
        &self,
        enabled: bool,
        image: &Image<'_>,
        index: &KeyIndex,
        plan: &mut Plan,
    ) -> Result<(), Error> {
        plan.reserve(index.count(self.addr()));
        for rec in index.records_of(image, self.addr()) {
            // Sites outside the text are refused by validation, by name; a
            // jump target outside it would send the branch anywhere.
            let (site, target) = (rec.site(), rec.target());
            if !image.contains_text(target, 0) {
                return Err(Error::BadRecord { site });
            }
            // A site jumps when the key differs from what it falls through
            // to.
            let edit = if enabled == rec.likely() {
                Edit::new(site, Expect::Jmp(target), arch::BRANCH_NOP)
            } else {
                Edit::jmp(site, Expect::Nop, target)
            };
            plan.push(edit);
        }
        Ok(())
    }

    /// The count (the patcher checks it did not change since planning).
    pub(crate) fn count_cell(&self) -> &AtomicUsize {
        &self.count
    }

    /// Serializes changes of this key (see [`crate::sync`]).
    pub(crate) fn lock(&self) -> crate::sync::UpdateGuard<'_> {
        self.busy.lock()
    }

    /// Reference-counted enable (Linux's `static_key_slow_inc`): the key is
    /// enabled while the count is positive; [`set_with`](Self::set_with)
    /// enabling counts as one. Through `set_with`'s parameters.
    ///
    /// # Safety
    ///
    /// As for [`set_with`](Self::set_with).
    pub unsafe fn inc_with<P: TextPoke + ?Sized>(
        &self,
        image: &Image<'_>,
        index: &KeyIndex,
        poke: &mut P,
    ) -> Result<ApplyReport, Error> {
        let _busy = self.busy.lock();
        let n = self.count.load(Ordering::Relaxed);
        // SAFETY: forwarded.
        unsafe { self.move_locked(n + 1, n == 0, image, index, poke) }
    }

    /// Reference-counted disable (`static_key_slow_dec`): disables the key
    /// when the count drops to zero. A `dec` of a disabled key is refused
    /// ([`Error::NotHeld`]).
    ///
    /// # Safety
    ///
    /// As for [`set_with`](Self::set_with).
    pub unsafe fn dec_with<P: TextPoke + ?Sized>(
        &self,
        image: &Image<'_>,
        index: &KeyIndex,
        poke: &mut P,
    ) -> Result<ApplyReport, Error> {
        let _busy = self.busy.lock();
        let n = self.count.load(Ordering::Relaxed);
        if n == 0 {
            return Err(Error::NotHeld);
        }
        // SAFETY: forwarded.
        unsafe { self.move_locked(n - 1, n == 1, image, index, poke) }
    }

    /// The reference count: 0 when disabled; `enable` counts as one.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl<const INITIAL: bool> Default for StaticKey<INITIAL> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const INITIAL: bool> fmt::Debug for StaticKey<INITIAL> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKey")
            .field("enabled", &self.is_enabled())
            .field("initial", &INITIAL)
            .field("count", &self.count())
            .finish()
    }
}

/// Internal: the `asm!` goto of a branch site. `$likely` marks a
/// `static_branch_likely!` site; `$fall` is the value falling through means.
/// The site starts as a `jmp` when the key's initial state is not what
/// falling through means.
#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch {
    ($key:path, $likely:literal, $fall:literal) => {{
        #[inline(always)]
        fn __altpatch_static_branch() -> bool {
            // SAFETY: the asm is a NOP or a jmp to the label (the arch's branch site)
            // plus a record in a data section; it touches no register,
            // memory or flag. The label block only returns. The first form
            // is chosen by the assembler from the key's type, so one site
            // is emitted whatever the optimization level.
            unsafe {
                ::core::arch::asm!(
                    "8720:",
                    $crate::__altpatch_branch_site!(),
                    $crate::__altpatch_push_section!(key),
                    ".long 8720b - .",
                    ".long {target} - .",
                    ".long {key} + {likely} - .",
                    ".popsection",
                    key = sym $key,
                    likely = const $likely as u8,
                    jump = const { ($key.initial_enabled() != $likely) as u8 },
                    target = label { return !$fall; },
                    options(nostack, preserves_flags)
                );
            }
            $fall
        }
        __altpatch_static_branch()
    }};
}

/// `true` when the static key `KEY` is enabled, at the cost of a 5-byte NOP
/// while it is *disabled* (the common case this form is for).
///
/// `KEY` is the path of a `static` [`StaticKey`]. Expands to an inlined
/// asm goto whose site [`StaticKey::enable`] turns into a `jmp` to the
/// `true` path.
///
/// ```
/// use altpatch::{static_branch_unlikely, static_key::StaticFalseKey};
/// static DEBUG: StaticFalseKey = StaticFalseKey::new();
/// assert!(!static_branch_unlikely!(DEBUG));
/// ```
#[macro_export]
macro_rules! static_branch_unlikely {
    ($key:path) => {
        $crate::__static_branch!($key, false, false)
    };
}

/// `true` when the static key `KEY` is enabled, at the cost of a 5-byte NOP
/// while it is *enabled*.
///
/// ```
/// use altpatch::{static_branch_likely, static_key::StaticTrueKey};
/// static FAST_PATH: StaticTrueKey = StaticTrueKey::new();
/// assert!(static_branch_likely!(FAST_PATH));
/// ```
#[macro_export]
macro_rules! static_branch_likely {
    ($key:path) => {
        $crate::__static_branch!($key, true, true)
    };
}
