//! Where a recorded call puts its arguments and finds its result: the
//! x86-64 System V classes, INTEGER and SSE.
//!
//! `alternative_call!`'s [`CallArg`]s (integers, pointers, references,
//! slices, `&str`, pairs) go in the general-purpose registers
//! `rdi, rsi, rdx, rcx, r8, r9`; `f32` and `f64` go in `xmm0, xmm1, ...`.
//! The ABI fills each class's registers in argument order, independently
//! of the other class (`fn(x: f32, v: &[f32], k: f64)` passes `x` in
//! `xmm0`, `v` in `rdi`/`rsi`, `k` in `xmm1`). A result comes back in
//! `rax` (and `rdx`), or `xmm0` for a float. A signature that would put
//! anything on the stack (more than six integer registers' worth, more
//! than [`MAX_SSE`] floats) is not recorded: rustc makes that call.

use super::call_abi::{CallArg, CallRet};

/// Floats a recorded call passes at most (`xmm0`–`xmm3`); more, and rustc
/// makes the call.
pub const MAX_SSE: usize = 4;

/// One argument of a recorded call: INTEGER class (every [`CallArg`]) or
/// SSE class (`f32`, `f64`).
///
/// # Safety
///
/// `WORDS` general-purpose registers (1 or 2) or `SSE` SSE registers (1)
/// hold the value when rustc passes it to an `extern "C"` function, and
/// [`into_parts`](Self::into_parts) gives their contents in order (an SSE
/// register's low 64 bits in the first word).
#[doc(hidden)]
pub unsafe trait RecordedArg {
    /// General-purpose registers taken.
    const WORDS: usize;
    /// SSE registers taken.
    const SSE: usize;
    /// The registers' contents.
    fn into_parts(self) -> [u64; 2];
}

// SAFETY: `CallArg`'s contract is this one for the INTEGER class.
unsafe impl<T: CallArg> RecordedArg for T {
    const WORDS: usize = T::WORDS;
    const SSE: usize = 0;
    #[inline(always)]
    fn into_parts(self) -> [u64; 2] {
        self.into_words()
    }
}

// SAFETY: an `f32` argument is the low 32 bits of an SSE register (the
// callee reads no more). Only where the target passes floats in SSE
// registers (not `x86_64-unknown-none`, whose floats are soft).
#[cfg(target_feature = "sse2")]
unsafe impl RecordedArg for f32 {
    const WORDS: usize = 0;
    const SSE: usize = 1;
    #[inline(always)]
    fn into_parts(self) -> [u64; 2] {
        [u64::from(self.to_bits()), 0]
    }
}

// SAFETY: an `f64` argument is the low 64 bits of an SSE register.
#[cfg(target_feature = "sse2")]
unsafe impl RecordedArg for f64 {
    const WORDS: usize = 0;
    const SSE: usize = 1;
    #[inline(always)]
    fn into_parts(self) -> [u64; 2] {
        [self.to_bits(), 0]
    }
}

/// The arguments of a recorded call, as a tuple: their general-purpose
/// registers (`rdi, rsi, rdx, rcx, r8, r9`) and SSE registers (`xmm0`...)
/// in order, those past the last argument's 0.
#[doc(hidden)]
pub trait RecordedArgs {
    /// General-purpose registers the arguments take.
    const WORDS: usize;
    /// SSE registers the arguments take.
    const SSE: usize;
    /// The registers' contents.
    fn into_registers(self) -> ([u64; 6], [u64; MAX_SSE]);
}

macro_rules! recorded_arg_lists {
    ($(($($a:ident),*)),* $(,)?) => {$(
        impl<$($a: RecordedArg),*> RecordedArgs for ($($a,)*) {
            const WORDS: usize = 0 $(+ $a::WORDS)*;
            const SSE: usize = 0 $(+ $a::SSE)*;
            #[allow(non_snake_case, unused_mut, unused_variables, unused_assignments)]
            #[inline(always)]
            fn into_registers(self) -> ([u64; 6], [u64; MAX_SSE]) {
                // Too many of either is refused where the call is made
                // (rustc's call instead), not here: a branch not taken
                // may name this function. The indices are clamped so such
                // a branch still compiles without a panic path.
                let ($($a,)*) = self;
                let mut regs = [0u64; 6];
                let mut sse = [0u64; MAX_SSE];
                let (mut at, mut s) = (0, 0);
                $(
                    let w = $a.into_parts();
                    if $a::SSE == 1 {
                        sse[s.min(MAX_SSE - 1)] = w[0];
                        s += 1;
                    } else {
                        regs[at.min(5)] = w[0];
                        if $a::WORDS == 2 {
                            regs[(at + 1).min(5)] = w[1];
                        }
                        at += $a::WORDS;
                    }
                )*
                (regs, sse)
            }
        }
    )*};
}

recorded_arg_lists!(
    (),
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F)
);

/// The result of a recorded call: what a function returning it leaves in
/// `rax`/`rdx` (every [`CallRet`]) or in `xmm0` (`f32`, `f64`).
///
/// # Safety
///
/// [`from_registers`](Self::from_registers) rebuilds exactly the value an
/// `extern "C"` function compiled by rustc returning this type leaves,
/// reading no bit the ABI leaves undefined.
#[doc(hidden)]
pub unsafe trait RecordedRet: Sized {
    /// The value from the registers a call returned with.
    ///
    /// # Safety
    ///
    /// `rax`, `rdx` and `xmm0` (its low 64 bits) are what a function
    /// returning `Self` left.
    unsafe fn from_registers(rax: u64, rdx: u64, xmm0: u64) -> Self;
}

// SAFETY: `CallRet`'s contract is this one for the INTEGER class.
unsafe impl<T: CallRet> RecordedRet for T {
    #[inline(always)]
    unsafe fn from_registers(rax: u64, rdx: u64, _: u64) -> Self {
        // SAFETY: the caller's.
        unsafe { T::from_words([rax, rdx]) }
    }
}

// SAFETY: an `f32` result is the low 32 bits of `xmm0`.
#[cfg(target_feature = "sse2")]
unsafe impl RecordedRet for f32 {
    #[inline(always)]
    unsafe fn from_registers(_: u64, _: u64, xmm0: u64) -> Self {
        f32::from_bits(xmm0 as u32)
    }
}

// SAFETY: an `f64` result is the low 64 bits of `xmm0`.
#[cfg(target_feature = "sse2")]
unsafe impl RecordedRet for f64 {
    #[inline(always)]
    unsafe fn from_registers(_: u64, _: u64, xmm0: u64) -> Self {
        f64::from_bits(xmm0)
    }
}

#[cfg(all(test, target_feature = "sse2"))]
mod tests {
    use super::{MAX_SSE, RecordedArgs};

    #[test]
    fn each_class_fills_its_registers_in_order() {
        let v = [1.0f32, 2.0];
        let (regs, sse) = (0.5f32, &v[..], 7u8, -2.0f64).into_registers();
        assert_eq!(<(f32, &[f32], u8, f64) as RecordedArgs>::WORDS, 3);
        assert_eq!(<(f32, &[f32], u8, f64) as RecordedArgs>::SSE, 2);
        assert_eq!(regs, [v.as_ptr() as u64, 2, 7, 0, 0, 0]);
        assert_eq!(
            sse,
            [u64::from(0.5f32.to_bits()), (-2.0f64).to_bits(), 0, 0]
        );
        assert_eq!(MAX_SSE, 4);
    }
}
