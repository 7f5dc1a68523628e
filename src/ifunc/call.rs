//! The calls `ifunc!`'s function records in its callers (see
//! `static_call::recorded`, which makes them for static calls too), and
//! what patching at load and `init` do with them.

use crate::static_call::recorded_probe;

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

recorded_probe!(
    /// The call of the ifunc `T` taking the tuple `A`, returning `R`:
    /// `(&&Probe::<T, A, R>::NEW).call(args, plain)` picks the recorded
    /// call where the signature allows it, `plain(args)` otherwise.
    Probe,
    IfuncStub,
    __altpatch_ifunc_stub
);

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
    for r in crate::records::current_calls() {
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
        crate::static_call::calls_of(self.stub())
    }
}
