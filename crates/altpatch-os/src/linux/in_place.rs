//! The in-place publication's stores: which bytes a batch stores over the
//! live text, in how few `pwrite`s, leaving everything of the kernel's
//! where it is (the rules in [`in_place_stores`]; the page swap's are in
//! `runs.rs`, which this shares its join limit and breakpoint test with).

use alloc::vec::Vec;
use core::ops::Range;

use super::runs::{JOIN, has_int3};
use crate::arch::TRAP;
use crate::poke::short_eq;
use crate::short::extend_short;

/// What text between sites is, for the question whether it may be
/// rewritten as it is.
pub(super) enum Backing<'v> {
    /// Anonymous memory (or altpatch's own re-homed text): no probe reaches
    /// it, and only an `int3` could be someone's breakpoint.
    Anonymous,
    /// A file's text, and the file's bytes under it.
    File(&'v [u8]),
    /// A file's text whose file cannot be read (replaced, truncated, not
    /// mappable): nothing proves what is the kernel's.
    Unknown,
}

/// A batch's writes as the in-place publication keeps them: (address,
/// length) each, sorted and disjoint; their bytes one after the other in
/// `new`, and the bytes they replace (as validation read them) in `old`.
#[derive(Clone, Copy)]
pub(super) struct Kept<'a> {
    pub(super) writes: &'a [(usize, usize)],
    pub(super) new: &'a [u8],
    pub(super) old: &'a [u8],
}

/// The stores the in-place publication makes.
#[derive(Default)]
pub(super) struct Stores {
    /// The bytes of every store, one after the other.
    pub(super) buf: Vec<u8>,
    /// Each store: its text address and its bytes' range in `buf`.
    pub(super) list: Vec<(usize, Range<usize>)>,
    /// Addresses left holding a breakpoint of the kernel's, over a byte
    /// its write does not change (the read-back accepts them).
    pub(super) left: Vec<usize>,
}

impl Stores {
    pub(super) const fn new() -> Stores {
        Stores {
            buf: Vec::new(),
            list: Vec::new(),
            left: Vec::new(),
        }
    }

    pub(super) fn clear(&mut self) {
        self.buf.clear();
        self.list.clear();
        self.left.clear();
    }
}

