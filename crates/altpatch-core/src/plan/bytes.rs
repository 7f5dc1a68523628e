//! A short byte string held inline when small.

use alloc::boxed::Box;
use core::fmt;
use core::ops::Deref;

/// Bytes stored inline: every single instruction fits.
const INLINE: usize = 15;

/// The length tag of a [`Bytes`]: 0..=15 inline, or on the heap. An enum,
/// not a `u8`, so the compiler can use the unused tag values as a niche
/// (`Option<Bytes>` and [`Expect`](super::Expect) stay 16 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[rustfmt::skip]
enum Tag {
    L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15,
    Heap,
}

impl Tag {
    const INLINE: [Tag; INLINE + 1] = [
        Tag::L0,
        Tag::L1,
        Tag::L2,
        Tag::L3,
        Tag::L4,
        Tag::L5,
        Tag::L6,
        Tag::L7,
        Tag::L8,
        Tag::L9,
        Tag::L10,
        Tag::L11,
        Tag::L12,
        Tag::L13,
        Tag::L14,
        Tag::L15,
    ];
}

/// An immutable byte string in 16 bytes: up to 15 bytes inline (every
/// single x86 instruction), longer ones on the heap.
///
/// ```
/// use altpatch::plan::Bytes;
/// let b = Bytes::new(&[0xe8, 0, 0, 0, 0]);
/// assert_eq!(&b[..], &[0xe8, 0, 0, 0, 0]);
/// let long = Bytes::new(&[0x90; 40]);
/// assert_eq!(long.len(), 40);
/// assert_eq!(core::mem::size_of::<Bytes>(), 16);
/// ```
pub struct Bytes {
    data: Data,
    tag: Tag,
}

/// Inline bytes, or a leaked `Box<[u8]>`; `Bytes::tag` says which.
#[derive(Clone, Copy)]
#[repr(C)]
union Data {
    inline: [u8; INLINE],
    heap: HeapParts,
}

#[derive(Clone, Copy)]
#[repr(C, packed)]
struct HeapParts {
    ptr: *mut u8,
    len: u32,
}

// SAFETY: `Bytes` owns its heap allocation exclusively, like `Box<[u8]>`.
unsafe impl Send for Bytes {}
// SAFETY: shared access only reads.
unsafe impl Sync for Bytes {}

impl Bytes {
    /// Copies `bytes`.
    ///
    /// # Panics
    ///
    /// If `bytes` is 4 GiB or longer.
    #[inline]
    pub fn new(bytes: &[u8]) -> Bytes {
        if bytes.len() <= INLINE {
            let mut inline = [0u8; INLINE];
            // SAFETY: `bytes.len() <= INLINE`, the size of `inline`; a
            // short copy, not a `memcpy` call (start-up builds two per site).
            unsafe { crate::poke::copy_short(bytes.as_ptr(), inline.as_mut_ptr(), bytes.len()) };
            Bytes {
                data: Data { inline },
                tag: Tag::INLINE[bytes.len()],
            }
        } else {
            let len = u32::try_from(bytes.len()).expect("an edit shorter than 4 GiB");
            let ptr = Box::into_raw(Box::<[u8]>::from(bytes)) as *mut u8;
            Bytes {
                data: Data {
                    heap: HeapParts { ptr, len },
                },
                tag: Tag::Heap,
            }
        }
    }

    /// Pointer and length of the heap allocation (`Heap` values only).
    fn heap_parts(&self) -> (*mut u8, usize) {
        debug_assert!(self.tag == Tag::Heap);
        // SAFETY: the tag says `heap` is the initialized field; the packed
        // struct is copied out by value, so no unaligned reference is made.
        let h = unsafe { self.data.heap };
        (h.ptr, h.len as usize)
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        match self.tag {
            Tag::Heap => {
                let (ptr, len) = self.heap_parts();
                // SAFETY: a `Heap` value owns a live allocation of `len`
                // bytes at `ptr`, made in `new` and freed only in `drop`.
                unsafe { core::slice::from_raw_parts(ptr, len) }
            }
            // SAFETY: the tag says `inline` is the initialized field.
            t => unsafe { &self.data.inline[..t as usize] },
        }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        if self.tag == Tag::Heap {
            let (ptr, len) = self.heap_parts();
            // SAFETY: rebuilds the box leaked in `new`; this is its only owner.
            drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(ptr, len)) });
        }
    }
}

impl Clone for Bytes {
    fn clone(&self) -> Bytes {
        match self.tag {
            Tag::Heap => Bytes::new(self.as_slice()),
            tag => Bytes {
                data: Data {
                    // SAFETY: the tag says `inline` is the initialized field.
                    inline: unsafe { self.data.inline },
                },
                tag,
            },
        }
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Bytes {}

impl core::hash::Hash for Bytes {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl Deref for Bytes {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Bytes {
        Bytes::new(b)
    }
}

impl<const N: usize> From<[u8; N]> for Bytes {
    fn from(b: [u8; N]) -> Bytes {
        Bytes::new(&b)
    }
}

impl<const N: usize> From<&[u8; N]> for Bytes {
    fn from(b: &[u8; N]) -> Bytes {
        Bytes::new(b)
    }
}

impl From<crate::arch::Encoded> for Bytes {
    fn from(e: crate::arch::Encoded) -> Bytes {
        Bytes::new(&e)
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", crate::hex::HexBytes(self))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&crate::hex::HexBytes(self), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn sizes() {
        assert_eq!(core::mem::size_of::<Bytes>(), 16);
        assert_eq!(core::mem::size_of::<Option<Bytes>>(), 16);
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..100usize {
            let v: Vec<u8> = (0..len as u8).collect();
            let b = Bytes::new(&v);
            assert_eq!(&b[..], &v[..]);
            let c = b.clone();
            drop(b);
            assert_eq!(&c[..], &v[..]);
        }
    }
}
