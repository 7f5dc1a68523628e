//! Images: one loaded binary's text bounds and site tables.
//!
//! Every mechanism applies to an [`Image`], never to a global. The current
//! binary's image comes from [`Image::current`]; a kernel loading a module,
//! or a program that loaded a shared object, builds one for it with
//! [`Image::builder`] from the module's own tables ("load time" as well as
//! boot time).

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

// The running program's objects, described by the loader through the
// host contract (`Image::current`, `Image::from_loaded`), with `std`.
#[cfg(feature = "std")]
mod loaded;
mod plans;

#[cfg(feature = "std")]
pub use loaded::LoadError;

use crate::records::{self, AlternativeRecord, IfuncRecord, PatchPoint, StaticKeyRecord};

/// One loaded binary: where its text is and which site records it carries.
///
/// ```
/// use altpatch::Image;
/// let image = Image::current();
/// // In a std build the text bounds come from the dynamic loader.
/// let here = Image::current as fn() -> Image<'static> as usize;
/// assert!(image.contains_text(here, 1));
/// ```
#[derive(Clone)]
pub struct Image<'a> {
    // Crate-visible so `loaded.rs` can describe loaded objects from what
    // the loader reports (the host contract) and their files; the
    // invariants are the builder's (every range and table as its unsafe
    // setter promises).
    pub(crate) name: Cow<'a, str>,
    pub(crate) text: Vec<Range<usize>>,
    pub(crate) points: &'a [PatchPoint],
    pub(crate) alternatives: &'a [AlternativeRecord],
    pub(crate) keys: &'a [StaticKeyRecord],
    pub(crate) ifuncs: &'a [IfuncRecord],
    pub(crate) site_table: &'a [u8],
    pub(crate) file: Option<(Cow<'a, str>, usize)>,
}

impl Image<'static> {
    /// The binary this crate is linked into, as the linker left it: its
    /// record tables from the `__start_`/`__stop_` section bounds, with no
    /// text bounds and no file (the OS layer adds those in
    /// `Image::current` with `std` on Linux).
    pub(crate) fn linked() -> Image<'static> {
        Image {
            name: Cow::Borrowed("current"),
            text: Vec::new(),
            points: records::current_patch_points(),
            alternatives: records::current_alternatives(),
            keys: records::current_static_keys(),
            ifuncs: records::current_ifuncs(),
            site_table: records::current_site_table(),
            file: None,
        }
    }

    /// The binary this crate is linked into: its tables from the
    /// `__start_`/`__stop_` section bounds. Without `std` the text bounds
    /// are unknown: add them with [`Image::with_text`] (from linker-script
    /// symbols), or plans against the image will refuse every edit. (With
    /// `std` on Linux, this function comes from the OS layer and also
    /// finds the text from the dynamic loader.)
    ///
    /// ```
    /// use altpatch::Image;
    /// let image = Image::current();
    /// // The tables are this binary's, whatever the world.
    /// assert_eq!(image.alternatives().len(), Image::current().alternatives().len());
    /// ```
    #[cfg(not(feature = "std"))]
    pub fn current() -> Image<'static> {
        Image::linked()
    }
}

impl<'a> Image<'a> {
    /// Starts describing an image whose tables the caller found (a module
    /// the kernel loaded, a shared object the program opened).
    pub fn builder(name: impl Into<Cow<'a, str>>) -> ImageBuilder<'a> {
        ImageBuilder {
            image: Image {
                name: name.into(),
                text: Vec::new(),
                points: &[],
                alternatives: &[],
                keys: &[],
                ifuncs: &[],
                site_table: &[],
                file: None,
            },
        }
    }

    /// This image with `text` as its (only) executable range.
    ///
    /// # Safety
    ///
    /// `text` must be mapped, readable memory holding this image's machine
    /// code for as long as plans built against the image are used: plans
    /// read it during validation and may rewrite any byte in it.
    pub unsafe fn with_text(mut self, text: Range<usize>) -> Image<'a> {
        self.text = alloc::vec![text];
        self
    }

    /// A short name for reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The executable ranges.
    pub fn text(&self) -> &[Range<usize>] {
        &self.text
    }

    /// Whether `addr..addr+len` lies inside one executable range.
    pub fn contains_text(&self, addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.text.iter().any(|r| r.start <= addr && end <= r.end)
    }

    /// The patch-point table.
    pub fn patch_points(&self) -> &'a [PatchPoint] {
        self.points
    }

    /// The alternative records (see `altpatch::alternative`).
    pub fn alternatives(&self) -> &'a [AlternativeRecord] {
        self.alternatives
    }

    /// The static-branch records (see `altpatch::static_key`).
    pub fn static_key_records(&self) -> &'a [StaticKeyRecord] {
        self.keys
    }

    /// The ifunc records (see `altpatch::ifunc`).
    pub fn ifuncs(&self) -> &'a [IfuncRecord] {
        self.ifuncs
    }

    /// The raw site-table section (see [`Image::embedded_sites`], which
    /// parses it).
    pub fn site_table(&self) -> &'a [u8] {
        self.site_table
    }

    /// The file the image was loaded from and its load bias (run-time minus
    /// link-time addresses), where known (`std`).
    pub fn file(&self) -> Option<(&str, usize)> {
        self.file.as_ref().map(|(p, b)| (p.as_ref(), *b))
    }

    /// The address of the first patch point named `name`.
    pub fn patch_point(&self, name: &str) -> Option<usize> {
        self.patch_points_named(name).next()
    }

    /// Every patch point named `name` (several if the compiler duplicated
    /// the `asm!` that declared it).
    pub fn patch_points_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = usize> + 's {
        self.points
            .iter()
            .filter(move |p| p.name() == name)
            .map(|p| p.address())
    }
}

