//! `alternative_call!`: one `call` site, its target chosen by CPU feature.
//!
//! The site is `alternative!`'s `asm!` (macros.rs) with `call {fn}` as
//! every sequence. What is added here: each function becomes a `sym`
//! operand (an `extern "C"` function as it is, a closure through a C-ABI
//! shim made in place), and the arguments go into the registers the C ABI
//! gives them (`call_abi.rs`: one or two words each, in order).

/// Calls one of several functions chosen by CPU feature, through a direct
/// `call` that [`alternative::apply`](crate::alternative::apply) rewrites
/// to the chosen function: no indirect branch, no check at run time.
///
/// ```text
/// alternative_call!([name: "NAME",] fn(ARG_TYPES...) [-> RET]; DEFAULT, [COND => FN, ...]; ARGS...)
/// ```
///
/// `DEFAULT` and each `FN` is either
///
/// * a path to an `extern "C"` function of exactly the type
///   `extern "C" fn(ARG_TYPES...) -> RET` (checked at compile time;
///   `unsafe fn`s are refused), which the site calls directly, or
/// * a closure capturing nothing (`|s| count_portable(s)`), which rustc
///   compiles into a C-ABI function of that type made here; the site
///   calls that. This is how a Rust function is called, and a
///   `#[target_feature]` one (see below).
///
/// ```compile_fail,E0308
/// # use altpatch::alternative_call;
/// extern "C" fn a(x: u64) -> u64 { x }
/// extern "C" fn b(x: u32) -> u64 { x as u64 } // wrong argument type
/// let _ = alternative_call!(fn(u64) -> u64; a, [Avx2 => b]; 1);
/// ```
///
/// Arguments go in `rdi, rsi, rdx, rcx, r8, r9`, as the C ABI passes
/// them: one register each for integers, `bool`, `char`, thin pointers and
/// references and function pointers, two for slices, `&str` and other fat
/// pointers, `u128`/`i128` and pairs like `(u64, u64)` — six registers in
/// all. The result, if any (`-> RET` omitted for none), comes back in
/// `rax` (and `rdx`), with the same types. Floating-point arguments and
/// results travel elsewhere and are refused at compile time (see
/// [`CallArg`](crate::alternative::CallArg), which a `#[repr(C)]` type
/// may implement). Conditions are as for
/// [`alternative!`](crate::alternative!); the last that holds wins.
/// More than six registers' worth of arguments is a compile error
/// ("altpatch: alternative_call!'s arguments need more than the six
/// argument registers"):
///
/// ```compile_fail,E0080
/// # use altpatch::alternative_call;
/// fn total(a: &[u8], b: &[u8], c: &[u8], d: u8) -> usize {
///     a.len() + b.len() + c.len() + d as usize
/// }
/// let x = [1u8, 2];
/// let _ = alternative_call!(
///     fn(&[u8], &[u8], &[u8], u8) -> usize; // 2 + 2 + 2 + 1 registers
///     |a, b, c, d| total(a, b, c, d), [Avx2 => |a, b, c, d| total(a, b, c, d)];
///     &x, &x, &x, 1
/// );
/// ```
///
/// ```
/// use altpatch::{Image, LinuxPoke, alternative_call, cpu::Features};
///
/// extern "C" fn portable(x: u64) -> u64 { x.count_ones() as u64 }
/// extern "C" fn with_popcnt(x: u64) -> u64 { x.count_ones() as u64 + 1000 }
///
/// #[inline(never)]
/// fn count(x: u64) -> u64 {
///     alternative_call!(fn(u64) -> u64; portable, [Popcnt => with_popcnt]; x)
/// }
///
/// assert_eq!(count(0b1011), 3); // the default until patched
/// let features = Features::detect();
/// let mut poke = LinuxPoke::new().unwrap();
/// // SAFETY: no other thread runs this program's alternative sites now.
/// unsafe { altpatch::alternative::apply(&Image::current(), &features, &mut poke) }.unwrap();
/// let expect = if features.has(altpatch::cpu::Feature::Popcnt) { 1003 } else { 3 };
/// assert_eq!(count(0b1011), expect);
/// ```
///
/// Slices and Rust functions, `#[target_feature]` ones included. A
/// closure's `unsafe` block calling a `#[target_feature]` function has the
/// site's condition as its safety argument: the call is patched in only
/// where the snapshot [`apply`](crate::alternative::apply) was given has
/// the feature (the snapshot is trusted to describe the CPU, as for
/// [`ifunc!`](macro@crate::ifunc) resolvers). rustc cannot inline code
/// for other features into the C-ABI function, which ends in a `jmp` to
/// it. Nothing here names an `extern "C"` type taking a slice, so rustc
/// has nothing to warn about:
///
/// ```
/// #![deny(warnings)]
/// use altpatch::alternative_call;
///
/// fn count_portable(bytes: &[u8], needle: u8) -> usize {
///     bytes.iter().filter(|&&b| b == needle).count()
/// }
/// #[target_feature(enable = "avx2")]
/// fn count_avx2(bytes: &[u8], needle: u8) -> usize {
///     bytes.iter().filter(|&&b| b == needle).count() // vectorized for AVX2
/// }
///
/// #[inline(never)]
/// fn count(bytes: &[u8], needle: u8) -> usize {
///     alternative_call!(
///         fn(&[u8], u8) -> usize;
///         |b, n| count_portable(b, n),
///         // SAFETY: patched in only where the CPU has AVX2, the one
///         // feature `count_avx2` enables.
///         [Avx2 => |b, n| unsafe { count_avx2(b, n) }];
///         bytes, needle
///     )
/// }
///
/// fn main() {
///     assert_eq!(count(b"a banana", b'a'), 4);
/// }
/// ```
#[macro_export]
macro_rules! alternative_call {
    (name: $name:literal, fn($($t:ty),* $(,)?) $(-> $ret:ty)?; $($rest:tt)*) => {
        $crate::__alternative_call_default!(
            [$crate::__alternative_name!($name),] [$($t),*] [$($ret)?] $($rest)*
        )
    };
    (fn($($t:ty),* $(,)?) $(-> $ret:ty)?; $($rest:tt)*) => {
        $crate::__alternative_call_default!([] [$($t),*] [$($ret)?] $($rest)*)
    };
}

