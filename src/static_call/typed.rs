//! The typed face of a static call: [`StaticCall<F>`], generic over the
//! function-pointer type of its declared signature, so targets go in and
//! come out as functions, never as addresses.

use core::fmt;
use core::marker::PhantomData;
use core::mem::{size_of, transmute_copy};

use super::{Error, RawStaticCall, Report};
use crate::image::Image;
use crate::poke::TextPoke;
use crate::sites::Site;

/// The state behind one [`static_call!`](macro@crate::static_call): its
/// trampoline and its current target, of type `F` (the declared
/// signature as an `extern "C" fn` pointer type; Rust functions get there
/// through a C-ABI shim, see the macro's `c_fn`).
///
/// The macro declares one and gives it out as `NAME::static_call()`.
///
/// ```
/// extern "C" fn double(x: u64) -> u64 {
///     x * 2
/// }
/// extern "C" fn triple(x: u64) -> u64 {
///     x * 3
/// }
/// altpatch::static_call! {
///     fn scale(x: u64) -> u64 = double;
/// }
///
/// fn main() {
///     let call = scale::static_call();
///     assert_eq!(call.name(), "scale");
///     let image = altpatch::Image::current();
///     let mut poke = altpatch::LinuxPoke::new().unwrap();
///     // The trampoline only (no call sites passed: a kernel passes its
///     // embedded site table). SAFETY: in place; no other thread calls it.
///     let r = unsafe { call.update_with(triple, &image, &[], &mut poke) }.unwrap();
///     assert!(r.trampoline);
///     assert_eq!(scale(5), 15);
///     // The target comes back typed: callable, no address in sight.
///     assert_eq!(call.target().map(|f| f(2)), Some(6));
/// }
/// ```
pub struct StaticCall<F> {
    raw: RawStaticCall,
    _target: PhantomData<F>,
}

impl<F: Copy + 'static> StaticCall<F> {
    /// Used by [`static_call!`](macro@crate::static_call).
    ///
    /// # Safety
    ///
    /// `F` is a function-pointer type (the trampoline's signature);
    /// `trampoline` returns the trampoline's address and `default` the
    /// address of a function of type `F`.
    #[doc(hidden)]
    pub const unsafe fn new(
        name: &'static str,
        trampoline: fn() -> usize,
        default: fn() -> usize,
        returns_unit: bool,
    ) -> StaticCall<F> {
        const {
            assert!(
                size_of::<F>() == size_of::<usize>(),
                "F must be a function pointer"
            )
        };
        StaticCall {
            raw: RawStaticCall::new(name, trampoline, default, returns_unit),
            _target: PhantomData,
        }
    }

    /// The declared name.
    pub fn name(&self) -> &'static str {
        self.raw.name()
    }

    /// The trampoline's address: its `endbr64`, so the address may be
    /// called indirectly under CET; the `jmp` an update rewrites is at
    /// [`TRAMPOLINE_JMP`](super::TRAMPOLINE_JMP) past it.
    pub fn trampoline(&self) -> usize {
        self.raw.trampoline()
    }

    /// The calls of this static call its function recorded in the object
    /// this copy of altpatch is linked into (every caller, in any crate,
    /// whose arguments and result the C ABI passes in integer registers;
    /// see [`static_call!`](macro@crate::static_call)). An update rewrites
    /// each to `call <target>`, as it rewrites the sites relocations list.
    ///
    /// ```
    /// altpatch::static_call! {
    ///     fn twice(x: u64) -> u64 = double;
    /// }
    /// fn double(x: u64) -> u64 { 2 * x }
    /// fn main() {
    ///     assert_eq!(twice(21), 42);
    ///     assert!(!twice::static_call().recorded_calls().is_empty());
    /// }
    /// ```
    pub fn recorded_calls(&self) -> alloc::vec::Vec<usize> {
        super::calls_of(self.trampoline())
    }

    /// The function calls go to now; `None` after `set_none`.
    pub fn target(&self) -> Option<F> {
        // SAFETY: the raw state only ever holds the default's address (of
        // type `F`, by `new`'s contract) or addresses that came in as `F`.
        self.raw.target().map(|a| unsafe { fn_at::<F>(a) })
    }

    /// The address calls go to now; `None` after `set_none`.
    pub fn target_addr(&self) -> Option<usize> {
        self.raw.target()
    }

    /// Whether the target can be set to none (the function returns `()`).
    pub fn allows_none(&self) -> bool {
        self.raw.allows_none()
    }

    /// Points every call at `f`, through `poke`: the trampoline and every
    /// call site in `sites` that calls this trampoline (others are
    /// ignored), in one validated batch. See the type's example.
    ///
    /// # Safety
    ///
    /// As for [`Plan::apply`](crate::Plan::apply) with `poke`: if other
    /// threads may be running the trampoline or sites, `poke` must
    /// implement a protocol for that (each edit is a single instruction).
    pub unsafe fn update_with<P: TextPoke + ?Sized>(
        &self,
        f: F,
        image: &Image<'_>,
        sites: &[Site],
        poke: &mut P,
    ) -> Result<Report, Error> {
        // SAFETY: `f` has the declared type; the rest is the caller's.
        unsafe { self.raw.update_with(Some(addr_of(f)), image, sites, poke) }
    }

    /// Makes every call a no-op, through `poke` (functions returning `()`
    /// only: otherwise [`Error::NoneNotAllowed`]).
    ///
    /// # Safety
    ///
    /// As for [`update_with`](Self::update_with).
    pub unsafe fn set_none_with<P: TextPoke + ?Sized>(
        &self,
        image: &Image<'_>,
        sites: &[Site],
        poke: &mut P,
    ) -> Result<Report, Error> {
        // SAFETY: none is checked against the signature; the rest is the
        // caller's.
        unsafe { self.raw.update_with(None, image, sites, poke) }
    }
}

