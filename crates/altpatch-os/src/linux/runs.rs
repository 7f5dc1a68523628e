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
//!   is safe only where nothing of the kernel's can be: a breakpoint
//!   removed before our store would come back, unknown to the kernel, and
//!   kill the next thread to reach it (an optimized probe, a `nop5` the
//!   kernel made a `call` to its uprobe trampoline, would come back too).
//!   The page swap joins across text that is its file's bytes; the
//!   in-place stores across text that is its file's bytes (read through
//!   `file_view.rs`), or in anonymous text, which no probe reaches, holds
//!   no `0xcc`.
//!
//! At a position of ours where the target holds `0xcc` and the file holds
//! the byte we want, the `0xcc` is the kernel's breakpoint over an
//! unpatched instruction: it is left alone.

use alloc::vec::Vec;
use core::ops::Range;

use crate::poke::short_eq;

/// Unchanged bytes worth rewriting between two stores to save a call: a
/// page. A `pwrite` to `/proc/self/mem` costs microseconds; copying a page
/// costs a few hundred instructions. On `tests/fixtures/realprog`'s
/// start-up (embedded table), 512 made 521 calls and 4096 makes about 160, for
/// 1 % more instructions and 0.2 ms less.
pub(super) const JOIN: usize = 4096;

// Whether bytes hold a breakpoint is the architecture's question.
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
