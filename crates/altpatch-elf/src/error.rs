//! Why an image could not be read.

use alloc::string::{String, ToString};
use core::fmt;

/// Why an image could not be read. Never a panic, whatever the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ElfError {
    /// Not an ELF file (bad magic) or too short to be one.
    NotElf,
    /// A 32-bit ELF file.
    WrongClass,
    /// A big-endian ELF file.
    WrongEndian,
    /// An ELF file for another machine.
    WrongMachine(u16),
    /// A relocatable object (`.o`), not a linked image.
    NotLinked,
    /// The headers or tables are truncated or inconsistent.
    Corrupt(String),
    /// No `.symtab`: the image was stripped.
    Stripped,
    /// No relocations for executable sections: the image was linked without
    /// `--emit-relocs`.
    NoRelocations,
    /// A relocation points outside the section it applies to.
    RelocationOutsideSection {
        /// The relocation's address.
        offset: u64,
        /// The section's name.
        section: String,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::NotElf => f.write_str("not an ELF file"),
            ElfError::WrongClass => f.write_str("a 32-bit ELF file; altpatch reads x86-64 images"),
            ElfError::WrongEndian => f.write_str("a big-endian ELF file; altpatch reads x86-64 images"),
            ElfError::WrongMachine(m) => {
                write!(f, "an ELF file for machine {m}, not x86-64 (62)")
            }
            ElfError::NotLinked => {
                f.write_str("a relocatable object, not a linked image: link it first")
            }
            ElfError::Corrupt(why) => write!(f, "corrupt ELF file: {why}"),
            ElfError::Stripped => f.write_str(
                "the image has no symbol table (.symtab): it was stripped; keep symbols to find sites",
            ),
            ElfError::NoRelocations => f.write_str(
                "the image has no relocations for its code: link with -Wl,--emit-relocs \
                 (in Rust: -C link-arg=-Wl,--emit-relocs), or reserve and embed a site table",
            ),
            ElfError::RelocationOutsideSection { offset, section } => write!(
                f,
                "relocation at {offset:#x} points outside section {section}"
            ),
        }
    }
}

impl std::error::Error for ElfError {}

pub(crate) fn corrupt(e: object::Error) -> ElfError {
    ElfError::Corrupt(e.to_string())
}
