//! The x86-64 half of recorded calls (the mechanism is
//! `static_call/recorded.rs`): a direct `call <stub>` that records itself,
//! with the arguments in the registers the C ABI gives them, integer and
//! SSE, and the result read back from `rax`/`rdx` or `xmm0`.

/// The recorded call of `$stub` with `$args: $A`, giving `$R`: `call
/// <stub>` and its record, the arguments in the registers the x86-64
/// System V ABI gives them; `$plain(args)` (rustc's call) where they do
/// not all fit (more than six integer words or four floats).
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_recorded_call {
    ([$($stub:tt)+] $args:ident $A:ident $R:ident, $plain:ident) => {{
        let args = $args;
                use $crate::arch::RecordedArgs as Args;
                if <$A as Args>::WORDS > 6 || <$A as Args>::SSE > $crate::arch::MAX_SSE {
                    return $plain(args);
                }
                #[allow(unused_variables)] // `sse`, where no float is recorded
                let (regs, sse) = args.into_registers();
                // Exactly the registers the arguments take: no register
                // set to a value nobody reads (constant matches, folded at
                // compile time).
                let (rax, rdx, xmm0) = match <$A as Args>::SSE {
                    // Without SSE registers no argument is a float (`f32`
                    // and `f64` are no `RecordedArg`s there): every
                    // recorded call is this one.
                    #[cfg(not(target_feature = "sse2"))]
                    _ => $crate::arch::recorded_gp!([$($stub)+] regs sse $A, []),
                    #[cfg(target_feature = "sse2")]
                    0 => $crate::arch::recorded_gp!([$($stub)+] regs sse $A, []),
                    #[cfg(target_feature = "sse2")]
                    1 => $crate::arch::recorded_gp!([$($stub)+] regs sse $A, ["xmm0" 0]),
                    #[cfg(target_feature = "sse2")]
                    2 => $crate::arch::recorded_gp!(
                        [$($stub)+] regs sse $A, ["xmm0" 0, "xmm1" 1]
                    ),
                    #[cfg(target_feature = "sse2")]
                    3 => $crate::arch::recorded_gp!(
                        [$($stub)+] regs sse $A, ["xmm0" 0, "xmm1" 1, "xmm2" 2]
                    ),
                    #[cfg(target_feature = "sse2")]
                    _ => $crate::arch::recorded_gp!(
                        [$($stub)+] regs sse $A,
                        ["xmm0" 0, "xmm1" 1, "xmm2" 2, "xmm3" 3]
                    ),
                };
                // SAFETY: the registers a function returning `R` left.
                unsafe { <$R as $crate::arch::RecordedRet>::from_registers(rax, rdx, xmm0) }
    }};
}
#[doc(hidden)]
pub use crate::__altpatch_recorded_call as recorded_call;

/// The recorded call of `$stub` for the SSE registers listed, by how many
/// general-purpose registers the arguments `$args` take.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_recorded_gp {
    ([$($stub:tt)+] $regs:ident $sse:ident $args:ident, [$($x:tt)*]) => {
        match <$args as $crate::arch::RecordedArgs>::WORDS {
            0 => $crate::arch::recorded_asm!([$($stub)+] $regs $sse, [], [$($x)*]),
            1 => $crate::arch::recorded_asm!([$($stub)+] $regs $sse, ["rdi" 0], [$($x)*]),
            2 => $crate::arch::recorded_asm!([$($stub)+] $regs $sse, ["rdi" 0, "rsi" 1], [$($x)*]),
            3 => $crate::arch::recorded_asm!(
                [$($stub)+] $regs $sse, ["rdi" 0, "rsi" 1], rdx 2, [$($x)*]
            ),
            4 => $crate::arch::recorded_asm!(
                [$($stub)+] $regs $sse, ["rdi" 0, "rsi" 1, "rcx" 3], rdx 2, [$($x)*]
            ),
            5 => $crate::arch::recorded_asm!(
                [$($stub)+] $regs $sse, ["rdi" 0, "rsi" 1, "rcx" 3, "r8" 4], rdx 2, [$($x)*]
            ),
            _ => $crate::arch::recorded_asm!(
                [$($stub)+] $regs $sse,
                ["rdi" 0, "rsi" 1, "rcx" 3, "r8" 4, "r9" 5], rdx 2, [$($x)*]
            ),
        }
    };
}
#[doc(hidden)]
pub use crate::__altpatch_recorded_gp as recorded_gp;

