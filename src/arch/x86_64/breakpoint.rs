//! The breakpoint byte: what a trap-based live update writes over a site,
//! and what debuggers and the kernel's uprobes write too.

use super::encode::INT3;
use crate::short::load_short;

/// The byte a trap-based live update writes over a site's first byte
/// (`int3`), and the filler after an unconditional branch.
pub const TRAP: u8 = INT3;

/// Whether `b` holds a [`TRAP`] byte (`int3`: ours mid-update, or a
/// debugger's or uprobe's breakpoint).
///
/// ```
/// assert!(altpatch::x86::contains_trap(&[0x90, 0xcc]));
/// assert!(!altpatch::x86::contains_trap(&[0x0f, 0x1f, 0x44, 0x00, 0x00]));
/// ```
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
    #[cfg(feature = "std")]
    return memchr::memchr(TRAP, b).is_some();
    #[cfg(not(feature = "std"))]
    b.contains(&TRAP)
}