/// Internal: evaluates the arguments, then the default function.
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_call_default {
    ([$($np:tt)*] [$($t:ty),*] [$($ret:ty)?] $d:path, [$($alts:tt)*]; $($arg:expr),* $(,)?) => {{
        let __altpatch_args: ($($t,)*) = ($($arg,)*);
        $crate::__alternative_call_alts!(
            [$($np)*] [$($t),*] [$($ret)?] __altpatch_args
            idx [(0 __altpatch_f0) (1 __altpatch_f1) (2 __altpatch_f2) (3 __altpatch_f3)
                 (4 __altpatch_f4) (5 __altpatch_f5) (6 __altpatch_f6) (7 __altpatch_f7)]
            alts [$($alts)*]
            acc [pre [let _: extern "C" fn($($t),*) $(-> $ret)? = $d;]
                 alts [] syms [__altpatch_fd = sym $d,]]
        )
    }};
    ([$($np:tt)*] [$($t:ty),*] [$($ret:ty)?] $d:expr, [$($alts:tt)*]; $($arg:expr),* $(,)?) => {{
        let __altpatch_args: ($($t,)*) = ($($arg,)*);
        $crate::__alternative_call_alts!(
            [$($np)*] [$($t),*] [$($ret)?] __altpatch_args
            idx [(0 __altpatch_f0) (1 __altpatch_f1) (2 __altpatch_f2) (3 __altpatch_f3)
                 (4 __altpatch_f4) (5 __altpatch_f5) (6 __altpatch_f6) (7 __altpatch_f7)]
            alts [$($alts)*]
            acc [pre [$crate::__alternative_call_shim!(__altpatch_fd [$($t),*] [$($ret)?] $d);]
                 alts [] syms [__altpatch_fd = sym __altpatch_fd,]]
        )
    }};
}

/// Internal: the C-ABI function `$name` of the declared signature that
/// calls the closure `$f` (which rustc compiles into it).
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_call_shim {
    ($name:ident [$($t:ty),*] [$($ret:ty)?] $f:expr) => {
        $crate::__alternative_call_shim!(
            @args $name [__a0 __a1 __a2 __a3 __a4 __a5] [$($t),*] [] [$($ret)?] $f
        );
    };
    (@args $name:ident [$id:ident $($ids:ident)*] [$t:ty $(, $ts:ty)*] [$($acc:tt)*] [$($ret:ty)?] $f:expr) => {
        $crate::__alternative_call_shim!(
            @args $name [$($ids)*] [$($ts),*] [$($acc)* ($id: $t)] [$($ret)?] $f
        );
    };
    (@args $name:ident [] [$t:ty $(, $ts:ty)*] [$($acc:tt)*] [$($ret:ty)?] $f:expr) => {
        ::core::compile_error!("altpatch: alternative_call! passes at most six arguments");
    };
    (@args $name:ident [$($ids:ident)*] [] [$(($id:ident: $t:ty))*] [$($ret:ty)?] $f:expr) => {
        // The signature is the user's: whether its types suit C is not this
        // function's concern (rustc compiles both sides of the call). A
        // closure that only calls a function is the way to pass a Rust one
        // (a path must be an `extern "C"` function), not a redundant one.
        #[allow(improper_ctypes_definitions, clippy::redundant_closure)]
        extern "C" fn $name($($id: $t),*) $(-> $ret)? {
            fn __altpatch_as_fn<__AltpatchG: Fn($($t),*) $(-> $ret)?>(
                g: __AltpatchG,
            ) -> __AltpatchG {
                g
            }
            __altpatch_as_fn($f)($($id),*)
        }
    };
}

