//! Record layouts: every `altpatch_v1_*` table, emitted from `asm!`, that
//! names places in text, and the section names they live in.
//!
//! A binary format belongs to no mechanism: the alternatives, static-key
//! and ifunc modules interpret these records, the image module finds their
//! tables, and this module, at the bottom of the layer map
//! (`ARCHITECTURE.md`), imports nothing of the crate.
//!
//! # Layout rules
//!
//! * Every address in a record is an `i32` offset from the field's own
//!   address ([`RelPtr`], assembled as `.long target - .`), so tables need no
//!   load-time relocation and work in PIE executables, shared objects and
//!   kernels linked at any address.
//! * Records live in read-only sections with the `R` (retain) flag, so
//!   `--gc-sections` keeps them, named `altpatch_v1_<tag>_<kind>`
//!   ([`SectionKind`]): a C identifier, so the linker defines
//!   `__start_<name>` and `__stop_<name>`.
//! * Records are 4-byte aligned and a multiple of 4 bytes long, so input
//!   sections from different objects concatenate without padding.
//! * Tables are never sorted or written in place; indexes are built in
//!   separate memory.
//!
//! # Two copies of the crate in one binary
//!
//! A dependency graph can link two semver-incompatible copies of this
//! crate into one program (two libraries on different versions). Each copy
//! names its sections with its own [`TAG`]: the package name and its
//! semver-compatible version (`altpatch_0_1` for every 0.1.x,
//! `altpatch_2` for 2.x), after the format version `v1`. So each copy's
//! `__start_`/`__stop_` bounds cover its own records only, and each copy
//! patches exactly its own records: `altpatch_v1_altpatch_0_1_key` holds
//! the static-branch sites of the keys of altpatch 0.1.x. Readers of files
//! find a copy's sections by its tag ([`SectionKind::name`]) or every
//! copy's by the prefix ([`parse_section_name`]). What the copies must
//! share (the text they patch, one update lock, the retpoline thunks the
//! compiler calls by fixed names) is described in `crate::sync`, the lock's
//! own file (`crates/altpatch-host/src/linux/lock.rs`) and the README
//! ("Using altpatch in a library").
//!
//! # Kernel linker scripts
//!
//! A linker script that lists its output sections must keep these sections
//! and define the bounds. Either leave them out of the script entirely
//! (orphan sections with C-identifier names get `__start_`/`__stop_`
//! automatically from both GNU ld and lld), or place them explicitly, by
//! their full names (this version's: [`SECTIONS`]):
//!
//! ```text
//! .rodata : { *(.rodata .rodata.*) }
//! altpatch_v1_altpatch_0_1_point : {
//!     __start_altpatch_v1_altpatch_0_1_point = .;
//!     KEEP(*(altpatch_v1_altpatch_0_1_point))
//!     __stop_altpatch_v1_altpatch_0_1_point = .;
//! }
//! ```
//!
//! with one such block per section name in [`SECTIONS`]. Keep them inside
//! the loaded image (before the end of the load segment) so they are
//! readable at run time. The names change with the crate's
//! semver-incompatible versions (0.1 to 0.2, 1.x to 2.0): a script naming
//! the old ones leaves the new ones as orphans.

use core::ffi::CStr;
use core::fmt;

mod names;

pub(crate) use names::section_name;
pub use names::{PREFIX, SECTIONS, SectionKind, SectionName, TAG, parse_section_name, tag_in};

/// A 32-bit offset from the field's own address to a target address.
///
/// Assembled as `.long target - .`. Only meaningful in place: copying the
/// record elsewhere changes what it points to.
#[repr(transparent)]
pub struct RelPtr(i32);

impl RelPtr {
    /// The absolute address this field points to.
    pub fn get(&self) -> usize {
        (self as *const RelPtr as usize).wrapping_add(self.0 as isize as usize)
    }

    /// The raw offset.
    pub fn offset(&self) -> i32 {
        self.0
    }
}

impl fmt::Debug for RelPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPtr({:+} -> {:#x})", self.0, self.get())
    }
}

/// Assembler text that labels the current location in an `asm!` block as a
/// *patch point* named `name`, recorded in the image's patch-point table.
///
/// Use it to find a place in your own text to build a [`Plan`](crate::plan::Plan)
/// against, e.g. a `mov` whose immediate you will rewrite. The name must be
/// a plain identifier-like string (no quotes or backslashes). If the
/// compiler duplicates the `asm!` block (inlining), each copy is recorded.
///
/// ```
/// use altpatch::{Image, patch_point};
///
/// #[inline(never)]
/// fn answer() -> u32 {
///     let r: u32;
///     // SAFETY: the asm only moves an immediate into `r`.
///     unsafe { core::arch::asm!(patch_point!("doc_answer"), "mov {0:e}, 41", out(reg) r) };
///     r
/// }
/// assert_eq!(answer(), 41);
/// let image = Image::current();
/// let at = image.patch_point("doc_answer").unwrap();
/// // `mov r32, imm32` is one opcode byte plus the immediate.
/// // SAFETY: the point is in this program's text, which is readable.
/// assert_eq!(unsafe { *(at as *const u8).add(1) }, 41);
/// ```
#[macro_export]
macro_rules! patch_point {
    ($name:literal) => {
        concat!(
            "8470:\n",
            $crate::__altpatch_push_section!(point),
            ".long 8470b - .\n",
            ".long 8471f - .\n",
            ".popsection\n",
            ".pushsection .rodata.altpatch_names,\"a\",@progbits\n",
            "8471: .asciz \"",
            $name,
            "\"\n",
            ".popsection\n"
        )
    };
}

