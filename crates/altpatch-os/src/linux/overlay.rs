//! The bytes this process's patches have put in text: every write that
//! landed, by address, the last one winning.
//!
//! The page swap stages a fresh private mapping of the text's file, in
//! which the kernel has placed the breakpoints of the uprobes registered
//! now; it must then carry over what earlier patches wrote on the page, and
//! nothing else. Copying the live page instead would carry the kernel's
//! `int3`s into memory where the kernel will never remove them, and a
//! breakpoint removed while the page is staged would come back as a stray
//! `int3` that kills the process. Only this record says which bytes of a
//! page are ours: an `int3` of our own filler and a uprobe's look alike.
//!
//! A span is carried only while the text still holds it (see
//! [`Overlay::each_in`]'s callers): an object unloaded and loaded again, or
//! a page someone else rewrote, is not patched behind anyone's back.

use alloc::vec::Vec;
use core::ops::Range;

/// `dst.copy_from_slice(src)` for the few bytes of a site, without a call.
#[inline]
fn copy_short(src: &[u8], dst: &mut [u8]) {
    debug_assert_eq!(src.len(), dst.len());
    // SAFETY: both slices hold `src.len()` bytes.
    unsafe { crate::poke::copy_short(src.as_ptr(), dst.as_mut_ptr(), src.len()) }
}

/// One recorded write: `len` bytes at `addr`, kept at `at` in the pool.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    addr: usize,
    len: u32,
    at: u32,
}

impl Span {
    fn end(&self) -> usize {
        self.addr + self.len as usize
    }
}

/// The (at most three) spans that replace the ones a write or a forget
/// touched: what is left before, the write, what is left after.
#[derive(Default)]
struct Keep {
    spans: [Span; 3],
    n: usize,
}

impl Keep {
    fn push(&mut self, s: Span) {
        self.spans[self.n] = s;
        self.n += 1;
    }

    fn spans(&self) -> &[Span] {
        &self.spans[..self.n]
    }
}

/// `spans[range] = with`, moving the tail once (what `Vec::splice` does,
/// without its generic machinery in every program that patches).
fn replace_spans(spans: &mut Vec<Span>, range: Range<usize>, with: &[Span]) {
    let len = spans.len();
    let start = range.start;
    if with.len() > range.len() {
        let grow = with.len() - range.len();
        spans.resize(len + grow, with[0]);
        spans.copy_within(range.end..len, range.end + grow);
    } else {
        spans.copy_within(range.end..len, start + with.len());
        spans.truncate(len - (range.len() - with.len()));
    }
    spans[start..start + with.len()].copy_from_slice(with);
}

/// The recorded writes: sorted, disjoint spans over a pool of bytes.
pub(crate) struct Overlay {
    spans: Vec<Span>,
    pool: Vec<u8>,
    /// Pool bytes no span refers to any more.
    garbage: usize,
    /// The span the last in-place rewrite found.
    hint: usize,
}

impl Overlay {
    pub(crate) const fn new() -> Overlay {
        Overlay {
            spans: Vec::new(),
            pool: Vec::new(),
            garbage: 0,
            hint: 0,
        }
    }

