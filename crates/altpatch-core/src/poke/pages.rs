//! Page arithmetic for batches: the pages a run of bytes covers, and the
//! runs of pages not yet known.

use core::ops::Range;

use super::PAGE_SIZE;

/// The page-aligned range covering `addr..end`.
#[inline]
#[doc(hidden)]
pub fn page_span(addr: usize, end: usize) -> Range<usize> {
    let start = addr & !(PAGE_SIZE - 1);
    let end = (end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    start..end
}

/// The pages of the page-aligned `pages` for which `known` is false, as
/// runs of contiguous pages.
#[cfg(feature = "std")]
#[doc(hidden)]
pub fn unknown_pages(
    pages: &[Range<usize>],
    known: impl Fn(usize) -> bool,
) -> alloc::vec::Vec<Range<usize>> {
    let mut out: alloc::vec::Vec<Range<usize>> = alloc::vec::Vec::new();
    for r in pages {
        for p in r.clone().step_by(PAGE_SIZE) {
            if known(p) {
                continue;
            }
            match out.last_mut() {
                Some(m) if m.end == p => m.end += PAGE_SIZE,
                _ => out.push(p..p + PAGE_SIZE),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(page_span(0x1000, 0x1001), 0x1000..0x2000);
        assert_eq!(page_span(0x1fff, 0x2001), 0x1000..0x3000);
    }
}
