//! A map kept as one sorted `Vec`: what the process's page caches need
//! (look-ups by binary search, inserts in bulk), with little code.
//!
//! `BTreeMap` brings ~7 KB of machine code per key and value type into
//! every program that patches, including a library that only declares
//! ifuncs and patches its stubs at load (issue 26's size budget); these
//! maps hold at most a few thousand pages and change in batches.

use alloc::vec::Vec;

/// Keys in increasing order, each once, with their values.
pub(super) struct SortedMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K: Ord + Copy, V> SortedMap<K, V> {
    pub(super) const fn new() -> Self {
        SortedMap {
            entries: Vec::new(),
        }
    }

    fn find(&self, key: &K) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub(super) fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }

    pub(super) fn remove(&mut self, key: &K) {
        if let Ok(i) = self.find(key) {
            self.entries.remove(i);
        }
    }

    /// Inserts `key`, replacing its value if present.
    pub(super) fn insert(&mut self, key: K, value: V) {
        match self.find(&key) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => self.entries.insert(i, (key, value)),
        }
    }

    /// Inserts the entries of `new`, in one sort. For a key already
    /// present or repeated in `new`, one of its values is kept: meant for
    /// keys found missing (or values that agree).
    pub(super) fn extend_new(&mut self, new: Vec<(K, V)>) {
        self.entries.extend(new);
        if !self.entries.windows(2).all(|w| w[0].0 < w[1].0) {
            crate::poke::sort_by_key(&mut self.entries, |e| e.0);
            self.entries.dedup_by_key(|e| e.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SortedMap;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;

    #[test]
    fn behaves_as_a_btree_map() {
        let mut ours: SortedMap<u32, u32> = SortedMap::new();
        let mut model = BTreeMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 200) as u32
        };
        for round in 0..400 {
            match round % 4 {
                0 => {
                    let (k, v) = (next(), next());
                    ours.insert(k, v);
                    model.insert(k, v);
                }
                1 => {
                    let k = next();
                    ours.remove(&k);
                    model.remove(&k);
                }
                2 => {
                    let mut batch: Vec<(u32, u32)> = Vec::new();
                    for _ in 0..5 {
                        let k = next();
                        if !model.contains_key(&k) && !batch.iter().any(|e| e.0 == k) {
                            batch.push((k, round));
                        }
                    }
                    for &(k, v) in &batch {
                        model.insert(k, v);
                    }
                    ours.extend_new(batch);
                }
                _ => {
                    if round % 100 == 99 {
                        ours.clear();
                        model.clear();
                    }
                }
            }
            assert_eq!(ours.len(), model.len());
            for k in 0..200 {
                assert_eq!(ours.get(&k), model.get(&k), "key {k} at round {round}");
                assert_eq!(ours.contains_key(&k), model.contains_key(&k));
            }
        }
    }
}
