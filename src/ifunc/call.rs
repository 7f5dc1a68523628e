//! The calls `ifunc!`'s function records in its callers (see
//! `static_call::recorded`, which makes them for static calls too), and
//! what patching at load and `init` do with them.

use crate::static_call::recorded_probe;

/// What `ifunc!` implements for the type it declares (not a public
/// interface): its stub, where a generic `asm!` can name it.
///
/// # Safety
///
/// `__altpatch_ifunc_stub` is the ifunc's stub: a function of the C ABI
/// whose real signature is the ifunc's (the `A` and `R` of every
/// [`Probe`] naming this type).
#[doc(hidden)]
pub unsafe trait IfuncStub {
    /// The stub.
    extern "C" fn __altpatch_ifunc_stub();
}

recorded_probe!(
    /// The call of the ifunc `T` taking the tuple `A`, returning `R`:
    /// `(&&Probe::<T, A, R>::NEW).call(args, plain)` picks the recorded
    /// call where the signature allows it, `plain(args)` otherwise.
    Probe,
    IfuncStub,
    __altpatch_ifunc_stub
);

impl super::Ifunc {
    /// The calls of this ifunc its function recorded in the object this
    /// copy of altpatch is linked into (see the [`ifunc!`] docs: every
    /// caller whose arguments and result the C ABI passes in integer
    /// registers). Patching at load rewrites each to `call <impl>`.
    ///
    /// ```
    /// altpatch::ifunc! {
    ///     fn twice(x: u64) -> u64 = |_| twice::c_fn(|x: u64| 2 * x);
    /// }
    /// fn main() {
    ///     assert_eq!(twice(21), 42);
    ///     assert!(!twice::ifunc().recorded_calls().is_empty());
    /// }
    /// ```
    ///
    /// [`ifunc!`]: macro@crate::ifunc
    pub fn recorded_calls(&self) -> alloc::vec::Vec<usize> {
        crate::static_call::calls_of(self.stub())
    }
}