/// A patch-point record: a named address in text (see [`patch_point!`]).
#[repr(C, align(4))]
pub struct PatchPoint {
    at: RelPtr,
    name: RelPtr,
}

impl PatchPoint {
    /// The text address the point labels.
    pub fn address(&self) -> usize {
        self.at.get()
    }

    /// The point's name.
    pub fn name(&self) -> &str {
        // SAFETY: a `PatchPoint` is only reachable through an `Image`, whose
        // constructors guarantee the table is in place in a loaded image; the
        // assembler wrote `name` as the offset of a NUL-terminated string in
        // that image's read-only data.
        let c = unsafe { CStr::from_ptr(self.name.get() as *const core::ffi::c_char) };
        c.to_str().unwrap_or("<non-utf8>")
    }
}

impl fmt::Debug for PatchPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatchPoint")
            .field("name", &self.name())
            .field("address", &format_args!("{:#x}", self.address()))
            .finish()
    }
}

/// One alternative of one site, as emitted by the alternative macros into
/// the `altpatch_v1_<tag>_alt` section (20 bytes, 4-aligned). Interpreted by
/// `altpatch::alternative`.
#[repr(C, align(4))]
pub struct AlternativeRecord {
    site: RelPtr,
    orig: RelPtr,
    repl: RelPtr,
    cond: u16,
    site_len: u8,
    default_len: u8,
    repl_len: u8,
    orig_len: u8,
    _reserved: u16,
}

impl AlternativeRecord {
    /// The site's first byte.
    pub fn site(&self) -> usize {
        self.site.get()
    }

    /// The site's length, padding included.
    pub fn site_len(&self) -> usize {
        self.site_len as usize
    }

    /// The default sequence's length (the rest of the site is padding).
    pub fn default_len(&self) -> usize {
        self.default_len as usize
    }

    /// Where the replacement's bytes are (never executed there).
    pub fn replacement(&self) -> usize {
        self.repl.get()
    }

    /// The replacement's length.
    pub fn replacement_len(&self) -> usize {
        self.repl_len as usize
    }

    /// The condition's encoding (decoded by
    /// [`AlternativeRecord::condition`]).
    pub fn condition_bits(&self) -> u16 {
        self.cond
    }

    /// Where the macro kept a copy of the default sequence (to tell the
    /// compiled state from a patched one).
    #[doc(hidden)]
    pub fn original(&self) -> usize {
        self.orig.get()
    }

    /// The length of that copy (the default's length, in a valid record).
    #[doc(hidden)]
    pub fn original_len(&self) -> usize {
        self.orig_len as usize
    }
}

impl fmt::Debug for AlternativeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlternativeRecord")
            .field("site", &format_args!("{:#x}", self.site()))
            .field("site_len", &self.site_len)
            .field("default_len", &self.default_len)
            .field("replacement", &format_args!("{:#x}", self.replacement()))
            .field("replacement_len", &self.repl_len)
            .field("cond", &self.cond)
            .finish()
    }
}

/// One static-branch site, as emitted into `altpatch_v1_<tag>_key` (12 bytes).
/// Interpreted by `altpatch::static_key`.
#[repr(C, align(4))]
pub struct StaticKeyRecord {
    site: RelPtr,
    target: RelPtr,
    /// The key's address, plus 1 for a `likely` site.
    key: RelPtr,
}

impl StaticKeyRecord {
    /// The 5-byte NOP/`jmp` instruction.
    pub fn site(&self) -> usize {
        self.site.get()
    }

    /// Where the `jmp` goes (the other path).
    pub fn target(&self) -> usize {
        self.target.get()
    }

    /// The key's address.
    pub fn key(&self) -> usize {
        self.key.get() & !1
    }

    /// Whether the site is a `static_branch_likely!` (falls through to
    /// `true`).
    pub fn likely(&self) -> bool {
        self.key.get() & 1 != 0
    }
}

impl fmt::Debug for StaticKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeyRecord")
            .field("site", &format_args!("{:#x}", self.site()))
            .field("target", &format_args!("{:#x}", self.target()))
            .field("key", &format_args!("{:#x}", self.key()))
            .field("likely", &self.likely())
            .finish()
    }
}

/// One ifunc record in an image's `altpatch_v1_<tag>_ifunc` section: a
/// self-relative pointer to its `Ifunc` static (4 bytes). Interpreted by
/// `altpatch::ifunc`, whose `Ifunc::of_record` gives the static.
#[repr(C)]
#[derive(Debug)]
pub struct IfuncRecord(RelPtr);

impl IfuncRecord {
    /// The address of the `Ifunc` static the record names.
    pub fn ifunc_address(&self) -> usize {
        self.0.get()
    }
}

