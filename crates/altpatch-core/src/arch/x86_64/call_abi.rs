//! How `altpatch::alternative_call!` passes arguments
//! and takes results: in general-purpose registers, as the x86-64 System V
//! ABI (the C calling convention rustc gives `extern "C"` functions) does.
//!
//! The macro's `asm!` names registers, and a register holds one 64-bit
//! word; a slice or a `&str` is two. Each argument type says how many
//! words it takes and what they hold ([`CallArg`]); the words of all
//! arguments fill `rdi, rsi, rdx, rcx, r8, r9` in order, as the ABI fills
//! them, and a result comes back from `rax` (and `rdx`, [`CallRet`]).
//! Types the ABI passes elsewhere (`f32`/`f64` in SSE registers, larger
//! aggregates in memory) implement neither trait, so the macro refuses
//! them at compile time rather than pass them in the wrong registers.

use core::mem::{offset_of, size_of};
use core::ptr::NonNull;

/// A type `altpatch::alternative_call!` can pass: one
/// general-purpose register (integers up to 64 bits, `bool`, `char`, thin
/// pointers, references and function pointers) or two (`u128`, `i128`,
/// slices, `&str`, other fat pointers, pairs of two 8-byte values such as
/// `(u64, u64)`).
///
/// ```
/// use altpatch::alternative::CallArg;
/// assert_eq!(<u32 as CallArg>::WORDS, 1);
/// assert_eq!(<&[u8] as CallArg>::WORDS, 2);
/// assert_eq!((-1i8).into_words(), [u64::MAX, 0]); // sign-extended
/// let s = "hi";
/// assert_eq!(s.into_words(), [s.as_ptr() as u64, 2]);
/// ```
///
/// # Safety
///
/// `WORDS` (1 or 2) is how many general-purpose registers rustc passes a
/// value of this type to an `extern "C"` function in, and
/// [`into_words`](Self::into_words) gives their contents in order, with
/// every bit the callee may read as rustc sets it (integers narrower than
/// 32 bits sign- or zero-extended, as LLVM's callers do). A
/// `#[repr(C)]` struct of two `u64`s, say, may implement it with
/// `WORDS = 2` and its fields in order.
#[diagnostic::on_unimplemented(
    message = "`alternative_call!` cannot pass `{Self}` in general-purpose registers",
    note = "integers, `bool`, `char`, pointers, references (slices and `&str` too), \
            function pointers and pairs of 8-byte values go in one or two registers; \
            floating-point values and larger aggregates do not"
)]
pub unsafe trait CallArg {
    /// Registers taken: 1 or 2.
    const WORDS: usize;
    /// The registers' contents; the second is unused when `WORDS` is 1.
    fn into_words(self) -> [u64; 2];
}

/// A result `altpatch::alternative_call!` can take: what
/// a function returning it leaves in `rax` (and `rdx` for two-word types),
/// for the same types as [`CallArg`].
///
/// # Safety
///
/// [`from_words`](Self::from_words) rebuilds exactly the value an
/// `extern "C"` function compiled by rustc returning this type leaves in
/// `rax` and `rdx`, reading no bit the ABI leaves undefined.
#[diagnostic::on_unimplemented(
    message = "`alternative_call!` cannot return `{Self}` in general-purpose registers",
    note = "integers, `bool`, `char`, pointers, references, function pointers and pairs \
            of 8-byte values come back in `rax` (and `rdx`); floating-point values and \
            larger aggregates do not"
)]
pub unsafe trait CallRet: Sized {
    /// The value in `[rax, rdx]`.
    ///
    /// # Safety
    ///
    /// `words` are what a function returning `Self` left in `rax` and
    /// `rdx`.
    unsafe fn from_words(words: [u64; 2]) -> Self;
}

macro_rules! ints {
    ($($t:ty => $wide:ty),* $(,)?) => {$(
        // SAFETY: one register, extended to 64 bits by the type's
        // signedness (a superset of the 32-bit extension LLVM's callers
        // perform).
        unsafe impl CallArg for $t {
            const WORDS: usize = 1;
            #[inline(always)]
            fn into_words(self) -> [u64; 2] {
                [self as $wide as u64, 0]
            }
        }
        // SAFETY: the low bits of `rax` are the value; the rest are
        // truncated away.
        unsafe impl CallRet for $t {
            #[inline(always)]
            unsafe fn from_words(words: [u64; 2]) -> Self {
                words[0] as $t
            }
        }
    )*};
}

