//! Calls that record themselves: `call <stub>` assembled by the caller,
//! with a record of where, for the functions `ifunc!` and `static_call!`
//! declare.
//!
//! Those functions are `#[inline(always)]`, so their body lands in every
//! caller, in whatever crate. Left to rustc, a caller in another crate (or
//! another codegen unit) reaches the stub or trampoline through the GOT:
//! the load hoisted out of a loop, then `call *%reg`, a site no relocation
//! survives to name. So where the C ABI passes every argument and the
//! result in registers (`recorded_abi.rs`: integers, pointers, references,
//! slices, `&str`, `u128` and pairs in at most six general-purpose
//! registers; up to four `f32`/`f64` in `xmm0`–`xmm3`; a result in
//! `rax`/`rdx` or `xmm0`), the body is an `asm!` block instead: `call <stub>`, assembled as a direct `call
//! rel32`, and a [`CallRecord`](crate::records::CallRecord) of its address
//! and the stub's in this copy's `call` section. Whoever rewrites the call
//! (an ifunc at load, a static call's update) first compares its 5 bytes
//! with the `call` the record promises: the record names an instruction
//! boundary the assembler made, so nothing is decoded and nothing is
//! guessed.
//!
//! Other signatures (more than six general-purpose registers' worth, more
//! than four floats, aggregates the ABI passes in memory) keep rustc's own
//! call, chosen at compile time by autoref specialization ([`Recorded`] is
//! tried before [`Plain`]).

#[cfg(feature = "std")]
use {
    crate::arch::BranchKind,
    crate::sites::{Site, SiteKind},
    alloc::vec::Vec,
};

/// The recorded call (see the module docs).
#[doc(hidden)]
pub trait Recorded<A, R> {
    /// Calls the stub through a recorded `call rel32`.
    fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R;
}

/// rustc's own call, for signatures [`Recorded`] cannot pass.
#[doc(hidden)]
pub trait Plain<A, R> {
    /// Calls `plain(args)`: the stub, as rustc calls a function.
    fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R;
}

/// What a probe stands for: the declared item `T`, called with `A`,
/// giving `R`.
#[doc(hidden)]
pub type Signature<T, A, R> = (fn(A) -> R, T);

/// Defines the probe type `$probe<T, A, R>` of items implementing
/// `$stub_trait` (whose `$method` is the stub) and its [`Recorded`] and
/// [`Plain`] calls.
macro_rules! recorded_probe {
    ($(#[$doc:meta])* $probe:ident, $stub_trait:ident, $method:ident) => {
        $(#[$doc])*
        #[doc(hidden)]
        pub struct $probe<T, A, R>(core::marker::PhantomData<$crate::static_call::__Signature<T, A, R>>);

        impl<T, A, R> $probe<T, A, R> {
            /// The probe (a value to call through).
            pub const NEW: Self = $probe(core::marker::PhantomData);
        }

        impl<T, A, R> $crate::static_call::__Plain<A, R> for $probe<T, A, R> {
            #[inline(always)]
            fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R {
                plain(args)
            }
        }

        impl<T, A, R> $crate::static_call::__Recorded<A, R> for &$probe<T, A, R>
        where
            T: $stub_trait,
            A: $crate::static_call::__RecordedArgs,
            R: $crate::static_call::__RecordedRet,
        {
            #[inline(always)]
            fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R {
                // In registers where the C ABI passes them all (the
                // architecture's `recorded_call!`), else rustc's call.
                $crate::arch::recorded_call!([<T as $stub_trait>::$method] args A R, plain)
            }
        }
    };
}

pub(crate) use recorded_probe;

/// What `static_call!` implements for the type it declares (not a public
/// interface): its trampoline, where a generic `asm!` can name it.
///
/// # Safety
///
/// `__altpatch_sc_tramp` is the static call's trampoline: a function of
/// the C ABI whose real signature is the declared one (the `A` and `R` of
/// every [`Probe`] naming this type).
#[doc(hidden)]
pub unsafe trait TrampolineStub {
    /// The trampoline.
    extern "C" fn __altpatch_sc_tramp();
}

recorded_probe!(
    /// The call of the static call `T` taking the tuple `A`, returning `R`:
    /// `(&&Probe::<T, A, R>::NEW).call(args, plain)` picks [`Recorded`]
    /// where the signature allows it, [`Plain`] (which calls
    /// `plain(args)`) otherwise.
    Probe,
    TrampolineStub,
    __altpatch_sc_tramp
);

/// Every recorded call in the object this copy of altpatch is linked
/// into, as a 5-byte `call` site of `kind` whose target is the stub or
/// trampoline it was assembled to call (a caller keeps those of its
/// mechanism's stubs).
#[cfg(feature = "std")]
fn recorded_sites(kind: SiteKind) -> impl Iterator<Item = Site> {
    crate::records::current_calls().iter().map(move |r| Site {
        addr: r.site(),
        len: crate::arch::BRANCH_LEN as u8,
        form: BranchKind::Call,
        kind,
        target: r.stub(),
    })
}

/// `sites` and, after them, every recorded call (as [`recorded_sites`])
/// that `sites` does not list: the sites an update rewrites, in a program
/// linked with relocations or without.
#[cfg(feature = "std")]
pub(crate) fn with_recorded(sites: &[Site], kind: SiteKind) -> Vec<Site> {
    let mut all = sites.to_vec();
    let mut listed: Vec<usize> = sites.iter().map(|s| s.addr).collect();
    crate::poke::sort_by_key(&mut listed, |&a| a);
    all.extend(recorded_sites(kind).filter(|s| listed.binary_search(&s.addr).is_err()));
    all
}

/// The sites of the recorded calls of the stub or trampoline at `stub` in
/// the object this copy of altpatch is linked into.
pub(crate) fn calls_of(stub: usize) -> alloc::vec::Vec<usize> {
    crate::records::current_calls()
        .iter()
        .filter(|r| r.stub() == stub)
        .map(|r| r.site())
        .collect()
}
