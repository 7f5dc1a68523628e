//! Typed closures behind trampolines.
//!
//! A closure's trampoline slot holds the boxed closure (data, so `r10` on
//! entry) and an *entry* monomorphized for the closure type and signature:
//! a naked function (the arch's `closure_entry!`) that moves `r10` into
//! the integer register after the ones the arguments take (SysV passes integer arguments in rdi, rsi, rdx,
//! rcx, r8, r9; floats take none) and jumps, directly, to the handler: an
//! ordinary `extern "C"` function of `(arguments..., closure)`. Floating-point arguments (xmm0-7),
//! the stack and the return address are untouched (the entry jumps, it
//! does not call), so the handler returns straight to the original caller;
//! a call costs the trampoline's one indirect jump and a few moves.
//!
//! That is why a signature has at most five arguments (six integer
//! registers, one taken by the closure) and why every argument must travel
//! in one register ([`Arg`]): a by-value struct or a 128-bit integer would
//! split across registers or the stack, which the entry does not move.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use super::{Pool, Trampoline, TrampolineError};

mod sealed {
    pub trait Sealed {}
    /// Only the crate's blanket impls over `Fn` may be `ClosureFn`: the
    /// entry they return must be the one for the closure's own type (an
    /// impl elsewhere could return another type's entry, which would read
    /// the closure as that type).
    pub trait SealedFn<S> {}
}

/// A type a closure can take from C: passed in one integer or SSE register
/// under the SysV ABI (integers up to 64 bits, `bool`, `f32`, `f64`, raw
/// pointers).
///
/// ```compile_fail,E0277
/// // 128-bit integers take two registers: refused at compile time.
/// let c = altpatch::trampoline::Closure::<unsafe extern "C" fn(u128)>::new(|_| {});
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument or result of a trampoline closure",
    note = "closure arguments and results must each fit one SysV register: integers up to 64 bits, bool, f32, f64, raw pointers"
)]
pub trait Arg: Copy + sealed::Sealed {
    #[doc(hidden)]
    /// Integer registers the type takes: 1, or 0 for `f32`/`f64` (SSE).
    const INTEGER_REGS: usize;
}

/// A type a closure can return to C: `()` or any [`Arg`].
///
/// ```compile_fail,E0277
/// struct Pair(u64, u64);
/// let c = altpatch::trampoline::Closure::<unsafe extern "C" fn() -> Pair>::new(|| Pair(1, 2));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the result of a trampoline closure",
    note = "a result must be `()` or fit one SysV register: integers up to 64 bits, bool, f32, f64, raw pointers"
)]
pub trait Ret: sealed::Sealed {}

macro_rules! register_types {
    ($regs:literal: $($t:ty),*) => {
        $(
            impl sealed::Sealed for $t {}
            impl Arg for $t {
                const INTEGER_REGS: usize = $regs;
            }
            impl Ret for $t {}
        )*
    };
}
register_types!(1: u8, u16, u32, u64, usize, i8, i16, i32, i64, isize, bool);
register_types!(0: f32, f64);
impl<T> sealed::Sealed for *const T {}
impl<T> Arg for *const T {
    const INTEGER_REGS: usize = 1;
}
impl<T> Ret for *const T {}
impl<T> sealed::Sealed for *mut T {}
impl<T> Arg for *mut T {
    const INTEGER_REGS: usize = 1;
}
impl<T> Ret for *mut T {}
impl sealed::Sealed for () {}
impl Ret for () {}

/// A function-pointer type a [`Closure`] can be called through:
/// `unsafe extern "C" fn(A1, .., An) -> R` with `n` ≤ 5, each `Ai` an
/// [`Arg`] and `R` a [`Ret`].
///
/// The pointer is `unsafe` to call because it is only valid while its
/// `Closure` lives, and only from threads the closure may run on.
///
/// ```compile_fail,E0277
/// // Six arguments: the closure pointer would push the sixth onto the stack.
/// type Six = unsafe extern "C" fn(u8, u8, u8, u8, u8, u8);
/// let c = altpatch::trampoline::Closure::<Six>::new(|_, _, _, _, _, _| {});
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a trampoline closure signature",
    note = "use `unsafe extern \"C\" fn(A1, .., An) -> R` with at most five arguments"
)]
pub trait Signature: Copy + sealed::Sealed {
    #[doc(hidden)]
    /// # Safety
    ///
    /// `code` is a function of this signature.
    unsafe fn from_code(code: *const c_void) -> Self;
}

/// A Rust closure that can stand behind signature `S`: implemented for
/// every `F: Fn(A1, .., An) -> R` matching `S`, and only by this crate
/// (the entry it names must be the closure type's own):
///
/// ```compile_fail,E0277
/// use altpatch::trampoline::ClosureFn;
/// struct NotAClosure;
/// extern "C" fn some_other_entry() {}
/// impl ClosureFn<unsafe extern "C" fn()> for NotAClosure {
///     // Would make `Closure::new(NotAClosure)` jump to an entry that reads
///     // the box as another type: refused, the trait is sealed.
///     fn entry() -> unsafe extern "C" fn() {
///         some_other_entry
///     }
/// }
/// ```
pub trait ClosureFn<S: Signature>: sealed::SealedFn<S> {
    #[doc(hidden)]
    /// The entry the trampoline jumps to, as a raw target.
    fn entry() -> unsafe extern "C" fn();
}

