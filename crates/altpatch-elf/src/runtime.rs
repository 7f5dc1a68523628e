//! Sites of running images: the embedded table if filled, else the image
//! file's relocations.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use std::sync::OnceLock;

use super::{ElfError, read_sites};
use crate::image::Image;
use crate::sites::{EmbeddedTableError, Site};

/// Why the sites of an image could not be found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SitesError {
    /// The image's file could not be read or has no usable relocations.
    Elf {
        /// The file.
        path: String,
        /// Why.
        error: ElfError,
    },
    /// The file could not be read.
    Io {
        /// The file.
        path: String,
        /// The error message.
        error: String,
    },
    /// The embedded table is malformed.
    Table(EmbeddedTableError),
    /// The image has neither a filled embedded table nor a known file.
    NoSource,
}

impl fmt::Display for SitesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SitesError::Elf { path, error } => write!(f, "{path}: {error}"),
            SitesError::Io { path, error } => write!(f, "reading {path}: {error}"),
            SitesError::Table(e) => fmt::Display::fmt(e, f),
            SitesError::NoSource => f.write_str(
                "the image has no filled site table and no file to read relocations from",
            ),
        }
    }
}

impl std::error::Error for SitesError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SitesError::Elf { error, .. } => Some(error),
            SitesError::Table(e) => std::error::Error::source(e),
            _ => None,
        }
    }
}

/// The compiler-generated sites of `image`, at run-time addresses: from its
/// embedded table when filled (no file access), else from the relocations
/// in its file.
pub fn image_sites(image: &Image<'_>) -> Result<Vec<Site>, SitesError> {
    // One pass over the table: each entry checked as it is decoded.
    let table = crate::sites::EmbeddedTable::read_sites(image.site_table());
    if let Some(sites) = table.map_err(SitesError::Table)? {
        return Ok(sites);
    }
    let (path, bias) = image.file().ok_or(SitesError::NoSource)?;
    let data = std::fs::read(path).map_err(|e| SitesError::Io {
        path: path.into(),
        error: e.to_string(),
    })?;
    let found = read_sites(&data).map_err(|error| SitesError::Elf {
        path: path.into(),
        error,
    })?;
    Ok(found.sites.iter().map(|s| s.biased(bias)).collect())
}

/// The sites of the running program ([`Image::current`]), found once and
/// kept: later calls cost nothing.
///
/// Fails with a message naming `-Wl,--emit-relocs` when the program was
/// linked without it (and has no embedded table).
pub fn current_sites() -> Result<&'static [Site], SitesError> {
    static SITES: OnceLock<Result<Vec<Site>, SitesError>> = OnceLock::new();
    let sites = match SITES.get() {
        Some(s) => s,
        None => {
            // Under the process lock, which `fork` waits for: a child never
            // inherits a half-done initialization it would wait on forever.
            let _held = crate::sync::Held::acquire();
            SITES.get_or_init(|| image_sites(&Image::current()))
        }
    };
    sites.as_ref().map(Vec::as_slice).map_err(Clone::clone)
}
