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
}
