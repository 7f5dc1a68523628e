//! The breakpoint byte: what a trap-based live update writes over a site,
//! and what debuggers and the kernel's uprobes write too.

use super::encode::INT3;
#[cfg(feature = "std")]
use crate::short::load_short;

/// The byte a trap-based live update writes over a site's first byte
/// (`int3`), and the filler after an unconditional branch.
pub const TRAP: u8 = INT3;

/// Whether `b` holds a [`TRAP`] byte (`int3`: ours mid-update, or a
/// debugger's or uprobe's breakpoint).
#[cfg(feature = "std")]
#[inline]
pub fn contains_trap(b: &[u8]) -> bool {
    if b.len() <= 8 {
        // SAFETY: `b` is `b.len() <= 8` readable bytes.
        let x = unsafe { load_short(b.as_ptr(), b.len()) } ^ 0xcccc_cccc_cccc_cccc;
        // Zero-byte test (exact: a byte is zero iff it was 0xcc); the bytes
        // above `b.len()` were zero before the xor and are masked off.
        let mask = if b.len() == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * b.len())) - 1
        };
        let lows = 0x0101_0101_0101_0101u64;
        let highs = 0x8080_8080_8080_8080u64;
        return (x.wrapping_sub(lows) & !x & highs & mask) != 0;
    }
    memchr::memchr(TRAP, b).is_some()
}

/// Appends `src` to `dst` unless it holds a [`TRAP`] byte; whether it was
/// appended (`dst` is unchanged otherwise). One pass that copies and looks
/// at once, 32 bytes a step: the in-place publication joins its stores
/// across the text between sites this way, thousands of times at start-up.
#[cfg(feature = "std")]
pub(crate) fn append_unless_trap(dst: &mut alloc::vec::Vec<u8>, src: &[u8]) -> bool {
    use core::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_setzero_si128, _mm_storeu_si128,
    };
    let n = src.len();
    if n < 16 {
        if contains_trap(&src[..n.min(8)]) || (n > 8 && contains_trap(&src[8..])) {
            return false;
        }
        crate::short::extend_short(dst, src);
        return true;
    }
    dst.reserve(n);
    let start = dst.len();
    // SAFETY: SSE2 is part of x86-64. Every load reads 16 bytes inside
    // `src` (`i + 16 <= n`, and the last block starts at `n - 16 >= 0`);
    // every store writes 16 bytes inside the `n` reserved after `start`.
    // The length is set only once all `n` bytes are written.
    unsafe {
        let (from, to) = (src.as_ptr(), dst.as_mut_ptr().add(start));
        let trap = _mm_set1_epi8(TRAP as i8);
        let mut seen = _mm_setzero_si128();
        let mut step = |i: usize| {
            let v = _mm_loadu_si128(from.add(i).cast::<__m128i>());
            _mm_storeu_si128(to.add(i).cast::<__m128i>(), v);
            seen = _mm_or_si128(seen, _mm_cmpeq_epi8(v, trap));
        };
        let mut i = 0;
        while i + 32 <= n {
            step(i);
            step(i + 16);
            i += 32;
        }
        if i + 16 <= n {
            step(i);
        }
        // The last 16 bytes, overlapping what is done already.
        step(n - 16);
        if _mm_movemask_epi8(seen) != 0 {
            return false;
        }
        dst.set_len(start + n);
    }
    true
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn finds_a_trap_in_short_and_long_slices() {
        for n in 1..40usize {
            let mut b = alloc::vec![0x90u8; n];
            assert!(!contains_trap(&b));
            for i in 0..n {
                b[i] = TRAP;
                assert!(contains_trap(&b), "n={n} i={i}");
                b[i] = 0x90;
            }
        }
    }

    #[test]
    fn appends_only_what_holds_no_trap() {
        for n in 0..80usize {
            let src: alloc::vec::Vec<u8> = (0..n).map(|k| (k % 200) as u8 + 1).collect();
            let mut dst = alloc::vec![7u8; 3];
            assert!(append_unless_trap(&mut dst, &src), "n={n}");
            assert_eq!(dst[..3], [7, 7, 7]);
            assert_eq!(dst[3..], src[..], "n={n}");
            for i in 0..n {
                let mut with = src.clone();
                with[i] = TRAP;
                let mut dst = alloc::vec![7u8; 3];
                assert!(!append_unless_trap(&mut dst, &with), "n={n} i={i}");
                assert_eq!(dst, [7, 7, 7], "n={n} i={i}");
            }
        }
    }
}
