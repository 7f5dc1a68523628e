//! Few-byte copies and compares for the per-edit hot paths: a site is a
//! handful of bytes, and a `memcpy`/`bcmp` call costs more than the work.
//! Byte loops are no answer: the compiler turns them back into those calls.
//!
//! At the bottom of the layers (it imports nothing of the crate): the
//! encodings' live rules (`arch`) compare sites with it as much as plans
//! and pokes do.

use core::ops::Range;

/// Copies `n` bytes: two overlapping unaligned word moves up to 16 bytes,
/// `memcpy` beyond.
///
/// # Safety
///
/// As for [`core::ptr::copy_nonoverlapping`].
#[inline]
#[doc(hidden)]
pub unsafe fn copy_short(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY (all arms): every access is within `src..src+n` and
    // `dst..dst+n`, valid by the caller's contract; both reads happen before
    // the writes.
    unsafe {
        // Sites (5 and 6 bytes) first: tested before the other lengths.
        if n.wrapping_sub(4) < 4 {
            let a = src.cast::<u32>().read_unaligned();
            let b = src.add(n - 4).cast::<u32>().read_unaligned();
            dst.cast::<u32>().write_unaligned(a);
            dst.add(n - 4).cast::<u32>().write_unaligned(b);
            return;
        }
        match n {
            0 => {}
            1 => *dst = *src,
            2..=3 => {
                let a = src.cast::<u16>().read_unaligned();
                let b = src.add(n - 2).cast::<u16>().read_unaligned();
                dst.cast::<u16>().write_unaligned(a);
                dst.add(n - 2).cast::<u16>().write_unaligned(b);
            }
            8..=16 => {
                let a = src.cast::<u64>().read_unaligned();
                let b = src.add(n - 8).cast::<u64>().read_unaligned();
                dst.cast::<u64>().write_unaligned(a);
                dst.add(n - 8).cast::<u64>().write_unaligned(b);
            }
            _ => core::ptr::copy_nonoverlapping(src, dst, n),
        }
    }
}

/// The `n` bytes at `p` (at most 8) as a little-endian integer, zero above
/// them: at most two overlapping loads, no call (the few-byte compares of
/// start-up planning and validation).
///
/// # Safety
///
/// `p..p+n` must be readable; `n` must be at most 8.
#[inline]
#[doc(hidden)]
pub unsafe fn load_short(p: *const u8, n: usize) -> u64 {
    debug_assert!(n <= 8);
    // SAFETY (all arms): every read is within `p..p+n`, readable by the
    // caller's contract. Overlapping halves hold the same bytes at the
    // same positions, so or-ing them is exact.
    unsafe {
        if n.wrapping_sub(4) < 4 {
            let lo = u32::from_le(p.cast::<u32>().read_unaligned());
            let hi = u32::from_le(p.add(n - 4).cast::<u32>().read_unaligned());
            return u64::from(lo) | u64::from(hi) << (8 * (n - 4));
        }
        match n {
            0 => 0,
            1 => u64::from(*p),
            2..=3 => {
                let lo = u16::from_le(p.cast::<u16>().read_unaligned());
                let hi = u16::from_le(p.add(n - 2).cast::<u16>().read_unaligned());
                u64::from(lo) | u64::from(hi) << (8 * (n - 2))
            }
            // 8 (4 to 7 are above).
            _ => u64::from_le(p.cast::<u64>().read_unaligned()),
        }
    }
}

/// Appends `bytes` to `v` with [`copy_short`] (no `memcpy` call for a
/// site's few bytes).
#[cfg(feature = "std")]
#[inline]
#[doc(hidden)]
pub fn extend_short(v: &mut alloc::vec::Vec<u8>, bytes: &[u8]) {
    let (len, n) = (v.len(), bytes.len());
    v.reserve(n);
    // SAFETY: `n` bytes of reserved room after `len` are written before the
    // length covers them; `bytes` is another object.
    unsafe {
        copy_short(bytes.as_ptr(), v.as_mut_ptr().add(len), n);
        v.set_len(len + n);
    }
}

/// Whether two byte strings are equal, with word compares up to 16 bytes.
#[inline]
#[doc(hidden)]
pub fn short_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY (all arms): every read is within the two slices of length `n`.
    unsafe {
        // Sites (5 and 6 bytes) first, as in `copy_short`.
        if n.wrapping_sub(4) < 4 {
            return pa.cast::<u32>().read_unaligned() == pb.cast::<u32>().read_unaligned()
                && pa.add(n - 4).cast::<u32>().read_unaligned()
                    == pb.add(n - 4).cast::<u32>().read_unaligned();
        }
        match n {
            0 => true,
            1 => *pa == *pb,
            2..=3 => {
                pa.cast::<u16>().read_unaligned() == pb.cast::<u16>().read_unaligned()
                    && pa.add(n - 2).cast::<u16>().read_unaligned()
                        == pb.add(n - 2).cast::<u16>().read_unaligned()
            }
            8..=16 => {
                pa.cast::<u64>().read_unaligned() == pb.cast::<u64>().read_unaligned()
                    && pa.add(n - 8).cast::<u64>().read_unaligned()
                        == pb.add(n - 8).cast::<u64>().read_unaligned()
            }
            _ => a == b,
        }
    }
}

/// Whether `addr..end` lies inside one of `ranges`, the one at `*hint`
/// tried first and `*hint` moved to the one found: writes and sites come
/// in address order, so most fall in the range of the one before.
#[inline(always)]
#[doc(hidden)]
pub fn in_ranges(ranges: &[Range<usize>], hint: &mut usize, addr: usize, end: usize) -> bool {
    let inside = |r: &Range<usize>| r.start <= addr && end <= r.end;
    if ranges.get(*hint).is_some_and(inside) {
        return true;
    }
    match ranges.iter().position(inside) {
        Some(i) => {
            *hint = i;
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_copies_and_compares() {
        for n in 0..40usize {
            let src: alloc::vec::Vec<u8> = (1..=n as u8).collect();
            let mut dst = alloc::vec![0u8; n];
            // SAFETY: both buffers are `n` bytes.
            unsafe { copy_short(src.as_ptr(), dst.as_mut_ptr(), n) };
            assert_eq!(src, dst);
            assert!(short_eq(&src, &dst));
            if n <= 8 {
                let mut padded = [0u8; 8];
                padded[..n].copy_from_slice(&src);
                // SAFETY: `src` is `n` bytes.
                let v = unsafe { load_short(src.as_ptr(), n) };
                assert_eq!(v, u64::from_le_bytes(padded), "n={n}");
            }
            for i in 0..n {
                let mut d = dst.clone();
                d[i] ^= 0x80;
                assert!(!short_eq(&src, &d), "n={n} i={i}");
            }
        }
    }
}