ints!(u8 => u64, u16 => u64, u32 => u64, u64 => u64, usize => u64,
      i8 => i64, i16 => i64, i32 => i64, i64 => i64, isize => i64);

// SAFETY: `bool` is passed zero-extended, 0 or 1.
unsafe impl CallArg for bool {
    const WORDS: usize = 1;
    #[inline(always)]
    fn into_words(self) -> [u64; 2] {
        [self as u64, 0]
    }
}

// SAFETY: the ABI returns `bool` in `al` as 0 or 1.
unsafe impl CallRet for bool {
    #[inline(always)]
    unsafe fn from_words(words: [u64; 2]) -> Self {
        words[0] as u8 != 0
    }
}

// SAFETY: a `char` is passed as its `u32`, zero-extended.
unsafe impl CallArg for char {
    const WORDS: usize = 1;
    #[inline(always)]
    fn into_words(self) -> [u64; 2] {
        [self as u64, 0]
    }
}

// SAFETY: `eax` holds a valid `char` (the function returned one).
unsafe impl CallRet for char {
    #[inline(always)]
    unsafe fn from_words(words: [u64; 2]) -> Self {
        // SAFETY: the caller's: these are a `char` function's registers.
        unsafe { char::from_u32_unchecked(words[0] as u32) }
    }
}

macro_rules! int128 {
    ($($t:ty),*) => {$(
        // SAFETY: rustc passes and returns a 128-bit integer in two
        // registers, low half first.
        unsafe impl CallArg for $t {
            const WORDS: usize = 2;
            #[inline(always)]
            fn into_words(self) -> [u64; 2] {
                [self as u64, (self >> 64) as u64]
            }
        }
        // SAFETY: as above, in `rax` (low) and `rdx` (high).
        unsafe impl CallRet for $t {
            #[inline(always)]
            unsafe fn from_words(words: [u64; 2]) -> Self {
                ((words[1] as u128) << 64 | words[0] as u128) as $t
            }
        }
    )*};
}

int128!(u128, i128);

/// The words of a pointer, thin (one) or fat (two: data, then length or
/// vtable): its bytes in order, which is how the ABI splits an aggregate
/// of integer words into registers. Pointers have no padding, so every
/// byte read is initialized.
#[inline(always)]
fn pointer_words<P>(p: P) -> [u64; 2] {
    const { assert!(size_of::<P>() == 8 || size_of::<P>() == 16) };
    let mut w = [0u64; 2];
    // SAFETY: `P` is a pointer of 8 or 16 initialized bytes (checked
    // above), copied into 16 writable bytes that do not overlap it.
    unsafe {
        core::ptr::copy_nonoverlapping(
            (&raw const p).cast::<u8>(),
            w.as_mut_ptr().cast::<u8>(),
            size_of::<P>(),
        )
    };
    w
}

/// The pointer of type `P` whose words these are (see [`pointer_words`]).
///
/// # Safety
///
/// The words are those of a valid `P`.
#[inline(always)]
unsafe fn pointer_from<P>(w: [u64; 2]) -> P {
    const { assert!(size_of::<P>() == 8 || size_of::<P>() == 16) };
    // SAFETY: at least `size_of::<P>()` bytes, holding a `P` by the
    // caller's contract; unaligned, since `P` may be more aligned than
    // the array.
    unsafe { core::ptr::read_unaligned(w.as_ptr().cast::<P>()) }
}

macro_rules! pointers {
    ($([$($g:tt)*] $t:ty),* $(,)?) => {$(
        // SAFETY: a pointer is one word (thin) or two (fat), passed and
        // returned as its bytes in order (see `pointer_words`).
        unsafe impl<$($g)*> CallArg for $t {
            const WORDS: usize = size_of::<$t>() / 8;
            #[inline(always)]
            fn into_words(self) -> [u64; 2] {
                pointer_words(self)
            }
        }
        // SAFETY: as above, from `rax` (and `rdx`).
        unsafe impl<$($g)*> CallRet for $t {
            #[inline(always)]
            unsafe fn from_words(words: [u64; 2]) -> Self {
                // SAFETY: the caller's: the registers of a function
                // returning this pointer type.
                unsafe { pointer_from(words) }
            }
        }
    )*};
}