impl fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field(
                "text",
                &format_args!(
                    "{:x?}",
                    self.text
                        .iter()
                        .map(|r| (r.start, r.end))
                        .collect::<Vec<_>>()
                ),
            )
            .field("patch_points", &self.points.len())
            .field("alternatives", &self.alternatives.len())
            .field("static_key_sites", &self.keys.len())
            .field("ifuncs", &self.ifuncs.len())
            .finish()
    }
}

/// Builds an [`Image`] from tables found by the embedder.
///
/// ```
/// use altpatch::Image;
/// // An image with no tables: only its text bounds.
/// static TEXT: [u8; 16] = [0x90; 16];
/// let start = TEXT.as_ptr() as usize;
/// // SAFETY: TEXT is readable for the program's lifetime; this image is only
/// // inspected, never patched.
/// let image = unsafe { Image::builder("blob").text(start..start + 16) }.build();
/// assert!(image.contains_text(start + 4, 5));
/// assert!(!image.contains_text(start + 14, 5));
/// ```
#[derive(Clone, Debug)]
pub struct ImageBuilder<'a> {
    image: Image<'a>,
}

impl<'a> ImageBuilder<'a> {
    /// Adds an executable range.
    ///
    /// # Safety
    ///
    /// As for [`Image::with_text`].
    pub unsafe fn text(mut self, range: Range<usize>) -> Self {
        self.image.text.push(range);
        self
    }

    /// Sets the patch-point table.
    ///
    /// Example: [`alternatives`](Self::alternatives) (every table is set
    /// the same way).
    ///
    /// # Safety
    ///
    /// `points` must be the image's `altpatch_v1_point` section in place
    /// (records hold self-relative offsets), in memory that stays mapped and
    /// unchanged for `'a`.
    pub unsafe fn patch_points(mut self, points: &'a [PatchPoint]) -> Self {
        self.image.points = points;
        self
    }

    /// Sets the alternative-record table.
    ///
    /// A kernel passes the sections its linker script brackets
    /// (`__start_altpatch_v1_alt` .. `__stop_altpatch_v1_alt` and so on);
    /// here the running program's own tables stand for them:
    ///
    /// ```
    /// use altpatch::Image;
    ///
    /// let this = Image::current();
    /// // SAFETY: each table is this program's section in place, mapped and
    /// // unchanged for the program's lifetime; the text range is its own.
    /// let image = unsafe {
    ///     Image::builder("kernel")
    ///         .text(this.text()[0].clone())
    ///         .patch_points(this.patch_points())
    ///         .alternatives(this.alternatives())
    ///         .static_key_records(this.static_key_records())
    ///         .ifunc_records(this.ifuncs())
    /// }
    /// .build();
    /// assert_eq!(image.alternatives().len(), this.alternatives().len());
    /// assert_eq!(image.static_key_records().len(), this.static_key_records().len());
    /// assert_eq!(image.name(), "kernel");
    /// ```
    ///
    /// # Safety
    ///
    /// `records` must be the image's `altpatch_v1_alt` section in place, in
    /// memory that stays mapped and unchanged for `'a`.
    pub unsafe fn alternatives(mut self, records: &'a [AlternativeRecord]) -> Self {
        self.image.alternatives = records;
        self
    }

    /// Sets the static-branch record table.
    ///
    /// Example: [`alternatives`](Self::alternatives) (every table is set
    /// the same way).
    ///
    /// # Safety
    ///
    /// `records` must be the image's `altpatch_v1_key` section in place, in
    /// memory that stays mapped and unchanged for `'a`.
    pub unsafe fn static_key_records(mut self, records: &'a [StaticKeyRecord]) -> Self {
        self.image.keys = records;
        self
    }

    /// Sets the ifunc record table.
    ///
    /// Example: [`alternatives`](Self::alternatives) (every table is set
    /// the same way).
    ///
    /// # Safety
    ///
    /// `records` must be the image's `altpatch_v1_ifunc` section in place,
    /// in memory that stays mapped and unchanged for `'a`, and the image's
    /// code must stay loaded for the rest of the program (the records point
    /// at `'static` state).
    pub unsafe fn ifunc_records(mut self, records: &'a [IfuncRecord]) -> Self {
        self.image.ifuncs = records;
        self
    }

    /// Sets the site-table section (`altpatch_v1_sitetab`).
    ///
    /// Example: [`alternatives`](Self::alternatives) (every table is set
    /// the same way).
    ///
    /// # Safety
    ///
    /// `table` must be the image's site-table section in place, in memory
    /// that stays mapped and unchanged for `'a`.
    pub unsafe fn site_table(mut self, table: &'a [u8]) -> Self {
        self.image.site_table = table;
        self
    }

    /// Records the file the image was loaded from and its load bias, so
    /// sites can be read from its relocations (`std`).
    pub fn file(mut self, path: impl Into<Cow<'a, str>>, bias: usize) -> Self {
        self.image.file = Some((path.into(), bias));
        self
    }

    /// Finishes the image.
    pub fn build(self) -> Image<'a> {
        self.image
    }
}