/// One recorded call in an image's `altpatch_v1_<tag>_call` section: where
/// a `call rel32` to an ifunc's stub or a static call's trampoline was
/// assembled, and that stub (8 bytes). Emitted by the call itself (the
/// function `ifunc!` or `static_call!` declares, inlined into every
/// caller, see `static_call::recorded`), so it names an instruction
/// boundary the assembler made, in whatever crate the caller is.
#[repr(C)]
#[derive(Debug)]
pub struct CallRecord {
    site: RelPtr,
    stub: RelPtr,
}

impl CallRecord {
    /// The address of the `call`.
    pub fn site(&self) -> usize {
        self.site.get()
    }

    /// The address of the stub or trampoline it was assembled to call.
    pub fn stub(&self) -> usize {
        self.stub.get()
    }
}

/// Declares an accessor for the current binary's table of one record kind
/// (this copy's section, bounded by the linker's `__start_`/`__stop_`).
macro_rules! section_table {
    ($(#[$doc:meta])* $vis:vis fn $fn:ident() -> $ty:ty, $kind:ident) => {
        $(#[$doc])*
        $vis fn $fn() -> &'static [$ty] {
            unsafe extern "C" {
                #[link_name = concat!("__start_", section_name!($kind))]
                static START: [$ty; 0];
                #[link_name = concat!("__stop_", section_name!($kind))]
                static STOP: [$ty; 0];
            }
            // SAFETY: the asm only opens and closes a section, emitting no
            // bytes; it guarantees the section (and so its start/stop
            // symbols) exists even in a binary with no records.
            unsafe {
                core::arch::asm!(
                    concat!(".pushsection ", section_name!($kind), ",\"aR\",@progbits\n.popsection"),
                    options(nomem, nostack, preserves_flags)
                );
            }
            // SAFETY: the linker defines the symbols at the bounds of the
            // output section holding every record of this kind this copy
            // emitted; records are 4-aligned, a multiple of their alignment
            // long, and immutable.
            unsafe {
                let start = (&raw const START).cast::<$ty>();
                let stop = (&raw const STOP).cast::<$ty>();
                let len = (stop as usize - start as usize) / core::mem::size_of::<$ty>();
                core::slice::from_raw_parts(start, len)
            }
        }
    };
}

section_table!(
    /// The patch points of the binary this crate is linked into.
    pub(crate) fn current_patch_points() -> PatchPoint,
    point
);

section_table!(
    /// The alternative records of the binary this crate is linked into.
    pub(crate) fn current_alternatives() -> AlternativeRecord,
    alt
);

section_table!(
    /// The static-branch records of the binary this crate is linked into.
    pub(crate) fn current_static_keys() -> StaticKeyRecord,
    key
);

section_table!(
    /// The ifunc records of the binary this crate is linked into.
    pub(crate) fn current_ifuncs() -> IfuncRecord,
    ifunc
);

section_table!(
    /// The recorded calls of the binary this crate is linked into.
    #[doc(hidden)]
    pub fn current_calls() -> CallRecord,
    call
);

section_table!(
    /// The site-table section of the binary this crate is linked into
    /// (empty unless `reserve_site_table!` was used).
    pub(crate) fn current_site_table() -> u8,
    sitetab
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout() {
        assert_eq!(core::mem::size_of::<PatchPoint>(), 8);
        assert_eq!(core::mem::align_of::<PatchPoint>(), 4);
        assert_eq!(core::mem::size_of::<AlternativeRecord>(), 20);
        assert_eq!(core::mem::align_of::<AlternativeRecord>(), 4);
        assert_eq!(core::mem::size_of::<StaticKeyRecord>(), 12);
        assert_eq!(core::mem::align_of::<StaticKeyRecord>(), 4);
        assert_eq!(core::mem::size_of::<IfuncRecord>(), 4);
        assert_eq!(core::mem::size_of::<CallRecord>(), 8);
    }

    #[test]
    fn names_carry_the_tag_and_parse_back() {
        assert_eq!(SECTIONS.len(), 6);
        for (i, kind) in SectionKind::ALL.iter().enumerate() {
            let name = kind.name();
            if i < SECTIONS.len() {
                assert_eq!(SECTIONS[i], name);
            }
            assert_eq!(name, alloc::format!("{PREFIX}{TAG}_{}", kind.suffix()));
            let parsed = parse_section_name(name.as_bytes()).expect(name);
            assert_eq!((parsed.tag, parsed.kind), (TAG, *kind));
            assert!(parsed.is_own());
        }
        // A C identifier, so the linker defines the bounds.
        assert!(TAG.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        let other = parse_section_name(b"altpatch_v1_other_2_key").unwrap();
        assert_eq!((other.tag, other.kind), ("other_2", SectionKind::Key));
        assert!(!other.is_own());
        for bad in [
            &b"altpatch_v1__key"[..],
            b"altpatch_v1_a-b_key",
            b"altpatch_v1_",
            b"altpatch_v1_x_keys",
        ] {
            assert!(parse_section_name(bad).is_none(), "{bad:?}");
        }
    }
}