/// Ends the process: a panic may not unwind into the closure's (C) caller.
/// The panic hook has already printed the panic itself.
#[cold]
fn panicked() -> ! {
    super::abort_with(
        "a closure called through a trampoline panicked; it cannot unwind into its caller",
    )
}

/// A signature of arity n: its `Signature` and `ClosureFn` impls, its
/// handler, and its n + 1 entries (one per count of integer registers the
/// arguments take, floats taking none).
macro_rules! signature {
    ($handler:ident; [$($entry:ident = $n:tt),*]; $tys:tt; $($a:ident : $A:ident),*) => {
        impl<R: Ret, $($A: Arg),*> sealed::Sealed for unsafe extern "C" fn($($A),*) -> R {}

        impl<R: Ret, $($A: Arg),*> Signature for unsafe extern "C" fn($($A),*) -> R {
            unsafe fn from_code(code: *const c_void) -> Self {
                // SAFETY: function pointers and data pointers have the same
                // size; the caller vouches for the signature.
                unsafe { core::mem::transmute::<*const c_void, Self>(code) }
            }
        }

        impl<R: Ret, $($A: Arg,)* F: Fn($($A),*) -> R> sealed::SealedFn<unsafe extern "C" fn($($A),*) -> R> for F {}

        impl<R: Ret, $($A: Arg,)* F: Fn($($A),*) -> R> ClosureFn<unsafe extern "C" fn($($A),*) -> R> for F {
            fn entry() -> unsafe extern "C" fn() {
                // The closure travels after the caller's arguments, in the
                // integer register after the ones they take.
                let integer_regs = 0 $(+ <$A as Arg>::INTEGER_REGS)*;
                let entries: &[unsafe extern "C" fn()] = &[$(entry_of!($entry, $tys)),*];
                entries[integer_regs]
            }
        }

        $(closure_entry!($entry, $n, $handler, $tys);)*

        /// Runs the closure; a panic ends the process (it may not unwind
        /// into the caller, which may be C).
        extern "C" fn $handler<F: Fn($($A),*) -> R, R, $($A),*>(
            $($a: $A,)*
            f: *const c_void,
        ) -> R {
            // SAFETY: the entry passes the slot's data word: the boxed `F`
            // this entry was chosen for, alive while the trampoline is
            // allocated (the closure frees it after the trampoline).
            let f = unsafe { &*f.cast::<F>() };
            match std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| f($($a),*))) {
                Ok(r) => r,
                Err(_) => panicked(),
            }
        }
    };
}

/// Entry `$entry` instantiated for the caller's `F`, `R` and argument types.
macro_rules! entry_of {
    ($entry:ident, ($($A:ident),*)) => {
        $entry::<F, R, $($A),*>
    };
}

// One entry per register count: the architecture's `closure_entry!`
// (arch/x86_64/closure_table.rs) moves the closure into the integer
// argument register after the `$n` the arguments take, and jumps to the
// handler.
use crate::arch::closure_entry;

signature!(handler0; [entry0_0 = 0]; (); );
signature!(handler1; [entry1_0 = 0, entry1_1 = 1]; (A1); a1: A1);
signature!(
    handler2; [entry2_0 = 0, entry2_1 = 1, entry2_2 = 2]; (A1, A2);
    a1: A1, a2: A2
);
signature!(
    handler3; [entry3_0 = 0, entry3_1 = 1, entry3_2 = 2, entry3_3 = 3];
    (A1, A2, A3); a1: A1, a2: A2, a3: A3
);
signature!(
    handler4;
    [entry4_0 = 0, entry4_1 = 1, entry4_2 = 2, entry4_3 = 3, entry4_4 = 4];
    (A1, A2, A3, A4); a1: A1, a2: A2, a3: A3, a4: A4
);
signature!(
    handler5;
    [
        entry5_0 = 0, entry5_1 = 1, entry5_2 = 2, entry5_3 = 3,
        entry5_4 = 4, entry5_5 = 5
    ];
    (A1, A2, A3, A4, A5); a1: A1, a2: A2, a3: A3, a4: A4, a5: A5
);

