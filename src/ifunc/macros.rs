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
/// -> RET` (type-checked); it returns Rust implementations through
/// `NAME::c_fn(f)`, a C-ABI shim rustc compiles `f` into. Generates
/// `fn NAME(...)` (inlined into callers as a direct `call` to the stub)
/// and a type `NAME` (type namespace only) with `NAME::ifunc()` (the
/// [`Ifunc`](crate::ifunc::Ifunc)), `resolved()`, `resolve_with(&features)`
/// and `c_fn(f)`. Works at module level and in a function body.
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
/// Rust implementations, declared in a function body (a doctest's code is
/// one):
///
/// ```
/// use altpatch::cpu::{Feature, Features};
/// fn sum_portable(v: &[u64]) -> u64 {
///     v.iter().sum()
/// }
/// fn pick(f: &Features) -> extern "C" fn(&[u64]) -> u64 {
///     // Both arms may be Rust functions: each gets its C-ABI shim.
///     let _ = f.has(Feature::Avx2);
///     sum::c_fn(sum_portable)
/// }
/// altpatch::ifunc! {
///     fn sum(v: &[u64]) -> u64 = pick;
/// }
/// assert_eq!(sum(&[1, 2, 3]), 6);
/// assert!(sum::ifunc().is_applied() || sum::resolved().is_some());
/// ```
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
            <$name>::__altpatch_ifunc_stub($($arg),*)
        }

        #[doc = concat!("Resolution and state of the ifunc [`", stringify!($name), "()`].")]
        // Type namespace only, beside the function (see `static_call!`).
        #[allow(non_camel_case_types)]
        #[derive(Debug)]
        $vis struct $name {
            _private: (),
        }

        // In an anonymous const, as for `static_call!`: works in a
        // function body, nameable only through `$name`.
        const _: () = {
            // The signature is the user's (see `static_call!`).
            #[allow(improper_ctypes_definitions)]
            extern "C" fn __altpatch_lazy($($arg: $ty),*) -> $ret {
                // SAFETY: the lazy target is a resolver result, of exactly
                // this type (type-checked in `__altpatch_resolve`).
                let f = unsafe {
                    $crate::static_call::__fn_at::<extern "C" fn($($ty),*) -> $ret>(__ALTPATCH_STATE.lazy_target())
                };
                f($($arg),*)
            }

            fn __altpatch_resolve(features: &$crate::cpu::Features) -> usize {
                let f: extern "C" fn($($ty),*) -> $ret = $resolver(features);
                f as *const () as usize
            }

            fn __altpatch_stub_addr() -> usize {
                <$name>::__altpatch_ifunc_stub as *const () as usize
            }

            fn __altpatch_lazy_addr() -> usize {
                __altpatch_lazy as *const () as usize
            }

            // The stub emits the ifunc's record; keep it (and so the
            // record) even when nothing calls the ifunc, as the record of
            // an unused ifunc was kept before (its resolver still runs at
            // `init`).
            #[used]
            static __ALTPATCH_KEEP: extern "C" fn($($ty),*) -> $ret = <$name>::__altpatch_ifunc_stub;

            // Patching at load (`ifunc::startup`): the loader runs the
            // object's `.init_array` entries before `main`, or inside
            // `dlopen`. Every ifunc registers one; the first does the work.
            #[cfg(target_os = "linux")]
            #[used]
            #[unsafe(link_section = ".init_array")]
            static __ALTPATCH_AT_LOAD: extern "C" fn() = $crate::ifunc::__at_load;

            static __ALTPATCH_STATE: $crate::ifunc::Ifunc = $crate::ifunc::Ifunc::new(
                stringify!($name),
                __altpatch_stub_addr,
                __altpatch_lazy_addr,
                __altpatch_resolve,
            );

            #[allow(dead_code)]
            impl $name {
                /// The stub: a static-call trampoline to the lazy path,
                /// then to the resolved implementation. It also emits the
                /// record that lets `ifunc::apply` find the ifunc (`global_asm!`
                /// is not allowed in a function body; a naked function is).
                #[doc(hidden)]
                #[allow(improper_ctypes_definitions)]
                #[unsafe(naked)]
                #[unsafe(link_section = ".text.altpatch_ifunc")]
                pub extern "C" fn __altpatch_ifunc_stub($($arg: $ty),*) -> $ret {
                    ::core::arch::naked_asm!(
                        $crate::__altpatch_trampoline_body!(),
                        $crate::__altpatch_push_section!(ifunc),
                        ".long {state} - .",
                        ".popsection",
                        target = sym __altpatch_lazy,
                        state = sym __ALTPATCH_STATE,
                    )
                }

                /// The ifunc's state.
                pub fn ifunc() -> &'static $crate::ifunc::Ifunc {
                    &__ALTPATCH_STATE
                }

                /// The implementation chosen, once resolved.
                pub fn resolved() -> Option<extern "C" fn($($ty),*) -> $ret> {
                    // SAFETY: only resolver results, of exactly this type,
                    // are stored.
                    __ALTPATCH_STATE.resolved().map(|a| unsafe {
                        $crate::static_call::__fn_at::<extern "C" fn($($ty),*) -> $ret>(a)
                    })
                }

                /// Resolves with `features` (once; later calls return the
                /// first choice).
                pub fn resolve_with(features: &$crate::cpu::Features) -> extern "C" fn($($ty),*) -> $ret {
                    let a = __ALTPATCH_STATE.resolve(features);
                    // SAFETY: as above.
                    unsafe { $crate::static_call::__fn_at::<extern "C" fn($($ty),*) -> $ret>(a) }
                }

                $crate::__altpatch_c_fn!($($arg: $ty),* ; $ret);
            }
        };
    };
}
