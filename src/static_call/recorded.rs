//! Calls that record themselves: `call <stub>` assembled by the caller,
//! with a record of where, for the functions `ifunc!` and `static_call!`
//! declare.
//!
//! Those functions are `#[inline(always)]`, so their body lands in every
//! caller, in whatever crate. Left to rustc, a caller in another crate (or
//! another codegen unit) reaches the stub or trampoline through the GOT:
//! the load hoisted out of a loop, then `call *%reg`, a site no relocation
//! survives to name. So where the C ABI passes every argument and the
//! result in the integer registers (`CallArgs`/`CallRet`: integers,
//! pointers, references, slices, `&str`, `u128`, pairs), the body is an
//! `asm!` block instead: `call <stub>`, assembled as a direct `call
//! rel32`, and a [`CallRecord`](crate::records::CallRecord) of its address
//! and the stub's in this copy's `call` section. Whoever rewrites the call
//! (an ifunc at load, a static call's update) first compares its 5 bytes
//! with the `call` the record promises: the record names an instruction
//! boundary the assembler made, so nothing is decoded and nothing is
//! guessed.
//!
//! Other signatures (a float argument or result, more than six registers'
//! worth) keep rustc's own call, chosen at compile time by autoref
//! specialization ([`Recorded`] is tried before [`Plain`]).

#[cfg(all(feature = "std", target_os = "linux"))]
use {
    crate::sites::{Site, SiteKind},
    crate::x86::BranchKind,
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

/// The `asm!` of a recorded call of `$stub` whose arguments take the
/// registers listed (in order): `call <stub>`, then its record. `rdx`
/// carries the third argument in, if there is one, and the result's
/// second word out.
macro_rules! recorded_asm {
    ([$($stub:tt)+] $regs:ident, [$($r:tt $i:tt),*]) => {
        $crate::static_call::recorded_asm!(@asm [$($stub)+] rdx [$(inout($r) $regs[$i] => _,)* lateout("rdx") rdx,])
    };
    ([$($stub:tt)+] $regs:ident, [$($r:tt $i:tt),*], rdx $k:tt) => {
        $crate::static_call::recorded_asm!(@asm [$($stub)+] rdx [$(inout($r) $regs[$i] => _,)* inout("rdx") $regs[$k] => rdx,])
    };
    (@asm [$($stub:tt)+] $rdx:ident [$($operands:tt)*]) => {{
        let rax: u64;
        let $rdx: u64;
        // SAFETY: the stub is a C-ABI function taking exactly these
        // registers' worth of arguments (`CallArgs` put each in the
        // registers the ABI gives it) and returning `R` in `rax`/`rdx`;
        // every caller-saved register is declared clobbered
        // (`clobber_abi`); without `nostack` the stack is aligned for a
        // call. The record only adds two offsets to a data section.
        unsafe {
            core::arch::asm!(
                "2:",
                "call {stub}",
                concat!(
                    ".pushsection ",
                    $crate::records::section_name!(call),
                    ",\"aR\",@progbits\n.balign 4"
                ),
                ".long 2b - .",
                ".long {stub} - .",
                ".popsection",
                stub = sym $($stub)+,
                $($operands)*
                lateout("rax") rax,
                clobber_abi("C"),
            )
        };
        (rax, $rdx)
    }};
}
pub(crate) use recorded_asm;

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
            A: $crate::alternative::CallArgs,
            R: $crate::alternative::CallRet,
        {
            #[inline(always)]
            fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R {
                use $crate::alternative::CallArgs;
                if <A as CallArgs>::WORDS > 6 {
                    return plain(args);
                }
                let regs = args.into_registers();
                // Exactly the registers the arguments take: no register
                // set to a value nobody reads (a constant match, folded at
                // compile time).
                let (rax, rdx) = match <A as CallArgs>::WORDS {
                    0 => $crate::static_call::recorded_asm!([<T as $stub_trait>::$method] regs, []),
                    1 => $crate::static_call::recorded_asm!([<T as $stub_trait>::$method] regs, ["rdi" 0]),
                    2 => $crate::static_call::recorded_asm!([<T as $stub_trait>::$method] regs, ["rdi" 0, "rsi" 1]),
                    3 => $crate::static_call::recorded_asm!(
                        [<T as $stub_trait>::$method] regs, ["rdi" 0, "rsi" 1], rdx 2
                    ),
                    4 => $crate::static_call::recorded_asm!(
                        [<T as $stub_trait>::$method] regs, ["rdi" 0, "rsi" 1, "rcx" 3], rdx 2
                    ),
                    5 => $crate::static_call::recorded_asm!(
                        [<T as $stub_trait>::$method] regs, ["rdi" 0, "rsi" 1, "rcx" 3, "r8" 4], rdx 2
                    ),
                    _ => $crate::static_call::recorded_asm!(
                        [<T as $stub_trait>::$method] regs,
                        ["rdi" 0, "rsi" 1, "rcx" 3, "r8" 4, "r9" 5], rdx 2
                    ),
                };
                // SAFETY: the registers a function returning `R` left.
                unsafe { $crate::alternative::__call_result::<R>(rax, rdx) }
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
#[cfg(all(feature = "std", target_os = "linux"))]
fn recorded_sites(kind: SiteKind) -> impl Iterator<Item = Site> {
    crate::records::current_calls().iter().map(move |r| Site {
        addr: r.site(),
        len: 5,
        form: BranchKind::Call,
        kind,
        target: r.stub(),
    })
}

/// `sites` and, after them, every recorded call (as [`recorded_sites`])
/// that `sites` does not list: the sites an update rewrites, in a program
/// linked with relocations or without.
#[cfg(all(feature = "std", target_os = "linux"))]
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
