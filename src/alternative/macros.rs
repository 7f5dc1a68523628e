//! `alternative!`, and the `asm!` it shares with `alternative_call!`
//! (`call_macros.rs`).
//!
//! Both expand to one `asm!` whose template is, in order:
//!
//! ```text
//! 8660: <default>  8661:                          the site: default instructions...
//! .pushsection .text.altpatch_replacement          ...a copy of them (so the original
//! 8668: <default>  8669:  .popsection                 bytes are known after patching)
//! for each alternative i:
//!   .skip <max(0, len(replacement i) - (. - 8660b))>, 0x90     pad the site to fit it
//!   .pushsection .text.altpatch_replacement
//!   8671: <replacement i>  8672:  .popsection       never executed in place
//!   .pushsection altpatch_v1_alt  <record i>  .popsection
//! 8662:                                            end of the padded site
//! ```
//!
//! Each `.skip` grows the site only if that replacement is longer than the
//! site so far, so the site ends up as long as the longest. (The assembler
//! evaluates `a > b` to -1 for true, as GNU as and LLVM's both do.) Each
//! replacement's labels are referenced forward (`8672f`) by its own padding
//! and backward by its record, so one pair of label numbers serves every
//! alternative. Conditions reach the record as positional `const` operands,
//! whose indices come from a fixed list: at most eight alternatives a site.

/// Chooses among instruction sequences by CPU feature, patched in place
/// when [`alternative::apply`](crate::alternative::apply) runs.
///
/// ```text
/// alternative!([name: "NAME",] DEFAULT, [COND => REPLACEMENT, ...], OPERANDS...)
/// ```
///
/// * An optional leading `name: "NAME",` labels the site: it becomes a
///   patch point of that name (so `Image::patch_point("NAME")` finds the
///   site) and names it in reports.
/// * `DEFAULT` and each `REPLACEMENT` are `asm!` template strings (use `\n`
///   between instructions). Until patched, the default runs, followed by
///   one-byte NOPs padding the site to the longest replacement.
/// * `COND` is a [`Feature`](crate::cpu::Feature) variant (`Movbe`), its
///   negation (`!Avx2`), `always` or `never`. An unknown feature name is a
///   compile error. Of the alternatives whose condition holds, the **last**
///   wins; if none holds, the default stays (and its padding becomes one
///   NOP or a short jump).
/// * `OPERANDS` are ordinary `asm!` operands and options, shared by every
///   sequence: the compiler allocates registers once, so `{v:e}` names the
///   same register in the default and in every replacement. They must
///   describe the effects of *all* sequences (clobbered flags, memory
///   access). Use **named** operands: the conditions occupy the positional
///   ones. Labels inside sequences must be numeric (not 8660–8679), since
///   the default is assembled twice.
///
/// Expands to an `asm!` invocation, so call it inside `unsafe`. Up to eight
/// alternatives per site.
///
/// Misuse the compiler can see is a compile error (each case, with its
/// exact message, is a UI test in `tests/ui/`), such as a feature name
/// that does not exist:
///
/// ```compile_fail,E0599
/// # use altpatch::alternative;
/// // error: no variant named `Movbee` in `Feature`
/// unsafe { alternative!("nop", [Movbee => "nop"]) };
/// ```
///
/// or a ninth alternative ("altpatch: at most 8 alternatives per site"):
///
/// ```compile_fail
/// # use altpatch::alternative;
/// unsafe {
///     alternative!("nop", [Sse3 => "nop", Sse3 => "nop", Sse3 => "nop", Sse3 => "nop",
///         Sse3 => "nop", Sse3 => "nop", Sse3 => "nop", Sse3 => "nop", Sse3 => "nop"])
/// };
/// ```
///
/// ```
/// use altpatch::{Image, LinuxPoke, alternative, cpu::{Feature, Features}};
///
/// #[inline(never)]
/// fn load_be(p: &u32) -> u32 {
///     let v: u32;
///     // SAFETY: reads the u32 behind a valid reference; both sequences
///     // compute the same value and touch nothing else.
///     unsafe {
///         alternative!(
///             "mov {v:e}, [{p}]\nbswap {v:e}",
///             [Movbe => "movbe {v:e}, [{p}]"],
///             p = in(reg) p, v = out(reg) v,
///             options(nostack, readonly, preserves_flags)
///         )
///     };
///     v
/// }
///
/// let x = 0x1122_3344u32;
/// assert_eq!(load_be(&x), 0x4433_2211);
/// let image = Image::current();
/// let features = Features::detect();
/// let mut poke = LinuxPoke::new().unwrap();
/// // SAFETY: no other thread runs this program's alternative sites now.
/// let report = unsafe { altpatch::alternative::apply(&image, &features, &mut poke) }.unwrap();
/// assert_eq!(load_be(&x), 0x4433_2211); // same value, maybe with movbe now
/// println!("{report}");
/// ```
#[macro_export]
macro_rules! alternative {
    (name: $name:literal, $default:literal, [$($alts:tt)*] $(, $($rest:tt)*)?) => {
        $crate::__alternative_asm!(
            idx [0 1 2 3 4 5 6 7]
            pieces [$crate::__alternative_name!($name),]
            consts []
            default [$default]
            alts [$($alts)*]
            rest [$($($rest)*)?]
        )
    };
    ($default:literal, [$($alts:tt)*] $(, $($rest:tt)*)?) => {
        $crate::__alternative_asm!(
            idx [0 1 2 3 4 5 6 7]
            pieces []
            consts []
            default [$default]
            alts [$($alts)*]
            rest [$($($rest)*)?]
        )
    };
}

