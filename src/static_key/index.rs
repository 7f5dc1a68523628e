//! Finding a key's sites quickly.

use alloc::vec::Vec;

use crate::image::Image;
use crate::records::StaticKeyRecord;

/// The static-branch records of one image, indexed by key, built once (in
/// separate memory: the table itself is never sorted).
///
/// ```
/// use altpatch::{Image, static_key::KeyIndex};
/// let image = Image::current();
/// let index = KeyIndex::new(&image);
/// assert_eq!(index.len(), image.static_key_records().len());
/// ```
#[derive(Clone, Debug, Default)]
pub struct KeyIndex {
    /// (key address, record index), sorted.
    by_key: Vec<(usize, u32)>,
    records: usize,
}

impl KeyIndex {
    /// Indexes `image`'s static-branch records.
    pub fn new(image: &Image<'_>) -> KeyIndex {
        let recs = image.static_key_records();
        let mut by_key: Vec<(usize, u32)> = recs
            .iter()
            .enumerate()
            .map(|(i, r)| (r.key(), i as u32))
            .collect();
        by_key.sort_unstable();
        KeyIndex {
            by_key,
            records: recs.len(),
        }
    }

    /// Number of records indexed.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether the image has no static-branch site.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The records of the key at `key` in `image` (the image this index was
    /// built from).
    pub fn records_of<'a>(
        &'a self,
        image: &Image<'a>,
        key: usize,
    ) -> impl Iterator<Item = &'a StaticKeyRecord> + 'a {
        let recs = image.static_key_records();
        assert_eq!(
            recs.len(),
            self.records,
            "a KeyIndex used with another image"
        );
        let start = self.by_key.partition_point(|&(k, _)| k < key);
        self.by_key[start..]
            .iter()
            .take_while(move |&&(k, _)| k == key)
            .map(move |&(_, i)| &recs[i as usize])
    }

    /// Number of sites of the key at `key`.
    pub fn count(&self, key: usize) -> usize {
        let start = self.by_key.partition_point(|&(k, _)| k < key);
        self.by_key[start..]
            .iter()
            .take_while(|&&(k, _)| k == key)
            .count()
    }
}