/// The `asm!` of a recorded call of `$stub` whose arguments take the
/// general-purpose registers listed (in order) and the SSE registers
/// listed: `call <stub>`, then its record. `rdx` carries the third
/// integer argument in, if there is one, and the result's second word out;
/// `xmm0` the first float argument in, if there is one, and a float
/// result out.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_recorded_asm {
    ([$($stub:tt)+] $regs:ident $sse:ident, [$($r:tt $i:tt),*], [$($x:tt $j:tt),*]) => {
        $crate::arch::recorded_asm!(@xmm [$($stub)+] $sse rdx [$($x $j),*]
            [$(inout($r) $regs[$i] => _,)* lateout("rdx") rdx,])
    };
    ([$($stub:tt)+] $regs:ident $sse:ident, [$($r:tt $i:tt),*], rdx $k:tt, [$($x:tt $j:tt),*]) => {
        $crate::arch::recorded_asm!(@xmm [$($stub)+] $sse rdx [$($x $j),*]
            [$(inout($r) $regs[$i] => _,)* inout("rdx") $regs[$k] => rdx,])
    };
    (@xmm [$($stub:tt)+] $sse:ident $rdx:ident [] [$($operands:tt)*]) => {
        $crate::arch::recorded_xmm!(@none [$($stub)+] $rdx [$($operands)*])
    };
    (@xmm [$($stub:tt)+] $sse:ident $rdx:ident ["xmm0" 0 $(, $x:tt $j:tt)*] [$($operands:tt)*]) => {{
        let xmm0: f64;
        let (rax, rdx) = $crate::arch::recorded_asm!(@asm [$($stub)+] $rdx
            [$($operands)* inout("xmm0") f64::from_bits($sse[0]) => xmm0,
             $(inout($x) f64::from_bits($sse[$j]) => _,)*]);
        (rax, rdx, xmm0.to_bits())
    }};
    (@asm [$($stub:tt)+] $rdx:ident [$($operands:tt)*]) => {{
        let rax: u64;
        let $rdx: u64;
        // SAFETY: the stub is a C-ABI function taking exactly these
        // registers' worth of arguments (`RecordedArgs` put each in the
        // register the ABI gives it) and returning `R` in `rax`/`rdx` or
        // `xmm0`; every caller-saved register is declared clobbered
        // (`clobber_abi`); without `nostack` the stack is aligned for a
        // call. The record only adds two offsets to a data section.
        unsafe {
            core::arch::asm!(
                "2:",
                "call {stub}",
                concat!(
                    ".pushsection ",
                    $crate::__altpatch_section!(call),
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

/// A recorded call with no float argument: `xmm0` is read back for a
/// float result where the target has SSE registers...
#[cfg(target_feature = "sse2")]
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_recorded_xmm {
    (@none [$($stub:tt)+] $rdx:ident [$($operands:tt)*]) => {{
        let xmm0: f64;
        let (rax, rdx) = $crate::arch::recorded_asm!(@asm [$($stub)+] $rdx
            [$($operands)* lateout("xmm0") xmm0,]);
        (rax, rdx, xmm0.to_bits())
    }};
}

/// ...and not named where it has none (`x86_64-unknown-none`: no float is
/// a `RecordedArg` or `RecordedRet` there, and `asm!` may not name an SSE
/// register).
#[cfg(not(target_feature = "sse2"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_recorded_xmm {
    (@none [$($stub:tt)+] $rdx:ident [$($operands:tt)*]) => {{
        let (rax, rdx) =
            $crate::arch::recorded_asm!(@asm [$($stub)+] $rdx [$($operands)*]);
        (rax, rdx, 0u64)
    }};
}
#[doc(hidden)]
pub use crate::__altpatch_recorded_asm as recorded_asm;
#[doc(hidden)]
pub use crate::__altpatch_recorded_xmm as recorded_xmm;