pointers!(
    [T: ?Sized] *const T,
    [T: ?Sized] *mut T,
    ['a, T: ?Sized] &'a T,
    ['a, T: ?Sized] &'a mut T,
    [T: ?Sized] NonNull<T>,
    // Thin only: `None` of a fat pointer leaves its second word
    // uninitialized.
    ['a, T] Option<&'a T>,
    ['a, T] Option<&'a mut T>,
    [T] Option<NonNull<T>>,
);

macro_rules! fn_pointers {
    ($(($($a:ident),*)),* $(,)?) => {$(
        pointers!(
            [R, $($a),*] extern "C" fn($($a),*) -> R,
            [R, $($a),*] unsafe extern "C" fn($($a),*) -> R,
            [R, $($a),*] fn($($a),*) -> R,
            [R, $($a),*] unsafe fn($($a),*) -> R,
            [R, $($a),*] Option<extern "C" fn($($a),*) -> R>,
            [R, $($a),*] Option<unsafe extern "C" fn($($a),*) -> R>,
            [R, $($a),*] Option<fn($($a),*) -> R>,
            [R, $($a),*] Option<unsafe fn($($a),*) -> R>,
        );
    )*};
}

fn_pointers!(
    (),
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F)
);

/// The word of an 8-byte, one-register value of a pair.
#[inline(always)]
fn one_word<T: CallArg>(v: T) -> u64 {
    const {
        assert!(
            T::WORDS == 1 && size_of::<T>() == 8,
            "altpatch: a pair `alternative_call!` passes holds two 8-byte values"
        )
    };
    v.into_words()[0]
}

// SAFETY: two 8-byte integer words, passed as the tuple's bytes in
// order: each field's word goes where its offset puts it.
unsafe impl<A: CallArg, B: CallArg> CallArg for (A, B) {
    const WORDS: usize = 2;
    #[inline(always)]
    fn into_words(self) -> [u64; 2] {
        let (a, b) = (one_word(self.0), one_word(self.1));
        if offset_of!((A, B), 0) == 0 {
            [a, b]
        } else {
            [b, a]
        }
    }
}

// SAFETY: as above, from `rax` and `rdx`; each field is rebuilt from
// its own word.
unsafe impl<A: CallArg + CallRet, B: CallArg + CallRet> CallRet for (A, B) {
    #[inline(always)]
    unsafe fn from_words(words: [u64; 2]) -> Self {
        const { assert!(A::WORDS == 1 && B::WORDS == 1 && size_of::<(A, B)>() == 16) };
        let (wa, wb) = if offset_of!((A, B), 0) == 0 {
            (words[0], words[1])
        } else {
            (words[1], words[0])
        };
        // SAFETY: the caller's: each word is its field's register.
        unsafe { (A::from_words([wa, 0]), B::from_words([wb, 0])) }
    }
}

/// The arguments of one call, as a tuple: their words in argument order,
/// the six registers `rdi, rsi, rdx, rcx, r8, r9` (those past the last
/// argument's words are 0). Used by `alternative_call!`.
#[doc(hidden)]
pub trait CallArgs {
    /// Registers the arguments take.
    const WORDS: usize;
    /// The six registers' contents.
    fn into_registers(self) -> [u64; 6];
}

macro_rules! arg_lists {
    ($(($($a:ident),*)),* $(,)?) => {$(
        impl<$($a: CallArg),*> CallArgs for ($($a,)*) {
            const WORDS: usize = 0 $(+ $a::WORDS)*;
            #[allow(non_snake_case, unused_mut, unused_variables, unused_assignments)]
            #[inline(always)]
            fn into_registers(self) -> [u64; 6] {
                // More than six words is refused where a call is made of
                // them (`alternative_call!`'s own check; `ifunc!` calls
                // such a function as rustc does), not here: a branch not
                // taken may name this function.
                let ($($a,)*) = self;
                let mut regs = [0u64; 6];
                let mut at = 0;
                $(
                    let w = $a.into_words();
                    regs[at] = w[0];
                    if $a::WORDS == 2 {
                        regs[at + 1] = w[1];
                    }
                    at += $a::WORDS;
                )*
                regs
            }
        }
    )*};
}

arg_lists!(
    (),
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F)
);

// SAFETY: a function returning nothing leaves nothing to read.
unsafe impl CallRet for () {
    #[inline(always)]
    unsafe fn from_words(_: [u64; 2]) -> Self {}
}

/// The result of a call from `[rax, rdx]`. Used by `alternative_call!`.
///
/// # Safety
///
/// As for [`CallRet::from_words`].
#[doc(hidden)]
#[inline(always)]
pub unsafe fn call_result<R: CallRet>(rax: u64, rdx: u64) -> R {
    // SAFETY: the caller's.
    unsafe { R::from_words([rax, rdx]) }
}
