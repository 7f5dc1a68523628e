//! Sorting the short lists text pokes handle (edits of one batch, owned
//! ranges of one page) with little code: a Shell sort. `slice::sort*`
//! brings ~15 KB of machine code per element type into every program,
//! which a library that only declares ifuncs should not carry for lists
//! of a few dozen entries (nearly sorted ones, as records are in link
//! order).

/// Sorts `v` by `key`, not stably: O(n^1.3) on the lists this crate sorts.
#[doc(hidden)]
pub fn sort_by_key<T, K: Ord>(v: &mut [T], key: impl Fn(&T) -> K) {
    // Ciura's gaps (then ×2.25), the last pass an insertion sort.
    const GAPS: [usize; 8] = [701, 301, 132, 57, 23, 10, 4, 1];
    let mut big = 701;
    while big * 9 / 4 < v.len() {
        big = big * 9 / 4;
    }
    let mut gap = big;
    let mut next = GAPS.iter().copied().skip_while(|&g| g >= big);
    loop {
        if gap < v.len() {
            for i in gap..v.len() {
                let mut j = i;
                while j >= gap && key(&v[j - gap]) > key(&v[j]) {
                    v.swap(j - gap, j);
                    j -= gap;
                }
            }
        }
        if gap == 1 {
            return;
        }
        gap = if gap > 701 {
            (gap * 4 / 9).max(701)
        } else {
            next.next().unwrap_or(1)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::sort_by_key;
    use alloc::vec::Vec;

    #[test]
    fn sorts_every_length_and_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0, 1, 2, 3, 9, 24, 100, 701, 702, 1600, 5000] {
            let mut v: Vec<u32> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 1000) as u32
                })
                .collect();
            let mut want = v.clone();
            want.sort_unstable();
            sort_by_key(&mut v, |&x| x);
            assert_eq!(v, want, "length {len}");
            sort_by_key(&mut v, |&x| core::cmp::Reverse(x));
            want.reverse();
            assert_eq!(v, want, "reversed, length {len}");
        }
    }
}
