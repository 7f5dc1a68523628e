//! Images of objects the dynamic loader has loaded: the current binary's
//! text from the loader, and any loaded object's tables found from its
//! file's section headers.
//!
//! The loader's facts come through the host contract
//! (`Host::loaded_object`: on Linux `dl_iterate_phdr`), the tables from the
//! object's file (its section headers); the rest of the image module knows
//! no loader.

use alloc::borrow::Cow;
use alloc::string::{String, ToString};
use core::fmt;

use object::{Object, ObjectSection};

use crate::host::{Current, Host};
use crate::image::Image;
use crate::records::{
    self, AlternativeRecord, IfuncRecord, PatchPoint, SectionKind, StaticKeyRecord,
};

impl Image<'static> {
    /// The binary this crate is linked into: its tables from the
    /// `__start_`/`__stop_` section bounds, and its executable segments,
    /// file and load bias from the dynamic loader. (Without `std`, the
    /// text bounds are unknown: add them with [`Image::with_text`].)
    ///
    /// ```
    /// use altpatch::Image;
    /// let image = Image::current();
    /// // In a std build the text bounds come from the dynamic loader.
    /// let here = Image::current as fn() -> Image<'static> as usize;
    /// assert!(image.contains_text(here, 1));
    /// ```
    pub fn current() -> Image<'static> {
        let mut image = Image::linked();
        let here = Image::current as fn() -> Image<'static> as usize;
        if let Some(obj) = Current::loaded_object(here) {
            image.text = obj.text;
            image.file = Some((Cow::Borrowed("/proc/self/exe"), obj.bias));
            if !obj.name.is_empty() {
                image.file = Some((Cow::Owned(obj.name.clone()), obj.bias));
                image.name = Cow::Owned(obj.name);
            }
        }
        image
    }
}

/// Why [`Image::from_loaded`] could not describe an object.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// No loaded object contains the address.
    NotLoaded {
        /// The address asked about.
        addr: usize,
    },
    /// The object's file could not be read.
    Read {
        /// Its path.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// The file is not an ELF object this crate can read.
    Parse {
        /// Its path.
        path: String,
        /// The parser's message.
        why: String,
    },
    /// A record section is misplaced or malformed.
    BadSection {
        /// The section's name.
        section: String,
        /// What is wrong.
        why: &'static str,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotLoaded { addr } => write!(f, "no loaded object contains {addr:#x}"),
            LoadError::Read { path, error } => write!(f, "reading {path}: {error}"),
            LoadError::Parse { path, why } => write!(f, "parsing {path}: {why}"),
            LoadError::BadSection { section, why } => write!(f, "section {section}: {why}"),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Read { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl Image<'static> {
    /// The image of the loaded object (the executable or a shared object)
    /// that contains `addr`: its executable segments from the dynamic loader
    /// and its record tables from the sections of *this copy* of the crate
    /// (`altpatch_v1_<tag>_*`, see [`records`](mod@crate::records)) named in its
    /// file's section headers, at their run-time addresses. Records another
    /// copy of the crate emitted (another version, linked into the same
    /// object) are that copy's to patch: they are not read.
    ///
    /// This is the load-time path: after `dlopen`, pass the address of any
    /// symbol of the library, then apply its alternatives (or other
    /// mechanisms) to its own image without touching the rest of the process.
    ///
    /// ```
    /// use altpatch::Image;
    /// // The executable itself works too.
    /// let here = Image::current as fn() -> Image<'static> as usize;
    /// // SAFETY: the executable stays loaded.
    /// let image = unsafe { Image::from_loaded(here) }.unwrap();
    /// assert_eq!(image.alternatives().len(), Image::current().alternatives().len());
    /// ```
    ///
    /// # Safety
    ///
    /// The object must stay loaded (no `dlclose`) for as long as the image,
    /// or any plan built from it, is used; its file must be the one that
    /// was loaded (not replaced on disk since).
    pub unsafe fn from_loaded(addr: usize) -> Result<Image<'static>, LoadError> {
        let obj = Current::loaded_object(addr).ok_or(LoadError::NotLoaded { addr })?;
        let path = if obj.name.is_empty() {
            String::from("/proc/self/exe")
        } else {
            obj.name.clone()
        };
        let data = std::fs::read(&path).map_err(|error| LoadError::Read {
            path: path.clone(),
            error,
        })?;
        let file = object::File::parse(&*data).map_err(|e| LoadError::Parse {
            path: path.clone(),
            why: e.to_string(),
        })?;

        let mut image = Image {
            name: Cow::Owned(path.clone()),
            text: obj.text.clone(),
            points: &[],
            alternatives: &[],
            keys: &[],
            ifuncs: &[],
            site_table: &[],
            file: Some((Cow::Owned(path), obj.bias)),
        };
        for section in file.sections() {
            let Ok(name) = section.name() else { continue };
            let runtime = obj.bias.wrapping_add(section.address() as usize);
            let size = section.size() as usize;
            let loaded = obj
                .loads
                .iter()
                .any(|r| r.start <= runtime && runtime.wrapping_add(size) <= r.end);
            let bad = |why| LoadError::BadSection {
                section: name.into(),
                why,
            };
            let Some(kind) = records::parse_section_name(name.as_bytes())
                .filter(|n| n.is_own())
                .map(|n| n.kind)
            else {
                continue;
            };
            match kind {
                SectionKind::Point => {
                    // SAFETY: checked by `table` against the loaded segments;
                    // the caller keeps the object loaded.
                    image.points =
                        unsafe { table::<PatchPoint>(runtime, size, loaded) }.map_err(bad)?;
                }
                SectionKind::Key => {
                    // SAFETY: as above.
                    image.keys =
                        unsafe { table::<StaticKeyRecord>(runtime, size, loaded) }.map_err(bad)?;
                }
                SectionKind::Ifunc => {
                    // SAFETY: as above.
                    image.ifuncs =
                        unsafe { table::<IfuncRecord>(runtime, size, loaded) }.map_err(bad)?;
                }
                SectionKind::Sitetab => {
                    // SAFETY: as above.
                    image.site_table =
                        unsafe { table::<u8>(runtime, size, loaded) }.map_err(bad)?;
                }
                SectionKind::Alt => {
                    // SAFETY: as above.
                    image.alternatives =
                        unsafe { table::<AlternativeRecord>(runtime, size, loaded) }
                            .map_err(bad)?;
                }
                _ => {}
            }
        }
        Ok(image)
    }
}

/// The records of a section loaded at `addr`, `size` bytes long.
///
/// # Safety
///
/// If `loaded`, `addr..addr + size` is inside a loaded segment of an object
/// that stays loaded.
unsafe fn table<T>(addr: usize, size: usize, loaded: bool) -> Result<&'static [T], &'static str> {
    if size == 0 {
        return Ok(&[]);
    }
    if !loaded {
        return Err("not inside a loaded segment");
    }
    if !addr.is_multiple_of(core::mem::align_of::<T>())
        || !size.is_multiple_of(core::mem::size_of::<T>())
    {
        return Err("misaligned, or not a whole number of records");
    }
    // SAFETY: the range is loaded (caller) and aligned; records are plain
    // integers, valid for any bytes.
    Ok(unsafe { core::slice::from_raw_parts(addr as *const T, size / core::mem::size_of::<T>()) })
}
