//! Calls to an ifunc that record themselves: `call <stub>` assembled by the
//! caller, with a record of where.
//!
//! `ifunc!`'s function is `#[inline(always)]`, so its body lands in every
//! caller, in whatever crate. Left to rustc, a caller in another crate (or
//! another codegen unit) reaches the stub through the GOT: the load hoisted
//! out of a loop, then `call *%reg`, a site no relocation survives to name.
//! So where the C ABI passes every argument and the result in the integer
//! registers (`CallArgs`/`CallRet`: integers, pointers, references,
//! slices, `&str`, `u128`, pairs), the body is an `asm!` block instead:
//! `call <stub>`, assembled as a direct `call rel32`, and an
//! [`IfuncCallRecord`](crate::records::IfuncCallRecord) of its address and
//! the stub's in this copy's `icall` section. Patching at load
//! (`startup.rs`) rewrites each recorded `call` to `call <impl>` after
//! comparing its 5 bytes with the `call <stub>` the record promises: the
//! record names an instruction boundary the assembler made, so nothing is
//! decoded and nothing is guessed.
//!
//! Other signatures (a float argument or result, more than six registers'
//! worth) keep rustc's own call to the stub, chosen at compile time by
//! autoref specialization ([`Recorded`] is tried before [`Plain`]).

use core::marker::PhantomData;

use crate::alternative::{CallArgs, CallRet};

/// What `ifunc!` implements for the type it declares (not a public
/// interface): its stub, where a generic `asm!` can name it.
///
/// # Safety
///
/// `__altpatch_ifunc_stub` is the ifunc's stub: a function of the C ABI
/// whose real signature is the ifunc's (the `A` and `R` of every
/// [`Probe`] naming this type).
#[doc(hidden)]
pub unsafe trait IfuncStub {
    /// The stub.
    extern "C" fn __altpatch_ifunc_stub();
}

/// The call of the ifunc `T` taking the tuple `A`, returning `R`:
/// `(&&Probe::<T, A, R>::NEW).call(args, plain)` picks [`Recorded`] where
/// the signature allows it, [`Plain`] (which calls `plain(args)`)
/// otherwise.
#[doc(hidden)]
pub struct Probe<T, A, R>(PhantomData<Signature<T, A, R>>);

/// What a [`Probe`] stands for: the ifunc `T`, called with `A`, giving `R`.
type Signature<T, A, R> = (fn(A) -> R, T);

impl<T, A, R> Probe<T, A, R> {
    /// The probe (a value to call through).
    pub const NEW: Self = Probe(PhantomData);
}

/// The recorded call (see the module docs).
#[doc(hidden)]
pub trait Recorded<A, R> {
    /// Calls the stub through a recorded `call rel32`.
    fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R;
}

/// rustc's own call, for signatures [`Recorded`] cannot pass.
#[doc(hidden)]
pub trait Plain<A, R> {
    /// Calls `plain(args)`: the stub, as rustc calls a function.
    fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R;
}

impl<T, A, R> Plain<A, R> for Probe<T, A, R> {
    #[inline(always)]
    fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R {
        plain(args)
    }
}

/// The `asm!` of a recorded call of `T`'s stub whose arguments take the registers
/// listed (in order): `call <stub>`, then its record. `rdx` carries the
/// third argument in, if there is one, and the result's second word out.
macro_rules! recorded {
    ($regs:ident, [$($r:tt $i:tt),*]) => {
        recorded!(@asm rdx [$(inout($r) $regs[$i] => _,)* lateout("rdx") rdx,])
    };
    ($regs:ident, [$($r:tt $i:tt),*], rdx $k:tt) => {
        recorded!(@asm rdx [$(inout($r) $regs[$i] => _,)* inout("rdx") $regs[$k] => rdx,])
    };
    (@asm $rdx:ident [$($operands:tt)*]) => {{
        let rax: u64;
        let $rdx: u64;
        // SAFETY: the stub is a C-ABI function taking exactly these
        // registers' worth of arguments (`CallArgs` put each in the
        // registers the ABI gives it) and returning `R` in `rax`/`rdx`;
        // every caller-saved register is declared clobbered
        // (`clobber_abi`); without `nostack` the stack is aligned for a
        // call. The record only adds two offsets to a data section.
        unsafe {
            core::arch::asm!(
                "2:",
                "call {stub}",
                concat!(
                    ".pushsection ",
                    crate::records::section_name!(icall),
                    ",\"aR\",@progbits\n.balign 4"
                ),
                ".long 2b - .",
                ".long {stub} - .",
                ".popsection",
                stub = sym <T as IfuncStub>::__altpatch_ifunc_stub,
                $($operands)*
                lateout("rax") rax,
                clobber_abi("C"),
            )
        };
        (rax, $rdx)
    }};
}