/// Internal: turns each `COND => FN` into `COND => "call {name}"` plus a
/// named `sym` operand (and, for a closure, its C-ABI function).
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_call_alts {
    ($np:tt $ts:tt $ret:tt $aid:ident idx [] alts [$($x:tt)+] $($rest:tt)*) => {
        ::core::compile_error!("altpatch: at most 8 alternatives per site")
    };
    ([$($np:tt)*] [$($t:ty),*] [$($ret:ty)?] $aid:ident idx [($i:literal $n:ident) $($is:tt)*]
     alts [! $c:ident => $f:path $(, $($more:tt)*)?] acc [pre [$($p:tt)*] alts [$($a:tt)*] syms [$($s:tt)*]]) => {
        $crate::__alternative_call_alts!(
            [$($np)*] [$($t),*] [$($ret)?] $aid idx [$($is)*] alts [$($($more)*)?]
            acc [pre [$($p)* let _: extern "C" fn($($t),*) $(-> $ret)? = $f;] alts [$($a)* ! $c => $crate::__alternative_call_insn!($i),] syms [$($s)* $n = sym $f,]]
        )
    };
    ([$($np:tt)*] [$($t:ty),*] [$($ret:ty)?] $aid:ident idx [($i:literal $n:ident) $($is:tt)*]
     alts [$c:ident => $f:path $(, $($more:tt)*)?] acc [pre [$($p:tt)*] alts [$($a:tt)*] syms [$($s:tt)*]]) => {
        $crate::__alternative_call_alts!(
            [$($np)*] [$($t),*] [$($ret)?] $aid idx [$($is)*] alts [$($($more)*)?]
            acc [pre [$($p)* let _: extern "C" fn($($t),*) $(-> $ret)? = $f;] alts [$($a)* $c => $crate::__alternative_call_insn!($i),] syms [$($s)* $n = sym $f,]]
        )
    };
    ([$($np:tt)*] [$($t:ty),*] [$($ret:ty)?] $aid:ident idx [($i:literal $n:ident) $($is:tt)*]
     alts [! $c:ident => $f:expr $(, $($more:tt)*)?] acc [pre [$($p:tt)*] alts [$($a:tt)*] syms [$($s:tt)*]]) => {
        $crate::__alternative_call_alts!(
            [$($np)*] [$($t),*] [$($ret)?] $aid idx [$($is)*] alts [$($($more)*)?]
            acc [pre [$($p)* $crate::__alternative_call_shim!($n [$($t),*] [$($ret)?] $f);] alts [$($a)* ! $c => $crate::__alternative_call_insn!($i),] syms [$($s)* $n = sym $n,]]
        )
    };
    ([$($np:tt)*] [$($t:ty),*] [$($ret:ty)?] $aid:ident idx [($i:literal $n:ident) $($is:tt)*]
     alts [$c:ident => $f:expr $(, $($more:tt)*)?] acc [pre [$($p:tt)*] alts [$($a:tt)*] syms [$($s:tt)*]]) => {
        $crate::__alternative_call_alts!(
            [$($np)*] [$($t),*] [$($ret)?] $aid idx [$($is)*] alts [$($($more)*)?]
            acc [pre [$($p)* $crate::__alternative_call_shim!($n [$($t),*] [$($ret)?] $f);] alts [$($a)* $c => $crate::__alternative_call_insn!($i),] syms [$($s)* $n = sym $n,]]
        )
    };
    ([$($np:tt)*] [$($t:ty),*] [$($ret:ty)?] $aid:ident idx [$($is:tt)*] alts [$(,)?]
     acc [pre [$($p:tt)*] alts [$($a:tt)*] syms [$($s:tt)*]]) => {{
        $($p)*
        // The arguments into the registers the C ABI gives them, and the
        // `asm!`: the architecture's (arch/x86_64/call_asm.rs).
        $crate::__alternative_call_abi!(
            types [$($t),*]
            aid [$aid]
            then [$crate [$($np)*] [$($ret)?] [$($a)*] [$($s)*]]
        )
    }};
}
