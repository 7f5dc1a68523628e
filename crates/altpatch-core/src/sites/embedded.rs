//! The site table embedded in an image, and the macro that reserves it.
//!
//! Layout of the `altpatch_v1_sitetab` section (little endian):
//!
//! ```text
//! header, 24 bytes:  magic "ALTPSITE" | version u16 = 1 | entry size u16 = 12
//!                    | capacity u32 | count u32 | state u32 (0 empty, 1 filled)
//! entry, 12 bytes:   site i32 | target i32      (each relative to its own field)
//!                    | kind u8 | reg u8 | form u8 | len u8
//! ```
//!
//! `kind`: 1 indirect thunk (`reg` = register number), 2 return thunk,
//! 3 static call, 4 ifunc. `form`: 0 `call`, 1 `jmp`, 2 `jcc` with the
//! condition code in bits 4..8. `len`: instruction length.

use core::fmt;

use super::{Site, SiteKind};
use crate::arch::x86_64::{BranchKind, Cond};
use crate::image::Image;

/// The table's magic bytes.
pub const TABLE_MAGIC: [u8; 8] = *b"ALTPSITE";
#[doc(hidden)]
pub const HEADER_LEN: usize = 24;
#[doc(hidden)]
pub const ENTRY_LEN: usize = 12;
pub(crate) const VERSION: u16 = 1;

/// Reserves room in the image for `CAPACITY` compiler-generated sites, to be
/// filled after linking by `altpatch embed IMAGE` (no second link). Use it
/// once, at item level, in the binary (or kernel) crate.
///
/// ```
/// altpatch::reserve_site_table!(1024);
/// # fn main() {}
/// ```
///
/// Until filled, the table is empty and the crate falls back to reading the
/// image's relocations at run time (`std` only). Each entry takes 12 bytes
/// of read-only data.
#[macro_export]
macro_rules! reserve_site_table {
    ($capacity:literal) => {
        ::core::arch::global_asm!(concat!(
            ".pushsection ",
            $crate::__altpatch_section!(sitetab),
            ",\"aR\",@progbits\n",
            ".balign 8\n",
            ".ascii \"ALTPSITE\"\n",
            ".short 1, 12\n",
            ".long ",
            stringify!($capacity),
            ", 0, 0\n",
            ".zero 12 * ",
            stringify!($capacity),
            "\n",
            ".popsection\n"
        ));
    };
}

/// Why an embedded table could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmbeddedTableError {
    /// The section does not start with the magic bytes.
    BadMagic,
    /// Unknown version or entry size.
    BadVersion,
    /// The section is shorter than its header says.
    Truncated,
    /// More than one table was reserved in the image.
    Duplicate,
    /// An entry has an unknown kind, register or form.
    BadEntry {
        /// Its index.
        index: usize,
    },
}

impl fmt::Display for EmbeddedTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmbeddedTableError::BadMagic => {
                f.write_str("site table section lacks the ALTPSITE magic")
            }
            EmbeddedTableError::BadVersion => {
                f.write_str("site table has an unknown version or entry size")
            }
            EmbeddedTableError::Truncated => {
                f.write_str("site table section is shorter than its header says")
            }
            EmbeddedTableError::Duplicate => {
                f.write_str("more than one site table reserved (use reserve_site_table! once)")
            }
            EmbeddedTableError::BadEntry { index } => {
                write!(f, "site table entry {index} is malformed")
            }
        }
    }
}

impl core::error::Error for EmbeddedTableError {}

/// The fields of a table header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[doc(hidden)]
pub struct Header {
    pub capacity: usize,
    pub count: usize,
    pub filled: bool,
}

