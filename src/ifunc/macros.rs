//! `ifunc!`: the typed function, its stub (a static-call trampoline), the
//! lazy path and the record that lets `apply` find the [`Ifunc`](super::Ifunc).

/// Declares an ifunc: a function with several implementations, one chosen
/// once by a resolver that receives the CPU feature snapshot.
///
/// ```text
/// ifunc! {
///     [attributes] [pub] fn NAME(ARG: TYPE, ...) [-> RET] = RESOLVER;
/// }
/// ```
///
/// `RESOLVER` is a `fn(&altpatch::cpu::Features) -> extern "C" fn(TYPE, ...)
/// -> RET` (type-checked). Generates `fn NAME(...)` (inlined into callers as
/// a direct `call` to the stub `NAME::__altpatch_ifunc_stub`) and `mod NAME`
/// with `KEY` (the [`Ifunc`](crate::ifunc::Ifunc)), `resolved()` and `resolve_with(&features)`.
/// Call sites come from the program's relocations (link with
/// `-Wl,--emit-relocs`) or its embedded site table: a relocation against a
/// symbol whose name contains `__altpatch_ifunc` is an ifunc site. See the
/// [module docs](mod@crate::ifunc) for an example.
///
/// ```
/// use altpatch::cpu::{Feature, Features};
/// altpatch::ifunc! {
///     fn log(code: u32) = pick_log;
/// }
/// extern "C" fn log_quiet(_code: u32) {}
/// fn pick_log(_: &Features) -> extern "C" fn(u32) { log_quiet }
///
/// fn main() {
///     log(7); // resolves on first call
///     assert_eq!(log::resolved().map(|f| f as usize), Some(log_quiet as usize));
/// }
/// ```
///
/// Declare ifuncs at module level: the generated module refers to the
/// resolver through `super::`, which cannot see items local to a function.
///
/// The generated stub and lazy path add no lint of their own to the
/// user's code, whatever the argument types (the user's own `extern "C"`
/// definitions and function-pointer types are the user's to allow):
///
/// ```
/// #![deny(warnings)]
/// use altpatch::cpu::Features;
/// #[allow(improper_ctypes_definitions)]
/// extern "C" fn count(s: &str) -> usize {
///     s.len()
/// }
/// #[allow(improper_ctypes_definitions)]
/// fn pick(_: &Features) -> extern "C" fn(&str) -> usize {
///     count
/// }
/// altpatch::ifunc! {
///     fn measure(s: &str) -> usize = pick;
/// }
/// fn main() {
///     assert_eq!(measure("four"), 4);
/// }
/// ```
#[macro_export]
macro_rules! ifunc {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $resolver:path;) => {
        $crate::__ifunc!($(#[$m])* $vis fn $name($($arg: $ty),*) -> $ret = $resolver);
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $resolver:path;) => {
        $crate::__ifunc!($(#[$m])* $vis fn $name($($arg: $ty),*) -> () = $resolver);
    };
}

/// Internal: the body of [`ifunc!`](macro@crate::ifunc).
#[doc(hidden)]
#[macro_export]
macro_rules! __ifunc {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $resolver:path) => {
        $(#[$m])*
        #[inline(always)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            $name::__altpatch_ifunc_stub($($arg),*)
        }

        #[doc = concat!("Resolution and state of the ifunc [`", stringify!($name), "`].")]
        #[allow(non_snake_case)]
        $vis mod $name {
            #[allow(unused_imports)]
            use super::*;

            /// The stub: a static-call trampoline (`jmp rel32` + `0f b9
            /// cc`), jumping to the lazy resolver until applied. Naked, so
            /// callers reach it with a direct `call`.
            // The signature is the user's (see `static_call!`).
            #[allow(improper_ctypes_definitions)]
            #[unsafe(naked)]
            #[unsafe(link_section = ".text.altpatch_ifunc")]
            pub extern "C" fn __altpatch_ifunc_stub($($arg: $ty),*) -> $ret {
                ::core::arch::naked_asm!(
                    $crate::__altpatch_trampoline_body!(),
                    target = sym __lazy,
                )
            }

            /// Until the stub is rewritten: resolve once, then call.
            #[allow(improper_ctypes_definitions)]
            extern "C" fn __lazy($($arg: $ty),*) -> $ret {
                // SAFETY: the resolver's result has exactly this type (it
                // is type-checked in `__resolve`).
                let f: extern "C" fn($($ty),*) -> $ret =
                    unsafe { ::core::mem::transmute::<usize, extern "C" fn($($ty),*) -> $ret>(KEY.lazy_target()) };
                f($($arg),*)
            }

            fn __resolve(features: &$crate::cpu::Features) -> usize {
                let f: extern "C" fn($($ty),*) -> $ret = $resolver(features);
                f as *const () as usize
            }

            fn __stub_addr() -> usize {
                __altpatch_ifunc_stub as *const () as usize
            }

            fn __lazy_addr() -> usize {
                __lazy as *const () as usize
            }

            /// The state of this ifunc.
            pub static KEY: $crate::ifunc::Ifunc =
                $crate::ifunc::Ifunc::new(stringify!($name), __stub_addr, __lazy_addr, __resolve);

            // The record that lets `ifunc::apply` find KEY.
            ::core::arch::global_asm!(
                $crate::__altpatch_push_section!(ifunc),
                ".long {key} - .",
                ".popsection",
                key = sym KEY,
            );

            /// The implementation chosen, once resolved.
            pub fn resolved() -> Option<extern "C" fn($($ty),*) -> $ret> {
                // SAFETY: only resolver results of exactly this type are
                // stored.
                KEY.resolved().map(|a| unsafe { ::core::mem::transmute::<usize, extern "C" fn($($ty),*) -> $ret>(a) })
            }

            /// Resolves with `features` if not resolved yet (the resolver
            /// runs once per program); returns the implementation.
            pub fn resolve_with(features: &$crate::cpu::Features) -> extern "C" fn($($ty),*) -> $ret {
                let a = KEY.resolve(features);
                // SAFETY: as above.
                unsafe { ::core::mem::transmute::<usize, extern "C" fn($($ty),*) -> $ret>(a) }
            }
        }
    };
}