/// Internal: a patch point naming the site (label 8660).
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_name {
    ($name:literal) => {
        concat!(
            $crate::__altpatch_push_section!(point),
            ".long 8660b - .\n",
            ".long 8673f - .\n",
            ".popsection\n",
            ".pushsection .rodata.altpatch_names,\"a\",@progbits\n",
            "8673: .asciz \"",
            $name,
            "\"\n",
            ".popsection"
        )
    };
}

/// Internal: builds the `asm!` for [`alternative!`] and [`alternative_call!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_asm {
    (idx [] pieces [$($p:tt)*] consts [$($c:tt)*] default [$($d:tt)*] alts [$($a:tt)+] rest [$($rest:tt)*]) => {
        ::core::compile_error!("altpatch: at most 8 alternatives per site")
    };
    (idx [$i:literal $($is:literal)*] pieces [$($p:tt)*] consts [$($c:tt)*] default [$($d:tt)*]
     alts [always => $r:expr $(, $($more:tt)*)?] rest [$($rest:tt)*]) => {
        $crate::__alternative_asm!(
            idx [$($is)*]
            pieces [$($p)* $crate::__alternative_piece!($i, $r),]
            consts [$($c)* const $crate::alternative::Condition::ALWAYS.bits(),]
            default [$($d)*] alts [$($($more)*)?] rest [$($rest)*]
        )
    };
    (idx [$i:literal $($is:literal)*] pieces [$($p:tt)*] consts [$($c:tt)*] default [$($d:tt)*]
     alts [never => $r:expr $(, $($more:tt)*)?] rest [$($rest:tt)*]) => {
        $crate::__alternative_asm!(
            idx [$($is)*]
            pieces [$($p)* $crate::__alternative_piece!($i, $r),]
            consts [$($c)* const $crate::alternative::Condition::NEVER.bits(),]
            default [$($d)*] alts [$($($more)*)?] rest [$($rest)*]
        )
    };
    (idx [$i:literal $($is:literal)*] pieces [$($p:tt)*] consts [$($c:tt)*] default [$($d:tt)*]
     alts [! $f:ident => $r:expr $(, $($more:tt)*)?] rest [$($rest:tt)*]) => {
        $crate::__alternative_asm!(
            idx [$($is)*]
            pieces [$($p)* $crate::__alternative_piece!($i, $r),]
            consts [$($c)* const $crate::alternative::Condition::not($crate::cpu::Feature::$f).bits(),]
            default [$($d)*] alts [$($($more)*)?] rest [$($rest)*]
        )
    };
    (idx [$i:literal $($is:literal)*] pieces [$($p:tt)*] consts [$($c:tt)*] default [$($d:tt)*]
     alts [$f:ident => $r:expr $(, $($more:tt)*)?] rest [$($rest:tt)*]) => {
        $crate::__alternative_asm!(
            idx [$($is)*]
            pieces [$($p)* $crate::__alternative_piece!($i, $r),]
            consts [$($c)* const $crate::alternative::Condition::feature($crate::cpu::Feature::$f).bits(),]
            default [$($d)*] alts [$($($more)*)?] rest [$($rest)*]
        )
    };
    (idx [$($is:literal)*] pieces [$($p:tt)*] consts [$($c:tt)*] default [$($d:tt)*] alts [] rest [$($rest:tt)*]) => {{
        $crate::__alternative_at_load!();
        ::core::arch::asm!(
            "8660:",
            $($d)*,
            "8661:",
            ".pushsection .text.altpatch_replacement,\"ax\",@progbits",
            "8668:",
            $($d)*,
            "8669:",
            ".popsection",
            $($p)*
            "8662:",
            $($c)*
            $($rest)*
        )
    }};
}

/// Internal: registers the constructor that applies the object's
/// alternatives when it is loaded (`alternative::startup`).
#[doc(hidden)]
#[macro_export]
#[cfg(feature = "std")]
macro_rules! __alternative_at_load {
    () => {
        #[used]
        #[unsafe(link_section = ".init_array")]
        static __ALTPATCH_ALT_AT_LOAD: extern "C" fn() = $crate::process::__alternative_at_load;
    };
}

/// Internal: nothing to register without `std` on Linux.
#[doc(hidden)]
#[macro_export]
#[cfg(not(feature = "std"))]
macro_rules! __alternative_at_load {
    () => {};
}

/// Internal: the padding, replacement and record of alternative `$i`.
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_piece {
    ($i:literal, $r:expr) => {
        concat!(
            $crate::__altpatch_site_pad!(),
            ".pushsection .text.altpatch_replacement,\"ax\",@progbits\n",
            "8671:\n",
            $r,
            "\n8672:\n",
            ".popsection\n",
            $crate::__altpatch_push_section!(alt),
            ".long 8660b - .\n",
            ".long 8668b - .\n",
            ".long 8671b - .\n",
            ".short {",
            $i,
            "}\n",
            ".byte 8662f - 8660b\n",
            ".byte 8661b - 8660b\n",
            ".byte 8672b - 8671b\n",
            ".byte 8669b - 8668b\n",
            ".short 0\n",
            ".popsection"
        )
    };
}
