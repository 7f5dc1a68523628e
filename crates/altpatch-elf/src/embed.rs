//! Filling a reserved site table in a linked file, in place.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use std::path::Path;

use object::endian::LittleEndian as LE;
use object::read::elf::SectionHeader;

use super::{ElfError, corrupt, parse, read_sites};
use crate::records::SectionKind;
use crate::sites::EmbeddedTableError;
use crate::sites::{EmbeddedEntry, embedded};

/// What [`embed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedOutcome {
    /// The table was (re)written with this many sites.
    Written {
        /// Sites in the table.
        sites: usize,
        /// The table's capacity.
        capacity: usize,
    },
    /// The table already held exactly these sites; nothing was written.
    Unchanged {
        /// Sites in the table.
        sites: usize,
        /// The table's capacity.
        capacity: usize,
    },
}

/// Why a table could not be embedded. The file is unchanged.
#[derive(Debug)]
#[non_exhaustive]
pub enum EmbedError {
    /// The image could not be read, or has no relocations.
    Elf(ElfError),
    /// The image has no site-table section (`altpatch_v1_<tag>_sitetab`
    /// of any copy of the crate).
    NoTable,
    /// The reserved table is malformed.
    Table(EmbeddedTableError),
    /// More sites than the table holds.
    TooSmall {
        /// Sites found.
        needed: usize,
        /// Entries reserved.
        capacity: usize,
    },
    /// A site is more than 2 GiB from the table.
    OutOfReach {
        /// The site's address.
        site: usize,
    },
    /// Reading or replacing the file failed.
    Io(std::io::Error),
}

impl fmt::Display for EmbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmbedError::Elf(e) => fmt::Display::fmt(e, f),
            EmbedError::NoTable => f.write_str(
                "the image reserves no site table: add `altpatch::reserve_site_table!(N);` to it",
            ),
            EmbedError::Table(e) => fmt::Display::fmt(e, f),
            EmbedError::TooSmall { needed, capacity } => write!(
                f,
                "the image has {needed} sites but its table holds {capacity}: \
                 reserve at least {needed} (altpatch::reserve_site_table!({needed}))"
            ),
            EmbedError::OutOfReach { site } => {
                write!(f, "site {site:#x} is more than 2 GiB from the site table")
            }
            EmbedError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl EmbedError {
    /// The address of the site the error is about, where it names one
    /// (see `altpatch::Error::site`).
    pub fn site(&self) -> Option<usize> {
        match self {
            EmbedError::OutOfReach { site, .. } => Some(*site),
            _ => None,
        }
    }
}

impl std::error::Error for EmbedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Transparent: each displays as the error it holds.
            EmbedError::Elf(e) => std::error::Error::source(e),
            EmbedError::Table(e) => std::error::Error::source(e),
            EmbedError::Io(e) => std::error::Error::source(e),
            _ => None,
        }
    }
}

impl From<ElfError> for EmbedError {
    fn from(e: ElfError) -> EmbedError {
        EmbedError::Elf(e)
    }
}

/// Fills the site table reserved in the linked image `data` (the file's
/// bytes) with the sites its relocations describe. Deterministic: embedding
/// an already-embedded image changes nothing.
///
/// A program linking two copies of the crate (see
/// [`records`](crate::records)) may reserve a table in each copy's section;
/// every one is filled with the same sites (each copy reads its own), and
/// the outcome gives the smallest capacity. If one is too small, none is
/// written.
pub fn embed(data: &mut [u8]) -> Result<EmbedOutcome, EmbedError> {
    let found = read_sites(data)?;
    let mut tables = Vec::new();
    {
        let p = parse(data)?;
        for s in p.sections.iter() {
            let name = p.sections.section_name(LE, s).map_err(corrupt)?;
            let Some(n) = crate::records::parse_section_name(name) else {
                continue;
            };
            if n.kind != SectionKind::Sitetab {
                continue;
            }
            if s.sh_type(LE) == object::elf::SHT_NOBITS {
                return Err(EmbedError::Table(EmbeddedTableError::Truncated));
            }
            tables.push((
                s.sh_offset(LE) as usize,
                s.sh_addr(LE) as usize,
                s.sh_size(LE) as usize,
            ));
        }
    }
    if tables.is_empty() {
        return Err(EmbedError::NoTable);
    }
    // Every table is checked and built before the first is written.
    let mut filled = Vec::with_capacity(tables.len());
    for &(file_off, addr, size) in &tables {
        let end = file_off
            .checked_add(size)
            .filter(|&e| e <= data.len())
            .ok_or(EmbedError::Table(EmbeddedTableError::Truncated))?;
        let table = fill(&data[file_off..end], addr, &found.sites)?;
        filled.push((file_off, table));
    }
    let capacity = filled
        .iter()
        .map(|(_, t)| (t.len() - embedded::HEADER_LEN) / embedded::ENTRY_LEN)
        .min()
        .unwrap_or(0);
    let mut written = false;
    for (file_off, table) in filled {
        let dst = &mut data[file_off..file_off + table.len()];
        if *dst != *table {
            dst.copy_from_slice(&table);
            written = true;
        }
    }
    let sites = found.sites.len();
    Ok(if written {
        EmbedOutcome::Written { sites, capacity }
    } else {
        EmbedOutcome::Unchanged { sites, capacity }
    })
}

/// The bytes of the table reserved in `section` (loaded at `addr`) filled
/// with `sites`.
fn fill(section: &[u8], addr: usize, sites: &[crate::sites::Site]) -> Result<Vec<u8>, EmbedError> {
    let header = embedded::Header::parse(section).map_err(EmbedError::Table)?;
    let capacity = header.capacity;
    if sites.len() > capacity {
        return Err(EmbedError::TooSmall {
            needed: sites.len(),
            capacity,
        });
    }
    let mut table = Vec::with_capacity(embedded::HEADER_LEN + capacity * embedded::ENTRY_LEN);
    table.extend_from_slice(&section[..12]);
    table.extend_from_slice(&(capacity as u32).to_le_bytes());
    table.extend_from_slice(&(sites.len() as u32).to_le_bytes());
    table.extend_from_slice(&1u32.to_le_bytes());
    for (i, site) in sites.iter().enumerate() {
        let at = addr + embedded::HEADER_LEN + i * embedded::ENTRY_LEN;
        let e =
            EmbeddedEntry::encode(site, at).ok_or(EmbedError::OutOfReach { site: site.addr })?;
        table.extend_from_slice(&e);
    }
    table.resize(embedded::HEADER_LEN + capacity * embedded::ENTRY_LEN, 0);
    Ok(table)
}

/// [`embed`] on a file, replacing it atomically (a temporary file in the
/// same directory, with the same permissions, renamed over it) only when
/// the table changes.
pub fn embed_file(path: &Path) -> Result<EmbedOutcome, EmbedError> {
    let mut data = std::fs::read(path).map_err(EmbedError::Io)?;
    let outcome = embed(&mut data)?;
    if let EmbedOutcome::Written { .. } = outcome {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let tmp = dir
            .join(String::from(".") + &name + &alloc::format!(".altpatch-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let perms = std::fs::metadata(path)?.permissions();
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::set_permissions(&tmp, perms)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(EmbedError::Io(e));
        }
    }
    Ok(outcome)
}