impl Header {
    #[doc(hidden)]
    pub fn parse(bytes: &[u8]) -> Result<Header, EmbeddedTableError> {
        if bytes.len() < HEADER_LEN {
            return Err(EmbeddedTableError::Truncated);
        }
        if bytes[..8] != TABLE_MAGIC {
            return Err(EmbeddedTableError::BadMagic);
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        if u16_at(8) != VERSION || u16_at(10) as usize != ENTRY_LEN {
            return Err(EmbeddedTableError::BadVersion);
        }
        let h = Header {
            capacity: u32_at(12) as usize,
            count: u32_at(16) as usize,
            filled: u32_at(20) == 1,
        };
        if h.count > h.capacity {
            return Err(EmbeddedTableError::Truncated);
        }
        let need = HEADER_LEN + h.capacity * ENTRY_LEN;
        if bytes.len() < need {
            return Err(EmbeddedTableError::Truncated);
        }
        if bytes.len() >= need + HEADER_LEN && bytes[need..need + 8] == TABLE_MAGIC {
            return Err(EmbeddedTableError::Duplicate);
        }
        Ok(h)
    }
}

/// The kind and form of an entry from its bytes 8 to 10 (kind, register,
/// form), by table lookup: start-up decodes every entry of a program.
#[inline(always)]
fn entry_shape(kind: u8, reg: u8, form: u8) -> Option<(SiteKind, BranchKind)> {
    Some((SiteKind::decode(kind, reg)?, FORMS[usize::from(form)]?))
}

/// Entry byte 10 to the branch form: the low nibble is the form (call,
/// jmp, jcc), the high one a jcc's condition.
const FORMS: [Option<BranchKind>; 256] = {
    let mut t = [None; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = match b & 0xf {
            0 => Some(BranchKind::Call),
            1 => Some(BranchKind::Jmp),
            2 => Some(BranchKind::Jcc(Cond::from_nibble((b >> 4) as u8))),
            _ => None,
        };
        b += 1;
    }
    t
};

/// One entry, decoded from its bytes (addresses still relative).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedEntry {
    /// Site offset, relative to the entry's first byte.
    pub site_rel: i32,
    /// Target offset, relative to the entry's fifth byte.
    pub target_rel: i32,
    /// Kind.
    pub kind: SiteKind,
    /// Form.
    pub form: BranchKind,
    /// Instruction length.
    pub len: u8,
}

impl EmbeddedEntry {
    /// Encodes a site for an entry at address `entry_addr`, or `None` if an
    /// address is out of `i32` reach of it.
    pub fn encode(site: &Site, entry_addr: usize) -> Option<[u8; ENTRY_LEN]> {
        let rel = |to: usize, field: usize| i32::try_from(to as i64 - field as i64).ok();
        let s = rel(site.addr, entry_addr)?;
        let t = rel(site.target, entry_addr + 4)?;
        let (kind, reg) = site.kind.encode();
        let form = match site.form {
            BranchKind::Call => 0,
            BranchKind::Jmp => 1,
            BranchKind::Jcc(cc) => 2 | ((cc as u8) << 4),
        };
        let mut out = [0u8; ENTRY_LEN];
        out[0..4].copy_from_slice(&s.to_le_bytes());
        out[4..8].copy_from_slice(&t.to_le_bytes());
        out[8] = kind;
        out[9] = reg;
        out[10] = form;
        out[11] = site.len;
        Some(out)
    }

    /// The site this entry, stored at `at`, describes.
    #[inline]
    fn site_at(&self, at: usize) -> Site {
        Site {
            addr: at.wrapping_add(self.site_rel as isize as usize),
            len: self.len,
            form: self.form,
            kind: self.kind,
            target: (at + 4).wrapping_add(self.target_rel as isize as usize),
        }
    }

    /// Decodes an entry: its kind and form bytes by table lookup (start-up
    /// decodes every entry of a program).
    #[inline]
    fn decode(b: &[u8]) -> Option<EmbeddedEntry> {
        let b: &[u8; ENTRY_LEN] = b.try_into().ok()?;
        // A register byte of 16 or more is refused for every kind (this
        // crate writes 0 where a kind has none).
        let (kind, form) = entry_shape(b[8], b[9], b[10])?;
        let len = b[11];
        Some(EmbeddedEntry {
            site_rel: i32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            target_rel: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            kind,
            form,
            len,
        })
    }
}

