//! ELF ifuncs (`__attribute__((ifunc))`, `STT_GNU_IFUNC`): processing the
//! `R_X86_64_IRELATIVE` table of an image no dynamic loader relocates, and
//! rewriting the PLT-bound call sites of ifunc symbols into direct calls.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::sync::UpdateLock;

use crate::arch::{self, BranchKind};
use crate::cpu::{self, Features};
use crate::image::Image;
use crate::plan::{ApplyReport, Edit, Plan, PlanError};
use crate::poke::TextPoke;
use crate::sites::{Site, SiteKind};

/// One `Elf64_Rela` entry of an IRELATIVE table: the GOT slot to fill
/// (`offset`), the relocation type in the low half of `info`, and the
/// resolver's address (`addend`), both link-time addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrelativeEntry {
    /// `r_offset`: the slot.
    pub offset: u64,
    /// `r_info`: symbol index (0) << 32 | type (37).
    pub info: u64,
    /// `r_addend`: the resolver.
    pub addend: i64,
}

impl IrelativeEntry {
    /// An IRELATIVE entry (`R_X86_64_IRELATIVE` on x86-64) filling `slot` with what `resolver`
    /// returns.
    pub const fn new(slot: usize, resolver: usize) -> IrelativeEntry {
        IrelativeEntry {
            offset: slot as u64,
            info: arch::R_IRELATIVE as u64,
            addend: resolver as i64,
        }
    }
}

/// An image's IRELATIVE entries and its load bias (run-time minus
/// link-time addresses: 0 for a kernel or non-PIE static program).
#[derive(Clone, Copy, Debug)]
pub struct IrelativeTable<'a> {
    entries: &'a [IrelativeEntry],
    bias: usize,
}

impl<'a> IrelativeTable<'a> {
    /// The table `entries`, at load bias `bias`.
    pub fn new(entries: &'a [IrelativeEntry], bias: usize) -> IrelativeTable<'a> {
        IrelativeTable { entries, bias }
    }

    /// The table between two linker-defined bounds, typically
    /// `__rela_iplt_start` and `__rela_iplt_end`.
    ///
    /// ```
    /// use altpatch::ifunc::IrelativeTable;
    /// let t = unsafe { IrelativeTable::from_bounds(0x1000 as *const u8, 0x1004 as *const u8, 0) };
    /// assert!(t.unwrap_err().to_string().contains("not a whole number of 24-byte entries"));
    /// ```
    ///
    /// # Safety
    ///
    /// `start..end` must be readable, stay unchanged for `'a`, and hold the
    /// image's IRELATIVE table (its contents are validated when processed;
    /// its bounds here).
    pub unsafe fn from_bounds(
        start: *const u8,
        end: *const u8,
        bias: usize,
    ) -> Result<IrelativeTable<'a>, IrelativeError> {
        let (s, e) = (start as usize, end as usize);
        let size = core::mem::size_of::<IrelativeEntry>();
        if e < s || (e - s) % size != 0 || s % 8 != 0 {
            return Err(IrelativeError::BadBounds { start: s, end: e });
        }
        // SAFETY: the caller guarantees the range is readable and stable;
        // it is aligned and a whole number of entries (checked above).
        let entries = unsafe { core::slice::from_raw_parts(start.cast(), (e - s) / size) };
        Ok(IrelativeTable { entries, bias })
    }

    /// The entries.
    pub fn entries(&self) -> &'a [IrelativeEntry] {
        self.entries
    }

    /// The run-time (slot, resolver) of entry `i`.
    fn resolved_addrs(&self, i: usize) -> (usize, usize) {
        let e = &self.entries[i];
        (
            (e.offset as usize).wrapping_add(self.bias),
            (e.addend as usize).wrapping_add(self.bias),
        )
    }
}