impl<T: IfuncStub, A: CallArgs, R: CallRet> Recorded<A, R> for &Probe<T, A, R> {
    #[inline(always)]
    fn call(&self, args: A, plain: impl FnOnce(A) -> R) -> R {
        if <A as CallArgs>::WORDS > 6 {
            return plain(args);
        }
        let regs = args.into_registers();
        // Exactly the registers the arguments take: no register set to a
        // value nobody reads (a constant match, folded at compile time).
        let (rax, rdx) = match <A as CallArgs>::WORDS {
            0 => recorded!(regs, []),
            1 => recorded!(regs, ["rdi" 0]),
            2 => recorded!(regs, ["rdi" 0, "rsi" 1]),
            3 => recorded!(regs, ["rdi" 0, "rsi" 1], rdx 2),
            4 => recorded!(regs, ["rdi" 0, "rsi" 1, "rcx" 3], rdx 2
            ),
            5 => recorded!(regs, ["rdi" 0, "rsi" 1, "rcx" 3, "r8" 4], rdx 2
            ),
            _ => recorded!(regs,
                ["rdi" 0, "rsi" 1, "rcx" 3, "r8" 4, "r9" 5], rdx 2
            ),
        };
        // SAFETY: the registers a function returning `R` left.
        unsafe { crate::alternative::__call_result::<R>(rax, rdx) }
    }
}

/// Adds to `edits` the rewrite of each recorded call of a stub in
/// `targets` (`(stub, chosen)`, sorted by stub) into `call <chosen>`, each
/// checked as bytes: the 5 bytes at the record's site must be the
/// `call <stub>` it was assembled as. Returns how many calls were added
/// and how many were left calling the stub: those straddling two pages
/// (a page swap changes one page at a time) and those holding other
/// bytes (a breakpoint, or a site some other tool rewrote). Calls of
/// stubs not in `targets` (another object's, reached through its PLT) and
/// calls already direct are skipped.
#[cfg(all(feature = "std", target_os = "linux"))]
pub(super) fn call_edits(
    image: &crate::image::Image<'_>,
    targets: &[(usize, usize)],
    edits: &mut alloc::vec::Vec<crate::os::linux::JmpEdit>,
) -> (usize, usize) {
    use crate::poke::PAGE_SIZE;
    let (mut added, mut left) = (0, 0);
    for r in crate::records::current_ifunc_calls() {
        let (site, stub) = (r.site(), r.stub());
        let Ok(i) = targets.binary_search_by_key(&stub, |t| t.0) else {
            continue;
        };
        let chosen = targets[i].1;
        if !image.contains_text(site, 5) {
            continue;
        }
        let (Ok(old), Ok(new)) = (
            crate::x86::call_rel32(site, stub),
            crate::x86::call_rel32(site, chosen),
        ) else {
            left += 1;
            continue;
        };
        // SAFETY: inside the image's text, readable.
        let now = unsafe { core::ptr::read_unaligned(site as *const [u8; 5]) };
        if now == new[..] {
            continue;
        }
        if now != old[..] || site / PAGE_SIZE != (site + 4) / PAGE_SIZE {
            left += 1;
            continue;
        }
        let mut e = crate::os::linux::JmpEdit {
            addr: site,
            old: [0; 5],
            new: [0; 5],
        };
        e.old.copy_from_slice(&old);
        e.new.copy_from_slice(&new);
        edits.push(e);
        added += 1;
    }
    (added, left)
}

impl super::Ifunc {
    /// The calls of this ifunc its function recorded in the object this
    /// copy of altpatch is linked into (see the [`ifunc!`] docs: every
    /// caller whose arguments and result the C ABI passes in integer
    /// registers). Patching at load rewrites each to `call <impl>`.
    ///
    /// ```
    /// altpatch::ifunc! {
    ///     fn twice(x: u64) -> u64 = |_| twice::c_fn(|x: u64| 2 * x);
    /// }
    /// fn main() {
    ///     assert_eq!(twice(21), 42);
    ///     assert!(!twice::ifunc().recorded_calls().is_empty());
    /// }
    /// ```
    ///
    /// [`ifunc!`]: macro@crate::ifunc
    pub fn recorded_calls(&self) -> alloc::vec::Vec<usize> {
        let stub = self.stub();
        crate::records::current_ifunc_calls()
            .iter()
            .filter(|r| r.stub() == stub)
            .map(|r| r.site())
            .collect()
    }
}

/// `sites` and, after them, every recorded ifunc call of this object that
/// `sites` does not list (as a 5-byte `call` of its stub): what `init`
/// rewrites in a program linked without relocations, and with them.
#[cfg(all(feature = "std", target_os = "linux"))]
pub(super) fn with_recorded(sites: &[crate::sites::Site]) -> alloc::vec::Vec<crate::sites::Site> {
    use crate::sites::{Site, SiteKind};
    use crate::x86::BranchKind;
    let mut all = sites.to_vec();
    let mut listed: alloc::vec::Vec<usize> = sites.iter().map(|s| s.addr).collect();
    crate::poke::sort_by_key(&mut listed, |&a| a);
    for r in crate::records::current_ifunc_calls() {
        if listed.binary_search(&r.site()).is_err() {
            all.push(Site {
                addr: r.site(),
                len: 5,
                form: BranchKind::Call,
                kind: SiteKind::Ifunc,
                target: r.stub(),
            });
        }
    }
    all
}