impl<F: Copy + 'static> StaticCall<F> {
    /// The untyped state (the patcher plans through it).
    pub(crate) fn raw(&self) -> &RawStaticCall {
        &self.raw
    }
}

impl<F> fmt::Debug for StaticCall<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.raw, f)
    }
}

/// The address of a function pointer of a [`StaticCall`]'s type.
pub(crate) fn addr_of<F: Copy>(f: F) -> usize {
    const { assert!(size_of::<F>() == size_of::<usize>()) };
    // SAFETY: `F` is a function pointer (`StaticCall::new`'s contract), the
    // size of an address: its bits are the address.
    unsafe { transmute_copy::<F, usize>(&f) }
}

/// The function of type `F` at `addr`. The one place an address becomes a
/// typed function, for the macros' generated code as well (`ifunc!`).
///
/// # Safety
///
/// `F` is a function-pointer type and `addr` the address of a function of
/// exactly that type.
#[doc(hidden)]
pub unsafe fn fn_at<F: Copy>(addr: usize) -> F {
    const {
        assert!(
            size_of::<F>() == size_of::<usize>(),
            "F must be a function pointer"
        )
    };
    // SAFETY: the caller's contract; same size, checked above.
    unsafe { transmute_copy::<usize, F>(&addr) }
}

/// A value of the zero-sized function type `G`, for a C-ABI shim that
/// calls a Rust function item (or a closure capturing nothing) it has only
/// the type of. A compile-time error for a `G` with data (a function
/// pointer or a capturing closure: pass a function item instead).
///
/// # Safety
///
/// A value of `G` existed (the shim's maker was given one); `G: Copy`, so
/// another is as good as a copy of it.
#[doc(hidden)]
pub unsafe fn conjure_fn<G: Copy>() -> G {
    const {
        assert!(
            size_of::<G>() == 0,
            "a static-call or ifunc target given to `c_fn` must be a Rust function \
             item or a closure capturing nothing (not a function pointer)"
        )
    };
    // SAFETY: `G` is zero-sized, so it has no bytes (zeroed or not), and by
    // the caller's contract values of it may be made freely.
    unsafe { core::mem::zeroed::<G>() }
}