/// A Rust closure behind a C function pointer of signature `S`.
///
/// The closure may borrow (`'a`); the pointer from [`Closure::code`] is
/// valid while the `Closure` lives. Dropping it frees the closure and gives
/// its trampoline back to the pool.
///
/// Rust infers a closure's argument types from an `Fn` bound only, and the
/// bound here is [`ClosureFn<S>`]: annotate the arguments where their use
/// does not fix them.
///
/// A C consumer with state, `qsort` ordering by a key table the closure
/// borrows:
///
/// ```
/// use altpatch::trampoline::Closure;
/// use core::ffi::c_void;
///
/// let weight = [30, 10, 20];
/// type Cmp = unsafe extern "C" fn(*const c_void, *const c_void) -> i32;
/// let by_weight = Closure::<Cmp>::new(|a: *const c_void, b: *const c_void| {
///     // SAFETY: qsort passes pointers to elements of `items`.
///     let (a, b) = unsafe { (*a.cast::<usize>(), *b.cast::<usize>()) };
///     weight[a] - weight[b]
/// })
/// .unwrap();
/// let mut items = [0usize, 1, 2];
/// // SAFETY: a valid array, element size and comparator; `by_weight` outlives the call.
/// unsafe { libc::qsort(items.as_mut_ptr().cast(), 3, 8, Some(by_weight.code())) };
/// assert_eq!(items, [1, 2, 0]);
/// ```
pub struct Closure<'a, S: Signature> {
    trampoline: ManuallyDrop<Trampoline<'a>>,
    inner: NonNull<c_void>,
    drop_inner: unsafe fn(NonNull<c_void>),
    /// The closure may borrow for `'a` and need not be `Send` or `Sync`.
    _marker: PhantomData<(S, *mut &'a ())>,
}

/// Frees the boxed `F` behind `p`.
///
/// # Safety
///
/// `p` came from `Box::<F>::leak` and is not used again.
unsafe fn drop_inner<F>(p: NonNull<c_void>) {
    // SAFETY: the contract above.
    drop(unsafe { alloc::boxed::Box::from_raw(p.cast::<F>().as_ptr()) });
}

impl<'a, S: Signature> Closure<'a, S> {
    /// `f` behind a trampoline of the [global pool](Pool::global).
    ///
    /// ```
    /// use altpatch::trampoline::Closure;
    /// let scale = 2.5;
    /// let c = Closure::<unsafe extern "C" fn(f64, u32) -> f64>::new(move |x, n| x * scale + n as f64)
    ///     .unwrap();
    /// // SAFETY: `c` is alive.
    /// assert_eq!(unsafe { c.code()(2.0, 1) }, 6.0);
    /// ```
    pub fn new<F: ClosureFn<S> + 'a>(f: F) -> Result<Self, TrampolineError> {
        Closure::new_in(Pool::global(), f)
    }

    /// `f` behind a trampoline of `pool`.
    ///
    /// ```
    /// use altpatch::trampoline::{Closure, Pool};
    /// let pool = Pool::new();
    /// let hits = core::cell::Cell::new(0);
    /// let c = Closure::<unsafe extern "C" fn()>::new_in(&pool, || hits.set(hits.get() + 1)).unwrap();
    /// // SAFETY: `c` is alive and runs on this thread.
    /// unsafe { c.code()() };
    /// assert_eq!(hits.get(), 1);
    /// ```
    pub fn new_in<F: ClosureFn<S> + 'a>(pool: &'a Pool, f: F) -> Result<Self, TrampolineError> {
        let inner = NonNull::from(alloc::boxed::Box::leak(alloc::boxed::Box::new(f))).cast();
        match Trampoline::new_in(pool, F::entry(), inner.as_ptr()) {
            Ok(t) => Ok(Closure {
                trampoline: ManuallyDrop::new(t),
                inner,
                drop_inner: drop_inner::<F>,
                _marker: PhantomData,
            }),
            Err(e) => {
                // SAFETY: the block from just above, never shared.
                unsafe { drop_inner::<F>(inner) };
                Err(e)
            }
        }
    }

    /// The function pointer that calls the closure.
    ///
    /// # Safety of calling it
    ///
    /// Call it only while this `Closure` lives, and from another thread only
    /// if the closure may be shared with it (`F: Sync`, and `Send` for its
    /// captures): the pointer carries neither fact.
    ///
    /// See the [type's example](Closure).
    pub fn code(&self) -> S {
        // SAFETY: the trampoline reaches the handler for `S` (chosen by
        // `ClosureFn<S>` at construction).
        unsafe { S::from_code(self.trampoline.code()) }
    }

    /// The code address as a raw pointer.
    ///
    /// ```
    /// use altpatch::trampoline::Closure;
    /// let c = Closure::<unsafe extern "C" fn()>::new(|| {}).unwrap();
    /// assert_eq!(c.as_ptr(), c.code() as *const core::ffi::c_void);
    /// ```
    pub fn as_ptr(&self) -> *const c_void {
        self.trampoline.code()
    }
}

impl<S: Signature> Drop for Closure<'_, S> {
    fn drop(&mut self) {
        // The trampoline first, so a stray call finds it freed (and
        // reports) rather than reaching a freed closure.
        // SAFETY: dropped once, here; not used again.
        unsafe { ManuallyDrop::drop(&mut self.trampoline) };
        // SAFETY: `inner` came from `Box::<F>::leak` with the `F`
        // `drop_inner` was instantiated for.
        unsafe { (self.drop_inner)(self.inner) };
    }
}

impl<S: Signature> core::fmt::Debug for Closure<'_, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Closure({:p})", self.as_ptr())
    }
}
