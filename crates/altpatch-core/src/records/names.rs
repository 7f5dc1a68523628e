//! Record section names: this copy's tag, the kinds, parsing a name back
//! (see the [`records`](mod@crate::records) docs, "Two copies of the crate in
//! one binary").

include!(concat!(env!("OUT_DIR"), "/tag.rs"));

/// This copy's tag: its package name and semver-compatible version as a C
/// identifier (`altpatch_0_1` for altpatch 0.1.x), the middle of every
/// section name it emits (see the [`records`](mod@crate::records) docs).
///
/// ```
/// assert!(altpatch::records::SECTIONS.iter().all(|s| s.contains(altpatch::records::TAG)));
/// ```
pub const TAG: &str = env!("ALTPATCH_TAG");

/// What every record section's name starts with: the crate and the record
/// format's version. The copy's [`TAG`] and the [`SectionKind`] follow.
pub const PREFIX: &str = "altpatch_v1_";

/// This copy's section name for a record kind, inside this crate (the tag
/// is the build script's environment variable, `ALTPATCH_TAG`); the crates
/// above and the macros expanded in users' crates use
/// [`__altpatch_section!`](crate::__altpatch_section), which must give the
/// same names (`tests/two_copies.rs` checks).
macro_rules! section_name {
    ($kind:ident) => {
        concat!("altpatch_v1_", env!("ALTPATCH_TAG"), "_", stringify!($kind))
    };
}
pub(crate) use section_name;

/// Every record section this copy of the crate uses, with `__start_`/
/// `__stop_` bounds: the names a kernel's linker script lists.
pub const SECTIONS: &[&str] = &[
    section_name!(point),
    section_name!(alt),
    section_name!(sitetab),
    section_name!(key),
    section_name!(ifunc),
    section_name!(call),
];

/// What a record section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SectionKind {
    /// [`PatchPoint`](super::PatchPoint)s.
    Point,
    /// [`AlternativeRecord`](super::AlternativeRecord)s.
    Alt,
    /// The embedded site table (`reserve_site_table!`).
    Sitetab,
    /// [`StaticKeyRecord`](super::StaticKeyRecord)s.
    Key,
    /// [`IfuncRecord`](super::IfuncRecord)s.
    Ifunc,
    /// [`CallRecord`](super::CallRecord)s.
    Call,
    /// Self-relative offsets of the crate's own intended indirect branches
    /// (`std`; read by `altpatch audit`, never at run time).
    IndirectOk,
}

impl SectionKind {
    /// Every kind, in [`SECTIONS`] order (then `IndirectOk`).
    pub const ALL: [SectionKind; 7] = [
        SectionKind::Point,
        SectionKind::Alt,
        SectionKind::Sitetab,
        SectionKind::Key,
        SectionKind::Ifunc,
        SectionKind::Call,
        SectionKind::IndirectOk,
    ];

    /// The last part of the section's name: `point`, `alt`, `sitetab`,
    /// `key`, `ifunc`, `call` or `indirect_ok`.
    pub fn suffix(self) -> &'static str {
        match self {
            SectionKind::Point => "point",
            SectionKind::Alt => "alt",
            SectionKind::Sitetab => "sitetab",
            SectionKind::Key => "key",
            SectionKind::Ifunc => "ifunc",
            SectionKind::Call => "call",
            SectionKind::IndirectOk => "indirect_ok",
        }
    }

    /// This copy's section of this kind.
    ///
    /// ```
    /// use altpatch::records::{SectionKind, TAG};
    /// let name = SectionKind::Key.name();
    /// assert_eq!(name, format!("altpatch_v1_{TAG}_key"));
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Point => section_name!(point),
            SectionKind::Alt => section_name!(alt),
            SectionKind::Sitetab => section_name!(sitetab),
            SectionKind::Key => section_name!(key),
            SectionKind::Ifunc => section_name!(ifunc),
            SectionKind::Call => section_name!(call),
            SectionKind::IndirectOk => section_name!(indirect_ok),
        }
    }
}

/// A record section's name taken apart (see [`parse_section_name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionName<'a> {
    /// The tag of the copy that emitted it (empty for a binary built
    /// before copies were tagged, whose sections are `altpatch_v1_<kind>`).
    pub tag: &'a str,
    /// What it holds.
    pub kind: SectionKind,
}

impl SectionName<'_> {
    /// Whether this copy of the crate emitted it.
    pub fn is_own(&self) -> bool {
        self.tag == TAG
    }
}

/// The copy's tag in `name` = `altpatch_v1_<tag>_<suffix>` (or the empty
/// tag of `altpatch_v1_<suffix>`), if `name` has that shape and the tag is
/// a C identifier.
///
/// ```
/// use altpatch::records::tag_in;
/// assert_eq!(tag_in(b"altpatch_v1_altpatch_0_1_trampoline_table", "trampoline_table"), Some("altpatch_0_1"));
/// assert_eq!(tag_in(b"altpatch_v1_key", "key"), Some(""));
/// assert_eq!(tag_in(b"altpatch_v2_x_key", "key"), None);
/// ```
pub fn tag_in<'a>(name: &'a [u8], suffix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(PREFIX.as_bytes())?;
    let rest = rest.strip_suffix(suffix.as_bytes())?;
    let tag = if rest.is_empty() {
        rest
    } else {
        rest.strip_suffix(b"_").filter(|t| !t.is_empty())?
    };
    if !tag.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') {
        return None;
    }
    core::str::from_utf8(tag).ok()
}

/// `name` taken apart if it is a record section of any copy of the crate
/// (format `v1`): which copy emitted it and what it holds.
///
/// ```
/// use altpatch::records::{SectionKind, parse_section_name};
/// let s = parse_section_name(b"altpatch_v1_altpatch_copy_0_1_ifunc").unwrap();
/// assert_eq!((s.tag, s.kind), ("altpatch_copy_0_1", SectionKind::Ifunc));
/// let own = parse_section_name(SectionKind::Alt.name().as_bytes()).unwrap();
/// assert!(own.is_own());
/// assert!(parse_section_name(b".text").is_none());
/// ```
pub fn parse_section_name(name: &[u8]) -> Option<SectionName<'_>> {
    SectionKind::ALL.iter().find_map(|&kind| {
        Some(SectionName {
            tag: tag_in(name, kind.suffix())?,
            kind,
        })
    })
}

/// The section name for a record kind (or a symbol of this copy's, such as
/// `thunk_array`): `altpatch_v1_<tag>_<kind>`, with the format version and
/// the tag of the copy of the crate whose macro emitted the record (see
/// [`records`](mod@crate::records)). For every crate above this one and the
/// macros expanded in users' crates (this crate cannot name its own
/// macro-made `__altpatch_tag!` by path: it uses `section_name!`).
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_section {
    ($kind:ident) => {
        concat!(
            "altpatch_v1_",
            $crate::__altpatch_tag!(),
            "_",
            stringify!($kind)
        )
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