    /// Records a batch's writes: (address, length) each, their bytes one
    /// after the other in `bytes`. Many writes in address order, none over
    /// a recorded span (start-up), are merged with the spans in one pass;
    /// others are recorded one by one.
    pub(crate) fn record_all(&mut self, writes: &[(usize, usize)], bytes: &[u8]) {
        let sorted = writes.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0);
        if !(sorted && writes.len() * 8 >= self.spans.len() && self.merge(writes)) {
            let mut from = 0;
            for &(addr, n) in writes {
                self.record(addr, &bytes[from..from + n]);
                from += n;
            }
            return;
        }
        self.pool.extend_from_slice(bytes);
    }

    /// Merges sorted, disjoint writes whose bytes will be appended to the
    /// pool into the spans; `false` (nothing changed) if one overlaps a
    /// recorded span.
    fn merge(&mut self, writes: &[(usize, usize)]) -> bool {
        let mut at = self.pool.len();
        let mut merged = Vec::with_capacity(self.spans.len() + writes.len());
        let mut old = self.spans.iter().copied().peekable();
        for &(addr, len) in writes {
            while let Some(s) = old.next_if(|s| s.addr < addr) {
                if s.end() > addr {
                    return false;
                }
                merged.push(s);
            }
            if old.peek().is_some_and(|s| s.addr < addr + len) {
                return false;
            }
            if len > 0 {
                merged.push(Span {
                    addr,
                    len: len as u32,
                    at: at as u32,
                });
            }
            at += len;
        }
        merged.extend(old);
        self.spans = merged;
        true
    }

    /// Records that `bytes` are now at `addr`.
    #[inline]
    pub(crate) fn record(&mut self, addr: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // Start-up writes arrive in address order: append.
        if self.spans.last().is_none_or(|s| s.end() <= addr) {
            self.push_new(addr, bytes);
            return;
        }
        // A site rewritten again (a key flipped back and forth): in place.
        // Writes come in address order, so the span after the last one
        // found is tried before a search.
        let i = match self.spans.get(self.hint + 1) {
            Some(s) if s.addr == addr => self.hint + 1,
            _ => self.spans.partition_point(|s| s.end() <= addr),
        };
        let s = self.spans[i];
        if s.addr == addr && s.len as usize == bytes.len() {
            let at = s.at as usize;
            copy_short(bytes, &mut self.pool[at..at + bytes.len()]);
            self.hint = i;
            return;
        }
        self.replace_range(i, addr, bytes);
    }

    fn push_new(&mut self, addr: usize, bytes: &[u8]) {
        let at = self.pool.len() as u32;
        self.pool.extend_from_slice(bytes);
        self.spans.push(Span {
            addr,
            len: bytes.len() as u32,
            at,
        });
    }

    /// The general case: the spans from `i` on that overlap the new write
    /// are cut back to what lies outside it.
    fn replace_range(&mut self, i: usize, addr: usize, bytes: &[u8]) {
        let end = addr + bytes.len();
        let j = i + self.spans[i..].partition_point(|s| s.addr < end);
        let mut keep = Keep::default();
        if let Some(first) = self.spans.get(i).filter(|s| s.addr < addr && i < j) {
            keep.push(Span {
                len: (addr - first.addr) as u32,
                ..*first
            });
        }
        let at = self.pool.len() as u32;
        self.pool.extend_from_slice(bytes);
        keep.push(Span {
            addr,
            len: bytes.len() as u32,
            at,
        });
        if j > i {
            let last = self.spans[j - 1];
            if last.end() > end {
                let cut = (end - last.addr) as u32;
                keep.push(Span {
                    addr: end,
                    len: last.len - cut,
                    at: last.at + cut,
                });
            }
        }
        let before: usize = self.spans[i..j].iter().map(|s| s.len as usize).sum();
        let kept: usize = keep.spans().iter().map(|s| s.len as usize).sum::<usize>() - bytes.len();
        self.garbage += before - kept;
        replace_spans(&mut self.spans, i..j, keep.spans());
        self.compact_if_wasteful();
    }

    /// Forgets every recorded byte in `range` (text that no longer holds
    /// them).
    pub(crate) fn forget(&mut self, range: Range<usize>) {
        let i = self.spans.partition_point(|s| s.end() <= range.start);
        let j = i + self.spans[i..].partition_point(|s| s.addr < range.end);
        if i == j {
            return;
        }
        let mut keep = Keep::default();
        let (first, last) = (self.spans[i], self.spans[j - 1]);
        if first.addr < range.start {
            keep.push(Span {
                len: (range.start - first.addr) as u32,
                ..first
            });
        }
        if last.end() > range.end {
            let cut = (range.end - last.addr) as u32;
            keep.push(Span {
                addr: range.end,
                len: last.len - cut,
                at: last.at + cut,
            });
        }
        let before: usize = self.spans[i..j].iter().map(|s| s.len as usize).sum();
        let kept: usize = keep.spans().iter().map(|s| s.len as usize).sum();
        self.garbage += before - kept;
        replace_spans(&mut self.spans, i..j, keep.spans());
        self.compact_if_wasteful();
    }

    /// Calls `f(addr, bytes)` for every recorded run of bytes inside
    /// `range`, in address order, clipped to it.
    pub(crate) fn each_in(&self, range: Range<usize>, mut f: impl FnMut(usize, &[u8])) {
        for (a, b) in self.spans_in(range) {
            f(a, b);
        }
    }

    /// The recorded runs of bytes inside `range`, in address order, clipped
    /// to it.
    pub(crate) fn spans_in(&self, range: Range<usize>) -> impl Iterator<Item = (usize, &[u8])> {
        let i = self.spans.partition_point(|s| s.end() <= range.start);
        self.spans[i..]
            .iter()
            .take_while(move |s| s.addr < range.end)
            .map(move |s| {
                let lo = s.addr.max(range.start);
                let hi = s.end().min(range.end);
                let at = s.at as usize + (lo - s.addr);
                (lo, &self.pool[at..at + (hi - lo)])
            })
    }

    /// Whether any byte in `range` is recorded.
    #[cfg(test)]
    fn any_in(&self, range: Range<usize>) -> bool {
        let mut any = false;
        self.each_in(range, |_, _| any = true);
        any
    }

    /// Rewrites the pool without the bytes no span uses, once they are
    /// most of it.
    fn compact_if_wasteful(&mut self) {
        if self.garbage < 4096 || self.garbage * 2 < self.pool.len() {
            return;
        }
        let mut pool = Vec::with_capacity(self.pool.len() - self.garbage);
        for s in &mut self.spans {
            let at = s.at as usize;
            let new_at = pool.len() as u32;
            pool.extend_from_slice(&self.pool[at..at + s.len as usize]);
            s.at = new_at;
        }
        self.pool = pool;
        self.garbage = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::Overlay;
    use alloc::collections::BTreeMap;
    use alloc::vec;
    use alloc::vec::Vec;

    /// What the overlay holds, byte by byte.
    fn bytes(o: &Overlay) -> BTreeMap<usize, u8> {
        let mut m = BTreeMap::new();
        o.each_in(0..usize::MAX, |a, b| {
            for (k, v) in b.iter().enumerate() {
                assert!(m.insert(a + k, *v).is_none(), "spans overlap at {}", a + k);
            }
        });
        m
    }

    #[test]
    fn a_batch_recorded_at_once_is_recorded_as_one_by_one() {
        let earlier = [
            (0x1000, vec![1u8; 5]),
            (0x1100, vec![2; 6]),
            (0x2000, vec![3; 5]),
        ];
        let cases: [&[(usize, usize)]; 4] = [
            // between, before and after the earlier spans: merged
            &[(0x0f00, 5), (0x1010, 5), (0x1106, 5), (0x3000, 6)],
            // one over an earlier span: one by one
            &[(0x0f00, 5), (0x1102, 5)],
            // out of order: one by one
            &[(0x3000, 5), (0x1010, 5)],
            &[],
        ];
        for writes in cases {
            let total: usize = writes.iter().map(|w| w.1).sum();
            let new: Vec<u8> = (0..total).map(|k| 0x40 + k as u8).collect();
            let (mut at_once, mut one_by_one) = (Overlay::new(), Overlay::new());
            for (a, b) in &earlier {
                at_once.record(*a, b);
                one_by_one.record(*a, b);
            }
            at_once.record_all(writes, &new);
            let mut from = 0;
            for &(a, n) in writes {
                one_by_one.record(a, &new[from..from + n]);
                from += n;
            }
            assert_eq!(bytes(&at_once), bytes(&one_by_one), "{writes:x?}");
        }
    }

    #[test]
    fn agrees_with_a_byte_map_under_random_writes_and_forgets() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..40 {
            let mut o = Overlay::new();
            let mut model = BTreeMap::new();
            for k in 0..400 {
                let addr = 0x1000 + (next() % 300) as usize;
                if next() % 7 == 0 {
                    let len = (next() % 40) as usize;
                    o.forget(addr..addr + len);
                    for a in addr..addr + len {
                        model.remove(&a);
                    }
                } else {
                    let len = 1 + (next() % 12) as usize;
                    let b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                    o.record(addr, &b);
                    for (i, v) in b.iter().enumerate() {
                        model.insert(addr + i, *v);
                    }
                }
                assert_eq!(bytes(&o), model, "round {round}, step {k}");
            }
        }
    }

    #[test]
    fn appends_and_rewrites_in_place_without_growing() {
        let mut o = Overlay::new();
        for i in 0..100 {
            o.record(0x4000 + 16 * i, &[0x0f, 0x1f, 0x44, 0, 0]);
        }
        let pool = o.pool.len();
        for _ in 0..50 {
            o.record(0x4000 + 16 * 7, &[0xe9, 1, 2, 3, 4]);
            o.record(0x4000 + 16 * 7, &[0x0f, 0x1f, 0x44, 0, 0]);
        }
        assert_eq!(o.pool.len(), pool);
        assert_eq!(o.spans.len(), 100);
        assert!(o.any_in(0x4000 + 16 * 7..0x4000 + 16 * 7 + 1));
        assert!(!o.any_in(0x4005..0x4010));
        let mut seen = Vec::new();
        o.each_in(0x4003..0x4012, |a, b| seen.push((a, b.to_vec())));
        assert_eq!(
            seen,
            [
                (0x4003, alloc::vec![0, 0]),
                (0x4010, alloc::vec![0x0f, 0x1f])
            ]
        );
    }
}