/// Why ELF ifuncs could not be processed or their sites rewritten. Nothing
/// was written.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum IrelativeError {
    /// The table's bounds are not a whole number of aligned entries.
    BadBounds {
        /// Start address.
        start: usize,
        /// End address.
        end: usize,
    },
    /// An entry is not a well-formed IRELATIVE relocation.
    Malformed {
        /// Its index.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A resolver returned an address outside the image's text.
    OutsideText {
        /// The entry's index.
        index: usize,
        /// The resolver.
        resolver: usize,
        /// What it returned.
        returned: usize,
    },
    /// A different feature snapshot was published before.
    Snapshot(cpu::AlreadyPublished),
    /// A call site or its PLT stub does not hold what was expected.
    BadSite {
        /// The site.
        addr: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The batch was refused or the poke failed.
    Plan(PlanError),
}

impl fmt::Display for IrelativeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IrelativeError::BadBounds { start, end } => write!(
                f,
                "IRELATIVE table {start:#x}..{end:#x} is not a whole number of 24-byte entries \
                 (or is misaligned); nothing resolved"
            ),
            IrelativeError::Malformed { index, why } => write!(
                f,
                "IRELATIVE entry {index}: {why}; nothing resolved or written"
            ),
            IrelativeError::OutsideText {
                index,
                resolver,
                returned,
            } => write!(
                f,
                "IRELATIVE entry {index}: resolver {resolver:#x} returned {returned:#x}, outside \
                 the image's text; nothing written"
            ),
            IrelativeError::Snapshot(e) => fmt::Display::fmt(e, f),
            IrelativeError::BadSite { addr, why } => {
                write!(f, "ifunc site {addr:#x}: {why}; nothing written")
            }
            IrelativeError::Plan(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl IrelativeError {
    /// The address of the site the error is about, where it names one
    /// (see [`crate::Error::site`]).
    pub fn site(&self) -> Option<usize> {
        match self {
            IrelativeError::BadSite { addr, .. } => Some(*addr),
            IrelativeError::Plan(e) => e.site(),
            _ => None,
        }
    }
}

impl core::error::Error for IrelativeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            // Transparent: these display as the error they hold.
            IrelativeError::Snapshot(e) => core::error::Error::source(e),
            IrelativeError::Plan(e) => core::error::Error::source(e),
            _ => None,
        }
    }
}

/// What [`process_irelative`] did.
#[derive(Clone, Debug, Default)]
pub struct IrelativeReport {
    /// (slot, resolver, chosen implementation) per entry, run-time
    /// addresses.
    pub resolved: Vec<(usize, usize, usize)>,
    /// The table had been processed before: no resolver ran, the slots are
    /// reported as they are.
    pub already: bool,
}

/// Tables processed so far (their first entry's address), so resolvers run
/// once per table however often this is called.
static DONE: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
/// Serializes processing (see [`crate::sync`]).
static BUSY: UpdateLock = UpdateLock::new();

