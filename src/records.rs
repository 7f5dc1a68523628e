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
//!   `--gc-sections` keeps them, named `altpatch_v<N>_<kind>`: a C identifier,
//!   so the linker defines `__start_<name>` and `__stop_<name>`, with a format
//!   version so two incompatible versions of this crate in one binary never
//!   share a table.
//! * Records are 4-byte aligned and a multiple of 4 bytes long, so input
//!   sections from different objects concatenate without padding.
//! * Tables are never sorted or written in place; indexes are built in
//!   separate memory.
//!
//! # Kernel linker scripts
//!
//! A linker script that lists its output sections must keep these sections
//! and define the bounds. Either leave them out of the script entirely
//! (orphan sections with C-identifier names get `__start_`/`__stop_`
//! automatically from both GNU ld and lld), or place them explicitly:
//!
//! ```text
//! .rodata : { *(.rodata .rodata.*) }
//! altpatch_v1_point : {
//!     __start_altpatch_v1_point = .;
//!     KEEP(*(altpatch_v1_point))
//!     __stop_altpatch_v1_point = .;
//! }
//! ```
//!
//! with one such block per section name in [`SECTIONS`]. Keep them inside
//! the loaded image (before the end of the load segment) so they are
//! readable at run time.

use core::ffi::CStr;
use core::fmt;

/// Every record section this version of the crate uses.
pub const SECTIONS: &[&str] = &[
    crate::__altpatch_section!(point),
    crate::__altpatch_section!(alt),
    crate::__altpatch_section!(sitetab),
    crate::__altpatch_section!(key),
    crate::__altpatch_section!(ifunc),
];

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

/// The section name for a record kind, with the format version.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_section {
    (point) => {
        "altpatch_v1_point"
    };
    (alt) => {
        "altpatch_v1_alt"
    };
    (sitetab) => {
        "altpatch_v1_sitetab"
    };
    (key) => {
        "altpatch_v1_key"
    };
    (ifunc) => {
        "altpatch_v1_ifunc"
    };
}

/// Assembler text that opens a record section of `kind`.
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_push_section {
    ($kind:ident) => {
        concat!(
            ".pushsection ",
            $crate::__altpatch_section!($kind),
            ",\"aR\",@progbits\n.balign 4\n"
        )
    };
}

/// Assembler text that labels the current location in an `asm!` block as a
/// *patch point* named `name`, recorded in the image's patch-point table.
///
/// Use it to find a place in your own text to build a [`Plan`](crate::Plan)
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
/// the `altpatch_v1_alt` section (20 bytes, 4-aligned). Interpreted by
/// [`alternative`](mod@crate::alternative).
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
    pub(crate) fn original(&self) -> usize {
        self.orig.get()
    }

    /// The length of that copy (the default's length, in a valid record).
    pub(crate) fn original_len(&self) -> usize {
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

/// One static-branch site, as emitted into `altpatch_v1_key` (12 bytes).
/// Interpreted by [`static_key`](mod@crate::static_key).
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

/// One ifunc record in an image's `altpatch_v1_ifunc` section: a
/// self-relative pointer to its `Ifunc` static (4 bytes). Interpreted by
/// [`ifunc`](mod@crate::ifunc), whose [`IfuncRecord::ifunc`] gives the static.
#[repr(C)]
#[derive(Debug)]
pub struct IfuncRecord(RelPtr);

impl IfuncRecord {
    /// The address of the `Ifunc` static the record names.
    pub fn ifunc_address(&self) -> usize {
        self.0.get()
    }
}

/// Declares an accessor for the current binary's table of one record kind.
macro_rules! section_table {
    ($(#[$doc:meta])* $vis:vis fn $fn:ident() -> $ty:ty, $kind:ident, $start:ident, $stop:ident) => {
        $(#[$doc])*
        $vis fn $fn() -> &'static [$ty] {
            unsafe extern "C" {
                static $start: [$ty; 0];
                static $stop: [$ty; 0];
            }
            // SAFETY: the asm only opens and closes a section, emitting no
            // bytes; it guarantees the section (and so its start/stop
            // symbols) exists even in a binary with no records.
            unsafe {
                core::arch::asm!(
                    concat!(".pushsection ", $crate::__altpatch_section!($kind), ",\"aR\",@progbits\n.popsection"),
                    options(nomem, nostack, preserves_flags)
                );
            }
            // SAFETY: the linker defines the symbols at the bounds of the
            // output section holding every record of this kind; records are
            // 4-aligned, a multiple of their alignment long, and immutable.
            unsafe {
                let start = (&raw const $start).cast::<$ty>();
                let stop = (&raw const $stop).cast::<$ty>();
                let len = (stop as usize - start as usize) / core::mem::size_of::<$ty>();
                core::slice::from_raw_parts(start, len)
            }
        }
    };
}

section_table!(
    /// The patch points of the binary this crate is linked into.
    pub(crate) fn current_patch_points() -> PatchPoint,
    point,
    __start_altpatch_v1_point,
    __stop_altpatch_v1_point
);

section_table!(
    /// The alternative records of the binary this crate is linked into.
    pub(crate) fn current_alternatives() -> AlternativeRecord,
    alt,
    __start_altpatch_v1_alt,
    __stop_altpatch_v1_alt
);

section_table!(
    /// The static-branch records of the binary this crate is linked into.
    pub(crate) fn current_static_keys() -> StaticKeyRecord,
    key,
    __start_altpatch_v1_key,
    __stop_altpatch_v1_key
);

section_table!(
    /// The ifunc records of the binary this crate is linked into.
    pub(crate) fn current_ifuncs() -> IfuncRecord,
    ifunc,
    __start_altpatch_v1_ifunc,
    __stop_altpatch_v1_ifunc
);

section_table!(
    /// The site-table section of the binary this crate is linked into
    /// (empty unless `reserve_site_table!` was used).
    pub(crate) fn current_site_table() -> u8,
    sitetab,
    __start_altpatch_v1_sitetab,
    __stop_altpatch_v1_sitetab
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
    }
}
