//! Which bytes a batch stores, and in how few system calls, without ever
//! storing an `int3` that is not ours.
//!
//! A batch's bytes reach text by `pwrite` to `/proc/self/mem`: into the
//! live page (in place) or into a fresh private mapping of the text's file
//! (the page swap). Either target may hold breakpoints the kernel placed
//! for uprobes, and the kernel adds and removes them whenever a tracer
//! attaches or detaches — also between our reading a byte and our writing
//! it. So a run of bytes we store must consist of:
//!
//! * positions that are ours (recorded writes and the batch's writes), and
//! * between two of ours, bytes we rewrite with the value they have, which
//!   is safe only when that value is not `0xcc`: a breakpoint removed
//!   before our store would come back, unknown to the kernel, and kill the
//!   next thread to reach it. A gap holding `0xcc` splits the run.
//!
//! At a position of ours where the target holds `0xcc` and the file holds
//! the byte we want, the `0xcc` is the kernel's breakpoint over an
//! unpatched instruction: it is left alone.

use alloc::vec::Vec;
use core::ops::Range;

use crate::poke::short_eq;
use crate::short::extend_short;

/// Unchanged bytes worth rewriting between two stores to save a call: a
/// page. A `pwrite` to `/proc/self/mem` costs microseconds; copying a page
/// of gap costs about 1 400 instructions. On `tests/fixtures/realprog`'s
/// start-up, 512 made 498 calls and 4096 makes 147, 1.3 ms less, for 4 %
/// more instructions.
pub(super) const JOIN: usize = 4096;

// Whether bytes hold a breakpoint is the architecture's question.
use crate::arch::append_unless_trap;
pub(super) use crate::arch::contains_trap as has_int3;