/// Resolves the IRELATIVE entries of `table` once: publishes `features`
/// (C resolvers read it with `altpatch_cpu_has`), checks every entry, calls
/// every resolver, checks every result lies in `image`'s text, and only then
/// fills the slots. Called again for the same table, it runs no resolver.
///
/// Run it after the image's ordinary relocations (none, for a non-PIE
/// static image) and before anything calls an ifunc.
///
/// ```
/// use altpatch::cpu::Features;
/// use altpatch::ifunc::{IrelativeEntry, IrelativeTable, process_irelative};
/// use altpatch::Image;
///
/// extern "C" fn seven() -> u64 { 7 }
/// extern "C" fn resolver() -> usize { seven as usize }
/// static mut SLOT: usize = 0;
///
/// let entries = [IrelativeEntry::new(&raw mut SLOT as usize, resolver as usize)];
/// let table = IrelativeTable::new(&entries, 0);
/// let r = unsafe { process_irelative(&Image::current(), &Features::detect(), &table) }?;
/// assert_eq!(r.resolved[0].2, seven as usize);
/// assert_eq!(unsafe { SLOT }, seven as usize);
/// # Ok::<(), altpatch::ifunc::IrelativeError>(())
/// ```
///
/// # Safety
///
/// Every slot must be writable memory that nothing reads concurrently,
/// and every resolver a function taking no arguments and returning an
/// address (the glibc convention), safe to call now.
pub unsafe fn process_irelative(
    image: &Image<'_>,
    features: &Features,
    table: &IrelativeTable<'_>,
) -> Result<IrelativeReport, IrelativeError> {
    cpu::publish(*features).map_err(IrelativeError::Snapshot)?;
    let _lock = BUSY.lock();
    let key = table.entries.as_ptr() as usize;
    let read_all = || {
        (0..table.entries.len())
            .map(|i| {
                let (slot, resolver) = table.resolved_addrs(i);
                // SAFETY: validated when first processed: aligned, outside
                // text; the caller guarantees it is readable memory.
                (slot, resolver, unsafe {
                    (slot as *const usize).read_volatile()
                })
            })
            .collect()
    };
    if !table.entries.is_empty() && DONE.iter().any(|d| d.load(Ordering::Acquire) == key) {
        return Ok(IrelativeReport {
            resolved: read_all(),
            already: true,
        });
    }

    // 1. The table, before any resolver runs.
    for (index, e) in table.entries.iter().enumerate() {
        let malformed = |why| IrelativeError::Malformed { index, why };
        if e.info as u32 != arch::R_IRELATIVE {
            return Err(malformed(arch::NOT_IRELATIVE));
        }
        if e.info >> 32 != 0 {
            return Err(malformed("an IRELATIVE relocation names no symbol"));
        }
        let (slot, resolver) = table.resolved_addrs(index);
        if slot == 0 || slot % 8 != 0 {
            return Err(malformed("the slot is null or misaligned"));
        }
        if image.contains_text(slot, 8) || slot.checked_add(8).is_none() {
            return Err(malformed("the slot lies in the image's text"));
        }
        if !image.contains_text(resolver, 1) {
            return Err(malformed("the resolver lies outside the image's text"));
        }
    }

    // 2. Every resolver, once; every result checked.
    let mut resolved = Vec::with_capacity(table.entries.len());
    for index in 0..table.entries.len() {
        let (slot, resolver) = table.resolved_addrs(index);
        // SAFETY: checked to be in the image's text; the caller guarantees
        // it is a resolver of the glibc convention.
        let f: extern "C" fn() -> usize = unsafe { core::mem::transmute(resolver) };
        let chosen = f();
        if !image.contains_text(chosen, 1) {
            return Err(IrelativeError::OutsideText {
                index,
                resolver,
                returned: chosen,
            });
        }
        resolved.push((slot, resolver, chosen));
    }

    // 3. The slots.
    for &(slot, _, chosen) in &resolved {
        // SAFETY: aligned, outside text; writable by the caller's contract.
        unsafe { (slot as *mut usize).write_volatile(chosen) };
    }
    // Remember the table (beyond 16 tables, later calls would run the
    // resolvers again: processing is meant for a handful of images).
    let _remembered = DONE.iter().any(|d| {
        d.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    });
    Ok(IrelativeReport {
        resolved,
        already: false,
    })
}

/// What [`apply_plt_sites`] did.
#[derive(Clone, Debug, Default)]
pub struct PltSitesReport {
    /// Each site rewritten, with the implementation it now calls.
    pub rewritten: Vec<(Site, usize)>,
    /// Sites already calling their implementation directly.
    pub already_direct: usize,
    /// The batch.
    pub applied: ApplyReport,
}

/// The GOT slot the PLT stub at `stub` jumps through, if it is one.
fn plt_slot(image: &Image<'_>, stub: usize) -> Option<usize> {
    if !image.contains_text(stub, arch::PLT_STUB_LEN) {
        return None;
    }
    // SAFETY: inside the image's text, readable.
    let b = unsafe { &*(stub as *const [u8; arch::PLT_STUB_LEN]) };
    arch::plt_slot(stub, b)
}

