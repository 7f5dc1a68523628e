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
/// -> RET` (type-checked) or a closure of that signature written in place
/// (`= |features| ...;`, capturing nothing). It returns Rust
/// implementations through `NAME::c_fn(f)`, a C-ABI shim rustc compiles `f`
/// into, and `#[target_feature]` ones as shown below. Generates
/// `fn NAME(...)` (inlined into callers as a direct `call` to the stub)
/// and a type `NAME` (type namespace only) with `NAME::ifunc()` (the
/// [`Ifunc`](crate::ifunc::Ifunc)), `resolved()`, `resolve_with(&features)`,
/// `c_fn(f)` and `c_fn_unchecked(f)`. Works at module level and in a
/// function body.
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
/// # Slices, `&str` and other arguments C has no type for
///
/// Any argument and result types work, two-register ones included
/// (`&[T]`, `&str`, `&dyn Trait`, `(u64, u64)`): rustc compiles both the
/// callers and the C-ABI shims, so both sides agree on how each is passed.
/// Name no `extern "C" fn(&[T]) -> ...` type in your own signatures,
/// though: rustc's `improper_ctypes_definitions` lint flags a function
/// pointer type taking a slice. Write the resolver in place and let `c_fn`
/// make the shims; nothing in this form warns:
///
/// ```
/// #![deny(warnings)]
/// use altpatch::cpu::Feature;
///
/// fn sum_portable(v: &[u64]) -> u64 {
///     v.iter().sum()
/// }
/// fn sum_unrolled(v: &[u64]) -> u64 {
///     v.chunks(4).map(|c| c.iter().sum::<u64>()).sum()
/// }
/// altpatch::ifunc! {
///     fn sum(v: &[u64]) -> u64 = |features| {
///         if features.has(Feature::Avx2) {
///             sum::c_fn(sum_unrolled)
///         } else {
///             sum::c_fn(sum_portable)
///         }
///     };
/// }
/// fn count(s: &str) -> usize {
///     s.len()
/// }
/// altpatch::ifunc! {
///     fn measure(s: &str) -> usize = |_| measure::c_fn(count);
/// }
/// fn main() {
///     assert_eq!(sum(&[1, 2, 3, 4, 5]), 15);
///     assert_eq!(measure("four"), 4);
/// }
/// ```
///
/// # `#[target_feature]` implementations
///
/// The implementation an ifunc exists to pick is usually compiled for a
/// feature the baseline lacks: `#[target_feature(enable = "avx2")]`.
/// Calling one is safe only on a CPU with that feature, so rustc makes it
/// `unsafe` to call from elsewhere and gives it no `Fn` trait (`c_fn`
/// cannot take it as it is). **The safety argument is the resolver's:**
/// it returns the implementation only when the snapshot it was given says
/// the CPU has every feature the implementation enables, and says so in an
/// `unsafe` block:
///
/// * a Rust function: wrap it in a closure, `NAME::c_fn(|v| unsafe {
///   sum_avx2(v) })` (the shim ends in a `jmp` to it: rustc cannot inline
///   code for other features into the shim);
/// * an `extern "C"` function: `unsafe { NAME::c_fn_unchecked(f) }`
///   returns it as the safe pointer the resolver returns, with no shim:
///   call sites go straight to it.
///
/// The snapshot is trusted to describe the CPU. The crate's own
/// snapshots never claim an instruction set the CPU lacks
/// ([`Features::detect`](crate::cpu::Features::detect), `detect_with_env`
/// and `ALTPATCH`, which refuses `+avx2` on a CPU without AVX2, the
/// published snapshot the lazy path and `init` use). One you build by hand
/// (`Features::none().with(Feature::Avx2)`) and pass to `resolve_with`,
/// `ifunc::apply`, a `Patcher` or `cpu::publish` must not either, where a
/// resolver relies on it. A resolver that wants no such trust checks the
/// CPU itself too (`std::arch::is_x86_feature_detected!`).
///
/// ```
/// #![deny(warnings)]
/// use altpatch::cpu::Feature;
/// use core::arch::x86_64::{__m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_setzero_si256,
///                          _mm256_storeu_si256};
///
/// fn sum_portable(v: &[u64]) -> u64 {
///     v.iter().fold(0, |a, &x| a.wrapping_add(x))
/// }
///
/// #[target_feature(enable = "avx2")]
/// fn sum_avx2(v: &[u64]) -> u64 {
///     let mut acc = _mm256_setzero_si256();
///     let chunks = v.chunks_exact(4);
///     let tail = sum_portable(chunks.remainder());
///     for c in chunks {
///         // SAFETY: `c` holds four `u64`s: 32 readable bytes (an
///         // unaligned load).
///         acc = _mm256_add_epi64(acc, unsafe { _mm256_loadu_si256(c.as_ptr().cast::<__m256i>()) });
///     }
///     let mut lanes = [0u64; 4];
///     // SAFETY: `lanes` is 32 writable bytes.
///     unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast::<__m256i>(), acc) };
///     sum_portable(&lanes).wrapping_add(tail)
/// }
///
/// altpatch::ifunc! {
///     fn sum(v: &[u64]) -> u64 = |features| {
///         if features.has(Feature::Avx2) {
///             // SAFETY: chosen only where the CPU has AVX2, the one
///             // feature `sum_avx2` enables.
///             sum::c_fn(|v| unsafe { sum_avx2(v) })
///         } else {
///             sum::c_fn(sum_portable)
///         }
///     };
/// }
///
/// #[target_feature(enable = "popcnt")]
/// extern "C" fn ones_popcnt(x: u64) -> u64 {
///     x.count_ones() as u64 // one `popcnt` instruction here
/// }
/// extern "C" fn ones_portable(x: u64) -> u64 {
///     x.count_ones() as u64
/// }
/// altpatch::ifunc! {
///     fn ones(x: u64) -> u64 = |features| {
///         if features.has(Feature::Popcnt) {
///             // SAFETY: chosen only where the CPU has POPCNT, the one
///             // feature `ones_popcnt` enables.
///             unsafe { ones::c_fn_unchecked(ones_popcnt) }
///         } else {
///             ones_portable
///         }
///     };
/// }
///
/// fn main() {
///     let v: Vec<u64> = (1..=100).collect();
///     assert_eq!(sum(&v), 5050);
///     assert_eq!(ones(0b1011), 3);
/// }
/// ```
#[macro_export]
macro_rules! ifunc {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $resolver:path;) => {
        $crate::__ifunc!($(#[$m])* $vis fn $name($($arg: $ty),*) -> $ret = path $resolver);
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $resolver:path;) => {
        $crate::__ifunc!($(#[$m])* $vis fn $name($($arg: $ty),*) -> () = path $resolver);
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $resolver:expr;) => {
        $crate::__ifunc!($(#[$m])* $vis fn $name($($arg: $ty),*) -> $ret = closure $resolver);
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $resolver:expr;) => {
        $crate::__ifunc!($(#[$m])* $vis fn $name($($arg: $ty),*) -> () = closure $resolver);
    };
}

/// Internal: calls an `ifunc!` resolver. A path is called as it is (a
/// wrong signature is a type mismatch at the macro); a closure is first
/// given the resolver's signature, so its parameter and result need no
/// annotation.
#[doc(hidden)]
#[macro_export]
macro_rules! __ifunc_call_resolver {
    (path $resolver:expr; $features:ident; $($ty:ty),* ; $ret:ty) => {
        $resolver($features)
    };
    (closure $resolver:expr; $features:ident; $($ty:ty),* ; $ret:ty) => {{
        fn __altpatch_resolver<__AltpatchR>(r: __AltpatchR) -> __AltpatchR
        where
            __AltpatchR: Fn(&$crate::cpu::Features) -> extern "C" fn($($ty),*) -> $ret,
        {
            r
        }
        __altpatch_resolver($resolver)($features)
    }};
}

/// Internal: the body of [`ifunc!`](macro@crate::ifunc).
#[doc(hidden)]
#[macro_export]
macro_rules! __ifunc {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $kind:ident $resolver:expr) => {
        $(#[$m])*
        #[inline(always)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[allow(unused_imports)]
            use $crate::ifunc::{__Plain as _, __Recorded as _};
            // A recorded `call <stub>` where the C ABI passes everything
            // in integer registers, rustc's own call otherwise (see
            // `ifunc::call`).
            (&&$crate::ifunc::__Probe::<$name, ($($ty,)*), $ret>::NEW).call(
                ($($arg,)*),
                #[inline(always)]
                |($($arg,)*)| <$name>::__altpatch_typed_stub()($($arg),*),
            )
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
                    $crate::static_call::__fn_at::<extern "C" fn($($ty),*) -> $ret>($crate::__ifunc_lazy_target!(&__ALTPATCH_STATE))
                };
                f($($arg),*)
            }

            fn __altpatch_resolve(features: &$crate::cpu::Features) -> usize {
                let f: extern "C" fn($($ty),*) -> $ret =
                    $crate::__ifunc_call_resolver!($kind $resolver; features; $($ty),* ; $ret);
                f as *const () as usize
            }

            fn __altpatch_stub_addr() -> usize {
                <$name as $crate::ifunc::__IfuncStub>::__altpatch_ifunc_stub as *const () as usize
            }

            fn __altpatch_lazy_addr() -> usize {
                __altpatch_lazy as *const () as usize
            }

            // The stub emits the ifunc's record; keep it (and so the
            // record) even when nothing calls the ifunc, as the record of
            // an unused ifunc was kept before (its resolver still runs at
            // `init`).
            #[used]
            static __ALTPATCH_KEEP: extern "C" fn() = <$name as $crate::ifunc::__IfuncStub>::__altpatch_ifunc_stub;

            // Patching at load (`ifunc::startup`): the loader runs the
            // object's `.init_array` entries before `main`, or inside
            // `dlopen`. Every ifunc registers one; the first does the work.
            $crate::__ifunc_at_load!();

            static __ALTPATCH_STATE: $crate::ifunc::Ifunc = $crate::ifunc::Ifunc::new(
                stringify!($name),
                __altpatch_stub_addr,
                __altpatch_lazy_addr,
                __altpatch_resolve,
            );

            // SAFETY: the stub below is a C-ABI function of the ifunc's
            // signature (it jumps to the lazy path, then to resolver
            // results, all of that type).
            unsafe impl $crate::ifunc::__IfuncStub for $name {
                /// The stub: a static-call trampoline to the lazy path,
                /// then to the resolved implementation. It also emits the
                /// record that lets `ifunc::apply` find the ifunc (`global_asm!`
                /// is not allowed in a function body; a naked function is).
                #[unsafe(naked)]
                #[unsafe(link_section = ".text.altpatch_ifunc")]
                extern "C" fn __altpatch_ifunc_stub() {
                    ::core::arch::naked_asm!(
                        $crate::__altpatch_trampoline_body!(),
                        $crate::__altpatch_push_section!(ifunc),
                        ".long {state} - .",
                        ".popsection",
                        target = sym __altpatch_lazy,
                        state = sym __ALTPATCH_STATE,
                    )
                }
            }

            #[allow(dead_code)]
            impl $name {
                /// The stub, as a function of the ifunc's type.
                #[doc(hidden)]
                #[inline(always)]
                #[allow(improper_ctypes_definitions)]
                pub fn __altpatch_typed_stub() -> extern "C" fn($($ty),*) -> $ret {
                    let stub: extern "C" fn() = <$name as $crate::ifunc::__IfuncStub>::__altpatch_ifunc_stub;
                    // SAFETY: the stub's real signature is the ifunc's
                    // (see the impl above); a function pointer to a
                    // function pointer of the same size.
                    unsafe { ::core::mem::transmute::<extern "C" fn(), extern "C" fn($($ty),*) -> $ret>(stub) }
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

/// Internal: the lazy path's target; in a process (`std` on Linux), the
/// stub is then made direct (`process::__ifunc_lazy_target`).
#[doc(hidden)]
#[macro_export]
#[cfg(feature = "std")]
macro_rules! __ifunc_lazy_target {
    ($ifunc:expr) => {
        $crate::process::__ifunc_lazy_target($ifunc)
    };
}

/// Internal: the lazy path's target, resolved with the published snapshot.
#[doc(hidden)]
#[macro_export]
#[cfg(not(feature = "std"))]
macro_rules! __ifunc_lazy_target {
    ($ifunc:expr) => {
        $ifunc.lazy_target()
    };
}

/// Internal: registers the constructor that patches the object's ifuncs
/// when it is loaded (`ifunc::startup`).
#[doc(hidden)]
#[macro_export]
#[cfg(feature = "std")]
macro_rules! __ifunc_at_load {
    () => {
        #[used]
        #[unsafe(link_section = ".init_array")]
        static __ALTPATCH_AT_LOAD: extern "C" fn() = $crate::process::__ifunc_at_load;
    };
}

/// Internal: nothing to register without `std` on Linux.
#[doc(hidden)]
#[macro_export]
#[cfg(not(feature = "std"))]
macro_rules! __ifunc_at_load {
    () => {};
}