/// A filled site table, read in place (its offsets are relative to the
/// table's own address, so the sites it yields are at run-time addresses).
#[derive(Clone, Copy)]
pub struct EmbeddedTable<'a> {
    bytes: &'a [u8],
    count: usize,
}

// Site discovery is above the image layer: the image keeps the raw
// section, this module knows its format.
impl<'a> Image<'a> {
    /// The embedded site table (see [`crate::sites`]): `Ok(None)` when the
    /// image reserves none or it was not filled by `altpatch embed`.
    ///
    /// ```
    /// use altpatch::Image;
    /// // A program that did not `reserve_site_table!` has none.
    /// let image = unsafe { Image::builder("empty").site_table(&[]) }.build();
    /// assert!(image.embedded_sites().unwrap().is_none());
    /// ```
    pub fn embedded_sites(&self) -> Result<Option<EmbeddedTable<'a>>, EmbeddedTableError> {
        EmbeddedTable::parse(self.site_table())
    }
}

/// The number of entries of a filled table `bytes`, its header checked;
/// `None` for no table (an empty section) or one not filled yet.
fn filled_count(bytes: &[u8]) -> Result<Option<usize>, EmbeddedTableError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let h = Header::parse(bytes)?;
    Ok(h.filled.then_some(h.count))
}

/// The `count` entries of the table `bytes` (its header checked), decoded
/// at the addresses the table's position implies; or the index of the
/// first entry that is not one.
fn decode_all(bytes: &[u8], count: usize) -> Result<alloc::vec::Vec<Site>, usize> {
    // A plain loop over exact 12-byte chunks, written into the list's spare
    // room: no bounds or capacity check per entry (start-up reads every
    // site of a program).
    let mut v = alloc::vec::Vec::with_capacity(count);
    let base = bytes.as_ptr() as usize + HEADER_LEN;
    let entries = &bytes[HEADER_LEN..HEADER_LEN + count * ENTRY_LEN];
    let out: *mut Site = v.as_mut_ptr();
    for (i, b) in entries.chunks_exact(ENTRY_LEN).enumerate() {
        let e = EmbeddedEntry::decode(b).ok_or(i)?;
        // SAFETY: there are exactly `count` entries, so `i < count`, the
        // list's capacity.
        unsafe { out.add(i).write(e.site_at(base + i * ENTRY_LEN)) };
    }
    // SAFETY: the loop wrote every one of the first `count` slots, or
    // returned.
    unsafe { v.set_len(count) };
    Ok(v)
}

