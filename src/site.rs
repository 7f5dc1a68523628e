//! Site records: tables, emitted from `asm!`, that name places in text.
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
    pub(crate) fn current_alternatives() -> crate::alternative::Record,
    alt,
    __start_altpatch_v1_alt,
    __stop_altpatch_v1_alt
);

section_table!(
    /// The static-branch records of the binary this crate is linked into.
    pub(crate) fn current_static_keys() -> crate::static_key::Record,
    key,
    __start_altpatch_v1_key,
    __stop_altpatch_v1_key
);

section_table!(
    /// The ifunc records of the binary this crate is linked into.
    pub(crate) fn current_ifuncs() -> crate::ifunc::Record,
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
        assert_eq!(core::mem::size_of::<crate::alternative::Record>(), 20);
        assert_eq!(core::mem::align_of::<crate::alternative::Record>(), 4);
    }
}
