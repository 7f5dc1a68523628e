//! `static_call!`: the typed function, its naked trampoline and the module
//! of update functions around a [`StaticCall`](super::StaticCall).

/// Declares a static call: a function whose calls go through a patchable
/// trampoline, and a module of the same name to update it.
///
/// ```text
/// static_call! {
///     [attributes] [pub] fn NAME(ARG: TYPE, ...) [-> RET] = DEFAULT;
/// }
/// ```
///
/// `DEFAULT` is any function of the declared signature: an `extern "C"`
/// function or a Rust one. The macro works at module level and inside a
/// function body (local types and functions in the signature are fine).
/// Generates:
///
/// * `fn NAME(...)`: inlined into callers as a direct `call` to the
///   trampoline (a naked `extern "C"` function);
/// * a type `NAME` (in the type namespace only, beside the function) whose
///   associated functions update and inspect it:
///   - `NAME::update(f)` (`std`: the running program, live) and
///     `NAME::update_with(f, image, sites, poke)`, for
///     `f: extern "C" fn(TYPE, ...) -> RET` (type-checked; calls then go
///     straight to `f`);
///   - `NAME::update_fn(f)` (`std`) for a Rust function item or a
///     closure capturing nothing, and `NAME::c_fn(f)`, the C-ABI shim it
///     uses (rustc compiles `f` into it);
///   - `NAME::c_fn_unchecked(f)` (`unsafe`), an `unsafe extern "C"`
///     function (a `#[target_feature]` one) as the safe pointer `update`
///     takes, with the caller vouching for the CPU (see below);
///   - `NAME::target()` (until the first update, the C-ABI shim of the
///     default, not the default's own address), and
///     `NAME::static_call()`: the typed
///     [`StaticCall`](crate::static_call::StaticCall) behind it all;
///   - for functions returning `()`, `NAME::set_none()` /
///     `NAME::set_none_with(...)`.
///
/// Inline call sites come from the program's relocations (link with
/// `-Wl,--emit-relocs`) or its embedded site table: a relocation against a
/// symbol whose name contains `__altpatch_sc_tramp` is a static-call site.
/// Without either, updates still work, through the trampoline.
///
/// ```
/// altpatch::static_call! {
///     fn notify(code: u32) = quiet;
/// }
/// extern "C" fn quiet(_code: u32) {}
///
/// fn main() {
///     notify(1);
///     notify::set_none().unwrap(); // calls become no-ops
///     notify(2);
/// }
/// ```
///
/// Rust functions, in a function body (a doctest's code is one):
///
/// ```
/// struct Point(u32, u32);
/// fn x(p: &Point) -> u32 {
///     p.0
/// }
/// fn y(p: &Point) -> u32 {
///     p.1
/// }
/// altpatch::static_call! {
///     fn coord(p: &Point) -> u32 = x;
/// }
/// assert_eq!(coord(&Point(3, 4)), 3);
/// coord::update_fn(y).unwrap();
/// assert_eq!(coord(&Point(3, 4)), 4);
/// coord::update_fn(|p: &Point| p.0 + p.1).unwrap();
/// assert_eq!(coord(&Point(3, 4)), 7);
/// ```
///
/// Any argument and result types work, two-register ones included
/// (`&[T]`, `&str`, `(u64, u64)`): rustc compiles the callers, the
/// trampoline's signature and the shims alike. With Rust functions
/// (`update_fn`, a Rust default) nothing in your code names an
/// `extern "C"` type such arguments would make rustc warn about
/// (`improper_ctypes_definitions`):
///
/// ```
/// #![deny(warnings)]
/// fn count(s: &str) -> usize {
///     s.len()
/// }
/// fn total(v: &[u64], range: (u64, u64)) -> u64 {
///     v.iter().filter(|&&x| (range.0..range.1).contains(&x)).sum()
/// }
/// altpatch::static_call! {
///     fn measure(s: &str) -> usize = count;
/// }
/// altpatch::static_call! {
///     fn sum_in(v: &[u64], range: (u64, u64)) -> u64 = total;
/// }
/// fn main() {
///     assert_eq!(measure("four"), 4);
///     assert_eq!(sum_in(&[1, 5, 9], (2, 10)), 14);
///     measure::update_fn(|s: &str| s.chars().count()).unwrap();
///     assert_eq!(measure("héllo"), 5);
/// }
/// ```
///
/// A `#[target_feature]` target is the caller's to vouch for, as an
/// ifunc's resolver does (see [`ifunc!`](macro@crate::ifunc),
/// "`#[target_feature]` implementations"): update to it only where the
/// CPU has its features, in an `unsafe` block that says how you know.
///
/// ```
/// #![deny(warnings)]
/// use altpatch::cpu::{Feature, Features};
///
/// extern "C" fn ones_portable(x: u64) -> u64 {
///     x.count_ones() as u64
/// }
/// #[target_feature(enable = "popcnt")]
/// extern "C" fn ones_popcnt(x: u64) -> u64 {
///     x.count_ones() as u64
/// }
/// #[target_feature(enable = "popcnt")]
/// fn ones_popcnt_rust(x: u64) -> u64 {
///     x.count_ones() as u64
/// }
/// altpatch::static_call! {
///     fn ones(x: u64) -> u64 = ones_portable;
/// }
/// fn main() {
///     let cpu = Features::detect();
///     if cpu.has(Feature::Popcnt) {
///         // SAFETY: this CPU has POPCNT, the one feature `ones_popcnt`
///         // enables.
///         ones::update(unsafe { ones::c_fn_unchecked(ones_popcnt) }).unwrap();
///         assert_eq!(ones(0b1011), 3);
///         // A Rust function goes through a closure.
///         // SAFETY: as above, for `ones_popcnt_rust`.
///         ones::update_fn(|x| unsafe { ones_popcnt_rust(x) }).unwrap();
///     }
///     assert_eq!(ones(0b1011), 3);
/// }
/// ```
#[macro_export]
macro_rules! static_call {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $default:path;) => {
        $crate::__static_call!($(#[$m])* $vis fn $name($($arg: $ty),*) -> $ret = $default; unit false);
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $default:path;) => {
        $crate::__static_call!($(#[$m])* $vis fn $name($($arg: $ty),*) -> () = $default; unit true);
    };
}

/// Internal: the body of [`static_call!`](macro@crate::static_call).
///
/// Everything but the function and its companion type lives in an
/// anonymous `const` block: nameable only through the type's associated
/// functions, and valid in a function body as well as a module (a `mod`
/// would be, but its `use super::*` misses a body's local items).
#[doc(hidden)]
#[macro_export]
macro_rules! __static_call {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $default:path; unit $unit:tt) => {
        $(#[$m])*
        #[inline(always)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[allow(unused_imports)]
            use $crate::static_call::{__Plain as _, __Recorded as _};
            // A recorded `call <trampoline>` where the C ABI passes
            // everything in integer registers, rustc's own call otherwise
            // (see `static_call::recorded`).
            (&&$crate::static_call::__Probe::<$name, ($($ty,)*), $ret>::NEW).call(
                ($($arg,)*),
                #[inline(always)]
                |($($arg,)*)| <$name>::__altpatch_typed_tramp()($($arg),*),
            )
        }

        #[doc = concat!("Updates and inspects the static call [`", stringify!($name), "()`].")]
        // A braced struct lives in the type namespace only, beside the
        // function of the same name in the value namespace.
        #[allow(non_camel_case_types)]
        #[derive(Debug)]
        $vis struct $name {
            _private: (),
        }

        const _: () = {
            // The default behind a C-ABI shim, so it may be any function of
            // the declared signature, Rust ABI or C. The signature is the
            // user's: whether its types suit C is not this shim's concern.
            #[allow(improper_ctypes_definitions)]
            extern "C" fn __altpatch_default($($arg: $ty),*) -> $ret {
                $default($($arg),*)
            }

            fn __altpatch_tramp_addr() -> usize {
                <$name as $crate::static_call::__TrampolineStub>::__altpatch_sc_tramp as *const () as usize
            }

            fn __altpatch_default_addr() -> usize {
                __altpatch_default as *const () as usize
            }

            static __ALTPATCH_STATE: $crate::static_call::StaticCall<extern "C" fn($($ty),*) -> $ret> =
                // SAFETY: the type is the trampoline's signature as a C-ABI
                // function pointer; the two functions give the trampoline's
                // address and the default shim's, of exactly that type.
                unsafe {
                    $crate::static_call::StaticCall::new(
                        stringify!($name),
                        __altpatch_tramp_addr,
                        __altpatch_default_addr,
                        $unit,
                    )
                };

            // SAFETY: the trampoline below is a C-ABI function of the
            // declared signature (it jumps to targets of that type only).
            unsafe impl $crate::static_call::__TrampolineStub for $name {
                /// The trampoline: `endbr64`, `jmp` to the current target,
                /// then the `0f b9 cc` signature. A naked function, so callers in the
                /// program reach it with a direct `call` (an `extern`
                /// declaration would be called through the GOT).
                #[unsafe(naked)]
                #[unsafe(link_section = ".text.altpatch_sc_tramp")]
                extern "C" fn __altpatch_sc_tramp() {
                    ::core::arch::naked_asm!(
                        $crate::__altpatch_trampoline_body!(),
                        target = sym __altpatch_default,
                    )
                }
            }

            #[allow(dead_code)]
            impl $name {
                /// The trampoline, as a function of the declared type.
                #[doc(hidden)]
                #[inline(always)]
                #[allow(improper_ctypes_definitions)]
                pub fn __altpatch_typed_tramp() -> extern "C" fn($($ty),*) -> $ret {
                    let tramp: extern "C" fn() =
                        <$name as $crate::static_call::__TrampolineStub>::__altpatch_sc_tramp;
                    // SAFETY: the trampoline's real signature is the
                    // declared one (see the impl above); a function pointer
                    // to a function pointer of the same size.
                    unsafe { ::core::mem::transmute::<extern "C" fn(), extern "C" fn($($ty),*) -> $ret>(tramp) }
                }

                /// The state of this static call.
                pub fn static_call()
                -> &'static $crate::static_call::StaticCall<extern "C" fn($($ty),*) -> $ret> {
                    &__ALTPATCH_STATE
                }

                /// The function calls go to now (`None` after `set_none`).
                pub fn target() -> Option<extern "C" fn($($ty),*) -> $ret> {
                    __ALTPATCH_STATE.target()
                }

                $crate::__altpatch_c_fn!($($arg: $ty),* ; $ret);

                /// Points every call at `f`, through `poke`: the trampoline
                /// and the call sites in `sites` (see
                /// [`StaticCall::update_with`]($crate::static_call::StaticCall::update_with)).
                ///
                /// # Safety
                ///
                /// As for [`Plan::apply`]($crate::Plan::apply) with `poke`.
                pub unsafe fn update_with<__AltpatchP: $crate::TextPoke + ?Sized>(
                    f: extern "C" fn($($ty),*) -> $ret,
                    image: &$crate::Image<'_>,
                    sites: &[$crate::sites::Site],
                    poke: &mut __AltpatchP,
                ) -> Result<$crate::static_call::Report, $crate::static_call::Error> {
                    // SAFETY: the caller's.
                    unsafe { __ALTPATCH_STATE.update_with(f, image, sites, poke) }
                }

                $crate::__static_call_std!($($ty),* ; $ret);
                $crate::__static_call_unit!($unit);
            }
        };
    };
}

/// Internal: the `std` update of the running program.
#[doc(hidden)]
#[macro_export]
#[cfg(feature = "std")]
macro_rules! __static_call_std {
    ($($ty:ty),* ; $ret:ty) => {
        /// Points every call at `f` in the running program: the trampoline
        /// and every call site its relocations (or embedded site table)
        /// list, in one batch published by page swap, safe while other
        /// threads call it. Calls then go straight to `f`.
        pub fn update(
            f: extern "C" fn($($ty),*) -> $ret,
        ) -> Result<$crate::static_call::Report, $crate::static_call::Error> {
            __ALTPATCH_STATE.update(f)
        }

        /// As [`update`](Self::update), for a Rust function item or a
        /// closure capturing nothing (through [`c_fn`](Self::c_fn)).
        pub fn update_fn<__AltpatchG>(
            f: __AltpatchG,
        ) -> Result<$crate::static_call::Report, $crate::static_call::Error>
        where
            __AltpatchG: Fn($($ty),*) -> $ret + Copy + 'static,
        {
            __ALTPATCH_STATE.update(Self::c_fn(f))
        }
    };
}

/// Internal: nothing without `std`.
#[doc(hidden)]
#[macro_export]
#[cfg(not(feature = "std"))]
macro_rules! __static_call_std {
    ($($ty:ty),* ; $ret:ty) => {};
}

/// Internal: `set_none` for functions returning `()`.
#[doc(hidden)]
#[macro_export]
macro_rules! __static_call_unit {
    (false) => {};
    (true) => {
        /// Makes every call a no-op, through `poke` (see `update_with`).
        ///
        /// # Safety
        ///
        /// As for [`Plan::apply`]($crate::Plan::apply) with `poke`.
        pub unsafe fn set_none_with<__AltpatchP: $crate::TextPoke + ?Sized>(
            image: &$crate::Image<'_>,
            sites: &[$crate::sites::Site],
            poke: &mut __AltpatchP,
        ) -> Result<$crate::static_call::Report, $crate::static_call::Error> {
            // SAFETY: the caller's.
            unsafe { __ALTPATCH_STATE.set_none_with(image, sites, poke) }
        }

        $crate::__static_call_unit_std!();
    };
}

/// Internal.
#[doc(hidden)]
#[macro_export]
#[cfg(feature = "std")]
macro_rules! __static_call_unit_std {
    () => {
        /// Makes every call a no-op in the running program, live.
        pub fn set_none() -> Result<$crate::static_call::Report, $crate::static_call::Error> {
            __ALTPATCH_STATE.set_none()
        }
    };
}

/// Internal.
#[doc(hidden)]
#[macro_export]
#[cfg(not(feature = "std"))]
macro_rules! __static_call_unit_std {
    () => {};
}

/// Internal: `NAME::c_fn` and `NAME::c_fn_unchecked`, shared by
/// `static_call!` and `ifunc!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_c_fn {
    ($($arg:ident: $ty:ty),* ; $ret:ty) => {
        /// A C-ABI function that calls `f`: a Rust function item or a
        /// closure capturing nothing, of the declared signature (an
        /// `extern "C"` function is one already: use it as it is). For
        /// `update_fn` and for ifunc resolvers to return. rustc compiles
        /// `f` into it, so a call through it costs what a call to `f`
        /// does. A panic in `f` aborts: it cannot unwind through the C ABI.
        ///
        /// A `#[target_feature]` function implements no `Fn` trait: wrap
        /// it in a closure whose `unsafe` block states why the CPU has
        /// the feature wherever the result is called, e.g.
        /// `c_fn(|v| unsafe { sum_avx2(v) })` in a resolver's
        /// `features.has(Feature::Avx2)` branch (see
        /// [`ifunc!`](macro@$crate::ifunc), "`#[target_feature]`
        /// implementations"). rustc cannot inline
        /// it into the shim (their features differ), so the shim ends in
        /// a `jmp` to it; [`c_fn_unchecked`](Self::c_fn_unchecked) on an
        /// `extern "C"` `#[target_feature]` function avoids that jump.
        pub fn c_fn<__AltpatchG>(f: __AltpatchG) -> extern "C" fn($($ty),*) -> $ret
        where
            __AltpatchG: Fn($($ty),*) -> $ret + Copy + 'static,
        {
            #[allow(improper_ctypes_definitions)]
            extern "C" fn shim<__AltpatchG: Fn($($ty),*) -> $ret + Copy>(
                $($arg: $ty),*
            ) -> $ret {
                // SAFETY: `c_fn` was given one, and it is `Copy`.
                let f: __AltpatchG =
                    unsafe { $crate::static_call::__conjure_fn::<__AltpatchG>() };
                f($($arg),*)
            }
            let _ = f;
            shim::<__AltpatchG>
        }

        /// `f`, an `unsafe extern "C"` function of the declared
        /// signature, as the safe function pointer resolvers return and
        /// `update` takes: calls then go straight to `f`, with no shim.
        /// Made for `#[target_feature(enable = "...")] extern "C" fn`s,
        /// which coerce only to `unsafe` function pointers, because
        /// calling one is safe only on a CPU with those features.
        ///
        /// # Safety
        ///
        /// Every call through the result must be a sound call of `f`,
        /// with any arguments of the declared types, for as long as `f`
        /// may be called through it (for an ifunc, the whole run of the
        /// program). For a `#[target_feature]` function: every CPU the
        /// program runs it on has each feature it enables, which a
        /// resolver knows by returning it only when
        /// [`Features::has`]($crate::cpu::Features::has) says so for
        /// each of them (the snapshot it is given is the CPU's, with
        /// additions it lacks refused). Removing a feature with `ALTPATCH`
        /// keeps a resolver from choosing it; adding one the CPU lacks is
        /// refused by the safe entry points. A feature the resolver did
        /// not check (`enable = "avx2,fma"` checked for AVX2 only) makes
        /// the call undefined behaviour on a CPU without it.
        #[allow(improper_ctypes_definitions)]
        pub unsafe fn c_fn_unchecked(
            f: unsafe extern "C" fn($($ty),*) -> $ret,
        ) -> extern "C" fn($($ty),*) -> $ret {
            // SAFETY: the two pointer types differ only in `unsafe`
            // (same ABI, arguments and result); calling the result
            // soundly is the caller's contract above.
            unsafe {
                ::core::mem::transmute::<
                    unsafe extern "C" fn($($ty),*) -> $ret,
                    extern "C" fn($($ty),*) -> $ret,
                >(f)
            }
        }
    };
}
