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
/// Generates:
///
/// * `fn NAME(...)`: inlined into callers as a direct `call` to the
///   trampoline `NAME::__altpatch_sc_tramp` (an `extern "C"` naked function);
/// * `mod NAME` with `KEY` (the [`StaticCall`](crate::static_call::StaticCall)), `update(f)` (`std`: the
///   running program, live), `update_with(f, image, sites, poke)`,
///   `target()`, and, for functions returning `()`, `set_none()` /
///   `set_none_with(...)`. `f` must be an `extern "C" fn(TYPE, ...) -> RET`:
///   type-checked.
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
/// The generated trampoline adds no lint of its own to the user's code,
/// whatever the argument types (the target's definition is the user's):
///
/// ```
/// #![deny(warnings)]
/// #[allow(improper_ctypes_definitions)]
/// extern "C" fn count(s: &str) -> usize {
///     s.len()
/// }
/// altpatch::static_call! {
///     fn measure(s: &str) -> usize = count;
/// }
/// fn main() {
///     assert_eq!(measure("four"), 4);
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

/// Internal: the code of a static-call trampoline, and of an ifunc's stub
/// (which is one): `jmp {target}`, the `0f b9 cc` signature
/// ([`TRAMPOLINE_SIGNATURE`](crate::static_call::TRAMPOLINE_SIGNATURE)),
/// then `int3` padding to 8 bytes. The padding makes the section's
/// alignment 8, so every trampoline starts 8-byte aligned and its 8 bytes
/// never straddle a 64-byte fetch block: packed at 4 bytes by the linker, a
/// `jmp` split across two blocks cost a call through it ~25 % more
/// (benches/calls.rs).
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_trampoline_body {
    () => {
        concat!(
            ".byte 0xe9\n",
            ".long {target} - 4 - .\n",
            ".byte 0x0f, 0xb9, 0xcc\n",
            ".balign 8, 0xcc",
        )
    };
}

/// Internal: the body of [`static_call!`](macro@crate::static_call).
#[doc(hidden)]
#[macro_export]
macro_rules! __static_call {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $default:path; unit $unit:tt) => {
        $(#[$m])*
        #[inline(always)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            $name::__altpatch_sc_tramp($($arg),*)
        }

        #[doc = concat!("Updates and inspects the static call [`", stringify!($name), "`].")]
        #[allow(non_snake_case)]
        $vis mod $name {
            #[allow(unused_imports)]
            use super::*;

            /// The trampoline: `jmp` to the current target, then the
            /// `0f b9 cc` signature. A naked Rust function, so callers in
            /// the program reach it with a direct `call` (an `extern`
            /// declaration would be called through the GOT).
            // The signature is the user's: whether its types suit C is the
            // user's `extern "C"` target's concern (and lint), not ours.
            #[allow(improper_ctypes_definitions)]
            #[unsafe(naked)]
            #[unsafe(link_section = ".text.altpatch_sc_tramp")]
            pub extern "C" fn __altpatch_sc_tramp($($arg: $ty),*) -> $ret {
                ::core::arch::naked_asm!(
                    $crate::__altpatch_trampoline_body!(),
                    target = sym $default,
                )
            }

            fn __trampoline_addr() -> usize {
                __altpatch_sc_tramp as *const () as usize
            }

            fn __default_addr() -> usize {
                let f: extern "C" fn($($ty),*) -> $ret = $default;
                f as *const () as usize
            }

            /// The state of this static call.
            pub static KEY: $crate::static_call::StaticCall = $crate::static_call::StaticCall::new(
                stringify!($name),
                __trampoline_addr,
                __default_addr,
                $unit,
            );

            /// The function calls go to now (`None` after `set_none`).
            pub fn target() -> Option<extern "C" fn($($ty),*) -> $ret> {
                // SAFETY: KEY only ever holds addresses of functions of
                // exactly this type (the default, or what `update` took).
                KEY.target().map(|a| unsafe { ::core::mem::transmute::<usize, extern "C" fn($($ty),*) -> $ret>(a) })
            }

            /// Points every call at `f`, through `poke`: the trampoline and
            /// the call sites in `sites` (see
            /// [`StaticCall::update_with`]($crate::static_call::StaticCall::update_with)).
            ///
            /// # Safety
            ///
            /// As for [`Plan::apply`]($crate::Plan::apply) with `poke`.
            pub unsafe fn update_with<P: $crate::TextPoke + ?Sized>(
                f: extern "C" fn($($ty),*) -> $ret,
                image: &$crate::Image<'_>,
                sites: &[$crate::sites::Site],
                poke: &mut P,
            ) -> Result<$crate::static_call::UpdateReport, $crate::static_call::StaticCallError> {
                // SAFETY: `f` has exactly the declared type; the rest is the
                // caller's.
                unsafe { KEY.update_with(Some(f as *const () as usize), image, sites, poke) }
            }

            $crate::__static_call_std!($($ty),* ; $ret);
            $crate::__static_call_unit!($unit);
        }
    };
}

/// Internal: the `std` update of the running program.
#[doc(hidden)]
#[macro_export]
#[cfg(all(feature = "std", target_os = "linux"))]
macro_rules! __static_call_std {
    ($($ty:ty),* ; $ret:ty) => {
        /// Points every call at `f` in the running program: the trampoline
        /// and every call site its relocations (or embedded site table)
        /// list, in one batch published by page swap, safe while other
        /// threads call it.
        pub fn update(
            f: extern "C" fn($($ty),*) -> $ret,
        ) -> Result<$crate::static_call::UpdateReport, $crate::static_call::StaticCallError> {
            // SAFETY: `f` has exactly the declared type.
            unsafe { KEY.update_raw(Some(f as *const () as usize)) }
        }
    };
}

/// Internal: nothing without `std`.
#[doc(hidden)]
#[macro_export]
#[cfg(not(all(feature = "std", target_os = "linux")))]
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
        pub unsafe fn set_none_with<P: $crate::TextPoke + ?Sized>(
            image: &$crate::Image<'_>,
            sites: &[$crate::sites::Site],
            poke: &mut P,
        ) -> Result<$crate::static_call::UpdateReport, $crate::static_call::StaticCallError> {
            // SAFETY: none is allowed for `()`; the rest is the caller's.
            unsafe { KEY.update_with(None, image, sites, poke) }
        }

        $crate::__static_call_unit_std!();
    };
}

/// Internal.
#[doc(hidden)]
#[macro_export]
#[cfg(all(feature = "std", target_os = "linux"))]
macro_rules! __static_call_unit_std {
    () => {
        /// Makes every call a no-op in the running program, live.
        pub fn set_none()
        -> Result<$crate::static_call::UpdateReport, $crate::static_call::StaticCallError> {
            // SAFETY: none is allowed for `()`.
            unsafe { KEY.update_raw(None) }
        }
    };
}

/// Internal.
#[doc(hidden)]
#[macro_export]
#[cfg(not(all(feature = "std", target_os = "linux")))]
macro_rules! __static_call_unit_std {
    () => {};
}