/// The stores that cover `owned` (sorted by start), appended to `out`: a
/// range for which `same` holds needs none; one for which `whole` holds is
/// stored as it is; any other only where `differs` (byte by byte). Two
/// stores are joined across a gap of at most [`JOIN`] bytes when
/// `joinable` says its bytes may be rewritten as they are.
fn runs(
    owned: &[Range<usize>],
    out: &mut Vec<Range<usize>>,
    same: impl Fn(Range<usize>) -> bool,
    whole: impl Fn(Range<usize>) -> bool,
    differs: impl Fn(usize) -> bool,
    joinable: impl Fn(Range<usize>) -> bool,
) {
    let first = out.len();
    let push = |r: Range<usize>, out: &mut Vec<Range<usize>>| {
        if let Some(last) = out[first..].last_mut() {
            if r.start <= last.end {
                last.end = last.end.max(r.end);
                return;
            }
            let gap = last.end..r.start;
            if gap.len() <= JOIN && joinable(gap) {
                last.end = r.end;
                return;
            }
        }
        out.push(r);
    };
    for r in owned {
        if same(r.clone()) {
            continue;
        }
        if whole(r.clone()) {
            push(r.clone(), out);
            continue;
        }
        let mut run: Option<usize> = None;
        for p in r.clone() {
            match (differs(p), run) {
                (true, None) => run = Some(p),
                (false, Some(s)) => {
                    push(s..p, out);
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            push(s..r.end, out);
        }
    }
}

/// Stores that put every write in place (`pwrite` to the live text):
/// appended to `out` as (text address, range of `buf` holding the bytes).
///
/// `writes` are (address, length) in address order, their bytes one after
/// the other in `kept`; `live(r)` reads the text's bytes `r`, `file(r)`
/// the file's bytes under them where known, and `joinable(gap)` says
/// whether the gap lies in the batch's text (so may be read). A write whose
/// bytes are there already needs no store. Two stores are joined across a
/// gap of at most [`JOIN`] bytes, its bytes rewritten as they are, so one
/// `pwrite` covers many sites, if the gap holds no `int3` or is exactly
/// the file's bytes (see `file_view.rs`: then none of its `int3`s is the
/// kernel's). A write over text holding an `int3` (a breakpoint the kernel
/// placed after validation) stores only the bytes that differ, each run of
/// them on its own. A write starting before the previous store's end
/// (a batch writing the same bytes twice) starts a store of its own, after
/// it: the last write wins.
pub(super) fn in_place_stores<'t>(
    writes: &[(usize, usize)],
    kept: &[u8],
    live: impl Fn(Range<usize>) -> &'t [u8],
    file: impl Fn(Range<usize>) -> Option<&'t [u8]>,
    joinable: impl Fn(Range<usize>) -> bool,
    buf: &mut Vec<u8>,
    out: &mut Vec<(usize, Range<usize>)>,
) {
    // The store being built: its text address and where it starts in `buf`.
    let mut open: Option<(usize, usize)> = None;
    let mut end = 0;
    let close = |open: &mut Option<(usize, usize)>, buf: &Vec<u8>, out: &mut Vec<_>| {
        if let Some((at, from)) = open.take() {
            out.push((at, from..buf.len()));
        }
    };
    let mut from = 0;
    for &(addr, len) in writes {
        let bytes = &kept[from..from + len];
        from += len;
        let now = live(addr..addr + len);
        if short_eq(now, bytes) {
            continue;
        }
        if has_int3(now) {
            close(&mut open, buf, out);
            let mut p = 0;
            while p < len {
                if now[p] == bytes[p] {
                    p += 1;
                    continue;
                }
                let q = (p..len).find(|&q| now[q] == bytes[q]).unwrap_or(len);
                let at = buf.len();
                buf.extend_from_slice(&bytes[p..q]);
                out.push((addr + p, at..buf.len()));
                p = q;
            }
            continue;
        }
        // The gap is copied as it is, unless it holds an `int3` that may
        // not be the file's.
        let joined = open.is_some()
            && addr >= end
            && addr - end <= JOIN
            && joinable(end..addr)
            && (append_unless_trap(buf, live(end..addr)) || {
                let gap = live(end..addr);
                let files = file(end..addr).is_some_and(|f| f == gap);
                if files {
                    buf.extend_from_slice(gap);
                }
                files
            });
        if !joined {
            close(&mut open, buf, out);
            open = Some((addr, buf.len()));
        }
        extend_short(buf, bytes);
        end = addr + len;
    }
    close(&mut open, buf, out);
}

/// Appends to `out` the stores (offsets into the pages) that make a fresh
/// private mapping of a file — which holds the file's bytes `file`, and
/// the kernel's breakpoints where the live text `text` holds them — hold
/// `want` at every position of `owned` (sorted by start). An owned byte
/// equal to the file's is not stored (the mapping has it, or a probe the
/// kernel keeps there: where the text shows one, only the differing bytes
/// of a range are stored). Stores are joined across gaps of at most
/// [`JOIN`] bytes where the text holds the file's bytes — no breakpoint of
/// the kernel's is there (one makes them differ), and the file's own
/// `0xcc` padding may be rewritten as it is.
pub(super) fn file_runs(
    text: &[u8],
    file: &[u8],
    want: &[u8],
    owned: &[Range<usize>],
    out: &mut Vec<Range<usize>>,
) {
    runs(
        owned,
        out,
        |r| short_eq(&file[r.clone()], &want[r]),
        |r| !has_int3(&text[r]),
        |p| file[p] != want[p],
        |gap| text[gap.clone()] == file[gap],
    );
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn finds_int3_in_short_and_long_slices() {
        for n in 0..20 {
            let mut b = vec![0x90u8; n];
            assert!(!has_int3(&b));
            for i in 0..n {
                b[i] = 0xcc;
                assert!(has_int3(&b), "n={n} i={i}");
                b[i] = 0xcd;
                assert!(!has_int3(&b), "n={n} i={i}");
                b[i] = 0x90;
            }
        }
    }

    /// The stores `in_place_stores` makes over `live` (addresses are
    /// offsets into it; every gap is joinable unless it reaches `fence`),
    /// each as (offset, the bytes stored).
    fn stores(live: &[u8], writes: &[(usize, &[u8])], fence: usize) -> Vec<(usize, Vec<u8>)> {
        stores_over(live, None, writes, fence)
    }

    /// As [`stores`], the file's bytes known to be `file`.
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
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        in_place_stores(
            &list,
            &kept,
            |r| &live[r],
            |r| file.map(|f| &f[r]),
            |gap| gap.end <= fence || gap.start > fence,
            &mut buf,
            &mut out,
        );
        out.into_iter().map(|(a, r)| (a, buf[r].to_vec())).collect()
    }

    #[test]
    fn joins_across_plain_gaps_and_splits_at_int3() {
        let mut live = vec![0x90u8; 64];
        let (a, b) = ([0xe9, 1, 2, 3, 4], [0xe9, 5, 6, 7, 8]);
        let mut joined = a.to_vec();
        joined.extend_from_slice(&live[9..20]);
        joined.extend_from_slice(&b);
        assert_eq!(stores(&live, &[(4, &a), (20, &b)], 64), [(4, joined)]);
        // A gap outside the batch's text is not read.
        assert_eq!(
            stores(&live, &[(4, &a), (20, &b)], 12),
            [(4, a.to_vec()), (20, b.to_vec())]
        );
        // A breakpoint in the gap (someone's, or the kernel's) splits it:
        // rewritten as it is, it could outlive its probe.
        let file = live.clone();
        live[12] = 0xcc;
        assert_eq!(
            stores(&live, &[(4, &a), (20, &b)], 64),
            [(4, a.to_vec()), (20, b.to_vec())]
        );
        assert_eq!(
            stores_over(&live, Some(&file), &[(4, &a), (20, &b)], 64),
            [(4, a.to_vec()), (20, b.to_vec())]
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
    fn stores_nothing_already_there_and_lets_a_repeated_write_win() {
        let live = vec![0x90u8; 64];
        let nop5 = [0x90; 5];
        assert!(stores(&live, &[(4, &nop5), (30, &nop5)], 64).is_empty());
        let (a, b) = ([0xe8, 1, 2, 3, 4], [0xe8, 9, 9, 9, 9]);
        assert_eq!(
            stores(&live, &[(4, &a), (4, &b)], 64),
            [(4, a.to_vec()), (4, b.to_vec())]
        );
    }

    #[test]
    fn over_a_breakpoint_only_the_differing_bytes_are_stored() {
        // A uprobe's `int3` on the site's first byte, which we do not
        // change: left for the kernel to remove.
        let live = [0xcc, 0x1f, 0x44, 0x00, 0x00, 0x90];
        let want = [0x0f, 0x1f, 0x44, 0x11, 0x22];
        assert_eq!(
            stores(&live, &[(0, &want)], 64),
            [(0, vec![0x0f]), (3, vec![0x11, 0x22])]
        );
        let keep = [0xcc, 0x1f, 0x44, 0x11, 0x00];
        assert_eq!(stores(&live, &[(0, &keep)], 64), [(3, vec![0x11])]);
    }

    #[test]
    fn leaves_the_kernels_breakpoint_over_an_unpatched_byte() {
        // The site is ours and we restore it to the file's bytes, but a
        // uprobe sits on its first byte now: not ours to remove, and a
        // fresh copy of the file has the bytes (and the probe) already.
        let file = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        let text = [0xcc, 0x1f, 0x44, 0x00, 0x00];
        let mut out = Vec::new();
        file_runs(&text, &file, &file, &[0..5], &mut out);
        assert!(out.is_empty(), "{out:?}");
        // A patched byte under it is ours to write (the probe sat on a
        // patched instruction, which the kernel would run from the file).
        let want = [0xe9, 1, 2, 3, 4];
        file_runs(&text, &file, &want, &[0..5], &mut out);
        assert_eq!(out, [0..5]);
    }

    #[test]
    fn a_files_copy_gets_our_bytes_and_keeps_the_kernels() {
        let file = vec![0x90u8; 64];
        let mut text = file.clone();
        text[4] = 0xcc; // a uprobe's breakpoint, not ours
        let mut want = text.clone();
        want[10..15].copy_from_slice(&[0xe9, 1, 2, 3, 4]);
        want[20..25].copy_from_slice(&[0xe9, 5, 6, 7, 8]);
        let mut out = Vec::new();
        // Our two sites, joined over a gap holding the file's bytes; the
        // breakpoint at 4 is in no store.
        file_runs(&text, &file, &want, &[10..15, 20..25], &mut out);
        assert_eq!(out, [10..25]);
        // A site of ours back to the file's bytes: nothing to store (the
        // fresh copy has them).
        out.clear();
        file_runs(&text, &file, &file, &[10..15], &mut out);
        assert!(out.is_empty());
        // A gap over the breakpoint is not joined.
        out.clear();
        want[0..3].copy_from_slice(&[0xe8, 0xe8, 0xe8]);
        file_runs(&text, &file, &want, &[0..3, 10..15], &mut out);
        assert_eq!(out, [0..3, 10..15]);
        // An int3 in an owned range (a probe on a byte we restore): only
        // the bytes differing from the file are stored.
        let mut want2 = file.clone();
        want2[5] = 0x11;
        file_runs(&text, &file, &want2, &[3..8], &mut out);
        assert_eq!(out[2..], [5..6]);
    }
}