/// Rewrites the call sites of ELF ifunc symbols in `sites` (those of kind
/// ifunc that are not `ifunc!` stubs) into direct calls to the
/// implementation in the GOT slot they go through, in one batch:
///
/// * `call/jmp <PLT stub>` (5 bytes) → `call/jmp <impl>`;
/// * `call/jmp *slot(%rip)` (6 bytes, `-fno-plt`) → `cs call/jmp <impl>`,
///   one instruction of the same length (the return address is unchanged).
///
/// With `irelative` (the table [`process_irelative`] filled), each slot
/// must be one of its entries and the site's symbol that entry's resolver;
/// without it (a dynamically linked program, whose loader filled the
/// slots) the slot's value must lie in the image's text. Sites already
/// direct are counted, not rewritten. A site whose bytes are none of these
/// forms is an error naming it, with nothing written.
///
/// ```
/// use altpatch::{Image, LinuxPoke};
///
/// // The running program: its sites from its relocations (this doctest
/// // has none of ELF ifunc kind, so nothing is rewritten).
/// let image = Image::current();
/// let sites = altpatch::elf::current_sites().map(|s| s.to_vec()).unwrap_or_default();
/// let mut poke = LinuxPoke::new()?;
/// // SAFETY: the loader filled every GOT slot before `main`; in place,
/// // no other thread runs the sites.
/// let report = unsafe { altpatch::ifunc::apply_plt_sites(&image, &sites, None, &mut poke) }?;
/// print!("{report:?}");
/// # Ok::<(), altpatch::Error>(())
/// ```
///
/// # Safety
///
/// The slots must be readable and already filled. As for [`Plan::apply`]
/// with `poke` (each edit is one instruction for one, so a live poke may
/// run it while other threads make the calls).
pub unsafe fn apply_plt_sites<P: TextPoke + ?Sized>(
    image: &Image<'_>,
    sites: &[Site],
    irelative: Option<&IrelativeTable<'_>>,
    poke: &mut P,
) -> Result<PltSitesReport, IrelativeError> {
    let stubs: Vec<usize> = image
        .ifuncs()
        .iter()
        .map(|r| super::Ifunc::of_record(r).stub())
        .collect();
    let mut plan = Plan::for_image(image);
    let mut report = PltSitesReport::default();
    for s in sites {
        if s.kind != SiteKind::Ifunc || stubs.contains(&s.target) {
            continue;
        }
        let bad = |why| IrelativeError::BadSite { addr: s.addr, why };
        let len = s.len as usize;
        if !image.contains_text(s.addr, len) {
            return Err(bad("not in the image's text"));
        }
        // SAFETY: inside the image's text, readable.
        let cur = unsafe { core::slice::from_raw_parts(s.addr as *const u8, len) };
        let tail = s.form == BranchKind::Jmp;
        if matches!(s.form, BranchKind::Jcc(_)) {
            return Err(bad("a conditional branch to an ifunc"));
        }
        let slot = match arch::got_call(cur, s.addr) {
            Some(arch::GotCall::To(to)) => match plt_slot(image, to) {
                Some(slot) => slot,
                None => {
                    // Already a direct call (rewritten before).
                    report.already_direct += 1;
                    continue;
                }
            },
            Some(arch::GotCall::Through(slot)) => slot,
            Some(arch::GotCall::Direct) => {
                report.already_direct += 1;
                continue;
            }
            None => return Err(bad(arch::NOT_GOT_CALL)),
        };
        if let Some(t) = irelative {
            let ok = (0..t.entries.len()).any(|i| t.resolved_addrs(i) == (slot, s.target));
            if !ok {
                return Err(bad("its GOT slot and symbol match no IRELATIVE entry"));
            }
        }
        if image.contains_text(slot, 8) || slot % 8 != 0 {
            return Err(bad("the GOT slot is misaligned or in text"));
        }
        // SAFETY: an aligned slot outside text; the caller guarantees the
        // slots are readable and filled.
        let chosen = unsafe { (slot as *const usize).read_volatile() };
        if !image.contains_text(chosen, 1) {
            return Err(bad("its GOT slot holds no address in the image's text"));
        }
        let new = arch::direct_call(s.addr, len, tail, chosen)
            .map_err(|_| bad("the implementation is out of rel32 range"))?;
        plan.push(
            Edit::replace(s.addr, cur, &new)
                .site("ifunc call site")
                .reason("direct call to the resolved implementation"),
        );
        report.rewritten.push((*s, chosen));
    }
    // SAFETY: forwarded from our caller.
    report.applied = unsafe { plan.apply(poke) }.map_err(IrelativeError::Plan)?;
    Ok(report)
}