/// Stores that put every write in place (`pwrite` to the live text),
/// appended to `out`.
///
/// `live(r)` reads the text's bytes `r`, `backing(r)` says what the text
/// `r` is (see [`Backing`]), and `joinable(gap)` whether a gap lies in the
/// batch's text (so may be read).
///
/// * A write whose bytes are there already needs no store.
/// * Two stores are joined across a gap of at most [`JOIN`] bytes, its
///   bytes rewritten as they are, so one `pwrite` covers many sites — only
///   if nothing of the kernel's can be in the gap, since a breakpoint or
///   an optimized probe (a probed `nop5` becomes a `call` to the kernel's
///   uprobe trampoline) removed between our read and our store would come
///   back. A file's text must be exactly the file's bytes (an `int3` of the
///   file's is padding: the kernel never probes one); anonymous text,
///   which no probe reaches, must hold no `int3`; a file's text whose file
///   cannot be read is never joined.
/// * A write over text holding an `int3` now (the kernel placed it after
///   validation) stores only the bytes that change, each run of them on
///   its own, and leaves a breakpoint placed since validation over a byte
///   the write does not change or sets to the file's byte (the uprobe
///   stays; noted in `left`). An `int3` validation read is an earlier
///   form's filler, ours, and is written over like any byte.
pub(super) fn in_place_stores<'t>(
    kept: Kept<'_>,
    live: impl Fn(Range<usize>) -> &'t [u8],
    backing: impl Fn(Range<usize>) -> Backing<'t>,
    joinable: impl Fn(Range<usize>) -> bool,
    out: &mut Stores,
) {
    // The store being built: its text address and where it starts in `buf`.
    let mut open: Option<(usize, usize)> = None;
    let mut end = 0;
    let close = |open: &mut Option<(usize, usize)>, out: &mut Stores| {
        if let Some((at, from)) = open.take() {
            out.list.push((at, from..out.buf.len()));
        }
    };
    let mut from = 0;
    for &(addr, len) in kept.writes {
        let (bytes, was) = (&kept.new[from..from + len], &kept.old[from..from + len]);
        from += len;
        let now = live(addr..addr + len);
        if short_eq(now, bytes) {
            continue;
        }
        if has_int3(now) {
            close(&mut open, out);
            let file = match backing(addr..addr + len) {
                Backing::File(f) => Some(f),
                _ => None,
            };
            // The kernel's breakpoint, placed since validation read the
            // byte (an `int3` validation read is ours: an earlier form's
            // filler), over a byte that ends as it was or as the file has
            // it (the instruction the kernel runs for it).
            let kernels = |q: usize| {
                now[q] == TRAP
                    && was[q] != TRAP
                    && (bytes[q] == was[q] || file.is_some_and(|f| f[q] == bytes[q]))
            };
            let mut p = 0;
            while p < len {
                if kernels(p) {
                    out.left.push(addr + p);
                }
                if now[p] == bytes[p] || kernels(p) {
                    p += 1;
                    continue;
                }
                let q = (p..len)
                    .find(|&q| now[q] == bytes[q] || kernels(q))
                    .unwrap_or(len);
                let at = out.buf.len();
                out.buf.extend_from_slice(&bytes[p..q]);
                out.list.push((addr + p, at..out.buf.len()));
                p = q;
            }
            continue;
        }
        let joined =
            open.is_some() && addr >= end && addr - end <= JOIN && joinable(end..addr) && {
                let gap = live(end..addr);
                let quiet = match backing(end..addr) {
                    Backing::File(f) => f == gap,
                    Backing::Anonymous => !has_int3(gap),
                    Backing::Unknown => gap.is_empty(),
                };
                if quiet {
                    out.buf.extend_from_slice(gap);
                }
                quiet
            };
        if !joined {
            close(&mut open, out);
            open = Some((addr, out.buf.len()));
        }
        extend_short(&mut out.buf, bytes);
        end = addr + len;
    }
    close(&mut open, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// The stores `in_place_stores` makes over `live` (addresses are
    /// offsets into it; every gap is joinable unless it reaches `fence`),
    /// each as (offset, the bytes stored); the text maps no file.
    fn stores(live: &[u8], writes: &[(usize, &[u8])], fence: usize) -> Vec<(usize, Vec<u8>)> {
        stores_over(live, None, writes, fence)
    }

    /// As [`stores`], the text mapping a file holding `file`. Each write
    /// replaces what `file` (else `live`) holds there.
    fn stores_over(
        live: &[u8],
        file: Option<&[u8]>,
        writes: &[(usize, &[u8])],
        fence: usize,
    ) -> Vec<(usize, Vec<u8>)> {
        let list: Vec<(usize, usize)> = writes.iter().map(|&(a, b)| (a, b.len())).collect();
        let kept: Vec<u8> = writes
            .iter()
            .flat_map(|&(_, b)| b.iter().copied())
            .collect();
        let was = file.unwrap_or(live);
        let old: Vec<u8> = list
            .iter()
            .flat_map(|&(a, n)| was[a..a + n].iter().copied())
            .collect();
        let mut out = Stores::default();
        let kept = Kept {
            writes: &list,
            new: &kept,
            old: &old,
        };
        in_place_stores(
            kept,
            |r| &live[r],
            |r| match file {
                Some(f) => Backing::File(&f[r]),
                None => Backing::Anonymous,
            },
            |gap| gap.end <= fence || gap.start > fence,
            &mut out,
        );
        let Stores { buf, list, .. } = out;
        list.into_iter()
            .map(|(a, r)| (a, buf[r].to_vec()))
            .collect()
    }

    #[test]
    fn joins_across_gaps_nothing_of_the_kernels_can_be_in() {
        let mut live = vec![0x90u8; 64];
        let (a, b) = ([0xe9, 1, 2, 3, 4], [0xe9, 5, 6, 7, 8]);
        let split = [(4, a.to_vec()), (20, b.to_vec())];
        let mut joined = a.to_vec();
        joined.extend_from_slice(&live[9..20]);
        joined.extend_from_slice(&b);
        assert_eq!(
            stores(&live, &[(4, &a), (20, &b)], 64),
            [(4, joined.clone())]
        );
        assert_eq!(
            stores_over(&live, Some(&live.clone()), &[(4, &a), (20, &b)], 64),
            [(4, joined)]
        );
        // A gap outside the batch's text is not read.
        assert_eq!(stores(&live, &[(4, &a), (20, &b)], 12), split);
        // A breakpoint in the gap (someone's, or the kernel's) splits it:
        // rewritten as it is, it could outlive its probe.
        let file = live.clone();
        live[12] = 0xcc;
        assert_eq!(stores(&live, &[(4, &a), (20, &b)], 64), split);
        assert_eq!(
            stores_over(&live, Some(&file), &[(4, &a), (20, &b)], 64),
            split
        );
        // So does an optimized probe: a `nop5` the kernel made a `call`.
        let mut optimized = file.clone();
        optimized[10..15].copy_from_slice(&[0xe8, 0x10, 0x20, 0x30, 0x40]);
        assert_eq!(
            stores_over(&optimized, Some(&file), &[(4, &a), (20, &b)], 64),
            split
        );
        // The file's own `int3` (padding) is no probe: joined.
        let mut joined = a.to_vec();
        joined.extend_from_slice(&live[9..20]);
        joined.extend_from_slice(&b);
        assert_eq!(
            stores_over(&live, Some(&live), &[(4, &a), (20, &b)], 64),
            [(4, joined)]
        );
    }

    #[test]
    fn stores_nothing_already_there() {
        let live = vec![0x90u8; 64];
        let nop5 = [0x90; 5];
        assert!(stores(&live, &[(4, &nop5), (30, &nop5)], 64).is_empty());
    }

    #[test]
    fn over_a_breakpoint_only_the_changed_bytes_are_stored() {
        // A uprobe's `int3` on the site's first byte (placed after
        // validation read `0f`), which the write does not change: left for
        // the kernel to remove.
        let file = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0x90];
        let live = [0xcc, 0x1f, 0x44, 0x00, 0x00, 0x90];
        let want = [0x0f, 0x1f, 0x44, 0x11, 0x22];
        assert_eq!(
            stores_over(&live, Some(&file), &[(0, &want)], 64),
            [(3, vec![0x11, 0x22])]
        );
        // A byte the write changes is ours, breakpoint or not.
        let call = [0xe8, 0x1f, 0x44, 0x00, 0x01];
        assert_eq!(
            stores_over(&live, Some(&file), &[(0, &call)], 64),
            [(0, vec![0xe8]), (4, vec![0x01])]
        );
    }

    /// `in_place_stores` over one write of `new` replacing `old`, the text
    /// `live` and its backing as given; the stores and the breakpoints left.
    #[allow(clippy::type_complexity)]
    fn one_write<'t>(
        live: &'t [u8],
        backing: impl Fn(Range<usize>) -> Backing<'t>,
        writes: &[(usize, usize)],
        new: &[u8],
        old: &[u8],
    ) -> (Vec<(usize, Vec<u8>)>, Vec<usize>) {
        let mut out = Stores::default();
        let kept = Kept { writes, new, old };
        in_place_stores(kept, |r| &live[r], backing, |_| true, &mut out);
        let Stores { buf, list, left } = out;
        let list = list
            .into_iter()
            .map(|(a, r)| (a, buf[r].to_vec()))
            .collect();
        (list, left)
    }

    #[test]
    fn a_rollback_leaves_the_kernels_breakpoint_over_the_files_byte() {
        // We patched `e8 ..` into a site whose file bytes are a NOP5; a
        // uprobe attached since sits on our patched first byte. Putting the
        // file's bytes back leaves it: the kernel runs the file's
        // instruction for it.
        static FILE: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        let live = [0xcc, 1, 2, 3, 4];
        let patched = [0xe8, 1, 2, 3, 4];
        let (stores, left) = one_write(
            &live,
            |r| Backing::File(&FILE[r]),
            &[(0, 5)],
            &FILE,
            &patched,
        );
        assert_eq!(stores, [(1, vec![0x1f, 0x44, 0x00, 0x00])]);
        assert_eq!(left, [0]);
        // Without the file, that byte is stored.
        let (stores, left) = one_write(&live, |_| Backing::Anonymous, &[(0, 5)], &FILE, &patched);
        assert_eq!(stores, [(0, FILE.to_vec())]);
        assert!(left.is_empty());
    }

    #[test]
    fn our_own_filler_is_written_over() {
        // `cs jmp *%rax; int3`-like: an earlier form ended with our `int3`
        // filler (validation read it); going back to the file's `cs jmp
        // rel32` writes over it, though the file has its byte there.
        static FILE: [u8; 6] = [0x2e, 0xe9, 1, 2, 3, 4];
        let ours = [0x0f, 0x1f, 0x00, 0xff, 0xe0, 0xcc];
        let (stores, left) = one_write(&ours, |r| Backing::File(&FILE[r]), &[(0, 6)], &FILE, &ours);
        assert_eq!(stores, [(0, FILE.to_vec())]);
        assert!(left.is_empty());
    }

    #[test]
    fn text_of_a_file_that_cannot_be_read_is_never_joined() {
        let live = [0x90u8; 32];
        let (a, b) = ([0xe9, 1, 2, 3, 4], [0xe9, 5, 6, 7, 8]);
        let new: Vec<u8> = a.iter().chain(&b).copied().collect();
        let old = [0x90u8; 10];
        let (stores, _) = one_write(&live, |_| Backing::Unknown, &[(4, 5), (20, 5)], &new, &old);
        assert_eq!(stores, [(4, a.to_vec()), (20, b.to_vec())]);
        // Adjacent writes have no gap to read: joined.
        let (stores, _) = one_write(&live, |_| Backing::Unknown, &[(4, 5), (9, 5)], &new, &old);
        assert_eq!(stores, [(4, new.clone())]);
    }
}