impl<'a> EmbeddedTable<'a> {
    /// Reads the section `bytes` in place. `Ok(None)` for an image without a
    /// reserved table, or with one not filled yet.
    pub fn parse(bytes: &'a [u8]) -> Result<Option<EmbeddedTable<'a>>, EmbeddedTableError> {
        let Some(count) = filled_count(bytes)? else {
            return Ok(None);
        };
        let t = EmbeddedTable { bytes, count };
        // Every entry checked once, here: its kind, register and form
        // bytes (the addresses are any offsets). `sites` and `iter` then
        // decode entries known to be good.
        let entries = &bytes[HEADER_LEN..HEADER_LEN + t.count * ENTRY_LEN];
        if let Some(index) = entries
            .chunks_exact(ENTRY_LEN)
            .position(|b| entry_shape(b[8], b[9], b[10]).is_none())
        {
            return Err(EmbeddedTableError::BadEntry { index });
        }
        Ok(Some(t))
    }

    fn entry(&self, i: usize) -> Option<EmbeddedEntry> {
        let at = HEADER_LEN + i * ENTRY_LEN;
        EmbeddedEntry::decode(&self.bytes[at..at + ENTRY_LEN])
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the table lists no site.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The sites in a list sized once (what start-up keeps).
    ///
    /// ```
    /// // A filled table holding one site: `call` at the table's own
    /// // address + 0x100, reaching the indirect thunk for %r11 at + 0x200.
    /// use altpatch::sites::{EmbeddedEntry, EmbeddedTable, Site, SiteKind, TABLE_MAGIC};
    /// use altpatch::x86::{BranchKind, Reg};
    /// let mut t = Vec::new();
    /// t.extend_from_slice(&TABLE_MAGIC);
    /// t.extend_from_slice(&[1, 0, 12, 0]); // version 1, entry size 12
    /// t.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]); // capacity, count, filled
    /// t.extend_from_slice(&[0; 12]);
    /// let base = t.as_ptr() as usize;
    /// let site = Site {
    ///     addr: base + 0x100,
    ///     len: 5,
    ///     form: BranchKind::Call,
    ///     kind: SiteKind::IndirectThunk(Reg::R11),
    ///     target: base + 0x200,
    /// };
    /// let entry = EmbeddedEntry::encode(&site, base + 24).unwrap();
    /// t[24..].copy_from_slice(&entry);
    /// let table = EmbeddedTable::parse(&t).unwrap().expect("filled");
    /// assert_eq!(table.sites(), [site]);
    /// ```
    pub fn sites(&self) -> alloc::vec::Vec<Site> {
        // Every entry was checked by `parse`: none is refused here.
        decode_all(self.bytes, self.count).unwrap_or_default()
    }

    /// [`parse`](Self::parse) and [`sites`](Self::sites) in one pass over
    /// the entries (what start-up does: each is checked as it is decoded).
    ///
    /// ```
    /// use altpatch::sites::EmbeddedTable;
    /// // An empty section: no table.
    /// assert!(EmbeddedTable::read_sites(&[]).unwrap().is_none());
    /// ```
    pub fn read_sites(bytes: &[u8]) -> Result<Option<alloc::vec::Vec<Site>>, EmbeddedTableError> {
        let Some(count) = filled_count(bytes)? else {
            return Ok(None);
        };
        decode_all(bytes, count)
            .map(Some)
            .map_err(|index| EmbeddedTableError::BadEntry { index })
    }

    /// The sites, at the addresses the table's own position implies.
    pub fn iter(&self) -> impl Iterator<Item = Site> + '_ {
        let base = self.bytes.as_ptr() as usize + HEADER_LEN;
        (0..self.count).filter_map(move |i| Some(self.entry(i)?.site_at(base + i * ENTRY_LEN)))
    }
}

impl fmt::Debug for EmbeddedTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedTable")
            .field("count", &self.count)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::Reg;
    use alloc::vec;

    #[test]
    fn round_trip_in_place() {
        let mut buf = vec![0u8; HEADER_LEN + 2 * ENTRY_LEN];
        buf[..8].copy_from_slice(&TABLE_MAGIC);
        buf[8..10].copy_from_slice(&VERSION.to_le_bytes());
        buf[10..12].copy_from_slice(&(ENTRY_LEN as u16).to_le_bytes());
        buf[12..16].copy_from_slice(&2u32.to_le_bytes());
        // Not filled yet: no table.
        assert!(EmbeddedTable::parse(&buf).unwrap().is_none());
        let base = buf.as_ptr() as usize;
        let site = Site {
            addr: base - 0x1000,
            len: 6,
            form: BranchKind::Jcc(Cond::Ne),
            kind: SiteKind::IndirectThunk(Reg::R11),
            target: base + 0x2000,
        };
        let e = EmbeddedEntry::encode(&site, base + HEADER_LEN).unwrap();
        buf[HEADER_LEN..HEADER_LEN + ENTRY_LEN].copy_from_slice(&e);
        buf[16..20].copy_from_slice(&1u32.to_le_bytes());
        buf[20..24].copy_from_slice(&1u32.to_le_bytes());
        let t = EmbeddedTable::parse(&buf).unwrap().unwrap();
        let got: alloc::vec::Vec<Site> = t.iter().collect();
        assert_eq!(got, [site]);
        buf[HEADER_LEN + 8] = 9;
        assert_eq!(
            EmbeddedTable::parse(&buf).unwrap_err(),
            EmbeddedTableError::BadEntry { index: 0 }
        );
        buf[0] = b'x';
        assert_eq!(
            EmbeddedTable::parse(&buf).unwrap_err(),
            EmbeddedTableError::BadMagic
        );
    }
}
